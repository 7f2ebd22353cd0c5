"""Microbenchmark of the trainer's parts at the competition width: one block per layer kind, the attention
backends, and the ternary quantizer.

Measurements (one grep-able `event key:value ...` line each, like the trainer's log; cheap ones first, so a
command stopped mid-compile keeps them):

    ternary_quant   TernaryLinear.effective_weight() (per-forward quantize + dequantize of the latent weight,
                    the STE path) of the MODEL_DIM x MLP_MULT*MODEL_DIM layer vs that layer's matmul on the
                    (batch * seq_len, MODEL_DIM) input: quant_ms, matmul_ms, quant_fraction (+ compiled quant)
    attn_backend    causal GQA attention forward+backward on q (B, T, H, hd), k/v (B, T, KV, hd) for each torch
                    SDPA backend (sdpa_kernel), SDPA's default dispatch, and flash_attn_interface (FA3/FA4) /
                    flash_attn (FA2) when importable; max_abs_diff vs an fp32 (CPU: fp64) MATH reference;
                    `gqa:expanded` when a backend refused GQA and ran on k/v repeated to H heads (the repeat is
                    timed too); `status:error error:...` when it failed
    layer_bench     forward+backward of ONE train_gpt.Block(cfg, layer_index, kind) on (batch, seq_len, MODEL_DIM)
                    fp32 residual inputs (bf16 autocast on CUDA, as in the trainer): fwd_bwd_ms, fwd_ms (the
                    training forward alone), peak_mem_gb, tokens_per_s, vs_attn, and when compiled compile_s
                    (the first call) and graphs / graph_breaks (torch._dynamo.explain of a small forward)
    layer_bench_done seconds:<total>

Times are medians over --iters calls after --warmup calls (CUDA events on CUDA, perf_counter on the CPU). The
block config comes from train_gpt.Config, so every default is the trainer's, and any trainer env var
set when the tool starts applies (e.g. ROPE_DIMS=32 SKC_NUM_CAPSULES=32 python tools/layer_bench.py) except the
shape, which the options set: MODEL_DIM, NUM_HEADS, NUM_KV_HEADS, MLP_MULT, TRAIN_SEQ_LEN (and BITNET_GROUP_SIZE
with --group-size). Their defaults are the competition's per-GPU micro-batch: 768 wide, 12 heads, 4 kv heads,
MLP_MULT=4, seq 2048, 32 sequences (65536 tokens). MoE / shared blocks / add-ons are GPT-level and not built.
Records are also appended as JSON lines to --json-out (default $OUT/layer_bench.jsonl when OUT is set).

torch.compile (on by default on CUDA): the scans of skc / koopman_ssm have no Python loop over chunks, so a block
compiles in seconds (inductor on this 2-core CPU, 768 wide, seq 2048, batch 1: attn 4 s, skc 16 s, koopman_ssm
15 s; with the earlier loop over 64 chunks: 10, 67 and 78 s). The whole run should take one to two minutes;
--kinds splits it and --no-compile skips compilation.

Usage:
    python tools/layer_bench.py --dry-run                       # tiny shapes, any device (CPU: a few seconds)
    run(command="python3 tools/layer_bench.py", timeout_s=300)  # on the 1xH100 / H200 machine: everything
    run(command="python3 tools/layer_bench.py --kinds attn,skc", timeout_s=180)   # or in two parts
    run(command="python3 tools/layer_bench.py --kinds attn,koopman_ssm --skip-attn-backends --skip-quant",
        timeout_s=180)
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt  # noqa: E402  (the trainer beside tools/)

KINDS = tuple(train_gpt.MIXERS)  # the trainer's mixer registry
FULL_SHAPE = dict(model_dim=768, num_heads=12, num_kv_heads=4, mlp_mult=4.0, seq_len=2048, batch=32,
                  iters=20, warmup=5, group_size=None)
DRY_SHAPE = dict(model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=4.0, seq_len=64, batch=2,
                 iters=2, warmup=1, group_size=32)
EXPLAIN_SEQ_LEN = 64  # sequence length of the small forward torch._dynamo.explain counts graph breaks on


# ---------------------------------------------------------------------------------------------------------
# Output: lines and JSON records
# ---------------------------------------------------------------------------------------------------------

def format_value(value):
    """A value token: floats with 6 significant digits, text with anything but [A-Za-z0-9_.+-:] made `_`."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return re.sub(r"[^A-Za-z0-9_.+\-:]", "_", str(value))


def format_line(event, fields):
    """`event key:value ...`; fields that are None are left out."""
    return " ".join([event] + [f"{key}:{format_value(value)}" for key, value in fields.items() if value is not None])


def short_error(error):
    """`ErrorType:first_line_of_the_message`, at most 120 characters, no spaces."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return format_value(f"{type(error).__name__}:{message}")[:120]


class Reporter:
    """Prints each record as a line and appends it as a JSON line to `json_path` (when given)."""

    def __init__(self, json_path):
        self.json_path = Path(json_path) if json_path else None
        if self.json_path:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event, **fields):
        print(format_line(event, fields), flush=True)
        if self.json_path:
            record = {"event": event, **{key: value for key, value in fields.items() if value is not None}}
            with open(self.json_path, "a", encoding="utf-8") as json_file:
                json_file.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, iters, warmup, device):
    """Call fn `warmup` times, then `iters` times; return each timed call's milliseconds (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn, iters, warmup, device):
    return statistics.median(time_calls(fn, iters, warmup, device))


def seconds_of(fn, device):
    """Wall seconds of one call of fn, device work included (the first, compiling call)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# Config and the block under test
# ---------------------------------------------------------------------------------------------------------

def trainer_env(args):
    """Env dict for train_gpt.Config: the trainer env vars set now, then the bench's shape options."""
    names = {f.name.upper() for _, f in train_gpt.env_fields()}
    env = {key: value for key, value in os.environ.items() if key in names}
    env.setdefault("SLIDING_EVAL_STRIDE", "1")  # an eval-only knob, pinned so that any --seq-len validates
    env.update(MODEL_DIM=str(args.model_dim), NUM_HEADS=str(args.num_heads), NUM_KV_HEADS=str(args.num_kv_heads),
               MLP_MULT=str(args.mlp_mult), TRAIN_SEQ_LEN=str(args.seq_len),
               TRAIN_BATCH_TOKENS=str(args.seq_len * args.batch))
    if args.group_size:
        env["BITNET_GROUP_SIZE"] = str(args.group_size)
    if args.layer_index >= int(env.get("NUM_LAYERS", train_gpt.ModelConfig().num_layers)):
        env["NUM_LAYERS"] = str(args.layer_index + 1)
    return env


def model_config(args):
    return train_gpt.Config.from_env(trainer_env(args)).model


class BlockUnderTest(nn.Module):
    """One Block plus what GPT.run_layers gives it: a Context built inside forward (as in the compiled model),
    rope tables and progress as buffers. forward returns a scalar loss: <block output, fixed random direction>
    plus the block's aux losses, so backward is the block's full backward."""

    def __init__(self, cfg, layer_index, kind, seq_len):
        super().__init__()
        self.block = train_gpt.configure_ternary(train_gpt.Block(cfg, layer_index, kind), cfg)
        cos, sin, self.temperature = train_gpt.rope_tables(seq_len, cfg.rotary_dims, cfg.rope_base, cfg.yarn_factor,
                                                           cfg.train_seq_len, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("progress", torch.full((), 0.5), persistent=False)

    def forward(self, x, x0, input_ids, direction):
        ctx = train_gpt.Context(input_ids, (self.rope_cos, self.rope_sin, self.temperature), [], self.progress)
        loss = (self.block(x, x0, ctx).float() * direction).sum()
        return loss + sum(ctx.aux_losses) if ctx.aux_losses else loss


def block_inputs(cfg, batch, seq_len, device):
    """x and x0 (fp32 residual stream, requiring grad), token ids, the loss direction."""
    shape = (batch, seq_len, cfg.model_dim)
    x = torch.randn(shape, device=device).requires_grad_()
    x0 = torch.randn(shape, device=device).requires_grad_()
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    return x, x0, input_ids, torch.randn(shape, device=device) / math.sqrt(x.numel())


def count_graph_breaks(module, cfg, device):
    """torch._dynamo.explain of one small forward (batch 1, EXPLAIN_SEQ_LEN tokens): (graphs, graph breaks).
    explain resets dynamo before and after, so call it before compiling."""
    x, x0, input_ids, direction = block_inputs(cfg, 1, min(EXPLAIN_SEQ_LEN, module.rope_cos.size(0)), device)
    with train_gpt.autocast(device):
        explained = torch._dynamo.explain(module)(x, x0, input_ids, direction)
    return explained.graph_count, explained.graph_break_count


# ---------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------

def bench_block(kind, args, device, report, attn_ms):
    """Forward+backward of one block of `kind`; returns its fwd_bwd_ms."""
    cfg = model_config(args)
    torch.manual_seed(0)
    module = BlockUnderTest(cfg, args.layer_index, kind, args.seq_len).to(device).train()
    inputs = block_inputs(cfg, args.batch, args.seq_len, device)
    graphs = breaks = compile_s = None
    runner = module
    if args.compile:
        graphs, breaks = count_graph_breaks(module, cfg, device)
        runner = torch.compile(module, dynamic=False)

    def forward():
        with train_gpt.autocast(device):
            return runner(*inputs)

    def forward_backward():
        module.zero_grad(set_to_none=True)
        inputs[0].grad = inputs[1].grad = None
        forward().backward()

    first_s = seconds_of(forward_backward, device)
    compile_s = first_s if args.compile else None
    free_memory(device)
    fwd_bwd_ms = median_ms(forward_backward, args.iters, args.warmup, device)
    peak = peak_memory_gb(device)
    fwd_ms = median_ms(forward, args.iters, args.warmup, device)
    report("layer_bench", kind=kind, status="ok", model_dim=cfg.model_dim, seq_len=args.seq_len, batch=args.batch,
           fwd_bwd_ms=fwd_bwd_ms, fwd_ms=fwd_ms, peak_mem_gb=peak,
           tokens_per_s=round(args.batch * args.seq_len / (fwd_bwd_ms / 1e3)), compiled=int(args.compile),
           compile_s=compile_s, graphs=graphs, graph_breaks=breaks,
           vs_attn=fwd_bwd_ms / attn_ms if attn_ms and kind != "attn" else None, layer_index=args.layer_index,
           scan_chunk=train_gpt.SCAN_CHUNK if kind != "attn" else None,
           attention_kernel=train_gpt.attention_kernel_used(cfg, device) if kind == "attn" else None)
    return fwd_bwd_ms


def bench_blocks(args, device, report):
    attn_ms = None
    for kind in args.kinds:
        try:
            ms = bench_block(kind, args, device, report, attn_ms)
            attn_ms = ms if kind == "attn" else attn_ms
        except Exception as error:  # one failing kind (OOM, compile error) must not cost the others
            report("layer_bench", kind=kind, status="error", error=short_error(error))
        torch._dynamo.reset()
        free_memory(device)


def attention_backends(device):
    """(name, SDPBackend or None) of the torch SDPA backends to try; None = SDPA's own dispatch."""
    from torch.nn.attention import SDPBackend
    backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION), ("sdpa_math", SDPBackend.MATH),
                ("sdpa_default", None)]
    if device.type != "cuda":  # cuDNN and memory-efficient attention are CUDA kernels
        backends = [(name, backend) for name, backend in backends if name not in ("sdpa_cudnn", "sdpa_efficient")]
    return backends


def flash_attn_functions():
    """(name, flash_attn_func) of the flash-attn packages that import: FA3/FA4 interface, then FA2."""
    functions = []
    for module_name in ("flash_attn_interface", "flash_attn"):
        try:
            functions.append((module_name, __import__(module_name).flash_attn_func))
        except Exception:  # absent, or built against another torch (undefined symbol)
            continue
    return functions


def sdpa_attention(backend, expand):
    """Causal attention on (B, T, H, hd) q and (B, T, KV, hd) k/v through SDPA, as train_gpt.causal_attention
    calls it; `backend` restricts SDPA to one kernel, `expand` repeats k/v to H heads first (no enable_gqa)."""
    from torch.nn.attention import sdpa_kernel

    def attention(q, k, v):
        if expand:
            k, v = (t.repeat_interleave(q.size(2) // t.size(2), dim=2) for t in (k, v))
        gqa = k.size(2) != q.size(2)
        call = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True, enable_gqa=gqa)
        if backend is None:
            return call().transpose(1, 2)
        with sdpa_kernel(backend):
            return call().transpose(1, 2)
    return attention


def flash_attention(function):
    def attention(q, k, v):
        out = function(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return attention


def attention_inputs(args, device, dtype):
    shape = (args.batch, args.seq_len, args.num_heads, args.head_dim)
    kv_shape = (args.batch, args.seq_len, args.num_kv_heads, args.head_dim)
    torch.manual_seed(0)
    q, k, v = (torch.randn(s, device=device, dtype=dtype).requires_grad_() for s in (shape, kv_shape, kv_shape))
    return q, k, v, torch.randn(shape, device=device, dtype=dtype)


def reference_attention(q, k, v, device):
    """MATH backend in fp32 with TF32 off (CPU: fp64): the numerics reference."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            from torch.nn.attention import SDPBackend
            return sdpa_attention(SDPBackend.MATH, False)(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def first_working(candidates, q, k, v, grad):
    """The first (attention, note) of `candidates` whose forward+backward runs; raises the first one's error."""
    first_error = None
    for attention, note in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kernel not used because ..." for a refused GQA call
                attention(q, k, v).backward(grad)
            return attention, note
        except Exception as error:
            first_error = first_error or error
    raise first_error


def bench_attention_backend(name, candidates, inputs, reference, args, device, report):
    q, k, v, grad = inputs
    attention, gqa = first_working(candidates, q, k, v, grad)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attention(q, k, v).backward(grad)

    fwd_bwd_ms = median_ms(forward_backward, args.iters, args.warmup, device)
    fwd_ms = median_ms(lambda: attention(q, k, v), args.iters, args.warmup, device)
    with torch.no_grad():
        diff = (attention(q, k, v).float() - reference).abs().max().item()
    report("attn_backend", backend=name, status="ok", gqa=gqa, dtype=str(q.dtype).replace("torch.", ""),
           fwd_bwd_ms=fwd_bwd_ms, fwd_ms=fwd_ms, max_abs_diff=diff, batch=args.batch, seq_len=args.seq_len,
           heads=args.num_heads, kv_heads=args.num_kv_heads, head_dim=args.head_dim)


def bench_attention(args, device, report):
    """Every SDPA backend (GQA native, else k/v expanded), SDPA's dispatch, and the flash-attn packages."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = attention_inputs(args, device, dtype)
    reference = reference_attention(*inputs[:3], device)
    runs = [(name, [(sdpa_attention(backend, False), "native"), (sdpa_attention(backend, True), "expanded")])
            for name, backend in attention_backends(device)]
    runs += [(name, [(flash_attention(function), "native")]) for name, function in flash_attn_functions()]
    for name, candidates in runs:
        try:
            bench_attention_backend(name, candidates, inputs, reference, args, device, report)
        except Exception as error:
            report("attn_backend", backend=name, status="error", error=short_error(error))
        free_memory(device)


def bench_quant(args, device, report):
    """effective_weight() (quantize + dequantize, STE) of the MLP up projection vs its matmul on the batch."""
    cfg = model_config(args)
    hidden = int(cfg.mlp_mult * cfg.model_dim)
    torch.manual_seed(0)
    layer = train_gpt.configure_ternary(train_gpt.TernaryLinear(cfg.model_dim, hidden, cfg.bitnet_group_size), cfg).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.batch * args.seq_len, cfg.model_dim, device=device, dtype=dtype)
    weight = layer.effective_weight().detach().to(dtype)
    quant_ms = median_ms(layer.effective_weight, args.iters, args.warmup, device)
    matmul_ms = median_ms(lambda: F.linear(x, weight), args.iters, args.warmup, device)
    compiled_ms = compile_s = None
    if args.compile:
        compiled = torch.compile(layer.effective_weight, dynamic=False)
        compile_s = seconds_of(compiled, device)
        compiled_ms = median_ms(compiled, args.iters, args.warmup, device)
    report("ternary_quant", status="ok", rows=hidden, cols=cfg.model_dim, group_size=cfg.bitnet_group_size,
           tokens=x.size(0), dtype=str(dtype).replace("torch.", ""), quant_ms=quant_ms, matmul_ms=matmul_ms,
           quant_fraction=quant_ms / (quant_ms + matmul_ms), quant_compiled_ms=compiled_ms,
           quant_compiled_fraction=compiled_ms / (compiled_ms + matmul_ms) if compiled_ms else None,
           compile_s=compile_s)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(arguments):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device there is (CPU: seconds)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of layer kinds (default: all three)")
    for name in ("model-dim", "num-heads", "num-kv-heads", "seq-len", "batch", "iters", "warmup", "group-size"):
        parser.add_argument(f"--{name}", type=int, help="default: the competition shape (--dry-run: tiny)")
    parser.add_argument("--mlp-mult", type=float, help="MLP_MULT (default 4)")
    parser.add_argument("--layer-index", type=int, default=0, help="the block's layer index (LN damping, XSA/VRL)")
    parser.add_argument("--scan-chunk", type=int, help="train_gpt.SCAN_CHUNK for the skc / koopman_ssm scans (default: the trainer's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile(dynamic=False) the block and the quantizer (default: on for CUDA)")
    parser.add_argument("--json-out", help="append JSON lines here (default $OUT/layer_bench.jsonl when OUT is set)")
    parser.add_argument("--skip-attn-backends", action="store_true", help="skip the attn_backend measurements")
    parser.add_argument("--skip-quant", action="store_true", help="skip the ternary_quant measurement")
    args = parser.parse_args(arguments)
    for key, value in (DRY_SHAPE if args.dry_run else FULL_SHAPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {','.join(unknown)}; choose from {','.join(KINDS)}")
    args.kinds.sort(key=lambda kind: kind != "attn")  # attn first: the others report vs_attn
    args.head_dim = args.model_dim // args.num_heads
    if args.json_out is None and os.environ.get("OUT"):
        args.json_out = str(Path(os.environ["OUT"]) / "layer_bench.jsonl")
    return args


def main(arguments=None):
    """CLI entry point; see the module docstring. Returns the exit status."""
    start = time.perf_counter()
    args = parse_args(arguments)
    if not torch.cuda.is_available() and not args.dry_run:
        print("layer_bench: no CUDA device; the full shapes need a GPU. Run with --dry-run for the tiny CPU "
              "shapes (python tools/layer_bench.py --dry-run).", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    train_gpt.SCAN_CHUNK = args.scan_chunk or train_gpt.SCAN_CHUNK
    try:
        model_config(args)  # a bad shape fails here, naming the variable, before anything runs
    except train_gpt.ConfigError as error:
        print(f"layer_bench: {error}", file=sys.stderr)
        return 2
    report = Reporter(args.json_out)
    report("layer_bench_env", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           torch=torch.__version__, cuda=torch.version.cuda, dry_run=int(args.dry_run), compile=int(args.compile),
           flash_attn=",".join(name for name, _ in flash_attn_functions()) or "none")
    if not args.skip_quant:
        try:
            bench_quant(args, device, report)
        except Exception as error:
            report("ternary_quant", status="error", error=short_error(error))
        free_memory(device)
    if not args.skip_attn_backends:
        bench_attention(args, device, report)
    bench_blocks(args, device, report)
    report("layer_bench_done", seconds=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
