#!/usr/bin/env python3
"""Check an exported ONNX model against the ONNX reference tools.

    check_onnx.py MODEL.onnx INPUT.npy EXPECTED.npy [--atol 1e-4]

1. onnx.checker.check_model(model, full_check=True): schema, opset and strict shape
   inference, so a file tract happens to accept but the standard does not is caught.
2. onnxruntime (CPUExecutionProvider) on INPUT.npy (fed to the model's only input) must
   reproduce EXPECTED.npy (its first output) within --atol.

Exits 0 when both pass; otherwise prints one line saying what failed and exits 1
(2 when onnx / onnxruntime / numpy are missing or the arguments are wrong).
"""

import argparse
import sys


def fail(msg, code=1):
    print(f"check_onnx: {msg}", file=sys.stderr)
    sys.exit(code)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("input")
    ap.add_argument("expected")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        fail(f"{e}; run with the project venv's python ($MA_VENV/bin/python, "
             "see scripts/torch-env.sh)", 2)

    try:
        model = onnx.load(args.model)
    except Exception as e:  # noqa: BLE001 - any parse error is a failure to report
        fail(f"{args.model}: cannot be parsed as ONNX: {e}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001
        fail(f"{args.model}: onnx.checker.check_model(full_check=True) failed: {e}")

    x = np.load(args.input)
    expected = np.load(args.expected)
    try:
        sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        fail(f"{args.model}: onnxruntime cannot load it: {e}")
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        fail(f"{args.model}: expected one graph input, found {[i.name for i in inputs]}")
    try:
        got = sess.run(None, {inputs[0].name: x})[0]
    except Exception as e:  # noqa: BLE001
        fail(f"{args.model}: onnxruntime failed on {args.input} {x.shape}: {e}")
    if got.shape != expected.shape:
        fail(f"{args.model}: onnxruntime output shape {got.shape}, expected {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not np.isfinite(diff) or diff > args.atol:
        fail(f"{args.model}: onnxruntime differs from {args.expected} by {diff:.3g} "
             f"(atol {args.atol:g})")
    print(f"{args.model}: check_model ok, onnxruntime max abs diff {diff:.3g} "
          f"(ir {model.ir_version}, opset {model.opset_import[0].version}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__})")


if __name__ == "__main__":
    main()
