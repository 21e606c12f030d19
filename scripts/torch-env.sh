# Source this file (`. scripts/torch-env.sh`) before building or running anything that
# links libtorch (the trainer, the cross-crate tests). It makes the Python virtualenv
# with torch 2.13.0 that `tch` 0.26 builds against, if missing, and exports:
#   LIBTORCH_USE_PYTORCH=1   torch-sys finds libtorch inside the venv's torch wheel
#   LD_LIBRARY_PATH          so binaries and tests find libtorch_cpu.so at run time
#   MA_VENV                  the venv (its python has torch, numpy, onnx, onnxruntime)
#   CARGO_TARGET_DIR         a build cache outside the checkout, one per checkout path:
#                            it survives `git clean`, and two checkouts never share one
#                            (cargo would take one's test binaries, which embed their
#                            source path, as fresh for the other)
# Everything lives under MA_CACHE_DIR (default ~/.cache/ma-detector).

MA_CACHE_DIR="${MA_CACHE_DIR:-$HOME/.cache/ma-detector}"
MA_VENV="$MA_CACHE_DIR/venv"
MA_TORCH_VERSION="2.13.0"
MA_PY_PACKAGES=("torch==$MA_TORCH_VERSION" "numpy" "onnx" "onnxruntime")

ma_venv_ok() {
    [ -x "$MA_VENV/bin/python" ] &&
        "$MA_VENV/bin/python" - "$MA_TORCH_VERSION" <<'PY' 2>/dev/null
import sys, importlib.metadata as md
ok = md.version("torch").split("+")[0] == sys.argv[1]
for p in ("numpy", "onnx", "onnxruntime"): md.version(p)
sys.exit(0 if ok else 1)
PY
}

if ! ma_venv_ok; then
    echo "torch-env: creating $MA_VENV with ${MA_PY_PACKAGES[*]} (first time only, several minutes)" >&2
    mkdir -p "$MA_CACHE_DIR"
    python3 -m venv "$MA_VENV" || return 1 2>/dev/null || exit 1
    "$MA_VENV/bin/pip" install --quiet --disable-pip-version-check "${MA_PY_PACKAGES[@]}" ||
        { echo "torch-env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
fi

MA_TORCH_LIB="$("$MA_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)"
if [ ! -f "$MA_TORCH_LIB/libtorch_cpu.so" ]; then
    echo "torch-env: no libtorch_cpu.so under '$MA_TORCH_LIB'; delete $MA_VENV and retry" >&2
    return 1 2>/dev/null || exit 1
fi

export MA_CACHE_DIR MA_VENV
export LIBTORCH_USE_PYTORCH=1
export PATH="$MA_VENV/bin:$PATH"
export LD_LIBRARY_PATH="$MA_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MA_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MA_REPO_KEY="$(printf '%s' "$MA_REPO" | sha256sum | cut -c1-12)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$MA_CACHE_DIR/target-$MA_REPO_KEY}"
