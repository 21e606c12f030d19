#!/usr/bin/env bash
# Device-path cross-validation: the CPM of what the device would report, not of libtorch.
#
#   scripts/cv-device.sh CV_DIR [float|int8]
#
# CV_DIR is the --out folder of `ma-trainer cv` with every fold run (fold-K/stage1.safetensors,
# fold-K/stage2.safetensors, cv-detections-fold-K.jsonl, cv-summary.json). For each fold K
# this exports its weights to ONNX (CV_DIR/device-VARIANT/fold-K/models), runs `ma-device detect`
# (tract) on that fold's held-out images only, then scores all folds together with
# `ma-trainer eval`. Output: CV_DIR/device-VARIANT/detections-VARIANT.jsonl, froc-VARIANT.png and
# the printed report.
set -euo pipefail

cv_dir="${1:?usage: scripts/cv-device.sh CV_DIR [float|int8]}"
variant="${2:-float}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="$repo/../shared/datasets/diaretdb1"
images="$root/resources/images/ddb1_fundusimages"
[ -d "$images" ] || { echo "cv-device: no DiaretDB1 images at $images" >&2; exit 1; }
[ -f "$cv_dir/cv-summary.json" ] || {
    echo "cv-device: $cv_dir/cv-summary.json is missing: run \`ma-trainer cv\` into $cv_dir first" >&2
    exit 1
}

# shellcheck source=torch-env.sh
. "$repo/scripts/torch-env.sh"
cargo build --release -q -p ma-device -p ma-trainer --manifest-path "$repo/Cargo.toml"
bin="$CARGO_TARGET_DIR/release"

work="$cv_dir/device-$variant"
rm -rf "$work"
mkdir -p "$work"
all="$work/detections-$variant.jsonl"
: >"$all"
folds=0
for held in "$cv_dir"/cv-detections-fold-*.jsonl; do
    k="${held##*-fold-}"
    k="${k%.jsonl}"
    weights="$cv_dir/fold-$k"
    for s in stage1 stage2; do
        [ -f "$weights/$s.safetensors" ] || {
            echo "cv-device: $weights/$s.safetensors is missing (fold $k not finished?)" >&2
            exit 1
        }
    done
    models="$work/fold-$k/models"
    "$bin/ma-trainer" export --weights "$weights" --cv "$cv_dir" --out "$models" \
        --version "cv-fold-$k" >/dev/null
    # The fold's held-out images are the ones its libtorch evaluation scored.
    input="$work/fold-$k/images"
    mkdir -p "$input"
    python3 -c 'import json,sys; [print(json.loads(l)["image"]) for l in open(sys.argv[1]) if l.strip()]' \
        "$held" | while read -r name; do
        ln -s "$images/$(basename "$name")" "$input/"
    done
    # Fold models are workstation evaluations, never shipped: they are not signed.
    "$bin/ma-device" detect --allow-unsigned --models "$models" --variant "$variant" --input "$input" \
        --output "$work/fold-$k/detections.jsonl" --threads 2
    cat "$work/fold-$k/detections.jsonl" >>"$all"
    folds=$((folds + 1))
done
echo "device path: $folds fold(s), detections in $all"
"$bin/ma-trainer" eval --dataset diaretdb1 --root "$root" --split train \
    --detections "$all" --plot "$work/froc-$variant.png"
