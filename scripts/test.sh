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

. scripts/torch-env.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== fuzzing"
scripts/fuzz.sh
