#!/usr/bin/env bash
# Cascade benchmark (issues 4 and 7), in one run on one machine:
#   - tract (through the device library, `ma-bench`): decode, preprocessing, stage 1,
#     stage 2, end to end and peak RSS, at 1 and 2 threads, float and int8 models, on a
#     1500x1152 DiaretDB1 image and a 2544x1696 e-ophtha image;
#   - onnxruntime (Python, the test venv) on exactly the same network inputs (ma-bench
#     dumps them), at the same thread counts; ratios tract/onnxruntime;
#   - multiply-adds per image from the ONNX graphs, the machine's measured float32
#     throughput (sgemm) and the fraction of it each runtime achieves.
#
#   scripts/bench.sh [--models DIR] [--runs N] [--rounds R] [--out DIR] [--no-eophtha]
#
# Defaults: --models models, --runs 10, --rounds 2, --out out/bench. Every configuration
# is measured in R rounds of N/R runs, the rounds one after the other over all
# configurations (so a burst of load from other processes spreads over all of them), and
# the samples pooled. Prints the report (markdown) and writes it to OUT/report.md with the
# raw JSON beside it. The machine should be otherwise idle: the load average is recorded
# with every figure, and the CPU time of one-thread runs is reported beside wall time.
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=models
RUNS=10
ROUNDS=2
OUT=out/bench
EOPHTHA_TOO=1
while [ $# -gt 0 ]; do
    case "$1" in
        --models) MODELS="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-eophtha) EOPHTHA_TOO=0; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

DATA=../shared/datasets
DDB1="$DATA/diaretdb1/resources/images/ddb1_fundusimages/image001.png"
EOPHTHA="$DATA/e_optha_MA/MA/E0000001/C0000886.jpg"
IMAGES=("$DDB1")
[ "$EOPHTHA_TOO" = 1 ] && IMAGES+=("$EOPHTHA")
for f in "$MODELS/manifest.toml" "${IMAGES[@]}"; do
    if [ ! -f "$f" ]; then
        echo "bench.sh: $f is missing (models: --models DIR; images: the shared datasets beside the repository)" >&2
        exit 1
    fi
done

. scripts/torch-env.sh
cargo build --release --quiet -p ma-device --bin ma-bench
BENCH="$CARGO_TARGET_DIR/release/ma-bench"
mkdir -p "$OUT"
rm -f "$OUT"/tract.jsonl "$OUT"/ort.jsonl "$OUT"/macs.jsonl "$OUT"/peak.jsonl

{
    echo "## Machine"
    echo
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores," \
        "$(grep -o -w 'avx2\|fma\|avx512f\|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "- memory: $(free -m | awk '/Mem:/ {print $2}') MiB; kernel $(uname -r)"
    echo "- rustc: $(rustc --version | cut -d' ' -f2); tract $(grep -A1 'name = "tract-core"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p');" \
        "onnxruntime $(python -c 'import onnxruntime; print(onnxruntime.__version__)'); numpy $(python -c 'import numpy; print(numpy.__version__)')"
    echo "- models: $MODELS ($(sed -n 's/^version = "\(.*\)"/\1/p' "$MODELS/manifest.toml" | head -1)), $RUNS timed runs per figure in $ROUNDS rounds"
    echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- command: scripts/bench.sh --models $MODELS --runs $RUNS --rounds $ROUNDS"
} > "$OUT/machine.md"

for threads in 1 2; do
    echo "== measured float throughput, $threads thread(s)" >&2
    python scripts/bench_ort.py peak --threads "$threads" --tmp "$OUT" >> "$OUT/peak.jsonl"
done

PER_ROUND=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
for round in $(seq 1 "$ROUNDS"); do
    for img in "${IMAGES[@]}"; do
        tag=$(basename "$img" | sed 's/\.[^.]*$//')
        for variant in float int8; do
            dump="$OUT/dump-$tag-$variant"
            for threads in 1 2; do
                # Per-node profiles once: DiaretDB1, float, first round.
                profile=()
                if [ "$round" = 1 ] && [ "$img" = "$DDB1" ] && [ "$variant" = float ]; then
                    profile=(--profile)
                fi
                echo "== round $round/$ROUNDS: $tag $variant, $threads thread(s): tract" >&2
                "$BENCH" --models "$MODELS" --image "$img" --variant "$variant" \
                    --threads "$threads" --runs "$PER_ROUND" --dump "$dump" --json \
                    "${profile[@]}" >> "$OUT/tract.jsonl"
                echo "== round $round/$ROUNDS: $tag $variant, $threads thread(s): onnxruntime" >&2
                python scripts/bench_ort.py ort --models "$MODELS" --variant "$variant" \
                    --dump "$dump" --threads "$threads" --runs "$PER_ROUND" "${profile[@]}" \
                    >> "$OUT/ort.jsonl"
            done
            if [ "$round" = 1 ]; then
                python scripts/bench_ort.py macs --models "$MODELS" --variant "$variant" \
                    --dump "$dump" >> "$OUT/macs.jsonl"
            fi
        done
    done
done

for threads in 1 2; do
    echo "== measured float throughput again, $threads thread(s)" >&2
    python scripts/bench_ort.py peak --threads "$threads" --tmp "$OUT" >> "$OUT/peak.jsonl"
done

{
    cat "$OUT/machine.md"
    echo "- load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    python scripts/bench_ort.py report --tract "$OUT/tract.jsonl" --ort "$OUT/ort.jsonl" \
        --macs "$OUT/macs.jsonl" --peak "$OUT/peak.jsonl"
} | tee "$OUT/report.md"
