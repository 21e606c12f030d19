#!/usr/bin/env bash
# How the stage-1 weight in the score behaves away from DiaretDB1, to set beside
# `ma-trainer score-sweep` (which measures it on the DiaretDB1 cross-validation only).
#
#   scripts/stage1-weight-check.sh [MODELS_DIR] [WEIGHT ...]
#
# For each weight (default 0 0.25 0.5 0.75 1 1.5) this copies MODELS_DIR (default models/)
# with `[scoring] stage1_weight` changed, runs `ma-device detect` (tract, the manifest's
# default variant) and prints, per weight:
#   - CPM on the e-ophtha and ROC samples in ../shared/datasets (other cameras, JPEG);
#   - the fraction of the MAs of 6 synthetic frames (`ma-device synth`, seeds 1-6) found
#     within 3 px among the best 2N detections of a frame holding N MAs (the rule of
#     device/tests/shipped_models.rs).
# The copies are unsigned (only the manifest changes): they run with --allow-unsigned.
# The samples are small (4 e-ophtha images with 7 MAs, 5 ROC images with 21): read a
# difference of one lesion as noise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="$(cd "${1:-$repo/models}" && pwd)"
shift || true
weights=("$@")
[ ${#weights[@]} -gt 0 ] || weights=(0 0.25 0.5 0.75 1 1.5)
data="$repo/../shared/datasets"
for d in e_optha_MA roc; do
    [ -d "$data/$d" ] || { echo "stage1-weight-check: no dataset at $data/$d" >&2; exit 1; }
done
grep -q '^stage1_weight = ' "$models/manifest.toml" || {
    echo "stage1-weight-check: $models/manifest.toml has no stage1_weight line" >&2
    exit 1
}

# shellcheck source=torch-env.sh
. "$repo/scripts/torch-env.sh"
cargo build --release -q -p ma-device -p ma-trainer --manifest-path "$repo/Cargo.toml"
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$bin/ma-device" synth --output-dir "$work/synthetic" --count 6 --seed 1 >/dev/null

cpm() { # dataset-kind root detections
    "$bin/ma-trainer" eval --dataset "$1" --root "$2" --detections "$3" | awk '/^CPM:/ {print $2}'
}

printf '%-14s %-12s %-10s %s\n' "stage-1 weight" "e-ophtha CPM" "ROC CPM" "synthetic MAs found"
for w in "${weights[@]}"; do
    m="$work/models-$w"
    cp -r "$models" "$m"
    rm -f "$m/manifest.toml.sig"
    sed -i "s/^stage1_weight = .*/stage1_weight = $w/" "$m/manifest.toml"
    for d in e_optha_MA roc synthetic; do
        input="$data/$d"
        [ "$d" = synthetic ] && input="$work/synthetic"
        # On a dataset root `detect` also meets the ground-truth PNGs and writes an error
        # line for each (exit code 1); `eval` ignores lines for images outside the dataset.
        "$bin/ma-device" detect --allow-unsigned --models "$m" --input "$input" \
            --output "$work/$d-$w.jsonl" --threads 2 >/dev/null 2>"$work/$d-$w.log" || true
        [ -s "$work/$d-$w.jsonl" ] || { cat "$work/$d-$w.log" >&2; exit 1; }
    done
    e=$(cpm eophtha "$data/e_optha_MA" "$work/e_optha_MA-$w.jsonl")
    r=$(cpm roc "$data/roc" "$work/roc-$w.jsonl")
    s=$(python3 - "$work/synthetic" "$work/synthetic-$w.jsonl" <<'EOF'
import json, math, os, sys
frames, detections = sys.argv[1], sys.argv[2]
found = total = 0
for line in open(detections):
    d = json.loads(line)
    name = os.path.splitext(os.path.basename(d["image"]))[0]
    mas = json.load(open(os.path.join(frames, name + ".json")))["microaneurysms"]
    best = d["detections"][: 2 * len(mas)]
    found += sum(any(math.hypot(b["x"] - m["x"], b["y"] - m["y"]) <= 3 for b in best) for m in mas)
    total += len(mas)
print(f"{found}/{total} ({found / total:.3f})")
EOF
)
    printf '%-14s %-12s %-10s %s\n' "$w" "$e" "$r" "$s"
done
