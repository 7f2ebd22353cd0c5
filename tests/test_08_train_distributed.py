"""TRAIN + MAIN across processes (gloo): 2 ranks equal 1 rank with the same global batch; ranks agree on one run id
without RUN_ID; TTT on 2 ranks is the two segments scored alone; 2 nodes with nothing on a shared disk (each its own
OUT_DIR, LOG_DIR and smoke corpus) finish with one artifact, rank 0's, broadcast to the other."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train_gpt
from conftest import CPU, REPO, eval_context, log_values, run_trainer, stage, tiny_config, trainer_env

# Deterministic options only (stochastic depth and weight noise draw per rank): SKC layers 1 and 3 with shared blocks
# (period 2), XSA, VRL, a recurrence switching on mid-run, the parallel block, the curriculum, engram.
OPTIONS = dict(ARCHITECTURE="competition", SKC_LAYERS="1,3", SHARED_BLOCKS=2, SKC_PARALLEL_RESIDUAL=1, XSA_START_LAYER=2,
               VRL_ENABLED=1, RECURRENCE_LAYERS="2", RECURRENCE_START_FRACTION=0.5, PARALLEL_RESIDUAL_START=3,
               CURRICULUM_ENABLED=1, CURRICULUM_MIN_SEQ_LEN=16, BIGRAM_HASH_ENABLED=1, BIGRAM_HASH_BUCKETS=256,
               TTT_ENABLED=1, TTT_CHUNK_TOKENS=256, TTT_SCOPE="all", TTT_LR=0.01, VAL_MAX_TOKENS=1200, CODE_BYTES=1)


@pytest.fixture(scope="module")
def one_and_two_ranks(tiny_data, own_tokenizer, tmp_path_factory):
    """The same run on 1 rank x 2 micro-batches and on 2 gloo ranks x 1 (neither sets RUN_ID)."""
    runs = {}
    for nproc in (1, 2):
        tmp_path = tmp_path_factory.mktemp(f"ranks{nproc}")
        env = trainer_env(tiny_data, own_tokenizer, tmp_path, **OPTIONS)
        del env["RUN_ID"]
        result = run_trainer(env, nproc=nproc, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[nproc] = (result.stdout, tmp_path)
    runs.update(data=tiny_data, tokenizer=own_tokenizer)
    return runs


def test_two_ranks_train_like_one_rank_with_the_same_global_batch(one_and_two_ranks):
    """2 gloo ranks x 1 micro-batch == 1 rank x 2 micro-batches: the same losses and roundtrip BPB. Not bit for bit:
    DDP's all-reduce adds the two micro-batch gradients in another order (an ulp per element), and Muon's bf16
    Newton-Schulz turns that into at most a bf16 rounding step of the update (2^-8 x MATRIX_LR = 1.6e-4 per weight per
    step), which over 4 steps of this tiny model moves the loss and BPB by < 2e-4 (the logged 4th decimal, +-2)."""
    (one, _), (two, _) = one_and_two_ranks[1], one_and_two_ranks[2]
    losses = [[float(v) for v in log_values(out, "train ", "train_loss")] for out in (one, two)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=2e-4)
    roundtrip = [float(log_values(out, "eval stage:roundtrip", "val_bpb")[0]) for out in (one, two)]
    assert roundtrip[0] == pytest.approx(roundtrip[1], abs=2e-4)
    for out in (one, two):
        lines = [line for line in out.splitlines() if line.startswith(("eval ", "final "))]
        assert all("WARNING:val_split_truncated" in line.split() for line in lines), lines


def test_ranks_agree_on_one_run_id_and_one_artifact(one_and_two_ranks):
    """Without RUN_ID rank 0 draws the id and broadcasts it: both ranks print the same final line (rank 1's carries
    rank:1), and OUT_DIR holds exactly one artifact."""
    two, tmp_path = one_and_two_ranks[2]
    finals = [line for line in two.splitlines() if line.startswith("final ")]
    rank0 = [line for line in finals if not line.endswith(" rank:1")]
    assert len(finals) == 2 and len(rank0) == 1 and rank0[0] + " rank:1" in finals
    assert len(list((tmp_path / "out").rglob("final_model.skc"))) == 1
    run_id = log_values(two, "run ", "run_id")[0]
    assert (tmp_path / "out" / run_id / "final_model.skc").is_file() and run_id.startswith("run_")


def test_two_rank_ttt_is_each_segment_adapted_alone(one_and_two_ranks, own_tokenizer, tiny_data):
    """The ttt stage on 2 ranks: each rank adapts on its own contiguous segment; the reported numbers equal the two
    segments scored one after another in this process from the same artifact (float64 sums; same ops, so equal to
    rel 1e-9)."""
    two, tmp_path = one_and_two_ranks[2]
    run_id = log_values(two, "run ", "run_id")[0]
    stages = json.loads((tmp_path / "out" / run_id / "submission.json").read_text())["stages"]
    model = train_gpt.load_model_from_artifact(tmp_path / "out" / run_id / "final_model.skc", CPU)
    import sentencepiece as spm
    tables = train_gpt.build_byte_tables(spm.SentencePieceProcessor(model_file=str(own_tokenizer)), 1024)
    val = train_gpt.load_val_tokens(tiny_data, 1024, 1200)
    env = {k: v for k, v in OPTIONS.items() if k.startswith(("TTT_", "EVAL_"))}
    totals = torch.zeros(3, dtype=torch.float64)
    for rank in range(2):
        ctx = eval_context(model, val, tables, train_gpt.Dist(rank=rank, world_size=2), **env)
        share, windows = train_gpt.stage_share(ctx, stage("ttt"))
        model.eval()
        totals += train_gpt.score_stream(share, [stage("ttt")], windows, 1.0)[0]
    assert int(totals[2]) == 1199 == stages["ttt"]["tokens"]
    assert stages["ttt"]["val_loss"] == pytest.approx(float(totals[0] / totals[2]), rel=1e-9)
    assert stages["ttt"]["val_bpb"] == pytest.approx(train_gpt.bits_per_byte(totals[0], totals[1]), rel=1e-9)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_without_a_shared_disk(tmp_path, own_tokenizer):
    """Two torchrun 'nodes' (1 process each) with their own OUT_DIR, LOG_DIR and DATA_PATH: each builds its smoke
    corpus, rank 0 alone writes the artifact and broadcasts its bytes, and both print the same final line. The run
    carries the random and routed options (MoE with all experts in the graph, engram, capsules + carry eval,
    feedback, TurboQuant, fp4 storage, stochastic depth, weight noise) that the equivalence run cannot."""
    port, procs = free_port(), []
    corpus = ",".join(str(REPO / name) for name in ("README.md", "data/README.md", "docs/results.md"))
    for node in range(2):
        node_dir = tmp_path / f"node{node}"
        env = dict(os.environ, RUN_PRESET="smoke", CORPUS=corpus, TOKENIZER_PATH=str(own_tokenizer), MAX_WALLCLOCK_SECONDS="0",
                   ITERATIONS="2", VAL_MAX_TOKENS="2048", DATA_PATH=str(node_dir / "data"), OUT_DIR=str(node_dir / "out"),
                   LOG_DIR=str(node_dir / "logs"), CODE_BYTES="1", GRAD_ACCUM_STEPS="2", ARCHITECTURE="hybrid", MOE_ENABLED="1", MOE_START_FRACTION="0",
                   BIGRAM_HASH_ENABLED="1", BIGRAM_HASH_BUCKETS="256", CAPSULE_ENABLED="1", CAPSULE_CARRY_EVAL="1",
                   FEEDBACK_ENABLED="1", FEEDBACK_PASSES="2", TURBO_QUANT_TRAIN="1", QUANT_EMBED="fp4", STOCHASTIC_DEPTH="0.2",
                   TERNARY_NOISE_SCALE="0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                   "--master_addr=127.0.0.1", f"--master_port={port}", str(REPO / "train_gpt.py")]
        procs.append(subprocess.Popen(command, env=env, cwd=node_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=400) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    finals = [[line for line in out.splitlines() if line.startswith("final ")] for out, _ in outputs]
    assert len(finals[0]) == 1 and finals[1] == [finals[0][0] + " rank:1"] and "stage:capsule_carry" in finals[0][0]
    assert len(list((tmp_path / "node0" / "out").rglob("final_model.skc"))) == 1
    assert not (tmp_path / "node1" / "out").exists() and not (tmp_path / "node1" / "logs").exists()
    for node in range(2):
        assert list((tmp_path / f"node{node}" / "data").rglob("fineweb_train_*.bin")), f"node {node} built no corpus"


@pytest.mark.parametrize("mode, bound", [("global", 1e-7), ("lora", 1e-7)])
def test_ttt_mode_gives_the_same_bpb_on_one_and_two_ranks(one_and_two_ranks, tmp_path, mode, bound):
    """EVAL_ONLY on the 2-rank artifact with TTT_MODE=global (every chunk shared by the ranks, gradients summed; the
    n-gram stage after it, whose learned weights sum the ranks' evidence) or lora (documents dealt to the ranks whole): 1 and 2 ranks report the same ttt BPB. Not bit for bit: global sums
    the two ranks' float32 gradient shares (an ulp per element per step; measured 4e-10 BPB after the TTT stage
    moved BPB by 0.024); lora batches other documents together, so the padded widths differ (float32 rounding
    only; measured 2.5e-9). The bound, 1e-7, is 40x the larger."""
    two, train_dir = one_and_two_ranks[2]
    run_id = log_values(two, "run ", "run_id")[0]
    artifact = train_dir / "out" / run_id / "final_model.skc"
    bpb, finals, ngram = {}, {}, {}
    for nproc in (1, 2):
        out_dir = tmp_path / f"eval{nproc}"
        env = trainer_env(one_and_two_ranks["data"], one_and_two_ranks["tokenizer"], out_dir, **OPTIONS, EVAL_ONLY=1,
                          ARTIFACT=artifact, TTT_MODE=mode, TTT_EPOCHS=2, NGRAM_BUCKETS=65536, NGRAM_CACHE_ENABLED=int(mode == "global"))
        result = run_trainer(env, nproc=nproc, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        bpb[nproc] = float(log_values(result.stdout, "eval stage:ttt", "val_bpb")[0])
        ngram[nproc] = [float(v) for v in log_values(result.stdout, "eval stage:ngram", "val_bpb")]
        finals[nproc] = float(log_values(result.stdout, "eval stage:roundtrip", "val_bpb")[0])
    assert finals[1] == pytest.approx(finals[2], rel=1e-9)  # float64 sums of the windows, grouped per rank
    assert bpb[1] == pytest.approx(bpb[2], abs=bound)
    assert ngram[1] == pytest.approx(ngram[2], abs=bound) and len(ngram[1]) == int(mode == "global")  # learned weights shared
    assert finals[1] != pytest.approx(bpb[1], abs=1e-4), "TTT changed nothing"
