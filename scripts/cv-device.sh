#!/usr/bin/env bash
# Device-path cross-validation: the CPM of what the device would report, not of libtorch.
#
#   scripts/cv-device.sh CV_DIR [float|int8] [NAME ROOT ...]
#
# CV_DIR is the --out folder of `ma-trainer cv` with every fold run (fold-K/stage1.safetensors,
# fold-K/stage2.safetensors, cv-detections-fold-K.jsonl, cv-summary.json). For each fold K
# this exports its weights to ONNX (CV_DIR/device-VARIANT/fold-K/models), runs `ma-device detect`
# (tract) on that fold's held-out images only, then scores all folds together with
# `ma-trainer eval`, once per dataset. NAME ROOT pairs name the datasets the CV was run on
# (as its --dataset/--root pairs; default: diaretdb1 ../shared/datasets/diaretdb1); the
# held-out photos are found by file name in `ma-trainer info --paths` of those pairs. Output:
# CV_DIR/device-VARIANT/detections-VARIANT.jsonl, froc-VARIANT-NAME.png and the printed
# reports.
set -euo pipefail

cv_dir="${1:?usage: scripts/cv-device.sh CV_DIR [float|int8] [NAME ROOT ...]}"
variant="${2:-float}"
shift $(($# < 2 ? $# : 2))
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -gt 0 ] || set -- diaretdb1 "$repo/../shared/datasets/diaretdb1"
[ $(($# % 2)) -eq 0 ] || { echo "cv-device: give NAME ROOT pairs, got: $*" >&2; exit 1; }
names=()
roots=()
while [ $# -gt 0 ]; do
    [ -d "$2" ] || { echo "cv-device: no $1 dataset at $2" >&2; exit 1; }
    names+=("$1")
    roots+=("$(cd "$2" && pwd)")
    shift 2
done
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
# The photos of the CV's datasets, as the trainer's readers list them (name -> path).
data_args=()
for i in "${!names[@]}"; do data_args+=(--dataset "${names[$i]}" --root "${roots[$i]}"); done
"$bin/ma-trainer" info --paths "${data_args[@]}" >"$work/photos.tsv"
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
    python3 - "$held" "$input" "$work/photos.tsv" <<'PY'
import json, os, sys
held, dest, listing = sys.argv[1:]
found = {}
for line in open(listing):
    _, name, path = line.rstrip("\n").split("\t")
    found.setdefault(name, []).append(path)
for line in open(held):
    if not line.strip():
        continue
    name = os.path.basename(json.loads(line)["image"])
    paths = found.get(name, [])
    if len(paths) != 1:
        sys.exit(f"cv-device: held-out photo {name} is listed {len(paths)} times by `ma-trainer info --paths`")
    os.symlink(paths[0], os.path.join(dest, name))
PY
    # Fold models are workstation evaluations, never shipped: they are not signed.
    "$bin/ma-device" detect --allow-unsigned --models "$models" --variant "$variant" --input "$input" \
        --output "$work/fold-$k/detections.jsonl" --threads 2
    cat "$work/fold-$k/detections.jsonl" >>"$all"
    folds=$((folds + 1))
done
echo "device path: $folds fold(s), detections in $all"
for i in "${!names[@]}"; do
    split=()
    case "${names[$i]}" in diaretdb1 | idrid) split=(--split train) ;; esac
    echo "== ${names[$i]}"
    "$bin/ma-trainer" eval --dataset "${names[$i]}" --root "${roots[$i]}" "${split[@]}" \
        --detections "$all" --plot "$work/froc-$variant-${names[$i]}.png"
done
