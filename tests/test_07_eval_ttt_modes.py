"""EVAL, the TTT modes: TTT_MODE=global (one model adapted on the whole stream, gradients summed over ranks),
TTT_PHASES (adapt on the whole scored prefix between phases), TTT_LR_SCHEDULE, and TTT_MODE=lora (per-document
LoRA adapters, documents scored on their own). Every mode learns only from targets it has already scored; lora
never lets one document see another. The 1-rank vs 2-rank runs of the whole trainer are in test_08."""
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import eval_context, stage, tiny_config
from test_07_eval_stack import FLAT_TABLES, SMALL, artifact_model, stream_pass, unique_tokens

BOS = train_gpt.BOS_ID
LORA = dict(TTT_MODE="lora", TTT_ENABLED=1, TTT_EPOCHS=2, TTT_LORA_CHUNK=16, TTT_LORA_LR=0.05, TTT_LORA_RANK=4,
            TTT_LORA_BATCH_DOCS=3)


def documents(lengths, seed=0):
    """A stream of documents, each a BOS then lengths[i] - 1 random non-BOS tokens."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.cat([torch.tensor([BOS]), torch.randint(2, 1024, (n - 1,), generator=g)]) for n in lengths]
    return torch.cat(parts)


def lora_scores(model, tokens, run=None, **overrides):
    """(totals, trace, {(doc span, chunk): summed NLL of its scored targets}) of the documents scorer."""
    ctx = eval_context(model, tokens, FLAT_TABLES, run, **dict(LORA, **overrides))
    per_chunk, original = {}, train_gpt.document_chunk_nll

    def recording(ctx_, spans, docs, c, chunk, lora, temperature, grad):
        nll, keep, x, y = original(ctx_, spans, docs, c, chunk, lora, temperature, grad)
        for row, d in enumerate(docs):  # the first call of a chunk is the one that scores it
            per_chunk.setdefault((spans[d], c), float((nll[row].detach().double() * keep[row]).sum()))
        return nll, keep, x, y

    trace = []
    train_gpt.document_chunk_nll = recording
    try:
        model.eval()
        totals = train_gpt.score_documents(ctx, [stage("ttt")], [], 1.0, trace=trace)
    finally:
        train_gpt.document_chunk_nll = original
    return totals[0], trace, per_chunk


# --- segments / global / phases ------------------------------------------------------------------------------

def test_global_mode_on_one_rank_is_the_segments_mode(tmp_path):
    """On one rank both modes adapt one model on the whole stream in order: bit for bit the same sums."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (600,))
    segments = stream_pass(model, tokens, ["ttt"], TTT_MODE="segments")
    assert torch.equal(stream_pass(model, tokens, ["ttt"], TTT_MODE="global"), segments)
    assert not torch.equal(stream_pass(model, tokens, ["ttt"], TTT_EPOCHS=0), segments), "TTT changed nothing"


def test_global_mode_gives_every_rank_all_windows_and_scores_a_share_of_each_chunk(tmp_path):
    """stage_share: segments cuts the stream per rank; global hands every rank every window, and the two ranks'
    scored shares of the stream pass add up to one rank's targets and bytes exactly (TTT_EPOCHS=0: nothing moves)."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (700,))
    sums = torch.zeros(3, dtype=torch.float64)
    for rank in range(2):
        ctx = eval_context(model, tokens, FLAT_TABLES, train_gpt.Dist(rank=rank, world_size=2), **SMALL, TTT_MODE="global", TTT_EPOCHS=0)
        share, windows = train_gpt.stage_share(ctx, stage("ttt"))
        assert share.tokens is tokens and windows == train_gpt.eval_windows(700, 64, 64)
        model.eval()
        sums += train_gpt.score_stream(share, [stage("ttt")], windows, 1.0)[0]
    one = stream_pass(model, tokens, ["ttt"], 64, TTT_EPOCHS=0)[0]
    assert torch.equal(sums[1:], one[1:]) and float(sums[0]) == pytest.approx(float(one[0]), rel=1e-12)


def test_global_step_splits_the_batch_and_sums_token_weighted_gradients(tmp_path, monkeypatch):
    """Each of two ranks backpropagates its share of a step's sequences, weighted by tokens over the whole batch;
    summed (the all-reduce), the two shares' gradient is the whole batch's gradient of one rank."""
    model, _ = artifact_model(tmp_path)
    tokens = torch.randint(0, 1024, (400,))
    batch = [(0, 64), (64, 64), (128, 64), (192, 40)]

    def gradient(rank, world):
        ctx = eval_context(model, tokens, FLAT_TABLES, train_gpt.Dist(rank=rank, world_size=world), **SMALL, TTT_MODE="global")
        trainer = train_gpt.TestTimeTrainer(ctx)
        monkeypatch.setattr(trainer.optimizer, "step", lambda: None)
        monkeypatch.setattr(trainer.optimizer, "zero_grad", lambda set_to_none=True: None)
        monkeypatch.setattr(train_gpt, "sum_gradients_over_ranks", lambda params: None)  # one process: sum by hand
        trainer.cfg = tiny_config(**SMALL, TTT_GRAD_CLIP=0).eval
        trainer.step(tokens, batch)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.params]
        trainer.close()
        return grads

    whole = gradient(0, 1)
    shares = [a + b for a, b in zip(gradient(0, 2), gradient(1, 2))]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(whole, shares))


@pytest.mark.parametrize("mode", ["segments", "global"])
def test_phases_replay_only_the_scored_prefix(tmp_path, mode):
    """TTT_PHASES=2: the stream is scored in 3 phases; after phases 1 and 2 the model adapts on every target scored
    so far (from target 1 on), never on one not yet scored."""
    model, _ = artifact_model(tmp_path)
    tokens = unique_tokens(600)
    position = {int(t): i for i, t in enumerate(tokens)}
    events, original_hidden = [], model.hidden

    def recording_hidden(ids, *args, **kwargs):
        targets = [position[int(t)] + 1 for t in ids.flatten()]
        events.append(("train" if torch.is_grad_enabled() else "score", min(targets), max(targets)))
        return original_hidden(ids, *args, **kwargs)

    model.hidden = recording_hidden
    stream_pass(model, tokens, ["ttt"], TTT_PHASES=2, TTT_MODE=mode, TTT_EPOCHS=1)
    del model.hidden
    scored_upto, phases, in_phase = 0, [], None
    for kind, lowest, highest in events:
        if kind == "score":
            scored_upto, in_phase = max(scored_upto, highest), None
        else:
            assert highest <= scored_upto, f"trained on target {highest}, scored only up to {scored_upto}"
            if in_phase is None:
                in_phase = [lowest, highest]
                phases.append(in_phase)
            in_phase[0], in_phase[1] = min(in_phase[0], lowest), max(in_phase[1], highest)
    assert len(phases) == 2 and all(first == 1 for first, _ in phases)
    assert phases[0][1] < phases[1][1] < 599 and scored_upto == 599


def test_phases_split_the_targets_in_equal_parts():
    cfg = tiny_config(TTT_PHASES=3).eval
    windows = train_gpt.eval_windows(801, 64, 64)  # 800 targets
    assert train_gpt.stream_chunk_tokens(cfg, windows) == 200
    assert len(train_gpt.chunk_windows(windows, 200)) == 4
    assert train_gpt.stream_chunk_tokens(tiny_config(TTT_CHUNK_TOKENS=96).eval, windows) == 96


def test_cosine_schedule_lowers_the_lr_from_ttt_lr_towards_zero(tmp_path):
    model, _ = artifact_model(tmp_path)
    ctx = eval_context(model, torch.randint(0, 1024, (300,)), FLAT_TABLES, **SMALL, TTT_LR_SCHEDULE="cosine")
    trainer = train_gpt.TestTimeTrainer(ctx)
    lrs = []
    for k in range(4):
        trainer.before_chunk(ctx, k, 4, 1 + 64 * k, 65 + 64 * k)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.close()
    assert lrs[0] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True)
    assert lrs[2] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 2)))


# --- lora -----------------------------------------------------------------------------------------------------

def test_document_spans_cover_every_target_once():
    tokens = torch.tensor([5, 7, BOS, 3, 4, BOS, 9, BOS, 2])
    spans = train_gpt.document_spans(tokens)
    assert spans == [(0, 2), (2, 5), (5, 7), (7, 8)]
    assert sorted(t for first, last in spans for t in range(first + 1, last + 1)) == list(range(1, 9))
    assert train_gpt.document_chunk((2, 5), 1, 2, 64) == (2, 3, 2)  # chunk 1 scores target 5 from tokens 2..4


def test_lora_scores_every_target_once_and_trains_only_on_its_documents_scored_chunks(tmp_path):
    """The trace: each document's chunks are scored in order, every target of the stream exactly once; each Adam
    step of a document is on a chunk that document has just scored; no step after its last chunk."""
    model, _ = artifact_model(tmp_path)
    tokens = documents([70, 23, 45, 16, 90])
    totals, trace, _ = lora_scores(model, tokens)
    scored = [t for kind, _, (a, b) in trace if kind == "score" for t in range(a, b)]
    assert sorted(scored) == list(range(1, len(tokens))) and int(totals[2]) == len(tokens) - 1
    last_scored, steps = {}, 0
    for kind, doc, (a, b) in trace:
        if kind == "score":
            assert a >= last_scored.get(doc, (0, 0))[1], "a document's chunks out of order"
            last_scored[doc] = (a, b)
        else:
            steps += 1
            assert last_scored[doc] == (a, b), f"document {doc} trained on {a}..{b} before scoring it"
    spans = sorted(train_gpt.document_spans(tokens), key=lambda s: s[0] - s[1])
    for doc, (a, b) in last_scored.items():
        assert b == spans[doc][1] + 1  # the last chunk scored ends the document...
        assert ("train", doc, (a, b)) not in trace  # ...and is never trained on
    assert steps == 2 * sum(-(-(last - first) // 16) - 1 for first, last in spans)  # TTT_EPOCHS steps per earlier chunk


def test_lora_documents_never_see_each_other_or_their_own_future(tmp_path):
    """Changing the last document's tail leaves every other document's scores, and that document's chunks before
    the change, exactly as they were; the changed chunk and the later ones move."""
    model, _ = artifact_model(tmp_path)
    lengths = [70, 23, 45, 60]
    tokens = documents(lengths)
    changed = tokens.clone()
    changed[-25:] = torch.randint(2, 1024, (25,), generator=torch.Generator().manual_seed(9))
    _, _, before = lora_scores(model, tokens)
    _, _, after = lora_scores(model, changed)
    last_doc = train_gpt.document_spans(tokens)[-1]
    first_changed = len(tokens) - 25  # the first changed token; targets >= it move
    moved = {key for key in before if before[key] != after[key]}
    for (span, c) in before:
        a, b = train_gpt.chunk_target_range(span, c, 16)
        if span != last_doc or b <= first_changed:
            assert (span, c) not in moved, f"document {span} chunk {c} moved"
    assert any(span == last_doc for span, _ in moved)


def test_lora_without_steps_is_the_base_model_on_each_document_alone(tmp_path):
    """TTT_EPOCHS=0: B starts at zero, so every document is scored by the artifact alone, from its BOS on (its
    documents shorter than the context: one forward each)."""
    model, _ = artifact_model(tmp_path)
    lengths = [40, 23, 61, 12]
    tokens = documents(lengths)
    totals, _, _ = lora_scores(model, tokens, TTT_EPOCHS=0)
    reference = 0.0
    with torch.no_grad():
        for first, last in train_gpt.document_spans(tokens):
            logits = model.logits(model.hidden(tokens[first:last][None])[0]).float()
            reference += float(F.cross_entropy(logits[0], tokens[first + 1:last + 1], reduction="sum"))
    assert float(totals[0]) == pytest.approx(reference, rel=1e-5)
    trained, _, _ = lora_scores(model, tokens)
    assert float(trained[0]) != pytest.approx(reference, rel=1e-6), "the adapters changed nothing"


def test_lora_is_independent_of_world_size(tmp_path):
    """Documents are dealt to ranks whole, each adapter seeded by its document: two ranks' sums are one rank's
    (the batches differ, so the padding width of a batch does; float32 rounding only)."""
    model, _ = artifact_model(tmp_path)
    tokens = documents([70, 23, 45, 16, 90, 33, 50])
    one, _, _ = lora_scores(model, tokens)
    two = sum(lora_scores(model, tokens, train_gpt.Dist(rank=r, world_size=2))[0] for r in range(2))
    assert torch.equal(one[1:], two[1:]) and float(two[0]) == pytest.approx(float(one[0]), rel=1e-5)


def test_lora_leaves_the_model_as_it_was(tmp_path):
    model, _ = artifact_model(tmp_path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora_scores(model, documents([50, 40]))
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())


def test_lora_is_rejected_with_the_stream_caches_and_phases():
    for extra, word in ((dict(NGRAM_CACHE_ENABLED=1), "NGRAM_CACHE_ENABLED"), (dict(TTT_PHASES=2), "TTT_PHASES")):
        with pytest.raises(train_gpt.ConfigError, match=word):
            tiny_config(TTT_MODE="lora", **extra)
    with pytest.raises(train_gpt.ConfigError, match="TTT_MODE"):
        tiny_config(TTT_MODE="perdoc")
