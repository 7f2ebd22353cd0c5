#!/usr/bin/env bash
# Fill .bench/ with what tools/proxy_bench.sh needs on the GPU machine, which gets the repo but not ../shared
# and has no internet and no brotli:
#   .bench/corpus/*.train.jsonl.xz, .bench/corpus/fineweb.val.jsonl   (from ../shared/corpus, ~41 MB)
#   .bench/tokenizers/fineweb_8192_bpe.model                          (from ../shared/tokenizers)
#   .bench/whl/brotli-*.whl                                           (pip download, CPython 3.12 manylinux)
# .bench/ is added to .git/info/exclude, so it travels to the device only when named in `carry`:
#   run(command="PROXY_COMMIT=$(git rev-parse --short HEAD) bash tools/proxy_bench.sh", carry=[".bench"])
# The whole working tree that travels must stay under 64 MiB, so the payload must stay under 60 MiB.
#
# Usage: bash tools/prepare_bench_payload.sh      (SHARED_DIR overrides ../shared)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
shared_dir=${SHARED_DIR:-../shared}
bench_dir=.bench
max_bytes=$((60 * 1024 * 1024))

[ -d "$shared_dir/corpus" ] || { echo "prepare_bench_payload: no $shared_dir/corpus (set SHARED_DIR)" >&2; exit 1; }
mkdir -p "$bench_dir/corpus" "$bench_dir/tokenizers" "$bench_dir/whl"

# install -m 644: the shared files are read-only, and copies must be overwritable by the next run.
install -m 644 "$shared_dir"/corpus/*.train.jsonl.xz "$shared_dir/corpus/fineweb.val.jsonl" "$bench_dir/corpus/"
install -m 644 "$shared_dir/tokenizers/fineweb_8192_bpe.model" "$bench_dir/tokenizers/"

if ! compgen -G "$bench_dir/whl/[Bb]rotli-*.whl" >/dev/null; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$bench_dir/whl" brotli
fi

exclude_file=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude_file")"
grep -qxF '/.bench/' "$exclude_file" 2>/dev/null || echo '/.bench/' >> "$exclude_file"

payload_bytes=$(du -sb "$bench_dir" | cut -f1)
echo "prepare_bench_payload: $bench_dir holds $payload_bytes bytes ($((payload_bytes / 1024 / 1024)) MiB; limit 60 MiB)"
ls -l "$bench_dir"/corpus "$bench_dir"/tokenizers "$bench_dir"/whl
if [ "$payload_bytes" -gt "$max_bytes" ]; then
  echo "prepare_bench_payload: ERROR: payload over 60 MiB: the device call's working tree would exceed 64 MiB" >&2
  exit 1
fi
