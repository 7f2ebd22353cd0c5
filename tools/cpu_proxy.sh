#!/usr/bin/env bash
# CPU mini-proxy (issue 13): fixed shape and steps on 2 CPU cores, the official baseline beside it. All the
# options are tools/cpu_proxy.py's (bash tools/cpu_proxy.sh --help):
#   bash tools/cpu_proxy.sh                         # our default: one row in docs/results.md (about 8 minutes)
#   bash tools/cpu_proxy.sh --peer                  # the official baseline at the same setting
#   bash tools/cpu_proxy.sh --dry-run               # 4 steps on a tiny slice: checks the tool (CI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" tools/cpu_proxy.py "$@"
