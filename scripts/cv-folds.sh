#!/usr/bin/env bash
# A K-fold CV one fold at a time, resumable: the way to spread a long CV over sessions.
#
#   scripts/cv-folds.sh OUT [ma-trainer cv arguments ...]
#   e.g. scripts/cv-folds.sh runs/cv-0.4 --dataset diaretdb1 --root ../shared/datasets/diaretdb1 \
#            --dataset idrid --root ../shared/datasets/idrid --camera-copies 1 --aug-jpeg 40,95
#
# Runs `ma-trainer cv --out OUT --fold K --resume ...` for K = 1..FOLDS (env, default 4;
# the arguments must not contain --out, --fold or --folds), skipping folds whose
# OUT/fold-K-result.json exists, each fold's log in OUT/fold-K.log and its time and peak
# memory in OUT/fold-K.time (/usr/bin/time -v). The trainer binary is copied into OUT once, so rebuilding
# the checkout does not change what the CV runs, even across resumes; an interrupted CV resumes
# from its last epoch checkpoint when the command is run again (Adam's moments restart).
# NICE (env, default 0) lowers its priority, e.g. NICE=10 while building.
set -euo pipefail

out="${1:?usage: scripts/cv-folds.sh OUT [ma-trainer cv arguments ...]}"
shift
for a in "$@"; do
    case "$a" in --out | --fold | --folds | --out=* | --fold=* | --folds=*)
        echo "cv-folds: give OUT as the first argument and FOLDS in the environment, not $a" >&2
        exit 1 ;;
    esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=torch-env.sh
. "$repo/scripts/torch-env.sh"
cargo build --release -q -p ma-trainer --manifest-path "$repo/Cargo.toml"
mkdir -p "$out"
bin="$out/ma-trainer.bin"
[ -x "$bin" ] || cp "$CARGO_TARGET_DIR/release/ma-trainer" "$bin"
folds="${FOLDS:-4}"
started=$(date +%s)
for k in $(seq 1 "$folds"); do
    if [ -f "$out/fold-$k-result.json" ]; then
        echo "fold $k: done earlier"
        continue
    fi
    echo "fold $k: running (log $out/fold-$k.log)"
    /usr/bin/time -v -o "$out/fold-$k.time" nice -n "${NICE:-0}" "$bin" cv --out "$out" --folds "$folds" --fold "$k" \
        --resume "$@" >"$out/fold-$k.log" 2>&1 || {
        echo "cv-folds: fold $k failed; the end of $out/fold-$k.log:" >&2
        tail -5 "$out/fold-$k.log" >&2
        exit 1
    }
    grep -E "^(mean CPM|all folds)" "$out/fold-$k.log" || true
done
echo "cv-folds: $folds fold(s) in $(( ($(date +%s) - started) / 60 )) min; summary $out/cv-summary.json"
