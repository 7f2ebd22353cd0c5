"""CPU mini-proxy: a fixed-shape, fixed-step benchmark on 2 CPU cores, with the official baseline beside it.

What it runs (the defaults of issue 13; every run of the table uses exactly these, plus the variant's env):
  data   ../shared/corpus/fineweb.train.jsonl.xz tokenized once with the sp1024 tokenizer (sp8192 with
         --vocab 8192) into a cache (.bench/cpu_proxy/sp1024); val = the full fineweb.val.jsonl split
  shape  4 layers x 128, 4 heads, 2 KV heads, MLP 2x, seq 256, 4,096 tokens per step, 400 steps
         (ITERATIONS, not wall-clock: rows compare across machines), LR warm-down over the last 40%,
         no compile warm-up steps, Muon momentum warm-up 100 steps
  ours   train_gpt.py: trains, exports, reloads in memory from the artifact file, runs the declared eval plan
  peer   ../shared/peers/baseline_train_gpt.py made CPU-runnable by ../shared/peers/cpu_baseline.py, at the same
         shape, data, tokens and steps (WARMDOWN_ITERS = 40% of the steps); its int8+zlib round trip is its row

Each finished run appends one row under the "CPU mini-proxy" heading of docs/results.md (or --results FILE):
  date | commit | variant | env | seed | reported_stage | reported_bpb | roundtrip_bpb | prequant_bpb |
  export_delta_bpb | bytes_total | steps | ms_step | train_s | total_s | threads | command
BPB values are copied at full precision from the run's submission.json (the baseline: its `_exact` line).

Usage:
  bash tools/cpu_proxy.sh                                   # our default, one row
  bash tools/cpu_proxy.sh --peer                            # the official baseline's row
  bash tools/cpu_proxy.sh --name no_ema EMA_ENABLED=0       # a variant: KEY=VALUE pass to train_gpt.py
  bash tools/cpu_proxy.sh --seeds 1337,1338,1339            # the noise rows (one per seed)
  bash tools/cpu_proxy.sh --variants tools/variants/cpu_table.txt --only engram moe
  bash tools/cpu_proxy.sh --eval-only ARTIFACT --name sliding SLIDING_EVAL=1   # an eval stage on an artifact
  bash tools/cpu_proxy.sh --dry-run [--peer]                # 4 steps on a 40-document slice (CI): tests the tool
A dry run's rows go to a temporary file unless --results is given, and say `dry-run` in the variant column.
"""
from __future__ import annotations

import argparse
import datetime
import json
import lzma
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablate  # noqa: E402  (variants files, table rows, git commit: shared with the GPU proxy)
import logparse  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("CPU_PROXY_SHARED_DIR", REPO_ROOT.parent / "shared"))
CACHE_DIR = Path(os.environ.get("CPU_PROXY_CACHE_DIR", REPO_ROOT / ".bench" / "cpu_proxy"))
DEFAULT_RESULTS = REPO_ROOT / "docs" / "results.md"

STEPS = 400
SHAPE = dict(NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2", TRAIN_SEQ_LEN="256",
             TRAIN_BATCH_TOKENS="4096", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="0", MUON_MOMENTUM_WARMUP_STEPS="100")
OURS = dict(WARMDOWN_FRACTION="0.4", GRAD_ACCUM_STEPS="1", COMPILE="0", TRAIN_LOG_EVERY="50", EVAL_BATCH_SEQS="32")
PEER = dict(VAL_LOSS_EVERY="0", VAL_BATCH_SIZE="65536", TRAIN_LOG_EVERY="50")
DRY_RUN = dict(steps=4, train_docs=40, val_docs=4)

COLUMNS = ("date", "commit", "variant", "env", "seed", "reported_stage", "reported_bpb", "roundtrip_bpb",
           "prequant_bpb", "export_delta_bpb", "bytes_total", "steps", "ms_step", "train_s", "total_s", "threads",
           "command")
HEADER = "| " + " | ".join(COLUMNS) + " |"
SEPARATOR = "|" + "|".join("---" for _ in COLUMNS) + "|"
HEADING = "## CPU mini-proxy"


class ProxyError(RuntimeError):
    """A missing input or a failed run; the message says which and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Data: tokenized once into the cache
# ---------------------------------------------------------------------------------------------------------

def tokenizer_path(vocab):
    path = SHARED_DIR / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not path.is_file():
        raise ProxyError(f"{path} is missing: the CPU proxy needs ../shared beside the repository "
                         "(or CPU_PROXY_SHARED_DIR=...)")
    return path


def head_jsonl(source, target, documents):
    """The first `documents` lines of a JSONL(.xz) file."""
    opener = lzma.open if str(source).endswith(".xz") else open
    with opener(source, "rt", encoding="utf-8") as reader, open(target, "w", encoding="utf-8") as writer:
        for index, line in enumerate(reader):
            if index >= documents:
                break
            writer.write(line)


def prepare_data(vocab, dry_run=False):
    """Shards of the train file and the val file in the cache (made once; a stamp of the inputs decides)."""
    train = SHARED_DIR / "corpus" / "fineweb.train.jsonl.xz"
    val = SHARED_DIR / "corpus" / "fineweb.val.jsonl"
    tokenizer = tokenizer_path(vocab)
    for path in (train, val):
        if not path.is_file():
            raise ProxyError(f"{path} is missing (../shared/corpus); see ../shared/corpus/SOURCES.md")
    out = CACHE_DIR / (f"sp{vocab}" + ("_dry" if dry_run else ""))
    stamp = json.dumps([str(p.resolve()) + f":{p.stat().st_size}" for p in (train, val, tokenizer)] + [dry_run])
    if (out / "meta.json").is_file() and (out / ".stamp").is_file() and (out / ".stamp").read_text() == stamp:
        return out, tokenizer
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("fineweb_*.bin"):
        old.unlink()
    if dry_run:  # a slice of each file, enough to exercise the whole pipeline in seconds
        slice_dir = out / "slice"
        slice_dir.mkdir(exist_ok=True)
        head_jsonl(train, slice_dir / "train.jsonl", DRY_RUN["train_docs"])
        head_jsonl(val, slice_dir / "val.jsonl", DRY_RUN["val_docs"])
        train, val = slice_dir / "train.jsonl", slice_dir / "val.jsonl"
    sys.path.insert(0, str(REPO_ROOT / "data"))
    import tokenize_corpus
    tokenize_corpus.tokenize_corpus([str(train)], str(tokenizer), str(out), val_file=str(val), workers=min(2, os.cpu_count() or 1))
    (out / ".stamp").write_text(stamp)
    return out, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------

def run_process(command, env, cwd, log_path):
    """Run `command`, its output to `log_path`; returns (exit status, output text, seconds)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        status = subprocess.run(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    return status, Path(log_path).read_text(errors="replace"), time.monotonic() - start


def base_env(threads):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_ours(data, tokenizer, vocab, steps, variant_env, seed, work, threads, eval_only=None):
    """train_gpt.py at the proxy setting; returns the row's numbers."""
    run_id = f"cpu_{int(time.time() * 1000)}"
    env = base_env(threads)
    env.update(SHAPE, **OURS, ITERATIONS=str(steps), VOCAB_SIZE=str(vocab), DATA_PATH=str(data),
               TOKENIZER_PATH=str(tokenizer), SEED=str(seed), RUN_ID=run_id, LOG_DIR=str(work / "logs"),
               OUT_DIR=str(work / "out"))
    env.update(variant_env)
    if eval_only:
        env.update(EVAL_ONLY="1", ARTIFACT=str(Path(eval_only).resolve()))
    status, output, seconds = run_process([sys.executable, str(REPO_ROOT / "train_gpt.py")], env, REPO_ROOT,
                                          work / f"{run_id}.out")
    if status != 0:
        raise ProxyError(f"train_gpt.py failed (exit {status}); log {work / run_id}.out:\n{output[-3000:]}")
    summary = logparse.summarize(logparse.parse_log(output))
    submission = json.loads((work / "out" / run_id / "submission.json").read_text())
    stages = submission.get("stages", {})
    prequant = logparse.last_eval(logparse.parse_log(output), "prequant")
    train_seconds = (summary["step_ms"] or 0) * (summary["steps"] or 0) / 1000 if not eval_only else None
    return dict(reported_stage=submission["stage"], reported_bpb=submission["val_bpb"],
                roundtrip_bpb=stages.get("roundtrip", {}).get("val_bpb"),
                prequant_bpb=None if prequant is None else prequant["val_bpb"],
                export_delta_bpb=summary["export_delta_bpb"], bytes_total=submission.get("bytes_total"),
                steps=submission.get("steps"), ms_step=summary["step_ms"], train_s=train_seconds, total_s=seconds)


def peer_script(work):
    """The official baseline, patched by ../shared/peers/cpu_baseline.py to run on a CPU."""
    source, patcher = SHARED_DIR / "peers" / "baseline_train_gpt.py", SHARED_DIR / "peers" / "cpu_baseline.py"
    for path in (source, patcher):
        if not path.is_file():
            raise ProxyError(f"{path} is missing (../shared/peers)")
    target = work / "baseline_cpu.py"
    subprocess.run([sys.executable, str(patcher), str(source), str(target)], check=True, capture_output=True)
    return target


def run_peer(data, tokenizer, vocab, steps, seed, work, threads):
    """The baseline at the same shape, data, tokens and steps; its int8+zlib round trip is the reported BPB."""
    env = base_env(threads)
    env.update(SHAPE, **PEER, ITERATIONS=str(steps), WARMDOWN_ITERS=str(round(0.4 * steps)), VOCAB_SIZE=str(vocab),
               DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), SEED=str(seed), RUN_ID="peer")
    script = peer_script(work)
    status, output, seconds = run_process([sys.executable, str(script)], env, work, work / "peer.out")
    if status != 0:
        raise ProxyError(f"the baseline failed (exit {status}); log {work / 'peer.out'}:\n{output[-3000:]}")
    return parse_peer(output, seconds)


def parse_peer(output, seconds):
    """The baseline's own log lines: the exact int8+zlib round trip, the last val line before export, the size."""
    values = dict(reported_stage="int8_zlib_roundtrip", export_delta_bpb=None, total_s=seconds)
    for line in output.splitlines():
        fields = dict(token.split(":", 1) for token in line.split() if ":" in token)
        if line.startswith("final_int8_zlib_roundtrip_exact"):
            values["reported_bpb"] = values["roundtrip_bpb"] = float(fields["val_bpb"])
        elif line.startswith("step:") and "val_bpb" in fields:
            values["prequant_bpb"] = float(fields["val_bpb"])
            values["steps"] = int(fields["step"].split("/")[0])
            values["train_s"] = float(fields["train_time"].rstrip("ms")) / 1000
            values["ms_step"] = float(fields["step_avg"].rstrip("ms"))
        elif line.startswith("Total submission size int8+zlib:"):
            values["bytes_total"] = int(line.split(":")[1].split()[0])
    if "reported_bpb" not in values:
        raise ProxyError("the baseline's log has no final_int8_zlib_roundtrip_exact line")
    values["export_delta_bpb"] = values["reported_bpb"] - values.get("prequant_bpb", float("nan"))
    return values


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------

def cell(value):
    if value is None:
        return "NA"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def make_row(values, commit, variant, env, seed, threads, command):
    values = dict(values, date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), commit=commit, variant=variant,
                  env=ablate.code_cell(ablate.format_env(env)), seed=seed, threads=threads,
                  command=ablate.code_cell(command))
    for key in ("reported_bpb", "roundtrip_bpb", "prequant_bpb"):  # full precision, as measured
        if isinstance(values.get(key), float):
            values[key] = repr(values[key])
    return "| " + " | ".join(ablate.table_cell(values.get(c) if c in ("env", "command") else cell(values.get(c)))
                             for c in COLUMNS) + " |"


def append(results, row):
    """Append `row` to the CPU mini-proxy table of `results`, creating the heading and table if absent."""
    path = Path(results)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if HEADER not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{HEADER}\n{SEPARATOR}\n"
        path.write_text(text, encoding="utf-8")
    ablate.append_row(path, row, header=HEADER)


# ---------------------------------------------------------------------------------------------------------
# Summary: each row against the default's seeds, with the noise rule of issue 13
# ---------------------------------------------------------------------------------------------------------

def read_rows(results):
    """The CPU mini-proxy table of `results` as a list of {column: text} (dry-run rows left out)."""
    lines = Path(results).read_text(encoding="utf-8").splitlines()
    if HEADER not in lines:
        raise ProxyError(f"{results} has no CPU mini-proxy table")
    rows = []
    for line in lines[lines.index(HEADER) + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        row = dict(zip(COLUMNS, cells))
        if "dry-run" not in row.get("variant", ""):
            rows.append(row)
    return rows


def summarize(rows, default="default"):
    """Markdown lines: the default's mean and spread (max - min over its seeds), then per other row its delta, read
    as the issue asks: a training variant against the default's mean; an eval-only row (an eval stage on the default's
    artifact: its roundtrip is that artifact's) against its own roundtrip. |delta| < 2 x spread = no measurable effect."""
    bpb = lambda row: float(row["reported_bpb"])
    seeds = [bpb(r) for r in rows if r["variant"] == default]
    if len(seeds) < 2:
        raise ProxyError(f"the summary needs >= 2 seeds of '{default}' (bash tools/cpu_proxy.sh --seeds 1337,1338,1339)")
    mean, spread = sum(seeds) / len(seeds), max(seeds) - min(seeds)
    lines = [f"default: {len(seeds)} seeds, mean {mean:.4f}, spread (max - min) {spread:.4f}; noise rule: |delta| < "
             f"{2 * spread:.4f} = no measurable effect", "",
             "| variant | env | reported_stage | reported_bpb | against | delta_bpb | bytes_total | ms_step | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["variant"] == default:
            continue
        stage_row = r["steps"] == "NA" and r["roundtrip_bpb"] not in ("NA", "")
        reference, against = (float(r["roundtrip_bpb"]), "its roundtrip") if stage_row else (mean, "default mean")
        delta = bpb(r) - reference
        verdict = "no measurable effect" if abs(delta) < 2 * spread else ("better" if delta < 0 else "worse")
        lines.append(f"| {r['variant']} | {r['env']} | {r['reported_stage']} | {bpb(r):.4f} | {against} | {delta:+.4f} | "
                     f"{r['bytes_total']} | {r['ms_step']} | {verdict} |")
    return lines


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env", nargs="*", help="KEY=VALUE settings of the variant (train_gpt.py env vars)")
    parser.add_argument("--name", help="variant name (default: the KEY=VALUE list, or 'default')")
    parser.add_argument("--variants", type=Path, help="variants file (`name: KEY=VALUE ...` lines)")
    parser.add_argument("--only", nargs="+", help="with --variants: run only these names")
    parser.add_argument("--peer", action="store_true", help="run the official baseline instead of train_gpt.py")
    parser.add_argument("--seeds", default="1337", help="comma list of seeds: one row per seed (default 1337)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {STEPS}; dry run {DRY_RUN['steps']})")
    parser.add_argument("--vocab", type=int, default=1024, choices=(1024, 8192), help="tokenizer (default sp1024)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--eval-only", metavar="ARTIFACT", help="score ARTIFACT with the variant's eval settings")
    parser.add_argument("--results", type=Path, help="results file (default docs/results.md; dry run: a temp file)")
    parser.add_argument("--commit", help="commit for the rows (default: git, with -dirty)")
    parser.add_argument("--keep", type=Path, help="keep logs and artifacts in this folder (default: a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="4 steps on a 40-document slice: tests the tool")
    parser.add_argument("--summarize", action="store_true", help="print each row of --results against the default's seeds (runs nothing)")
    return parser.parse_args(argv)


def variants_of(options):
    if options.variants:
        variants = ablate.parse_variants(options.variants.read_text())
        if options.only:
            unknown = set(options.only) - {name for name, _ in variants}
            if unknown:
                raise ProxyError(f"--only names not in {options.variants}: {', '.join(sorted(unknown))}")
            variants = [(n, e) for n, e in variants if n in options.only]
        return variants
    env = {}
    for token in options.env:
        key, equals, value = token.partition("=")
        if not equals or not ablate.ENV_NAME.match(key):
            raise ProxyError(f"{token!r} is not KEY=VALUE")
        env[key] = value
    default_name = "peer_baseline" if options.peer else (",".join(options.env) or "default")
    return [(options.name or default_name, env)]


def command_text(options, name, env, seed):
    parts = ["bash", "tools/cpu_proxy.sh"] + (["--dry-run"] if options.dry_run else []) + (["--peer"] if options.peer else [])
    parts += ["--name", name, "--seeds", str(seed)]
    if options.steps and options.steps != STEPS:
        parts += ["--steps", str(options.steps)]
    if options.vocab != 1024:
        parts += ["--vocab", str(options.vocab)]
    if options.eval_only:
        parts += ["--eval-only", options.eval_only]
    return " ".join(shlex.quote(p) for p in parts + [f"{k}={v}" for k, v in env.items()])


def main(argv=None):
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    if options.summarize:
        print("\n".join(summarize(read_rows(options.results or DEFAULT_RESULTS))))
        return 0
    steps = options.steps or (DRY_RUN["steps"] if options.dry_run else STEPS)
    results = options.results or (Path(tempfile.mkdtemp(prefix="cpu_proxy_rows_")) / "results.md" if options.dry_run
                                  else DEFAULT_RESULTS)
    commit = options.commit or ablate.git_commit() or "unknown"
    data, tokenizer = prepare_data(options.vocab, options.dry_run)
    seeds = [int(s) for s in options.seeds.split(",") if s.strip()]
    if options.keep:
        options.keep.mkdir(parents=True, exist_ok=True)
    for name, env in variants_of(options):
        for seed in seeds:
            work = Path(tempfile.mkdtemp(prefix="cpu_proxy_", dir=options.keep))
            print(f"cpu_proxy: {name} seed:{seed} steps:{steps} work:{work}", flush=True)
            if options.peer:
                values = run_peer(data, tokenizer, options.vocab, steps, seed, work, options.threads)
            else:
                values = run_ours(data, tokenizer, options.vocab, steps, env, seed, work, options.threads, options.eval_only)
            variant = f"{name} (dry-run)" if options.dry_run else name
            row = make_row(values, commit, variant, env, seed, options.threads, command_text(options, name, env, seed))
            append(results, row)
            print(f"cpu_proxy: appended to {results}:\n{row}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ProxyError as error:
        print(f"cpu_proxy: error: {error}", file=sys.stderr)
        sys.exit(1)
