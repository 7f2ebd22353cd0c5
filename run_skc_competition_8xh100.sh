#!/usr/bin/env bash
# The competition run: 8xH100 (per node), 10 minutes of training with best_known_competition.env, then the
# submission build into records/. Any variable set on the command line overrides the env file, e.g.
#   RUN_ID=try1 NUM_LAYERS=11 bash run_skc_competition_8xh100.sh
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT are passed to torchrun (run the script on every node).
set -euo pipefail
cd "$(dirname "$0")"
source tools/load_env_file.sh
load_env_file best_known_competition.env
export RUN_ID=${RUN_ID:-skc_$(date +%Y%m%d_%H%M%S)}
NPROC=${NPROC:-8}; NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" train_gpt.py
if [ "$NODE_RANK" = 0 ]; then
  python3 build_submission.py --config best_known_competition.env --out "records/$(date +%Y-%m-%d)_${RUN_ID}" \
    --log "${LOG_DIR:-logs}/${RUN_ID}.txt" --submission-json "${OUT_DIR:-artifacts}/${RUN_ID}/submission.json"
fi
