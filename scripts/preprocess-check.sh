#!/usr/bin/env bash
# The same trained weights with other preprocessing settings, on every camera we can
# score: how a `[preprocess]` change alone moves the CPM (no retraining).
#
#   scripts/preprocess-check.sh MODELS_DIR 'NAME:key = value;key = value' ...
#
# For each variant this copies MODELS_DIR with the given lines added to (or replacing
# those of) its `[preprocess]` table, runs `ma-device detect` (tract, the manifest's
# default variant) on the ROC and e-ophtha samples and the DiaretDB1 training split in
# ../shared/datasets, and prints the CPM of each (`ma-trainer eval`). A variant named
# `as-shipped` with no lines measures MODELS_DIR itself. The DiaretDB1 figure is on the
# photos the shipped models were trained on: read it as "not broken", not as accuracy.
# The copies are unsigned (only the manifest changes): they run with --allow-unsigned.
#
# Example (the clipped-level fix, README "Preprocessing"):
#   scripts/preprocess-check.sh models as-shipped: \
#     'fix:clipped_levels = [1, 254];spread_floor = [0.010, 0.021, 0.084]'
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="$(cd "${1:?usage: scripts/preprocess-check.sh MODELS_DIR 'NAME:key = value;...' ...}" && pwd)"
shift
[ $# -gt 0 ] || { echo "preprocess-check: give at least one variant 'NAME:lines'" >&2; exit 1; }
data="$repo/../shared/datasets"
for d in roc e_optha_MA diaretdb1; do
    [ -d "$data/$d" ] || { echo "preprocess-check: no dataset at $data/$d" >&2; exit 1; }
done

# shellcheck source=torch-env.sh
. "$repo/scripts/torch-env.sh"
cargo build --release -q -p ma-device -p ma-trainer --manifest-path "$repo/Cargo.toml"
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

printf '%-20s %8s %8s %10s\n' variant ROC e-ophtha DiaretDB1
for variant in "$@"; do
    name="${variant%%:*}"
    lines="${variant#*:}"
    copy="$work/$name"
    mkdir -p "$copy"
    cp "$models"/*.onnx "$copy/"
    # Replace keys that are given, add the others at the end of [preprocess].
    python3 - "$models/manifest.toml" "$copy/manifest.toml" "$lines" <<'PY'
import re, sys
src, dst, lines = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(src).read()
head, sep, rest = text.partition("[preprocess]\n")
if not sep:
    sys.exit(f"preprocess-check: {src} has no [preprocess] table")
table, nxt, tail = rest.partition("\n[")
for line in filter(None, (l.strip() for l in lines.split(";"))):
    key = line.split("=")[0].strip()
    table, n = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", line, table)
    if n == 0:
        table = table.rstrip("\n") + "\n" + line + "\n"
open(dst, "w").write(head + sep + table + nxt + tail)
PY
    row=()
    for spec in roc:roc eophtha:e_optha_MA diaretdb1:diaretdb1; do
        kind="${spec%%:*}"
        root="$data/${spec#*:}"
        split=()
        [ "$kind" = diaretdb1 ] && split=(--split train)
        # detect meets DiaretDB1's ground-truth maps too and says so (exit code 1);
        # eval scores only the dataset's photos.
        "$bin/ma-device" detect --allow-unsigned --models "$copy" --input "$root" \
            --output "$copy/$kind.jsonl" >/dev/null 2>&1 || true
        row+=("$("$bin/ma-trainer" eval --dataset "$kind" --root "$root" "${split[@]}" \
            --detections "$copy/$kind.jsonl" | awk '/^CPM:/ {print $2}')")
    done
    printf '%-20s %8s %8s %10s\n' "$name" "${row[@]}"
done
