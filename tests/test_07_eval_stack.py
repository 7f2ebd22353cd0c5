"""EVAL stack: the stage table and its one runner, legal TTT, n-gram cache, EvalEngram, temperature, stage order,
budget skips (projected from the share of windows), the stream stages' shared pass."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import CPU, eval_context, log_values, perturbed_model, stage, tiny_config, tiny_model

FLAT_TABLES = (torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
SMALL = dict(TTT_CHUNK_TOKENS=128, TTT_BATCH_SEQS=4, TTT_LR=0.05, TTT_SCOPE="all", NGRAM_BUCKETS=4096,
             EVAL_ENGRAM_BUCKETS=64, EVAL_ENGRAM_ENTROPY_THRESHOLD=0.0, EVAL_ENGRAM_ALPHA=0.5)
STREAM = ("ttt", "ngram", "evalengram")


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


def stream_pass(model, tokens, names, stride=32, temperature=1.0, observers=(), tables=FLAT_TABLES, **overrides):
    """Rows (NLL, bytes, targets) of the stream stages `names` scored in one pass over `tokens` (one rank)."""
    env = dict(SMALL, **overrides)
    if stride < 64:
        env.update(SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=stride)
    ctx = eval_context(model, tokens, tables, temperature=temperature, **env)
    stages = [stage(name) for name in names]
    windows = train_gpt.eval_windows(len(tokens), 64, stride)
    return train_gpt.score_stream(ctx, stages, windows, temperature, observers=observers)


def windows_score(model, tokens, stride, temperature=1.0, tables=FLAT_TABLES, **overrides):
    env = dict(SMALL, **overrides)
    if stride < 64:
        env.update(SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=stride)
    ctx = eval_context(model, tokens, tables, **env)
    name = "sliding" if stride < 64 else "roundtrip"
    return train_gpt.score_windows(ctx, [stage(name)], train_gpt.eval_windows(len(tokens), 64, stride), temperature)[0]


def unique_tokens(n, seed=0):
    """A stream whose every token id appears once, so a token id names its position."""
    return torch.randperm(1024, generator=torch.Generator().manual_seed(seed))[:n]


def test_stream_pass_without_learning_equals_the_windows_scorer(tmp_path):
    """With TTT_EPOCHS=0 (no step) and temperature 1 the stream scorer is the windows scorer, at both strides; the
    two sum the same float64 batch totals in another grouping, so they agree to k * eps64 * |total| for k batches."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (700,))
    for stride in (64, 16):
        reference = windows_score(model, tokens, stride)
        streamed = stream_pass(model, tokens, ["ttt"], stride, TTT_EPOCHS=0)[0]
        batches = len(train_gpt.eval_windows(700, 64, stride))
        bound = batches * torch.finfo(torch.float64).eps * float(reference[0])
        assert abs(float(streamed[0] - reference[0])) <= bound and torch.equal(streamed[1:], reference[1:]) and streamed[2] == 699


DOCUMENTS = ["The cat sat on the mat.", "Rain fell all night over the quiet town.", "A small boat drifted out to sea.",
             "She opened the old book and read aloud.", "Prices rose again in March.", "He said nothing at all.",
             "Bright stars shone above the hills.", "We walked home along the river.", "Music filled the empty hall.",
             "The train left at noon.", "Children laughed in the park.", "Snow covered every roof in the village."]


def own_stream_and_tables(own_tokenizer):
    """Tokens of documents that start with a space, each after a BOS (a boundary, so that "▁" counts no byte)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(own_tokenizer))
    ids = [i for _ in range(3) for doc in DOCUMENTS for i in [sp.bos_id()] + sp.encode("a " + doc)[1:]]  # "▁The ..."
    return torch.tensor(ids), train_gpt.build_byte_tables(sp, 1024)


def test_every_stage_counts_the_bytes_of_each_target_after_its_previous_token(tmp_path, monkeypatch, own_tokenizer):
    """The sliding, carry and stream (TTT + caches) stages count token_bytes(prev, target) for every target."""
    tokens, tables = own_stream_and_tables(own_tokenizer)
    expected = train_gpt.token_bytes(tokens[:-1], tokens[1:], tables).sum()
    assert expected != train_gpt.token_bytes(tokens[1:], tokens[1:], tables).sum(), "no spaced token follows a BOS"
    reduced = []
    monkeypatch.setattr(train_gpt, "all_reduce_sum", lambda totals: reduced.append(totals.clone()) or totals)
    model, _ = artifact_model(tmp_path, CAPSULE_ENABLED=1)
    ctx = eval_context(model, tokens, tables, **SMALL, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=16, CAPSULE_ENABLED=1,
                       CAPSULE_CARRY_EVAL=1, TTT_ENABLED=1, NGRAM_CACHE_ENABLED=1, EVAL_ENGRAM_ENABLED=1)
    train_gpt.run_eval_stack(ctx, lambda line: None)
    rows = [row for totals in reduced for row in totals]
    assert len(rows) == 6  # roundtrip, sliding, capsule_carry, and the shared pass's ttt, ngram, evalengram
    assert [int(row[1]) for row in rows] == [int(expected)] * 6 and [int(row[2]) for row in rows] == [len(tokens) - 1] * 6


@pytest.mark.parametrize("chunk_tokens", [128, 90])  # 90: a chunk ends inside a TTT sequence of the eval context
def test_ttt_only_learns_from_already_scored_tokens(tmp_path, chunk_tokens):
    """Every TTT step's targets were scored before it; the weights scoring a chunk saw only earlier chunks."""
    model, _ = artifact_model(tmp_path)
    tokens = unique_tokens(600)
    position = {int(t): i for i, t in enumerate(tokens)}
    events, original_hidden = [], model.hidden

    def recording_hidden(ids):
        targets = [position[int(t)] + 1 for t in ids.flatten()]
        events.append(("train" if torch.is_grad_enabled() else "score", min(targets), max(targets)))
        return original_hidden(ids)

    model.hidden = recording_hidden
    with_ttt = stream_pass(model, tokens, ["ttt"], TTT_CHUNK_TOKENS=chunk_tokens)[0]
    del model.hidden
    scored_upto, train_steps = 0, 0
    for kind, lowest, highest in events:
        if kind == "score":
            scored_upto = max(scored_upto, highest)
        else:
            train_steps += 1
            assert 1 <= lowest and highest <= scored_upto, f"TTT trained on targets {lowest}..{highest}, scored only up to {scored_upto}"
    assert train_steps >= 3 and scored_upto == 599
    without = stream_pass(model, tokens, ["ttt"], TTT_CHUNK_TOKENS=chunk_tokens, TTT_EPOCHS=0)[0]
    assert with_ttt[2] == without[2] == 599 and not torch.equal(with_ttt[0], without[0]), "TTT changed nothing"


def test_ttt_restores_weights_and_flags_bit_identically(tmp_path):
    """After a TTT pass every parameter, requires_grad flag and grad is exactly what it was."""
    model, _ = artifact_model(tmp_path)
    model.blocks[0].mlp_scale.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    stream_pass(model, torch.randint(0, 1024, (500,)), ["ttt"], 64)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.requires_grad == flags[name] and p.grad is None, name


def test_ttt_momentum_persists_across_chunks(tmp_path, monkeypatch):
    """With one TTT step per chunk, clearing the SGD momentum at each chunk equals TTT_MOMENTUM=0; keeping it differs."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (500,))
    score = lambda momentum: stream_pass(model, tokens, ["ttt"], 64, TTT_MOMENTUM=momentum)[0][0]  # chunks of 2 sequences, 1 step
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
    """TTT_GRAD_CLIP=1e-12 leaves the NLL that of no TTT up to float32 noise; with the clip off the same TTT_LR moves
    it by far more. The bound: a step of norm <= TTT_LR x 1e-12 is far below float32 resolution of the weights, but
    the weights it touched are rewritten, so each of the n float32 NLL terms (each <= ln V + 2 x LOGIT_SOFTCAP, the
    soft-capped cross-entropy's maximum) may land a few ulps away: |difference| <= n * 4 * eps32 * (ln V + 60)."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (500,))
    score = lambda **o: stream_pass(model, tokens, ["ttt"], 64, **dict(dict(TTT_LR=0.5), **o))[0]
    plain = score(TTT_EPOCHS=0)
    bound = 499 * 4 * torch.finfo(torch.float32).eps * (np.log(1024) + 2 * 30.0)
    assert abs(float(score(TTT_GRAD_CLIP=1e-12)[0] - plain[0])) <= bound
    assert abs(float(score(TTT_GRAD_CLIP=0)[0] - plain[0])) > 10 * bound


def test_ttt_applies_the_models_post_step_clamp():
    """A huge TTT_LR on the capsule bank pushes its diagonal past 0.999; TTT's post_step clamps it to KOOPMAN_DIAG_MAX."""
    model, tokens = tiny_model(CAPSULE_ENABLED=1), torch.randint(0, 1024, (200,))
    ctx = eval_context(model, tokens, FLAT_TABLES, **dict(SMALL, CAPSULE_ENABLED=1, TTT_SCOPE="capsule_bank", TTT_LR=1e4, TTT_GRAD_CLIP=0))

    def diag_after_adapt():
        trainer = train_gpt.TestTimeTrainer(ctx)
        trainer.adapt(tokens, 1, 129)
        diag = model.capsules.diag.detach().abs().max()
        trainer.close()
        return diag

    assert diag_after_adapt() <= torch.tensor(train_gpt.KOOPMAN_DIAG_MAX)  # the float32 clamp bound
    model.post_step = lambda: None
    assert diag_after_adapt() > 0.999, "the step never reached the clamp (the test is vacuous)"


def test_ttt_scopes_select_by_route_and_ttt_group():
    """scales = route scalar; skc_safe adds the SKC mixer's TTT group; capsule_bank only its group; all but frozen engram."""
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
        stream_pass(model, torch.randint(0, 1024, (400,)), ["ttt"], 64, FREEZE_PACKED_ENGRAM=2)
    handle.remove()
    assert torch.equal(table.detach(), original), "weights not restored after the error"
    trainer = train_gpt.TestTimeTrainer(eval_context(model, torch.zeros(10, dtype=torch.long), FLAT_TABLES, **SMALL))
    assert not any(p is table for p in trainer.params) and not table.requires_grad
    trainer.close()


class ChunkRecorder(train_gpt.EvalHook):
    """An observer hook: remembers which chunk is being scored."""

    def __init__(self):
        self.k = self.first = self.end = None

    def before_chunk(self, ctx, k, num_chunks, first, end):
        self.k, self.first, self.end = k, first, end


@pytest.mark.parametrize("kind", ["ngram", "evalengram"])
def test_cache_lookups_see_only_earlier_chunks(tmp_path, monkeypatch, kind):
    """At every lookup while chunk k is scored, the cache equals one rebuilt from the targets of chunks < k."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (700,))
    cls, lookup = (train_gpt.NgramCache, "predict") if kind == "ngram" else (train_gpt.EvalEngram, "correction")
    counts = lambda cache: (cache.context_counts, cache.pair_counts) if kind == "ngram" else (cache.counts,)
    recorder, seen, original = ChunkRecorder(), [], getattr(cls, lookup)
    fresh_ctx = eval_context(model, tokens, FLAT_TABLES, **SMALL)

    def checked_lookup(cache, lookup_tokens, positions):
        k, first, end = recorder.k, recorder.first, recorder.end
        assert first <= int(positions.min()) and int(positions.max()) < end, f"chunk {k} looked up outside itself"
        fresh = cls(fresh_ctx)
        fresh.update(tokens, torch.arange(1, first))
        assert all(torch.equal(a, b) for a, b in zip(counts(cache), counts(fresh))), f"chunk {k} saw other targets"
        seen.append((k, float(counts(cache)[0].sum())))
        return original(cache, lookup_tokens, positions)

    monkeypatch.setattr(cls, lookup, checked_lookup)
    stream_pass(model, tokens, [kind], 32, observers=[recorder])
    assert {k for k, _ in seen} == set(range(recorder.k + 1)) and recorder.k >= 4
    assert seen[0] == (0, 0.0) and seen[-1][1] > 0


@pytest.mark.parametrize("smoothing", ["backoff", "interpolated"])
def test_ngram_mixture_is_a_normalized_distribution(smoothing):
    """The mixed log-probs over the whole vocabulary sum to 1 at every position (hash collisions included)."""
    ctx = eval_context(tiny_model(), torch.zeros(1, dtype=torch.long), FLAT_TABLES, NGRAM_BUCKETS=257, NGRAM_MAX_ORDER=3,
                       NGRAM_ALPHA_BASE=0.3, NGRAM_SMOOTHING=smoothing, NGRAM_ALPHA_MODE="entropy")
    cache = train_gpt.NgramCache(ctx)
    tokens = torch.randint(0, 50, (400,))
    cache.update(tokens, torch.arange(1, 300))
    positions = torch.arange(300, 310)
    mixed = cache.adjust_logprobs(torch.log_softmax(torch.randn(10, 1024), -1), tokens, positions)
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(10), atol=1e-4)
    assert bool(cache.predict(tokens, positions)[1].all())


def test_ngram_alpha_follows_the_model_entropy():
    """mixed = log((1 - a) p_model + a p_ngram), a = min(MAX, BASE + SCALE sigmoid(H - CENTER)), at two entropies."""
    ctx = eval_context(tiny_model(), torch.zeros(1, dtype=torch.long), FLAT_TABLES, NGRAM_BUCKETS=1 << 20, NGRAM_MAX_ORDER=1,
                       NGRAM_ALPHA_BASE=0.05, NGRAM_ALPHA_SCALE=0.55, NGRAM_ENTROPY_CENTER=4.0, NGRAM_ALPHA_MAX=0.5,
                       NGRAM_ALPHA_MODE="entropy")
    cache = train_gpt.NgramCache(ctx)
    tokens = torch.tensor([0, 5, 5, 7, 5, 9, 5, 9])
    positions = torch.tensor([6, 7])
    targets = tokens[positions]
    peaked = torch.full((1024,), -8.0)
    peaked[5] = 8.0
    logp = torch.log_softmax(torch.stack([torch.zeros(1024), peaked]), -1)  # entropies ln(1024) = 6.93 and ~0.01
    nll = lambda lp: -lp.gather(1, targets[:, None]).squeeze(1)
    assert torch.equal(nll(cache.adjust_logprobs(logp, tokens, positions)), nll(logp))  # nothing seen yet: alpha = 0
    cache.update(tokens, torch.arange(1, 6))  # unigram counts 5: 3, 7: 1, 9: 1 (2^20 buckets: no pair collisions)
    entropy = -(logp.exp() * logp).sum(-1)
    alpha = (0.05 + 0.55 * torch.sigmoid(entropy - 4.0)).clamp(max=0.5)
    assert alpha[0] == 0.5 and 0.05 < alpha[1] < 0.06  # the cap binds at the first position, not at the second
    expected = -torch.log((1 - alpha) * torch.exp(-nll(logp)) + alpha * torch.tensor([3 / 5, 1 / 5]))
    assert torch.allclose(nll(cache.adjust_logprobs(logp, tokens, positions)), expected, rtol=1e-5, atol=0)


def test_interpolated_ngram_weighs_each_order_by_its_evidence():
    """NGRAM_SMOOTHING=interpolated, orders 1 and 2, D = 2 (2^20 buckets: no collisions): after the targets
    5 7 5 9 5 (contexts 0 5 7 5 9), at a position after a 5:
      p_1(v) = (c(v) + 2/V) / (5 + 2), p_2(v) = (c(5, v) + 2 p_1(v)) / (2 + 2) with c(5, 7) = c(5, 9) = 1."""
    ctx = eval_context(tiny_model(), torch.zeros(1, dtype=torch.long), FLAT_TABLES, NGRAM_BUCKETS=1 << 20, NGRAM_MAX_ORDER=2,
                       NGRAM_SMOOTHING="interpolated", NGRAM_DIRICHLET=2.0)
    cache = train_gpt.NgramCache(ctx)
    tokens = torch.tensor([0, 5, 7, 5, 9, 5, 3])
    cache.update(tokens, torch.arange(1, 6))
    probs, found = cache.predict(tokens, torch.tensor([6]))
    unigram = torch.full((1024,), 2 / 1024)
    unigram[5] += 3
    unigram[7] += 1
    unigram[9] += 1
    unigram /= 7
    bigram = 2 * unigram
    bigram[7] += 1
    bigram[9] += 1
    bigram /= 4
    assert bool(found[0]) and torch.allclose(probs[0], bigram, rtol=1e-5, atol=1e-9)
    assert float(probs[0].sum()) == pytest.approx(1.0, abs=1e-5)


def test_learned_ngram_weight_comes_only_from_earlier_chunks_and_follows_the_evidence():
    """NGRAM_ALPHA_MODE=learned: while a chunk is scored its weights come from the log-likelihoods of earlier chunks'
    targets only (the first chunk: weight 0, the model's log-probs unchanged); a bin whose contexts predicted their
    targets gets the largest grid weight, and one whose contexts misled gets 0."""
    ctx = eval_context(tiny_model(), torch.zeros(1, dtype=torch.long), FLAT_TABLES, NGRAM_BUCKETS=1 << 20, NGRAM_MAX_ORDER=2,
                       NGRAM_ALPHA_MODE="learned")
    logp = torch.log_softmax(torch.zeros(6, 1024), -1)  # a uniform model
    good = train_gpt.NgramCache(ctx)
    tokens = torch.tensor([3, 4] * 12)  # 3 is always followed by 4 and 4 by 3: the bigram contexts predict
    good.update(tokens, torch.arange(1, 12))
    positions = torch.arange(12, 18)
    assert torch.equal(good.adjust_logprobs(logp, tokens, positions), logp)  # nothing learned before after_chunk
    good.after_chunk(ctx, 12, 12, False)  # no new counts; this chunk's log-likelihoods now count
    mixed = good.adjust_logprobs(logp, tokens, positions)
    targets = tokens[positions][:, None]
    assert bool((mixed.gather(1, targets) > math.log(0.9)).all())  # alpha = 0.9: the largest of the grid
    bad = train_gpt.NgramCache(ctx)
    misleading = torch.tensor([3, 4] * 6 + [3, 5] * 6)  # after the first half 3 is followed by 5, never seen after 3
    bad.update(misleading, torch.arange(1, 12))
    bad.adjust_logprobs(logp[:2], misleading, torch.tensor([13, 15]))  # targets 5 after 3: the cache says 4
    bad.after_chunk(ctx, 12, 12, False)
    assert torch.equal(bad.adjust_logprobs(logp[:1], misleading, torch.tensor([17])), logp[:1])  # alpha = 0 in that bin


def test_engram_alpha_and_threshold_come_from_env(tmp_path):
    """EVAL_ENGRAM_ALPHA=0 or an unreachable EVAL_ENGRAM_ENTROPY_THRESHOLD leave the model's NLL unchanged."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 64, (500,))
    score = lambda **o: stream_pass(model, tokens, ["evalengram"], 64, **o)[0][0]
    plain = stream_pass(model, tokens, ["ttt"], 64, TTT_EPOCHS=0)[0][0]
    assert torch.allclose(score(EVAL_ENGRAM_ALPHA=0.0), plain)
    assert torch.allclose(score(EVAL_ENGRAM_ENTROPY_THRESHOLD=1e9), plain)
    assert not torch.allclose(score(), plain)


def test_engram_memory_limit_names_the_variables():
    """Tables over the memory fraction (CPU: of 4 GiB) are refused, naming the variables to change."""
    with pytest.raises(train_gpt.ConfigError, match="EVAL_ENGRAM_BUCKETS.*EVAL_ENGRAM_MAX_MEMORY_FRACTION"):
        train_gpt.EvalEngram.check_memory(tiny_config(EVAL_ENGRAM_ENABLED=1, EVAL_ENGRAM_BUCKETS=1 << 20).eval, 1024, CPU)
    train_gpt.EvalEngram.check_memory(tiny_config(EVAL_ENGRAM_ENABLED=1).eval, 1024, CPU)


def test_mismatched_artifact_is_a_clear_error(tmp_path):
    """An artifact whose vocab differs from VOCAB_SIZE is refused naming VOCAB_SIZE; so is an empty TTT scope."""
    model, path = artifact_model(tmp_path)
    with pytest.raises(train_gpt.ConfigError, match="VOCAB_SIZE=512"):
        train_gpt.check_artifact_matches(model, tiny_config(VOCAB_SIZE=512), path)
    with pytest.raises(train_gpt.ConfigError, match="TTT_SCOPE"):
        train_gpt.check_artifact_matches(model, tiny_config(TTT_ENABLED=1, TTT_SCOPE="capsule_bank"), path)


def test_stream_stages_share_one_pass_and_each_row_is_its_prefix_of_hooks(tmp_path):
    """TTT + n-gram + EvalEngram score from the forward passes of one pass (as many as TTT alone), and each stage's
    row equals a pass that stops at that stage: no stage re-runs another's work, and none sees a later hook."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (500,))
    calls, original = [], model.hidden
    model.hidden = lambda ids: calls.append(torch.is_grad_enabled()) or original(ids)
    shared = stream_pass(model, tokens, list(STREAM), 64)
    all_three = list(calls)
    calls.clear()
    alone = stream_pass(model, tokens, ["ttt"], 64)
    assert len(all_three) == len(calls) and all_three == calls
    prefix = stream_pass(model, tokens, ["ttt", "ngram"], 64)
    del model.hidden
    assert torch.equal(shared[0], alone[0]) and torch.equal(shared[:2], prefix)
    assert not torch.equal(shared[1], shared[0]) and not torch.equal(shared[2], shared[1])


def test_plan_order_and_budget_skip(tmp_path):
    """Stages run in the table's order; a stage projected past EVAL_MAX_SECONDS is skipped and logged, and the
    reported stage is the last that ran."""
    model, _ = artifact_model(tmp_path)
    lines = []
    env = dict(SMALL, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=32, TTT_ENABLED=1, NGRAM_CACHE_ENABLED=1, EVAL_ENGRAM_ENABLED=1,
               OUT_DIR=tmp_path, LOG_DIR=tmp_path)
    config = tiny_config(**env)
    assert [s.name for s in train_gpt.eval_plan(config.eval)] == ["roundtrip", "sliding", "ttt", "ngram", "evalengram"]
    tokens = torch.randint(0, 1024, (400,))
    results = train_gpt.run_eval_stack(eval_context(model, tokens, FLAT_TABLES, **env), lines.append)
    assert list(results) == ["roundtrip", "sliding", "ttt", "ngram", "evalengram"]
    assert all(log_values("\n".join(lines), "eval stage:" + n, "tok_s") for n in results)
    assert {results[n]["pass_name"] for n in STREAM} == {"ttt"}
    lines.clear()
    results = train_gpt.run_eval_stack(eval_context(model, tokens, FLAT_TABLES, **env, EVAL_MAX_SECONDS=1e-6), lines.append)
    assert list(results) == ["roundtrip"]
    assert log_values("\n".join(lines), "eval_skip", "stage") == ["sliding", "ttt", "ngram", "evalengram"]
    summary = train_gpt.finish(results, config, "plan", train_gpt.Dist(), lines.append, {})
    assert summary["stage"] == "roundtrip" and summary["planned"] == "evalengram"


def test_stack_skips_sliding_and_capsule_carry_when_over_budget(tmp_path):
    """The sliding and capsule_carry stages are budget-checked too: skipped with an eval_skip line, the rest reported."""
    model, _ = artifact_model(tmp_path, CAPSULE_ENABLED=1)
    env = dict(SMALL, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=32, CAPSULE_ENABLED=1, CAPSULE_CARRY_EVAL=1)
    tokens, lines = torch.randint(0, 1024, (300,)), []
    assert list(train_gpt.run_eval_stack(eval_context(model, tokens, FLAT_TABLES, **env), lines.append)) == [
        "roundtrip", "sliding", "capsule_carry"]
    lines.clear()
    assert list(train_gpt.run_eval_stack(eval_context(model, tokens, FLAT_TABLES, **env, EVAL_MAX_SECONDS=1e-6), lines.append)) == ["roundtrip"]
    assert log_values("\n".join(lines), "eval_skip", "stage") == ["sliding", "capsule_carry"]


def test_budget_check_projects_the_first_chunk_to_the_whole_stage():
    """A 1 s first chunk holding 20% of the stage projects 5 s: under EVAL_MAX_SECONDS=10 it fits at 4 s elapsed, not 6."""
    eval_cfg, run, lines = tiny_config(EVAL_MAX_SECONDS=10).eval, train_gpt.Dist(), []
    assert train_gpt.budget_check(eval_cfg, run, 4.0, ["ttt"], lines.append)(1.0, 0.2) is True and lines == []
    assert train_gpt.budget_check(eval_cfg, run, 6.0, ["ttt"], lines.append)(1.0, 0.2) is False
    assert log_values("\n".join(lines), "eval_skip", "stage") == ["ttt"]
    assert log_values("\n".join(lines), "eval_skip", "projected_s") == ["5.0000"]
    assert train_gpt.budget_check(tiny_config().eval, run, 1e9, ["ttt"], lines.append) is None  # EVAL_MAX_SECONDS=0: no budget


class OneSecondPerCall:
    """Stands in for the time module: perf_counter advances exactly 1 s per call."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("name, projected", [("sliding", 7), ("capsule_carry", 4), ("ttt", 4)])
def test_stage_budget_projects_from_the_share_of_windows(tmp_path, monkeypatch, name, projected):
    """The first batch / window / chunk takes 1 s; the projection is 1 s / its share of the stage's windows, the
    stage's cost (a window costs one forward whatever it scores). 256 targets: plain windows of 64 are 4 (the
    first window or chunk is 1/4: 4 s); at stride 32 there are 7 windows, the first batch of 1 is 1/7: 7 s, though
    it scores 64 of the 256 targets (projecting from targets said 4 s: about 2x optimistic). Just under the
    projection skips the stage, just over runs it."""
    model, _ = artifact_model(tmp_path, CAPSULE_ENABLED=1)
    tokens = torch.randint(0, 1024, (257,))
    monkeypatch.setattr(train_gpt, "time", OneSecondPerCall())

    def run_stage(budget_s):
        env = dict(SMALL, CAPSULE_ENABLED=1, SLIDING_BATCH_SIZE=1, TTT_CHUNK_TOKENS=64, EVAL_MAX_SECONDS=budget_s,
                   SLIDING_EVAL=int(name == "sliding"), SLIDING_EVAL_STRIDE=32)
        ctx, lines = eval_context(model, tokens, FLAT_TABLES, **env), []
        results = train_gpt.run_stage_group(ctx, [stage(name)], 0.0, lines.append)
        return results.get(name), log_values("\n".join(lines), "eval_skip", "projected_s")

    assert run_stage(projected - 0.5) == (None, [f"{projected:.4f}"])
    outcome, skips = run_stage(projected + 0.5)
    assert outcome["tokens"] == 256 and skips == []


def test_eval_projection_scales_to_the_official_val_split_on_eight_gpus():
    """A stage's seconds scale by official tokens / scored tokens and by world size / 8; CPU lines carry none."""
    one_gpu = train_gpt.eval_projection_seconds(10.0, 492_263, 1)
    assert one_gpu == pytest.approx(10.0 * train_gpt.OFFICIAL_VAL_TOKENS / 492_263 / 8)
    assert train_gpt.eval_projection_seconds(10.0, 492_263, 2) == pytest.approx(2 * one_gpu)
    assert train_gpt.projection_note(10.0, 492_263, train_gpt.Dist()) == {}
    on_gpu = train_gpt.projection_note(10.0, 492_263, train_gpt.Dist(device=torch.device("cuda", 0)))
    assert on_gpu == {"proj_8gpu_official_s": pytest.approx(one_gpu)}


def test_temperature_fit_reads_only_the_train_tail(tiny_data, monkeypatch):
    """The temperature is fitted on the tail of the last train shard; val is never opened."""
    splits = []
    real_shard_paths = train_gpt.shard_paths
    monkeypatch.setattr(train_gpt, "shard_paths", lambda path, split: splits.append(split) or real_shard_paths(path, split))
    monkeypatch.setattr(train_gpt, "load_val_tokens", lambda *a, **k: pytest.fail("temperature fit read val"))
    config = tiny_config(DATA_PATH=tiny_data, TEMP_FIT_TOKENS=2048, TEMP_SCALING=1)
    lines = []
    temperature = train_gpt.fit_temperature_on_train_tail(tiny_model(), config, train_gpt.Dist(), lines.append)
    assert set(splits) == {"train"}
    train_tail = train_gpt.load_shard(real_shard_paths(tiny_data, "train")[-1], 1024)[-2048:]
    assert torch.equal(train_gpt.train_tail(tiny_data, 1024, 2048), torch.from_numpy(train_tail.astype(np.int64)))
    assert float(log_values("\n".join(lines), "temperature_fit", "temperature")[0]) == pytest.approx(temperature, abs=1e-4)


def test_eval_temperature_comes_from_the_artifact():
    """TEMP_SCALING=1 takes the artifact's fitted temperature (none stored: an error naming TEMP_SCALING); 0 takes 1."""
    assert train_gpt.eval_temperature({"temperature": 1.3}, tiny_config(TEMP_SCALING=1).eval, "a.skc") == 1.3
    assert train_gpt.eval_temperature({"temperature": 1.3}, tiny_config().eval, "a.skc") == 1.0
    with pytest.raises(train_gpt.ConfigError, match="TEMP_SCALING=1 but artifact a.skc holds no fitted temperature"):
        train_gpt.eval_temperature({}, tiny_config(TEMP_SCALING=1).eval, "a.skc")


def test_temperature_divides_the_logits_of_every_later_stage():
    """At T = 0.5 the sliding, capsule_carry and stream stages' loss is cross_entropy(logits / T) of their windows;
    roundtrip stays at T = 1."""
    model = perturbed_model().eval()  # no capsule bank: the carry stage carries nothing, its windows are plain
    tokens = torch.randint(0, 1024, (300,))

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
    ctx = eval_context(model, tokens, FLAT_TABLES, temperature=0.5, **SMALL, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=32,
                       TTT_ENABLED=1, TTT_EPOCHS=0)
    results = train_gpt.run_eval_stack(ctx, lambda line: None)
    assert results["roundtrip"]["val_loss"] == pytest.approx(reference(64, 1.0), rel=1e-6)
    assert results["sliding"]["val_loss"] == pytest.approx(sliding, rel=1e-6)
    assert results["ttt"]["val_loss"] == pytest.approx(sliding, rel=1e-6)
    carry = train_gpt.run_stage_group(ctx, [stage("capsule_carry")], 0.0, print)["capsule_carry"]
    assert carry["val_loss"] == pytest.approx(plain, rel=1e-6)


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
    temperature, nll_at_1, nll_fit = train_gpt.fit_temperature(OverconfidentBigram(table), torch.tensor(tokens), 64, 8, CPU)
    assert temperature == pytest.approx(1.5, abs=0.1) and nll_fit < nll_at_1
