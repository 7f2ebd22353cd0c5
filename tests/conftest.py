"""Shared fixtures: tiny CPU configs, a tiny tokenized dataset, paths to ../shared."""
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
sys.path.insert(0, str(REPO / "data"))

# Warm every intra-op thread's vector units before any test compares numbers. On our 2-core CI sandboxes the first
# large parallel op of a process, under CPU load, sometimes returns a block of wrong values from one thread (measured:
# the first exp over 24,576 floats, 1,920 of them off by up to 1e-4, in 4 of 60 loaded runs; 0 of 120 with this
# warm-up; later calls were exact in 2,000 of 2,000). Scripts that tests run in new processes start with it too.
WARM_UP_SCRIPT = "import torch\nfor _ in range(3):\n    torch.randn(1 << 20).exp().sum()\n"
exec(WARM_UP_SCRIPT)

# A model small enough for the CPU in milliseconds, big enough to have every structural part.
TINY = dict(NUM_LAYERS="4", MODEL_DIM="64", EMBED_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="1024",
            BITNET_GROUP_SIZE="32", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", COMPILE="0", WARMUP_STEPS="0",
            MAX_WALLCLOCK_SECONDS="0", ITERATIONS="4", TRAIN_LOG_EVERY="1", GRAD_ACCUM_STEPS="2",
            EMA_ENABLED="0", EVAL_BATCH_SEQS="8", SLIDING_BATCH_SIZE="8")


def tiny_hparams(**overrides):
    import train_gpt
    env = dict(TINY, **{k: str(v) for k, v in overrides.items()})
    return train_gpt.Hyperparameters(env)


def tiny_model(seed=0, **overrides):
    import train_gpt
    torch.manual_seed(seed)
    return train_gpt.GPT(train_gpt.ModelConfig.from_hparams(tiny_hparams(**overrides)))


from tokenize_corpus import write_shard  # noqa: E402  (the one shard writer, data/tokenize_corpus.py)


def require_shared():
    if not SP1024.is_file():
        pytest.skip("../shared/tokenizers not available")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Real text (../shared fineweb 1 MB slice) tokenized with sp1024: ~60k train tokens, ~8k val tokens."""
    require_shared()
    import json
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(SP1024))
    docs = [json.loads(line)["text"] for line in open(SHARED / "corpus" / "fineweb.train_1mb.jsonl")][:60]
    stream = np.concatenate([[1] + sp.encode(d) for d in docs]).astype(np.uint16)
    out = tmp_path_factory.mktemp("tiny_data")
    split = len(stream) - 8192
    write_shard(out / "fineweb_train_000000.bin", stream[:split])
    write_shard(out / "fineweb_val_000000.bin", stream[split:])
    return out


def run_trainer(env, nproc=1, timeout=600, cwd=None, script=None):
    """Run train_gpt.py in a fresh process (torchrun for nproc > 1); returns CompletedProcess (text)."""
    full_env = dict(os.environ, **{k: str(v) for k, v in env.items()}, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = str(script or REPO / "train_gpt.py")
    command = [sys.executable, script]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(command, env=full_env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def log_values(text, event, key):
    """All values of `key` on lines starting with `event` (e.g. 'step:' / 'train_loss')."""
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
