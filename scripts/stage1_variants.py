#!/usr/bin/env python3
"""Speed of stage-1 network shapes in tract and onnxruntime, before any of them is trained
(issue 22: "shapes tract runs well"). Each variant is built in torch with random weights
and exported like the shipped stage 1 (ONNX opset 13, one image in, the stage-2-stride
margin map out, so `ma-bench --stage1-onnx` can time it on a real photo). Accuracy is not
measured here: a variant worth its speed must then go through the CV as a trainer option.

  python scripts/stage1_variants.py export --out DIR [--only NAME ...]
      writes DIR/NAME.onnx for every variant
  python scripts/stage1_variants.py ort --dump DUMP --out DIR [--runs 3]
      one-thread CPU ms of every DIR/*.onnx in onnxruntime on DUMP/stage1_input.npy
      (written by `ma-bench --dump DUMP`), one JSON line each

Variants (the shipped trunk is conv1 3->16, pool, conv2 16->32, pool, conv3 32->48,
conv4 48 dil 2, conv5 48 dil 4, 2x upsampling + skip from conv2, conv6 1x1 80->24,
conv7 24->24, 1x1 head; LeakyReLU after every conv):
  shipped        the shipped shapes (a random-weight twin of models/stage1-float.onnx)
  strided1       conv1 at stride 2 in place of conv1 + the first pool (4x fewer conv1
                 positions, no full-resolution activation)
  s2d            space-to-depth (2x2 -> 12 channels) then conv1 12->16 at half resolution
  pool_first     the shipped net with each max-pool before its LeakyReLU (they commute:
                 the same outputs, the activation on a quarter of the values)
  split6         conv6 split in two 1x1 convs, the coarse one before the upsampling (the
                 same outputs up to rounding: a 1x1 conv commutes with nearest upsampling)
  strided1_split6  both
  nodil          conv4 and conv5 undilated (smaller field: needs the CV)
"""

import argparse
import glob
import json
import os

import numpy as np


def build(name):
    import torch
    from torch import nn

    act = lambda: nn.LeakyReLU(0.01)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.name = name
            s = name
            if s.startswith("strided1"):
                self.front = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), act())
            elif s == "s2d":
                self.front = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 16, 3, 1, 1), act())
            elif s == "pool_first":
                self.front = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.MaxPool2d(2), act())
            else:
                self.front = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), act(), nn.MaxPool2d(2))
            self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1), act())
            d4, d5 = (1, 1) if s == "nodil" else (2, 4)
            self.deep = nn.Sequential(
                nn.MaxPool2d(2),
                nn.Conv2d(32, 48, 3, 1, 1), act(),
                nn.Conv2d(48, 48, 3, 1, d4, dilation=d4), act(),
                nn.Conv2d(48, 48, 3, 1, d5, dilation=d5), act(),
            )
            if s == "pool_first":
                self.deep[0] = nn.Identity()
                self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1))
            self.split6 = s.endswith("split6")
            if self.split6:
                self.conv6_deep = nn.Conv2d(48, 24, 1)
                self.conv6_skip = nn.Conv2d(32, 24, 1, bias=False)
            else:
                self.conv6 = nn.Conv2d(80, 24, 1)
            self.tail = nn.Sequential(act(), nn.Conv2d(24, 24, 3, 1, 1), act(), nn.Conv2d(24, 1, 1))

        def forward(self, x):
            x = self.front(x)
            skip = self.conv2(x)
            if self.name == "pool_first":
                deep = self.deep(nn.functional.leaky_relu(nn.functional.max_pool2d(skip, 2), 0.01))
                skip = nn.functional.leaky_relu(skip, 0.01)
            else:
                deep = self.deep(skip)
            up = lambda t: nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")
            if self.split6:
                y = up(self.conv6_deep(deep)) + self.conv6_skip(skip)
            else:
                y = self.conv6(torch.cat([up(deep), skip], 1))
            return self.tail(y)

    return Net().eval()


VARIANTS = ["shipped", "strided1", "s2d", "pool_first", "split6", "strided1_split6", "nodil"]


def cmd_export(a):
    import torch

    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    for name in a.only or VARIANTS:
        net = build(name)
        x = torch.zeros(1, 3, 128, 128)
        path = os.path.join(a.out, f"{name}.onnx")
        torch.onnx.export(net, x, path, opset_version=13, input_names=["image"],
                          output_names=["margin"], dynamo=False,
                          dynamic_axes={"image": {2: "height", 3: "width"},
                                        "margin": {2: "h2", 3: "w2"}})
        print(json.dumps({"variant": name, "onnx": path}))


def cmd_ort(a):
    # Same session settings and timing as the benchmark's onnxruntime side.
    from bench_ort import session, timed

    x = np.load(os.path.join(a.dump, "stage1_input.npy"))
    for path in sorted(glob.glob(os.path.join(a.out, "*.onnx"))):
        s = session(path, threads=1)
        feed = {s.get_inputs()[0].name: x}
        (_, cpu), _ = timed(lambda: s.run(None, feed), a.runs, warmup=1)
        print(json.dumps({"variant": os.path.basename(path)[:-5], "ort_cpu_ms": cpu,
                          "median": float(np.median(cpu))}))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    e.add_argument("--only", nargs="*")
    o = sub.add_parser("ort")
    o.add_argument("--dump", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    {"export": cmd_export, "ort": cmd_ort}[a.cmd](a)


if __name__ == "__main__":
    main()
