"""TRAIN + MAIN, end to end in fresh processes: DDP equivalence, NaN stop, compile warm-up, the smoke preset."""
import json
import math
import re

import pytest
import torch

import train_gpt
from conftest import SP1024, TINY, log_values, run_trainer, tiny_hparams, tiny_model


def _env(tiny_data, tmp_path, **extra):
    return dict(TINY, DATA_PATH=str(tiny_data), TOKENIZER_PATH=str(SP1024), LOG_DIR=str(tmp_path / "logs"),
                OUT_DIR=str(tmp_path / "out"), RUN_ID="t", VAL_MAX_TOKENS="2048", **extra)


def _check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_data, tmp_path):
    """2 gloo ranks x 1 micro-batch == 1 rank x 2 micro-batches: same losses and same final BPB (to the 4 logged
    decimals, +-2 in the last); VAL_MAX_TOKENS is said on every eval line and on the final line of both runs."""
    one = _check(run_trainer(_env(tiny_data, tmp_path / "a"), nproc=1))
    two = _check(run_trainer(_env(tiny_data, tmp_path / "b"), nproc=2))
    losses_one = [float(v) for v in log_values(one, "step:", "train_loss")]
    losses_two = [float(v) for v in log_values(two, "step:", "train_loss")]
    assert len(losses_one) == 4 and losses_one == pytest.approx(losses_two, abs=2e-4)
    bpb = [float(log_values(out, "final", "val_bpb")[0]) for out in (one, two)]
    assert bpb[0] == pytest.approx(bpb[1], abs=2e-4)
    for out in (one, two):
        lines = [line for line in out.splitlines() if line.startswith(("eval ", "final "))]
        assert len([line for line in lines if line.startswith("eval ")]) >= 2 and lines[-1].startswith("final ")
        assert all("WARNING:val_split_truncated" in line.split() for line in lines), lines


def test_nan_loss_stops_with_step_and_last_finite_loss_and_writes_no_artifact(tiny_data, tmp_path):
    """A diverging run stops at the first non-finite loss, names that step and the last finite loss (a number, the
    one logged at the step before), and leaves no artifact behind."""
    result = run_trainer(_env(tiny_data, tmp_path, EMBED_LR="1e30", SCALAR_LR="1e30", ITERATIONS="20", GRAD_CLIP_NORM="0"))
    assert result.returncode != 0
    assert "No artifact was written" in result.stderr
    found = re.search(r"train loss is (\S+) at step (\d+); last finite loss (\S+) at step (\d+)\.", result.stderr)
    assert found, result.stderr[-2000:]
    bad_loss, bad_step, last_loss, last_step = float(found[1]), int(found[2]), float(found[3]), int(found[4])
    logged = [float(v) for v in log_values(result.stdout, "step:", "train_loss")]
    assert not math.isfinite(bad_loss) and bad_step == len(logged) + 1 >= 2 and last_step == bad_step - 1
    assert math.isfinite(last_loss) and last_loss == pytest.approx(logged[-1], abs=1e-4)
    assert not list((tmp_path / "out").rglob("*.skc"))


def test_runaway_loss_stops_the_run_before_export_naming_the_ratio(tiny_data, tmp_path):
    """A finite loss far above a uniform guess (here an aux term weighted 1000x) stops the run at that step with a
    message naming LOSS_RUNAWAY_RATIO and the aux terms, and no artifact; LOSS_RUNAWAY_RATIO=0 turns the stop off."""
    env = _env(tiny_data, tmp_path, MOE_ENABLED="1", MOE_AUX_WEIGHT="1000", ITERATIONS="2")
    result = run_trainer(env)
    assert result.returncode != 0 and "ran away" in result.stderr and "LOSS_RUNAWAY_RATIO=2.0" in result.stderr, result.stderr[-2000:]
    assert "auxiliary loss" in result.stderr and not list((tmp_path / "out").rglob("*.skc"))
    assert run_trainer(dict(env, LOSS_RUNAWAY_RATIO="0", OUT_DIR=str(tmp_path / "off"))).returncode == 0


def test_model_over_the_budget_stops_before_step_one_and_writes_no_artifact(tiny_data, tmp_path):
    """CODE_BYTES=16,000,000 puts code + model estimate over the limit: the run exits non-zero before step 1 with
    a message naming the estimate and the 16,000,000-byte limit, and writes no artifact."""
    result = run_trainer(_env(tiny_data, tmp_path, CODE_BYTES="16000000"))
    assert result.returncode != 0
    assert "estimate_before_training" in result.stderr and "exceeds the 16,000,000-byte limit" in result.stderr, result.stderr[-2000:]
    assert not log_values(result.stdout, "step:", "train_loss")
    assert not list((tmp_path / "out").rglob("*.skc"))


def test_compile_warmup_restores_weights_optimizer_and_data_position(tiny_data):
    """WARMUP_STEPS run real steps, then put weights, optimizer state and the data position back exactly."""
    hp = tiny_hparams(WARMUP_STEPS=2, DATA_PATH=str(tiny_data))
    run = train_gpt.Dist()
    model = tiny_model()
    optimizers = train_gpt.build_optimizers(model, hp, fused=False)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_paths(tiny_data, "train"), 1024, 0, 1, run.device)
    train_gpt.train_step(model, optimizers, loader, hp, run, 2, 0, 0.1)  # optimizer state exists before warm-up
    before = ({k: v.clone() for k, v in model.state_dict().items()}, loader.state(),
              [json.dumps({k: str(v) for k, v in o.state_dict()["state"].items()}) for o in optimizers])
    train_gpt.compile_warmup(model, optimizers, loader, hp, run, 2, model)
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert loader.state() == before[1]
    assert [json.dumps({k: str(v) for k, v in o.state_dict()["state"].items()}) for o in optimizers] == before[2]


def test_smoke_preset_end_to_end(tmp_path):
    """RUN_PRESET=smoke tokenizes its corpus, trains (loss goes down), exports, reloads, scores; the reloaded
    artifact scores exactly what the model scored before export."""
    from conftest import require_shared
    require_shared()
    out = _check(run_trainer(dict(RUN_PRESET="smoke", MAX_WALLCLOCK_SECONDS="0", ITERATIONS="10", LOG_DIR=str(tmp_path / "logs"),
                                  OUT_DIR=str(tmp_path / "out"), DATA_PATH=str(tmp_path / "data"), RUN_ID="smoke")))
    losses = [float(v) for v in log_values(out, "step:", "train_loss")]
    assert losses[-1] < losses[0] - 0.5
    prequant = log_values(out, "eval stage:prequant", "val_bpb")
    roundtrip = log_values(out, "eval stage:roundtrip", "val_bpb")
    assert prequant == roundtrip
    submission = json.loads((tmp_path / "out" / "smoke" / "submission.json").read_text())
    assert submission["val_bpb"] == pytest.approx(float(roundtrip[0]), abs=1e-4)
    assert submission["bytes_total"] == submission["bytes_code"] + submission["bytes_model"]


def test_flops_per_token_counts_matmuls_and_causal_attention():
    """6 x (2-D params) + 6 x attention layers x width x seq_len, by hand for the tiny model."""
    model = tiny_model()
    matmul = sum(p.numel() for p in model.parameters() if p.route != "scalar")
    assert matmul == 1024 * 32 + 2 * 64 * 32 + 4 * (64 * 64 * 2 + 2 * 64 * 32 + 2 * 64 * 128)
    assert train_gpt.flops_per_token(model, 64) == 6 * matmul + 6 * 4 * 64 * 64


def test_size_estimate_before_training_is_within_3_percent_of_the_artifact(tiny_data, tmp_path):
    """For a ternary-dominated model (the competition regime: fp8 embedding, ternary blocks) the pre-training
    estimate is within 3% of the real artifact after training. (Where fp16 embeddings dominate, as in the smoke
    preset, their compressibility moves with training and the estimate is only good to about 10%.)"""
    env = _env(tiny_data, tmp_path, MODEL_DIM="128", NUM_HEADS="4", MLP_MULT="4", FP_STORAGE="fp8", ITERATIONS="30",
               TRAIN_LOG_EVERY="10", GRAD_ACCUM_STEPS="1")
    out = _check(run_trainer(env))
    estimate, actual = (int(v) for v in log_values(out, "budget", "bytes_model"))
    assert abs(estimate - actual) / actual < 0.03, (estimate, actual)


def test_compile_stats_count_recompiles_after_warmup():
    """A new input shape after the warm-up is a recompile, and the compile_stats line counts it."""
    f = torch.compile(lambda x: (x * 2).sum(), dynamic=False, backend="eager")
    f(torch.ones(3))
    after_warmup = train_gpt.compiled_frames()
    f(torch.ones(3))
    lines = []
    train_gpt.log_compile_stats(lines.append, after_warmup)
    assert "recompiles_after_warmup:0" in lines[0]
    f(torch.ones(7))
    train_gpt.log_compile_stats(lines.append, after_warmup)
    assert "recompiles_after_warmup:1" in lines[1]


def test_smoke_preset_without_shared_uses_the_projects_own_text(tmp_path):
    """A checkout with no ../shared still runs the smoke preset end to end, on its own docs and sources, and says so."""
    import shutil
    import subprocess
    from conftest import REPO
    checkout = tmp_path / "alone" / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, checkout / name)
    out = run_trainer(dict(RUN_PRESET="smoke", MAX_WALLCLOCK_SECONDS="0", ITERATIONS="3", RUN_ID="alone"), cwd=checkout,
                      script=checkout / "train_gpt.py")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no ../shared/corpus found" in out.stdout and "final val_bpb:" in out.stdout
