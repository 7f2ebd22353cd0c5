"""Shared fixtures: tiny CPU configs, a tokenizer and a dataset made from the project's own text (so no test of the
core needs ../shared), paths to ../shared for the tests of the challenge's own tokenizers."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
SP8192 = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
sys.path.insert(0, str(REPO))

# Warm every intra-op thread's vector units before any test compares numbers. On our 2-core CI sandboxes the first
# large parallel op of a process, under CPU load, sometimes returns a block of wrong values from one thread (measured:
# the first exp over 24,576 floats, 1,920 of them off by up to 1e-4, in 4 of 60 loaded runs; 0 of 120 with this
# warm-up; later calls were exact in 2,000 of 2,000). Scripts that tests run in new processes start with it too.
WARM_UP_SCRIPT = "import torch\nfor _ in range(3):\n    torch.randn(1 << 20).exp().sum()\n"
exec(WARM_UP_SCRIPT)

import train_gpt  # noqa: E402
from data.tokenize_corpus import tokenize_corpus, write_shard  # noqa: E402,F401  (the one shard writer)

# A model small enough for the CPU in milliseconds, big enough to have every structural part.
TINY = dict(NUM_LAYERS="4", MODEL_DIM="64", EMBED_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="1024",
            BITNET_GROUP_SIZE="32", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", COMPILE="0", WARMUP_STEPS="0",
            MAX_WALLCLOCK_SECONDS="0", ITERATIONS="4", TRAIN_LOG_EVERY="1", GRAD_ACCUM_STEPS="2",
            EMA_ENABLED="0", EVAL_BATCH_SEQS="8", SLIDING_BATCH_SIZE="8")
CPU = torch.device("cpu")


def tiny_config(**overrides):
    """The Config of TINY plus overrides (values of any type, as env strings)."""
    return train_gpt.Config.from_env(dict(TINY, **{k: str(v) for k, v in overrides.items()}))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return train_gpt.GPT(tiny_config(**overrides).model)


def eval_context(model, tokens, tables, run=None, temperature=1.0, **overrides):
    """An EvalContext of a tiny config (TINY + overrides) over `tokens`."""
    config = tiny_config(**overrides)
    return train_gpt.EvalContext(model, tokens, tables, config.eval, config.eval_seq_len, run or train_gpt.Dist(), temperature)


def stage(name):
    return next(s for s in train_gpt.EVAL_STAGES if s.name == name)


def require_shared():
    if not SP1024.is_file():
        pytest.skip("../shared/tokenizers not available")


@pytest.fixture(scope="session")
def own_tokenizer(tmp_path_factory):
    """A 1024-piece BPE SentencePiece model with byte-fallback pieces, trained on the project's own docs and sources
    (the smoke preset's fallback tokenizer): ids 0 pad, 1 BOS, 2 EOS, 3 unk, then 256 byte pieces."""
    out = tmp_path_factory.mktemp("own_tokenizer")
    return Path(train_gpt.train_own_tokenizer(train_gpt.own_text_files(REPO), out))


@pytest.fixture(scope="session")
def tiny_data(own_tokenizer, tmp_path_factory):
    """The project's own text tokenized with own_tokenizer, one paragraph per document: ~100k train tokens and the
    first 120 paragraphs (~8k tokens) as val. Every test that trains reads this, so none needs ../shared."""
    out = tmp_path_factory.mktemp("tiny_data")
    tokenize_corpus(train_gpt.own_text_files(REPO), str(own_tokenizer), str(out), val_docs=120, workers=1,
                    split_paragraphs=True, log=lambda *_: None)
    return out


def run_trainer(env, nproc=1, timeout=600, cwd=None, script=None, extra_args=()):
    """Run train_gpt.py in a fresh process (torchrun for nproc > 1); returns CompletedProcess (text)."""
    full_env = dict(os.environ, **{k: str(v) for k, v in env.items()}, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = str(script or REPO / "train_gpt.py")
    command = [sys.executable, script, *extra_args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(command, env=full_env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def trainer_env(data_path, tokenizer, tmp_path, **extra):
    """Env of a tiny trainer run on `data_path` (logs and artifacts under tmp_path, val cut to 2,048 tokens)."""
    env = dict(TINY, DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer), LOG_DIR=str(tmp_path / "logs"),
               OUT_DIR=str(tmp_path / "out"), RUN_ID="t", VAL_MAX_TOKENS="2048")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def log_values(text, event, key):
    """All values of `key` on lines starting with `event` (e.g. 'train ' / 'train_loss')."""
    values = []
    for line in text.splitlines():
        if line.startswith(event):
            for token in line.split():
                if token.startswith(key + ":"):
                    values.append(token.split(":", 1)[1])
    return values


def assert_causal(model, vocab=1024, seq_len=48, t=20):
    torch.manual_seed(1)
    x = torch.randint(0, vocab, (2, seq_len))
    x2 = x.clone()
    x2[:, t + 1:] = torch.randint(0, vocab, (2, seq_len - t - 1))
    with torch.no_grad():
        a = model.logits(model.hidden(x)[0])
        b = model.logits(model.hidden(x2)[0])
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5), "future tokens changed past logits"
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:]), "perturbation had no effect at all (test is vacuous)"


def perturbed_model(seed=0, **overrides):
    """A tiny model with every parameter moved off its init (zero-init projections would hide a mixer)."""
    model = tiny_model(seed, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.set_progress(1.0)
    return model


def random_stream(n=700, seed=0, vocab=1024):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def float64_sum_bound(values):
    """A bound on the difference of two float64 sums of the same float32 terms in different orders (e.g. per
    batch vs per chunk): each partial sum rounds at most n * eps64 * sum|x| (Higham, Accuracy and Stability of
    Numerical Algorithms, eq. 4.4), and the terms themselves (float32 NLLs from differently shaped matmuls) may
    differ by eps32 each: 2 * n * eps64 * S + n * eps32 * max|x|, with S = sum |x|."""
    values = torch.as_tensor(values, dtype=torch.float64).abs()
    n = values.numel()
    return float(2 * n * torch.finfo(torch.float64).eps * values.sum() + n * torch.finfo(torch.float32).eps * values.max())
