"""SKC-600 ternary trainer for OpenAI's Parameter Golf.

One file holds the whole pipeline: config -> distributed + logging -> data -> tokenizer + BPB -> model ->
optimizer -> schedules -> quantize + export -> eval -> train -> main. The artifact (this script's code bytes plus
the compressed weights) must fit in 16,000,000 bytes; training must finish in 10 minutes on 8xH100 and the
evaluation in 10 more.

Run:
  RUN_PRESET=smoke python train_gpt.py                        # tiny CPU run, end to end (about a minute)
  DATA_PATH=... TOKENIZER_PATH=... torchrun --standalone --nproc_per_node=8 train_gpt.py
  EVAL_ONLY=1 ARTIFACT=artifacts/<run>.skc python train_gpt.py  # score an artifact in a fresh process
Every knob is an env var listed in Hyperparameters.SPEC (python train_gpt.py --env-table prints them).
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import lzma
import math
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------------
# CONFIG
# One table names every env var: (NAME, default, meaning). The default's type is the variable's type. Presets
# change defaults only; an explicitly set env var always wins. Derived values are computed once in `validate`.
# -----------------------------------------------------------------------------------------------------------------

BUDGET_BYTES = 16_000_000  # the challenge's hard limit: code bytes + compressed artifact bytes

class ConfigError(ValueError):
    """A config or input problem; the message names the variable or file and the fix."""

SPEC = (
    # --- run and data ---
    ("RUN_ID", "", "run name; the log is LOG_DIR/RUN_ID.txt (default: a random id)"),
    ("RUN_PRESET", "", "'smoke' = tiny CPU run that tokenizes its own corpus; empty = the defaults below"),
    ("SEED", 1337, "seed of init and data order"),
    ("DATA_PATH", "./data/datasets/fineweb10B_sp8192", "directory with fineweb_train_*.bin / fineweb_val_*.bin"),
    ("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model", "SentencePiece model of the shards"),
    ("VOCAB_SIZE", 8192, "model vocabulary; must equal the tokenizer's and the data's"),
    ("CORPUS", "", "smoke preset: text files (JSONL, JSONL.xz, plain) to tokenize; default ../shared/corpus slice"),
    ("LOG_DIR", "logs", "directory of the per-run log files"),
    ("OUT_DIR", "artifacts", "directory of the artifact and submission.json"),
    ("EVAL_ONLY", 0, "1 = skip training; load ARTIFACT and run the eval stack"),
    ("ARTIFACT", "", "artifact path for EVAL_ONLY"),
    ("VAL_MAX_TOKENS", 0, "truncate the val split to this many tokens (0 = full split); logged on every eval line"),
    # --- model ---
    ("ARCHITECTURE", "attn", "layer types: attn | skc | koopman_ssm | hybrid | competition"),
    ("NUM_LAYERS", 9, "transformer layers (U-Net: first half encoder, second half decoder)"),
    ("MODEL_DIM", 512, "residual width"),
    ("EMBED_DIM", 0, "factorized embedding width (0 = MODEL_DIM, no projections)"),
    ("NUM_HEADS", 8, "query heads"),
    ("NUM_KV_HEADS", 4, "key/value heads (GQA); must divide NUM_HEADS"),
    ("MLP_MULT", 2.0, "MLP hidden width = MLP_MULT * MODEL_DIM"),
    ("MLP_ACTIVATION", "leaky_relu2", "leaky_relu2 (LeakyReLU(0.5)^2) | relu2"),
    ("BITNET_GROUP_SIZE", 128, "ternary quantization group (input weights per scale)"),
    ("ROPE_BASE", 10000.0, "RoPE base frequency"),
    ("ROPE_DIMS", 0, "rotary dims per head (partial RoPE; 0 = whole head)"),
    ("YARN_FACTOR", 1.0, "YaRN context-extension factor over TRAIN_SEQ_LEN (1 = plain RoPE)"),
    ("QK_GAIN_INIT", 1.5, "initial per-head query gain (after QK RMSNorm)"),
    ("LOGIT_SOFTCAP", 30.0, "logit soft cap value (0 = off)"),
    ("SOFTCAP_TYPE", "poly", "poly (x/sqrt(1+(x/c)^2)) | tanh (c*tanh(x/c))"),
    ("PARALLEL_RESIDUAL_START", -1, "layers >= this use the parallel block (mixer and MLP read one norm); -1 = none"),
    ("SKC_LAYERS", "", "competition architecture: comma list of layer indices that are SKC layers"),
    # --- training ---
    ("TRAIN_SEQ_LEN", 1024, "training context length"),
    ("TRAIN_BATCH_TOKENS", 524288, "global tokens per optimizer step, independent of world size"),
    ("GRAD_ACCUM_STEPS", 0, "micro-batches per step summed over ranks (0 = 8 on CUDA, 1 on CPU)"),
    ("ITERATIONS", 20000, "maximum optimizer steps (the wallclock usually stops first)"),
    ("MAX_WALLCLOCK_SECONDS", 600.0, "training-time budget; schedules are fractions of it (0 = use ITERATIONS)"),
    ("WARMUP_STEPS", 20, "compile warm-up steps; weights, optimizer and data are restored after them"),
    ("TRAIN_LOG_EVERY", 50, "log a train line every N steps"),
    ("VAL_LOSS_EVERY", 0, "evaluate on val every N steps during training (0 = only at the end)"),
    ("COMPILE", -1, "torch.compile the model (-1 = on for CUDA, off for CPU)"),
    ("MATRIX_LR", 0.04, "Muon learning rate of block matrices"),
    ("EMBED_LR", 0.05, "AdamW learning rate of the tied embedding"),
    ("SCALAR_LR", 0.04, "AdamW learning rate of scales, gains and norms"),
    ("MUON_MOMENTUM", 0.95, "Muon Nesterov momentum after warm-up"),
    ("MUON_MOMENTUM_WARMUP_START", 0.85, "Muon momentum at step 0"),
    ("MUON_MOMENTUM_WARMUP_STEPS", 300, "steps of linear momentum warm-up"),
    ("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations"),
    ("MUON_EQ_R", 1, "1 = equilibrate rows of the update before Newton-Schulz (MuonEq-R)"),
    ("MUON_WD", 0.0, "decoupled weight decay of Muon matrices"),
    ("ADAM_WD", 0.0, "decoupled weight decay of the embedding (scalars never decay)"),
    ("BETA1", 0.9, "AdamW beta1"),
    ("BETA2", 0.95, "AdamW beta2"),
    ("ADAM_EPS", 1e-8, "AdamW epsilon"),
    ("GRAD_CLIP_NORM", 1.0, "global grad-norm clip (0 = off)"),
    ("WARMUP_FRACTION", 0.02, "LR warm-up, as a fraction of the wallclock budget"),
    ("WARMDOWN_FRACTION", 0.4, "LR linear warm-down to zero over the last fraction of the budget"),
    ("EMA_ENABLED", 1, "keep an EMA of the weights and export it"),
    ("EMA_DECAY", 0.997, "EMA decay per step"),
    ("EMA_START_FRACTION", 0.5, "the EMA shadow starts from the live weights at this budget fraction"),
    # --- export ---
    ("FP_STORAGE", "fp16", "storage of non-ternary matrices: fp16 | fp8 | fp4 (trained through the same rounding)"),
    ("CODE_BYTES", 0, "override the code-byte count (0 = measure the built submission script)"),
    ("GPTQ_LITE_ENABLED", 0, "1 = per-tensor clip search before ternarization (TERNARY_CLIP_MODE); keeps the clip with the least reconstruction error, no clip included"),
    ("TERNARY_CLIP_MODE", "row_std", "clip candidates: none | percentile (|w| quantiles of the tensor) | row_std (k * row std)"),
    ("TERNARY_SCALE_SEARCH", 0, "1 = calibrate a per-tensor ternary scale multiplier (0.8..1.2) on held-out TRAIN tokens by coordinate search"),
    ("TERNARY_THRESHOLD_SEARCH", 0, "1 = calibrate a per-tensor ternary zero threshold (0.35..0.65 of the scale) the same way"),
    ("CALIB_TOKENS", 65536, "calibration tokens: the last CALIB_TOKENS of the train shards (never val)"),
    ("CALIB_MAX_EVALS", 256, "calibration budget: calibration-loss evaluations"),
    ("CALIB_MAX_SECONDS", 60.0, "calibration budget: seconds of search (rank 0 searches, the others wait; at most 300)"),
    ("EXPORT_ALIGNED_TRAIN", 0, "1 = run clip search + calibration once at EXPORT_ALIGNED_START_FRACTION of training and keep training through them"),
    ("EXPORT_ALIGNED_START_FRACTION", 0.85, "training fraction at which EXPORT_ALIGNED_TRAIN calibrates (the time counts as training time)"),
    ("TURBO_QUANT_TRAIN", 0, "1 = Hadamard-rotate each ternary weight group before ternarization (TurboQuant); BITNET_GROUP_SIZE a power of 2"),
    ("TURBO_QUANT_EXPORT", 0, "must equal TURBO_QUANT_TRAIN: the artifact stores the codes the model trained through"),
    ("ENGRAM_PRUNE_MIN_HITS", 0, "at export, zero and drop rows of hit-counted tables (count_row_hits) with fewer hits over the calibration tokens (0 = off)"),
    # --- eval ---
    ("EVAL_BATCH_SEQS", 32, "sequences per eval forward pass"),
    ("EVAL_SEQ_LEN", 0, "eval context length (0 = TRAIN_SEQ_LEN)"),
    ("SLIDING_EVAL", 0, "1 = add the sliding-window stage"),
    ("SLIDING_EVAL_STRIDE", 64, "sliding-window stride: each later window scores its last STRIDE tokens"),
    ("SLIDING_BATCH_SIZE", 32, "windows per forward pass in the sliding stage"),
)

PRESETS = {
    # Tiny CPU run: tokenizes a slice of text, trains ~1 minute, exports, reloads, scores.
    "smoke": dict(
        NUM_LAYERS=4, MODEL_DIM=128, EMBED_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=256,
        TRAIN_BATCH_TOKENS=4096, MAX_WALLCLOCK_SECONDS=60.0, WARMUP_STEPS=0, TRAIN_LOG_EVERY=10,
        MUON_MOMENTUM_WARMUP_STEPS=20, EMA_START_FRACTION=0.7, EMA_DECAY=0.95, GRAD_ACCUM_STEPS=1,
        BITNET_GROUP_SIZE=64, EVAL_BATCH_SEQS=16, DATA_PATH="data/datasets/smoke", TOKENIZER_PATH="",
        MATRIX_LR=0.03, EMBED_LR=0.03, SCALAR_LR=0.03, WARMDOWN_FRACTION=0.3,
    ),
}


class Hyperparameters:
    """Reads every env var of SPEC once: attribute name = NAME.lower(), typed like the default."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        preset_name = environ.get("RUN_PRESET", "")
        if preset_name and preset_name not in PRESETS:
            raise ConfigError(f"RUN_PRESET={preset_name!r} is unknown; choose one of {sorted(PRESETS)} or leave it empty")
        preset = PRESETS.get(preset_name, {})
        self.explicit = {name for name, _, _ in SPEC if name in environ}
        for name, default, _ in SPEC:
            raw = environ.get(name, preset.get(name, default))
            setattr(self, name.lower(), _cast(name, raw, type(default)))
        self.validate()

    def validate(self):
        """Fail before step 0 on impossible configs; compute derived values."""
        kinds = ("attn", "skc", "koopman_ssm", "hybrid", "competition")
        _require(self.architecture in kinds, f"ARCHITECTURE={self.architecture!r}: choose one of {kinds}")
        _require(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        self.head_dim = self.model_dim // self.num_heads
        _require(self.head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even for RoPE")
        self.rope_dims = self.rope_dims or self.head_dim
        _require(self.rope_dims % 2 == 0 and self.rope_dims <= self.head_dim, f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {self.head_dim}")
        self.embed_dim = self.embed_dim or self.model_dim
        _require(self.mlp_activation in ("leaky_relu2", "relu2"), f"MLP_ACTIVATION={self.mlp_activation!r}: leaky_relu2 | relu2")
        _require(self.softcap_type in ("poly", "tanh"), f"SOFTCAP_TYPE={self.softcap_type!r}: poly | tanh")
        _require(self.fp_storage in ("fp16", "fp8", "fp4", "0"), f"FP_STORAGE={self.fp_storage!r}: fp16 | fp8 | fp4")
        self.fp_storage = "fp16" if self.fp_storage == "0" else self.fp_storage
        _require(self.bitnet_group_size > 0, "BITNET_GROUP_SIZE must be positive")
        _require(self.num_layers >= 1, "NUM_LAYERS must be >= 1")
        _require(self.train_seq_len >= 2, "TRAIN_SEQ_LEN must be >= 2")
        _require(self.train_batch_tokens % self.train_seq_len == 0, f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        _require(self.max_wallclock_seconds > 0 or self.iterations > 0, "set MAX_WALLCLOCK_SECONDS or ITERATIONS > 0")
        _require(0 <= self.warmup_fraction + self.warmdown_fraction <= 1, "WARMUP_FRACTION + WARMDOWN_FRACTION must be in [0, 1]")
        self.skc_layers = tuple(int(s) for s in self.skc_layers.split(",") if s.strip())
        _require(all(0 <= i < self.num_layers for i in self.skc_layers), f"SKC_LAYERS={self.skc_layers} must index layers 0..{self.num_layers - 1}")
        self.eval_seq_len = self.eval_seq_len or self.train_seq_len
        _require(1 <= self.sliding_eval_stride <= self.eval_seq_len, f"SLIDING_EVAL_STRIDE={self.sliding_eval_stride} must be in [1, EVAL_SEQ_LEN={self.eval_seq_len}]")
        _require(not self.eval_only or self.artifact, "EVAL_ONLY=1 needs ARTIFACT=path/to/artifact")
        self.validate_export()
        self.run_id = self.run_id or f"run_{uuid.uuid4().hex[:8]}"

    def validate_export(self):
        _require(self.ternary_clip_mode in ("none", "percentile", "row_std"), f"TERNARY_CLIP_MODE={self.ternary_clip_mode!r}: none | percentile | row_std")
        _require(self.turbo_quant_export == self.turbo_quant_train, f"TURBO_QUANT_EXPORT={self.turbo_quant_export} != TURBO_QUANT_TRAIN="
                 f"{self.turbo_quant_train}: the artifact must store the codes the model trained through; set both to the same value")
        group = self.bitnet_group_size
        _require(not self.turbo_quant_train or group & (group - 1) == 0, f"TURBO_QUANT_TRAIN=1 needs BITNET_GROUP_SIZE a power of 2 (got {group})")
        _require(self.calib_tokens > self.train_seq_len, f"CALIB_TOKENS={self.calib_tokens} must exceed TRAIN_SEQ_LEN={self.train_seq_len}")
        _require(0 < self.calib_max_seconds <= 300, f"CALIB_MAX_SECONDS={self.calib_max_seconds} must be in (0, 300] (other ranks wait on rank 0)")
        searching = self.gptq_lite_enabled and self.ternary_clip_mode != "none" or self.ternary_scale_search or self.ternary_threshold_search
        _require(not self.export_aligned_train or searching, "EXPORT_ALIGNED_TRAIN=1 has nothing to align: set GPTQ_LITE_ENABLED=1, "
                 "TERNARY_SCALE_SEARCH=1 or TERNARY_THRESHOLD_SEARCH=1")
        _require(0 <= self.export_aligned_start_fraction < 1, f"EXPORT_ALIGNED_START_FRACTION={self.export_aligned_start_fraction} must be in [0, 1)")
        _require(self.engram_prune_min_hits >= 0, "ENGRAM_PRUNE_MIN_HITS must be >= 0")

    def as_dict(self):
        return {name: getattr(self, name.lower()) for name, _, _ in SPEC}


def _cast(name, raw, kind):
    if isinstance(raw, kind) and not isinstance(raw, bool):
        return raw
    try:
        return kind(float(raw)) if kind is int and "." in str(raw) else kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def _require(condition, message):
    if not condition:
        raise ConfigError(message)


def env_table_markdown():
    """The README's env-var table, generated from SPEC so the two cannot drift."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{n}` | `{d!r}` | {m} |" for n, d, m in SPEC]
    return "\n".join(lines)

# -----------------------------------------------------------------------------------------------------------------
# DISTRIBUTED + LOGGING
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU. Nothing else in the file reads them.
# -----------------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, device)


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Logger:
    """Rank 0 prints `key:value` lines to stdout and LOG_DIR/RUN_ID.txt; other ranks stay silent."""

    def __init__(self, log_dir, run_id, is_main):
        self.is_main = is_main
        self.path = Path(log_dir) / f"{run_id}.txt"
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def __call__(self, message, console=True):
        if not self.is_main:
            return
        if console:
            print(message, flush=True)
        with open(self.path, "a") as f:
            f.write(message + "\n")


def kv(event, **fields):
    """One grep-able log line: `event key:value key:value`."""
    parts = [event] + [f"{k}:{v:.4f}" if isinstance(v, float) else f"{k}:{v}" for k, v in fields.items()]
    return " ".join(parts)

# -----------------------------------------------------------------------------------------------------------------
# DATA
# Challenge shards: 256 little-endian int32 header (magic 20240520, version 1, token count), then uint16 tokens.
# Every check runs before training: a bad shard is an error naming the file, never a silent crash at step 5000.
# -----------------------------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def load_shard(path, vocab_size):
    """Memory-map one shard after checking magic, version, size and that every token id is < vocab_size."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise ConfigError(f"{path}: {size} bytes is shorter than the 1024-byte shard header (corrupt or truncated)")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: bad shard header (magic {header[0]}, version {header[1]}; expected {SHARD_MAGIC}, {SHARD_VERSION})")
    count = int(header[2])
    if size != SHARD_HEADER_INTS * 4 + 2 * count:
        raise ConfigError(f"{path}: header says {count} tokens ({SHARD_HEADER_INTS * 4 + 2 * count} bytes) but the file has {size} bytes")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(count,))
    if count and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ConfigError(f"{path}: token id {int(tokens[bad])} at position {bad} is >= VOCAB_SIZE={vocab_size}; "
                          "the shards were made with a larger tokenizer")
    return tokens


def shard_paths(data_path, split):
    paths = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not paths:
        raise ConfigError(f"no fineweb_{split}_*.bin shards in DATA_PATH={data_path}; get data with data/cached_challenge_fineweb.py "
                          "or data/tokenize_corpus.py (see data/README.md)")
    return paths


def load_val_tokens(data_path, vocab_size, max_tokens=0):
    tokens = np.concatenate([np.asarray(load_shard(p, vocab_size)) for p in shard_paths(data_path, "val")])
    if max_tokens:
        tokens = tokens[:max_tokens]
    return torch.from_numpy(tokens.astype(np.int64))


class TokenStream:
    """Reads the train shards in order, forever, as one stream of tokens."""

    def __init__(self, paths, vocab_size):
        self.shards = [load_shard(p, vocab_size) for p in paths]
        self.shard_index, self.position = 0, 0

    def state(self):
        return self.shard_index, self.position

    def restore(self, state):
        self.shard_index, self.position = state

    def take(self, n):
        chunks = []
        while n > 0:
            shard = self.shards[self.shard_index]
            piece = shard[self.position:self.position + n]
            chunks.append(np.asarray(piece))
            n -= len(piece)
            self.position += len(piece)
            if self.position >= len(shard):
                self.shard_index, self.position = (self.shard_index + 1) % len(self.shards), 0
        return np.concatenate(chunks)


class DistributedTokenLoader:
    """Each call takes the next `global_tokens + world_size` tokens of the stream; rank r gets the r-th contiguous
    span of it, as (inputs, targets) of shape (-1, seq_len). One process with k micro-batches sees exactly the
    tokens that k processes with one micro-batch each see, so the global batch is independent of world size."""

    def __init__(self, paths, vocab_size, rank, world_size, device):
        self.stream = TokenStream(paths, vocab_size)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.pinned = device.type == "cuda"

    def next_batch(self, global_tokens, seq_len):
        span = global_tokens // self.world_size + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]
        local = torch.from_numpy(chunk.astype(np.int64))
        if self.pinned:
            local = local.pin_memory()
        local = local.to(self.device, non_blocking=True)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

# -----------------------------------------------------------------------------------------------------------------
# TOKENIZER + BPB
# Bits per byte exactly as the challenge counts them: per-token byte counts from the SentencePiece model, sums in
# float64, all-reduced over ranks.
# -----------------------------------------------------------------------------------------------------------------

def load_tokenizer(path, vocab_size):
    import sentencepiece as spm
    if not path or not Path(path).is_file():
        raise ConfigError(f"TOKENIZER_PATH={path!r} is not a file; point it at the SentencePiece .model of your shards")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; set VOCAB_SIZE={sp.vocab_size()} "
                          "or use the tokenizer the shards were made with")
    return sp


def check_data_matches_tokenizer(data_path, tokenizer_path, vocab_size):
    """data/tokenize_corpus.py writes meta.json; where it exists, its tokenizer must be ours."""
    meta_path = Path(data_path) / "meta.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    if meta.get("vocab_size") not in (None, vocab_size):
        raise ConfigError(f"{meta_path}: the shards use vocab size {meta['vocab_size']} but VOCAB_SIZE={vocab_size}")
    digest = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    if meta.get("tokenizer_sha256") not in (None, digest):
        raise ConfigError(f"{meta_path}: the shards were tokenized with {meta.get('tokenizer_path')} (sha256 {meta['tokenizer_sha256'][:12]}) "
                          f"but TOKENIZER_PATH={tokenizer_path} has sha256 {digest[:12]}")


def build_byte_tables(sp, vocab_size):
    """Per-token byte counts. Returns (base_bytes int64, has_leading_space bool, is_boundary bool), each (V,).

    Control, unknown and unused ids are boundaries and count 0 bytes; byte-fallback pieces count 1 byte; any other
    piece counts the UTF-8 bytes of its text without the leading "▁", plus 1 for the "▁" unless the previous token
    is a boundary (that space is the document start, not a byte of the text)."""
    base_bytes = np.zeros(vocab_size, dtype=np.int64)
    has_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.ones(vocab_size, dtype=bool)
    for i in range(min(sp.vocab_size(), vocab_size)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        has_space[i] = piece.startswith("\u2581")
        base_bytes[i] = len((piece[1:] if has_space[i] else piece).encode("utf-8"))
    return torch.from_numpy(base_bytes), torch.from_numpy(has_space), torch.from_numpy(is_boundary)


def token_bytes(prev_ids, target_ids, tables):
    """Bytes of each target token given the token before it (same shapes in and out)."""
    base_bytes, has_space, is_boundary = (t.to(target_ids.device) for t in tables)
    return base_bytes[target_ids] + (has_space[target_ids] & ~is_boundary[prev_ids]).long()


def bits_per_byte(nll_sum, byte_sum):
    """BPB = sum NLL (nats) / (ln 2 * sum bytes)."""
    return float(nll_sum) / (math.log(2.0) * max(float(byte_sum), 1.0))

# -----------------------------------------------------------------------------------------------------------------
# MODEL: QUANTIZERS
# One ternary quantizer and one FP-storage quantizer serve the training forward (through a straight-through
# estimator), export and reload, so the reloaded artifact computes exactly what the trained model computed.
# -----------------------------------------------------------------------------------------------------------------

def hadamard(n, device=None):
    """Orthonormal Sylvester-Hadamard matrix (n a power of two); symmetric, so H @ H = I."""
    h = torch.ones(1, 1, device=device)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def ternary_quantize(weight, group_size, scale_mult=1.0, threshold=0.5, rotate=False, clip=None):
    """BitNet b1.58 quantizer. weight (rows, cols) -> codes int8 (rows, cols) in {-1, 0, 1}, scales fp16
    (rows, groups). Per group of `group_size` input weights: scale = fp16(absmean * scale_mult) with zero padding
    excluded from the mean; code = sign(w) if |w| > threshold * scale else 0 (threshold 0.5 = round-and-clamp).
    rotate=True (TurboQuant) first multiplies each group by an orthonormal Hadamard matrix. clip (a tensor
    broadcastable to (rows, 1), inf = none) first clamps the weight to [-clip, clip] (GPTQ-lite clip search)."""
    if clip is not None:
        weight = torch.maximum(torch.minimum(weight, clip), -clip)
    rows, cols = weight.shape
    groups = -(-cols // group_size)
    pad = groups * group_size - cols
    w = F.pad(weight.float(), (0, pad)).view(rows, groups, group_size)
    counts = torch.full((groups,), float(group_size), device=weight.device)
    if rotate:
        w = w @ hadamard(group_size, weight.device)
    elif pad:
        counts[-1] = group_size - pad
    scales = (w.abs().sum(-1) / counts * scale_mult).clamp_min(1e-6).half()
    codes = torch.where(w.abs() > threshold * scales.float().unsqueeze(-1), torch.sign(w), torch.zeros_like(w))
    return codes.to(torch.int8).view(rows, groups * group_size)[:, :cols].contiguous(), scales


def ternary_dequantize(codes, scales, group_size, rotate=False):
    """Inverse of ternary_quantize: codes * scale per group (rotated back for TurboQuant), float32 (rows, cols)."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    w = F.pad(codes.float(), (0, groups * group_size - cols)).view(rows, groups, group_size)
    w = w * scales.float().unsqueeze(-1)
    if rotate:
        w = w @ hadamard(group_size, codes.device)
    return w.view(rows, groups * group_size)[:, :cols]


FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes
FP_MAX = {"fp8": 448.0, "fp4": 6.0}                 # largest finite value of e4m3 and e2m1


def fp_quantize(weight, scheme):
    """FP storage of a non-ternary matrix. fp16: codes = fp16(w), no scales. fp8 / fp4: per-row scale
    fp16(absmax / FP_MAX), codes = e4m3(w / scale) (uint8 bits) or a 4-bit sign+index into FP4_GRID (uint8)."""
    if scheme == "fp16":
        return weight.detach().half(), None
    scales = (weight.detach().abs().amax(dim=1, keepdim=True) / FP_MAX[scheme]).half().clamp_min(2 ** -24)
    x = (weight.detach().float() / scales.float()).clamp(-FP_MAX[scheme], FP_MAX[scheme])
    if scheme == "fp8":
        return x.to(torch.float8_e4m3fn).view(torch.uint8), scales
    grid = torch.tensor(FP4_GRID, device=weight.device)
    index = torch.bucketize(x.abs(), (grid[1:] + grid[:-1]) / 2)
    return (index + 8 * (x < 0)).to(torch.uint8), scales


def fp_dequantize(codes, scales, scheme):
    if scheme == "fp16":
        return codes.float()
    if scheme == "fp8":
        values = codes.view(torch.float8_e4m3fn).float()
    else:
        grid = torch.tensor(FP4_GRID, device=codes.device)
        values = grid[(codes & 7).long()] * (1 - 2 * (codes >> 3).float())
    return values * scales.float()


class StraightThrough(torch.autograd.Function):
    """Forward returns the quantized tensor bit-exactly; backward passes the gradient to the latent weight."""

    @staticmethod
    def forward(ctx, latent, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def tag(param, name):
    """Route a parameter by what it is (see PARAM_ROUTES); set once, at construction."""
    param.route = name
    return param


class TernaryLinear(nn.Module):
    """Linear layer with ternary weights. Trains a latent fp32 weight through the STE; after reload (`frozen`)
    the weight holds the dequantized codes and is used as is. `scale_mult` / `threshold` are export
    calibration buffers (default: plain absmean rounding)."""

    def __init__(self, in_features, out_features, group_size, rotate=False, zero_init=False):
        super().__init__()
        self.group_size, self.rotate, self.frozen = group_size, rotate, False
        self.weight = tag(nn.Parameter(torch.empty(out_features, in_features)), "ternary")
        self.register_buffer("scale_mult", torch.ones(()))
        self.register_buffer("threshold", torch.full((), 0.5))
        self.register_buffer("clip_value", torch.full((out_features, 1), math.inf), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=in_features ** -0.5)

    def quantize(self):
        if self.frozen:
            return self.stored
        return ternary_quantize(self.weight.detach(), self.group_size, self.scale_mult, self.threshold, self.rotate, self.clip_value)

    def effective_weight(self):
        if self.frozen:
            return self.weight
        return StraightThrough.apply(self.weight, ternary_dequantize(*self.quantize(), self.group_size, self.rotate))

    def load_quantized(self, codes, scales):
        self.stored = (codes, scales)
        self.weight.data.copy_(ternary_dequantize(codes, scales, self.group_size, self.rotate))
        self.frozen = True

    def forward(self, x):
        return F.linear(x, self.effective_weight().to(x.dtype))


class FPStored(nn.Module):
    """A non-ternary matrix stored as fp16 / fp8 / fp4 and trained through that same rounding."""

    def __init__(self, weight, scheme, route):
        super().__init__()
        self.scheme, self.frozen = scheme, False
        self.weight = tag(nn.Parameter(weight), route)

    def quantize(self):
        if self.frozen:
            return self.stored
        return fp_quantize(self.weight, self.scheme)

    def effective_weight(self):
        if self.frozen:
            return self.weight
        return StraightThrough.apply(self.weight, fp_dequantize(*self.quantize(), self.scheme))

    def load_quantized(self, codes, scales):
        self.stored = (codes, scales)
        self.weight.data.copy_(fp_dequantize(codes, scales, self.scheme))
        self.frozen = True

# -----------------------------------------------------------------------------------------------------------------
# MODEL: LAYERS
# A block = token mixer (from the MIXERS registry) + MLP, with learned residual scales, a residual mix with the
# embedding x0 and LN damping 1/sqrt(layer+1). A new mixer is one class plus one registry line.
# -----------------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int = 8192
    num_layers: int = 9
    model_dim: int = 512
    embed_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    mlp_activation: str = "leaky_relu2"
    bitnet_group_size: int = 128
    turbo_quant_train: int = 0
    rope_base: float = 10000.0
    rope_dims: int = 64
    yarn_factor: float = 1.0
    train_seq_len: int = 1024
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0
    softcap_type: str = "poly"
    parallel_residual_start: int = -1
    architecture: str = "attn"
    skc_layers: tuple = ()
    fp_storage: str = "fp16"

    @classmethod
    def from_hparams(cls, hp):
        return cls(**{name: getattr(hp, name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_dict(cls, d):
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["skc_layers"] = tuple(d.get("skc_layers", ()))
        return cls(**d)


BOS_ID = 1  # the challenge tokenizers' <s>; one precedes every document


@dataclass
class Context:
    """Per-forward state shared by the layers (never stored on a module): token ids, rotary tables, aux losses
    (each already weighted; the model adds them to the loss), and the training progress (0-d tensor in [0, 1])."""
    input_ids: torch.Tensor
    rope: tuple
    aux_losses: list
    progress: torch.Tensor


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(seq_len, rope_dims, base, yarn_factor, train_seq_len, device):
    """cos/sin tables (T, rope_dims/2) and the attention temperature. YaRN (factor s > 1): frequencies whose
    wavelength exceeds the training context are divided by s, with a linear ramp between (NTK-by-parts), and
    logits are scaled by 0.1 ln s + 1 (Peng et al. 2023)."""
    inv_freq = base ** (-torch.arange(0, rope_dims, 2, device=device, dtype=torch.float32) / rope_dims)
    temperature = 1.0
    if yarn_factor > 1.0:
        wavelengths_per_context = train_seq_len * inv_freq / (2 * math.pi)
        ramp = ((wavelengths_per_context - 1.0) / (32.0 - 1.0)).clamp(0, 1)
        inv_freq = inv_freq / yarn_factor * (1 - ramp) + inv_freq * ramp
        temperature = 0.1 * math.log(yarn_factor) + 1.0
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin(), temperature


def apply_rope(x, cos, sin):
    """Rotate the first 2*cos.size(-1) dims of each head (partial RoPE). x: (B, T, H, hd)."""
    rot = 2 * cos.size(-1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x_pass], dim=-1)


def _load_flash_attention():
    for module_name in ("flash_attn_interface", "flash_attn"):
        try:
            return __import__(module_name).flash_attn_func
        except ImportError:
            continue
    return None


FLASH_ATTENTION = _load_flash_attention()


def causal_attention(q, k, v):
    """q (B, T, H, hd), k/v (B, T, KV, hd) -> (B, T, H, hd). flash-attn when installed (CUDA, bf16), else SDPA."""
    if FLASH_ATTENTION is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = FLASH_ATTENTION(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """GQA attention with QK RMSNorm, per-head query gain and partial RoPE; ternary projections."""

    def __init__(self, cfg, layer_index):
        super().__init__()
        d, hd, g = cfg.model_dim, cfg.model_dim // cfg.num_heads, cfg.bitnet_group_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q = TernaryLinear(d, cfg.num_heads * hd, g)
        self.k = TernaryLinear(d, cfg.num_kv_heads * hd, g)
        self.v = TernaryLinear(d, cfg.num_kv_heads * hd, g)
        self.proj = TernaryLinear(cfg.num_heads * hd, d, g, zero_init=True)
        self.q_gain = tag(nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init)), "scalar")

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = rms_norm(self.q(x).view(B, T, self.num_heads, self.head_dim))
        k = rms_norm(self.k(x).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin, temperature = ctx.rope
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        q = q * (self.q_gain * temperature).to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    """Ternary up/down projections with LeakyReLU(0.5)^2 (or relu^2)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.up = TernaryLinear(cfg.model_dim, hidden, cfg.bitnet_group_size)
        self.down = TernaryLinear(hidden, cfg.model_dim, cfg.bitnet_group_size, zero_init=True)
        self.negative_slope = 0.5 if cfg.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, x):
        return self.down(F.leaky_relu(self.up(x), self.negative_slope).square())


MIXERS = {"attn": CausalSelfAttention}


def layer_kinds(cfg):
    """Mixer kind of every layer, from ARCHITECTURE (and SKC_LAYERS for `competition`)."""
    n = cfg.num_layers
    if cfg.architecture == "attn":
        return ["attn"] * n
    if cfg.architecture in ("skc", "koopman_ssm"):
        return [cfg.architecture] * n
    if cfg.architecture == "hybrid":
        return ["attn" if i % 2 == 0 else "koopman_ssm" for i in range(n)]
    return ["skc" if i in cfg.skc_layers else "attn" for i in range(n)]


class Block(nn.Module):
    def __init__(self, cfg, layer_index, kind):
        super().__init__()
        if kind not in MIXERS:
            raise ConfigError(f"layer type {kind!r} (ARCHITECTURE={cfg.architecture}) is not implemented; known: {sorted(MIXERS)}")
        d = cfg.model_dim
        self.mixer = MIXERS[kind](cfg, layer_index)
        self.mlp = MLP(cfg)
        self.mixer_scale = tag(nn.Parameter(torch.ones(d)), "scalar")
        self.mlp_scale = tag(nn.Parameter(torch.ones(d)), "scalar")
        self.resid_mix = tag(nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)])), "scalar")
        self.parallel = 0 <= cfg.parallel_residual_start <= layer_index
        self.damping = 1.0 / math.sqrt(layer_index + 1)

    def forward(self, x, x0, ctx):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * self.damping
        if self.parallel:
            return x + self.mixer_scale.to(x.dtype) * self.mixer(h, ctx) + self.mlp_scale.to(x.dtype) * self.mlp(h)
        x = x + self.mixer_scale.to(x.dtype) * self.mixer(h, ctx)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.damping)


def softcap(logits, cap, kind):
    if cap <= 0:
        return logits
    if kind == "tanh":
        return cap * torch.tanh(logits / cap)
    return logits * torch.rsqrt(1.0 + (logits / cap).square())


class GPT(nn.Module):
    """Tied, factorized embedding -> U-Net of blocks (encoder half pushes skips, decoder half adds them back
    through learned skip weights) -> final norm -> tied head with a soft cap. Knows nothing of DDP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.model_dim, cfg.embed_dim
        self.tok_emb = FPStored(torch.randn(cfg.vocab_size, e) * 0.005, cfg.fp_storage, "embed")
        self.embed_in = FPStored(torch.randn(d, e) * e ** -0.5, cfg.fp_storage, "dense") if e != d else None
        self.embed_out = FPStored(torch.randn(e, d) * d ** -0.5, cfg.fp_storage, "dense") if e != d else None
        self.blocks = nn.ModuleList(Block(cfg, i, kind) for i, kind in enumerate(layer_kinds(cfg)))
        self.num_encoder = cfg.num_layers // 2
        num_skips = min(self.num_encoder, cfg.num_layers - self.num_encoder)
        self.skip_weights = tag(nn.Parameter(torch.ones(num_skips, d)), "scalar")
        self.register_buffer("progress", torch.zeros(()), persistent=False)
        self._rope_cache = {}
        for module in self.modules():
            if isinstance(module, TernaryLinear):
                module.rotate = bool(cfg.turbo_quant_train)

    def set_progress(self, fraction):
        """Training fraction of the budget in [0, 1] (a buffer, so compiled graphs do not recompile); features
        that switch on or ramp with training read it from the Context. A reloaded model runs at 1.0."""
        self.progress.fill_(float(fraction))

    def rope(self, seq_len, device):
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            c = self.cfg
            self._rope_cache[key] = rope_tables(max(seq_len, c.train_seq_len), c.rope_dims, c.rope_base, c.yarn_factor,
                                                c.train_seq_len, device)
        return self._rope_cache[key]

    def hidden(self, input_ids):
        """(B, T) token ids -> (B, T, D) final hidden states and the list of aux losses."""
        ctx = Context(input_ids, self.rope(input_ids.size(1), input_ids.device), [], self.progress)
        x = F.embedding(input_ids, self.tok_emb.effective_weight())
        if self.embed_in is not None:
            x = F.linear(x, self.embed_in.effective_weight().to(x.dtype))
        x = x0 = rms_norm(x)
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips and i - self.num_encoder < len(self.skip_weights):
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x = block(x, x0, ctx)
            if i < self.num_encoder:
                skips.append(x)
        return rms_norm(x), ctx.aux_losses

    def logits(self, hidden):
        if self.embed_out is not None:
            hidden = F.linear(hidden, self.embed_out.effective_weight().to(hidden.dtype))
        logits = F.linear(hidden, self.tok_emb.effective_weight().to(hidden.dtype)).float()
        return softcap(logits, self.cfg.logit_softcap, self.cfg.softcap_type)

    def token_nll(self, input_ids, target_ids):
        """Per-token negative log-likelihood in nats, (B, T), float32; no aux losses."""
        hidden, _ = self.hidden(input_ids)
        logits = self.logits(hidden)
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def forward(self, input_ids, target_ids):
        """Training loss: mean token NLL plus the aux losses the layers returned (already weighted)."""
        hidden, aux_losses = self.hidden(input_ids)
        loss = F.cross_entropy(self.logits(hidden).flatten(0, 1), target_ids.flatten())
        return loss + sum(aux_losses) if aux_losses else loss

# -----------------------------------------------------------------------------------------------------------------
# OPTIMIZER
# Muon (momentum + Newton-Schulz orthogonalization, Jordan et al. 2024) for matrices, AdamW for the embedding and
# scalars. PARAM_ROUTES is the one table from a parameter's tag to optimizer, learning rate, weight decay and
# export scheme; every parameter must land in exactly one group.
# -----------------------------------------------------------------------------------------------------------------

PARAM_ROUTES = {
    # tag:      (optimizer, lr variable, weight-decay variable, export scheme)
    "ternary": ("muon", "matrix_lr", "muon_wd", "ternary"),
    "dense": ("muon", "matrix_lr", "muon_wd", "fp"),
    "embed": ("adam", "embed_lr", "adam_wd", "fp"),
    "scalar": ("adam", "scalar_lr", None, "fp32"),
}


def newton_schulz5(update, steps=5, eps=1e-7):
    """Quintic Newton-Schulz iteration in bf16 -> approximately the nearest semi-orthogonal matrix (U V^T of the
    SVD), with coefficients (3.4445, -4.7750, 2.0315) from modded-nanogpt."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> optional row equilibration (MuonEq-R) -> Newton-Schulz -> shape scale
    sqrt(max(1, rows/cols)). With a process group each rank orthogonalizes every world_size-th matrix and one
    all-reduce shares the updates; at world size 1 it is plain. Weight decay and the update only touch matrices
    whose gradient is nonzero this step (an expert that got no tokens neither decays nor moves)."""

    def __init__(self, params, lr, momentum, backend_steps, row_equilibrate, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      row_equilibrate=row_equilibrate, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    flat[offset:offset + p.numel()] = self._orthogonal_update(p, group).flatten()
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if p.grad is not None:
                    got_gradient = (p.grad != 0).any().to(p.dtype)
                    p.mul_(1 - group["lr"] * group["weight_decay"] * got_gradient)
                    p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype) * got_gradient, alpha=-group["lr"])
                offset += p.numel()

    def _orthogonal_update(self, p, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        update = p.grad.add(buf, alpha=group["momentum"])
        if group["row_equilibrate"]:
            update = update / update.norm(dim=1, keepdim=True).clamp_min(1e-7)
        update = newton_schulz5(update, group["backend_steps"])
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5


def build_optimizers(model, hp, fused):
    """Group parameters by their route tag; assert every trainable parameter is in exactly one group."""
    groups = {route: [] for route in PARAM_ROUTES}
    for name, p in model.named_parameters():
        route = getattr(p, "route", None)
        if route not in PARAM_ROUTES:
            raise AssertionError(f"parameter {name} has no route tag (tag it at construction)")
        if p.requires_grad:
            groups[route].append(p)
    optimizers = []
    muon_params = [(r, ps) for r, ps in groups.items() if PARAM_ROUTES[r][0] == "muon" and ps]
    for route, params in muon_params:
        _, lr_name, wd_name, _ = PARAM_ROUTES[route]
        optimizers.append(Muon(params, getattr(hp, lr_name), hp.muon_momentum, hp.muon_backend_steps, hp.muon_eq_r,
                               getattr(hp, wd_name) if wd_name else 0.0))
    adam_groups = [dict(params=ps, lr=getattr(hp, PARAM_ROUTES[r][1]),
                        weight_decay=getattr(hp, PARAM_ROUTES[r][2]) if PARAM_ROUTES[r][2] else 0.0)
                   for r, ps in groups.items() if PARAM_ROUTES[r][0] == "adam" and ps]
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=fused))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers

# -----------------------------------------------------------------------------------------------------------------
# SCHEDULES
# Functions of the elapsed fraction of the training wallclock budget, so a 10-minute run gets its whole schedule
# whatever its step time.
# -----------------------------------------------------------------------------------------------------------------

def lr_scale(fraction, warmup_fraction, warmdown_fraction):
    """Linear warm-up over the first `warmup_fraction`, 1.0, then linear warm-down to 0 over the last
    `warmdown_fraction` of the budget."""
    if warmup_fraction > 0 and fraction < warmup_fraction:
        return max(fraction / warmup_fraction, 1e-3)
    if warmdown_fraction > 0 and fraction > 1.0 - warmdown_fraction:
        return max((1.0 - fraction) / warmdown_fraction, 0.0)
    return 1.0


def muon_momentum(step, start, end, warmup_steps):
    """Linear momentum warm-up from `start` to `end` over `warmup_steps` optimizer steps."""
    if warmup_steps <= 0:
        return end
    t = min(step / warmup_steps, 1.0)
    return (1 - t) * start + t * end


def training_fraction(step, elapsed_seconds, hp):
    """Elapsed fraction of the budget: wallclock when MAX_WALLCLOCK_SECONDS > 0, else steps / ITERATIONS."""
    if hp.max_wallclock_seconds > 0:
        return min(elapsed_seconds / hp.max_wallclock_seconds, 1.0)
    return min(step / hp.iterations, 1.0)


class EMA:
    """Exponential moving average of the weights. The shadow starts as a copy of the live weights when the
    training fraction reaches `start_fraction`; `apply_to` copies it into the model exactly once."""

    def __init__(self, decay, start_fraction):
        self.decay, self.start_fraction = decay, start_fraction
        self.shadow, self.applied = None, False

    @torch.no_grad()
    def update(self, model, fraction):
        if fraction < self.start_fraction:
            return
        params = [p.detach() for p in model.parameters()]
        if self.shadow is None:
            self.shadow = [p.clone().float() for p in params]
            return
        torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def apply_to(self, model):
        if self.applied:
            raise RuntimeError("EMA weights were already applied once")
        self.applied = True
        if self.shadow is not None:
            for p, s in zip(model.parameters(), self.shadow):
                p.copy_(s.to(p.dtype))

# -----------------------------------------------------------------------------------------------------------------
# QUANTIZE + EXPORT
# Artifact = 1 codec byte + compressed payload; payload = magic, version, JSON header (model config, tensor
# table), then the tensor bytes. Ternary codes are packed base-3 (5 trits per byte) or as a nonzero bitmask plus
# sign bits, whichever is smaller; fp tensors as their stored codes and scales; scalars as fp32. The whole
# payload is compressed with lzma and brotli and the smaller kept. Same weights and config -> same bytes.
# -----------------------------------------------------------------------------------------------------------------

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"SKCA", 1
CODECS = {0: "lzma", 1: "brotli"}


def pack_base3(codes):
    """int8 codes in {-1,0,1} -> bytes, 5 trits per byte (3^5 = 243 <= 256), little-endian digits."""
    digits = (np.asarray(codes, dtype=np.int8).reshape(-1) + 1).astype(np.uint8)
    digits = np.pad(digits, (0, -len(digits) % 5)).reshape(-1, 5)
    return (digits @ np.array([1, 3, 9, 27, 81], dtype=np.uint16)).astype(np.uint8).tobytes()


def unpack_base3(data, count):
    values = np.frombuffer(data, dtype=np.uint8).astype(np.int16)[:, None]
    digits = (values // np.array([1, 3, 9, 27, 81], dtype=np.int16)) % 3
    return (digits.reshape(-1)[:count] - 1).astype(np.int8)


def pack_bitmask(codes):
    """int8 codes -> packbits(nonzero) + packbits(positive among the nonzero)."""
    flat = np.asarray(codes, dtype=np.int8).reshape(-1)
    nonzero = flat != 0
    return np.packbits(nonzero).tobytes() + np.packbits(flat[nonzero] > 0).tobytes()


def unpack_bitmask(data, count):
    raw = np.frombuffer(data, dtype=np.uint8)
    mask_bytes = -(-count // 8)
    nonzero = np.unpackbits(raw[:mask_bytes])[:count].astype(bool)
    signs = np.unpackbits(raw[mask_bytes:])[: int(nonzero.sum())]
    codes = np.zeros(count, dtype=np.int8)
    codes[nonzero] = np.where(signs == 1, 1, -1)
    return codes


def pack_ternary(codes):
    base3, bitmask = pack_base3(codes), pack_bitmask(codes)
    return ("base3", base3) if len(base3) <= len(bitmask) else ("bitmask", bitmask)


def unpack_ternary(encoding, data, count):
    return (unpack_base3 if encoding == "base3" else unpack_bitmask)(data, count)


def _raw_part(tensor, kind):
    array = tensor.detach().cpu().contiguous().numpy()
    return dict(encoding="raw", dtype=str(array.dtype), shape=list(array.shape), kind=kind), array.tobytes()


def export_parts(model):
    """(header entries, blobs) for every tensor of the model's state dict, each by its module's export class."""
    entries, blobs, covered = [], [], set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, TernaryLinear):
            codes, scales = module.quantize()
            encoding, packed = pack_ternary(codes.cpu().numpy())
            scale_meta, scale_bytes = _raw_part(scales, "ternary_scales")
            parts = [(dict(encoding=encoding, shape=list(codes.shape), kind="ternary_codes"), packed), (scale_meta, scale_bytes)]
        elif isinstance(module, FPStored):
            codes, scales = module.quantize()
            keep = getattr(module, "row_keep", None)
            if keep is not None:
                codes, scales = codes[keep], scales[keep] if scales is not None else None
            parts = [_raw_part(codes, "fp_codes")] + ([_raw_part(scales, "fp_scales")] if scales is not None else [])
            if keep is not None:
                parts.insert(0, _raw_part(torch.from_numpy(np.packbits(keep.cpu().numpy())), "row_bitmap"))
        else:
            continue
        entries.append(dict(name=prefix + "weight", scheme="ternary" if isinstance(module, TernaryLinear) else module.scheme,
                            parts=[meta for meta, _ in parts]))
        if isinstance(module, FPStored) and getattr(module, "row_keep", None) is not None:
            entries[-1].update(encoding="rowpruned", rows=len(module.row_keep))
        blobs += [blob for _, blob in parts]
        covered.add(prefix + "weight")
    for name, tensor in model.state_dict().items():
        if name not in covered:
            meta, blob = _raw_part(tensor.float(), "fp32")
            entries.append(dict(name=name, scheme="fp32", parts=[meta]))
            blobs.append(blob)
    return entries, blobs


def serialize_model(model):
    entries, blobs = export_parts(model)
    metas = [meta for entry in entries for meta in entry["parts"]]
    for meta, blob in zip(metas, blobs):
        meta["nbytes"] = len(blob)
    header = json.dumps(dict(config=asdict(model.cfg), tensors=entries), sort_keys=True).encode()
    return ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION]) + len(header).to_bytes(4, "little") + header + b"".join(blobs)


def compress_payload(payload):
    """Try every codec, keep the smallest; the first byte names the codec."""
    candidates = {0: lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)}
    try:
        import brotli
        candidates[1] = brotli.compress(payload, quality=11)
    except ImportError:
        pass
    codec = min(candidates, key=lambda c: len(candidates[c]))
    return bytes([codec]) + candidates[codec]


def decompress_artifact(blob, path):
    if not blob or blob[0] not in CODECS:
        raise ConfigError(f"artifact {path}: unknown codec byte {blob[:1]!r}; not an SKC artifact or corrupt")
    try:
        if blob[0] == 0:
            return lzma.decompress(blob[1:])
        import brotli
        return brotli.decompress(blob[1:])
    except ImportError:
        raise ConfigError(f"artifact {path} is brotli-compressed; pip install brotli") from None
    except Exception as error:
        raise ConfigError(f"artifact {path} is corrupt: {CODECS[blob[0]]} could not decompress it ({error})") from None


def parse_payload(payload, path):
    """payload -> (header dict, {name: [part arrays]})."""
    if payload[:4] != ARTIFACT_MAGIC or payload[4] != ARTIFACT_VERSION:
        raise ConfigError(f"artifact {path}: bad magic/version {payload[:5]!r}; expected {ARTIFACT_MAGIC!r} v{ARTIFACT_VERSION}")
    header_len = int.from_bytes(payload[5:9], "little")
    try:
        header = json.loads(payload[9:9 + header_len])
    except ValueError as error:
        raise ConfigError(f"artifact {path}: header is not valid JSON ({error}); the file is corrupt") from None
    offset, tensors = 9 + header_len, {}
    for entry in header["tensors"]:
        arrays = []
        for meta in entry["parts"]:
            data = payload[offset:offset + meta["nbytes"]]
            if len(data) != meta["nbytes"]:
                raise ConfigError(f"artifact {path}: tensor {entry['name']} is truncated; the file is corrupt")
            offset += meta["nbytes"]
            if meta["encoding"] == "raw":
                arrays.append(np.frombuffer(data, dtype=meta["dtype"]).reshape(meta["shape"]).copy())
            else:
                arrays.append(unpack_ternary(meta["encoding"], data, int(np.prod(meta["shape"]))).reshape(meta["shape"]))
        if entry.get("encoding") == "rowpruned":
            arrays = unprune_rows(arrays, entry["rows"])
        tensors[entry["name"]] = (entry["scheme"], arrays)
    if offset != len(payload):
        raise ConfigError(f"artifact {path}: {len(payload) - offset} trailing bytes; the file is corrupt")
    return header, tensors


def unprune_rows(arrays, rows):
    """A `rowpruned` entry (row bitmap, kept codes[, kept scales]) -> full (codes[, scales]), zeros in dropped rows."""
    keep = np.unpackbits(arrays[0])[:rows].astype(bool)
    full = []
    for kept in arrays[1:]:
        out = np.zeros((rows,) + kept.shape[1:], dtype=kept.dtype)
        out[keep] = kept
        full.append(out)
    return full


def write_artifact(path, blob):
    """Atomic write: a crash mid-write never leaves a half artifact under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def load_model_from_artifact(path, device):
    """Rebuild the model from the artifact file alone (config included); quantized tensors come back frozen."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ARTIFACT={path} does not exist")
    header, tensors = parse_payload(decompress_artifact(path.read_bytes(), path), path)
    model = GPT(ModelConfig.from_dict(header["config"]))
    modules, state = dict(model.named_modules()), model.state_dict()
    missing = set(state) - set(tensors)
    if missing:
        raise ConfigError(f"artifact {path} lacks tensors {sorted(missing)[:5]}; it was made by another model version")
    with torch.no_grad():
        for name, (scheme, arrays) in tensors.items():
            if name not in state:
                raise ConfigError(f"artifact {path} has tensor {name} that this model does not; config mismatch")
            arrays = [torch.from_numpy(a) for a in arrays]
            module = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
            if scheme == "fp32":
                state[name].copy_(arrays[0].view(state[name].shape))
            else:
                module.load_quantized(arrays[0], arrays[1] if len(arrays) > 1 else None)
    model.set_progress(1.0)
    return model.to(device)


def export_report(model):
    """Bytes per tensor class of the uncompressed payload (compression is reported separately)."""
    entries, blobs = export_parts(model)
    report = {}
    for meta, blob in zip([m for e in entries for m in e["parts"]], blobs):
        report[meta["kind"]] = report.get(meta["kind"], 0) + len(blob)
    return report


def measure_code_bytes(hp):
    """Bytes of the script that would be submitted: the built (minified, lzma-wrapped) script when
    build_submission.py is beside us, else this file's own size (inside a built submission that is exact)."""
    if hp.code_bytes:
        return hp.code_bytes
    here = Path(__file__).resolve()
    if (here.parent / "build_submission.py").is_file():
        sys.path.insert(0, str(here.parent))
        import build_submission
        return len(build_submission.build_code(here.read_text(), hp.as_dict()))
    return here.stat().st_size


def estimate_artifact_bytes(model):
    """Compressed payload size of the model as it is now (initial weights): lzma at a fast preset, which lands
    within a few percent of the final codecs on trained weights (tests/test_export.py checks 3%)."""
    return 1 + len(lzma.compress(serialize_model(model), preset=6))


# Export fidelity: choices made on the trained weights before export, stored in module buffers that the one
# quantizer reads, so training (EXPORT_ALIGNED_TRAIN), export and the artifact all see the same codes and scales.
CLIP_CANDIDATES = {"none": (), "percentile": (0.999, 0.995, 0.99, 0.98), "row_std": (4.0, 3.0, 2.5, 2.0)}
CALIB_CANDIDATES = {"scale_mult": (0.8, 0.9, 1.0, 1.1, 1.2), "threshold": (0.35, 0.45, 0.5, 0.55, 0.65)}


def ternary_modules(model):
    return [m for m in model.modules() if isinstance(m, TernaryLinear)]


def clip_candidates(weight, mode):
    """Clip tensors (rows, 1) to try, `inf` (no clip) first: |w| quantiles of the whole tensor (percentile) or
    k * the row's standard deviation (row_std)."""
    rows = weight.size(0)
    candidates = [torch.full((rows, 1), math.inf, device=weight.device)]
    if mode == "percentile":
        magnitudes = weight.detach().float().abs().flatten()
        for q in CLIP_CANDIDATES[mode]:
            value = magnitudes.kthvalue(max(1, round(q * magnitudes.numel()))).values
            candidates.append(value.expand(rows, 1).clone())
    elif mode == "row_std":
        std = weight.detach().float().std(dim=1, keepdim=True)
        candidates += [k * std for k in CLIP_CANDIDATES[mode]]
    return candidates


def reconstruction_error(module, clip):
    """Squared error of the dequantized ternary weight against the original (unclipped) latent weight."""
    weight = module.weight.detach().float()
    codes, scales = ternary_quantize(weight, module.group_size, module.scale_mult, module.threshold, module.rotate, clip)
    return float((ternary_dequantize(codes, scales, module.group_size, module.rotate) - weight).square().sum())


@torch.no_grad()
def search_clips(model, mode):
    """GPTQ-lite: per ternary tensor, keep the clip candidate with the least reconstruction error (ties keep no
    clip, so the error never grows). Returns the number of tensors that got a finite clip. With codes in
    {-1, 0, 1} a clip only lowers the absmean scale, which is already below the error-optimal scale at
    scale_mult 1, so on Gaussian, Laplace and Student-t weights the search keeps "no clip" (measured, CPU); it
    clips only where scale_mult is well above 1."""
    clipped = 0
    for module in ternary_modules(model):
        candidates = clip_candidates(module.weight, mode)
        errors = [reconstruction_error(module, clip) for clip in candidates]
        best = min(range(len(candidates)), key=errors.__getitem__)
        module.clip_value.copy_(candidates[best])
        clipped += best > 0
    return clipped


def calibration_tokens(hp):
    """The last CALIB_TOKENS + 1 tokens of the train shards (held out by position: the loader reaches them last).
    Never val tokens."""
    need, chunks = hp.calib_tokens + 1, []
    for path in reversed(shard_paths(hp.data_path, "train")):
        shard = load_shard(path, hp.vocab_size)
        chunks.insert(0, np.asarray(shard[max(0, len(shard) - need):]))
        need -= len(chunks[0])
        if need <= 0:
            break
    if need > 0:
        raise ConfigError(f"CALIB_TOKENS={hp.calib_tokens} exceeds the train shards in DATA_PATH={hp.data_path}; lower it")
    return torch.from_numpy(np.concatenate(chunks).astype(np.int64))


@torch.no_grad()
def calibration_loss(model, tokens, seq_len, batch_seqs):
    """Mean token NLL (nats) over non-overlapping windows of the calibration tokens."""
    n = (len(tokens) - 1) // seq_len
    x, y = tokens[:n * seq_len].view(n, seq_len), tokens[1:n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_seqs):
        with autocast(x.device):
            total += float(model.token_nll(x[i:i + batch_seqs], y[i:i + batch_seqs]).double().sum())
    return total / (n * seq_len)


@torch.no_grad()
def calibrate_ternary(model, tokens, hp):
    """Coordinate search, tensor by tensor, over the scale multiplier and/or zero threshold of each ternary layer:
    a candidate is kept only if it lowers the calibration loss, so the loss never rises. Stops at CALIB_MAX_EVALS
    loss evaluations or CALIB_MAX_SECONDS, whichever comes first."""
    was_training, t0 = model.training, time.perf_counter()
    model.eval()
    loss = lambda: calibration_loss(model, tokens, hp.train_seq_len, hp.eval_batch_seqs)
    base = best = loss()
    evals, names = 1, [n for n, on in (("scale_mult", hp.ternary_scale_search), ("threshold", hp.ternary_threshold_search)) if on]
    for module in ternary_modules(model):
        for name in names:
            buffer = getattr(module, name)
            kept = float(buffer)
            for value in CALIB_CANDIDATES[name]:
                if evals >= hp.calib_max_evals or time.perf_counter() - t0 >= hp.calib_max_seconds:
                    break
                if abs(value - kept) < 1e-6:
                    continue
                buffer.fill_(value)
                candidate, evals = loss(), evals + 1
                if candidate < best:
                    best, kept = candidate, value
            buffer.fill_(kept)
    model.train(was_training)
    return dict(base_loss=base, calib_loss=best, evals=evals, seconds=time.perf_counter() - t0)


def broadcast_ternary_buffers(model):
    """Every rank takes rank 0's export buffers (scale multiplier, threshold, clip)."""
    if dist.is_available() and dist.is_initialized():
        for module in ternary_modules(model):
            for buffer in (module.scale_mult, module.threshold, module.clip_value):
                dist.broadcast(buffer, src=0)


def align_export(model, tokens, hp, run, log, stage):
    """Clip search then calibration on rank 0; the others wait for the broadcast. All ranks call it."""
    if run.is_main and hp.gptq_lite_enabled and hp.ternary_clip_mode != "none":
        log(kv("export_clip", stage=stage, mode=hp.ternary_clip_mode, clipped_tensors=search_clips(model, hp.ternary_clip_mode)))
    if run.is_main and (hp.ternary_scale_search or hp.ternary_threshold_search):
        stats = calibrate_ternary(model, tokens, hp)
        modules = ternary_modules(model)
        log(kv("export_calib", stage=stage, **stats, mean_scale_mult=sum(float(m.scale_mult) for m in modules) / len(modules),
               mean_threshold=sum(float(m.threshold) for m in modules) / len(modules)))
    broadcast_ternary_buffers(model)


@torch.no_grad()
def prune_rows(model, tokens, min_hits):
    """Every FPStored module with a `count_row_hits(input_ids)` method: rows hit fewer than `min_hits` times over
    the tokens (given as one (1, N) sequence) are zeroed and marked, so export stores a row bitmap and the kept
    rows only (encoding `rowpruned`) and reload restores the zeros. Returns {module name: rows dropped}."""
    dropped = {}
    for name, module in model.named_modules():
        if isinstance(module, FPStored) and hasattr(module, "count_row_hits"):
            keep = module.count_row_hits(tokens[None]) >= min_hits
            module.weight[~keep] = 0
            module.row_keep = keep.cpu()
            dropped[name] = int((~keep).sum())
    return dropped


def export_fidelity(model, hp, run, log):
    """The hook between the EMA weights and export: row pruning, clip search, calibration (each if enabled)."""
    searching = hp.gptq_lite_enabled and hp.ternary_clip_mode != "none" or hp.ternary_scale_search or hp.ternary_threshold_search
    if not (searching or hp.engram_prune_min_hits):
        return
    tokens = calibration_tokens(hp).to(run.device)
    if hp.engram_prune_min_hits:
        log(kv("export_prune", min_hits=hp.engram_prune_min_hits, **prune_rows(model, tokens, hp.engram_prune_min_hits)))
    align_export(model, tokens, hp, run, log, "final")

# -----------------------------------------------------------------------------------------------------------------
# EVAL
# A stage scores every val target exactly once through windows (start, length, first scored offset). The plain
# stage is non-overlapping windows of the context length; the sliding stage starts a window every `stride`
# tokens and scores only the targets the previous window did not. Windows are spread over ranks in contiguous
# ranges; NLL and byte sums are float64 and all-reduced. Byte counts use the same (previous, target) pairs.
# -----------------------------------------------------------------------------------------------------------------

def eval_windows(num_tokens, seq_len, stride):
    """Windows covering targets 1..num_tokens-1 exactly once: (start, length, score_from). Window k reads
    tokens[start:start+length] and predicts tokens[start+1:start+length+1]; it scores offsets >= score_from."""
    windows, covered, start = [], 0, 0
    while covered < num_tokens - 1:
        length = min(seq_len, num_tokens - 1 - start)
        windows.append((start, length, max(0, covered - start)))
        covered = start + length
        start += stride
    return windows


@torch.no_grad()
def score_windows(model, tokens, windows, batch_seqs, tables, device):
    """Sum of NLL, bytes and scored targets over the windows (float64 tensors of shape (3,))."""
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for i in range(0, len(windows), batch_seqs):
        batch = windows[i:i + batch_seqs]
        for length in sorted({w[1] for w in batch}):
            same = [w for w in batch if w[1] == length]
            x = torch.stack([tokens[s:s + length] for s, _, _ in same]).to(device)
            y = torch.stack([tokens[s + 1:s + length + 1] for s, _, _ in same]).to(device)
            keep = torch.arange(length, device=device)[None, :] >= torch.tensor([f for _, _, f in same], device=device)[:, None]
            with autocast(device):
                nll = model.token_nll(x, y).double()
            totals[0] += (nll * keep).sum()
            totals[1] += (token_bytes(x, y, tables).double() * keep).sum()
            totals[2] += keep.sum()
    return totals


def rank_slice(items, rank, world_size):
    per_rank = -(-len(items) // world_size)
    return items[rank * per_rank:(rank + 1) * per_rank]


def eval_stage(model, val_tokens, hp, tables, run, stride):
    """Loss (nats/token) and BPB of one stage, all ranks together."""
    was_training = model.training
    model.eval()
    windows = rank_slice(eval_windows(len(val_tokens), hp.eval_seq_len, stride), run.rank, run.world_size)
    batch = hp.sliding_batch_size if stride < hp.eval_seq_len else hp.eval_batch_seqs
    totals = all_reduce_sum(score_windows(model, val_tokens, windows, batch, tables, run.device))
    model.train(was_training)
    return float(totals[0] / totals[2]), bits_per_byte(totals[0], totals[1]), int(totals[2])


def eval_plan(hp):
    """Stages in their fixed order; the reported val_bpb is the last one, declared before the run."""
    stages = [("roundtrip", hp.eval_seq_len)]
    if hp.sliding_eval:
        stages.append(("sliding", hp.sliding_eval_stride))
    return stages


def run_eval_stack(model, val_tokens, hp, tables, run, log):
    results = {}
    for name, stride in eval_plan(hp):
        t0 = time.perf_counter()
        loss, bpb, count = eval_stage(model, val_tokens, hp, tables, run, stride)
        results[name] = dict(val_loss=loss, val_bpb=bpb, eval_s=time.perf_counter() - t0, tokens=count)
        log(kv("eval", stage=name, val_loss=loss, val_bpb=bpb, eval_s=results[name]["eval_s"], tokens=count,
               **truncation_note(hp)))
    return results


def truncation_note(hp):
    return {"val_max_tokens": hp.val_max_tokens, "WARNING": "val_split_truncated"} if hp.val_max_tokens else {}


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (exact and fast enough for tiny models)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)

# -----------------------------------------------------------------------------------------------------------------
# TRAIN
# -----------------------------------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    pass


def grad_accum_steps(hp, run):
    total = hp.grad_accum_steps or (8 if run.device.type == "cuda" else 1)
    if total % run.world_size:
        raise ConfigError(f"GRAD_ACCUM_STEPS={total} must be a multiple of the world size {run.world_size}")
    local = total // run.world_size
    if hp.train_batch_tokens % (total * hp.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must split into GRAD_ACCUM_STEPS={total} "
                          f"micro-batches of whole TRAIN_SEQ_LEN={hp.train_seq_len} sequences")
    return local


def train_step(model, optimizers, loader, hp, run, accum, step, fraction):
    """One optimizer step over `accum` micro-batches; returns the mean loss (a tensor, no host sync)."""
    micro_tokens = hp.train_batch_tokens // accum
    total = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = loader.next_batch(micro_tokens, hp.train_seq_len)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = micro == accum - 1
        with autocast(run.device):
            loss = model(x, y)
        (loss / accum).backward()
        total += loss.detach() / accum
    scale = lr_scale(fraction, hp.warmup_fraction, hp.warmdown_fraction)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step, hp.muon_momentum_warmup_start, hp.muon_momentum, hp.muon_momentum_warmup_steps)
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for o in optimizers for g in o.param_groups for p in g["params"]], hp.grad_clip_norm)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total, scale


def compile_warmup(model, optimizers, loader, hp, run, accum, base_model):
    """Run WARMUP_STEPS steps so compilation happens off the clock, then restore weights, optimizer state and
    data position exactly."""
    if hp.warmup_steps <= 0:
        return 0.0
    t0 = time.perf_counter()
    saved = (copy.deepcopy(base_model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers], loader.stream.state())
    for step in range(hp.warmup_steps):
        train_step(model, optimizers, loader, hp, run, accum, step, 0.0)
    base_model.load_state_dict(saved[0])
    for opt, state in zip(optimizers, saved[1]):
        opt.load_state_dict(state)
    loader.stream.restore(saved[2])
    synchronize(run.device)
    return time.perf_counter() - t0


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, base_model, optimizers, loader, hp, run, log, ema, validate, on_step=None):
    """The training loop. The clock (train_seconds) stops for validation; elapsed time and loss are all-reduced
    every step, so every rank takes the same schedule and the same decision to stop."""
    accum = grad_accum_steps(hp, run)
    compile_seconds = compile_warmup(model, optimizers, loader, hp, run, accum, base_model)
    log(kv("compile", compile_s=compile_seconds, warmup_steps=hp.warmup_steps))
    step, train_seconds, last_finite = 0, 0.0, (0, float("nan"))
    tokens_per_step = hp.train_batch_tokens
    while True:
        # validate if due (off the clock)
        if hp.val_loss_every and step and step % hp.val_loss_every == 0:
            validate(step)
        # one optimizer step, timed
        t0 = time.perf_counter()
        fraction = training_fraction(step, train_seconds, hp)
        base_model.set_progress(fraction)
        loss, scale = train_step(model, optimizers, loader, hp, run, accum, step, fraction)
        on_step(fraction) if on_step else None
        synchronize(run.device)
        stats = all_reduce_sum(torch.stack([torch.tensor(time.perf_counter() - t0, device=run.device), loss.float()]))
        step_seconds, loss_value = (stats / run.world_size).tolist()
        train_seconds += step_seconds
        step += 1
        # stop on a non-finite loss before anything is exported
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"train loss is {loss_value} at step {step}; last finite loss {last_finite[1]:.4f} at step "
                                f"{last_finite[0]}. No artifact was written. Lower MATRIX_LR / EMBED_LR or set GRAD_CLIP_NORM.")
        last_finite = (step, loss_value)
        ema.update(base_model, training_fraction(step, train_seconds, hp)) if ema else None
        # log
        if step % hp.train_log_every == 0 or step == 1:
            remaining = max(hp.max_wallclock_seconds - train_seconds, 0.0) if hp.max_wallclock_seconds else 0.0
            log(kv(f"step:{step}", train_loss=loss_value, lr_scale=scale, step_ms=1000 * train_seconds / step,
                   tok_s=int(tokens_per_step * step / max(train_seconds, 1e-9)), elapsed_s=train_seconds, remaining_s=remaining))
        # stop at the step or wallclock budget
        if step >= hp.iterations or (hp.max_wallclock_seconds and train_seconds >= hp.max_wallclock_seconds):
            return step, train_seconds, compile_seconds

# -----------------------------------------------------------------------------------------------------------------
# MAIN
# -----------------------------------------------------------------------------------------------------------------

REPO_DIR = Path(__file__).resolve().parent
SHARED_DIR = REPO_DIR.parent / "shared"


def prepare_smoke_data(hp, run, log):
    """RUN_PRESET=smoke: tokenize a small corpus into DATA_PATH. Default: a slice of ../shared/corpus with the
    official sp8192 tokenizer; without ../shared, the project's own docs and sources with a tokenizer trained on
    them (said loudly in the log)."""
    corpus = [p for pattern in hp.corpus.split(",") if pattern.strip() for p in sorted(glob.glob(pattern.strip()))]
    shared_train = SHARED_DIR / "corpus" / "fineweb.train_1mb.jsonl"
    if hp.corpus and not corpus:
        raise ConfigError(f"CORPUS={hp.corpus!r} matches no files")
    own_text = not corpus and not shared_train.is_file()
    if own_text:
        corpus = sorted(str(p) for p in REPO_DIR.rglob("*") if p.suffix in (".md", ".py", ".sh", ".txt")
                        and p.is_file() and not any(part.startswith(".") or part in ("logs", "artifacts", "data") for part in p.relative_to(REPO_DIR).parts[:-1]))
        log("smoke: WARNING no ../shared/corpus found; the corpus is this project's own docs and sources "
            f"({len(corpus)} files) and the tokenizer is trained on them. BPB is not comparable to FineWeb runs.")
    elif not corpus:
        corpus = [str(shared_train)]
    tokenizer = hp.tokenizer_path or str(SHARED_DIR / "tokenizers" / "fineweb_8192_bpe.model")
    key = hashlib.sha256(json.dumps([corpus, tokenizer if not own_text else "own"]).encode()).hexdigest()[:10]
    data_path = Path(hp.data_path) / key
    if run.is_main and not (data_path / "meta.json").is_file():
        sys.path.insert(0, str(REPO_DIR / "data"))
        import tokenize_corpus
        if own_text or not Path(tokenizer).is_file():
            tokenizer = train_own_tokenizer(corpus, data_path)
        val_file = SHARED_DIR / "corpus" / "fineweb.val.jsonl"
        if val_file.is_file() and not own_text:
            val_path = data_path / "val_docs.jsonl"
            data_path.mkdir(parents=True, exist_ok=True)
            with open(val_file) as src:
                val_path.write_text("".join(line for _, line in zip(range(40), src)))
            meta = tokenize_corpus.tokenize_corpus(corpus, tokenizer, str(data_path), val_file=str(val_path), workers=1, log=log)
        else:
            meta = tokenize_corpus.tokenize_corpus(corpus, tokenizer, str(data_path), val_docs=max(1, len(corpus) // 8),
                                                   workers=1, split_paragraphs=own_text, log=log)
        log(kv("smoke_data", path=data_path, train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"]))
    barrier()
    meta = json.loads((data_path / "meta.json").read_text())
    hp.data_path, hp.tokenizer_path = str(data_path), meta["tokenizer_path"]
    if "VOCAB_SIZE" not in hp.explicit:
        hp.vocab_size = meta["vocab_size"]


def train_own_tokenizer(corpus, out_dir, vocab_size=1024):
    """A small BPE SentencePiece model (byte fallback) on the given text files."""
    import sentencepiece as spm
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / "tokenizer_text.txt"
    text_path.write_text("\n".join(Path(p).read_text(errors="replace") for p in corpus))
    spm.SentencePieceTrainer.train(input=str(text_path), model_prefix=str(out_dir / "own_bpe"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2,
                                   unk_id=3, pad_id=0, minloglevel=2)
    return str(out_dir / "own_bpe.model")


def log_header(log, hp, run):
    log(f"source_file:{Path(__file__).resolve()}", console=False)
    log(Path(__file__).read_text(), console=False)
    log(kv("versions", python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__,
           cuda=torch.version.cuda, device=run.device, world_size=run.world_size, flash_attn=FLASH_ATTENTION is not None))
    log("config " + json.dumps(hp.as_dict(), sort_keys=True, default=str))


def check_budget(label, model_bytes, code_bytes, log):
    total = model_bytes + code_bytes
    log(kv("budget", check=label, bytes_model=model_bytes, bytes_code=code_bytes, bytes_total=total, limit=BUDGET_BYTES))
    if total > BUDGET_BYTES:
        raise ConfigError(f"{label}: {total:,} bytes (model {model_bytes:,} + code {code_bytes:,}) exceeds the "
                          f"{BUDGET_BYTES:,}-byte limit; shrink NUM_LAYERS / MODEL_DIM / MLP_MULT / VOCAB_SIZE or use FP_STORAGE=fp8")


def prepare_model(model, hp, run):
    """Compile (CUDA default) and wrap in DDP; `model` stays the plain module used for export."""
    compiled = model
    if hp.compile == 1 or (hp.compile == -1 and run.device.type == "cuda"):
        compiled = torch.compile(model, dynamic=False)
    if run.world_size > 1:
        compiled = nn.parallel.DistributedDataParallel(compiled, device_ids=[run.local_rank] if run.device.type == "cuda" else None)
    return compiled


def finish(results, hp, log, run, extra):
    """submission.json and the final line: the reported stage is the last of the declared plan."""
    reported = eval_plan(hp)[-1][0]
    summary = dict(val_bpb=results[reported]["val_bpb"], val_loss=results[reported]["val_loss"], stage=reported, **extra)
    if run.is_main:
        out = Path(hp.out_dir) / hp.run_id
        out.mkdir(parents=True, exist_ok=True)
        stages = {name: r for name, r in results.items()}
        (out / "submission.json").write_text(json.dumps(dict(summary, stages=stages, config=hp.as_dict()), indent=2, default=str))
    log(kv("final", **summary, **truncation_note(hp)))
    return summary


def main():
    if "--env-table" in sys.argv:
        print(env_table_markdown())
        return
    hp = Hyperparameters()
    run = init_distributed()
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    np.random.seed(hp.seed)
    log = Logger(hp.log_dir, hp.run_id, run.is_main)
    log_header(log, hp, run)
    if hp.run_preset == "smoke":
        prepare_smoke_data(hp, run, log)
    sp = load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    check_data_matches_tokenizer(hp.data_path, hp.tokenizer_path, hp.vocab_size)
    tables = build_byte_tables(sp, hp.vocab_size)
    val_tokens = load_val_tokens(hp.data_path, hp.vocab_size, hp.val_max_tokens)
    log(kv("eval_plan", stages=",".join(n for n, _ in eval_plan(hp)), reported=eval_plan(hp)[-1][0],
           val_tokens=len(val_tokens), **truncation_note(hp)))
    if hp.eval_only:
        model = load_model_from_artifact(hp.artifact, run.device)
        results = run_eval_stack(model, val_tokens, hp, tables, run, log)
        return finish(results, hp, log, run, dict(artifact=hp.artifact))

    base_model = GPT(ModelConfig.from_hparams(hp)).to(run.device)
    counts = {r: sum(p.numel() for p in base_model.parameters() if p.route == r) for r in PARAM_ROUTES}
    log(kv("model_params", total=sum(counts.values()), **{f"{r}_params": n for r, n in counts.items()}))
    code_bytes = measure_code_bytes(hp)
    check_budget("estimate_before_training", estimate_artifact_bytes(base_model), code_bytes, log)
    loader = DistributedTokenLoader(shard_paths(hp.data_path, "train"), hp.vocab_size, run.rank, run.world_size, run.device)
    model = prepare_model(base_model, hp, run)
    optimizers = build_optimizers(base_model, hp, fused=run.device.type == "cuda")
    ema = EMA(hp.ema_decay, hp.ema_start_fraction) if hp.ema_enabled else None

    def validate(step):
        loss, bpb, _ = eval_stage(base_model, val_tokens, hp, tables, run, hp.eval_seq_len)
        log(kv("eval", stage="train_step", step=step, val_loss=loss, val_bpb=bpb, **truncation_note(hp)))

    aligned = []

    def align_during_training(fraction):
        if hp.export_aligned_train and not aligned and fraction >= hp.export_aligned_start_fraction:
            aligned.append(fraction)
            align_export(base_model, calibration_tokens(hp).to(run.device), hp, run, log, f"train_fraction_{fraction:.3f}")

    steps, train_seconds, compile_seconds = train(model, base_model, optimizers, loader, hp, run, log, ema, validate,
                                                  align_during_training)
    if ema:
        ema.apply_to(base_model)
    base_model.set_progress(1.0)
    loss, bpb, _ = eval_stage(base_model, val_tokens, hp, tables, run, hp.eval_seq_len)
    log(kv("eval", stage="prequant", val_loss=loss, val_bpb=bpb, **truncation_note(hp)))
    export_fidelity(base_model, hp, run, log)

    artifact_path = Path(hp.out_dir) / hp.run_id / "final_model.skc"
    if run.is_main:
        payload = serialize_model(base_model)
        blob = compress_payload(payload)
        write_artifact(artifact_path, blob)
        report = export_report(base_model)
        log(kv("export_report", **report, payload_bytes=len(payload), compressed_bytes=len(blob), codec=CODECS[blob[0]],
               compression_ratio=len(blob) / len(payload), code_bytes=code_bytes))
    barrier()
    model_bytes = artifact_path.stat().st_size
    log(kv("artifact", bytes_total=model_bytes + code_bytes, bytes_code=code_bytes, bytes_model=model_bytes, path=artifact_path))
    check_budget("after_export", model_bytes, code_bytes, log)
    reloaded = load_model_from_artifact(artifact_path, run.device)
    results = run_eval_stack(reloaded, val_tokens, hp, tables, run, log)
    log(kv("export_cost", delta_bpb=results["roundtrip"]["val_bpb"] - bpb, prequant_bpb=bpb,
           roundtrip_bpb=results["roundtrip"]["val_bpb"], **truncation_note(hp)))
    return finish(results, hp, log, run, dict(bytes_total=model_bytes + code_bytes, bytes_code=code_bytes,
                                              bytes_model=model_bytes, steps=steps, step_ms=1000 * train_seconds / max(steps, 1),
                                              tok_s=int(hp.train_batch_tokens * steps / max(train_seconds, 1e-9)),
                                              compile_s=compile_seconds, artifact=str(artifact_path)))


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
