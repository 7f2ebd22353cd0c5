#!/usr/bin/env bash
# Proxy benchmark: one command of at most 10 minutes on a lent 1×H100 machine.
#
# Tokenizes every ../shared/corpus/*.train.jsonl.xz (train) and fineweb.val.jsonl (val) with the challenge's
# sp8192 tokenizer, trains train_gpt.py for MAX_WALLCLOCK_SECONDS (default 240) on one GPU with the
# sliding-window eval on, and prints ONE summary line, parsed from the run's log by tools/logparse.py:
#
#   proxy roundtrip_bpb:… sliding_bpb:… bytes_total:… steps:… step_ms:… tok_s:… compile_s:… eval_s:… commit:… variant:…
#
# The GPU machine gets the repo but not ../shared, so the inputs come from the git-ignored folder .bench/,
# which tools/prepare_bench_payload.sh fills here; the device call must name it in `carry`:
#   run(command="PROXY_COMMIT=<sha> bash tools/proxy_bench.sh", carry=[".bench"])
#
# Usage:
#   bash tools/proxy_bench.sh [--dry-run] [KEY=VALUE ...]
# KEY=VALUE arguments, and any env var set before the command, pass through to train_gpt.py (variants).
# --dry-run (or PROXY_DRY_RUN=1) runs the same pipeline on the CPU: a tiny corpus slice (from .bench/, or
# ../shared/corpus/fineweb.train_1mb.jsonl when .bench/ is missing), RUN_PRESET=smoke, MAX_WALLCLOCK_SECONDS=20.
#
# The script's own settings (env vars):
#   PROXY_ENV_FILE         a KEY=VALUE file (e.g. best_known_competition.env) loaded under the KEY=VALUE arguments
#                          and any env var already set; its MAX_WALLCLOCK_SECONDS is ignored (the proxy's 240 s
#                          rule); default none: the trainer's own defaults
#   PROXY_VARIANT          variant name in the summary line (default: the env file's name and the KEY=VALUE
#                          arguments, or "default")
#   PROXY_COMMIT           commit in the summary line (default: git rev-parse --short HEAD [+ -dirty], else "unknown")
#   PROXY_BENCH_DIR        payload folder (default .bench)
#   PROXY_SHARED_DIR       shared folder for a dry run without .bench/ (default ../shared)
#   PROXY_DATA_DIR         where the shards go (default /tmp/proxy_data, dry run /tmp/proxy_dry_data); reused
#                          when its stamp says it was made from the same inputs
#   PROXY_LOG_DIR          trainer LOG_DIR (default logs); the log is also copied into $OUT when OUT is set
#   PROXY_DEADLINE_S       the whole script ends within this many seconds (default 585: the device stops at 600)
#   PROXY_MAX_TOKENIZE_S   abort when tokenization took longer than this (default 150)
#   PROXY_EVAL_RESERVE_S   seconds expected after the training clock stops: compile, exports, evals (default 200)
#   PROXY_PYTHON           python interpreter (default python3)
#   PROXY_TRAIN_SCRIPT, PROXY_TOKENIZE_SCRIPT   the trainer and tokenizer (default train_gpt.py,
#                          data/tokenize_corpus.py; tests point them at fakes)
set -euo pipefail

script_start=$SECONDS
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

say() { echo "proxy_bench: $*"; }
warn() { echo "proxy_bench: WARNING: $*"; }
die() { echo "proxy_bench: ERROR: $*" >&2; exit "${2:-1}"; }
elapsed() { echo $((SECONDS - script_start)); }

# ---------------------------------------------------------------------------------------------------------
# Arguments: --dry-run and KEY=VALUE pass-through
# ---------------------------------------------------------------------------------------------------------
dry_run=${PROXY_DRY_RUN:-0}
passthrough=()
for argument in "$@"; do
  case "$argument" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    [A-Za-z_]*=*) passthrough+=("$argument") ;;
    *) die "unknown argument '$argument' (expected --dry-run or KEY=VALUE)" ;;
  esac
done

python_bin=${PROXY_PYTHON:-python3}
train_script=${PROXY_TRAIN_SCRIPT:-train_gpt.py}
tokenize_script=${PROXY_TOKENIZE_SCRIPT:-data/tokenize_corpus.py}
bench_dir=${PROXY_BENCH_DIR:-.bench}
shared_dir=${PROXY_SHARED_DIR:-../shared}
log_dir=${PROXY_LOG_DIR:-logs}
deadline_s=${PROXY_DEADLINE_S:-585}
max_tokenize_s=${PROXY_MAX_TOKENIZE_S:-150}
eval_reserve_s=${PROXY_EVAL_RESERVE_S:-200}

env_file=${PROXY_ENV_FILE:-}
[ -z "$env_file" ] || [ -f "$env_file" ] || die "PROXY_ENV_FILE='$env_file' is not a file"
if [ -n "${PROXY_VARIANT:-}" ]; then
  variant=$PROXY_VARIANT
elif [ ${#passthrough[@]} -gt 0 ] || [ -n "$env_file" ]; then
  name_parts=()
  [ -z "$env_file" ] || name_parts+=("$(basename "$env_file" .env)")
  name_parts+=("${passthrough[@]}")
  variant=$(IFS=,; echo "${name_parts[*]}")
else
  variant=default
fi
variant=${variant// /_}

if [ -n "${PROXY_COMMIT:-}" ]; then
  commit=$PROXY_COMMIT
elif commit=$(git rev-parse --short HEAD 2>/dev/null); then
  [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit-dirty"
else
  commit=unknown
fi

[ -f "$train_script" ] || die "trainer '$train_script' not found (set PROXY_TRAIN_SCRIPT)"
[ -f "$tokenize_script" ] || die "tokenizer CLI '$tokenize_script' not found (set PROXY_TOKENIZE_SCRIPT)"

# ---------------------------------------------------------------------------------------------------------
# Inputs: the full payload in .bench/, or a tiny slice of it (or of ../shared) for the CPU dry run
# ---------------------------------------------------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
  data_dir=${PROXY_DATA_DIR:-/tmp/proxy_dry_data}
  slice_dir=$data_dir.slice
  if [ -d "$bench_dir/corpus" ]; then
    corpus_dir=$bench_dir/corpus
    tokenizer_path=$bench_dir/tokenizers/fineweb_8192_bpe.model
    train_sources=("$corpus_dir"/*.train.jsonl.xz)
  else
    corpus_dir=$shared_dir/corpus
    tokenizer_path=$shared_dir/tokenizers/fineweb_8192_bpe.model
    train_sources=("$corpus_dir/fineweb.train_1mb.jsonl")
  fi
  for path in "${train_sources[@]}" "$corpus_dir/fineweb.val.jsonl" "$tokenizer_path"; do
    [ -f "$path" ] || die "dry-run input '$path' is missing (run tools/prepare_bench_payload.sh, or set PROXY_SHARED_DIR)"
  done
  # The first documents of each train file, and of the val file: enough to exercise every stage in seconds.
  rm -rf "$slice_dir" && mkdir -p "$slice_dir"
  "$python_bin" - "$slice_dir" "$corpus_dir/fineweb.val.jsonl" "${train_sources[@]}" <<'EOF'
import lzma, os, sys
slice_dir, val_path, train_paths = sys.argv[1], sys.argv[2], sys.argv[3:]
def copy_head(source, target, documents):
    opener = lzma.open if source.endswith(".xz") else open
    with opener(source, "rt", encoding="utf-8") as reader, open(target, "w", encoding="utf-8") as writer:
        for index, line in enumerate(reader):
            if index >= documents:
                break
            writer.write(line)
for path in train_paths:
    name = os.path.basename(path).split(".")[0]
    copy_head(path, os.path.join(slice_dir, f"{name}.train.jsonl"), 200 // len(train_paths))
copy_head(val_path, os.path.join(slice_dir, "fineweb.val.jsonl"), 20)
EOF
  train_glob="$slice_dir/*.train.jsonl"
  val_file=$slice_dir/fineweb.val.jsonl
else
  data_dir=${PROXY_DATA_DIR:-/tmp/proxy_data}
  tokenizer_path=$bench_dir/tokenizers/fineweb_8192_bpe.model
  train_glob="$bench_dir/corpus/*.train.jsonl.xz"
  val_file=$bench_dir/corpus/fineweb.val.jsonl
  compgen -G "$train_glob" >/dev/null && [ -f "$val_file" ] && [ -f "$tokenizer_path" ] || die \
    "payload missing in '$bench_dir': run tools/prepare_bench_payload.sh here and name .bench in the device call's carry"
fi

# ---------------------------------------------------------------------------------------------------------
# brotli: absent on the GPU machine, so install the wheel carried in .bench/whl
# ---------------------------------------------------------------------------------------------------------
if ! "$python_bin" -c 'import brotli' 2>/dev/null; then
  if compgen -G "$bench_dir/whl/*.whl" >/dev/null; then
    "$python_bin" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$bench_dir"/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    say "installed brotli from $bench_dir/whl into /tmp/site"
  else
    warn "brotli is not importable and no wheel is in $bench_dir/whl (run tools/prepare_bench_payload.sh)"
  fi
fi

# ---------------------------------------------------------------------------------------------------------
# Tokenize (skipped when the data folder's stamp matches these inputs, e.g. the second variant of an ablation)
# ---------------------------------------------------------------------------------------------------------
stamp=$(ls -l $train_glob "$val_file" "$tokenizer_path" | awk '{print $5, $NF}' | tr '\n' ' ')
stamp_file=$data_dir/.proxy_stamp
tokenize_start=$SECONDS
if [ -f "$data_dir/meta.json" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  say "reusing shards in $data_dir"
else
  rm -rf "$data_dir"
  say "tokenizing $train_glob (train) and $val_file (val) into $data_dir"
  PYTHONUNBUFFERED=1 "$python_bin" "$tokenize_script" --inputs "$train_glob" --tokenizer "$tokenizer_path" \
    --out "$data_dir" --val-file "$val_file" --workers "$(nproc)"
  echo "$stamp" > "$stamp_file"
fi
tokenize_s=$((SECONDS - tokenize_start))
say "tokenize_s:$tokenize_s"
if [ "$tokenize_s" -gt "$max_tokenize_s" ]; then
  die "tokenization took ${tokenize_s}s > PROXY_MAX_TOKENIZE_S=${max_tokenize_s}s: too little of the 10-minute command is left to train and evaluate; speed up data/tokenize_corpus.py or raise --workers" 3
fi

# ---------------------------------------------------------------------------------------------------------
# Time budget: training clock plus compile/export/eval must fit before the deadline
# ---------------------------------------------------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
  wallclock_s=${MAX_WALLCLOCK_SECONDS:-20}
else
  wallclock_s=${MAX_WALLCLOCK_SECONDS:-240}
fi
trainer_limit_s=$((deadline_s - $(elapsed) - 10))
projected_s=$(( $(elapsed) + wallclock_s + eval_reserve_s ))
say "budget elapsed_s:$(elapsed) train_wallclock_s:$wallclock_s eval_reserve_s:$eval_reserve_s projected_total_s:$projected_s deadline_s:$deadline_s"
if [ "$trainer_limit_s" -le 0 ]; then
  die "no time left for training (elapsed $(elapsed)s, PROXY_DEADLINE_S=$deadline_s)" 3
fi
if [ "$projected_s" -gt "$deadline_s" ]; then
  warn "projected ${projected_s}s exceeds PROXY_DEADLINE_S=${deadline_s}s; the trainer is stopped at ${trainer_limit_s}s and late eval stages may be lost (lower MAX_WALLCLOCK_SECONDS)"
fi

# ---------------------------------------------------------------------------------------------------------
# Train and evaluate
# ---------------------------------------------------------------------------------------------------------
if [ -n "$env_file" ]; then
  # Loaded after the budget above, so the file's MAX_WALLCLOCK_SECONDS never replaces the proxy's (trainer_env
  # below sets it); KEY=VALUE arguments and variables set before the command win over the file.
  source tools/load_env_file.sh
  load_env_file "$env_file"
  say "loaded $env_file"
fi
# Only letters, digits, '.', '_' and '-': the device refuses to bring back other file names from $OUT.
safe_variant=${variant//[^A-Za-z0-9_.-]/_}
run_id=proxy_${safe_variant:0:80}_$(date +%Y%m%d_%H%M%S)
trainer_env=(
  DATA_PATH="$data_dir"
  TOKENIZER_PATH="$tokenizer_path"
  VOCAB_SIZE=8192
  MAX_WALLCLOCK_SECONDS="$wallclock_s"
  SLIDING_EVAL="${SLIDING_EVAL:-1}"
  RUN_ID="$run_id"
  LOG_DIR="$log_dir"
  PYTHONUNBUFFERED=1
)
if [ "$dry_run" = 1 ]; then
  trainer_env+=(RUN_PRESET=smoke CUDA_VISIBLE_DEVICES=)
fi
say "running $train_script RUN_ID=$run_id ${passthrough[*]:-}"
mkdir -p "$log_dir"
trainer_start=$SECONDS
trainer_status=0
env "${trainer_env[@]}" "${passthrough[@]}" timeout --kill-after=10 "$trainer_limit_s" \
  "$python_bin" "$train_script" || trainer_status=$?
trainer_s=$((SECONDS - trainer_start))

# ---------------------------------------------------------------------------------------------------------
# Report: copy the log, check the budget, print the summary line last
# ---------------------------------------------------------------------------------------------------------
log_file=$log_dir/$run_id.txt
[ -f "$log_file" ] || die "trainer wrote no log at $log_file (exit status $trainer_status)" 4
if [ -n "${OUT:-}" ]; then
  cp "$log_file" "$OUT/" && say "copied $log_file to \$OUT"
fi
if [ "$trainer_status" = 124 ] || [ "$trainer_status" = 137 ]; then
  warn "trainer stopped at the ${trainer_limit_s}s limit: the summary below is partial"
elif [ "$trainer_status" != 0 ]; then
  warn "trainer exited with status $trainer_status: the summary below may be partial"
fi
total_s=$(elapsed)
headroom_s=$((600 - total_s))
echo "timing tokenize_s:$tokenize_s trainer_s:$trainer_s total_s:$total_s headroom_s:$headroom_s log:$log_file"
if [ "$headroom_s" -lt 30 ]; then
  warn "only ${headroom_s}s left of the 600s device command: lower MAX_WALLCLOCK_SECONDS or the eval cost"
fi
"$python_bin" tools/logparse.py "$log_file" --commit "$commit" --variant "$variant"
exit "$trainer_status"
