#!/usr/bin/env bash
# Every check the project has: formatting, clippy (warnings are errors), all tests of
# the workspace, and a short fuzzing run of the input parsers (scripts/fuzz.sh, 60 s per
# target; MA_FUZZ_SECONDS changes it). This is the README's test command, and `.ci/run`
# calls exactly this.
#
# First run on a fresh machine: creates the torch virtualenv (~5 min) and builds
# libtorch bindings and dependencies (~10 min), and builds the fuzz targets with the
# sanitizer (estimated 13-15 min on an idle 2-core machine). Later runs reuse all of it
# (see scripts/torch-env.sh and scripts/fuzz.sh for where they are cached).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d ../shared/datasets ]; then
    echo "scripts/test.sh: ../shared/datasets is missing: the tests read the real datasets there" >&2
    exit 1
fi

# A clean build of everything here takes about 7 GB (test build 3-4 GB, fuzz build 3 GB)
# plus 5 GB for the torch virtualenv when it is made; a full disk makes the linker die
# with SIGBUS, which says nothing about the cause. Check first.
MA_CACHE_DIR="${MA_CACHE_DIR:-$HOME/.cache/ma-detector}"
mkdir -p "$MA_CACHE_DIR"
need_gb="${MA_MIN_FREE_GB:-$([ -d "$MA_CACHE_DIR/venv" ] && echo 8 || echo 13)}"
free_gb=$(( $(df -Pk "$MA_CACHE_DIR" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
if [ "$free_gb" -lt "$need_gb" ]; then
    echo "scripts/test.sh: only ${free_gb} GB free on the disk of $MA_CACHE_DIR; the build needs" \
        "about ${need_gb} GB. Free space (old build caches: $MA_CACHE_DIR/target-*)" \
        "or set MA_MIN_FREE_GB to override" >&2
    exit 1
fi

. scripts/torch-env.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# A board build without the synthetic generator must still build (and lint clean).
cargo clippy -p ma-device --no-default-features --lib --bins -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== fuzzing"
scripts/fuzz.sh
