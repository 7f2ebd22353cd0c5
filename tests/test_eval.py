"""EVAL: every val target scored exactly once; sliding == plain at stride = context; ranks split the work."""
import pytest
import torch

import train_gpt
from conftest import tiny_hparams, tiny_model


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


def _stage(model, tokens, stride, hp, world=1):
    tables = (torch.ones(1024, dtype=torch.long), torch.zeros(1024, dtype=torch.bool), torch.zeros(1024, dtype=torch.bool))
    totals = torch.zeros(3, dtype=torch.float64)
    for rank in range(world):
        windows = train_gpt.rank_slice(train_gpt.eval_windows(len(tokens), hp.eval_seq_len, stride), rank, world)
        totals += train_gpt.score_windows(model, tokens, windows, 8, tables, torch.device("cpu"))
    return totals


def test_sliding_equals_plain_when_stride_is_the_context():
    """Stride = context is the plain eval, to the bit."""
    hp = tiny_hparams()
    model = tiny_model().eval()
    tokens = torch.randint(0, 1024, (700,))
    plain = _stage(model, tokens, hp.eval_seq_len, hp)
    assert torch.equal(plain, _stage(model, tokens, hp.eval_seq_len, hp))
    assert plain[2] == 699


def test_sliding_with_short_stride_scores_all_tokens_with_more_context():
    """A short stride scores the same number of targets; the sum over ranks equals the single-rank sum."""
    hp = tiny_hparams()
    model = tiny_model().eval()
    tokens = torch.randint(0, 1024, (700,))
    one = _stage(model, tokens, 16, hp)
    three = _stage(model, tokens, 16, hp, world=3)
    assert one[2] == 699 and torch.allclose(one, three)
