#!/usr/bin/env bash
# One GPU check of at most 9 minutes on one H100/H200: the measurements docs/results.md lists as missing, in
# priority order, each within what is left of the deadline:
#   1. env: nvidia-smi, torch / CUDA versions, whether flash-attn imports                     -> $OUT/env.txt
#   2. layer microbenchmark (tools/layer_bench.py): attention / SKC / Koopman blocks at the competition width,
#      every attention backend incl. flash-attn, the quantizer's share; the attn block reports the kernel the
#      trainer's dispatch takes (attention_kernel:flash_attn | sdpa)                            -> $OUT/layer_bench.txt
#   3. the competition config (best_known_competition.env) at its real per-GPU micro-batch for a short run
#      (GPU_CHECK_COMPETITION_S, default 90 s of training): tok/s per GPU, MFU, compile time, recompiles,
#      export cost, sliding BPB, eval projection                                               -> $OUT/competition.*
#   4. the proxy default (the trainer's defaults, 240 s, or what is left of the deadline)     -> $OUT/default.*
# and prints a summary (also $OUT/summary.txt). It runs from a copy of the working tree without ../shared: the
# corpus, tokenizer and a brotli wheel come from .bench/ (bash tools/prepare_bench_payload.sh here, then name
# .bench in the device call's carry):
#   run(command="GPU_CHECK_COMMIT=$(git rev-parse --short HEAD) bash tools/gpu_check.sh", carry=[".bench"], timeout_s=560)
# --dry-run runs every step on the CPU with tiny shapes (CI tests it): it checks the script, not a GPU.
#
# Settings (env vars): GPU_CHECK_DEADLINE_S (540), GPU_CHECK_COMPETITION_S (90), GPU_CHECK_DEFAULT_S (240),
# GPU_CHECK_MIN_TRAIN_S (45: a proxy run with less left is skipped, with a line saying so), GPU_CHECK_COMMIT,
# GPU_CHECK_DRY_TRAIN_S (15: training seconds of each proxy run in a dry run).
set -uo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
start=$SECONDS
dry_run=0
for argument in "$@"; do
  case "$argument" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$argument' (expected --dry-run)" >&2; exit 2 ;;
  esac
done
out=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$out"
deadline=${GPU_CHECK_DEADLINE_S:-540}
competition_s=${GPU_CHECK_COMPETITION_S:-90}
default_s=${GPU_CHECK_DEFAULT_S:-240}
min_train_s=${GPU_CHECK_MIN_TRAIN_S:-45}
commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
left() { echo $((deadline - (SECONDS - start))); }
say() { echo "gpu_check: $*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"
say "commit:$commit dry_run:$dry_run deadline_s:$deadline out:$out"

# 1. env
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  python3 -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  python3 -c 'import train_gpt as t; print("flash_attn_installed", t.FLASH_ATTENTION is not None)'
} > "$out/env.txt" 2>&1
say "env $(tail -2 "$out/env.txt" | tr '\n' ' ')"

# 2. layer microbenchmark
bench_args=()
[ "$dry_run" = 1 ] && bench_args+=(--dry-run)
limit=$(( $(left) < 150 ? $(left) : 150 ))
OUT="$out" timeout --kill-after=10 "$limit" python3 tools/layer_bench.py "${bench_args[@]}" > "$out/layer_bench.txt" 2>&1
status=$?
say "layer_bench status:$status seconds_left:$(left)"
grep -E '^(layer_bench|attn_backend|ternary_quant) ' "$out/layer_bench.txt" | tee -a "$out/summary.txt"

# 3 and 4: proxy runs (tokenized once: the second reuses the shards by their stamp)
proxy_run() {  # name, training seconds, env file or "", KEY=VALUE ...
  local name=$1 train_s=$2 env_file=$3
  shift 3
  local remaining=$(( $(left) - 150 ))  # tokenize + compile + export + eval after the training clock
  if [ "$dry_run" = 0 ] && [ "$remaining" -lt "$min_train_s" ]; then
    say "$name skipped: $(left) s left, too few for $min_train_s s of training plus the evaluation"
    return
  fi
  [ "$dry_run" = 0 ] && [ "$train_s" -gt "$remaining" ] && train_s=$remaining
  local args=()
  [ "$dry_run" = 1 ] && args+=(--dry-run) && train_s=${GPU_CHECK_DRY_TRAIN_S:-15}
  say "$name training_s:$train_s seconds_left:$(left)"
  PROXY_ENV_FILE="$env_file" PROXY_VARIANT="$name" PROXY_COMMIT="$commit" PROXY_DEADLINE_S=$(( $(left) - 5 )) \
    PROXY_LOG_DIR="$out/logs_$name" MAX_WALLCLOCK_SECONDS="$train_s" OUT="$out" \
    bash tools/proxy_bench.sh "${args[@]}" "$@" > "$out/$name.txt" 2>&1
  say "$name status:$? $(grep '^proxy ' "$out/$name.txt" | tail -1)"
  grep -hE '^(compile_stats|eval_projection|export_cost|train_budget) ' "$out/logs_$name"/*.txt 2>/dev/null | sed "s/^/$name /" | tee -a "$out/summary.txt"
}
if [ "$dry_run" = 1 ]; then  # the competition config's code path at a CPU-sized shape
  proxy_run competition "$competition_s" best_known_competition.env NUM_LAYERS=2 MODEL_DIM=64 EMBED_DIM=32 NUM_HEADS=4 \
    NUM_KV_HEADS=2 MLP_MULT=2 ROPE_DIMS=8 TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=1024 WARMUP_STEPS=1 VAL_MAX_TOKENS=4096
  proxy_run default "$default_s" "" VAL_MAX_TOKENS=4096
else
  proxy_run competition "$competition_s" best_known_competition.env
  proxy_run default "$default_s" ""
fi
say "done seconds:$((SECONDS - start))"
