#!/usr/bin/env bash
# The scaled-down proxy of the competition run: the same settings (best_known_competition.env) on 1 or 2 GPUs
# for MAX_WALLCLOCK_SECONDS=240, with the data of the proxy benchmark (docs/results.md). NPROC defaults to 2:
#   NPROC=1 DATA_PATH=/tmp/proxy_data TOKENIZER_PATH=.bench/tokenizers/fineweb_8192_bpe.model bash run_skc_competition_2gpu_proxy.sh
# Multi-node settings are passed to torchrun as in run_skc_competition_8xh100.sh. Any variable set on the command
# line overrides the env file.
set -euo pipefail
cd "$(dirname "$0")"
source tools/load_env_file.sh
export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-240}
load_env_file best_known_competition.env
export RUN_ID=${RUN_ID:-proxy_$(date +%Y%m%d_%H%M%S)}
NPROC=${NPROC:-2}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NPROC" != 1 ] && [ "$NPROC" != 2 ]; then echo "NPROC=$NPROC: the proxy runs on 1 or 2 GPUs" >&2; exit 2; fi
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" train_gpt.py
