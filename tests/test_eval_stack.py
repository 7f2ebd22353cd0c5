"""EVAL stack: legal TTT, n-gram cache, EvalEngram, temperature scaling, stage order, budget skips, multi-rank."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import SP1024, log_values, perturbed_model, require_shared, run_trainer, tiny_hparams, tiny_model

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


DOCUMENTS = ["The cat sat on the mat.", "Rain fell all night over the quiet town.", "A small boat drifted out to sea.",
             "She opened the old book and read aloud.", "Prices rose again in March.", "He said nothing at all.",
             "Bright stars shone above the hills.", "We walked home along the river.", "Music filled the empty hall.",
             "The train left at noon.", "Children laughed in the park.", "Snow covered every roof in the village."]


def sp1024_stream_and_tables():
    """sp1024 tokens of documents that start with a space, each after a BOS (a boundary, so that "▁" counts no byte)."""
    require_shared()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    ids = [i for _ in range(3) for doc in DOCUMENTS for i in [sp.bos_id()] + sp.encode("a " + doc)[1:]]  # "▁The ..."
    return torch.tensor(ids), train_gpt.build_byte_tables(sp, 1024)


def test_every_stage_counts_the_bytes_of_each_target_after_its_previous_token(tmp_path, monkeypatch):
    """With sp1024 byte tables the sliding, carry and chunked (TTT + caches) stages count token_bytes(prev, target)."""
    tokens, tables = sp1024_stream_and_tables()
    expected = train_gpt.token_bytes(tokens[:-1], tokens[1:], tables).sum()
    assert expected != train_gpt.token_bytes(tokens[1:], tokens[1:], tables).sum(), "no spaced token follows a BOS"
    reduced = []
    monkeypatch.setattr(train_gpt, "all_reduce_sum", lambda totals: reduced.append(totals.clone()) or totals)
    model, _ = artifact_model(tmp_path)
    hp, run = tiny_hparams(**SMALL), train_gpt.Dist()
    train_gpt.eval_stage(model, tokens, hp, tables, run, 16)
    train_gpt.carry_stage(model, tokens, hp, tables, run, 64)
    train_gpt.eval_chunked_stage(model, tokens, hp, tables, run, 32, {"ttt", "ngram", "evalengram"}, 1.0)
    assert [int(totals[1]) for totals in reduced] == [int(expected)] * 3
    assert [int(totals[2]) for totals in reduced] == [len(tokens) - 1] * 3


@pytest.mark.parametrize("chunk_tokens", [128, 90])  # 90: a chunk ends inside a TTT sequence of EVAL_SEQ_LEN
def test_ttt_only_learns_from_already_scored_tokens(tmp_path, chunk_tokens):
    """Every TTT step's targets were scored before it; the weights scoring a chunk saw only earlier chunks."""
    model, _ = artifact_model(tmp_path)
    hp = tiny_hparams(**dict(SMALL, TTT_CHUNK_TOKENS=chunk_tokens))
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


def test_ttt_momentum_persists_across_chunks(tmp_path, monkeypatch):
    """With one TTT step per chunk, clearing the SGD momentum at each chunk equals TTT_MOMENTUM=0; keeping it differs."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (500,))
    score = lambda momentum: train_gpt.score_segment(model, tokens, tiny_hparams(**SMALL, TTT_MOMENTUM=momentum),
                                                     FLAT_TABLES, CPU, 64, {"ttt"})[0]  # chunks of 2 sequences, 1 step
    kept = score(0.9)
    original_adapt = train_gpt.TestTimeTrainer.adapt

    def adapt_from_zero_momentum(trainer, *args):
        trainer.optimizer.state.clear()
        return original_adapt(trainer, *args)

    monkeypatch.setattr(train_gpt.TestTimeTrainer, "adapt", adapt_from_zero_momentum)
    cleared = score(0.9)
    assert torch.equal(cleared, score(0.0)), "more than one TTT step per chunk: the test's premise fails"
    assert not torch.allclose(kept, cleared, rtol=1e-9, atol=0), "momentum did not carry into the next chunk"


def test_ttt_grad_clip_bounds_every_step(tmp_path):
    """TTT_GRAD_CLIP=1e-12 leaves the NLL that of no TTT (within 1e-9); with the clip off the same TTT_LR changes it."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (500,))
    score = lambda features, **o: train_gpt.score_segment(model, tokens, tiny_hparams(**dict(SMALL, TTT_LR=0.5, **o)),
                                                          FLAT_TABLES, CPU, 64, features)[0]
    plain = score(set())
    assert abs(float(score({"ttt"}, TTT_GRAD_CLIP=1e-12) - plain)) <= 1e-9
    assert abs(float(score({"ttt"}, TTT_GRAD_CLIP=0) - plain)) > 1e-3


def test_ttt_applies_the_models_post_step_clamp():
    """A huge TTT_LR on the capsule bank pushes its diagonal past 0.999; TTT's post_step clamps it to KOOPMAN_DIAG_MAX."""
    hp = tiny_hparams(**dict(SMALL, CAPSULE_ENABLED=1, TTT_SCOPE="capsule_bank", TTT_LR=1e4, TTT_GRAD_CLIP=0))
    model, tokens = tiny_model(CAPSULE_ENABLED=1), torch.randint(0, 1024, (200,))

    def diag_after_adapt():
        trainer = train_gpt.TestTimeTrainer(model, hp, CPU)
        trainer.adapt(tokens, 1, 129)
        diag = model.capsules.diag.detach().abs().max()
        trainer.restore()
        return diag

    assert diag_after_adapt() <= torch.tensor(train_gpt.KOOPMAN_DIAG_MAX)  # the float32 clamp bound
    model.post_step = lambda: None
    assert diag_after_adapt() > 0.999, "the step never reached the clamp (the test is vacuous)"


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
def test_cache_lookups_see_only_earlier_chunks(tmp_path, monkeypatch, kind):
    """At every lookup while chunk k is scored, the cache equals one rebuilt from the targets of chunks < k."""
    model, _ = artifact_model(tmp_path)
    hp = tiny_hparams(**SMALL)
    tokens = torch.randint(0, 1024, (700,))
    cls, lookup = (train_gpt.NgramCache, "predict") if kind == "ngram" else (train_gpt.EvalEngram, "correction")
    counts = lambda cache: (cache.context_counts, cache.pair_counts) if kind == "ngram" else (cache.counts,)
    chunk, seen, original = {}, [], getattr(cls, lookup)

    def checked_lookup(cache, lookup_tokens, positions):
        k, first, end = chunk["k"], chunk["first"], chunk["end"]
        assert first <= int(positions.min()) and int(positions.max()) < end, f"chunk {k} looked up outside itself"
        fresh = cls(hp, CPU)
        fresh.update(tokens, torch.arange(1, first))
        assert all(torch.equal(a, b) for a, b in zip(counts(cache), counts(fresh))), f"chunk {k} saw other targets"
        seen.append((k, float(counts(cache)[0].sum())))
        return original(cache, lookup_tokens, positions)

    monkeypatch.setattr(cls, lookup, checked_lookup)
    train_gpt.score_segment(model, tokens, hp, FLAT_TABLES, CPU, 32, {kind},
                            on_chunk=lambda k, first, end, ngram, engram: chunk.update(k=k, first=first, end=end))
    assert {k for k, _ in seen} == set(range(chunk["k"] + 1)) and chunk["k"] >= 4
    assert seen[0] == (0, 0.0) and seen[-1][1] > 0


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


def test_ngram_alpha_follows_the_model_entropy():
    """mixed_nll = -log((1 - a) p_model + a p_ngram), a = min(MAX, BASE + SCALE sigmoid(H - CENTER)), at two entropies."""
    hp = tiny_hparams(NGRAM_BUCKETS=1 << 20, NGRAM_MAX_ORDER=1, NGRAM_ALPHA_BASE=0.05, NGRAM_ALPHA_SCALE=0.55,
                      NGRAM_ENTROPY_CENTER=4.0, NGRAM_ALPHA_MAX=0.5)
    cache = train_gpt.NgramCache(hp, CPU)
    tokens = torch.tensor([0, 5, 5, 7, 5, 9, 5, 9])
    positions = torch.tensor([6, 7])
    targets = tokens[positions]
    peaked = torch.full((1024,), -8.0)
    peaked[5] = 8.0
    logp = torch.log_softmax(torch.stack([torch.zeros(1024), peaked]), -1)  # entropies ln(1024) = 6.93 and ~0.01
    model_nll = -logp.gather(1, targets[:, None]).squeeze(1)
    assert torch.equal(cache.mixed_nll(logp, tokens, positions, targets), model_nll)  # nothing seen yet: alpha = 0
    cache.update(tokens, torch.arange(1, 6))  # unigram counts 5: 3, 7: 1, 9: 1 (2^20 buckets: no pair collisions)
    entropy = -(logp.exp() * logp).sum(-1)
    alpha = (0.05 + 0.55 * torch.sigmoid(entropy - 4.0)).clamp(max=0.5)
    assert alpha[0] == 0.5 and 0.05 < alpha[1] < 0.06  # the cap binds at the first position, not at the second
    expected = -torch.log((1 - alpha) * torch.exp(-model_nll) + alpha * torch.tensor([3 / 5, 1 / 5]))
    assert torch.allclose(cache.mixed_nll(logp, tokens, positions, targets), expected, rtol=1e-5, atol=0)


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


def test_stack_skips_sliding_and_capsule_carry_when_over_budget(tmp_path):
    """The sliding and capsule_carry stages are budget-checked too: skipped with an eval_skip line, the rest reported."""
    model, _ = artifact_model(tmp_path, CAPSULE_ENABLED=1)
    hp = tiny_hparams(**SMALL, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=32, CAPSULE_ENABLED=1, CAPSULE_CARRY_EVAL=1)
    tokens, lines = torch.randint(0, 1024, (300,)), []
    assert list(train_gpt.run_eval_stack(model, tokens, hp, FLAT_TABLES, train_gpt.Dist(), lines.append)) == [
        "roundtrip", "sliding", "capsule_carry"]
    hp.eval_max_seconds = 1e-6
    lines.clear()
    assert list(train_gpt.run_eval_stack(model, tokens, hp, FLAT_TABLES, train_gpt.Dist(), lines.append)) == ["roundtrip"]
    assert log_values("\n".join(lines), "eval_skip", "stage") == ["sliding", "capsule_carry"]


def test_budget_check_projects_the_first_chunk_to_the_whole_stage():
    """A 1 s first chunk holding 20% of the stage projects 5 s: under EVAL_MAX_SECONDS=10 it fits at 4 s elapsed, not 6."""
    hp, run, lines = tiny_hparams(EVAL_MAX_SECONDS=10), train_gpt.Dist(), []
    assert train_gpt.budget_check(hp, run, 4.0, "ttt", lines.append)(1.0, 0.2) is True and lines == []
    assert train_gpt.budget_check(hp, run, 6.0, "ttt", lines.append)(1.0, 0.2) is False
    assert log_values("\n".join(lines), "eval_skip", "stage") == ["ttt"]
    assert log_values("\n".join(lines), "eval_skip", "projected_s") == ["5.0000"]
    assert train_gpt.budget_check(tiny_hparams(), run, 1e9, "ttt", lines.append) is None  # EVAL_MAX_SECONDS=0: no budget


class OneSecondPerCall:
    """Stands in for the time module: perf_counter advances exactly 1 s per call."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("stage", ["sliding", "capsule_carry", "ttt"])
def test_stage_budget_uses_the_projection_not_the_raw_time(tmp_path, monkeypatch, stage):
    """A 1 s first batch / window / chunk holding 1/4 of the stage projects 4 s: a 3.5 s budget skips it, 4.5 s runs it."""
    model, _ = artifact_model(tmp_path, CAPSULE_ENABLED=1)
    tokens = torch.randint(0, 1024, (257,))  # 256 targets: 4 windows of 64, or 1 window of 64 + 6 of 32 at stride 32
    run = train_gpt.Dist()
    monkeypatch.setattr(train_gpt, "time", OneSecondPerCall())

    def run_stage(budget_s):
        hp = tiny_hparams(**dict(SMALL, CAPSULE_ENABLED=1, SLIDING_BATCH_SIZE=1, TTT_CHUNK_TOKENS=64, EVAL_MAX_SECONDS=budget_s))
        lines = []
        budget = train_gpt.budget_check(hp, run, 0.0, stage, lines.append)
        if stage == "sliding":
            outcome = train_gpt.eval_stage(model, tokens, hp, FLAT_TABLES, run, 32, 1.0, budget)
        elif stage == "capsule_carry":
            outcome = train_gpt.carry_stage(model, tokens, hp, FLAT_TABLES, run, 64, 1.0, budget)
        else:
            outcome = train_gpt.eval_chunked_stage(model, tokens, hp, FLAT_TABLES, run, 64, {"ttt"}, 1.0, budget)
        return outcome, log_values("\n".join(lines), "eval_skip", "projected_s")

    assert run_stage(3.5) == (None, ["4.0000"])
    outcome, skips = run_stage(4.5)
    assert outcome[2] == 256 and skips == []


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


def test_temperature_divides_the_logits_of_every_later_stage():
    """At T = 0.5 the sliding, capsule_carry and chunked stages' loss is cross_entropy(logits / T) of their windows."""
    model = perturbed_model().eval()  # no capsule bank: the carry stage carries nothing, its windows are plain
    hp, run, tokens = tiny_hparams(**SMALL), train_gpt.Dist(), torch.randint(0, 1024, (300,))

    def reference(stride, temperature):
        nll = 0.0
        with torch.no_grad():
            for start, length, score_from in train_gpt.eval_windows(300, 64, stride):
                logits = model.logits(model.hidden(tokens[None, start:start + length])[0])[0, score_from:]
                targets = tokens[start + 1 + score_from:start + 1 + length]
                nll += float(F.cross_entropy(logits / temperature, targets, reduction="sum"))
        return nll / 299

    sliding, plain = reference(32, 0.5), reference(64, 0.5)
    assert sliding != pytest.approx(reference(32, 1.0), rel=1e-3) and plain != pytest.approx(reference(64, 1.0), rel=1e-3)
    assert train_gpt.eval_stage(model, tokens, hp, FLAT_TABLES, run, 32, 0.5)[0] == pytest.approx(sliding, rel=1e-6)
    assert train_gpt.carry_stage(model, tokens, hp, FLAT_TABLES, run, 64, 0.5)[0] == pytest.approx(plain, rel=1e-6)
    chunked = train_gpt.eval_chunked_stage(model, tokens, hp, FLAT_TABLES, run, 32, set(), 0.5)
    assert chunked[0] == pytest.approx(sliding, rel=1e-6)


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
