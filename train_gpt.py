"""SKC-600 ternary trainer for OpenAI's Parameter Golf.

One file holds the whole pipeline, in this order: config -> distributed + logging -> data -> tokenizer + BPB ->
model -> optimizer -> schedules -> quantize + export -> eval -> train -> main. The artifact (this script's code bytes
plus the compressed weights) must fit in 16,000,000 bytes; training must finish in 10 minutes on 8xH100 and the
evaluation in 10 more.

Run:
  RUN_PRESET=smoke python train_gpt.py                        # tiny CPU run, end to end (about a minute)
  DATA_PATH=... TOKENIZER_PATH=... torchrun --standalone --nproc_per_node=8 train_gpt.py
  EVAL_ONLY=1 ARTIFACT=artifacts/<run>/final_model.skc python train_gpt.py  # score an artifact in a fresh process
Every knob is an env var declared once, as a field of a config section below (python train_gpt.py --env-table
prints them all; --print-config prints the resolved config of the current environment as JSON).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import hashlib
import json
import lzma
import math
import os
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------------------------------------------
# CONFIG
# Every env var is one field of one section (run, model, train, export, eval): NAME = the field name in upper case,
# its type that of the default, its meaning the help text. The env parsing, README's table (--env-table) and the
# artifact's model config all derive from these fields. Presets change defaults only; an explicitly set env var
# always wins. Derived values (head_dim, eval context, ...) are properties, computed from the fields, never stored.
# -----------------------------------------------------------------------------------------------------------------

BUDGET_BYTES = 16_000_000  # the challenge's hard limit: code bytes + compressed artifact bytes


class ConfigError(ValueError):
    """A config or input problem; the message names the variable or file and the fix."""


STORAGE_SCHEMES = ("ternary", "int8", "int7", "int6", "int5", "int4", "fp8", "fp4", "fp16")  # the keys of SCHEMES
TENSOR_CLASSES = ("attn", "mlp", "embed", "other")  # what each QUANT_<CLASS> setting stores (see quant_linear)


def setting(default, help):
    """One env var: a dataclass field whose env name is its name in upper case."""
    return field(default=default, metadata={"help": help})


PRESETS = {
    # Tiny CPU run: tokenizes a slice of text, trains ~1 minute, exports, reloads, scores.
    "smoke": dict(
        NUM_LAYERS=4, MODEL_DIM=128, EMBED_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=256,
        TRAIN_BATCH_TOKENS=4096, MAX_WALLCLOCK_SECONDS=60.0, WARMUP_STEPS=0, TRAIN_LOG_EVERY=10,
        MUON_MOMENTUM_WARMUP_STEPS=20, EMA_START_FRACTION=0.7, GRAD_ACCUM_STEPS=1,
        BITNET_GROUP_SIZE=64, EVAL_BATCH_SEQS=16, DATA_PATH="data/datasets/smoke", TOKENIZER_PATH="",
        MATRIX_LR=0.03, EMBED_LR=0.03, SCALAR_LR=0.03, WARMDOWN_FRACTION=0.3,
    ),
}

@dataclass
class RunConfig:
    run_id: str = setting("", "run name; the log is LOG_DIR/RUN_ID.txt (default: a random id chosen by rank 0)")
    run_preset: str = setting("", "'smoke' = tiny CPU run that tokenizes its own corpus; empty = the defaults below")
    seed: int = setting(1337, "seed of init and data order")
    data_path: str = setting("./data/datasets/fineweb10B_sp8192", "directory with fineweb_train_*.bin / fineweb_val_*.bin")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_8192_bpe.model", "SentencePiece model of the shards")
    corpus: str = setting("", "smoke preset: text files (JSONL, JSONL.xz, plain) to tokenize; default ../shared/corpus slice")
    log_dir: str = setting("logs", "directory of the per-run log files")
    out_dir: str = setting("artifacts", "directory of OUT_DIR/RUN_ID/final_model.skc and submission.json (rank 0's disk)")
    eval_only: int = setting(0, "1 = skip training; load ARTIFACT (read by rank 0, broadcast) and run the eval stack")
    artifact: str = setting("", "artifact path for EVAL_ONLY")
    val_max_tokens: int = setting(0, "truncate the val split to this many tokens (0 = full split); logged on every eval line")
    compile: int = setting(-1, "torch.compile the training model and the eval forward (-1 = on for CUDA, off for CPU)")

    def validate(self):
        _require(self.run_preset in ("",) + tuple(PRESETS), f"RUN_PRESET={self.run_preset!r} is unknown; choose one of "
                 f"{sorted(PRESETS)} or leave it empty")
        _require(not self.eval_only or self.artifact, "EVAL_ONLY=1 needs ARTIFACT=path/to/artifact")
        _require(self.val_max_tokens == 0 or self.val_max_tokens >= 2, f"VAL_MAX_TOKENS={self.val_max_tokens}: 0 (full) or >= 2")


@dataclass
class ModelConfig:
    """Everything that defines the network; stored in the artifact, so a reload rebuilds exactly this model."""
    vocab_size: int = setting(8192, "model vocabulary; must equal the tokenizer's and the data's")
    architecture: str = setting("", "layer-plan preset: attn | skc | koopman_ssm | hybrid | competition (empty: attn, or LAYER_KINDS)")
    layer_kinds: str = setting("", "the layer plan: a comma list of NUM_LAYERS mixer kinds (attn, skc, koopman_ssm), e.g. attn,skc,attn,attn")
    num_layers: int = setting(9, "transformer layers (U-Net: first half encoder, second half decoder)")
    model_dim: int = setting(512, "residual width")
    embed_dim: int = setting(0, "factorized embedding width (0 = MODEL_DIM, no projections)")
    num_heads: int = setting(8, "query heads")
    num_kv_heads: int = setting(4, "key/value heads (GQA); must divide NUM_HEADS")
    mlp_mult: float = setting(2.0, "MLP hidden width = MLP_MULT * MODEL_DIM")
    mlp_activation: str = setting("leaky_relu2", "leaky_relu2 (LeakyReLU(0.5)^2) | relu2")
    bitnet_group_size: int = setting(128, "ternary quantization group (input weights per scale)")
    rope_base: float = setting(10000.0, "RoPE base frequency")
    rope_dims: int = setting(0, "rotary dims per head (partial RoPE; 0 = whole head)")
    yarn_factor: float = setting(1.0, "YaRN context-extension factor over TRAIN_SEQ_LEN (1 = plain RoPE)")
    qk_gain_init: float = setting(1.5, "initial per-head query gain (after QK RMSNorm)")
    logit_softcap: float = setting(30.0, "logit soft cap value (0 = off)")
    softcap_type: str = setting("poly", "poly (x/sqrt(1+(x/c)^2)) | tanh (c*tanh(x/c))")
    train_seq_len: int = setting(1024, "training context length (the model's rotary tables and YaRN are built for it)")
    parallel_residual_start: int = setting(-1, "layers >= this use the parallel block (mixer and MLP read one norm); -1 = none")
    skc_layers: str = setting("", "ARCHITECTURE=competition: comma list of layer indices that are SKC layers (the rest attention)")
    skc_num_capsules: int = setting(16, "SKC layer: capsules each position routes its spectral features to")
    skc_capsule_dim: int = setting(64, "SKC layer: width of a capsule state")
    skc_conv_kernel: int = setting(4, "SKC and Koopman layers: taps of the causal depthwise conv (left padding only)")
    skc_block_size: int = setting(64, "SKC layer: period of the frequency-band routing term (position t mod SKC_BLOCK_SIZE)")
    skc_parallel_residual: int = setting(0, "1 = SKC layers use the parallel block (SKC branch and MLP read one norm, one residual add)")
    skc_amp_ramp_fraction: float = setting(0.1, "with SKC_PARALLEL_RESIDUAL: the SKC branch ramps 0 -> 1 over this training fraction")
    skc_aux_entropy_fraction: float = setting(0.0, "weight of the mean capsule-routing entropy (nats) added to the loss per SKC layer; 0 = off")
    reset_ssm_on_bos: int = setting(1, "1 = Koopman SSM state and conv restart at every BOS token (documents do not leak into each other)")
    xsa_start_layer: int = setting(-1, "attention layers >= this remove the component along the token's own value vector (XSA); -1 = off")
    vrl_enabled: int = setting(0, "1 = value residual: attention layers >= VRL_START_LAYER mix in the first attention layer's values")
    vrl_start_layer: int = setting(1, "first layer index that mixes in the first attention layer's values (VRL_ENABLED=1)")
    shared_blocks: int = setting(0, "distinct blocks; layer i runs block i % SHARED_BLOCKS with its own scales (0 = no sharing)")
    recurrence_layers: str = setting("", "comma list of layer indices run again RECURRENCE_DEPTH extra times (depth recurrence)")
    recurrence_depth: int = setting(1, "extra passes of each RECURRENCE_LAYERS layer")
    recurrence_start_fraction: float = setting(0.0, "depth recurrence (RECURRENCE_LAYERS and RECURRENCE_SPAN) switches on at this training fraction (always on at eval)")
    recurrence_span: str = setting("", "span-loop recurrence: 'first,last' layers looped as a block after their first pass (records' style; empty = off)")
    recurrence_span_loops: int = setting(1, "extra passes of the RECURRENCE_SPAN block")
    doc_isolation: int = setting(0, "1 = attention never crosses a BOS (a block-diagonal causal mask; training, eval and TTT)")
    attn_gate: str = setting("off", "attention output gate: off | full (per-head sigmoid gate from the block input) | sparse (from its first ATTN_GATE_DIMS dims)")
    attn_gate_dims: int = setting(12, "input dims of the sparse attention output gate")
    smear_gate: int = setting(0, "1 = SmearGate: each embedding adds a gated share of the previous token's (not across a BOS)")
    unet_skip_gate: int = setting(0, "1 = each U-Net skip is scaled by 2 sigmoid(gate), a learned per-dim gate starting at 1")
    fused_ce: int = setting(0, "1 = memory-lean soft-capped cross-entropy in training: row chunks of the logits, recomputed in backward")
    stochastic_depth: float = setting(0.0, "largest per-sample drop probability of a block's residual branches (last layer; linear in depth; training only)")
    ternary_noise_scale: float = setting(0.0, "training-only Gaussian noise on latent ternary weights before quantization, times the group absmean; 0 = off")
    turbo_quant_train: int = setting(0, "1 = Hadamard-rotate each ternary weight group before ternarization (TurboQuant), in training and in the artifact; BITNET_GROUP_SIZE a power of 2")
    quant_attn: str = setting("ternary", "storage scheme of attention q/k/v/out and the SKC / Koopman mixer matrices: ternary | int8..int4 | fp8 | fp4 | fp16")
    quant_mlp: str = setting("ternary", "storage scheme of the MLP (and MoE expert) matrices: ternary | int8..int4 | fp8 | fp4 | fp16")
    quant_embed: str = setting("fp16", "storage scheme of the tied embedding, its projections, engram tables and the MoE router: int8..int4 | fp8 | fp4 | fp16")
    quant_other: str = setting("ternary", "storage scheme of the engram projections, capsule bank and feedback matrices: ternary | int8..int4 | fp8 | fp4 | fp16")
    gptq_sdclip_k: str = setting("", "int-k clip (every int class: RTN, QAT and GPTQ): empty = absmax; k = k * std(row) (SDClip); or per class, e.g. attn:12.85,mlp:12.85,embed:20")
    qat_start_fraction: float = setting(1.0, "int-k classes train through their rounding (STE) from this training fraction on (1 = never: full precision, quantized at export)")
    bigram_hash_enabled: int = setting(0, "1 = add hashed n-gram (engram) embeddings of the current and previous tokens to the residual")
    bigram_hash_buckets: int = setting(4096, "rows per engram table (row 0 is reserved for n-grams without enough history or crossing a BOS)")
    bigram_hash_dim: int = setting(64, "width of each engram table row")
    engram_num_heads: int = setting(2, "engram tables per n-gram order, each with its own hash prime (1-4)")
    engram_num_orders: int = setting(2, "n-gram orders: 1 = bigram, 2 = bi+trigram, 3 = bi+tri+4-gram")
    engram_inject_layer: int = setting(0, "the gated engram vector is added to the residual before this layer")
    capsule_enabled: int = setting(0, "1 = causal capsule bank (prefix-pooled states + Koopman predictor) at the U-Net midpoint")
    capsule_num: int = setting(16, "capsules in the bank")
    capsule_dim: int = setting(64, "width of each capsule state")
    capsule_koopman_rank: int = setting(4, "rank of the low-rank part of the capsule bank's diagonal + low-rank Koopman predictor")
    koopman_consistency_weight: float = setting(0.1, "weight of the aux loss: relative error of the predicted next capsule state (trains the predictor)")
    koopman_speculative_steps: int = setting(1, "predictor steps applied to the pooled capsule state before it is read")
    koopman_halt_threshold: float = setting(0.0, "stop a position's speculative steps once the update norm is below this (0 = never)")
    feedback_enabled: int = setting(0, "1 = decoder layers read a causal sketch (prefix mean) of the encoder output via small adapters")
    feedback_passes: int = setting(1, "refinements of the sketch (each pools the encoder output plus the previous sketch's read-back)")
    moe_enabled: int = setting(0, "1 = the MLPs of the upper MOE_LAYER_FRAC of layers become mixtures of ternary experts")
    moe_num_experts: int = setting(4, "experts per MoE layer")
    moe_top_k: int = setting(1, "experts per token")
    moe_layer_frac: float = setting(0.5, "fraction of layers (the upper ones) whose MLP is a MoE")
    moe_start_fraction: float = setting(0.1, "training fraction from which routing is on; before it every token uses expert 0")
    moe_aux_weight: float = setting(0.01, "weight of the Switch load-balancing loss (mean over tokens)")

    @property
    def head_dim(self):
        return self.model_dim // self.num_heads

    @property
    def rotary_dims(self):
        return self.rope_dims or self.head_dim

    @property
    def embed_width(self):
        return self.embed_dim or self.model_dim

    @property
    def skc_layer_indices(self):
        return _int_list("SKC_LAYERS", self.skc_layers)

    @property
    def recurrence_layer_indices(self):
        return _int_list("RECURRENCE_LAYERS", self.recurrence_layers)

    @property
    def recurrence_span_indices(self):
        span = _int_list("RECURRENCE_SPAN", self.recurrence_span)
        return span if span else None

    @classmethod
    def from_artifact(cls, stored):
        """The config an artifact's header holds (unknown keys ignored; renamed and list-valued keys of older
        artifacts mapped to today's fields)."""
        stored = {ARTIFACT_RENAMED_FIELDS.get(k, k): v for k, v in stored.items()}
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in stored.items() if k in known}
        return cls(**values)

    def validate(self):
        _require(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        _require(self.num_heads % self.num_kv_heads == 0, f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        _require(self.head_dim % 2 == 0, f"head dim MODEL_DIM/NUM_HEADS={self.head_dim} must be even for RoPE")
        _require(self.rotary_dims % 2 == 0 and self.rotary_dims <= self.head_dim, f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {self.head_dim}")
        _require(self.mlp_activation in ("leaky_relu2", "relu2"), f"MLP_ACTIVATION={self.mlp_activation!r}: leaky_relu2 | relu2")
        _require(self.softcap_type in ("poly", "tanh"), f"SOFTCAP_TYPE={self.softcap_type!r}: poly | tanh")
        for tensor_class in TENSOR_CLASSES:
            scheme = getattr(self, f"quant_{tensor_class}")
            allowed = [name for name in STORAGE_SCHEMES if tensor_class != "embed" or name != "ternary"]
            _require(scheme in allowed, f"QUANT_{tensor_class.upper()}={scheme!r}: choose one of {' | '.join(allowed)}")
        class_values("GPTQ_SDCLIP_K", self.gptq_sdclip_k)
        _require(0 <= self.qat_start_fraction <= 1, f"QAT_START_FRACTION={self.qat_start_fraction} must be in [0, 1]")
        _require(self.vocab_size >= 2, f"VOCAB_SIZE={self.vocab_size} must be >= 2")
        _require(self.bitnet_group_size > 0, "BITNET_GROUP_SIZE must be positive")
        _require(self.num_layers >= 1, "NUM_LAYERS must be >= 1")
        _require(self.train_seq_len >= 2, "TRAIN_SEQ_LEN must be >= 2")
        _require(all(0 <= i < self.num_layers for i in self.skc_layer_indices), f"SKC_LAYERS={self.skc_layers} must index layers 0..{self.num_layers - 1}")
        for name in ("skc_num_capsules", "skc_capsule_dim", "skc_conv_kernel", "skc_block_size", "recurrence_depth"):
            _require(getattr(self, name) >= 1, f"{name.upper()}={getattr(self, name)} must be >= 1")
        _require(0 <= self.skc_amp_ramp_fraction <= 1, f"SKC_AMP_RAMP_FRACTION={self.skc_amp_ramp_fraction} must be in [0, 1]")
        _require(self.skc_aux_entropy_fraction >= 0, f"SKC_AUX_ENTROPY_FRACTION={self.skc_aux_entropy_fraction} must be >= 0")
        _require(self.xsa_start_layer >= -1, f"XSA_START_LAYER={self.xsa_start_layer} must be -1 (off) or a layer index")
        _require(self.vrl_start_layer >= 0, f"VRL_START_LAYER={self.vrl_start_layer} must be >= 0")
        _require(0 <= self.shared_blocks <= self.num_layers, f"SHARED_BLOCKS={self.shared_blocks} must be in [0, NUM_LAYERS={self.num_layers}]")
        _require(all(0 <= i < self.num_layers for i in self.recurrence_layer_indices), f"RECURRENCE_LAYERS={self.recurrence_layers} must index layers 0..{self.num_layers - 1}")
        _require(0 <= self.recurrence_start_fraction <= 1, f"RECURRENCE_START_FRACTION={self.recurrence_start_fraction} must be in [0, 1]")
        _require(0 <= self.stochastic_depth < 1, f"STOCHASTIC_DEPTH={self.stochastic_depth} must be in [0, 1)")
        span = self.recurrence_span_indices
        _require(span is None or (len(span) == 2 and 0 <= span[0] <= span[1] < self.num_layers),
                 f"RECURRENCE_SPAN={self.recurrence_span!r}: 'first,last' layer indices with first <= last < NUM_LAYERS={self.num_layers}")
        _require(self.recurrence_span_loops >= 1, f"RECURRENCE_SPAN_LOOPS={self.recurrence_span_loops} must be >= 1")
        _require(self.attn_gate in ("off", "full", "sparse") and self.attn_gate_dims >= 1, f"ATTN_GATE={self.attn_gate!r}: off | full | sparse (ATTN_GATE_DIMS >= 1)")
        _require(self.ternary_noise_scale >= 0, f"TERNARY_NOISE_SCALE={self.ternary_noise_scale} must be >= 0")
        group = self.bitnet_group_size
        _require(not self.turbo_quant_train or group & (group - 1) == 0, f"TURBO_QUANT_TRAIN=1 needs BITNET_GROUP_SIZE a power of 2 (got {group})")
        self.validate_addons()

    def validate_addons(self):
        _require(self.bigram_hash_buckets >= 2, f"BIGRAM_HASH_BUCKETS={self.bigram_hash_buckets} must be >= 2 (row 0 is reserved)")
        _require(self.bigram_hash_dim >= 1 and 1 <= self.engram_num_heads <= 4, "BIGRAM_HASH_DIM must be >= 1 and ENGRAM_NUM_HEADS in 1..4")
        _require(1 <= self.engram_num_orders <= 3, f"ENGRAM_NUM_ORDERS={self.engram_num_orders}: 1 (bigram) .. 3 (up to 4-grams)")
        _require(0 <= self.engram_inject_layer < self.num_layers, f"ENGRAM_INJECT_LAYER={self.engram_inject_layer} must index layers 0..{self.num_layers - 1}")
        _require(min(self.capsule_num, self.capsule_dim, self.capsule_koopman_rank) >= 1, "CAPSULE_NUM, CAPSULE_DIM and CAPSULE_KOOPMAN_RANK must be >= 1")
        _require(self.koopman_speculative_steps >= 1, f"KOOPMAN_SPECULATIVE_STEPS={self.koopman_speculative_steps} must be >= 1")
        _require(self.feedback_passes >= 1, f"FEEDBACK_PASSES={self.feedback_passes} must be >= 1")
        _require(1 <= self.moe_top_k <= self.moe_num_experts, f"MOE_TOP_K={self.moe_top_k} must be in 1..MOE_NUM_EXPERTS={self.moe_num_experts}")
        _require(0 < self.moe_layer_frac <= 1 and 0 <= self.moe_start_fraction <= 1, "MOE_LAYER_FRAC must be in (0, 1] and MOE_START_FRACTION in [0, 1]")
        _require(not (self.moe_enabled and self.shared_blocks), "MOE_ENABLED=1 with SHARED_BLOCKS > 0 is not supported: set one of them to 0")


@dataclass
class TrainConfig:
    train_batch_tokens: int = setting(524288, "global tokens per optimizer step, independent of world size")
    grad_accum_steps: int = setting(0, "micro-batches per step summed over ranks (0 = 8 on CUDA, 1 on CPU)")
    iterations: int = setting(20000, "maximum optimizer steps (the wallclock usually stops first)")
    max_wallclock_seconds: float = setting(600.0, "training-time budget, including every read of train data after the loop (0 = use ITERATIONS)")
    train_data_reserve_seconds: float = setting(-1.0, "seconds of MAX_WALLCLOCK_SECONDS kept for the post-loop work that reads train data (calibration, pruning, temperature fit); -1 = their limits summed")
    warmup_steps: int = setting(20, "compile warm-up steps; weights, optimizer and data are restored after them")
    train_log_every: int = setting(50, "log a train line every N steps")
    val_loss_every: int = setting(0, "evaluate on val every N steps during training (0 = only at the end)")
    matrix_lr: float = setting(0.04, "Muon learning rate of block matrices")
    embed_lr: float = setting(0.05, "AdamW learning rate of the tied embedding")
    scalar_lr: float = setting(0.04, "AdamW learning rate of scales, gains and norms")
    muon_momentum: float = setting(0.95, "Muon Nesterov momentum after warm-up")
    muon_momentum_warmup_start: float = setting(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = setting(300, "steps of linear momentum warm-up")
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations")
    muon_ns_coefficients: str = setting("quintic", "Newton-Schulz coefficients: quintic (one fixed polynomial) | polar_express (per-step minimax, arXiv:2505.16932)")
    muon_eq_r: int = setting(1, "1 = equilibrate rows of the update before Newton-Schulz (MuonEq-R)")
    muon_wd: float = setting(0.0, "decoupled weight decay of Muon matrices")
    adam_wd: float = setting(0.0, "decoupled weight decay of the embedding (scalars never decay)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip_norm: float = setting(1.0, "global grad-norm clip (0 = off)")
    loss_runaway_ratio: float = setting(2.0, "stop (no artifact) when the train loss exceeds this times ln(VOCAB_SIZE), the loss of a uniform guess (0 = off)")
    warmup_fraction: float = setting(0.02, "LR warm-up, as a fraction of the training budget")
    warmdown_fraction: float = setting(0.4, "LR linear warm-down over the last fraction of the budget, to MIN_LR_FRACTION")
    min_lr_fraction: float = setting(0.0, "the warm-down's floor, as a fraction of each group's learning rate (0 = down to zero)")
    wd_taper_start_fraction: float = setting(1.0, "late weight-decay taper: weight decay falls linearly to 0 from this training fraction (1 = off)")
    ema_enabled: int = setting(1, "keep an EMA of the weights and export it")
    ema_horizon_fraction: float = setting(0.05, "EMA time constant as a fraction of the run: per-step decay exp(-(training fraction advanced) / this)")
    ema_start_fraction: float = setting(0.5, "the EMA shadow starts from the live weights at this budget fraction")
    curriculum_enabled: int = setting(0, "1 = sequence-length curriculum at constant tokens per step (training only)")
    curriculum_min_seq_len: int = setting(128, "curriculum start length (a power of two <= TRAIN_SEQ_LEN)")
    curriculum_end_fraction: float = setting(0.3, "training fraction at which the curriculum reaches TRAIN_SEQ_LEN")

    def validate(self):
        _require(self.max_wallclock_seconds > 0 or self.iterations > 0, "set MAX_WALLCLOCK_SECONDS or ITERATIONS > 0")
        _require(0 <= self.warmup_fraction + self.warmdown_fraction <= 1, "WARMUP_FRACTION + WARMDOWN_FRACTION must be in [0, 1]")
        _require(self.ema_horizon_fraction > 0, f"EMA_HORIZON_FRACTION={self.ema_horizon_fraction} must be > 0")
        _require(self.muon_ns_coefficients in ("quintic", "polar_express"), f"MUON_NS_COEFFICIENTS={self.muon_ns_coefficients!r}: quintic | polar_express")
        _require(0 <= self.min_lr_fraction < 1 and 0 <= self.wd_taper_start_fraction <= 1,
                 "MIN_LR_FRACTION must be in [0, 1) and WD_TAPER_START_FRACTION in [0, 1]")
        _require(self.loss_runaway_ratio == 0 or self.loss_runaway_ratio > 1, f"LOSS_RUNAWAY_RATIO={self.loss_runaway_ratio} "
                 "must be 0 (off) or > 1 (a trained model beats a uniform guess)")
        _require(self.train_data_reserve_seconds == -1 or self.train_data_reserve_seconds >= 0,
                 f"TRAIN_DATA_RESERVE_SECONDS={self.train_data_reserve_seconds}: -1 (automatic) or >= 0")


@dataclass
class ExportConfig:
    code_bytes: int = setting(0, "override the code-byte count (0 = measure the built submission script)")
    gptq_lite_enabled: int = setting(0, "1 = per-tensor clip search before ternarization (TERNARY_CLIP_MODE); keeps the clip with the least reconstruction error, no clip included")
    ternary_clip_mode: str = setting("row_std", "clip candidates: none | percentile (|w| quantiles of the tensor) | row_std (k * row std)")
    ternary_scale_search: int = setting(0, "1 = calibrate a per-tensor ternary scale multiplier (0.8..1.2) on held-out TRAIN tokens by coordinate search")
    ternary_threshold_search: int = setting(0, "1 = calibrate a per-tensor ternary zero threshold (0.35..0.65 of the scale) the same way")
    calib_tokens: int = setting(65536, "calibration tokens: the last CALIB_TOKENS + 1 of the train shards, held out of training when used (never val)")
    calib_max_evals: int = setting(256, "calibration budget: calibration-loss evaluations")
    calib_max_seconds: float = setting(60.0, "calibration budget: seconds of search (rank 0 searches, the others wait; at most 300)")
    export_aligned_train: int = setting(0, "1 = run clip search + calibration once at EXPORT_ALIGNED_START_FRACTION of training and keep training through them")
    export_aligned_start_fraction: float = setting(0.85, "training fraction at which EXPORT_ALIGNED_TRAIN calibrates (the time counts as training time)")
    engram_prune_min_hits: int = setting(0, "at export, zero and drop rows of hit-counted tables (count_row_hits) with fewer hits over the calibration tokens (0 = off)")
    gptq: int = setting(0, "1 = full-Hessian GPTQ at export of every int-k matrix (and the int-k embedding as the head), inside the training budget")
    gptq_calib: str = setting("train", "GPTQ calibration: train (the held-out train tail) | selfgen (text the model samples itself; reads no data)")
    gptq_calib_tokens: int = setting(65536, "GPTQ calibration tokens (train: the last GPTQ_CALIB_TOKENS + 1 train tokens, held out of training)")
    gptq_damp: float = setting(0.01, "GPTQ damping: this times mean(diag H) is added to the Hessian's diagonal")
    gptq_block: int = setting(128, "GPTQ columns per block (errors propagate within a block, then to the rest at once)")
    gptq_ternary: int = setting(0, "1 = GPTQ the ternary matrices too (on their fixed group scales; not with TURBO_QUANT_TRAIN)")
    gptq_clip_search: int = setting(0, "1 = per row, GPTQ's int-k clip is the SDClip k (of a fixed list, absmax included) with the least H-weighted rounding error")
    lqer_rank: int = setting(0, "LQER: rank of the fp16 low-rank correction of each matrix's quantization error, added at reload (0 = off)")
    lqer_classes: str = setting("attn,mlp", "LQER: comma list of the tensor classes it corrects (attn, mlp, embed, other)")

    @property
    def export_search(self):
        """True when clip search or calibration changes the export (each reads held-out train tokens but clips)."""
        return bool(self.gptq_lite_enabled and self.ternary_clip_mode != "none" or self.ternary_scale_search
                    or self.ternary_threshold_search)

    def validate(self):
        _require(self.ternary_clip_mode in ("none", "percentile", "row_std"), f"TERNARY_CLIP_MODE={self.ternary_clip_mode!r}: none | percentile | row_std")
        _require(0 < self.calib_max_seconds <= 300, f"CALIB_MAX_SECONDS={self.calib_max_seconds} must be in (0, 300] (other ranks wait on rank 0)")
        _require(not self.export_aligned_train or self.export_search, "EXPORT_ALIGNED_TRAIN=1 has nothing to align: set GPTQ_LITE_ENABLED=1, "
                 "TERNARY_SCALE_SEARCH=1 or TERNARY_THRESHOLD_SEARCH=1")
        _require(0 <= self.export_aligned_start_fraction < 1, f"EXPORT_ALIGNED_START_FRACTION={self.export_aligned_start_fraction} must be in [0, 1)")
        _require(self.engram_prune_min_hits >= 0, "ENGRAM_PRUNE_MIN_HITS must be >= 0")
        _require(self.gptq_calib in ("train", "selfgen"), f"GPTQ_CALIB={self.gptq_calib!r}: train | selfgen")
        _require(self.gptq_calib_tokens >= 2 and self.gptq_block >= 1 and self.gptq_damp >= 0,
                 "GPTQ_CALIB_TOKENS must be >= 2, GPTQ_BLOCK >= 1 and GPTQ_DAMP >= 0")
        _require(self.lqer_rank >= 0, f"LQER_RANK={self.lqer_rank} must be >= 0")
        classes = [c.strip() for c in self.lqer_classes.split(",") if c.strip()]
        _require(classes and set(classes) <= set(TENSOR_CLASSES), f"LQER_CLASSES={self.lqer_classes!r}: a comma list of {', '.join(TENSOR_CLASSES)}")


@dataclass
class EvalConfig:
    eval_batch_seqs: int = setting(32, "sequences per eval forward pass")
    eval_seq_len: int = setting(0, "eval context length (0 = TRAIN_SEQ_LEN)")
    sliding_eval: int = setting(0, "1 = add the sliding-window stage")
    sliding_eval_stride: int = setting(64, "sliding-window stride: each later window scores its last STRIDE tokens")
    sliding_batch_size: int = setting(32, "windows per forward pass in the sliding stage")
    eval_max_seconds: float = setting(0.0, "eval budget: a stage whose projected time (after its first batch or chunk) would pass it is skipped (0 = none)")
    temp_scaling: int = setting(0, "1 = fit one softmax temperature on held-out train tokens inside the training budget, store it in the artifact; stages after roundtrip use it")
    temp_fit_tokens: int = setting(65536, "the last TEMP_FIT_TOKENS of the train shards, held out of training, for TEMP_SCALING (never val)")
    capsule_carry_eval: int = setting(0, "1 = add the eval stage that carries capsule state across consecutive, already-scored windows")
    ttt_enabled: int = setting(0, "1 = add the legal test-time-training stage: score a chunk, then adapt on it, then the next chunk")
    ttt_scope: str = setting("scales", "TTT params: scales (route scalar) | skc_safe (+ the skc TTT group) | capsule_bank | all")
    ttt_lr: float = setting(0.005, "TTT SGD learning rate")
    ttt_epochs: int = setting(1, "TTT passes over each scored chunk")
    ttt_chunk_tokens: int = setting(32768, "scored targets per chunk of the chunked stages (TTT, caches, budget projection)")
    ttt_momentum: float = setting(0.9, "TTT SGD momentum (the buffer persists across chunks)")
    ttt_batch_seqs: int = setting(32, "sequences per TTT step")
    ttt_grad_clip: float = setting(1.0, "TTT grad-norm clip (0 = off; segments | global)")
    ttt_mode: str = setting("segments", "TTT and stream stages: segments (each rank adapts alone on its 1/world of val) | global (every chunk scored by all ranks, one model adapted with gradients summed over ranks: independent of world size) | lora (per-document LoRA adapters, reset at each BOS)")
    ttt_phases: int = setting(0, "segments | global: P > 0 = split val in P + 1 phases; after each, adapt on every target scored so far (0 = chunks of TTT_CHUNK_TOKENS, adapt on the last chunk)")
    ttt_lr_schedule: str = setting("constant", "segments | global: TTT learning rate over the chunks: constant | cosine (from TTT_LR down to 0 at the last chunk)")
    ttt_lora_rank: int = setting(8, "TTT_MODE=lora: adapter rank of q, v, proj of each attention layer (and the head)")
    ttt_lora_lr: float = setting(0.003, "TTT_MODE=lora: Adam learning rate of the adapters")
    ttt_lora_chunk: int = setting(256, "TTT_MODE=lora: targets a document scores before each adapter update (capped at the eval context)")
    ttt_lora_batch_docs: int = setting(16, "TTT_MODE=lora: documents scored and adapted in parallel")
    ttt_lora_head: int = setting(1, "TTT_MODE=lora: 1 = an adapter on the output head as well")
    freeze_packed_engram: int = setting(1, "0 = TTT may adapt ttt_group=engram params; 1 = frozen; 2 = frozen and raise if they drift")
    ngram_cache_enabled: int = setting(0, "1 = add the stage mixing a backoff n-gram model of already-scored val tokens into the probs")
    ngram_max_order: int = setting(5, "n-gram cache: highest order (context length + 1); backs off to lower orders down to unigram")
    ngram_buckets: int = setting(4194304, "n-gram cache: hash buckets per order (int32 counts; 2 tables per order)")
    ngram_smoothing: str = setting("backoff", "n-gram cache: backoff (the highest order whose context was seen predicts alone) | interpolated (every order, Dirichlet-smoothed towards the next lower one)")
    ngram_dirichlet: float = setting(2.0, "n-gram cache, interpolated: p_k = (c(ctx, v) + D p_(k-1)) / (c(ctx) + D), from a uniform p_0")
    ngram_alpha_mode: str = setting("learned", "n-gram mix weight: entropy (the formula of NGRAM_ALPHA_*) | learned (per evidence bin - order of the longest seen context x log2 of its count - the weight of NGRAM_ALPHA_GRID with the best log-likelihood on the targets already scored; 0 until a bin has evidence)")
    ngram_alpha_grid: str = setting("0,0.02,0.05,0.1,0.2,0.3,0.5,0.7,0.9", "NGRAM_ALPHA_MODE=learned: the candidate weights (the first is used in a bin with no scored target yet)")
    ngram_alpha_base: float = setting(0.05, "n-gram mix weight alpha = min(MAX, BASE + SCALE * sigmoid(entropy_nats - CENTER))")
    ngram_alpha_scale: float = setting(0.55, "n-gram mix weight: entropy-dependent part")
    ngram_entropy_center: float = setting(4.0, "n-gram mix weight: model entropy (nats) at the sigmoid's midpoint")
    ngram_alpha_max: float = setting(0.6, "n-gram mix weight: upper bound, in [0, 1)")
    eval_engram_enabled: int = setting(0, "1 = add the stage with hashed n-gram -> next-token count tables as a logit correction")
    eval_engram_buckets: int = setting(4096, "EvalEngram: context buckets per order and head (each a row of VOCAB_SIZE fp32 counts)")
    eval_engram_heads: int = setting(2, "EvalEngram: hash functions per order (count-min: the smallest count is used)")
    eval_engram_orders: str = setting("2,3", "EvalEngram: comma list of n-gram orders (context = order - 1 tokens)")
    eval_engram_alpha: float = setting(0.3, "EvalEngram: weight of the log-probability correction added to the logits")
    eval_engram_entropy_threshold: float = setting(2.0, "EvalEngram: correct only positions whose model entropy (nats) exceeds this")
    eval_engram_laplace: float = setting(0.1, "EvalEngram: additive smoothing of the counts")
    eval_engram_max_memory_fraction: float = setting(0.25, "EvalEngram: tables may use at most this fraction of device memory (CPU: of 4 GiB)")

    @property
    def eval_engram_order_list(self):
        return _int_list("EVAL_ENGRAM_ORDERS", self.eval_engram_orders)

    def validate(self):
        scopes = ("scales", "skc_safe", "capsule_bank", "all")
        _require(self.ttt_scope in scopes, f"TTT_SCOPE={self.ttt_scope!r}: choose one of {scopes}")
        _require(self.ttt_chunk_tokens >= 1 and self.ttt_epochs >= 0 and self.ttt_batch_seqs >= 1, "TTT_CHUNK_TOKENS and TTT_BATCH_SEQS must be >= 1, TTT_EPOCHS >= 0")
        modes = ("segments", "global", "lora")
        _require(self.ttt_mode in modes, f"TTT_MODE={self.ttt_mode!r}: choose one of {modes}")
        _require(self.ttt_lr_schedule in ("constant", "cosine"), f"TTT_LR_SCHEDULE={self.ttt_lr_schedule!r}: constant | cosine")
        _require(self.ttt_phases >= 0, f"TTT_PHASES={self.ttt_phases} must be >= 0")
        if self.ttt_mode == "lora":
            _require(not (self.ngram_cache_enabled or self.eval_engram_enabled), "TTT_MODE=lora scores each document on its "
                     "own, so the stream caches (NGRAM_CACHE_ENABLED, EVAL_ENGRAM_ENABLED) cannot share its pass; use TTT_MODE=segments or global with them")
            _require(self.ttt_phases == 0, "TTT_PHASES applies to TTT_MODE=segments | global; set TTT_PHASES=0 with TTT_MODE=lora")
            _require(self.ttt_lora_rank >= 1 and self.ttt_lora_chunk >= 1 and self.ttt_lora_batch_docs >= 1 and self.ttt_lora_lr > 0,
                     "TTT_LORA_RANK, TTT_LORA_CHUNK, TTT_LORA_BATCH_DOCS must be >= 1 and TTT_LORA_LR > 0")
        _require(self.eval_batch_seqs >= 1 and self.sliding_batch_size >= 1, "EVAL_BATCH_SEQS and SLIDING_BATCH_SIZE must be >= 1")
        _require(self.freeze_packed_engram in (0, 1, 2), f"FREEZE_PACKED_ENGRAM={self.freeze_packed_engram}: 0 | 1 | 2")
        _require(self.ngram_max_order >= 1 and self.ngram_buckets >= 1, "NGRAM_MAX_ORDER and NGRAM_BUCKETS must be >= 1")
        _require(self.ngram_smoothing in ("backoff", "interpolated"), f"NGRAM_SMOOTHING={self.ngram_smoothing!r}: backoff | interpolated")
        _require(self.ngram_dirichlet > 0, f"NGRAM_DIRICHLET={self.ngram_dirichlet} must be > 0")
        _require(self.ngram_alpha_mode in ("entropy", "learned"), f"NGRAM_ALPHA_MODE={self.ngram_alpha_mode!r}: entropy | learned")
        grid = _float_list("NGRAM_ALPHA_GRID", self.ngram_alpha_grid)
        _require(bool(grid) and all(0.0 <= a < 1.0 for a in grid), f"NGRAM_ALPHA_GRID={self.ngram_alpha_grid!r}: a comma list of weights in [0, 1)")
        _require(0.0 <= self.ngram_alpha_max < 1.0, f"NGRAM_ALPHA_MAX={self.ngram_alpha_max} must be in [0, 1): at 1 a target "
                 "the cache never saw would get probability 0 (infinite loss)")
        orders = self.eval_engram_order_list
        _require(bool(orders) and min(orders) >= 2, f"EVAL_ENGRAM_ORDERS={self.eval_engram_orders!r}: a comma list of integer orders >= 2, e.g. 2,3")
        _require(self.eval_engram_buckets >= 1 and self.eval_engram_heads >= 1 and self.eval_engram_laplace > 0, "EVAL_ENGRAM_BUCKETS, EVAL_ENGRAM_HEADS must be >= 1 and EVAL_ENGRAM_LAPLACE > 0")
        _require(self.temp_fit_tokens >= 2, "TEMP_FIT_TOKENS must be >= 2")


SECTIONS = {"run": RunConfig, "model": ModelConfig, "train": TrainConfig, "export": ExportConfig, "eval": EvalConfig}

RETIRED = {  # env vars that were settings once: set, they are an error naming what replaced them
    "FP_STORAGE": "QUANT_EMBED (the scheme of the embedding, its projections, engram tables and router; QUANT_ATTN / QUANT_MLP / QUANT_OTHER for the rest)",
    "EMA_DECAY": "EMA_HORIZON_FRACTION (the EMA's time constant as a fraction of the run, the same at any step count)",
    "TURBO_QUANT_EXPORT": "TURBO_QUANT_TRAIN alone (the artifact always stores the codes the model trained through)",
    "KOOPMAN_RANK": "CAPSULE_KOOPMAN_RANK (the capsule bank's predictor rank; the Koopman SSM layer's correction rank is fixed)",
}
ARTIFACT_RENAMED_FIELDS = {"koopman_rank": "capsule_koopman_rank"}  # model-config keys of artifacts written before

# build_submission.py writes here the settings it folded into the built script ({NAME: value}); such a script
# refuses an environment that sets one of them to another value instead of silently running the folded code.
FOLDED_SETTINGS = {}


def env_fields():
    """(section name, dataclass field) of every env var, in declaration order."""
    return [(name, f) for name, section in SECTIONS.items() for f in dataclasses.fields(section)]


@dataclass
class Config:
    """The resolved config: one instance of each section. `explicit` = the env vars set in the environment."""
    run: RunConfig
    model: ModelConfig
    train: TrainConfig
    export: ExportConfig
    eval: EvalConfig
    explicit: frozenset = frozenset()

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        for name, replacement in RETIRED.items():
            if name in environ:
                raise ConfigError(f"{name} is no longer a setting: use {replacement}")
        preset_name = environ.get("RUN_PRESET", "")
        if preset_name and preset_name not in PRESETS:
            raise ConfigError(f"RUN_PRESET={preset_name!r} is unknown; choose one of {sorted(PRESETS)} or leave it empty")
        preset, values = PRESETS.get(preset_name, {}), {name: {} for name in SECTIONS}
        for section, f in env_fields():
            name = f.name.upper()
            values[section][f.name] = _cast(name, environ.get(name, preset.get(name, f.default)), type(f.default))
        for name, folded in FOLDED_SETTINGS.items():
            section = next(s for s, f in env_fields() if f.name.upper() == name)
            if name in environ and values[section][name.lower()] != folded:
                raise ConfigError(f"{name}={environ[name]!r}: this submission script was built for {name}={folded!r} "
                                  "(build_submission.py folded that value into the code); unset it, or rebuild the script with it")
        explicit = frozenset(name for _, f in env_fields() if (name := f.name.upper()) in environ)
        config = cls(**{name: SECTIONS[name](**kwargs) for name, kwargs in values.items()}, explicit=explicit)
        config.validate()
        return config

    def replace(self, section, **changes):
        """A copy with some fields of one section changed (e.g. the smoke preset's built corpus), re-validated."""
        config = dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})
        config.validate()
        return config

    @property
    def eval_seq_len(self):
        return self.eval.eval_seq_len or self.model.train_seq_len

    def validate(self):
        for name in SECTIONS:
            getattr(self, name).validate()
        model, train, export, eval_ = self.model, self.train, self.export, self.eval
        _require(train.train_batch_tokens % model.train_seq_len == 0, f"TRAIN_BATCH_TOKENS={train.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={model.train_seq_len}")
        _require(export.calib_tokens > model.train_seq_len, f"CALIB_TOKENS={export.calib_tokens} must exceed TRAIN_SEQ_LEN={model.train_seq_len}")
        _require(1 <= eval_.sliding_eval_stride <= self.eval_seq_len, f"SLIDING_EVAL_STRIDE={eval_.sliding_eval_stride} must be in [1, EVAL_SEQ_LEN={self.eval_seq_len}]")
        _require(not eval_.capsule_carry_eval or model.capsule_enabled, "CAPSULE_CARRY_EVAL=1 needs CAPSULE_ENABLED=1")
        if train.curriculum_enabled:
            power_of_two = lambda n: n > 0 and n & (n - 1) == 0
            _require(power_of_two(model.train_seq_len), f"CURRICULUM_ENABLED=1 needs TRAIN_SEQ_LEN={model.train_seq_len} to be a power of two")
            _require(power_of_two(train.curriculum_min_seq_len) and train.curriculum_min_seq_len <= model.train_seq_len,
                     f"CURRICULUM_MIN_SEQ_LEN={train.curriculum_min_seq_len} must be a power of two <= TRAIN_SEQ_LEN={model.train_seq_len}")
            _require(0 < train.curriculum_end_fraction <= 1, f"CURRICULUM_END_FRACTION={train.curriculum_end_fraction} must be in (0, 1]")

    def as_dict(self):
        """{NAME: value} of every env var (what the log's config line and submission.json hold)."""
        return {f.name.upper(): getattr(getattr(self, section), f.name) for section, f in env_fields()}


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


def class_values(name, text):
    """A per-tensor-class number setting: '' -> {}, 'k' -> every class k, 'attn:k1,mlp:k2' -> those classes; each >= 0."""
    text = text.strip()
    try:
        if not text:
            return {}
        if ":" not in text:
            values = dict.fromkeys(TENSOR_CLASSES, float(text))
        else:
            values = {key.strip(): float(value) for key, value in (item.split(":") for item in text.split(","))}
    except ValueError:
        values = None
    _require(values is not None and set(values) <= set(TENSOR_CLASSES) and min(values.values(), default=0) >= 0,
             f"{name}={text!r}: empty, a number >= 0, or class:number pairs over {', '.join(TENSOR_CLASSES)} (e.g. attn:12.85,mlp:12.85,embed:20)")
    return values


def _int_list(name, text, kind=int):
    try:
        return tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be a comma list of {'integers' if kind is int else 'numbers'}") from None


def _float_list(name, text):
    return _int_list(name, text, float)


def env_table_markdown():
    """README's env-var table, one block per config section, generated from the fields so the two cannot drift."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for section, f in env_fields():
        lines.append(f"| `{f.name.upper()}` | `{f.default!r}` | ({section}) {f.metadata['help']} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------------------------------------------
# DISTRIBUTED + LOGGING
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU. Nothing else in the file reads them. Every
# helper is a no-op at world size 1, so the optimizer, export and eval run unchanged without a process group. Ranks
# share nothing but the process group: no shared filesystem is assumed (rank 0 broadcasts what only it has).
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
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (fp32 heads, scans' einsums)
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, device)


def distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor):
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(value):
    """Rank 0's `value` on every rank (any picklable object: a run id, an artifact's bytes)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if distributed():
        dist.barrier()


def resolve_run_id(run_cfg):
    """RUN_ID, or a random id drawn by rank 0 and broadcast: every rank must name the same run (its artifact path)."""
    return broadcast_object(run_cfg.run_id or f"run_{uuid.uuid4().hex[:8]}")


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (exact and fast enough for tiny models)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        if console:  # one write per line: ranks sharing a pipe (torchrun) never interleave inside a line
            sys.stdout.write(message + "\n")
            sys.stdout.flush()
        with open(self.path, "a") as f:
            f.write(message + "\n")


EXACT_LOG_KEYS = frozenset({"val_bpb", "val_loss", "prequant_bpb", "roundtrip_bpb", "delta_bpb", "temperature"})  # full precision


def kv(event, **fields):
    """One grep-able log line: `event key:value key:value`. The event name is a fixed word; values are fields.
    Floats print with 4 decimals, but BPB and loss keys (EXACT_LOG_KEYS) exactly (repr), so a logged score is the score."""
    def text(key, value):
        if isinstance(value, float) and key not in EXACT_LOG_KEYS:
            return f"{value:.4f}"
        return repr(value) if isinstance(value, float) else str(value)
    return " ".join([event] + [f"{k}:{text(k, v)}" for k, v in fields.items()])

# -----------------------------------------------------------------------------------------------------------------
# DATA
# Challenge shards: 256 little-endian int32 header (magic 20240520, version 1, token count), then uint16 tokens.
# Every check runs before training: a bad shard is an error naming the file, never a silent crash at step 5000.
# The last tokens of the train stream can be held out of training for what reads train data after the loop
# (calibration, pruning, the temperature fit): those reads happen inside the training budget (TRAIN section).
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
    """Reads the train shards in order, forever, as one stream of tokens, without the last `holdout` tokens (the
    held-out tail that calibration and temperature fitting read)."""

    def __init__(self, paths, vocab_size, holdout=0):
        self.shards = [load_shard(p, vocab_size) for p in paths]
        total = sum(len(shard) for shard in self.shards)
        if total - holdout < 2:
            raise ConfigError(f"the train shards hold {total} tokens, and {holdout} are held out for calibration / "
                              "temperature fitting (CALIB_TOKENS, TEMP_FIT_TOKENS): add train data or lower them")
        while holdout > 0:
            last = self.shards.pop()
            if len(last) > holdout:
                self.shards.append(last[:len(last) - holdout])
            holdout -= len(last)
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
    tokens that k processes with one micro-batch each see, so the global batch is independent of world size.
    On CUDA the next span is prefetched: filled into one of two alternating pinned buffers and copied on a side
    stream while the current step computes."""

    def __init__(self, paths, vocab_size, rank, world_size, device, holdout=0):
        self.stream = TokenStream(paths, vocab_size, holdout)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.pinned, self.events, self.flip = [None, None], [None, None], 0
        self.prefetched = None  # (key, stream state before it, device tensor)

    def state(self):
        return self.prefetched[1] if self.prefetched else self.stream.state()

    def restore(self, state):
        self.prefetched = None
        self.stream.restore(state)

    def _take_local(self, global_tokens):
        span = global_tokens // self.world_size + 1
        return self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]

    def _copy_to_device(self, local):
        if not self.cuda:
            return torch.from_numpy(local.astype(np.int64))
        i = self.flip
        self.flip ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last read this pinned buffer is done
        if self.pinned[i] is None or self.pinned[i].numel() != len(local):
            self.pinned[i] = torch.empty(len(local), dtype=torch.int64, pin_memory=True)
        self.pinned[i].numpy()[:] = local
        with torch.cuda.stream(self.copy_stream):
            on_device = self.pinned[i].to(self.device, non_blocking=True)
            self.events[i] = torch.cuda.Event()
            self.events[i].record(self.copy_stream)
        return on_device

    def _fetch(self, global_tokens):
        state = self.stream.state()
        return global_tokens, state, self._copy_to_device(self._take_local(global_tokens))

    def next_batch(self, global_tokens, seq_len):
        if self.prefetched is None or self.prefetched[0] != global_tokens:
            if self.prefetched is not None:
                self.stream.restore(self.prefetched[1])
            self.prefetched = self._fetch(global_tokens)
        local = self.prefetched[2]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            local.record_stream(torch.cuda.current_stream(self.device))
            self.prefetched = self._fetch(global_tokens)
        else:
            self.prefetched = None
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)


def train_tail(data_path, vocab_size, count):
    """The last `count` tokens of the train shards (spanning shards from the end) as int64. The training loader
    never reads them when a feature that uses them is on (heldout_tokens); val is never read."""
    need, chunks = count, []
    for path in reversed(shard_paths(data_path, "train")):
        shard = load_shard(path, vocab_size)
        chunks.insert(0, np.asarray(shard[max(0, len(shard) - need):]))
        need -= len(chunks[0])
        if need <= 0:
            break
    if need > 0:
        raise ConfigError(f"{count} held-out tokens (CALIB_TOKENS / TEMP_FIT_TOKENS) exceed the train shards in DATA_PATH={data_path}; lower them")
    return torch.from_numpy(np.concatenate(chunks).astype(np.int64))


def heldout_tokens(export_cfg, eval_cfg):
    """Train tokens at the end of the stream kept out of training for calibration, clip search, row pruning
    (CALIB_TOKENS + 1), GPTQ calibration (GPTQ_CALIB_TOKENS + 1) and temperature fitting (TEMP_FIT_TOKENS); 0 when
    none of them is on (they share the tail)."""
    calibrating = export_cfg.export_search or export_cfg.engram_prune_min_hits or export_cfg.export_aligned_train
    gptq_train = export_cfg.gptq and export_cfg.gptq_calib == "train"
    return max(export_cfg.calib_tokens + 1 if calibrating else 0, eval_cfg.temp_fit_tokens if eval_cfg.temp_scaling else 0,
               export_cfg.gptq_calib_tokens + 1 if gptq_train else 0)


# The smoke preset's corpus: without ../shared, the project's own docs and sources, the first 300 paragraphs as val.
REPO_DIR = Path(__file__).resolve().parent
SHARED_DIR = REPO_DIR.parent / "shared"
OWN_TEXT_VAL_PARAGRAPHS = 300
OWN_TEXT_SUFFIXES = (".md", ".py", ".sh", ".txt")


def own_text_files(repo_dir=REPO_DIR):
    """The project's own docs and sources (not hidden folders, logs, artifacts or data)."""
    return sorted(str(p) for p in repo_dir.rglob("*") if p.suffix in OWN_TEXT_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") or part in ("logs", "artifacts", "data")
                              for part in p.relative_to(repo_dir).parts[:-1]))


def train_own_tokenizer(corpus, out_dir, vocab_size=1024):
    """A small BPE SentencePiece model (byte fallback, BOS id 1 like the challenge's) on the given text files;
    deterministic (one thread), so every node of a multi-node run trains the same one."""
    import sentencepiece as spm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_path = out_dir / "tokenizer_text.txt"
    text_path.write_text("\n".join(Path(p).read_text(errors="replace") for p in corpus))
    spm.SentencePieceTrainer.train(input=str(text_path), model_prefix=str(out_dir / "own_bpe"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2,
                                   unk_id=3, pad_id=0, minloglevel=2, num_threads=1)
    return str(out_dir / "own_bpe.model")


def prepare_smoke_data(run_cfg, run, log):
    """RUN_PRESET=smoke: tokenize a small corpus into a folder under DATA_PATH, once per node (local rank 0 builds;
    nodes need no shared filesystem). Default corpus: a slice of ../shared/corpus with the official sp8192 tokenizer;
    without ../shared, the project's own docs and sources with a tokenizer trained on them (said loudly in the log).
    Returns (data path, tokenizer path, vocab size) for the caller to put into the config."""
    from data import tokenize_corpus  # the data tools' shard pipeline (data/tokenize_corpus.py)
    corpus = [p for pattern in run_cfg.corpus.split(",") if pattern.strip() for p in sorted(glob.glob(pattern.strip()))]
    shared_train = SHARED_DIR / "corpus" / "fineweb.train_1mb.jsonl"
    if run_cfg.corpus and not corpus:
        raise ConfigError(f"CORPUS={run_cfg.corpus!r} matches no files")
    own_text = not corpus and not shared_train.is_file()
    if own_text:
        corpus = own_text_files()
        log("smoke: WARNING no ../shared/corpus found; the corpus is this project's own docs and sources "
            f"({len(corpus)} files) and the tokenizer is trained on them. BPB is not comparable to FineWeb runs.")
    elif not corpus:
        corpus = [str(shared_train)]
    tokenizer = run_cfg.tokenizer_path or str(SHARED_DIR / "tokenizers" / "fineweb_8192_bpe.model")
    key = hashlib.sha256(json.dumps([corpus, tokenizer if not own_text else "own"]).encode()).hexdigest()[:10]
    data_path = Path(run_cfg.data_path) / key
    if run.local_rank == 0 and not (data_path / "meta.json").is_file():
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
            meta = tokenize_corpus.tokenize_corpus(corpus, tokenizer, str(data_path), val_docs=OWN_TEXT_VAL_PARAGRAPHS,
                                                   workers=1, split_paragraphs=own_text, log=log)
        log(kv("smoke_data", path=data_path, train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"]))
    barrier()
    meta = json.loads((data_path / "meta.json").read_text())
    return str(data_path), meta["tokenizer_path"], meta["vocab_size"]

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
    """data/tokenize_corpus.py writes meta.json; where it exists, its tokenizer must be ours. Official shard folders
    (fineweb10B_sp8192) carry the vocab size in their name instead."""
    meta_path = Path(data_path) / "meta.json"
    if not meta_path.is_file():
        named = re.search(r"_sp(\d+)$", Path(data_path).resolve().name)
        if named and int(named.group(1)) != vocab_size:
            raise ConfigError(f"DATA_PATH={data_path} holds sp{named.group(1)} shards but VOCAB_SIZE={vocab_size}; "
                              f"use the matching tokenizer and VOCAB_SIZE={named.group(1)}")
        return
    meta = json.loads(meta_path.read_text())
    if meta.get("vocab_size") not in (None, vocab_size):
        raise ConfigError(f"{meta_path}: the shards use vocab size {meta['vocab_size']} but VOCAB_SIZE={vocab_size}")
    import sentencepiece as spm
    caseops = is_caseops_tokenizer(spm.SentencePieceProcessor(model_file=str(tokenizer_path)))
    if bool(meta.get("caseops", False)) != caseops:
        raise ConfigError(f"{meta_path}: caseops:{bool(meta.get('caseops', False))} but TOKENIZER_PATH={tokenizer_path} "
                          f"{'is' if caseops else 'is not'} a CaseOps tokenizer; tokenize with data/tokenize_corpus.py "
                          f"{'--caseops ' if caseops else ''}and this tokenizer")
    digest = hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    if meta.get("tokenizer_sha256") not in (None, digest):
        raise ConfigError(f"{meta_path}: the shards were tokenized with {meta.get('tokenizer_path')} (sha256 {meta['tokenizer_sha256'][:12]}) "
                          f"but TOKENIZER_PATH={tokenizer_path} has sha256 {digest[:12]}")


def check_ranks_agree(tokenizer_path, val_tokens, run):
    """Every rank (each with its own disk) must score the same val tokens with the same tokenizer as rank 0."""
    mine = (hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
            hashlib.sha256(val_tokens.numpy().tobytes()).hexdigest())
    if broadcast_object(mine) != mine:
        raise ConfigError(f"rank {run.rank}: TOKENIZER_PATH={tokenizer_path} or the val shards differ from rank 0's "
                          "(each node reads its own disk): give every node the same tokenizer and data")


CASEOPS_OPERATORS = ("\ue000", "\ue001", "\ue002", "\ue003")  # data/caseops.py's TITLE, UPPER, CHAR, ESC


def is_caseops_tokenizer(sp):
    return all(sp.piece_to_id(op) != sp.unk_id() for op in CASEOPS_OPERATORS)


def build_byte_tables(sp, vocab_size):
    """Per-token byte counts. Returns (base_bytes int64, has_leading_space bool, is_boundary bool), each (V,).

    Control, unknown and unused ids are boundaries and count 0 bytes; byte-fallback pieces count 1 byte; a CaseOps
    operator piece counts 0 (it stands for a case change, which adds no byte of the original text); any other
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
        if piece in CASEOPS_OPERATORS:
            continue
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

def fp32_region(fn):
    """Run `fn` with autocast off (CUDA and CPU): quantizers and scans compute in float32 whether the caller is a
    bf16-autocast training forward or the fp32 export, so both get bit-identical codes, scales and states."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def hadamard(n, device=None):
    """Orthonormal Sylvester-Hadamard matrix (n a power of two); symmetric, so H @ H = I."""
    h = torch.ones(1, 1, device=device)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@fp32_region
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


@fp32_region
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


@fp32_region
def fp_quantize(weight, scheme):
    """FP storage of a matrix. fp16: codes = fp16(w), no scales. fp8 / fp4: per-row scale fp16(absmax / FP_MAX),
    codes = e4m3(w / scale) (uint8 bits) or a 4-bit sign+index into FP4_GRID (uint8 0..15)."""
    if scheme == "fp16":
        return weight.detach().half(), None
    scales = (weight.detach().abs().amax(dim=1, keepdim=True) / FP_MAX[scheme]).half().clamp_min(2 ** -24)
    x = (weight.detach().float() / scales.float()).clamp(-FP_MAX[scheme], FP_MAX[scheme])
    if scheme == "fp8":
        return x.to(torch.float8_e4m3fn).view(torch.uint8), scales
    grid = torch.tensor(FP4_GRID, device=weight.device)
    index = torch.bucketize(x.abs(), (grid[1:] + grid[:-1]) / 2)
    return (index + 8 * (x < 0)).to(torch.uint8), scales


@fp32_region
def fp_dequantize(codes, scales, scheme):
    if scheme == "fp16":
        return codes.float()
    if scheme == "fp8":
        values = codes.view(torch.float8_e4m3fn).float()
    else:
        grid = torch.tensor(FP4_GRID, device=codes.device)
        values = grid[(codes & 7).long()] * (1 - 2 * (codes >> 3).float())
    return values * scales.float()


def int_scales(weight, bits, clip_k=0.0):
    """Per-row scales (rows, 1) fp16 of symmetric int-`bits`: the row's clip c over qmax = 2^(bits-1) - 1, with
    c = max |w| (clip_k = 0, round to nearest without clipping) or clip_k * std(row) (SDClip: a larger k spends
    fewer distinct codes on a row, so its codes compress better, at more rounding error)."""
    w, qmax = weight.detach().float(), 2 ** (bits - 1) - 1
    clip = w.abs().amax(1, keepdim=True) if clip_k <= 0 else clip_k * w.std(1, keepdim=True)
    return (clip / qmax).half().clamp_min(2 ** -24)


@fp32_region
def int_quantize(weight, bits, clip_k=0.0, scales=None):
    """Symmetric per-row int-`bits` codes (int8, |code| <= qmax) and fp16 scales (rows, 1): code = clamp(round(w /
    scale), -qmax, qmax). `scales` given (GPTQ fixes them first) skips int_scales."""
    qmax = 2 ** (bits - 1) - 1
    scales = int_scales(weight, bits, clip_k) if scales is None else scales
    codes = torch.round(weight.detach().float() / scales.float()).clamp(-qmax, qmax)
    return codes.to(torch.int8), scales


@fp32_region
def int_dequantize(codes, scales):
    return codes.float() * scales.float()


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


def pack_bits(values, bits):
    """Unsigned ints < 2^bits -> bytes, `bits` per value, little-endian bit order (int6: 4 values in 3 bytes)."""
    planes = np.unpackbits(np.asarray(values, dtype=np.uint8).reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data, bits, count):
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * bits].reshape(count, bits)
    return np.packbits(np.pad(planes, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little")[:, 0]


def probe_compressed_size(data):
    """A fast stand-in for the artifact's final codec: brotli quality 5 (lzma preset 1 without brotli). On 768 x 768
    int-k codes it picks what brotli 11 prefers: bytes for int5 / int6, bits for int4 (absmax and SDClip 12.85)."""
    try:
        import brotli
        return len(brotli.compress(data, quality=5))
    except ImportError:
        return len(lzma.compress(data, preset=1))


def pack_small_ints(values, bits):
    """values in [0, 2^bits) as bytes: `bits`-packed or one byte each, whichever compresses smaller (the codec's
    entropy coder does better on byte-aligned codes of int5 / int6; bit-packed int4 wins). Returns (encoding, bytes)."""
    flat = np.asarray(values, dtype=np.uint8).reshape(-1)
    candidates = {"bytes": flat.tobytes()}
    if bits < 8:
        candidates[f"bits{bits}"] = pack_bits(flat, bits)
    return min(candidates.items(), key=lambda item: (probe_compressed_size(item[1]), item[0]))


def unpack_small_ints(encoding, data, count):
    if encoding == "bytes":
        return np.frombuffer(data, dtype=np.uint8)[:count].copy()
    return unpack_bits(data, int(encoding[4:]), count)


class TernaryScheme:
    """BitNet b1.58 ternary codes in {-1, 0, 1} per BITNET_GROUP_SIZE group scale (ternary_quantize), packed base-3
    (5 trits per byte) or as a nonzero bitmask plus signs, whichever is smaller."""
    name, bits = "ternary", math.log2(3)

    def quantize(self, weight, group_size, scale_mult=1.0, threshold=0.5, rotate=False, clip=None):
        return ternary_quantize(weight, group_size, scale_mult, threshold, rotate, clip)

    def dequantize(self, codes, scales, group_size, rotate=False, **_):
        return ternary_dequantize(codes, scales, group_size, rotate)

    def pack(self, codes):
        flat = np.asarray(codes, dtype=np.int8)
        base3, bitmask = pack_base3(flat), pack_bitmask(flat)
        return ("base3", base3) if len(base3) <= len(bitmask) else ("bitmask", bitmask)

    def unpack(self, encoding, data, count):
        return (unpack_base3 if encoding == "base3" else unpack_bitmask)(data, count)


class IntScheme:
    """Symmetric per-row int-k (int_quantize; clip: absmax or SDClip k * std), codes offset to [0, 2 qmax] and
    packed k bits each or one byte each (pack_small_ints)."""

    def __init__(self, bits):
        self.name, self.bits, self.qmax = f"int{bits}", bits, 2 ** (bits - 1) - 1

    def quantize(self, weight, clip_k=0.0, scales=None, **_):
        return int_quantize(weight, self.bits, clip_k, scales)

    def dequantize(self, codes, scales, **_):
        return int_dequantize(codes, scales)

    def pack(self, codes):
        return pack_small_ints(np.asarray(codes, dtype=np.int16) + self.qmax, self.bits)

    def unpack(self, encoding, data, count):
        return (unpack_small_ints(encoding, data, count).astype(np.int16) - self.qmax).astype(np.int8)


class FloatScheme:
    """fp16 (no scales), fp8 e4m3 or fp4 e2m1 with per-row fp16 scales (fp_quantize); fp16 and fp8 codes are stored
    as raw bytes, fp4 codes (0..15) as nibbles or bytes (pack_small_ints)."""

    def __init__(self, name, bits):
        self.name, self.bits = name, bits

    def quantize(self, weight, **_):
        return fp_quantize(weight, self.name)

    def dequantize(self, codes, scales, **_):
        return fp_dequantize(codes, scales, self.name)

    def pack(self, codes):
        if self.name == "fp4":
            return pack_small_ints(np.asarray(codes), 4)
        return "raw", np.ascontiguousarray(codes).tobytes()

    def unpack(self, encoding, data, count):
        if self.name == "fp4":
            return unpack_small_ints(encoding, data, count)
        return np.frombuffer(data, dtype=np.float16 if self.name == "fp16" else np.uint8)[:count].copy()


# One registry of storage schemes: QUANT_ATTN / QUANT_MLP / QUANT_EMBED / QUANT_OTHER name one per tensor class;
# training (the STE forward), export (pack), reload (unpack, dequantize) and the size estimate all go through it.
# (build_submission.py keeps only the entries the QUANT_<CLASS> settings name; a test checks the keys are STORAGE_SCHEMES.)
SCHEMES = {"ternary": TernaryScheme(), "int8": IntScheme(8), "int7": IntScheme(7), "int6": IntScheme(6), "int5": IntScheme(5),
           "int4": IntScheme(4), "fp8": FloatScheme("fp8", 8), "fp4": FloatScheme("fp4", 4), "fp16": FloatScheme("fp16", 16)}


def tensor_scheme(cfg, tensor_class):
    """(scheme name, SDClip k) of a tensor class under the model config."""
    return getattr(cfg, f"quant_{tensor_class}"), clip_k_of(cfg, tensor_class)


def clip_k_of(cfg, tensor_class):
    """GPTQ_SDCLIP_K of a class (missing: 0 = absmax)."""
    return class_values("GPTQ_SDCLIP_K", cfg.gptq_sdclip_k).get(tensor_class, 0.0)


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
    the weight holds the dequantized codes (plus an LQER correction when stored) and is used as is.
    `scale_mult` / `threshold` are export calibration buffers (default: plain absmean rounding)."""

    scheme = "ternary"
    noise_scale = 0.0  # TERNARY_NOISE_SCALE, set by GPT; training-only noise on the latent weight before quantization

    def __init__(self, in_features, out_features, group_size, rotate=False, zero_init=False):
        super().__init__()
        self.group_size, self.rotate, self.frozen, self.lqer = group_size, rotate, False, None
        self.weight = tag(nn.Parameter(torch.empty(out_features, in_features)), "ternary")
        self.register_buffer("scale_mult", torch.ones(()))
        self.register_buffer("threshold", torch.full((), 0.5))
        self.register_buffer("clip_value", torch.full((out_features, 1), math.inf), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=in_features ** -0.5)

    def scheme_params(self):
        return dict(group_size=self.group_size, rotate=self.rotate)

    def quantize(self):
        if self.frozen:
            return self.stored
        return ternary_quantize(self.weight.detach(), self.group_size, self.scale_mult, self.threshold, self.rotate, self.clip_value)

    def effective_weight(self):
        if self.frozen:
            return self.weight
        if self.training and self.noise_scale > 0:
            return StraightThrough.apply(self.weight, ternary_dequantize(*self.noisy_quantize(), self.group_size, self.rotate))
        return StraightThrough.apply(self.weight, ternary_dequantize(*self.quantize(), self.group_size, self.rotate))

    def noisy_quantize(self):
        """Quantize latent + noise_scale * (group absmean) * N(0, 1): codes near a threshold flip at random."""
        latent = self.weight.detach()
        _, scales = ternary_quantize(latent, self.group_size, rotate=self.rotate)
        absmean = scales.float().repeat_interleave(self.group_size, dim=1)[:, :latent.size(1)]
        noisy = latent + self.noise_scale * absmean * torch.randn_like(latent)
        return ternary_quantize(noisy, self.group_size, self.scale_mult, self.threshold, self.rotate)

    def load_quantized(self, codes, scales, lqer=None):
        load_stored(self, codes, scales, lqer)

    def forward(self, x):
        return F.linear(x, self.effective_weight().to(x.dtype))


def lqer_weight(weight, lqer):
    """The frozen weight plus an LQER correction A @ B^T (factors stored fp16; None: none)."""
    if lqer is None:
        return weight
    a, b = lqer
    return weight + a.float() @ b.float().T


@torch.no_grad()
def load_stored(module, codes, scales, lqer=None):
    """Freeze a quantized module on stored codes / scales (and LQER factors): its weight becomes their
    dequantization, exactly what a reload computes."""
    module.stored, module.lqer = (codes, scales), lqer
    dequantized = SCHEMES[module.scheme].dequantize(codes, scales, **module.scheme_params())
    module.weight.data.copy_(lqer_weight(dequantized, lqer))
    module.frozen = True


class Stored(nn.Module):
    """A matrix stored with a non-ternary scheme of SCHEMES. fp16 / fp8 / fp4 train through their rounding at
    every step; int-k trains the latent weight in full precision until QAT_START_FRACTION (the `qat` buffer, set
    by GPT.set_progress), then through its rounding (STE) too."""

    def __init__(self, weight, scheme, route, clip_k=0.0, qat_start=1.0):
        super().__init__()
        self.scheme, self.clip_k, self.frozen, self.lqer = scheme, clip_k, False, None
        self.weight = tag(nn.Parameter(weight), route)
        self.always_rounded = not scheme.startswith("int")
        self.qat_start = qat_start
        self.register_buffer("qat", torch.zeros((), dtype=torch.bool), persistent=False)

    def scheme_params(self):
        return dict(clip_k=self.clip_k)

    def quantize(self):
        if self.frozen:
            return self.stored
        return SCHEMES[self.scheme].quantize(self.weight.detach(), clip_k=self.clip_k)

    def set_progress(self, fraction):
        self.qat.fill_(self.qat_start < 1.0 and fraction >= self.qat_start)

    def effective_weight(self):
        if self.frozen:
            return self.weight
        rounded = SCHEMES[self.scheme].dequantize(*self.quantize(), **self.scheme_params())
        if self.always_rounded:
            return StraightThrough.apply(self.weight, rounded)
        return StraightThrough.apply(self.weight, torch.where(self.qat, rounded, self.weight.detach()))

    def load_quantized(self, codes, scales, lqer=None):
        load_stored(self, codes, scales, lqer)


class StoredLinear(Stored):
    """A linear layer whose weight is Stored (a non-ternary QUANT_<CLASS>), initialized like TernaryLinear."""

    def __init__(self, in_features, out_features, scheme, clip_k=0.0, qat_start=1.0, zero_init=False):
        weight = torch.zeros(out_features, in_features) if zero_init else nn.init.normal_(torch.empty(out_features, in_features), std=in_features ** -0.5)
        super().__init__(weight, scheme, "ternary", clip_k, qat_start)

    def forward(self, x):
        return F.linear(x, self.effective_weight().to(x.dtype))


def quant_linear(cfg, tensor_class, in_features, out_features, zero_init=False):
    """The linear layer of a tensor class: TernaryLinear when its QUANT_<CLASS> is ternary, else a StoredLinear
    with that scheme (and the class's SDClip k)."""
    scheme, clip_k = tensor_scheme(cfg, tensor_class)
    if scheme == "ternary":
        module = TernaryLinear(in_features, out_features, cfg.bitnet_group_size, zero_init=zero_init)
    else:
        module = StoredLinear(in_features, out_features, scheme, clip_k, cfg.qat_start_fraction, zero_init)
    module.tensor_class = tensor_class
    return module


def stored_matrix(cfg, weight, route, tensor_class="embed"):
    """A non-linear-layer matrix (embedding, engram table, router) stored as its class's scheme."""
    scheme, clip_k = tensor_scheme(cfg, tensor_class)
    module = Stored(weight, scheme, route, clip_k, cfg.qat_start_fraction)
    module.tensor_class = tensor_class
    return module


def quantized_modules(model):
    """Every module whose weight an artifact stores by a scheme (ternary linears and Stored matrices)."""
    return [m for m in model.modules() if isinstance(m, (TernaryLinear, Stored))]

# -----------------------------------------------------------------------------------------------------------------
# MODEL: LAYERS
# A block = token mixer (from the MIXERS registry) + MLP, with learned residual scales, a residual mix with the
# embedding x0 and LN damping 1/sqrt(layer+1). A new mixer is one class plus one registry line.
# -----------------------------------------------------------------------------------------------------------------

BOS_ID = 1  # the challenge tokenizers' <s>; one precedes every document


@dataclass
class Context:
    """Per-forward state shared by the layers (never stored on a module): token ids, rotary tables, aux losses
    (each already weighted; the model adds them to the loss), and the training progress (0-d tensor in [0, 1])."""
    input_ids: torch.Tensor
    rope: tuple
    aux_losses: list
    progress: torch.Tensor
    carry: object = None   # capsule-bank state of earlier, already-scored windows in; the bank writes the new one
    sketch: object = None  # feedback sketch of the encoder output, read by the decoder layers
    first_value: torch.Tensor = None  # VRL: the first attention layer's values (B, T, KV, hd)
    doc_mask: torch.Tensor = None  # DOC_ISOLATION: document_mask of the input, built once per forward for every layer
    lora: dict = None  # TTT_MODE=lora: {(module id, "q" | "v" | "proj"): (A (B, in, r), B (B, r, out))} per sequence


def lora_delta(ctx, module, name, x):
    """The per-sequence low-rank update (x A) B of one projection under LoRA TTT (0 without an adapter)."""
    adapter = ctx.lora.get((id(module), name)) if ctx.lora is not None else None
    if adapter is None:
        return 0
    a, b = adapter
    return torch.bmm(torch.bmm(x, a.to(x.dtype)), b.to(x.dtype))


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
FLASH_DEVICE_TYPES = ("cuda",)  # devices flash-attn kernels run on (a test adds "cpu" with a stand-in function)


def attention_dtype(q):
    """The dtype attention computes in: the autocast dtype when autocast is on for q's device (under CUDA autocast
    rms_norm returns fp32, so q's own dtype would say fp32), else q's dtype."""
    device_type = q.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype


def attention_kernel(q):
    """'flash_attn' when flash-attn is installed, runs on q's device and the attention dtype is bf16/fp16; else 'sdpa'."""
    if FLASH_ATTENTION is None or q.device.type not in FLASH_DEVICE_TYPES:
        return "sdpa"
    return "flash_attn" if attention_dtype(q) in (torch.bfloat16, torch.float16) else "sdpa"


def document_mask(input_ids):
    """DOC_ISOLATION: (B, 1, T, T) boolean, True where query t may attend key s: s <= t and no BOS in (s, t], i.e.
    both in the same document (a document starts at its BOS; tokens before a window's first BOS are one document)."""
    documents = (input_ids == BOS_ID).long().cumsum(1)
    T = input_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


def causal_attention(q, k, v, mask=None):
    """q (B, T, H, hd), k/v (B, T, KV, hd) -> (B, T, H, hd). flash-attn (q/k/v cast to the autocast dtype) where
    attention_kernel says so, else SDPA; with a document `mask` (document_mask) SDPA with that mask (flash-attn's
    dense kernel cannot take one)."""
    if mask is not None:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)
    if attention_kernel(q) == "flash_attn":
        dtype = attention_dtype(q)
        out = FLASH_ATTENTION(q.to(dtype), k.to(dtype), v.to(dtype), causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """GQA attention with QK RMSNorm, per-head query gain and partial RoPE; ternary projections."""

    ttt_group = None  # TTT_SCOPE=skc_safe adapts parameters of this group (None: only the scales)

    @staticmethod
    def parallel_residual(cfg):
        """Whether this mixer's layers use the parallel block regardless of PARALLEL_RESIDUAL_START."""
        return False

    @staticmethod
    def extra_flops_per_token(cfg, seq_len):
        """Training FLOPs per token beyond 6 x matmul params: causal attention's QK^T and AV, 6 x width x seq_len
        (PaLM appendix B, halved for the causal mask)."""
        return 6 * cfg.model_dim * seq_len

    def __init__(self, cfg, layer_index):
        super().__init__()
        d, hd = cfg.model_dim, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q = quant_linear(cfg, "attn", d, cfg.num_heads * hd)
        self.k = quant_linear(cfg, "attn", d, cfg.num_kv_heads * hd)
        self.v = quant_linear(cfg, "attn", d, cfg.num_kv_heads * hd)
        self.proj = quant_linear(cfg, "attn", cfg.num_heads * hd, d, zero_init=True)
        self.q_gain = tag(nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init)), "scalar")
        self.xsa = 0 <= cfg.xsa_start_layer <= layer_index
        self.vrl = bool(cfg.vrl_enabled)
        mixes_first_value = self.vrl and layer_index >= cfg.vrl_start_layer
        self.vrl_lambda = tag(nn.Parameter(torch.full((), 0.5)), "scalar") if mixes_first_value else None
        gate_inputs = {"off": 0, "full": d, "sparse": min(cfg.attn_gate_dims, d)}[cfg.attn_gate]
        self.output_gate = tag(nn.Parameter(torch.zeros(cfg.num_heads, gate_inputs)), "scalar") if gate_inputs else None

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q = rms_norm((self.q(x) + lora_delta(ctx, self, "q", x)).view(B, T, self.num_heads, self.head_dim))
        k = rms_norm(self.k(x).view(B, T, self.num_kv_heads, self.head_dim))
        v = (self.v(x) + lora_delta(ctx, self, "v", x)).view(B, T, self.num_kv_heads, self.head_dim)
        if self.vrl:
            v = self.value_residual(v, ctx)
        cos, sin, temperature = ctx.rope
        q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        q = q * (self.q_gain * temperature).to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, ctx.doc_mask)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.output_gate is not None:  # ATTN_GATE: per-head sigmoid gate of the head's output, from x (or its first dims)
            gate = torch.sigmoid(F.linear(x[..., :self.output_gate.size(1)], self.output_gate.to(x.dtype)))
            y = y * gate[..., None].to(y.dtype)
        y = y.reshape(B, T, -1)
        return self.proj(y) + lora_delta(ctx, self, "proj", y)

    def value_residual(self, v, ctx):
        """VRL (Zhou et al. 2024, value residual learning): v = lambda v + (1 - lambda) v_first. The first attention
        layer of the forward pass stores its v in the Context; a first layer that also mixes mixes with itself."""
        if ctx.first_value is None:
            ctx.first_value = v
        if self.vrl_lambda is None:
            return v
        lam = self.vrl_lambda.to(v.dtype)
        return lam * v + (1 - lam) * ctx.first_value


def exclude_self_value(y, v):
    """XSA (exclusive self attention): remove from each head's output y (B, T, H, hd) its component along the
    token's own value direction; GQA query head h uses kv head h // (H / KV)."""
    v = v.repeat_interleave(y.size(2) // v.size(2), dim=2)
    direction = F.normalize(v, dim=-1)
    return y - (y * direction).sum(-1, keepdim=True) * direction


class MLP(nn.Module):
    """Ternary up/down projections with LeakyReLU(0.5)^2 (or relu^2)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.up = quant_linear(cfg, "mlp", cfg.model_dim, hidden)
        self.down = quant_linear(cfg, "mlp", hidden, cfg.model_dim, zero_init=True)
        self.negative_slope = 0.5 if cfg.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, x, ctx=None):
        return self.down(F.leaky_relu(self.up(x), self.negative_slope).square())


SCAN_CHUNK = 8    # time steps per scan chunk: work and memory grow with it, carry levels (log_chunk T) shrink; input-
                  # dependent decay fwd+bwd (CPU, B4 T1024 C256): 4: 42 ms, 8: 105, 16: 222, 32: 402; the old loop 171
SSM_CORRECTION_RANK = 8  # rank of the Koopman SSM layer's low-rank state correction
COUPLING_RANK = 4 # rank of the SKC capsule-coupling matrix


@fp32_region
def chunked_scan(log_decay, inputs, initial, segments=None, chunk=None):
    """Linear recurrence state_t = exp(log_decay_t) * state_{t-1} + inputs_t for every channel, state_{-1} = initial.
    log_decay (C,) (time-invariant) or broadcastable to inputs (B, T, C), initial broadcastable to (B, C) -> states
    (B, T, C), float32. No Python loop over time or chunks (a small graph for torch.compile): T is cut into chunks
    of n; within all chunks at once, local_t = sum_{s<=t} exp(L_t - L_s) inputs_s from a zero state (L = cumulative
    log decay in the chunk; the exponent is masked to s <= t before exp, so nothing overflows); the state entering
    each chunk comes from the same recurrence one level up (chunk totals in, K = T/n steps), then
    state_t = local_t + exp(L_t) * carry. A (C,) decay needs only (n, n, C) weights and one batched matmul.
    `segments` (B, T) document ids: a position starts from a zero state when its id differs from the previous one."""
    B, T, C = inputs.shape
    n = min(max(chunk or SCAN_CHUNK, 2), T)
    K = -(-T // n)
    x = F.pad(inputs.float(), (0, 0, 0, K * n - T)).view(B, K, n, C)
    steps = torch.arange(n, device=inputs.device)
    causal = steps[:, None] >= steps[None, :]                                                   # (t, s): s <= t
    if log_decay.dim() == 1 and segments is None:
        log_decay = log_decay.float()
        weights = torch.exp((steps[:, None] - steps[None, :]).clamp_min(0)[..., None] * log_decay) * causal[..., None]
        local = torch.einsum("tsc,bksc->bktc", weights, x)                                       # (B, K, n, C)
        cumulative, chunk_log_decay, carry_mask, chunk_segments = (steps + 1)[:, None] * log_decay, n * log_decay, 1.0, None
    else:
        cumulative = F.pad(log_decay.float().expand(B, T, C), (0, 0, 0, K * n - T)).view(B, K, n, C).cumsum(2)
        resets = torch.zeros(B, K, n, dtype=torch.long, device=inputs.device)
        if segments is not None:
            padded = torch.cat([segments, segments[:, -1:].expand(B, K * n - T)], 1)
            resets = (padded != torch.cat([padded[:, :1], padded[:, :-1]], 1)).long().view(B, K, n).cumsum(2)
        valid = causal & (resets[..., :, None] == resets[..., None, :])                          # (B, K, n, n)
        exponent = (cumulative[..., :, None, :] - cumulative[..., None, :, :]).masked_fill(~valid[..., None], float("-inf"))
        local = (exponent.exp() * x[:, :, None]).sum(3)
        chunk_log_decay = F.pad(cumulative[:, :-1, -1], (0, 0, 1, 0))                            # (B, K, C)
        carry_mask = (resets == 0).unsqueeze(-1).float()
        chunk_segments = F.pad((resets[:, :-1, -1] > 0).long().cumsum(1), (1, 0)) if segments is not None else None
    initial = initial.float().expand(B, C)[:, None]                                               # (B, 1, C)
    if K == 1:
        carries = initial
    else:  # carry into chunk k = state after chunk k-1: the recurrence over [initial, S_0 .. S_{K-2}]
        chunk_inputs = torch.cat([initial, local[:, :-1, -1]], 1)
        carries = chunked_scan(chunk_log_decay, chunk_inputs, torch.zeros(C, device=inputs.device), chunk_segments, n)
    states = local + carry_mask * cumulative.exp() * carries[:, :, None, :]
    return states.view(B, K * n, C)[:, :T]


def causal_depthwise_conv(x, weight, segments=None):
    """y_t = sum_j weight[:, K-1-j] * x_{t-j}: x (B, T, C), weight (C, K); left zero padding only, so y_t reads
    x_{<=t}. With `segments` (B, T), taps reaching into an earlier document read zero."""
    T, K = x.size(1), weight.size(1)
    y = x * weight[:, -1].to(x.dtype)
    for j in range(1, min(K, T)):
        shifted = F.pad(x, (0, 0, j, 0))[:, :T]
        if segments is not None:
            shifted = shifted * (segments == F.pad(segments, (j, 0), value=-1)[:, :T]).unsqueeze(-1).to(x.dtype)
        y = y + shifted * weight[:, K - 1 - j].to(x.dtype)
    return y


def skc_tag(param, route):
    """Tag a parameter the TTT evaluator's `skc_safe` scope may adapt (SKC decays, conv weights, residual mixes)."""
    param.ttt_group = SKCMixer.ttt_group
    return tag(param, route)


class CapsuleRouter(nn.Module):
    """Routing logits (B, T, N) over N capsules: a frequency-band term (learned table over position t mod block)
    plus a content term (ternary projection of the spectral features)."""

    def __init__(self, cfg):
        super().__init__()
        self.content = quant_linear(cfg, "attn", cfg.model_dim, cfg.skc_num_capsules)
        self.band = tag(nn.Parameter(torch.randn(cfg.skc_block_size, cfg.skc_num_capsules) * 0.1), "scalar")

    def forward(self, features):
        T = features.size(1)
        positions = torch.arange(T, device=features.device) % self.band.size(0)
        return self.content(features).float() + self.band[positions]


class SKCMixer(nn.Module):
    """Spectral Koopman Capsule token mixer. Ternary projection to C = MODEL_DIM spectral channels and a sigmoid
    gate -> per-channel learned-decay scan (decay 0.999 sigmoid(p), learned initial state) -> routing of the
    spectral features to N capsules -> capsules are causal prefix pools (routing-weighted mean of features
    s <= t) evolved by one Koopman step (per-capsule eigenvalues, low-rank coupling of Frobenius norm <= 1,
    gated tanh) -> synthesis back to positions with the same routing -> causal depthwise conv -> normed ternary
    output projection. Every op mixes time only through the scan, cumsums and the left-padded conv."""

    ttt_group = "skc"

    @staticmethod
    def parallel_residual(cfg):
        return bool(cfg.skc_parallel_residual)

    @staticmethod
    def extra_flops_per_token(cfg, seq_len):
        return 0  # the scan, pools and conv are elementwise: O(width) per token, not counted

    def __init__(self, cfg, layer_index):
        super().__init__()
        d, n, k = cfg.model_dim, cfg.skc_num_capsules, cfg.skc_capsule_dim
        self.spectral = quant_linear(cfg, "attn", d, 2 * d)
        self.decay_logit = skc_tag(nn.Parameter(torch.linspace(1.0, 6.0, d)), "scalar")  # decays 0.73 .. 0.997
        self.initial_state = skc_tag(nn.Parameter(torch.zeros(d)), "scalar")
        self.router = CapsuleRouter(cfg)
        self.to_capsule = quant_linear(cfg, "attn", d, k)
        self.eigen_logit = tag(nn.Parameter(torch.linspace(0.5, 3.0, n)), "scalar")  # eigenvalues tanh: 0.46 .. 0.995
        self.coupling_in = tag(nn.Parameter(torch.randn(n, COUPLING_RANK) * 0.1), "scalar")
        self.coupling_out = tag(nn.Parameter(torch.randn(n, COUPLING_RANK) * 0.1), "scalar")
        self.nonlinear_gate = tag(nn.Parameter(torch.zeros(n)), "scalar")
        self.from_capsule = quant_linear(cfg, "attn", k, d)
        self.capsule_mix = skc_tag(nn.Parameter(torch.ones(d)), "scalar")
        self.conv = skc_tag(nn.Parameter(torch.randn(d, cfg.skc_conv_kernel) * cfg.skc_conv_kernel ** -0.5), "scalar")
        self.conv_mix = skc_tag(nn.Parameter(torch.ones(d)), "scalar")
        self.proj = quant_linear(cfg, "attn", d, d, zero_init=True)
        self.amp_ramp = cfg.skc_amp_ramp_fraction if cfg.skc_parallel_residual else 0.0
        self.entropy_weight = cfg.skc_aux_entropy_fraction

    def forward(self, x, ctx):
        signal, gate = self.spectral(x).chunk(2, dim=-1)
        log_decay = math.log(0.999) + F.logsigmoid(self.decay_logit)
        features = chunked_scan(log_decay, torch.sigmoid(gate) * signal, self.initial_state).to(x.dtype)  # (B, T, D)
        logits = self.router(features)                                                                 # (B, T, N)
        routes = logits.softmax(-1)
        if self.entropy_weight > 0:
            entropy = -(routes * logits.log_softmax(-1)).sum(-1).mean()
            ctx.aux_losses.append(self.entropy_weight * entropy)
        capsules = self.evolve(self.pool(routes, self.to_capsule(features).float()))                  # (B, T, N, K)
        synthesis = torch.einsum("btn,btnk->btk", routes, capsules).to(x.dtype)
        y = features + self.capsule_mix.to(x.dtype) * self.from_capsule(synthesis)
        y = y + self.conv_mix.to(x.dtype) * causal_depthwise_conv(y, self.conv)
        out = self.proj(rms_norm(y))
        if self.amp_ramp > 0:
            out = out * (ctx.progress / self.amp_ramp).clamp(max=1.0).to(out.dtype)
        return out

    @staticmethod
    @fp32_region
    def pool(routes, features):
        """Capsule n at t = sum_{s<=t} r_{s,n} f_s / sum_{s<=t} r_{s,n}: routes (B, T, N), features (B, T, K)."""
        mass = routes.cumsum(1).unsqueeze(-1)
        return torch.einsum("btn,btk->btnk", routes, features).cumsum(1) / (mass + 1e-6)

    def evolve(self, capsules):
        """One Koopman step: per-capsule eigenvalue, low-rank coupling scaled to Frobenius norm <= 1, gated tanh."""
        coupling = self.coupling_out @ self.coupling_in.T
        coupling = coupling / coupling.norm().clamp_min(1.0)
        evolved = torch.tanh(self.eigen_logit)[:, None] * capsules + torch.einsum("nm,btmk->btnk", coupling, capsules)
        return evolved + torch.sigmoid(self.nonlinear_gate)[:, None] * torch.tanh(evolved)


class KoopmanSSM(nn.Module):
    """Koopman token mixer: short causal conv on the value, input-dependent decay exp(-softplus(dt)), input gated by
    (1 - decay), the shared chunked scan, a low-rank correction of the state readout, SiLU output gate, normed
    ternary projection. With RESET_SSM_ON_BOS the state and the conv restart at every BOS."""

    ttt_group = None
    parallel_residual = staticmethod(CausalSelfAttention.parallel_residual)
    extra_flops_per_token = staticmethod(SKCMixer.extra_flops_per_token)

    def __init__(self, cfg, layer_index):
        super().__init__()
        d = cfg.model_dim
        self.inp = quant_linear(cfg, "attn", d, 3 * d)  # value, step size, output gate
        self.dt_bias = tag(nn.Parameter(torch.log(torch.expm1(torch.logspace(-3, -1, d)))), "scalar")  # decays 0.999 .. 0.905
        self.conv = tag(nn.Parameter(torch.randn(d, cfg.skc_conv_kernel) * cfg.skc_conv_kernel ** -0.5), "scalar")
        self.correction_down = quant_linear(cfg, "attn", d, SSM_CORRECTION_RANK)
        self.correction_up = quant_linear(cfg, "attn", SSM_CORRECTION_RANK, d, zero_init=True)
        self.proj = quant_linear(cfg, "attn", d, d, zero_init=True)
        self.reset_on_bos = bool(cfg.reset_ssm_on_bos)

    def forward(self, x, ctx):
        segments = (ctx.input_ids == BOS_ID).long().cumsum(1) if self.reset_on_bos else None
        value, dt, gate = self.inp(x).chunk(3, dim=-1)
        value = F.silu(causal_depthwise_conv(value, self.conv, segments))
        step = F.softplus(dt.float() + self.dt_bias)
        states = chunked_scan(-step, -torch.expm1(-step) * value.float(), torch.zeros_like(self.dt_bias), segments)
        states = states.to(x.dtype)
        states = states + self.correction_up(self.correction_down(states))
        return self.proj(rms_norm(states * F.silu(gate)))


MIXERS = {"attn": CausalSelfAttention, "skc": SKCMixer, "koopman_ssm": KoopmanSSM}  # LAYER_KINDS names these

# The mixer kinds each ARCHITECTURE preset uses (build_submission.py keeps only those MIXERS entries; a test checks
# every expansion below stays within them).
ARCHITECTURE_KINDS = {"attn": "attn", "skc": "skc", "koopman_ssm": "koopman_ssm", "hybrid": "attn,koopman_ssm",
                      "competition": "attn,skc"}
ARCHITECTURES = {  # ARCHITECTURE presets: the LAYER_KINDS each expands to
    "attn": lambda cfg: ["attn"] * cfg.num_layers,
    "skc": lambda cfg: ["skc"] * cfg.num_layers,
    "koopman_ssm": lambda cfg: ["koopman_ssm"] * cfg.num_layers,
    "hybrid": lambda cfg: ["attn" if i % 2 == 0 else "koopman_ssm" for i in range(cfg.num_layers)],
    "competition": lambda cfg: ["skc" if i in cfg.skc_layer_indices else "attn" for i in range(cfg.num_layers)],
}


def layer_plan(cfg):
    """The mixer kind of every layer: LAYER_KINDS, or the expansion of the ARCHITECTURE preset (attn when both are
    empty). Unknown kinds, a wrong count, both set, or SKC_LAYERS without ARCHITECTURE=competition are errors."""
    _require(not (cfg.layer_kinds and cfg.architecture), f"LAYER_KINDS={cfg.layer_kinds!r} and ARCHITECTURE={cfg.architecture!r} "
             "are both set: the preset expands to a LAYER_KINDS, so set one of them")
    if cfg.layer_kinds:
        kinds = [kind.strip() for kind in cfg.layer_kinds.split(",")]
        _require(len(kinds) == cfg.num_layers, f"LAYER_KINDS has {len(kinds)} entries but NUM_LAYERS={cfg.num_layers}")
    else:
        preset = cfg.architecture or "attn"
        _require(preset in ARCHITECTURES, f"ARCHITECTURE={preset!r}: choose one of {sorted(ARCHITECTURES)} (or set LAYER_KINDS)")
        kinds = ARCHITECTURES[preset](cfg)
    _require(not cfg.skc_layers or cfg.architecture == "competition", f"SKC_LAYERS={cfg.skc_layers!r} is read only by "
             "ARCHITECTURE=competition; with LAYER_KINDS name the skc layers there")
    unknown = sorted({kind for kind in kinds if kind not in MIXERS})
    _require(not unknown, f"LAYER_KINDS / ARCHITECTURE: unknown mixer kind(s) {unknown}; known: {sorted(MIXERS)}")
    return kinds


def add_layer_scales(module, cfg, layer_index, kind):
    """Per-layer residual scales, residual mix with x0, LN damping, block layout and stochastic-depth probability,
    set on a Block (its own layer) or a LayerScales (a later layer reusing a shared block's mixer and MLP). The
    mixer class says whether the residual mix joins its TTT group and whether the layer is a parallel block."""
    d, mixer = cfg.model_dim, MIXERS[kind]
    module.mixer_scale = tag(nn.Parameter(torch.ones(d)), "scalar")
    module.mlp_scale = tag(nn.Parameter(torch.ones(d)), "scalar")
    module.resid_mix = tag(nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)])), "scalar")
    if mixer.ttt_group:
        module.resid_mix.ttt_group = mixer.ttt_group
    module.parallel = 0 <= cfg.parallel_residual_start <= layer_index or mixer.parallel_residual(cfg)
    module.damping = 1.0 / math.sqrt(layer_index + 1)
    module.drop_prob = cfg.stochastic_depth * layer_index / max(cfg.num_layers - 1, 1)


class LayerScales(nn.Module):
    """The scales of one layer that runs a shared block (SHARED_BLOCKS)."""

    def __init__(self, cfg, layer_index, kind):
        super().__init__()
        add_layer_scales(self, cfg, layer_index, kind)


def branch_keep(x, drop_prob, training):
    """Stochastic depth: per-sample keep mask (B, 1, 1) scaled by 1/(1-p) while training; 1.0 otherwise."""
    if not training or drop_prob <= 0:
        return 1.0
    keep = torch.rand(x.size(0), 1, 1, device=x.device) >= drop_prob
    return keep.to(x.dtype) / (1.0 - drop_prob)


class Block(nn.Module):
    def __init__(self, cfg, layer_index, kind):
        super().__init__()
        self.mixer = MIXERS[kind](cfg, layer_index)
        self.mlp = MLP(cfg)
        add_layer_scales(self, cfg, layer_index, kind)

    def forward(self, x, x0, ctx, scales=None):
        s = self if scales is None else scales
        keep = branch_keep(x, s.drop_prob, self.training)
        mix = s.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        h = rms_norm(x) * s.damping
        if s.parallel:
            return x + keep * (s.mixer_scale.to(x.dtype) * self.mixer(h, ctx) + s.mlp_scale.to(x.dtype) * self.mlp(h, ctx))
        x = x + keep * s.mixer_scale.to(x.dtype) * self.mixer(h, ctx)
        return x + keep * s.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * s.damping, ctx)

# -----------------------------------------------------------------------------------------------------------------
# MODEL: ADD-ONS
# Optional modules that write into the residual stream (GPT.addons) or replace an MLP (MoE). Each is built from
# quant_linear / stored_matrix / tagged scalars, so it trains, exports and reloads like the rest; each is causal.
# -----------------------------------------------------------------------------------------------------------------

def prefix_mean(z):
    """Causal pooling: position t gets the mean of z[:, :t+1]. z (B, T, ...) -> same shape."""
    count = torch.arange(1, z.size(1) + 1, device=z.device, dtype=z.dtype).view(1, -1, *([1] * (z.dim() - 2)))
    return z.cumsum(1) / count


# One hash multiplier per engram table (order, head): the first 12 primes above 10^6 (ENGRAM_NUM_ORDERS <= 3 times
# ENGRAM_NUM_HEADS <= 4); distinct primes decorrelate the tables' collisions.
ENGRAM_PRIMES = (1000003, 1000033, 1000037, 1000039, 1000081, 1000099, 1000117, 1000121, 1000133, 1000151, 1000159, 1000171)


def engram_rows(input_ids, num_orders, num_heads, buckets):
    """(B, T) token ids -> (B, T, num_orders * num_heads) rows of the stacked engram tables. Table j = (order o,
    head h) hashes the (o+1)-gram ending at t (tokens t-o..t, never a later one) with its own prime P_j:
    hash = fold(hash * P_j + token + 1) mod (buckets - 1), bucket = hash + 1. Bucket 0 is reserved for n-grams that
    reach before the window start or cross a document start (a BOS anywhere but the n-gram's oldest token)."""
    B, T = input_ids.shape
    history = [F.pad(input_ids, (i, 0), value=-1)[:, :T] for i in range(num_orders + 1)]  # history[i] = token t-i
    rows = []
    for order in range(1, num_orders + 1):
        reserved = history[order] < 0
        for i in range(order):
            reserved = reserved | (history[i] == BOS_ID)
        for head in range(num_heads):
            j = (order - 1) * num_heads + head
            code = torch.zeros_like(input_ids)
            for i in range(order + 1):
                code = (code * ENGRAM_PRIMES[j] + history[i] + 1) % (buckets - 1)
            rows.append(j * buckets + torch.where(reserved, 0, code + 1))
    return torch.stack(rows, -1)


class EngramHash(nn.Module):
    """Multi-head hashed n-gram embeddings (Engram-style). One table per (order, head), stacked row-wise in one
    FP-stored matrix; lookups are concatenated, projected to the model width by a ternary matrix and added under a
    context gate sigma(scale * cos(hidden, key) + bias), key = a ternary projection of the engram vector and scale
    = 0.1 + 3.9 * sigmoid(param) in (0.1, 4). No train/eval difference."""

    def __init__(self, cfg):
        super().__init__()
        self.orders, self.heads, self.buckets = cfg.engram_num_orders, cfg.engram_num_heads, cfg.bigram_hash_buckets
        tables, width = self.orders * self.heads, self.orders * self.heads * cfg.bigram_hash_dim
        self.tables = stored_matrix(cfg, torch.randn(tables * self.buckets, cfg.bigram_hash_dim) * 0.02, "embed")
        self.value = quant_linear(cfg, "other", width, cfg.model_dim)
        self.key = quant_linear(cfg, "other", width, cfg.model_dim)
        self.gate_scale = tag(nn.Parameter(torch.zeros(())), "scalar")
        self.gate_bias = tag(nn.Parameter(torch.zeros(())), "scalar")
        self.tables.weight.ttt_group = "engram"

    def rows(self, input_ids):
        return engram_rows(input_ids, self.orders, self.heads, self.buckets)

    def row_table(self):
        """The table ENGRAM_PRUNE_MIN_HITS prunes (prune_rows) by count_row_hits."""
        return self.tables

    def count_row_hits(self, input_ids):
        """How often each table row is looked up by these tokens: LongTensor (rows,), for row pruning."""
        return torch.bincount(self.rows(input_ids).flatten(), minlength=self.tables.weight.size(0))

    def forward(self, x, input_ids):
        e = F.embedding(self.rows(input_ids), self.tables.effective_weight()).flatten(2).to(x.dtype)  # (B, T, width)
        value, key = self.value(e), self.key(e)
        scale = 0.1 + 3.9 * torch.sigmoid(self.gate_scale)
        gate = torch.sigmoid(scale * F.cosine_similarity(x, key, dim=-1, eps=1e-6) + self.gate_bias).unsqueeze(-1)
        return gate.to(x.dtype) * value


KOOPMAN_DIAG_MAX = 0.998  # |diag| < 0.999 keeps the linear predictor contractive along its diagonal


class CapsuleBank(nn.Module):
    """Causal capsule bank with Koopman dynamics. Soft-assigns each position's value vector to CAPSULE_NUM capsules
    and prefix-pools them (cumsum: position t sees positions <= t, plus a carry of earlier windows at eval). A
    diagonal + low-rank linear predictor z -> diag*z + L R^T z is applied KOOPMAN_SPECULATIVE_STEPS times to the
    pooled states; a position stops stepping once an update's norm is < KOOPMAN_HALT_THRESHOLD (a tensor mask, the
    same in training and eval). A cold-start gate sigmoid(a log(1 + mass) + b) blends the predicted state with a
    learned prior when a capsule has seen little mass; each position reads the capsules by attention. The
    consistency loss (consistency_loss) trains the predictor on (state_t, state_{t+1}) pairs; it never feeds
    position t's output."""

    def __init__(self, cfg):
        super().__init__()
        d, c, k = cfg.model_dim, cfg.capsule_num, cfg.capsule_dim
        self.capsule_dim, self.steps = k, cfg.koopman_speculative_steps
        self.halt_threshold, self.consistency_weight = cfg.koopman_halt_threshold, cfg.koopman_consistency_weight
        self.assign, self.value = quant_linear(cfg, "other", d, c), quant_linear(cfg, "other", d, k)
        self.query, self.out = quant_linear(cfg, "other", d, k), quant_linear(cfg, "other", k, d)
        self.diag = tag(nn.Parameter(torch.full((k,), 0.9)), "scalar")
        self.left = tag(nn.Parameter(torch.randn(k, cfg.capsule_koopman_rank) * 0.02), "scalar")
        self.right = tag(nn.Parameter(torch.randn(k, cfg.capsule_koopman_rank) * 0.02), "scalar")
        self.prior = tag(nn.Parameter(torch.randn(c, k) * 0.02), "scalar")
        self.gate_scale = tag(nn.Parameter(torch.ones(())), "scalar")
        self.gate_bias = tag(nn.Parameter(torch.zeros(())), "scalar")
        for p in self.parameters():
            p.ttt_group = "capsule_bank"

    @torch.no_grad()
    def post_step(self):
        self.diag.clamp_(-KOOPMAN_DIAG_MAX, KOOPMAN_DIAG_MAX)

    def predict(self, z):
        """One Koopman step on capsule states z (..., k)."""
        return z * self.diag.to(z.dtype) + (z @ self.right.to(z.dtype)) @ self.left.to(z.dtype).T

    def consistency_loss(self, state):
        """Relative one-step prediction error of the pooled states, ||predict(s_t) - s_{t+1}||^2 / ||s_{t+1}||^2 (means
        over positions), with both states detached: it trains the predictor only. With s_t left attached (as it once
        was) a contractive predictor (|diag| < 1) pulls s_t towards s_{t+1} / diag, i.e. up, every step, and the
        states and the loss grow without bound (CPU proxy: train loss 20 at step 200, 122 at 250); a plain MSE also
        grows with the residual's scale. This one is scale-free and stays O(1)."""
        inputs, targets = state[:, :-1].detach(), state[:, 1:].detach()
        return (self.predict(inputs) - targets).square().mean() / targets.square().mean().clamp_min(1e-12)

    def speculate(self, z):
        running = torch.ones_like(z[..., :1], dtype=torch.bool)
        for _ in range(self.steps):
            stepped = self.predict(z)
            running = running & ((stepped - z).norm(dim=-1, keepdim=True) >= self.halt_threshold)
            z = torch.where(running, stepped, z)
        return z

    def pool(self, x, carry):
        """Prefix pools: (state (B, T, C, k), mass (B, T, C), new carry (B, C, k + 1) = sums up to the last position)."""
        assign = torch.softmax(self.assign(x).float(), -1)                               # (B, T, C)
        total = (assign.unsqueeze(-1) * self.value(x).float().unsqueeze(-2)).cumsum(1)   # (B, T, C, k)
        mass = assign.cumsum(1)
        if carry is not None:
            total, mass = total + carry[:, None, :, :-1], mass + carry[:, None, :, -1]
        new_carry = torch.cat([total[:, -1], mass[:, -1, :, None]], -1)
        return total / (mass.unsqueeze(-1) + 1e-3), mass, new_carry

    def forward(self, x, ctx):
        state, mass, ctx.carry = self.pool(x, ctx.carry)
        if self.consistency_weight > 0 and state.size(1) > 1:
            ctx.aux_losses.append(self.consistency_weight * self.consistency_loss(state))
        gate = torch.sigmoid(self.gate_scale * torch.log1p(mass) + self.gate_bias).unsqueeze(-1)
        read = gate * self.speculate(state) + (1 - gate) * self.prior                   # (B, T, C, k)
        query = self.query(x).float()                                                      # (B, T, k)
        weights = torch.softmax((read @ query.unsqueeze(-1)).squeeze(-1) * self.capsule_dim ** -0.5, -1)
        return self.out((weights.unsqueeze(-1) * read).sum(-2).to(x.dtype))


SMEAR_GATE_DIMS = 12  # embedding dims the SmearGate reads (modded-nanogpt's choice)


class SmearGate(nn.Module):
    """SmearGate (modded-nanogpt): each position's embedding adds a gated share of the previous position's,
    x_t + lambda * sigmoid(w . x_t[:12]) * x_{t-1}, with the gate 0 at a BOS (no mixing across documents) and at a
    window's first position. lambda and w start at 0: the model starts without it."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = tag(nn.Parameter(torch.zeros(min(SMEAR_GATE_DIMS, cfg.embed_width))), "scalar")
        self.mix = tag(nn.Parameter(torch.zeros(())), "scalar")

    def forward(self, x, input_ids):
        gate = torch.sigmoid(x[..., :self.weight.numel()] @ self.weight.to(x.dtype)) * (input_ids != BOS_ID).to(x.dtype)
        previous = F.pad(x, (0, 0, 1, 0))[:, :-1]
        return x + self.mix.to(x.dtype) * gate[..., None] * previous


FEEDBACK_SKETCH_DIM = 64  # width of the feedback sketch (capped at MODEL_DIM)


class FeedbackAdapters(nn.Module):
    """Feedback from the encoder to the decoder: sketch = prefix mean (causal) of a ternary projection of the encoder
    output; FEEDBACK_PASSES > 1 refines it, each pass pooling the encoder output plus the read-back of the previous
    sketch. Decoder layer j adds adapter_j(sketch) (small ternary matrix, per-dim scale) to its input."""

    def __init__(self, cfg, num_decoder):
        super().__init__()
        d, s = cfg.model_dim, min(FEEDBACK_SKETCH_DIM, cfg.model_dim)
        self.passes = cfg.feedback_passes
        self.down = quant_linear(cfg, "other", d, s)
        self.refine = quant_linear(cfg, "other", s, d) if self.passes > 1 else None  # built only when used: DDP needs every grad
        self.adapters = nn.ModuleList(quant_linear(cfg, "other", s, d) for _ in range(num_decoder))
        self.scales = tag(nn.Parameter(torch.full((num_decoder, d), 0.1)), "scalar")

    def sketch(self, x):
        sketch = prefix_mean(self.down(x).float())
        for _ in range(self.passes - 1):
            sketch = prefix_mean(self.down(x + self.refine(sketch).to(x.dtype)).float())
        return sketch

    def read(self, sketch, decoder_index):
        return self.scales[decoder_index].to(sketch.dtype) * self.adapters[decoder_index](sketch)


def moe_layer_indices(cfg):
    """The upper round(MOE_LAYER_FRAC * NUM_LAYERS) layers (at least one) when MoE is on."""
    if not cfg.moe_enabled:
        return []
    count = max(1, round(cfg.moe_layer_frac * cfg.num_layers))
    return list(range(cfg.num_layers - count, cfg.num_layers))


class MoEMLP(nn.Module):
    """Mixture of ternary MLP experts with a top-k softmax router (Switch Transformer, Fedus et al. 2021): a token's
    output is sum over its top-k experts of router_prob * expert(x). Before MOE_START_FRACTION of training every
    token uses expert 0 with weight 1 (router warm-up); reloaded models run at progress 1, i.e. routed. Every expert
    runs on every token and is masked (compile-friendly static shapes; all experts in the graph, so DDP never
    waits on an unused parameter); an expert with no tokens gets an exactly-zero gradient, which Muon skips. The
    load-balancing loss E * sum_e f_e P_e (f = fraction of routed assignments, P = mean router prob, both means
    over tokens) is appended with weight MOE_AUX_WEIGHT."""

    def __init__(self, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.moe_num_experts, cfg.moe_top_k
        self.start_fraction, self.aux_weight = cfg.moe_start_fraction, cfg.moe_aux_weight
        self.router = stored_matrix(cfg, torch.randn(cfg.moe_num_experts, cfg.model_dim) * cfg.model_dim ** -0.5, "dense")
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.moe_num_experts))

    def routing(self, x):
        """Router probs (B, T, E) float32 and the 0/1 dispatch mask of each token's top-k experts."""
        probs = torch.softmax(F.linear(x, self.router.effective_weight().to(x.dtype)).float(), -1)
        dispatch = torch.zeros_like(probs).scatter(-1, probs.topk(self.top_k, -1).indices, 1.0)
        return probs, dispatch

    def forward(self, x, ctx):
        probs, dispatch = self.routing(x)
        routed = (ctx.progress >= self.start_fraction).float()
        warmup = F.one_hot(torch.zeros_like(dispatch[..., 0], dtype=torch.long), self.num_experts).float()
        combine = (routed * probs * dispatch + (1 - routed) * warmup).to(x.dtype)
        if self.aux_weight > 0:
            balance = self.num_experts * (dispatch.mean((0, 1)) / self.top_k * probs.mean((0, 1))).sum()
            ctx.aux_losses.append(self.aux_weight * routed * balance)
        return sum(combine[..., e, None] * expert(x) for e, expert in enumerate(self.experts))


def softcap(logits, cap, kind):
    if cap <= 0:
        return logits
    if kind == "tanh":
        return cap * torch.tanh(logits / cap)
    return logits * torch.rsqrt(1.0 + (logits / cap).square())


FUSED_CE_ROWS = 8192  # rows of one chunk of the fused cross-entropy: 8192 x 8192 fp32 logits = 256 MiB at most


def chunk_cross_entropy(hidden, head, targets, cap, kind):
    return F.cross_entropy(softcap(F.linear(hidden, head).float(), cap, kind), targets, reduction="sum")


def chunked_softcap_cross_entropy(hidden, head, targets, cap, kind, rows=FUSED_CE_ROWS):
    """Mean soft-capped cross-entropy of hidden (..., D) against the tied head (V, D), FUSED_CE_ROWS rows at a time;
    each chunk's logits are recomputed in backward (activation checkpointing), not kept."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), rows):
        total = total + torch.utils.checkpoint.checkpoint(chunk_cross_entropy, hidden[i:i + rows], head, targets[i:i + rows],
                                                          cap, kind, use_reentrant=False)
    return total / len(targets)


def configure_ternary(module, cfg):
    """Set TERNARY_NOISE_SCALE and TurboQuant rotation on every TernaryLinear inside `module` (the GPT, or one Block
    built on its own, e.g. by tools/layer_bench.py). Returns the module."""
    for child in module.modules():
        if isinstance(child, TernaryLinear):
            child.noise_scale, child.rotate = cfg.ternary_noise_scale, bool(cfg.turbo_quant_train)
    return module


class GPT(nn.Module):
    """Tied, factorized embedding -> U-Net of blocks (encoder half pushes skips, decoder half adds them back
    through learned skip weights) -> final norm -> tied head with a soft cap. Knows nothing of DDP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.model_dim, cfg.embed_width
        self.tok_emb = stored_matrix(cfg, torch.randn(cfg.vocab_size, e) * 0.005, "embed")
        self.embed_in = stored_matrix(cfg, torch.randn(d, e) * e ** -0.5, "dense") if e != d else None
        self.embed_out = stored_matrix(cfg, torch.randn(e, d) * d ** -0.5, "dense") if e != d else None
        kinds, distinct = layer_plan(cfg), cfg.shared_blocks or cfg.num_layers
        if any(kinds[i] != kinds[i % distinct] for i in range(cfg.num_layers)):
            raise ConfigError(f"SHARED_BLOCKS={cfg.shared_blocks}: layer kinds {kinds} do not repeat with that period; "
                              "choose a period of the layer pattern (e.g. even for hybrid)")
        self.blocks = nn.ModuleList(Block(cfg, i, kinds[i]) for i in range(distinct))
        self.layer_scales = nn.ModuleList(LayerScales(cfg, i, kinds[i]) for i in range(distinct, cfg.num_layers))
        self.recurrence_layers = set(cfg.recurrence_layer_indices)
        self.recurrence_active = cfg.recurrence_start_fraction <= 0
        self.num_encoder = cfg.num_layers // 2
        num_skips = min(self.num_encoder, cfg.num_layers - self.num_encoder)
        self.skip_weights = tag(nn.Parameter(torch.ones(num_skips, d)), "scalar")
        self.skip_gates = tag(nn.Parameter(torch.zeros(num_skips, d)), "scalar") if cfg.unet_skip_gate else None
        self.span = cfg.recurrence_span_indices  # (first, last) layers looped as a block, or None
        self.smear = SmearGate(cfg) if cfg.smear_gate else None
        self.register_buffer("progress", torch.zeros(()), persistent=False)
        cos, sin, self.rope_temperature = self._rope_tables(cfg.train_seq_len, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.engram = EngramHash(cfg) if cfg.bigram_hash_enabled else None
        self.capsules = CapsuleBank(cfg) if cfg.capsule_enabled else None
        self.feedback = FeedbackAdapters(cfg, cfg.num_layers - self.num_encoder) if cfg.feedback_enabled else None
        if cfg.moe_enabled:
            for i in moe_layer_indices(cfg):
                self.blocks[i].mlp = MoEMLP(cfg)
        configure_ternary(self, cfg)

    def set_progress(self, fraction):
        """Training fraction of the budget in [0, 1] (a buffer, so compiled graphs do not recompile); features
        that switch on or ramp with training read it from the Context. A reloaded model runs at 1.0."""
        self.progress.fill_(float(fraction))
        self.recurrence_active = float(fraction) >= self.cfg.recurrence_start_fraction
        for module in self.modules():
            if isinstance(module, Stored):
                module.set_progress(float(fraction))

    def _rope_tables(self, seq_len, device):
        c = self.cfg
        return rope_tables(seq_len, c.rotary_dims, c.rope_base, c.yarn_factor, c.train_seq_len, device)

    def rope(self, seq_len, device):
        """Rotary tables: the precomputed buffers (no state mutated inside a compiled forward), or fresh tables
        for an eval context longer than TRAIN_SEQ_LEN."""
        if seq_len <= self.rope_cos.size(0):
            return self.rope_cos, self.rope_sin, self.rope_temperature
        return self._rope_tables(seq_len, device)

    def post_step(self):
        """Constraints applied after every optimizer step (the TRAIN section calls it)."""
        if self.capsules is not None:
            self.capsules.post_step()

    def hidden(self, input_ids, carry=None, lora=None):
        """(B, T) token ids -> (B, T, D) final hidden states and the list of aux losses (`lora`: Context.lora)."""
        hidden, ctx = self.run_layers(input_ids, carry, lora)
        return hidden, ctx.aux_losses

    def hidden_with_carry(self, input_ids, carry):
        """Like `hidden`, but also returns the capsule-bank state to carry into the next, contiguous window. `carry`
        (None = nothing yet) must come only from earlier windows that are already scored."""
        hidden, ctx = self.run_layers(input_ids, carry)
        return hidden, ctx.carry

    def addons(self, x, layer_index, ctx):
        """Add-ons that write into the residual stream before block `layer_index`: engram at ENGRAM_INJECT_LAYER,
        capsule bank and feedback sketch at the U-Net midpoint, feedback read-back in every decoder layer."""
        if self.engram is not None and layer_index == self.cfg.engram_inject_layer:
            x = x + self.engram(x, ctx.input_ids).to(x.dtype)
        if layer_index == self.num_encoder and self.capsules is not None:
            x = x + self.capsules(x, ctx).to(x.dtype)
        if layer_index == self.num_encoder and self.feedback is not None:
            ctx.sketch = self.feedback.sketch(x)
        if layer_index >= self.num_encoder and self.feedback is not None:
            x = x + self.feedback.read(ctx.sketch, layer_index - self.num_encoder).to(x.dtype)
        return x

    def run_layers(self, input_ids, carry, lora=None):
        ctx = Context(input_ids, self.rope(input_ids.size(1), input_ids.device), [], self.progress, carry, lora=lora,
                      doc_mask=document_mask(input_ids) if self.cfg.doc_isolation else None)
        x = F.embedding(input_ids, self.tok_emb.effective_weight())
        if self.smear is not None:
            x = self.smear(x, input_ids)
        if self.embed_in is not None:
            x = F.linear(x, self.embed_in.effective_weight().to(x.dtype))
        x = x0 = rms_norm(x)
        skips = []
        for i in range(self.cfg.num_layers):
            x = self.addons(x, i, ctx)
            if i >= self.num_encoder and skips and i - self.num_encoder < len(self.skip_weights):
                x = x + self.skip(i - self.num_encoder, skips.pop(), x.dtype)
            x = self.run_layer(i, x, x0, ctx)
            if self.span is not None and i == self.span[1] and self.recurrence_active:
                x = self.run_span(x, x0, ctx)
            if i < self.num_encoder:
                skips.append(x)
        return rms_norm(x), ctx

    def skip(self, j, saved, dtype):
        """The j-th U-Net skip added to a decoder layer: weight * saved, times 2 sigmoid(gate) with UNET_SKIP_GATE (the
        gate starts at 1 and can close the skip)."""
        weighted = self.skip_weights[j].to(dtype) * saved
        if self.skip_gates is None:
            return weighted
        return 2 * torch.sigmoid(self.skip_gates[j]).to(dtype) * weighted

    def run_span(self, x, x0, ctx):
        """RECURRENCE_SPAN: layers first..last run again as a block RECURRENCE_SPAN_LOOPS more times (no add-ons, no
        skips pushed or popped), after their first pass; on from RECURRENCE_START_FRACTION like RECURRENCE_LAYERS."""
        first, last = self.span
        for _ in range(self.cfg.recurrence_span_loops):
            for i in range(first, last + 1):
                x = self.run_layer(i, x, x0, ctx)
        return x

    def run_layer(self, i, x, x0, ctx):
        """Layer i = block i % SHARED_BLOCKS with layer i's scales, run 1 + RECURRENCE_DEPTH times when it is a
        recurrence layer and recurrence is on (a Python flag set by set_progress: one recompile when it flips)."""
        distinct = len(self.blocks)
        block, scales = self.blocks[i % distinct], self.layer_scales[i - distinct] if i >= distinct else None
        repeats = self.cfg.recurrence_depth if self.recurrence_active and i in self.recurrence_layers else 0
        for _ in range(1 + repeats):
            x = block(x, x0, ctx, scales)
        return x

    def head_input(self, hidden):
        """The final hidden states in the embedding's width (through EMBED_DIM's output projection when factorized)."""
        if self.embed_out is not None:
            hidden = F.linear(hidden, self.embed_out.effective_weight().to(hidden.dtype))
        return hidden

    def logits(self, hidden, head_lora=None):
        """Soft-capped tied-head logits (fp32); `head_lora` (A (B, e, r), B (B, r, V)) adds a per-sequence update."""
        hidden = self.head_input(hidden)
        logits = F.linear(hidden, self.tok_emb.effective_weight().to(hidden.dtype))
        if head_lora is not None:
            logits = logits + torch.bmm(torch.bmm(hidden, head_lora[0].to(hidden.dtype)), head_lora[1].to(hidden.dtype))
        return softcap(logits.float(), self.cfg.logit_softcap, self.cfg.softcap_type)

    def token_nll(self, input_ids, target_ids):
        """Per-token negative log-likelihood in nats, (B, T), float32; no aux losses."""
        hidden, _ = self.hidden(input_ids)
        logits = self.logits(hidden)
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def forward(self, input_ids, target_ids):
        """Training loss: mean token NLL plus the aux losses the layers returned (already weighted). FUSED_CE=1 computes
        the NLL in row chunks recomputed in backward, so the (tokens, vocab) fp32 logits never exist at once."""
        hidden, aux_losses = self.hidden(input_ids)
        if self.cfg.fused_ce:
            hidden = self.head_input(hidden)
            head = self.tok_emb.effective_weight().to(hidden.dtype)
            loss = chunked_softcap_cross_entropy(hidden, head, target_ids, self.cfg.logit_softcap, self.cfg.softcap_type)
        else:
            loss = F.cross_entropy(self.logits(hidden).flatten(0, 1), target_ids.flatten())
        return loss + sum(aux_losses) if aux_losses else loss

# -----------------------------------------------------------------------------------------------------------------
# OPTIMIZER
# Muon (momentum + Newton-Schulz orthogonalization, Jordan et al. 2024) for matrices, AdamW for the embedding and
# scalars. PARAM_ROUTES is the one table from a parameter's tag to optimizer, learning rate and weight decay (the
# TrainConfig fields that hold them); every parameter must land in exactly one group.
# -----------------------------------------------------------------------------------------------------------------

PARAM_ROUTES = {
    # tag:      (optimizer, lr field, weight-decay field)
    "ternary": ("muon", "matrix_lr", "muon_wd"),
    "dense": ("muon", "matrix_lr", "muon_wd"),
    "embed": ("adam", "embed_lr", "adam_wd"),
    "scalar": ("adam", "scalar_lr", None),  # never decays; rounded to fp16 once before export (round_scalars_to_fp16)
}


QUINTIC_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),)  # modded-nanogpt's fixed quintic, every step
# Polar Express (Amsel et al. 2025, arXiv:2505.16932): step t's odd quintic is the minimax-optimal one on the interval
# the singular values are in after step t - 1, from [1e-3, 1]; each designed on a 5% wider top and divided by 1.01
# so bf16 rounding cannot push values where the next step blows up. Computed by tools/polar_express.py (Remez
# exchange), checked by tests/test_05_optimizer_schedules.py: in exact arithmetic [1e-3, 1] ends in [0.82, 1.16].
POLAR_EXPRESS_COEFFICIENTS = (
    (7.989073952742234, -21.481593058915635, 14.457084568107346),
    (3.990873006706435, -2.745120203460236, 0.47428533806186796),
    (3.8115447711132036, -2.6322514014181357, 0.4632240015098305),
    (3.260846220923673, -2.2751239778214045, 0.42862892177396156),
    (2.3311398290461987, -1.6120003062524675, 0.36817398359601095),
)
NEWTON_SCHULZ_COEFFICIENTS = {"quintic": QUINTIC_COEFFICIENTS, "polar_express": POLAR_EXPRESS_COEFFICIENTS}


def newton_schulz5(update, steps=5, eps=1e-7, coefficients=QUINTIC_COEFFICIENTS):
    """Odd-quintic Newton-Schulz iteration in bf16 -> approximately the nearest semi-orthogonal matrix (U V^T of the
    SVD): X <- a X + (b G + c G^2) X with G = X X^T, step t using coefficients[t] (the last one repeated)."""
    x = update.bfloat16()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for step in range(steps):
        a, b, c = coefficients[min(step, len(coefficients) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> optional row equilibration (MuonEq-R) -> Newton-Schulz -> shape scale
    sqrt(max(1, rows/cols)). With a process group each rank orthogonalizes every world_size-th matrix and one
    all-reduce shares the updates; at world size 1 it is plain. Weight decay and the update only touch matrices
    whose gradient is nonzero this step (an expert that got no tokens neither decays nor moves)."""

    def __init__(self, params, lr, momentum, backend_steps, row_equilibrate, weight_decay, coefficients=QUINTIC_COEFFICIENTS):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      row_equilibrate=row_equilibrate, weight_decay=weight_decay, coefficients=coefficients))

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
        update = newton_schulz5(update, group["backend_steps"], coefficients=group["coefficients"])
        return update * max(1.0, p.size(0) / p.size(1)) ** 0.5


def build_optimizers(model, train_cfg, fused):
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
        _, lr_name, wd_name = PARAM_ROUTES[route]
        optimizers.append(Muon(params, getattr(train_cfg, lr_name), train_cfg.muon_momentum, train_cfg.muon_backend_steps,
                               train_cfg.muon_eq_r, getattr(train_cfg, wd_name) if wd_name else 0.0,
                               NEWTON_SCHULZ_COEFFICIENTS[train_cfg.muon_ns_coefficients]))
    adam_groups = [dict(params=ps, lr=getattr(train_cfg, PARAM_ROUTES[r][1]),
                        weight_decay=getattr(train_cfg, PARAM_ROUTES[r][2]) if PARAM_ROUTES[r][2] else 0.0)
                   for r, ps in groups.items() if PARAM_ROUTES[r][0] == "adam" and ps]
    if adam_groups:
        optimizers.append(torch.optim.AdamW(adam_groups, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.adam_eps, fused=fused))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"], group["base_weight_decay"] = group["lr"], group["weight_decay"]
    return optimizers

# -----------------------------------------------------------------------------------------------------------------
# SCHEDULES
# Functions of the elapsed fraction of the training wallclock budget, so a 10-minute run gets its whole schedule
# whatever its step time.
# -----------------------------------------------------------------------------------------------------------------

def lr_scale(fraction, warmup_fraction, warmdown_fraction, min_lr=0.0):
    """Linear warm-up over the first `warmup_fraction`, 1.0, then linear warm-down over the last
    `warmdown_fraction` of the budget to `min_lr` (MIN_LR_FRACTION: a floor, 0 = down to zero)."""
    if warmup_fraction > 0 and fraction < warmup_fraction:
        return max(fraction / warmup_fraction, 1e-3)
    if warmdown_fraction > 0 and fraction > 1.0 - warmdown_fraction:
        return min_lr + (1.0 - min_lr) * max((1.0 - fraction) / warmdown_fraction, 0.0)
    return 1.0


def weight_decay_scale(fraction, taper_start):
    """Late weight-decay taper: 1 until `taper_start` (WD_TAPER_START_FRACTION), then linearly to 0 at the end of
    the budget (1 = no taper)."""
    if taper_start >= 1.0 or fraction <= taper_start:
        return 1.0
    return max((1.0 - fraction) / (1.0 - taper_start), 0.0)


def muon_momentum(step, start, end, warmup_steps):
    """Linear momentum warm-up from `start` to `end` over `warmup_steps` optimizer steps."""
    if warmup_steps <= 0:
        return end
    t = min(step / warmup_steps, 1.0)
    return (1 - t) * start + t * end


def curriculum_seq_len(fraction, min_seq_len, full_seq_len, end_fraction):
    """Training sequence length of the curriculum: linear from min_seq_len (fraction 0) to full_seq_len (fraction
    >= end_fraction), rounded down to a power of two and clamped to [min_seq_len, full_seq_len], so a compiled
    model sees only log2(full/min) + 1 shapes. train_step keeps the tokens per step (more, shorter rows)."""
    if fraction >= end_fraction:
        return full_seq_len
    target = min_seq_len + (full_seq_len - min_seq_len) * fraction / end_fraction
    return max(min_seq_len, min(full_seq_len, 2 ** int(math.log2(target))))


@dataclass
class TrainBudget:
    """How long the training loop runs: `loop_seconds` of wallclock (MAX_WALLCLOCK_SECONDS minus the reserve for
    the post-loop work that reads train data), or, with no wallclock budget, ITERATIONS steps."""
    loop_seconds: float
    iterations: int
    reserve_seconds: float = 0.0

    def fraction(self, step, elapsed_seconds):
        """Elapsed fraction of the loop's budget, in [0, 1]: every schedule is a function of it."""
        if self.loop_seconds > 0:
            return min(elapsed_seconds / self.loop_seconds, 1.0)
        return min(step / self.iterations, 1.0)

    def done(self, step, elapsed_seconds):
        return step >= self.iterations or (self.loop_seconds > 0 and elapsed_seconds >= self.loop_seconds)


H100_BF16_PEAK_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak, NVIDIA's datasheet (no sparsity); H200 the same


def flops_per_token(model, seq_len):
    """Training FLOPs per token: 6 x matmul parameters (the tied embedding counts once, as the head) plus what each
    layer's mixer class adds (extra_flops_per_token: causal attention's 6 x width x seq_len)."""
    matmul_params = sum(p.numel() for p in model.parameters() if p.route != "scalar")
    mixers = tuple(MIXERS.values())
    return 6 * matmul_params + sum(m.extra_flops_per_token(model.cfg, seq_len) for m in model.modules() if isinstance(m, mixers))


class EMA:
    """Exponential moving average of the weights with a time constant of `horizon` training fractions, so it means
    the same at 400 steps as at 7,000: a step that advances the training fraction by df decays the shadow by
    exp(-df / horizon) (at 7,000 steps and horizon 0.05: 0.99715 per step, the records' 0.997; a fixed 0.997 at 400
    steps would still give the weights of step 200 55% of the shadow). The shadow starts as a copy of the live
    weights when the training fraction reaches `start_fraction`; `apply_to` copies it into the model exactly once."""

    def __init__(self, horizon, start_fraction):
        self.horizon, self.start_fraction = horizon, start_fraction
        self.shadow, self.applied, self.fraction = None, False, None

    @torch.no_grad()
    def update(self, model, fraction):
        if fraction < self.start_fraction:
            return
        params = [p.detach() for p in model.parameters()]
        if self.shadow is None:
            self.shadow, self.fraction = [p.clone().float() for p in params], fraction
            return
        decay = math.exp(-max(fraction - self.fraction, 0.0) / self.horizon)
        self.fraction = fraction
        torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1.0 - decay)

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
# table, meta: the fitted temperature), then the tensor bytes. Ternary codes are packed base-3 (5 trits per byte) or as a nonzero bitmask plus
# sign bits, whichever is smaller; fp tensors as their stored codes and scales; scalars as fp32. The whole
# payload is compressed with lzma and brotli and the smaller kept. Same weights and config -> same bytes.
# -----------------------------------------------------------------------------------------------------------------

ARTIFACT_MAGIC, ARTIFACT_VERSION = b"SKCA", 1
CODECS = {0: "lzma", 1: "brotli"}


def _raw_part(tensor, kind):
    array = tensor.detach().cpu().contiguous().numpy()
    return dict(encoding="raw", dtype=str(array.dtype), shape=list(array.shape), kind=kind), array.tobytes()


def quantized_parts(module):
    """(entry fields, [(part meta, bytes)]) of one quantized module, by its scheme: packed codes, raw fp16 scales,
    a row bitmap first when rows were pruned (encoding `rowpruned`), LQER factors last when stored."""
    scheme = SCHEMES[module.scheme]
    kind = {"ternary": "ternary"}.get(module.scheme, "int" if module.scheme.startswith("int") else "fp")
    codes, scales = module.quantize()
    keep = getattr(module, "row_keep", None)
    if keep is not None:
        codes, scales = codes[keep], scales[keep] if scales is not None else None
    array = codes.detach().cpu().contiguous().numpy()
    encoding, packed = scheme.pack(array)
    parts = [(dict(encoding=encoding, dtype=str(array.dtype), shape=list(array.shape), kind=f"{kind}_codes"), packed)]
    if scales is not None:
        parts.append(_raw_part(scales, f"{kind}_scales"))
    fields = dict(scheme=module.scheme)
    if keep is not None:
        parts.insert(0, _raw_part(torch.from_numpy(np.packbits(keep.cpu().numpy())), "row_bitmap"))
        fields.update(encoding="rowpruned", rows=len(keep))
    if module.lqer is not None:
        parts += [_raw_part(factor, "lqer") for factor in module.lqer]
        fields.update(lqer=1)
    return fields, parts


def export_parts(model):
    """(header entries, blobs) for every tensor of the model's state dict: quantized modules by their scheme
    (quantized_parts), everything else as scalars (fp16 where exact, else fp32)."""
    entries, blobs, covered = [], [], set()
    for module_name, module in model.named_modules():
        if not isinstance(module, (TernaryLinear, Stored)):
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        fields, parts = quantized_parts(module)
        entries.append(dict(name=name, parts=[meta for meta, _ in parts], **fields))
        blobs += [blob for _, blob in parts]
        covered.add(name)
    for name, tensor in model.state_dict().items():
        if name not in covered:
            value = tensor.detach().float()
            exact = torch.equal(value.half().float(), value)  # lossless either way: fp16 only when it is exact
            meta, blob = _raw_part(value.half() if exact else value, "fp16_scalars" if exact else "fp32")
            entries.append(dict(name=name, scheme="scalar", parts=[meta]))
            blobs.append(blob)
    return entries, blobs


@torch.no_grad()
def round_scalars_to_fp16(model):
    """Round every route-'scalar' parameter (gains, scales, mixes, decays; PARAM_ROUTES) to fp16 in place, once,
    before export, so export_parts stores them as fp16 exactly (half the bytes of fp32) and the reloaded model
    computes what this one does. A tensor that would overflow fp16 stays fp32. Returns the count rounded."""
    rounded = 0
    for p in model.parameters():
        if getattr(p, "route", None) == "scalar" and bool(torch.isfinite(p.half()).all()):
            p.copy_(p.half().float())
            rounded += 1
    return rounded


def serialize_model(model, meta=None):
    """The payload: magic, version, header length, JSON header (model config, tensor table, `meta` such as the
    fitted temperature), tensor bytes."""
    entries, blobs = export_parts(model)
    parts = [part for entry in entries for part in entry["parts"]]
    for part, blob in zip(parts, blobs):
        part["nbytes"] = len(blob)
    header = json.dumps(dict(config=dataclasses.asdict(model.cfg), tensors=entries, meta=meta or {}), sort_keys=True).encode()
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
                codes = SCHEMES[entry["scheme"]].unpack(meta["encoding"], data, int(np.prod(meta["shape"])))
                arrays.append(codes.reshape(meta["shape"]))
        lqer = tuple(arrays[-2:]) if entry.get("lqer") else None
        arrays = arrays[:-2] if lqer else arrays
        if entry.get("encoding") == "rowpruned":
            arrays = unprune_rows(arrays, entry["rows"])
        tensors[entry["name"]] = (entry["scheme"], arrays, lqer)
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


def read_artifact(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ARTIFACT={path} does not exist")
    return path.read_bytes()


def model_from_artifact(blob, label, device):
    """Rebuild the model from an artifact's bytes alone (config included); quantized tensors come back frozen.
    Returns (model, meta); `label` names the artifact in errors."""
    header, tensors = parse_payload(decompress_artifact(blob, label), label)
    model = GPT(ModelConfig.from_artifact(header["config"]))
    modules, state = dict(model.named_modules()), model.state_dict()
    missing = set(state) - set(tensors)
    if missing:
        raise ConfigError(f"artifact {label} lacks tensors {sorted(missing)[:5]}; it was made by another model version")
    with torch.no_grad():
        for name, (scheme, arrays, lqer) in tensors.items():
            if name not in state:
                raise ConfigError(f"artifact {label} has tensor {name} that this model does not; config mismatch")
            arrays = [torch.from_numpy(a) for a in arrays]
            module = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
            if scheme in ("scalar", "fp32"):  # raw tensors ("fp32": artifacts written before fp16 scalars)
                state[name].copy_(arrays[0].view(state[name].shape))
            else:
                lqer = tuple(torch.from_numpy(f) for f in lqer) if lqer else None
                module.load_quantized(arrays[0], arrays[1] if len(arrays) > 1 else None, lqer)
    model.set_progress(1.0)
    return model.to(device), header.get("meta", {})


def load_model_from_artifact(path, device):
    """The model of the artifact file at `path` (see model_from_artifact)."""
    return model_from_artifact(read_artifact(path), path, device)[0]


def export_report(model):
    """Bytes per tensor class of the uncompressed payload (compression is reported separately)."""
    entries, blobs = export_parts(model)
    report = {}
    for meta, blob in zip([m for e in entries for m in e["parts"]], blobs):
        report[meta["kind"]] = report.get(meta["kind"], 0) + len(blob)
    return report


def measure_code_bytes(export_cfg, settings):
    """Bytes of the script that would be submitted for `settings` ({NAME: value}, Config.as_dict()): the built
    (folded, minified, lzma-wrapped) script when build_submission.py is beside this file (build_code: a pure
    function of source text and settings; build_submission.py never imports this file), else this file's own size
    (inside a built submission that is exact)."""
    if export_cfg.code_bytes:
        return export_cfg.code_bytes
    here = Path(__file__).resolve()
    if (here.parent / "build_submission.py").is_file():
        from build_submission import build_code
        return len(build_code(here.read_text(), settings))
    return here.stat().st_size


ESTIMATE_SAMPLE_BYTES = 1 << 18  # per tensor class: 256 KiB gives its compression ratio to about 0.2% (int6 codes)


def sample_compressed_size(data):
    """The estimate's codec: the artifact's own, the smaller of lzma (preset 6: as small as 9e on these samples) and
    brotli quality 11 (about 0.5 s per 256 KiB sample)."""
    sizes = [len(lzma.compress(data, preset=6))]
    try:
        import brotli
        sizes.append(len(brotli.compress(data, quality=11)))
    except ImportError:
        pass
    return min(sizes)


def spread_sample(data, size, pieces=16):
    """`size` bytes of `data` as `pieces` chunks spread evenly over it (all of it when shorter): a class holding
    tensors of different statistics (an int8 embedding before int6 blocks) is sampled across all of them."""
    if len(data) <= size:
        return data
    chunk, step = size // pieces, len(data) // pieces
    return b"".join(data[i * step:i * step + chunk] for i in range(pieces))


def estimate_artifact_bytes(model, export_cfg=None):
    """Artifact size predicted before training (tests/test_train.py checks it lands within 3% of the real one).
    Zero-initialized matrices (output projections) would compress to nothing, which trained weights never do, so
    the estimate serializes a copy in which they are random like the rest; the payload's exact size per part kind
    and scheme is then scaled by the compression ratio (sample_compressed_size) of a sample spread over it. LQER factors
    (LQER_RANK of export_cfg), made at export, add their exact fp16 bytes at the ratio of random fp16 values."""
    probe = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for p in probe.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(std=p.size(1) ** -0.5)
    round_scalars_to_fp16(probe)  # as export_fidelity does before the real export
    entries, blobs = export_parts(probe)
    by_class = {}
    for (meta, scheme), blob in zip([(m, e["scheme"]) for e in entries for m in e["parts"]], blobs):
        by_class.setdefault((meta["kind"], scheme), []).append(blob)
    payload = serialize_model(probe)
    by_class["header"] = [payload[:len(payload) - sum(map(len, blobs))]]  # magic + JSON tensor table
    total = 1  # codec byte
    for parts in by_class.values():
        data = b"".join(parts)
        sample = spread_sample(data, ESTIMATE_SAMPLE_BYTES)
        total += round(len(data) * sample_compressed_size(sample) / max(len(sample), 1))
    if export_cfg is not None and export_cfg.lqer_rank:
        classes, rank = export_cfg.lqer_classes.split(","), export_cfg.lqer_rank
        factor_bytes = sum(2 * rank * sum(m.weight.shape) for m in quantized_modules(probe)
                           if getattr(m, "tensor_class", None) in classes and getattr(m, "row_keep", None) is None)
        sample = torch.randn(ESTIMATE_SAMPLE_BYTES // 2, generator=torch.Generator().manual_seed(0)).half().numpy().tobytes()
        total += round(factor_bytes * sample_compressed_size(sample) / len(sample))
    return total


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


def calibration_tokens(data_path, vocab_size, export_cfg):
    """The last CALIB_TOKENS + 1 train tokens: held out of training (heldout_tokens), never val tokens."""
    return train_tail(data_path, vocab_size, export_cfg.calib_tokens + 1)


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
def calibrate_ternary(model, tokens, export_cfg, batch_seqs, max_seconds=None):
    """Coordinate search, tensor by tensor, over the scale multiplier and/or zero threshold of each ternary layer:
    a candidate is kept only if it lowers the calibration loss, so the loss never rises. Stops at CALIB_MAX_EVALS
    loss evaluations or after `max_seconds` (default CALIB_MAX_SECONDS), whichever comes first."""
    was_training, t0 = model.training, time.perf_counter()
    max_seconds = export_cfg.calib_max_seconds if max_seconds is None else max_seconds
    model.eval()
    loss = lambda: calibration_loss(model, tokens, model.cfg.train_seq_len, batch_seqs)
    base = best = loss()
    evals = 1
    names = [n for n, on in (("scale_mult", export_cfg.ternary_scale_search), ("threshold", export_cfg.ternary_threshold_search)) if on]
    for module in ternary_modules(model):
        for name in names:
            buffer = getattr(module, name)
            kept = float(buffer)
            for value in CALIB_CANDIDATES[name]:
                if evals >= export_cfg.calib_max_evals or time.perf_counter() - t0 >= max_seconds:
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
    if distributed():
        for module in ternary_modules(model):
            for buffer in (module.scale_mult, module.threshold, module.clip_value):
                dist.broadcast(buffer, src=0)


def align_export(model, tokens, export_cfg, batch_seqs, run, log, stage, max_seconds=None):
    """Clip search then calibration on rank 0; the others wait for the broadcast. All ranks call it."""
    if run.is_main and export_cfg.gptq_lite_enabled and export_cfg.ternary_clip_mode != "none":
        log(kv("export_clip", stage=stage, mode=export_cfg.ternary_clip_mode, clipped_tensors=search_clips(model, export_cfg.ternary_clip_mode)))
    if run.is_main and (export_cfg.ternary_scale_search or export_cfg.ternary_threshold_search):
        stats = calibrate_ternary(model, tokens, export_cfg, batch_seqs, max_seconds)
        modules = ternary_modules(model)
        log(kv("export_calib", stage=stage, **stats, mean_scale_mult=sum(float(m.scale_mult) for m in modules) / len(modules),
               mean_threshold=sum(float(m.threshold) for m in modules) / len(modules)))
    broadcast_ternary_buffers(model)


@torch.no_grad()
def prune_rows(model, tokens, min_hits):
    """Every module with a `count_row_hits(input_ids)` method (a Stored table itself, or a module whose row_table()
    is one, as EngramHash's tables): rows hit fewer than `min_hits` times over the tokens (given as one (1, N)
    sequence) are zeroed and marked, so export stores a row bitmap and the kept rows only (encoding `rowpruned`)
    and reload restores the zeros. Returns {module name: rows dropped}."""
    dropped = {}
    for name, module in model.named_modules():
        table = module if isinstance(module, Stored) else module.row_table() if hasattr(module, "row_table") else None
        if hasattr(module, "count_row_hits") and isinstance(table, Stored):
            keep = module.count_row_hits(tokens[None]) >= min_hits
            table.weight[~keep] = 0
            table.row_keep = keep.cpu()
            dropped[name] = int((~keep).sum())
    return dropped


def export_fidelity(model, config, run, log, max_seconds):
    """The hook between the EMA weights and export: scalars rounded to their fp16 storage, then row pruning, clip
    search and calibration (each if enabled; calibration within `max_seconds`), so the export cost (reloaded minus
    pre-export BPB) includes them all. Reads only the held-out train tail, inside the training budget."""
    export_cfg = config.export
    log(kv("export_round", scalars_to_fp16=round_scalars_to_fp16(model)))
    if not (export_cfg.export_search or export_cfg.engram_prune_min_hits):
        return
    tokens = calibration_tokens(config.run.data_path, config.model.vocab_size, export_cfg).to(run.device)
    if export_cfg.engram_prune_min_hits:
        log(kv("export_prune", min_hits=export_cfg.engram_prune_min_hits, **prune_rows(model, tokens, export_cfg.engram_prune_min_hits)))
    align_export(model, tokens, export_cfg, config.eval.eval_batch_seqs, run, log, "final", max_seconds)


# GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize a matrix column by column in the order of its Hessian's
# diagonal, each column's rounding error spread over the columns not yet quantized through the Cholesky factor of
# H^-1, so the layer's output error ||(W - W_hat) X|| is (greedily) minimal, not each weight's. H = sum X^T X over
# calibration inputs. The grid (per-row int-k scales, or ternary group scales) is fixed before the columns move.

def gptq_quantize(weight, hessian, quantize_column, block=128, damp=0.01, act_order=True, stop_after=None):
    """weight (rows, cols), hessian (cols, cols) -> (dequantized W_hat, codes), both (rows, cols) in the original
    column order. quantize_column(w (rows,), j) -> (dequantized (rows,), codes (rows,)) rounds column j of the
    original order onto the fixed grid. damp * mean(diag H) is added to the diagonal (dead inputs, diag 0, get 1
    and a zero column). stop_after=n quantizes only the first n columns in processing order and returns the rest
    compensated but unquantized (the closed-form check of the tests)."""
    W, H = weight.detach().float().clone(), hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(cols, device=H.device)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=H.device)
    W, H = W[:, order], H[order][:, order]
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q, codes = torch.zeros_like(W), torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    limit = cols if stop_after is None else stop_after
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, errors, H1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device), H_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if i1 + i >= limit:
                Q[:, i1 + i:i2] = W1[:, i:]
                break
            q, c = quantize_column(W1[:, i], int(order[i1 + i]))
            Q[:, i1 + i], codes[:, i1 + i] = q, c
            error = (W1[:, i] - q) / H1[i, i]
            W1[:, i:] -= error[:, None] * H1[i, i:][None, :]
            errors[:, i] = error
        W[:, i2:] -= errors @ H_inv[i1:i2, i2:]
        if i2 > limit:
            Q[:, i2:] = W[:, i2:]
            break
    inverse = torch.argsort(order)
    return Q[:, inverse], codes[:, inverse]


def column_quantizer(module, weight):
    """(quantize_column for gptq_quantize, scales) of a module's scheme with its grid fixed from `weight`: int-k
    per-row scales (its clip rule), ternary per-group scales (absmean, its calibrated multiplier and threshold)."""
    if module.scheme == "ternary":
        _, scales = ternary_quantize(weight, module.group_size, module.scale_mult, module.threshold)
        s, group, threshold = scales.float(), module.group_size, float(module.threshold)

        def ternary_column(w, j):
            scale = s[:, j // group]
            code = torch.where(w.abs() > threshold * scale, torch.sign(w), torch.zeros_like(w))
            return code * scale, code.to(torch.int8)
        return ternary_column, scales
    scheme = SCHEMES[module.scheme]
    scales = int_scales(weight, scheme.bits, module.clip_k) if getattr(module, "row_scales", None) is None else module.row_scales
    s = scales.float()[:, 0]

    def int_column(w, j):
        code = torch.round(w / s).clamp(-scheme.qmax, scheme.qmax)
        return code * s, code.to(torch.int8)
    return int_column, scales


GPTQ_CLIP_CANDIDATES = (0.0, 4.0, 6.0, 8.0, 10.0, 12.85, 16.0, 20.0)  # k of SDClip (0 = absmax), for GPTQ_CLIP_SEARCH


def search_row_scales(weight, hessian, bits):
    """GPTQ_CLIP_SEARCH: per row, the clip among GPTQ_CLIP_CANDIDATES whose round-to-nearest error, weighted by the
    inputs' energy diag(H), is least: sum_j H_jj (w_j - q_j)^2. Returns scales (rows, 1) fp16."""
    energy, best, best_error = torch.diag(hessian).float(), None, None
    for k in GPTQ_CLIP_CANDIDATES:
        codes, scales = int_quantize(weight, bits, k)
        error = ((int_dequantize(codes, scales) - weight.float()).square() * energy).sum(1, keepdim=True)
        if best is None:
            best, best_error = scales, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, scales, best), torch.where(better, error, best_error)
    return best


def gptq_targets(model, export_cfg):
    """{name: module} GPTQ quantizes: every unfrozen quantized linear of an int-k scheme (and ternary with
    GPTQ_TERNARY=1, not TurboQuant-rotated ones), and the tied embedding when it is int-k (as the output head)."""
    targets = {}
    for name, module in model.named_modules():
        int_linear = isinstance(module, StoredLinear) and module.scheme.startswith("int")
        ternary = isinstance(module, TernaryLinear) and export_cfg.gptq_ternary and not module.rotate
        if (int_linear or ternary) and not module.frozen:
            targets[name] = module
    if model.tok_emb.scheme.startswith("int") and not model.tok_emb.frozen:
        targets["tok_emb"] = model.tok_emb
    return targets


@torch.no_grad()
def collect_hessians(model, targets, tokens, seq_len, batch_seqs):
    """H = sum x^T x (fp32) of every target's inputs over non-overlapping windows of `tokens`: a forward hook per
    linear, and the head's input (the final hidden state, through embed_out) for the tied embedding."""
    device = next(model.parameters()).device
    hessians = {name: torch.zeros(m.weight.size(1), m.weight.size(1), device=device) for name, m in targets.items()}

    def accumulate(name):
        def hook(module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].size(-1))
            hessians[name].add_(x.T @ x)
        return hook

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in targets.items() if name != "tok_emb"]
    was_training = model.training
    model.eval()
    try:
        n = len(tokens) // seq_len
        x = tokens[:n * seq_len].view(n, seq_len).to(device)
        for i in range(0, n, batch_seqs):
            with autocast(device):
                hidden = model.hidden(x[i:i + batch_seqs])[0]
            if "tok_emb" in targets:
                head_in = model.head_input(hidden)
                head_in = head_in.float().reshape(-1, head_in.size(-1))
                hessians["tok_emb"].add_(head_in.T @ head_in)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return hessians


@torch.no_grad()
def self_generated_tokens(model, count, seq_len, seed):
    """GPTQ_CALIB=selfgen: ceil(count / seq_len) sequences of seq_len tokens the model samples itself (temperature 1)
    from BOS, one token per forward (no cache), concatenated; no data is read. Deterministic for a seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sequences = max(1, -(-count // seq_len))
    was_training = model.training
    model.eval()
    ids = torch.full((sequences, 1), BOS_ID, dtype=torch.long, device=device)
    try:
        for _ in range(seq_len):
            with autocast(device):
                logits = model.logits(model.hidden(ids)[0][:, -1:]).float()[:, 0]
            next_ids = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            ids = torch.cat([ids, next_ids], 1)
    finally:
        model.train(was_training)
    return ids[:, :seq_len].reshape(-1).cpu()


def gptq_calibration_tokens(model, config, run):
    """The calibration tokens of GPTQ: the held-out train tail (GPTQ_CALIB=train, inside the training budget) or
    text the model generates itself (selfgen: no data read at all). Never val."""
    export_cfg = config.export
    if export_cfg.gptq_calib == "selfgen":
        return self_generated_tokens(model, export_cfg.gptq_calib_tokens, config.model.train_seq_len, config.run.seed)
    return train_tail(config.run.data_path, config.model.vocab_size, export_cfg.gptq_calib_tokens + 1)


@torch.no_grad()
def apply_gptq(model, tokens, export_cfg, batch_seqs, log):
    """GPTQ every target (gptq_targets) from Hessians of `tokens`, then freeze it on the GPTQ codes: the model is
    now exactly what the artifact reloads. Returns {name: relative output-error reduction vs round to nearest}."""
    t0 = time.perf_counter()
    targets = gptq_targets(model, export_cfg)
    hessians = collect_hessians(model, targets, tokens, model.cfg.train_seq_len, batch_seqs)
    report = {}
    for name, module in targets.items():
        weight, H = module.weight.detach().float(), hessians[name]
        if export_cfg.gptq_clip_search and module.scheme.startswith("int"):
            module.row_scales = search_row_scales(weight, H, SCHEMES[module.scheme].bits)
        quantize_column, scales = column_quantizer(module, weight)
        W_hat, codes = gptq_quantize(weight, H, quantize_column, export_cfg.gptq_block, export_cfg.gptq_damp)
        rtn = SCHEMES[module.scheme].dequantize(*module.quantize(), **module.scheme_params())
        error = lambda w: float(torch.einsum("ij,jk,ik->", w - weight, H, w - weight))
        report[name] = 1.0 - error(W_hat) / max(error(rtn), 1e-30)
        load_stored(module, codes, scales)
    log(kv("export_gptq", matrices=len(targets), calib_tokens=len(tokens), seconds=time.perf_counter() - t0,
           mean_error_reduction=sum(report.values()) / max(len(report), 1)))
    return report


@torch.no_grad()
def apply_lqer(model, rank, classes, log, reference=None):
    """LQER (low-rank quantization error reconstruction): for every quantized linear of the LQER_CLASSES (or the
    embedding), the rank-r truncated SVD of its quantization error E = W - W_hat, stored as fp16 factors A (rows, r)
    = U S and B (cols, r) = V and added back at reload (W_hat + A B^T): the module is frozen on it. `reference`
    ({module: weight}) gives the weight to reconstruct (default the latent weight). Returns the factor bytes."""
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, (TernaryLinear, Stored)) or getattr(module, "tensor_class", None) not in classes \
                or getattr(module, "row_keep", None) is not None:  # a pruned table's rows are not all stored
            continue
        weight = (reference or {}).get(module, module.weight.detach().float() if not module.frozen else None)
        if weight is None:
            continue
        codes, scales = module.quantize()
        dequantized = SCHEMES[module.scheme].dequantize(codes, scales, **module.scheme_params())
        U, S, Vh = torch.linalg.svd(weight.float() - dequantized, full_matrices=False)
        factors = ((U[:, :rank] * S[:rank]).half(), Vh[:rank].T.contiguous().half())
        load_stored(module, codes, scales, factors)
        total += 2 * (factors[0].numel() + factors[1].numel())
    log(kv("export_lqer", rank=rank, classes=",".join(classes), factor_bytes=total))
    return total


def quantize_for_export(model, config, run, log):
    """On rank 0, which alone exports: GPTQ (GPTQ=1), LQER (LQER_RANK > 0), then every quantized module still
    unfrozen is frozen on its round-to-nearest codes, so the model is exactly what the artifact reloads (an int-k
    matrix trained without QAT ran in full precision until here). Inside the training budget (GPTQ_CALIB=train reads
    the held-out train tail; selfgen reads nothing)."""
    export_cfg = config.export
    if not run.is_main:
        return
    originals = {m: m.weight.detach().float().clone() for m in quantized_modules(model) if not m.frozen} if export_cfg.lqer_rank else None
    if export_cfg.gptq:
        tokens = gptq_calibration_tokens(model, config, run).to(run.device)
        apply_gptq(model, tokens, export_cfg, config.eval.eval_batch_seqs, log)
    if export_cfg.lqer_rank:
        apply_lqer(model, export_cfg.lqer_rank, export_cfg.lqer_classes.split(","), log, originals)
    for module in quantized_modules(model):
        if not module.frozen:
            load_stored(module, *module.quantize())

# -----------------------------------------------------------------------------------------------------------------
# EVAL
# A stage scores every val target exactly once through windows (start, length, first scored offset): plain windows
# are non-overlapping windows of the eval context; sliding windows start every `stride` tokens and score only the
# targets the previous window did not. Stages are the rows of EVAL_STAGES, and one runner (run_eval_stack) does for
# each: eval mode, this rank's share, the budget check, scoring, the all-reduce, BPB and the log line. Scorers:
#   windows  independent windows, a contiguous range of them per rank (the result does not depend on world size);
#   carry    plain windows in order, each starting from the capsule-bank state of the windows before it;
#   stream   chunks of windows in stream order, each rank its own contiguous segment; hooks (EvalHook) see every
#            chunk before it is scored, adjust its log-probs, and learn from it only after it is scored.
# The stream stages share one pass: each stage adds its hook on top of the earlier stream stages' hooks, and all
# are scored from the same forward passes (no stage re-runs another's work). NLL and byte sums are float64; the
# bytes of a target are counted with the token before it (token_bytes). Only scored positions reach the head.
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


def rank_slice(items, rank, world_size):
    per_rank = -(-len(items) // world_size)
    return items[rank * per_rank:(rank + 1) * per_rank]


def rank_segment(num_tokens, rank, world_size):
    """Contiguous part of the stream a rank owns in the stream stages: tokens[first:last + 1], whose targets
    first+1..last the rank scores (and learns from) alone; the segments cover targets 1..num_tokens-1 once."""
    bounds = [(num_tokens - 1) * r // world_size for r in range(world_size + 1)]
    return bounds[rank], bounds[rank + 1]


def chunk_windows(windows, chunk_tokens):
    """Consecutive windows grouped into chunks of >= chunk_tokens scored targets (the last may be shorter)."""
    chunks, current, count = [], [], 0
    for window in windows:
        current.append(window)
        count += window[1] - window[2]
        if count >= chunk_tokens:
            chunks.append(current)
            current, count = [], 0
    return chunks + [current] if current else chunks


def chunk_targets(chunk):
    """Target positions [first, end) a chunk scores (its windows score consecutive disjoint ranges)."""
    start, length, score_from = chunk[0]
    return start + 1 + score_from, chunk[-1][0] + chunk[-1][1] + 1


@dataclass
class EvalContext:
    """What every stage reads: the model, the val tokens (on the device), byte tables, the eval settings, the eval
    context length, this rank, the temperature that divides the logits of the stages after roundtrip, and `forward`
    ((B, T) ids -> (B, T, D) hidden states; model.hidden, compiled on CUDA)."""
    model: nn.Module
    tokens: torch.Tensor
    tables: tuple
    cfg: EvalConfig
    seq_len: int
    run: Dist = field(default_factory=Dist)
    temperature: float = 1.0
    forward: object = None

    @property
    def device(self):
        return self.tokens.device

    @property
    def vocab_size(self):
        return self.model.cfg.vocab_size

    def hidden(self, ids):
        return self.forward(ids) if self.forward is not None else self.model.hidden(ids)[0]


EVAL_ROWS = 4096  # scored positions per log-softmax / hook computation (bounds the (rows, V) temporaries)


@torch.no_grad()
def score_batch(ctx, windows, temperature=1.0, adjusters=()):
    """(1 + len(adjusters), 3) float64 sums of NLL, bytes and scored targets over one forward pass of `windows`:
    row 0 under the model's log-probs (logits / temperature), row j after the first j adjusters' adjust_logprobs.
    Only the scored positions' hidden states go through the head. Every stage scores through this function."""
    totals = torch.zeros(1 + len(adjusters), 3, dtype=torch.float64, device=ctx.device)
    tokens = ctx.tokens
    for length in sorted({w[1] for w in windows}):
        same = [w for w in windows if w[1] == length]
        starts = torch.tensor([s for s, _, _ in same], device=ctx.device)
        offsets = torch.arange(length, device=ctx.device)
        x = tokens[starts[:, None] + offsets[None, :]]
        y = tokens[starts[:, None] + offsets[None, :] + 1]
        keep = offsets[None, :] >= torch.tensor([f for _, _, f in same], device=ctx.device)[:, None]
        with autocast(ctx.device):
            logits = ctx.model.logits(ctx.hidden(x)[keep])
        logits, targets = logits.float() / temperature, y[keep]
        positions = (starts[:, None] + 1 + offsets[None, :])[keep]
        for i in range(0, len(targets), EVAL_ROWS):
            rows = slice(i, i + EVAL_ROWS)
            logp = F.log_softmax(logits[rows], -1)
            totals[0, 0] += -logp.gather(1, targets[rows, None]).squeeze(1).double().sum()
            for j, hook in enumerate(adjusters, 1):
                logp = hook.adjust_logprobs(logp, tokens, positions[rows])
                totals[j, 0] += -logp.gather(1, targets[rows, None]).squeeze(1).double().sum()
        totals[:, 1] += token_bytes(x, y, ctx.tables)[keep].double().sum()
        totals[:, 2] += keep.sum()
    return totals


def stream_ranks(ctx):
    """The ranks that share the work of each chunk of a stream pass: all of them with TTT_MODE=global (every rank
    walks every chunk), else this rank alone (TTT_MODE=segments: each rank streams its own segment)."""
    return ctx.run if ctx.cfg.ttt_mode == "global" else Dist(device=ctx.device)


class EvalHook:
    """A stream stage's hook. Per chunk k of num_chunks (targets [first, end)): before_chunk, then the chunk is
    scored (each batch's log-probs go through adjust_logprobs when `adjusts`), then after_chunk (the only place a
    hook may learn: its targets are all scored). close() runs once at the end, also on an error. With
    TTT_MODE=global every rank sees every chunk (each scores a share of its windows)."""
    adjusts = False

    def before_chunk(self, ctx, k, num_chunks, first, end):
        pass

    def adjust_logprobs(self, logp, tokens, positions):
        return logp

    def after_chunk(self, ctx, first, end, last):
        pass

    def close(self):
        pass


HASH_PRIME = (1 << 40) - 87  # hashes stay below 2^40, so hash * (a multiplier < 2^22) never overflows int64
HASH_MULT = 1_000_003


def context_hashes(tokens, positions, length, salt):
    """Hash of the `length` tokens before each target position: (N,) -> (hash in [0, HASH_PRIME), valid), valid
    where the whole context lies inside `tokens`."""
    h = torch.full_like(positions, salt + 1)
    for j in range(1, length + 1):
        h = (h * HASH_MULT + tokens[(positions - j).clamp_min(0)] + 1) % HASH_PRIME
    return h, positions >= length


class NgramCache(EvalHook):
    """Backoff n-gram model of the already-scored val tokens as hash-bucketed int32 count tensors: per order
    1..NGRAM_MAX_ORDER a context table and a (context, next token) table, filled by scatter_add per chunk. At a
    position, NGRAM_SMOOTHING=backoff: the highest order whose context was seen predicts; its distribution is the
    (context, v) counts over all v divided by their sum, a proper distribution even with hash collisions (a context
    seen once predicts one token with probability 1). interpolated: every order from a uniform p_0 up,
    p_k = (c_k(v) + D p_(k-1)) / (sum_v c_k(v) + D), so a context seen n times weighs n / (n + D). Mixed with the model:
        p = (1 - alpha) p_model + alpha p_ngram,  alpha = min(ALPHA_MAX, ALPHA_BASE + ALPHA_SCALE sigmoid(H - CENTER))
    with H the model's entropy in nats; alpha = 0 where no context was seen."""

    PAIR_MULT = 2654435761
    COUNT_BINS = 8  # NGRAM_ALPHA_MODE=learned: context counts 1, 2-3, 4-7, ..., >= 128
    adjusts = True

    def __init__(self, ctx):
        cfg = ctx.cfg
        self.max_order, self.buckets, self.vocab_size = cfg.ngram_max_order, cfg.ngram_buckets, ctx.vocab_size
        self.alpha = (cfg.ngram_alpha_base, cfg.ngram_alpha_scale, cfg.ngram_entropy_center, cfg.ngram_alpha_max)
        self.interpolated, self.dirichlet = cfg.ngram_smoothing == "interpolated", cfg.ngram_dirichlet
        self.learned = cfg.ngram_alpha_mode == "learned"
        if self.learned:  # per evidence bin and candidate weight: log-likelihood of the scored targets (float64)
            self.grid = torch.tensor(_float_list("NGRAM_ALPHA_GRID", cfg.ngram_alpha_grid), device=ctx.device)
            self.loglik = torch.zeros(self.max_order * self.COUNT_BINS, len(self.grid), dtype=torch.float64, device=ctx.device)
            self.pending = torch.zeros_like(self.loglik)  # this chunk's, added at after_chunk
            self.shared = stream_ranks(ctx).world_size > 1  # ranks score shares of one chunk: sum their evidence
        self.context_counts = torch.zeros(self.max_order, self.buckets, dtype=torch.int32, device=ctx.device)
        self.pair_counts = torch.zeros_like(self.context_counts)

    def _pair_bucket(self, h, next_tokens):
        return (h + (next_tokens + 1) * self.PAIR_MULT) % self.buckets

    def update(self, tokens, positions):
        """Count the targets at `positions` (already scored) under each order's context."""
        targets = tokens[positions]
        for order in range(1, self.max_order + 1):
            h, valid = context_hashes(tokens, positions, order - 1, order)
            h, t = h[valid], targets[valid]
            ones = torch.ones_like(h, dtype=torch.int32)
            self.context_counts[order - 1].scatter_add_(0, h % self.buckets, ones)
            self.pair_counts[order - 1].scatter_add_(0, self._pair_bucket(h, t), ones)

    def after_chunk(self, ctx, first, end, last):
        self.update(ctx.tokens, torch.arange(first, end, device=ctx.device))
        if self.learned:
            self.loglik += all_reduce_sum(self.pending) if self.shared else self.pending
            self.pending.zero_()

    def evidence_bin(self, tokens, positions):
        """(N,) bin of the longest seen context at each position: its order index x COUNT_BINS + log2 of its count
        (capped), -1 where no context was seen."""
        bins = torch.full_like(positions, -1)
        for order in range(self.max_order, 0, -1):
            h, valid = context_hashes(tokens, positions, order - 1, order)
            count = self.context_counts[order - 1][h % self.buckets]
            seen = valid & (bins < 0) & (count > 0)
            level = torch.log2(count.clamp_min(1).float()).floor().long().clamp_max(self.COUNT_BINS - 1)
            bins = torch.where(seen, (order - 1) * self.COUNT_BINS + level, bins)
        return bins

    def learned_alpha(self, logp, probs, tokens, positions):
        """NGRAM_ALPHA_MODE=learned: per position the grid weight with the best log-likelihood of its bin's targets
        scored in earlier chunks; this batch's targets are added to the bin's pending sums (used from the next
        chunk on)."""
        bins = self.evidence_bin(tokens, positions)
        found = bins >= 0
        alpha = torch.where(found, self.grid[self.loglik.argmax(-1)][bins.clamp_min(0)], 0.0)
        targets = tokens[positions][:, None]
        p_model, p_ngram = logp.gather(1, targets).exp().double(), probs.gather(1, targets).double()
        grid = self.grid.double()[None, :]
        loglik = torch.log(((1 - grid) * p_model + grid * p_ngram).clamp_min(1e-300))
        self.pending.index_add_(0, bins[found], loglik[found])
        return alpha

    def predict(self, tokens, positions):
        """(N, V) n-gram distribution at each position and whether any context was seen (N,)."""
        if self.interpolated:
            return self.predict_interpolated(tokens, positions)
        order_index = torch.full_like(positions, -1)
        chosen = torch.zeros_like(positions)
        for order in range(self.max_order, 0, -1):
            h, valid = context_hashes(tokens, positions, order - 1, order)
            seen = valid & (order_index < 0) & (self.context_counts[order - 1][h % self.buckets] > 0)
            order_index = torch.where(seen, order - 1, order_index)
            chosen = torch.where(seen, h, chosen)
        vocab = torch.arange(self.vocab_size, device=positions.device)
        index = order_index.clamp_min(0)[:, None] * self.buckets + self._pair_bucket(chosen[:, None], vocab[None, :])
        rows = self.pair_counts.view(-1)[index].float()
        return rows / rows.sum(-1, keepdim=True).clamp_min(1.0), order_index >= 0

    def predict_interpolated(self, tokens, positions):
        vocab = torch.arange(self.vocab_size, device=positions.device)
        probs = torch.full((len(positions), self.vocab_size), 1.0 / self.vocab_size, device=positions.device)
        found = torch.zeros_like(positions, dtype=torch.bool)
        for order in range(1, self.max_order + 1):
            h, valid = context_hashes(tokens, positions, order - 1, order)
            counts = self.pair_counts[order - 1][self._pair_bucket(h[:, None], vocab[None, :])].float() * valid[:, None]
            probs = (counts + self.dirichlet * probs) / (counts.sum(-1, keepdim=True) + self.dirichlet)
            found |= valid & (self.context_counts[order - 1][h % self.buckets] > 0)
        return probs, found

    def adjust_logprobs(self, logp, tokens, positions):
        """log((1 - alpha) p_model + alpha p_ngram) over the whole vocabulary (N, V)."""
        probs, found = self.predict(tokens, positions)
        if self.learned:
            alpha = self.learned_alpha(logp, probs, tokens, positions)[:, None]
        else:
            base, scale, center, most = self.alpha
            entropy = -(logp.exp() * logp).sum(-1)
            alpha = ((base + scale * torch.sigmoid(entropy - center)).clamp(0.0, most) * found)[:, None]
        return torch.logaddexp(torch.log1p(-alpha) + logp, torch.log(alpha) + torch.log(probs))


CPU_NOTIONAL_MEMORY_BYTES = 4 << 30  # EvalEngram's memory budget on the CPU, where there is no device memory to ask


class EvalEngram(EvalHook):
    """Hashed n-gram -> next-token count tables (orders x heads x buckets x V, fp32), created empty at every
    pass and filled only with already-scored tokens. Per order the context's row is the minimum over the heads'
    rows (count-min sketch) and gives correction(v) = log((count(v) + LAPLACE) / (total + LAPLACE * V)); ALPHA times
    the mean over orders is added to the log-probs where their entropy (nats) exceeds ENTROPY_THRESHOLD, then
    renormalized by a log-softmax."""

    adjusts = True

    def __init__(self, ctx):
        cfg = ctx.cfg
        self.check_memory(cfg, ctx.vocab_size, ctx.device)
        self.orders, self.heads, self.buckets, self.vocab_size = cfg.eval_engram_order_list, cfg.eval_engram_heads, cfg.eval_engram_buckets, ctx.vocab_size
        self.alpha, self.threshold, self.laplace = cfg.eval_engram_alpha, cfg.eval_engram_entropy_threshold, cfg.eval_engram_laplace
        self.counts = torch.zeros(len(self.orders), self.heads, self.buckets, self.vocab_size, device=ctx.device)

    @staticmethod
    def check_memory(cfg, vocab_size, device):
        """Refuse tables larger than EVAL_ENGRAM_MAX_MEMORY_FRACTION of the device memory (CPU: of 4 GiB)."""
        orders = cfg.eval_engram_order_list
        need = len(orders) * cfg.eval_engram_heads * cfg.eval_engram_buckets * vocab_size * 4
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else CPU_NOTIONAL_MEMORY_BYTES
        if need > cfg.eval_engram_max_memory_fraction * memory:
            raise ConfigError(f"EvalEngram tables need {need / 2**30:.2f} GiB ({len(orders)} EVAL_ENGRAM_ORDERS x "
                              f"EVAL_ENGRAM_HEADS={cfg.eval_engram_heads} x EVAL_ENGRAM_BUCKETS={cfg.eval_engram_buckets} x "
                              f"VOCAB_SIZE={vocab_size} x 4 bytes) but EVAL_ENGRAM_MAX_MEMORY_FRACTION="
                              f"{cfg.eval_engram_max_memory_fraction} of {memory / 2**30:.1f} GiB allows "
                              f"{cfg.eval_engram_max_memory_fraction * memory / 2**30:.2f} GiB; lower EVAL_ENGRAM_BUCKETS, "
                              "EVAL_ENGRAM_HEADS or the number of EVAL_ENGRAM_ORDERS")

    def _rows(self, tokens, positions, order_index):
        """Row index (N, heads) into counts.view(-1, V) of each position's context, and validity (N,)."""
        order = self.orders[order_index]
        h, valid = context_hashes(tokens, positions, order - 1, 100 + order)
        heads = torch.arange(self.heads, device=positions.device)
        buckets = ((h[:, None] * (1 + 2 * 40503 * heads) + heads) % HASH_PRIME) % self.buckets
        return (order_index * self.heads + heads) * self.buckets + buckets, valid

    def update(self, tokens, positions):
        targets = tokens[positions]
        for order_index in range(len(self.orders)):
            rows, valid = self._rows(tokens, positions, order_index)
            flat = (rows[valid] * self.vocab_size + targets[valid, None]).flatten()
            self.counts.view(-1).index_add_(0, flat, torch.ones(len(flat), device=flat.device))

    def after_chunk(self, ctx, first, end, last):
        self.update(ctx.tokens, torch.arange(first, end, device=ctx.device))

    def correction(self, tokens, positions):
        table, total = self.counts.view(-1, self.vocab_size), 0.0
        for order_index in range(len(self.orders)):
            rows, valid = self._rows(tokens, positions, order_index)
            counts = table[rows].amin(1)
            smoothed = torch.log((counts + self.laplace) / (counts.sum(-1, keepdim=True) + self.laplace * self.vocab_size))
            total = total + smoothed * valid[:, None]
        return total / len(self.orders)

    def adjust_logprobs(self, logp, tokens, positions):
        entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
        gate = (entropy > self.threshold).float()
        return F.log_softmax(logp + self.alpha * gate * self.correction(tokens, positions), -1)


def ttt_parameters(model, scope, freeze_packed_engram):
    """Parameters TTT_SCOPE adapts: scales = route 'scalar'; skc_safe = scales + the SKC mixer's TTT group;
    capsule_bank = ttt_group 'capsule_bank'; all = everything. Packed engram tables (ttt_group 'engram') are
    excluded when frozen."""
    chosen = []
    for p in model.parameters():
        group = getattr(p, "ttt_group", None)
        if group == "engram" and freeze_packed_engram:
            continue
        scalar = getattr(p, "route", None) == "scalar"
        if (scope == "all" or (scope in ("scales", "skc_safe") and scalar) or (scope == "skc_safe" and group == SKCMixer.ttt_group)
                or (scope == "capsule_bank" and group == "capsule_bank")):
            chosen.append(p)
    if not chosen:
        raise ConfigError(f"TTT_SCOPE={scope} selects no parameter of this model; choose another scope or TTT_ENABLED=0")
    return chosen


class TestTimeTrainer(EvalHook):
    """Legal TTT: after a chunk is scored, SGD with momentum (the buffer persists across chunks) and a grad clip
    on that chunk's targets only (inputs may reach back into earlier, scored tokens; targets never pass the chunk),
    or with TTT_PHASES on every target scored so far (a phase replays the scored prefix). TTT_LR_SCHEDULE=cosine
    lowers the learning rate over the chunks. Only the TTT_SCOPE parameters move; close() puts back every weight,
    requires_grad flag and grad bit-exactly. TTT_MODE=segments: each rank adapts alone on its own segment;
    global: every rank takes a share of each step's sequences and the gradients are summed over ranks, so one
    model adapts on the whole stream, the same on every rank and at every world size."""

    __test__ = False  # not a pytest class

    def __init__(self, ctx):
        self.model, self.cfg, self.seq_len, self.device = ctx.model, ctx.cfg, ctx.seq_len, ctx.device
        self.params = ttt_parameters(self.model, self.cfg.ttt_scope, self.cfg.freeze_packed_engram)
        self.saved = [(p, p.detach().clone(), p.requires_grad, p.grad) for p in self.model.parameters()]
        self.engram = [(p, v) for p, v, _, _ in self.saved if getattr(p, "ttt_group", None) == "engram"]
        chosen = {id(p) for p in self.params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        self.optimizer = torch.optim.SGD(self.params, lr=self.cfg.ttt_lr, momentum=self.cfg.ttt_momentum)
        self.run = stream_ranks(ctx)  # whom a step's work is split over
        self.first_target = None

    def before_chunk(self, ctx, k, num_chunks, first, end):
        self.first_target = first if self.first_target is None else self.first_target
        scale = 0.5 * (1 + math.cos(math.pi * k / num_chunks)) if self.cfg.ttt_lr_schedule == "cosine" else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.ttt_lr * scale

    def after_chunk(self, ctx, first, end, last):
        if not last:  # nothing is scored after the last chunk
            self.adapt(ctx.tokens, self.first_target if self.cfg.ttt_phases else first, end)

    def adapt(self, tokens, first_target, end_target):
        """TTT_EPOCHS passes over targets first_target..end_target-1 in sequences of the eval context, TTT_BATCH_SEQS
        sequences per step (each rank its share of them in global mode)."""
        seq_len, batch_seqs = self.seq_len, self.cfg.ttt_batch_seqs
        starts = [(s, min(seq_len, end_target - 1 - s)) for s in range(first_target - 1, end_target - 1, seq_len)]
        with torch.enable_grad():
            for _ in range(self.cfg.ttt_epochs):
                for i in range(0, len(starts), batch_seqs):
                    self.step(tokens, starts[i:i + batch_seqs])
        if self.cfg.freeze_packed_engram == 2 and any(not torch.equal(p.detach(), v) for p, v in self.engram):
            raise RuntimeError("FREEZE_PACKED_ENGRAM=2: a packed engram table (ttt_group 'engram') changed during TTT")

    def step(self, tokens, batch):
        """One SGD step on `batch` ((start, length) sequences); in global mode this rank computes the gradient of its
        share, weighted by tokens over the whole batch, and the ranks sum them before the clip and the step."""
        total = sum(length for _, length in batch)
        mine = rank_slice(batch, self.run.rank, self.run.world_size)
        for length in sorted({length for _, length in mine}):
            same = [s for s, n in mine if n == length]
            x = torch.stack([tokens[s:s + length] for s in same])
            y = torch.stack([tokens[s + 1:s + length + 1] for s in same])
            with autocast(self.device):
                loss = self.model(x, y)
            (loss * (len(same) * length / total)).backward()
        if self.run.world_size > 1:
            sum_gradients_over_ranks(self.params)
        if self.cfg.ttt_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.ttt_grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.post_step()  # the same constraints as in training (capsule predictor's diagonal clamp)

    @torch.no_grad()
    def close(self):
        for p, value, requires_grad, grad in self.saved:
            p.copy_(value)
            p.requires_grad_(requires_grad)
            p.grad = grad


def sum_gradients_over_ranks(params):
    """All-reduce (sum) the gradients of `params` in one flat buffer (a parameter without a gradient counts zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def stage_stride(ctx, stage):
    return ctx.cfg.sliding_eval_stride if stage.sliding and ctx.cfg.sliding_eval else ctx.seq_len


def batch_size(ctx, stride):
    return ctx.cfg.sliding_batch_size if stride < ctx.seq_len else ctx.cfg.eval_batch_seqs


def score_windows(ctx, stages, windows, temperature, within_budget=None):
    """The windows scorer: batches of independent windows; the budget is asked after the first batch with the
    share of this rank's windows done (the cost of a window does not depend on how many targets it scores)."""
    batch = batch_size(ctx, stage_stride(ctx, stages[0]))
    t0 = time.perf_counter()
    first = score_batch(ctx, windows[:batch], temperature)
    if within_budget is not None and not within_budget(elapsed_since(t0, ctx.device), batch_share(batch, windows)):
        return None
    rest = torch.zeros_like(first)
    for i in range(batch, len(windows), batch):
        rest += score_batch(ctx, windows[i:i + batch], temperature)
    return first + rest


def score_carry(ctx, stages, windows, temperature, within_budget=None, trace=None, carry_enabled=True):
    """The carry scorer: windows in order, window k starting from the capsule-bank state pooled over windows 0..k-1
    of this rank, which are all scored before it (carry_enabled=False: every window starts empty, the plain eval).
    `trace` (a list) gets, per window, ((start, start + length), [(start, end) ranges that fed its carry])."""
    totals, carry, fed = torch.zeros(1, 3, dtype=torch.float64, device=ctx.device), None, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for k, (start, length, score_from) in enumerate(windows):
            x, y = ctx.tokens[start:start + length][None], ctx.tokens[start + 1:start + length + 1][None]
            with autocast(ctx.device):
                hidden, carry_out = ctx.model.hidden_with_carry(x, carry)
                logits = ctx.model.logits(hidden).flatten(0, 1).float() / temperature
                nll = F.cross_entropy(logits, y.flatten(), reduction="none").double()
            keep = torch.arange(length, device=ctx.device) >= score_from
            totals[0] += torch.stack([(nll * keep).sum(), (token_bytes(x, y, ctx.tables)[0].double() * keep).sum(), keep.sum().double()])
            if trace is not None:
                trace.append(((start, start + length), list(fed)))
            if carry_enabled:
                carry, fed = carry_out, fed + [(start, start + length)]
            if k == 0 and within_budget is not None and not within_budget(elapsed_since(t0, ctx.device), 1 / len(windows)):
                return None
    if not windows and within_budget is not None and not within_budget(0.0, 1.0):  # every rank asks once
        return None
    return totals


def score_stream(ctx, stages, windows, temperature, within_budget=None, observers=()):
    """The stream scorer, one pass for all the stream `stages`: chunks of >= TTT_CHUNK_TOKENS scored targets (or
    TTT_PHASES + 1 equal phases) in order; each stage's hook is built at the start, sees each chunk (observers first,
    then the stages' hooks in table order) and closes at the end. TTT_MODE=global: every rank walks every chunk and
    scores a contiguous share of its windows. Row i of the result is stage i's sums: the log-probs after the
    adjusting hooks of stages 0..i. The budget is asked after the first chunk with its share of the windows."""
    hooks = [stage.hook(ctx) for stage in stages]
    adjusters = [hook for hook in hooks if hook.adjusts]
    rows = [sum(hook.adjusts for hook in hooks[:i + 1]) for i in range(len(hooks))]
    chunks = chunk_windows(windows, stream_chunk_tokens(ctx.cfg, windows))
    batch = batch_size(ctx, stage_stride(ctx, stages[0]))
    split = stream_ranks(ctx)
    totals = torch.zeros(1 + len(adjusters), 3, dtype=torch.float64, device=ctx.device)
    try:
        for k, chunk in enumerate(chunks):
            t0 = time.perf_counter()
            first, end = chunk_targets(chunk)
            for hook in (*observers, *hooks):
                hook.before_chunk(ctx, k, len(chunks), first, end)
            mine = rank_slice(chunk, split.rank, split.world_size)
            for i in range(0, len(mine), batch):
                totals += score_batch(ctx, mine[i:i + batch], temperature, adjusters)
            for hook in (*observers, *hooks):
                hook.after_chunk(ctx, first, end, k == len(chunks) - 1)
            if k == 0 and within_budget is not None and not within_budget(elapsed_since(t0, ctx.device), len(chunk) / len(windows)):
                return None
        if not chunks and within_budget is not None and not within_budget(0.0, 1.0):  # every rank asks once
            return None
    finally:
        for hook in hooks:
            hook.close()
    return totals[rows]


def document_spans(tokens):
    """The documents of a token stream as (first, last): inputs tokens[first:last], targets first+1..last. A document
    starts at its BOS (the tokens before the first BOS are one too) and its last target is the next document's BOS
    (or the stream's last token), so the spans score targets 1..len(tokens)-1 exactly once."""
    starts = sorted({0, *(torch.nonzero(tokens == BOS_ID).flatten().tolist())})
    ends = starts[1:] + [len(tokens) - 1]
    return [(first, last) for first, last in zip(starts, ends) if last > first]


def chunk_target_range(span, c, chunk):
    """Targets [a, b) of chunk c of a document: `chunk` of them from first+1+c*chunk on (fewer at the end)."""
    first, last = span
    a = first + 1 + c * chunk
    return a, min(a + chunk, last + 1)


def document_chunk(span, c, chunk, seq_len):
    """Chunk c of a document as a window (start, length, score_from): it scores targets chunk_target_range from at
    most seq_len tokens of the same document before each (chunk <= seq_len)."""
    a, b = chunk_target_range(span, c, chunk)
    start = max(span[0], b - 1 - seq_len)
    return start, b - 1 - start, a - 1 - start


def lora_targets(model, cfg):
    """{key: (in, out)} of the adapters of TTT_MODE=lora: q, v and proj of every attention layer, and the head
    ("head") with TTT_LORA_HEAD=1. Keys are those Context.lora / lora_delta look up."""
    d, shapes = model.cfg.model_dim, {}
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            q_out, kv_out = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
            shapes.update({(id(module), "q"): (d, q_out), (id(module), "v"): (d, kv_out), (id(module), "proj"): (q_out, d)})
    if cfg.ttt_lora_head:
        vocab, width = model.tok_emb.effective_weight().shape
        shapes["head"] = (width, vocab)
    if not shapes:
        raise ConfigError("TTT_MODE=lora: this model has no attention layer and TTT_LORA_HEAD=0, so no adapter to train; "
                          "set TTT_LORA_HEAD=1 or choose TTT_MODE=segments")
    return shapes


class DocumentAdapters:
    """Rank-r LoRA adapters for a batch of documents: per key, A (n, in, r) ~ N(0, 1/in) drawn from the document's
    own seed and B (n, r, out) = 0, so every document starts at the artifact's predictions; one Adam over them
    (elementwise, so each document's adapter moves only on its own gradient)."""

    def __init__(self, shapes, doc_ids, rank, lr, device):
        self.params = {}
        for j, (key, (fan_in, fan_out)) in enumerate(shapes.items()):
            a = torch.stack([torch.randn(fan_in, rank, generator=torch.Generator().manual_seed(doc * 1009 + j)) for doc in doc_ids])
            self.params[key] = (a.div_(math.sqrt(fan_in)).to(device).requires_grad_(),
                                torch.zeros(len(doc_ids), rank, fan_out, device=device, requires_grad=True))
        self.optimizer = torch.optim.Adam([p for pair in self.params.values() for p in pair], lr=lr)

    def select(self, rows):
        """(Context.lora of the documents `rows`, their head adapter or None)."""
        picked = {key: (a[rows], b[rows]) for key, (a, b) in self.params.items()}
        return picked, picked.pop("head", None)


def score_documents(ctx, stages, windows, temperature, within_budget=None, trace=None):
    """The documents scorer of TTT_MODE=lora: every document of val on its own (doc-isolated context, at most the
    eval context long), TTT_LORA_BATCH_DOCS documents in parallel, each in chunks of TTT_LORA_CHUNK targets: chunk
    c is scored with the adapters as chunk c-1 left them, then the adapters take TTT_EPOCHS Adam steps on chunk c's
    targets only; new adapters at each document (its BOS). Documents are dealt to the ranks by length (the result
    does not depend on world size). `trace` (a list) gets ("score" | "train", document, (first, end) targets)."""
    cfg, model, seq_len = ctx.cfg, ctx.model, ctx.seq_len
    spans = sorted(document_spans(ctx.tokens), key=lambda span: span[0] - span[1])  # longest first: similar lengths batch
    mine = list(range(ctx.run.rank, len(spans), ctx.run.world_size))
    shapes, chunk = lora_targets(model, cfg), min(cfg.ttt_lora_chunk, seq_len)
    for p in model.parameters():
        p.requires_grad_(False)
    totals = torch.zeros(1, 3, dtype=torch.float64, device=ctx.device)
    my_tokens = sum(spans[i][1] - spans[i][0] for i in mine)
    for b0 in range(0, len(mine), cfg.ttt_lora_batch_docs):
        t0 = time.perf_counter()
        docs = mine[b0:b0 + cfg.ttt_lora_batch_docs]
        adapters = DocumentAdapters(shapes, docs, cfg.ttt_lora_rank, cfg.ttt_lora_lr, ctx.device)
        num_chunks = [-(-(spans[d][1] - spans[d][0]) // chunk) for d in docs]
        for c in range(max(num_chunks)):
            rows = [i for i, n in enumerate(num_chunks) if n > c]
            learn = torch.tensor([num_chunks[i] > c + 1 for i in rows], device=ctx.device)
            steps = cfg.ttt_epochs if bool(learn.any()) else 0  # nothing of a document is scored after its last chunk
            for epoch in range(max(1, steps)):
                nll, keep, x, y = document_chunk_nll(ctx, spans, [docs[i] for i in rows], c, chunk, adapters.select(rows), temperature, steps > 0)
                if epoch == 0:  # scored before this chunk's first step
                    totals[0] += torch.stack([(nll.detach().double() * keep).sum(), (token_bytes(x, y, ctx.tables).double() * keep).sum(), keep.sum().double()])
                    if trace is not None:
                        trace.extend(("score", docs[i], chunk_target_range(spans[docs[i]], c, chunk)) for i in rows)
                if steps == 0:
                    break
                per_doc = (nll * keep).sum(1) / keep.sum(1).clamp_min(1)
                (per_doc * learn).sum().backward()
                adapters.optimizer.step()
                adapters.optimizer.zero_grad(set_to_none=True)
                if trace is not None:
                    trace.extend(("train", docs[i], chunk_target_range(spans[docs[i]], c, chunk)) for i, l in zip(rows, learn.tolist()) if l)
        if b0 == 0 and within_budget is not None:
            done = sum(spans[d][1] - spans[d][0] for d in docs) / max(my_tokens, 1)
            if not within_budget(elapsed_since(t0, ctx.device), done):
                return None
    if not mine and within_budget is not None and not within_budget(0.0, 1.0):  # every rank asks once
        return None
    return totals


def document_chunk_nll(ctx, spans, docs, c, chunk, lora, temperature, grad):
    """Per-position NLL (n, L) of chunk c of `docs` under their adapters (right-padded windows: causal attention
    keeps the padding out of real positions), the scored-position mask, inputs and targets; with a graph when `grad`."""
    windows = [document_chunk(spans[d], c, chunk, ctx.seq_len) for d in docs]
    width = max(length for _, length, _ in windows)
    offsets = torch.arange(width, device=ctx.device)
    starts = torch.tensor([s for s, _, _ in windows], device=ctx.device)
    lengths = torch.tensor([n for _, n, _ in windows], device=ctx.device)
    score_from = torch.tensor([f for _, _, f in windows], device=ctx.device)
    index = (starts[:, None] + offsets[None, :]).clamp_max(len(ctx.tokens) - 2)
    x, y = ctx.tokens[index], ctx.tokens[index + 1]
    keep = (offsets[None, :] >= score_from[:, None]) & (offsets[None, :] < lengths[:, None])
    with torch.set_grad_enabled(grad), autocast(ctx.device):
        hidden = ctx.model.hidden(x, lora=lora[0])[0]
        logits = ctx.model.logits(hidden, head_lora=lora[1]).float() / temperature
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    return nll, keep, x, y


def score_ttt(ctx, stages, windows, temperature, within_budget=None):
    """The TTT stage's scorer: the documents scorer for TTT_MODE=lora, else the stream scorer (with the stream
    stages after it sharing the pass)."""
    if ctx.cfg.ttt_mode == "lora":
        return score_documents(ctx, stages, windows, temperature, within_budget)
    return score_stream(ctx, stages, windows, temperature, within_budget)


@dataclass(frozen=True)
class EvalStage:
    """One row of the eval table: its name, the EvalConfig field that switches it on (None: always on), its scorer,
    the hook a stream stage adds (stream stages share one pass), and whether it uses sliding windows when
    SLIDING_EVAL=1. A new stage is a hook class, one row and one flag."""
    name: str
    flag: str
    scorer: object
    hook: type = None
    sliding: bool = True

    @property
    def streams(self):
        return self.hook is not None


EVAL_STAGES = (  # in this fixed order; the reported val_bpb is the last enabled stage's, declared before any eval
    EvalStage("roundtrip", None, score_windows, sliding=False),  # the reloaded artifact, plain windows, temperature 1
    EvalStage("sliding", "sliding_eval", score_windows),
    EvalStage("capsule_carry", "capsule_carry_eval", score_carry, sliding=False),
    EvalStage("ttt", "ttt_enabled", score_ttt, TestTimeTrainer),
    EvalStage("ngram", "ngram_cache_enabled", score_stream, NgramCache),
    EvalStage("evalengram", "eval_engram_enabled", score_stream, EvalEngram),
)


def eval_plan(eval_cfg):
    """The enabled stages, in table order."""
    return [stage for stage in EVAL_STAGES if stage.flag is None or getattr(eval_cfg, stage.flag)]


def stream_chunk_tokens(eval_cfg, windows):
    """Scored targets per chunk of the stream: TTT_CHUNK_TOKENS, or with TTT_PHASES = P the targets split in P + 1
    equal phases (the model adapts P times, each time on the whole scored prefix)."""
    if not eval_cfg.ttt_phases:
        return eval_cfg.ttt_chunk_tokens
    targets = sum(length - score_from for _, length, score_from in windows)
    return max(1, -(-targets // (eval_cfg.ttt_phases + 1)))


def elapsed_since(t0, device):
    synchronize(device)
    return time.perf_counter() - t0


def batch_share(batch, windows):
    """The share of a rank's windows the first batch holds (1 for a rank without windows)."""
    return min(batch, len(windows)) / len(windows) if windows else 1.0


def stage_share(ctx, stage):
    """This rank's share of a stage: (context, windows). windows / carry: a contiguous range of the stage's windows;
    stream: all windows of the rank's contiguous token segment (TTT and caches run in stream order, so the
    segments cannot interleave), with the context's tokens cut to that segment; with TTT_MODE=global all windows
    (the scorer shares each chunk out); with TTT_MODE=lora none (score_documents shares the documents out)."""
    run = ctx.run
    if stage.streams and ctx.cfg.ttt_mode == "lora":
        return ctx, []  # score_documents splits the documents over the ranks itself
    if stage.streams and ctx.cfg.ttt_mode == "global":
        return ctx, eval_windows(len(ctx.tokens), ctx.seq_len, stage_stride(ctx, stage))
    if stage.streams:
        first, last = rank_segment(len(ctx.tokens), run.rank, run.world_size)
        ctx = dataclasses.replace(ctx, tokens=ctx.tokens[first:last + 1])
        return ctx, eval_windows(len(ctx.tokens), ctx.seq_len, stage_stride(ctx, stage))
    return ctx, rank_slice(eval_windows(len(ctx.tokens), ctx.seq_len, stage_stride(ctx, stage)), run.rank, run.world_size)


def budget_check(eval_cfg, run, elapsed_s, stages, log):
    """The EVAL_MAX_SECONDS rule as a callable (seconds, fraction_done) -> keep going?, or None when there is no
    budget. Every rank must call it exactly once (it all-reduces the projection, the max over ranks)."""
    if eval_cfg.eval_max_seconds <= 0:
        return None

    def within_budget(seconds, fraction):
        # one decision for all ranks: the max over ranks of (own elapsed + own projection), so no rank skips alone
        mine = torch.tensor([elapsed_s + seconds / max(fraction, 1e-12), elapsed_s], dtype=torch.float64, device=run.device)
        finish_s, elapsed = all_reduce_max(mine).tolist()
        if finish_s <= eval_cfg.eval_max_seconds:
            return True
        for stage in stages:
            log(kv("eval_skip", stage=stage, projected_s=finish_s - elapsed, budget_s=eval_cfg.eval_max_seconds, elapsed_s=elapsed))
        return False
    return within_budget


def run_stage_group(ctx, stages, elapsed_s, log):
    """Run one stage (or the stream stages' shared pass) on every rank: eval mode, the rank's share, the budget
    check (never for roundtrip), the scorer, the all-reduce. Returns {stage name: result dict} ({} when skipped)."""
    model, was_training = ctx.model, ctx.model.training
    temperature = 1.0 if stages[0].name == "roundtrip" else ctx.temperature
    budget = None if stages[0].name == "roundtrip" else budget_check(ctx.cfg, ctx.run, elapsed_s, [s.name for s in stages], log)
    share, windows = stage_share(ctx, stages[0])
    t0 = time.perf_counter()
    model.eval()
    try:
        totals = stages[0].scorer(share, stages, windows, temperature, budget)
    finally:
        model.train(was_training)
    if totals is None:
        return {}
    totals, seconds = all_reduce_sum(totals), time.perf_counter() - t0
    return {stage.name: dict(val_loss=float(row[0] / row[2]), val_bpb=bits_per_byte(row[0], row[1]), tokens=int(row[2]),
                             eval_s=seconds, pass_name=stages[0].name) for stage, row in zip(stages, totals)}


def run_eval_stack(ctx, log, truncation=None):
    """Every stage of the plan in table order (the stream stages in one shared pass); a stage whose projected time
    (after its first batch, window or chunk) would pass EVAL_MAX_SECONDS is skipped with an `eval_skip` line; the
    roundtrip always runs. Returns {stage: dict(val_loss, val_bpb, tokens, eval_s, pass_name)}."""
    plan, results, start = eval_plan(ctx.cfg), {}, time.perf_counter()
    groups = [[stage] for stage in plan if not stage.streams] + [[stage for stage in plan if stage.streams]]
    for group in filter(None, groups):
        for name, result in run_stage_group(ctx, group, time.perf_counter() - start, log).items():
            results[name] = result
            rate = result["tokens"] / max(result["eval_s"], 1e-9)
            log(kv("eval", stage=name, val_loss=result["val_loss"], val_bpb=result["val_bpb"], eval_s=result["eval_s"],
                   tokens=result["tokens"], tok_s=int(rate), tok_s_gpu=int(rate / ctx.run.world_size), pass_name=result["pass_name"],
                   **projection_note(result["eval_s"], result["tokens"], ctx.run), **(truncation or {})))
    if ctx.run.device.type == "cuda":
        passes = {r["pass_name"]: r for r in results.values()}  # a shared pass counts once
        projected = sum(eval_projection_seconds(r["eval_s"], r["tokens"], ctx.run.world_size) for r in passes.values())
        log(kv("eval_projection", stages=",".join(results), official_val_tokens=OFFICIAL_VAL_TOKENS, gpus=PROJECTION_GPUS,
               projected_s=projected, limit_s=600))
    return results


OFFICIAL_VAL_TOKENS = 40_500_000  # sp8192 tokens of the official FineWeb val split (about; the figure of issue 4)
PROJECTION_GPUS = 8                # the competition machine: 8 GPUs of the kind this run is on


def eval_projection_seconds(seconds, tokens, world_size):
    """A stage's time on the official val split over PROJECTION_GPUS GPUs: every stage costs a fixed amount per
    scored token and splits over ranks without communication, so time scales with tokens / GPUs (an estimate)."""
    return seconds * OFFICIAL_VAL_TOKENS / max(tokens, 1) * world_size / PROJECTION_GPUS


def projection_note(seconds, tokens, run):
    """`proj_8gpu_official_s` on CUDA only: a CPU timing says nothing about the competition machine."""
    if run.device.type != "cuda":
        return {}
    return {"proj_8gpu_official_s": eval_projection_seconds(seconds, tokens, run.world_size)}


def truncation_note(run_cfg):
    return {"val_max_tokens": run_cfg.val_max_tokens, "WARNING": "val_split_truncated"} if run_cfg.val_max_tokens else {}


@torch.no_grad()
def temperature_nll(model, tokens, seq_len, batch_seqs, device, temperatures):
    """Mean NLL (nats) of plain windows over `tokens` at each temperature, from one forward pass."""
    temps = torch.tensor(list(temperatures), dtype=torch.float32, device=device)
    sums, count = torch.zeros(len(temps), dtype=torch.float64, device=device), 0
    tokens = tokens.to(device)
    windows = eval_windows(len(tokens), seq_len, seq_len)
    for i in range(0, len(windows), batch_seqs):
        for length in sorted({w[1] for w in windows[i:i + batch_seqs]}):
            starts = [s for s, n, _ in windows[i:i + batch_seqs] if n == length]
            x = torch.stack([tokens[s:s + length] for s in starts])
            y = torch.stack([tokens[s + 1:s + length + 1] for s in starts]).flatten()
            with autocast(device):
                logits = model.logits(model.hidden(x)[0]).float().flatten(0, 1)
            for j, t in enumerate(temps):
                sums[j] += F.cross_entropy(logits / t, y, reduction="sum").double()
            count += len(y)
    return (sums / count).cpu()


def fit_temperature(model, tokens, seq_len, batch_seqs, device):
    """Softmax temperature minimizing the NLL of `tokens`: a log-spaced grid over [0.5, 2], then a fine linear
    grid between the best point's neighbours. Returns (temperature, NLL at 1, NLL at the temperature)."""
    coarse = np.geomspace(0.5, 2.0, 25)
    best = int(temperature_nll(model, tokens, seq_len, batch_seqs, device, coarse).argmin())
    fine = np.linspace(coarse[max(best - 1, 0)], coarse[min(best + 1, len(coarse) - 1)], 21)
    nll = temperature_nll(model, tokens, seq_len, batch_seqs, device, list(fine) + [1.0])
    j = int(nll[:-1].argmin())
    return float(fine[j]), float(nll[-1]), float(nll[j])


def fit_temperature_on_train_tail(model, config, run, log):
    """TEMP_SCALING: the temperature of the model about to be exported, fitted on the held-out train tail (never
    val), inside the training budget; it is stored in the artifact (meta) for the eval stages after roundtrip."""
    tokens = train_tail(config.run.data_path, config.model.vocab_size, config.eval.temp_fit_tokens)
    was_training = model.training
    model.eval()
    temperature, nll_before, nll_after = fit_temperature(model, tokens, config.eval_seq_len, config.eval.eval_batch_seqs, run.device)
    model.train(was_training)
    log(kv("temperature_fit", temperature=temperature, fit_tokens=len(tokens), source="train_tail", nll_t1=nll_before, nll_fit=nll_after))
    return temperature


def eval_temperature(meta, eval_cfg, label):
    """The temperature of the stages after roundtrip: the artifact's fitted one with TEMP_SCALING=1, else 1."""
    if not eval_cfg.temp_scaling:
        return 1.0
    if "temperature" not in meta:
        raise ConfigError(f"TEMP_SCALING=1 but artifact {label} holds no fitted temperature (it was trained with "
                          "TEMP_SCALING=0); train with TEMP_SCALING=1 or set TEMP_SCALING=0")
    return float(meta["temperature"])


def check_artifact_matches(model, config, label):
    """A reloaded artifact must fit the run's tokenizer and eval config; say which variable to change."""
    if model.cfg.vocab_size != config.model.vocab_size:
        raise ConfigError(f"ARTIFACT={label} has vocab size {model.cfg.vocab_size} but VOCAB_SIZE={config.model.vocab_size} "
                          f"(TOKENIZER_PATH={config.run.tokenizer_path}); use the tokenizer and DATA_PATH the artifact was trained with")
    if config.eval.ttt_enabled:
        ttt_parameters(model, config.eval.ttt_scope, config.eval.freeze_packed_engram)
    if config.eval.eval_engram_enabled:
        EvalEngram.check_memory(config.eval, model.cfg.vocab_size, next(model.parameters()).device)


def eval_forward(model, run_cfg, device):
    """The eval forward ((B, T) ids -> (B, T, D) hidden states): compiled on CUDA (COMPILE), else model.hidden."""
    if run_cfg.compile == 1 or (run_cfg.compile == -1 and device.type == "cuda"):
        return torch.compile(lambda ids: model.hidden(ids)[0], dynamic=False)
    return None

# -----------------------------------------------------------------------------------------------------------------
# TRAIN
# One optimizer step (train_step), the compile warm-up, and the loop. The loop's clock stops for validation; the
# elapsed time and the loss are all-reduced every step, so every rank takes the same schedule and the same decision
# to stop. Whatever reads train data after the loop (calibration, pruning, the temperature fit) runs inside the
# training budget: the loop stops TRAIN_DATA_RESERVE_SECONDS before MAX_WALLCLOCK_SECONDS to leave them the time.
# -----------------------------------------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """The train loss is not finite or ran away (LOSS_RUNAWAY_RATIO); raised before anything is exported."""


def grad_accum_steps(train_cfg, seq_len, run):
    total = train_cfg.grad_accum_steps or (8 if run.device.type == "cuda" else 1)
    if total % run.world_size:
        raise ConfigError(f"GRAD_ACCUM_STEPS={total} must be a multiple of the world size {run.world_size}")
    if train_cfg.train_batch_tokens % (total * seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={train_cfg.train_batch_tokens} must split into GRAD_ACCUM_STEPS={total} "
                          f"micro-batches of whole TRAIN_SEQ_LEN={seq_len} sequences")
    return total // run.world_size


TEMPERATURE_FIT_RESERVE_S = 20.0  # the temperature fit: two passes over TEMP_FIT_TOKENS (65,536: ~1 s on an H100)
PRUNE_RESERVE_S = 10.0            # row pruning: one hit count over CALIB_TOKENS
GPTQ_RESERVE_S = 45.0             # GPTQ: Hessians over GPTQ_CALIB_TOKENS (or self-generating them) + the column loops


def train_budget(config):
    """The loop's budget: MAX_WALLCLOCK_SECONDS minus the reserve for the post-loop work that reads train data
    (TRAIN_DATA_RESERVE_SECONDS, or -1: CALIB_MAX_SECONDS when calibrating, plus the fit and pruning allowances)."""
    train_cfg, export_cfg = config.train, config.export
    reserve = train_cfg.train_data_reserve_seconds
    if reserve < 0:
        reserve = ((export_cfg.calib_max_seconds if export_cfg.export_search else 0.0)
                   + (PRUNE_RESERVE_S if export_cfg.engram_prune_min_hits else 0.0)
                   + (TEMPERATURE_FIT_RESERVE_S if config.eval.temp_scaling else 0.0)
                   + (GPTQ_RESERVE_S if export_cfg.gptq else 0.0))
    if train_cfg.max_wallclock_seconds <= 0:
        return TrainBudget(0.0, train_cfg.iterations, 0.0)
    _require(reserve < train_cfg.max_wallclock_seconds, f"the {reserve:.0f} s reserved for reading train data after the loop "
             f"(TRAIN_DATA_RESERVE_SECONDS / CALIB_MAX_SECONDS) leave nothing of MAX_WALLCLOCK_SECONDS={train_cfg.max_wallclock_seconds}")
    return TrainBudget(train_cfg.max_wallclock_seconds - reserve, train_cfg.iterations, reserve)


def train_step(model, optimizers, loader, train_cfg, seq_len, run, accum, step, fraction):
    """One optimizer step over `accum` micro-batches; returns the mean loss (a tensor, no host sync) and the LR scale."""
    micro_tokens = train_cfg.train_batch_tokens // accum
    total = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = loader.next_batch(micro_tokens, seq_len)
        if train_cfg.curriculum_enabled:
            rows = curriculum_seq_len(fraction, train_cfg.curriculum_min_seq_len, seq_len, train_cfg.curriculum_end_fraction)
            x, y = x.reshape(-1, rows), y.reshape(-1, rows)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = micro == accum - 1
        with autocast(run.device):
            loss = model(x, y)
        (loss / accum).backward()
        total += loss.detach() / accum
    scale = lr_scale(fraction, train_cfg.warmup_fraction, train_cfg.warmdown_fraction, train_cfg.min_lr_fraction)
    decay = weight_decay_scale(fraction, train_cfg.wd_taper_start_fraction)
    momentum = muon_momentum(step, train_cfg.muon_momentum_warmup_start, train_cfg.muon_momentum, train_cfg.muon_momentum_warmup_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = group["base_lr"] * scale, group["base_weight_decay"] * decay
            if isinstance(opt, Muon):
                group["momentum"] = momentum
    if train_cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for o in optimizers for g in o.param_groups for p in g["params"]], train_cfg.grad_clip_norm)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    post_step = getattr(getattr(model, "module", model), "post_step", None)
    if post_step is not None:  # projections after the optimizer step (the capsule predictor's diagonal clamp)
        post_step()
    return total, scale


def compile_warmup(model, optimizers, loader, train_cfg, seq_len, run, accum, base_model):
    """Run WARMUP_STEPS steps so compilation happens off the clock, then restore weights, optimizer state and
    data position exactly."""
    if train_cfg.warmup_steps <= 0:
        return 0.0
    t0 = time.perf_counter()
    saved = (copy.deepcopy(base_model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers], loader.state())
    for step in range(train_cfg.warmup_steps):
        train_step(model, optimizers, loader, train_cfg, seq_len, run, accum, step, 0.0)
    base_model.load_state_dict(saved[0])
    for opt, state in zip(optimizers, saved[1]):
        opt.load_state_dict(state)
    loader.restore(saved[2])
    synchronize(run.device)
    return time.perf_counter() - t0


def compiled_frames():
    """Frames torch.compile has compiled so far in this process (0 without dynamo)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return counters["frames"].get("ok", 0)


def log_compile_stats(log, frames_after_warmup):
    """torch.compile health: frames compiled after the warm-up steps (recompiles; should be 0) and graphs."""
    from torch._dynamo.utils import counters
    if counters["stats"]:
        log(kv("compile_stats", recompiles_after_warmup=compiled_frames() - frames_after_warmup,
               unique_graphs=counters["stats"].get("unique_graphs", 0), frames=compiled_frames()))


def check_loss(loss_value, step, last_finite, train_cfg, vocab_size):
    """Stop before anything is exported when the loss is not finite or has run away (LOSS_RUNAWAY_RATIO)."""
    if not math.isfinite(loss_value):
        before = f"last finite loss {last_finite[1]:.4f} at step {last_finite[0]}" if last_finite[0] else "no step had a finite loss"
        raise TrainingDiverged(f"train loss is {loss_value} at step {step}; {before}. No artifact was written. "
                               "Lower MATRIX_LR / EMBED_LR or set GRAD_CLIP_NORM.")
    limit = train_cfg.loss_runaway_ratio * math.log(vocab_size)
    if train_cfg.loss_runaway_ratio and loss_value > limit:
        raise TrainingDiverged(f"train loss {loss_value:.4f} at step {step} ran away: above LOSS_RUNAWAY_RATIO={train_cfg.loss_runaway_ratio} "
                               f"x ln(VOCAB_SIZE) = {limit:.2f} (step {last_finite[0]}: {last_finite[1]:.4f}). No artifact was written. "
                               "An auxiliary loss term (capsule, MoE, routing entropy) or the learning rate is the usual cause.")


def train(model, base_model, optimizers, loader, train_cfg, budget, run, log, ema, validate, on_step=None):
    """The training loop; returns (steps, loop seconds, compile seconds)."""
    seq_len = base_model.cfg.train_seq_len
    accum = grad_accum_steps(train_cfg, seq_len, run)
    compile_seconds = compile_warmup(model, optimizers, loader, train_cfg, seq_len, run, accum, base_model)
    frames_after_warmup = compiled_frames()
    log(kv("compile", compile_s=compile_seconds, warmup_steps=train_cfg.warmup_steps))
    step, train_seconds, last_finite = 0, 0.0, (0, float("nan"))
    flops = flops_per_token(base_model, seq_len)
    while True:
        # validate if due (off the clock)
        if train_cfg.val_loss_every and step and step % train_cfg.val_loss_every == 0:
            validate(step)
        # one optimizer step, timed
        t0 = time.perf_counter()
        fraction = budget.fraction(step, train_seconds)
        base_model.set_progress(fraction)
        loss, scale = train_step(model, optimizers, loader, train_cfg, seq_len, run, accum, step, fraction)
        on_step(fraction) if on_step else None
        synchronize(run.device)
        stats = all_reduce_sum(torch.stack([torch.tensor(time.perf_counter() - t0, device=run.device), loss.float()]))
        step_seconds, loss_value = (stats / run.world_size).tolist()
        train_seconds += step_seconds
        step += 1
        # stop on a non-finite or runaway loss before anything is exported
        check_loss(loss_value, step, last_finite, train_cfg, base_model.cfg.vocab_size)
        last_finite = (step, loss_value)
        ema.update(base_model, budget.fraction(step, train_seconds)) if ema else None
        # log (always the first and the last step)
        stop = budget.done(step, train_seconds)
        if step % train_cfg.train_log_every == 0 or step == 1 or stop:
            tokens_per_second = train_cfg.train_batch_tokens * step / max(train_seconds, 1e-9)
            mfu = tokens_per_second * flops / run.world_size / H100_BF16_PEAK_FLOPS if run.device.type == "cuda" else 0.0
            log(kv("train", step=step, train_loss=loss_value, lr_scale=scale, step_ms=1000 * train_seconds / step,
                   tok_s=int(tokens_per_second), tok_s_gpu=int(tokens_per_second / run.world_size), mfu=mfu,
                   elapsed_s=train_seconds, remaining_s=max(budget.loop_seconds - train_seconds, 0.0)))
        if stop:
            log_compile_stats(log, frames_after_warmup)
            return step, train_seconds, compile_seconds


def post_loop_train_data_work(base_model, config, run, log, budget, loop_seconds):
    """Everything after the loop that reads train data, timed against the reserve it got (TRAIN section header):
    scalars to fp16, pruning, clip search, calibration (all export_fidelity), GPTQ and LQER (quantize_for_export),
    and the temperature fit (of the final, quantized model). Returns the artifact's meta ({"temperature": T} with
    TEMP_SCALING=1)."""
    t0 = time.perf_counter()
    wallclock = config.train.max_wallclock_seconds
    calib_seconds = config.export.calib_max_seconds if wallclock <= 0 else max(min(config.export.calib_max_seconds, budget.reserve_seconds - 1), 0.1)
    export_fidelity(base_model, config, run, log, calib_seconds)
    quantize_for_export(base_model, config, run, log)
    meta = {}
    if config.eval.temp_scaling:
        temperature = fit_temperature_on_train_tail(base_model, config, run, log) if run.is_main else None
        meta["temperature"] = broadcast_object(temperature)
    seconds = time.perf_counter() - t0
    log(kv("train_data_after_loop", seconds=seconds, reserve_s=budget.reserve_seconds, loop_s=loop_seconds,
           total_s=loop_seconds + seconds, limit_s=wallclock, within_budget=int(wallclock <= 0 or loop_seconds + seconds <= wallclock)))
    return meta

# -----------------------------------------------------------------------------------------------------------------
# MAIN
# config -> ranks and run id -> log header -> data and tokenizer checks -> model and budget check -> train ->
# post-loop train-data work (inside the training budget) -> export -> reload from the artifact's bytes -> eval stack
# -> submission.json and the final line. EVAL_ONLY=1 goes from the checks straight to the reload.
# -----------------------------------------------------------------------------------------------------------------

def log_header(log, run):
    log(f"source_file:{Path(__file__).resolve()}", console=False)
    log(Path(__file__).read_text(), console=False)
    log(kv("versions", python=sys.version.split()[0], torch=torch.__version__, numpy=np.__version__,
           cuda=torch.version.cuda, device=run.device, world_size=run.world_size, flash_attn_installed=FLASH_ATTENTION is not None))
    if run.device.type == "cuda":
        import subprocess
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
            log(smi.stdout or smi.stderr, console=False)
        except OSError:
            log("nvidia-smi: not found", console=False)


def resolve_smoke_data(config, run, log):
    """RUN_PRESET=smoke builds its corpus; the preset's rewrite of DATA_PATH, TOKENIZER_PATH (and VOCAB_SIZE unless
    set) is logged as such, before the config line."""
    data_path, tokenizer_path, vocab_size = prepare_smoke_data(config.run, run, log)
    vocab_size = config.model.vocab_size if "VOCAB_SIZE" in config.explicit else vocab_size
    log(kv("preset_rewrite", preset="smoke", DATA_PATH=data_path, TOKENIZER_PATH=tokenizer_path, VOCAB_SIZE=vocab_size))
    config = config.replace("run", data_path=data_path, tokenizer_path=tokenizer_path)
    return config.replace("model", vocab_size=vocab_size)


def attention_kernel_used(cfg, device):
    """The kernel causal_attention takes for this model on this device, decided from a query tensor made as the
    model makes it (rms_norm under the run's autocast), not from whether flash-attn imports."""
    with autocast(device):
        return attention_kernel(rms_norm(torch.zeros(1, 1, cfg.num_heads, cfg.head_dim, device=device)))


def check_budget(label, model_bytes, code_bytes, log, note=""):
    total = model_bytes + code_bytes
    log(kv("budget", check=label, bytes_model=model_bytes, bytes_code=code_bytes, bytes_total=total, limit=BUDGET_BYTES))
    if total > BUDGET_BYTES:
        raise ConfigError(f"{label}: {total:,} bytes (model {model_bytes:,} + code {code_bytes:,}) exceeds the "
                          f"{BUDGET_BYTES:,}-byte limit; shrink NUM_LAYERS / MODEL_DIM / MLP_MULT / VOCAB_SIZE or use QUANT_EMBED=fp8{note}")


def prepare_model(model, run_cfg, run):
    """Compile (CUDA default) and wrap in DDP; `model` stays the plain module used for export."""
    compiled = model
    if run_cfg.compile == 1 or (run_cfg.compile == -1 and run.device.type == "cuda"):
        compiled = torch.compile(model, dynamic=False)
    if run.world_size > 1:
        compiled = nn.parallel.DistributedDataParallel(compiled, device_ids=[run.local_rank] if run.device.type == "cuda" else None)
    return compiled


def export_artifact(model, meta, out_path, run, log, code_bytes):
    """Rank 0 serializes, compresses and atomically writes the artifact, then reads the file back; every rank gets
    those bytes (no shared filesystem needed) and checks the real size against the budget. An artifact over the
    budget never gets the final name: it is kept as final_model.skc.over_budget and the run stops."""
    over_budget_path = out_path.with_name(out_path.name + ".over_budget")
    blob = None
    if run.is_main:
        payload = serialize_model(model, meta)
        compressed = compress_payload(payload)
        fits = len(compressed) + code_bytes <= BUDGET_BYTES
        write_artifact(out_path if fits else over_budget_path, compressed)
        log(kv("export_report", **export_report(model), payload_bytes=len(payload), compressed_bytes=len(compressed),
               codec=CODECS[compressed[0]], compression_ratio=len(compressed) / len(payload), code_bytes=code_bytes))
        blob = read_artifact(out_path if fits else over_budget_path)
    blob = broadcast_object(blob)
    fits = len(blob) + code_bytes <= BUDGET_BYTES
    log(kv("artifact", bytes_total=len(blob) + code_bytes, bytes_code=code_bytes, bytes_model=len(blob),
           path=out_path if fits else over_budget_path))
    check_budget("after_export", len(blob), code_bytes, log, note=f"; the artifact was kept as {over_budget_path}, not a submission")
    return blob


def evaluate_artifact(blob, label, config, run, tables, val_tokens, log):
    """Reload the model from the artifact's bytes alone and run the eval stack on it."""
    model, meta = model_from_artifact(blob, label, run.device)
    check_artifact_matches(model, config, label)
    ctx = EvalContext(model, val_tokens.to(run.device), tables, config.eval, config.eval_seq_len, run,
                      eval_temperature(meta, config.eval, label), eval_forward(model, config.run, run.device))
    return run_eval_stack(ctx, log, truncation_note(config.run))


def finish(results, config, run_id, run, log, extra):
    """submission.json (rank 0) and the final line (every rank, so a run can be checked for agreement): the reported
    stage is the last of the declared plan that ran (a stage skipped by EVAL_MAX_SECONDS has an eval_skip line, and
    `planned` then differs from `stage`)."""
    plan = [stage.name for stage in eval_plan(config.eval)]
    reported = [name for name in plan if name in results][-1]
    summary = dict(val_bpb=results[reported]["val_bpb"], val_loss=results[reported]["val_loss"], stage=reported,
                   planned=plan[-1], **extra)
    if run.is_main:
        out = Path(config.run.out_dir) / run_id
        out.mkdir(parents=True, exist_ok=True)
        (out / "submission.json").write_text(json.dumps(dict(summary, run_id=run_id, stages=results, config=config.as_dict()),
                                                        indent=2, default=str))
    line = kv("final", **summary, **truncation_note(config.run))
    if run.is_main:
        log(line)
    else:  # one write, so it never interleaves with rank 0's lines on a shared pipe
        sys.stdout.write(f"{line} rank:{run.rank}\n")
        sys.stdout.flush()
    return summary


def main():
    if "--env-table" in sys.argv:
        print(env_table_markdown())
        return
    config = Config.from_env()
    if "--print-config" in sys.argv:
        print(json.dumps(config.as_dict(), sort_keys=True))
        return
    run = init_distributed()
    torch.manual_seed(config.run.seed)
    random.seed(config.run.seed)
    np.random.seed(config.run.seed)
    run_id = resolve_run_id(config.run)
    log = Logger(config.run.log_dir, run_id, run.is_main)
    log_header(log, run)
    if config.run.run_preset == "smoke":
        config = resolve_smoke_data(config, run, log)
    log(kv("layer_plan", kinds=",".join(layer_plan(config.model)), architecture=config.model.architecture or "-",
           layer_kinds=config.model.layer_kinds or "-"))
    log(kv("run", run_id=run_id, attention_kernel=attention_kernel_used(config.model, run.device)))
    log("config " + json.dumps(config.as_dict(), sort_keys=True, default=str))
    sp = load_tokenizer(config.run.tokenizer_path, config.model.vocab_size)
    check_data_matches_tokenizer(config.run.data_path, config.run.tokenizer_path, config.model.vocab_size)
    tables = build_byte_tables(sp, config.model.vocab_size)
    if config.eval.eval_engram_enabled:
        EvalEngram.check_memory(config.eval, config.model.vocab_size, run.device)
    val_tokens = load_val_tokens(config.run.data_path, config.model.vocab_size, config.run.val_max_tokens)
    check_ranks_agree(config.run.tokenizer_path, val_tokens, run)
    log(kv("eval_plan", stages=",".join(s.name for s in eval_plan(config.eval)), reported=eval_plan(config.eval)[-1].name,
           val_tokens=len(val_tokens), **truncation_note(config.run)))
    if config.run.eval_only:
        blob = broadcast_object(read_artifact(config.run.artifact) if run.is_main else None)
        results = evaluate_artifact(blob, config.run.artifact, config, run, tables, val_tokens, log)
        return finish(results, config, run_id, run, log, dict(artifact=config.run.artifact))

    # model, budget check before step 0, data, optimizers
    grad_accum_steps(config.train, config.model.train_seq_len, run)  # a batch that cannot split over the ranks fails now
    base_model = GPT(config.model).to(run.device)
    counts = {r: sum(p.numel() for p in base_model.parameters() if p.route == r) for r in PARAM_ROUTES}
    log(kv("model_params", total=sum(counts.values()), **{f"{r}_params": n for r, n in counts.items()}))
    code_bytes = measure_code_bytes(config.export, config.as_dict())
    check_budget("estimate_before_training", estimate_artifact_bytes(base_model, config.export), code_bytes, log)
    holdout = heldout_tokens(config.export, config.eval)
    loader = DistributedTokenLoader(shard_paths(config.run.data_path, "train"), config.model.vocab_size, run.rank,
                                    run.world_size, run.device, holdout)
    budget = train_budget(config)
    log(kv("train_data", heldout_tail_tokens=holdout, train_tokens=sum(len(s) for s in loader.stream.shards)))
    log(kv("train_budget", wallclock_s=config.train.max_wallclock_seconds, reserve_s=budget.reserve_seconds,
           loop_s=budget.loop_seconds, iterations=budget.iterations))
    model = prepare_model(base_model, config.run, run)
    optimizers = build_optimizers(base_model, config.train, fused=run.device.type == "cuda")
    ema = EMA(config.train.ema_horizon_fraction, config.train.ema_start_fraction) if config.train.ema_enabled else None
    plain = lambda m: EvalContext(m, val_tokens.to(run.device), tables, config.eval, config.eval_seq_len, run)

    def validate(step):
        result = run_stage_group(plain(base_model), [EVAL_STAGES[0]], 0.0, log)["roundtrip"]
        log(kv("eval", stage="train_step", step=step, val_loss=result["val_loss"], val_bpb=result["val_bpb"], **truncation_note(config.run)))

    aligned = []

    def align_during_training(fraction):
        if config.export.export_aligned_train and not aligned and fraction >= config.export.export_aligned_start_fraction:
            aligned.append(fraction)
            tokens = calibration_tokens(config.run.data_path, config.model.vocab_size, config.export).to(run.device)
            align_export(base_model, tokens, config.export, config.eval.eval_batch_seqs, run, log, f"train_fraction_{fraction:.3f}")

    # train, then the post-loop train-data work, inside the training budget
    steps, loop_seconds, compile_seconds = train(model, base_model, optimizers, loader, config.train, budget, run, log,
                                                 ema, validate, align_during_training)
    if ema:
        ema.apply_to(base_model)
    base_model.set_progress(1.0)
    prequant = run_stage_group(plain(base_model), [EVAL_STAGES[0]], 0.0, log)["roundtrip"]  # diagnostic, off the clock
    log(kv("eval", stage="prequant", val_loss=prequant["val_loss"], val_bpb=prequant["val_bpb"], **truncation_note(config.run)))
    meta = post_loop_train_data_work(base_model, config, run, log, budget, loop_seconds)

    # export, reload from the artifact's bytes, evaluate
    out_path = Path(broadcast_object(str(Path(config.run.out_dir) / run_id / "final_model.skc")))  # on rank 0's disk
    blob = export_artifact(base_model, meta, out_path, run, log, code_bytes)
    results = evaluate_artifact(blob, out_path, config, run, tables, val_tokens, log)
    log(kv("export_cost", delta_bpb=results["roundtrip"]["val_bpb"] - prequant["val_bpb"], prequant_bpb=prequant["val_bpb"],
           roundtrip_bpb=results["roundtrip"]["val_bpb"], **truncation_note(config.run)))
    return finish(results, config, run_id, run, log, dict(bytes_total=len(blob) + code_bytes, bytes_code=code_bytes,
                                                          bytes_model=len(blob), steps=steps, step_ms=1000 * loop_seconds / max(steps, 1),
                                                          tok_s=int(config.train.train_batch_tokens * steps / max(loop_seconds, 1e-9)),
                                                          compile_s=compile_seconds, artifact=str(out_path)))


if __name__ == "__main__":
    main()
    if distributed():
        dist.barrier()  # ranks leave together; a rank tearing down gloo while another still talks aborts it
        dist.destroy_process_group()
