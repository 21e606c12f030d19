#!/usr/bin/env bash
# Every check the project has: formatting, clippy (warnings are errors) and all tests of
# the workspace. This is the README's test command, and `.ci/run` calls exactly this.
#
# First run on a fresh machine: creates the torch virtualenv (~5 min) and builds
# libtorch bindings and dependencies (~10 min). Later runs reuse both (see
# scripts/torch-env.sh for where they are cached).
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
