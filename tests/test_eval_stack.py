"""EVAL stack: legal TTT, n-gram cache, EvalEngram, temperature scaling, stage order, budget skips, multi-rank."""
import json

import numpy as np
import pytest
import torch

import train_gpt
from conftest import SP1024, log_values, run_trainer, tiny_hparams, tiny_model

CPU = torch.device("cpu")
FLAT_TABLES = (torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
SMALL = dict(TTT_CHUNK_TOKENS=128, TTT_BATCH_SEQS=4, TTT_LR=0.05, TTT_SCOPE="all", NGRAM_BUCKETS=4096,
             EVAL_ENGRAM_BUCKETS=64, EVAL_ENGRAM_ENTROPY_THRESHOLD=0.0, EVAL_ENGRAM_ALPHA=0.5)


def artifact_model(tmp_path, seed=0, **overrides):
    """A tiny model with every matrix random (no zero-init: context matters), exported and reloaded (frozen)."""
    model = tiny_model(seed, **overrides)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, train_gpt.TernaryLinear):
                module.weight.normal_(0, module.weight.size(1) ** -0.5)
    path = tmp_path / f"model{seed}.skc"
    train_gpt.write_artifact(path, train_gpt.compress_payload(train_gpt.serialize_model(model)))
    return train_gpt.load_model_from_artifact(path, CPU), path


def unique_tokens(n, seed=0):
    """A stream whose every token id appears once, so a token id names its position."""
    return torch.randperm(1024, generator=torch.Generator().manual_seed(seed))[:n]


def test_chunked_stage_without_features_equals_sliding_eval(tmp_path):
    """With no TTT / caches and temperature 1 the chunked engine is the sliding eval (score_windows)."""
    model, _ = artifact_model(tmp_path)
    hp = tiny_hparams(**SMALL)
    tokens = torch.randint(0, 1024, (700,))
    for stride in (64, 16):
        reference = train_gpt.score_windows(model, tokens, train_gpt.eval_windows(700, 64, stride), 8, FLAT_TABLES, CPU)
        chunked = train_gpt.score_segment(model, tokens, hp, FLAT_TABLES, CPU, stride, set())
        assert torch.allclose(reference, chunked, rtol=1e-9) and chunked[2] == 699


def test_ttt_only_learns_from_already_scored_tokens(tmp_path):
    """Every TTT step's targets were scored before it; the weights scoring a chunk saw only earlier chunks."""
    model, _ = artifact_model(tmp_path)
    hp = tiny_hparams(**SMALL)
    tokens = unique_tokens(600)
    position = {int(t): i for i, t in enumerate(tokens)}
    events, original_hidden = [], model.hidden

    def recording_hidden(ids):
        targets = [position[int(t)] + 1 for t in ids.flatten()]
        events.append(("train" if torch.is_grad_enabled() else "score", min(targets), max(targets)))
        return original_hidden(ids)

    model.hidden = recording_hidden
    with_ttt = train_gpt.score_segment(model, tokens, hp, FLAT_TABLES, CPU, 32, {"ttt"})
    del model.hidden
    scored_upto, train_steps = 0, 0
    for kind, lowest, highest in events:
        if kind == "score":
            scored_upto = max(scored_upto, highest)
        else:
            train_steps += 1
            assert 1 <= lowest and highest <= scored_upto, f"TTT trained on targets {lowest}..{highest}, scored only up to {scored_upto}"
    assert train_steps >= 3 and scored_upto == 599
    without = train_gpt.score_segment(model, tokens, hp, FLAT_TABLES, CPU, 32, set())
    assert with_ttt[2] == without[2] == 599 and not torch.equal(with_ttt[0], without[0]), "TTT changed nothing"


def test_ttt_restores_weights_and_flags_bit_identically(tmp_path):
    """After a TTT stage every parameter, requires_grad flag and grad is exactly what it was."""
    model, _ = artifact_model(tmp_path)
    model.blocks[0].mlp_scale.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    train_gpt.score_segment(model, torch.randint(0, 1024, (500,)), tiny_hparams(**SMALL), FLAT_TABLES, CPU, 64, {"ttt"})
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.requires_grad == flags[name] and p.grad is None, name


def test_ttt_scopes_select_by_route_and_ttt_group():
    """scales = route scalar; skc_safe adds ttt_group skc; capsule_bank only its group; all but frozen engram."""
    model = tiny_model()
    skc, capsule, engram = model.blocks[0].mlp.up.weight, model.blocks[1].mlp.up.weight, model.tok_emb.weight
    skc.ttt_group, capsule.ttt_group, engram.ttt_group = "skc", "capsule_bank", "engram"
    scalars = {id(p) for p in model.parameters() if p.route == "scalar"}
    ids = lambda scope, freeze=1: {id(p) for p in train_gpt.ttt_parameters(model, scope, freeze)}
    assert ids("scales") == scalars and len(scalars) > 0
    assert ids("skc_safe") == scalars | {id(skc)}
    assert ids("capsule_bank") == {id(capsule)}
    assert ids("all") == {id(p) for p in model.parameters()} - {id(engram)}
    assert id(engram) in ids("all", freeze=0)
    with pytest.raises(train_gpt.ConfigError, match="TTT_SCOPE=capsule_bank"):
        train_gpt.ttt_parameters(tiny_model(), "capsule_bank", 1)


def test_strict_engram_freeze_raises_when_a_table_drifts(tmp_path):
    """FREEZE_PACKED_ENGRAM=2 raises if an engram table changed during TTT; =1 only keeps it out of the optimizer."""
    model, _ = artifact_model(tmp_path)
    table = model.blocks[0].mlp.up.weight
    table.ttt_group = "engram"

    def drift(module, args):
        if torch.is_grad_enabled():
            with torch.no_grad():
                table.add_(1e-3)

    original = table.detach().clone()
    handle = model.register_forward_pre_hook(drift)
    with pytest.raises(RuntimeError, match="FREEZE_PACKED_ENGRAM=2"):
        train_gpt.score_segment(model, torch.randint(0, 1024, (400,)), tiny_hparams(**SMALL, FREEZE_PACKED_ENGRAM=2), FLAT_TABLES, CPU, 64, {"ttt"})
    handle.remove()
    assert torch.equal(table.detach(), original), "weights not restored after the error"
    trainer = train_gpt.TestTimeTrainer(model, tiny_hparams(**SMALL), CPU)
    assert not any(p is table for p in trainer.params) and not table.requires_grad
    trainer.restore()


@pytest.mark.parametrize("kind", ["ngram", "evalengram"])
def test_cache_tables_hold_only_earlier_chunks(tmp_path, kind):
    """When chunk k is scored, the cache equals one rebuilt from the targets of chunks < k (nothing later)."""
    model, _ = artifact_model(tmp_path)
    hp = tiny_hparams(**SMALL)
    tokens = torch.randint(0, 1024, (700,))
    seen = []

    def check(k, first, end, ngram, engram):
        cache = ngram if kind == "ngram" else engram
        fresh = (train_gpt.NgramCache if kind == "ngram" else train_gpt.EvalEngram)(hp, CPU)
        fresh.update(tokens, torch.arange(1, first))
        tensors = (cache.context_counts, cache.pair_counts) if kind == "ngram" else (cache.counts,)
        rebuilt = (fresh.context_counts, fresh.pair_counts) if kind == "ngram" else (fresh.counts,)
        assert all(torch.equal(a, b) for a, b in zip(tensors, rebuilt)), f"chunk {k}"
        if kind == "ngram":
            assert int(cache.context_counts[0].sum()) == first - 1  # order 1 counts every earlier target once
        seen.append((first, float(tensors[0].sum())))

    train_gpt.score_segment(model, tokens, hp, FLAT_TABLES, CPU, 32, {kind}, on_chunk=check)
    assert len(seen) >= 4 and seen[0] == (1, 0.0) and seen[-1][1] > 0


def test_ngram_mixture_is_a_normalized_distribution():
    """Mixed probabilities over the whole vocabulary sum to 1 at every position (hash collisions included)."""
    hp = tiny_hparams(NGRAM_BUCKETS=257, NGRAM_MAX_ORDER=3, NGRAM_ALPHA_BASE=0.3)
    cache = train_gpt.NgramCache(hp, CPU)
    tokens = torch.randint(0, 50, (400,))
    cache.update(tokens, torch.arange(1, 300))
    positions = torch.arange(300, 310)
    logp = torch.log_softmax(torch.randn(10, 1024), -1)
    every = torch.arange(1024).repeat(10)  # each position paired with every vocabulary entry
    nll = cache.mixed_nll(logp.repeat_interleave(1024, 0), tokens, positions.repeat_interleave(1024), every)
    assert torch.allclose(torch.exp(-nll).view(10, 1024).sum(-1), torch.ones(10), atol=1e-4)
    assert bool(cache.predict(tokens, positions)[1].all())


def test_engram_alpha_and_threshold_come_from_env(tmp_path):
    """EVAL_ENGRAM_ALPHA=0 or an unreachable EVAL_ENGRAM_ENTROPY_THRESHOLD leave the model's NLL unchanged."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 64, (500,))
    score = lambda **o: train_gpt.score_segment(model, tokens, tiny_hparams(**dict(SMALL, **o)), FLAT_TABLES, CPU, 64, {"evalengram"})[0]
    plain = train_gpt.score_segment(model, tokens, tiny_hparams(**SMALL), FLAT_TABLES, CPU, 64, set())[0]
    assert torch.allclose(score(EVAL_ENGRAM_ALPHA=0.0), plain)
    assert torch.allclose(score(EVAL_ENGRAM_ENTROPY_THRESHOLD=1e9), plain)
    assert not torch.allclose(score(), plain)


def test_engram_memory_limit_names_the_variables():
    """Tables over the memory fraction (CPU: of 4 GiB) are refused, naming the variables to change."""
    hp = tiny_hparams(EVAL_ENGRAM_ENABLED=1, EVAL_ENGRAM_BUCKETS=1 << 20)
    with pytest.raises(train_gpt.ConfigError, match="EVAL_ENGRAM_BUCKETS.*EVAL_ENGRAM_MAX_MEMORY_FRACTION"):
        train_gpt.check_eval_config(hp, CPU)
    train_gpt.check_eval_config(tiny_hparams(EVAL_ENGRAM_ENABLED=1), CPU)


def test_mismatched_artifact_is_a_clear_error(tmp_path):
    """An artifact whose vocab differs from VOCAB_SIZE is refused naming VOCAB_SIZE; so is an empty TTT scope."""
    model, path = artifact_model(tmp_path)
    with pytest.raises(train_gpt.ConfigError, match="VOCAB_SIZE=512"):
        train_gpt.check_artifact_matches(model, tiny_hparams(VOCAB_SIZE=512), path)
    with pytest.raises(train_gpt.ConfigError, match="TTT_SCOPE"):
        train_gpt.check_artifact_matches(model, tiny_hparams(TTT_ENABLED=1, TTT_SCOPE="capsule_bank"), path)


def test_plan_order_and_budget_skip(tmp_path):
    """Stages run in the fixed order; a stage projected past EVAL_MAX_SECONDS is skipped and logged, and the
    reported stage is the last that ran."""
    model, _ = artifact_model(tmp_path)
    lines = []
    hp = tiny_hparams(**SMALL, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=32, TTT_ENABLED=1, NGRAM_CACHE_ENABLED=1,
                      EVAL_ENGRAM_ENABLED=1, OUT_DIR=tmp_path, LOG_DIR=tmp_path)
    assert [n for n, _ in train_gpt.eval_plan(hp)] == ["roundtrip", "sliding", "ttt", "ngram", "evalengram"]
    tokens = torch.randint(0, 1024, (400,))
    results = train_gpt.run_eval_stack(model, tokens, hp, FLAT_TABLES, train_gpt.Dist(), lines.append)
    assert list(results) == ["roundtrip", "sliding", "ttt", "ngram", "evalengram"]
    assert all(log_values("\n".join(lines), "eval stage:" + n, "tok_s") for n in results)
    hp.eval_max_seconds = 1e-6
    lines.clear()
    results = train_gpt.run_eval_stack(model, tokens, hp, FLAT_TABLES, train_gpt.Dist(), lines.append)
    assert list(results) == ["roundtrip"]
    assert log_values("\n".join(lines), "eval_skip", "stage") == ["sliding", "ttt", "ngram", "evalengram"]
    summary = train_gpt.finish(results, hp, lines.append, train_gpt.Dist(), {})
    assert summary["stage"] == "roundtrip" and summary["planned"] == "evalengram"


def test_eval_projection_scales_to_the_official_val_split_on_eight_gpus():
    """A stage's seconds scale by official tokens / scored tokens and by world size / 8; CPU lines carry none."""
    one_gpu = train_gpt.eval_projection_seconds(10.0, 492_263, 1)
    assert one_gpu == pytest.approx(10.0 * train_gpt.OFFICIAL_VAL_TOKENS / 492_263 / 8)
    assert train_gpt.eval_projection_seconds(10.0, 492_263, 2) == pytest.approx(2 * one_gpu)
    assert train_gpt.projection_note(10.0, 492_263, train_gpt.Dist()) == {}
    on_gpu = train_gpt.projection_note(10.0, 492_263, train_gpt.Dist(device=torch.device("cuda", 0)))
    assert on_gpu == {"proj_8gpu_official_s": pytest.approx(one_gpu)}


def test_temperature_fit_reads_only_train_tokens(tiny_data, monkeypatch):
    """The temperature is fitted on the tail of the last train shard; val is never opened."""
    splits = []
    real_shard_paths = train_gpt.shard_paths
    monkeypatch.setattr(train_gpt, "shard_paths", lambda path, split: splits.append(split) or real_shard_paths(path, split))
    monkeypatch.setattr(train_gpt, "load_val_tokens", lambda *a, **k: pytest.fail("temperature fit read val"))
    hp = tiny_hparams(DATA_PATH=tiny_data, TEMP_FIT_TOKENS=2048)
    lines = []
    temperature = train_gpt.fit_temperature_from_train(tiny_model(), hp, train_gpt.Dist(), lines.append)
    assert set(splits) == {"train"}
    train_tail = train_gpt.load_shard(real_shard_paths(tiny_data, "train")[-1], 1024)[-2048:]
    assert torch.equal(train_gpt.train_tail(tiny_data, 1024, 2048), torch.from_numpy(train_tail.astype(np.int64)))
    assert float(log_values("\n".join(lines), "temperature", "fitted")[0]) == pytest.approx(temperature, abs=1e-4)
    hp = tiny_hparams(DATA_PATH=tiny_data, TEMP_FIT_TOKENS=2048, TEMP_SCALING=1, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=32,
                      EVAL_BATCH_SEQS=32)
    model, val = tiny_model(), torch.randint(0, 1024, (300,))
    lines.clear()
    results = train_gpt.run_eval_stack(model, val, hp, FLAT_TABLES, train_gpt.Dist(), lines.append)
    assert log_values("\n".join(lines), "temperature", "fitted") == [f"{temperature:.4f}"]
    scaled = train_gpt.score_segment(model, val, hp, FLAT_TABLES, CPU, 32, set(), temperature)
    assert results["sliding"]["val_loss"] == pytest.approx(float(scaled[0] / scaled[2]), rel=1e-9)
    roundtrip = train_gpt.score_windows(model, val, train_gpt.eval_windows(300, 64, 64), 8, FLAT_TABLES, CPU)
    assert results["roundtrip"]["val_loss"] == pytest.approx(float(roundtrip[0] / roundtrip[2]), rel=1e-9)


class OverconfidentBigram(torch.nn.Module):
    """A bigram model whose logits are the true ones times 1.5: the right temperature is 1.5."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def hidden(self, ids):
        return ids, []

    def logits(self, ids):
        return self.table[ids] * 1.5


def test_temperature_fit_recovers_a_known_temperature():
    """On tokens sampled from a bigram table, a model with 1.5x its logits is fitted T ~= 1.5."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(16, 16, generator=generator) * 2
    tokens = [0]
    for _ in range(6000):
        tokens.append(int(torch.multinomial(torch.softmax(table[tokens[-1]], -1), 1, generator=generator)))
    temperature, nll_at_1, nll_fit = train_gpt.fit_temperature(OverconfidentBigram(table), torch.tensor(tokens), tiny_hparams(), CPU)
    assert temperature == pytest.approx(1.5, abs=0.1) and nll_fit < nll_at_1


def test_two_rank_ttt_matches_single_rank_segments(tiny_data, tmp_path):
    """EVAL_ONLY on 2 gloo ranks: each rank adapts on its own segment; the result equals single-process runs of
    the same two segments."""
    model, path = artifact_model(tmp_path)
    env = dict(SMALL, EVAL_ONLY=1, ARTIFACT=path, DATA_PATH=tiny_data, TOKENIZER_PATH=SP1024, VOCAB_SIZE=1024,
               VAL_MAX_TOKENS=1200, TTT_ENABLED=1, TRAIN_SEQ_LEN=64, EVAL_BATCH_SEQS=8, RUN_ID="ttt2",
               OUT_DIR=tmp_path, LOG_DIR=tmp_path)
    result = run_trainer(env, nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert log_values(result.stdout, "eval_plan", "reported") == ["ttt"]
    stages = json.loads((tmp_path / "ttt2" / "submission.json").read_text())["stages"]
    import sentencepiece as spm
    tables = train_gpt.build_byte_tables(spm.SentencePieceProcessor(model_file=str(SP1024)), 1024)
    val = train_gpt.load_val_tokens(tiny_data, 1024, 1200)
    hp = tiny_hparams(**env)
    totals = torch.zeros(3, dtype=torch.float64)
    for rank in range(2):
        first, last = train_gpt.rank_segment(len(val), rank, 2)
        totals += train_gpt.score_segment(model, val[first:last + 1], hp, tables, CPU, 64, {"ttt"})
    assert totals[2] == 1199 == stages["ttt"]["tokens"]
    assert stages["ttt"]["val_loss"] == pytest.approx(float(totals[0] / totals[2]), rel=1e-6)
    assert stages["ttt"]["val_bpb"] == pytest.approx(train_gpt.bits_per_byte(totals[0], totals[1]), rel=1e-6)
    single = train_gpt.score_segment(model, val, hp, tables, CPU, 64, {"ttt"})
    assert not torch.equal(single[0], totals[0])  # segments really are separate streams (no shared gradients)
