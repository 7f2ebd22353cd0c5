"""EVAL: every val target scored exactly once; plain stage == a direct token_nll reference; ranks split the work;
only scored positions reach the head."""
import pytest
import torch

import train_gpt
from conftest import eval_context, perturbed_model, stage, tiny_config


@pytest.mark.parametrize("num_tokens, seq_len, stride", [(1000, 64, 64), (1000, 64, 16), (1001, 64, 7), (65, 64, 1), (10, 64, 64), (130, 64, 63)])
def test_every_target_scored_exactly_once(num_tokens, seq_len, stride):
    """The windows score each target index 1..N-1 exactly once, never with more than seq_len context."""
    counts = torch.zeros(num_tokens, dtype=torch.long)
    for start, length, score_from in train_gpt.eval_windows(num_tokens, seq_len, stride):
        assert length <= seq_len
        counts[start + 1 + score_from:start + 1 + length] += 1
    assert counts[0] == 0 and bool((counts[1:] == 1).all())


def test_later_sliding_windows_score_only_their_last_stride_tokens():
    """After the first window, each full window scores exactly its last `stride` targets."""
    windows = train_gpt.eval_windows(1000, 64, 16)
    assert windows[0] == (0, 64, 0)
    assert all(length - score_from == 16 for _, length, score_from in windows[1:-1])


def random_tables(seed=0):
    """Byte tables with every field random, so pairing a target with the wrong previous token changes the count."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 5, (1024,), generator=generator), torch.rand(1024, generator=generator) < 0.5,
            torch.rand(1024, generator=generator) < 0.3)


def stream(n=700, seed=0):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


def run_stage(model, tokens, tables, name, run=None, **overrides):
    """(loss, bpb, targets) of one stage, through the runner every stage goes through."""
    result = train_gpt.run_stage_group(eval_context(model, tokens, tables, run, **overrides), [stage(name)], 0.0, print)[name]
    return result["val_loss"], result["val_bpb"], result["tokens"]


def test_plain_stage_equals_a_direct_token_nll_reference():
    """Stride = context: loss and BPB are token_nll and token_bytes summed over non-overlapping windows, to the bit."""
    model, tokens, tables = perturbed_model().eval(), stream(), random_tables()
    nll, nbytes, count = torch.zeros((), dtype=torch.float64), 0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 64):
            length = min(64, len(tokens) - 1 - start)
            x, y = tokens[start:start + length], tokens[start + 1:start + 1 + length]
            nll += model.token_nll(x[None], y[None]).double().sum()
            nbytes += int(train_gpt.token_bytes(x, y, tables).sum())
            count += len(y)
    loss, bpb, scored = run_stage(model, tokens, tables, "roundtrip")
    assert scored == count == 699
    assert loss == float(nll / count) and bpb == train_gpt.bits_per_byte(nll, nbytes)


def test_sliding_stage_is_the_sum_of_its_ranks_parts(monkeypatch):
    """Stride 16 scores all 699 targets once; 3 fake ranks' (NLL, bytes, targets) sum to the one-rank totals."""
    reduced = []
    monkeypatch.setattr(train_gpt, "all_reduce_sum", lambda totals: reduced.append(totals.clone()) or totals)
    model, tokens, tables = perturbed_model().eval(), stream(), random_tables()
    sliding = dict(SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=16)
    one = run_stage(model, tokens, tables, "sliding", **sliding)
    parts = [run_stage(model, tokens, tables, "sliding", train_gpt.Dist(rank=r, world_size=3), **sliding) for r in range(3)]
    single, ranks = reduced[0][0], [totals[0] for totals in reduced[1:]]
    assert one == (float(single[0] / single[2]), train_gpt.bits_per_byte(single[0], single[1]), 699)
    assert all(0 < part[2] < 699 for part in parts), "a rank scored nothing or everything"
    assert torch.allclose(sum(ranks), single, rtol=1e-12, atol=0)
    plain = run_stage(model, tokens, tables, "roundtrip")
    assert plain[2] == 699 and one[0] != plain[0]


def test_only_scored_positions_reach_the_head():
    """A sliding batch of 8 windows of 64 scores 16 targets each after the first: the head (model.logits) gets those
    rows only, not 8 x 64, and the loss equals slicing the full logits afterwards."""
    model, tokens, tables = perturbed_model().eval(), stream(), random_tables()
    rows, original = [], model.logits
    model.logits = lambda hidden: rows.append(hidden.shape[0]) or original(hidden)
    windows = train_gpt.eval_windows(len(tokens), 64, 16)[:8]
    ctx = eval_context(model, tokens, tables, SLIDING_EVAL=1, SLIDING_EVAL_STRIDE=16)
    sliced = train_gpt.score_batch(ctx, windows)[0]
    del model.logits
    assert rows == [64 + 7 * 16]
    full, nlls = torch.zeros(3, dtype=torch.float64), []
    with torch.no_grad():
        for start, length, score_from in windows:
            x, y = tokens[None, start:start + length], tokens[None, start + 1:start + length + 1]
            logits = model.logits(model.hidden(x)[0])[0, score_from:]
            nlls.append(torch.nn.functional.cross_entropy(logits, y[0, score_from:], reduction="none"))
            full += torch.tensor([0.0, float(train_gpt.token_bytes(x, y, tables)[0, score_from:].sum()), length - score_from], dtype=torch.float64)
    nlls = torch.cat(nlls).double()
    full[0] = nlls.sum()
    # The same float32 NLL per target from two differently shaped head matmuls ((rows, D) against (T, D)) may differ
    # by a few ulps each: |sum difference| <= n * 4 * eps32 * max NLL (float64 summation error is far below).
    bound = len(nlls) * 4 * torch.finfo(torch.float32).eps * float(nlls.max())
    assert abs(float(sliced[0]) - float(full[0])) <= bound and torch.equal(sliced[1:], full[1:])
