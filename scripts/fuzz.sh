#!/usr/bin/env bash
# Fuzz ma-device's input parsers with cargo-fuzz (libFuzzer + AddressSanitizer): each
# target of device/fuzz runs for a fixed time and the script fails on any crash, panic,
# timeout or out-of-memory.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh 3600 records    # one target for an hour
#   MA_FUZZ_ARGS="-fork=2" scripts/fuzz.sh 600   # extra libFuzzer flags
#   MA_FUZZ_BUILD_ARGS="--no-trace-compares" scripts/fuzz.sh   # extra cargo-fuzz build
#       flags (this one about triples decode_preprocess's speed; any change rebuilds all)
#
# Targets: decode_preprocess (image_io::decode_image + preprocess), records (records
# frames and log files: decode, read, open, append). Seeds: device/fuzz/corpus/<target>/
# (committed, read only); what the fuzzer finds accumulates in
# $MA_CACHE_DIR/fuzz-corpus-<checkout>/<target>/, so later runs start from there. A failing
# input is saved under device/fuzz/artifacts/<target>/; the script prints how to replay it.
#
# Needs cargo-fuzz (installed here if missing) and a nightly rustc: the `nightly` rustup
# toolchain if there is one, else the stable one with RUSTC_BOOTSTRAP=1 (CI machines
# cannot fetch another toolchain). Builds in $MA_CACHE_DIR/fuzz-target-<checkout>, apart
# from the normal build (different compiler flags).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET="${1:-${MA_FUZZ_SECONDS:-60}}"
shift || true
# A target name in the first place (`fuzz.sh records`) would reach libFuzzer as
# -max_total_time=records, which it reads as 0: fuzzing without end.
if ! [[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz.sh: the first argument is the seconds per target (e.g. \`fuzz.sh 60 records\`), got '$SECONDS_PER_TARGET'" >&2
    exit 2
fi
ALL_TARGETS=(decode_preprocess records)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

MA_CACHE_DIR="${MA_CACHE_DIR:-$HOME/.cache/ma-detector}"
KEY="$(printf '%s' "$(pwd)" | sha256sum | cut -c1-12)"
FUZZ_TARGET_DIR="$MA_CACHE_DIR/fuzz-target-$KEY"
CORPUS_DIR="$MA_CACHE_DIR/fuzz-corpus-$KEY"

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    CARGO=(cargo +nightly)
else
    echo "fuzz.sh: no nightly toolchain; using $(rustc -V) with RUSTC_BOOTSTRAP=1" >&2
    CARGO=(cargo)
    export RUSTC_BOOTSTRAP=1
fi
if ! "${CARGO[@]}" fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

cd device
started=$SECONDS
echo "== cargo fuzz build (${CARGO[*]}, $FUZZ_TARGET_DIR)"
# shellcheck disable=SC2086
"${CARGO[@]}" fuzz build ${MA_FUZZ_BUILD_ARGS:-} --target-dir "$FUZZ_TARGET_DIR"
echo "   built in $((SECONDS - started)) s"

failed=()
for target in "${TARGETS[@]}"; do
    mkdir -p "$CORPUS_DIR/$target"
    log="$(mktemp)"
    echo "== $target: ${SECONDS_PER_TARGET} s"
    status=0
    # The first corpus folder receives new inputs; the committed seeds are only read.
    # -timeout: one input taking this long is a bug (a hang or a quadratic blow-up).
    # shellcheck disable=SC2086
    "${CARGO[@]}" fuzz run ${MA_FUZZ_BUILD_ARGS:-} --target-dir "$FUZZ_TARGET_DIR" "$target" \
        "$CORPUS_DIR/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 ${MA_FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    [ -n "$runs" ] || runs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        tail -n 60 "$log"
        echo "$target: FAILED after ${runs:-?} executions (exit $status); failing input:"
        grep -o 'Test unit written to .*' "$log" | sed 's/^/   /' || true
        echo "   replay: (cd device && ${RUSTC_BOOTSTRAP:+RUSTC_BOOTSTRAP=1 }${CARGO[*]} fuzz run" \
            "${MA_FUZZ_BUILD_ARGS:+$MA_FUZZ_BUILD_ARGS }--target-dir $FUZZ_TARGET_DIR $target <file>)"
    else
        corpus_size="$(find "$CORPUS_DIR/$target" -type f | wc -l)"
        echo "$target: ok, ${runs:-?} executions in ${SECONDS_PER_TARGET} s, corpus $corpus_size inputs"
    fi
    rm -f "$log"
done
echo "fuzz.sh: $((SECONDS - started)) s in all"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: failed: ${failed[*]}" >&2
    exit 1
fi
