#!/usr/bin/env python3
"""onnxruntime side of the cascade benchmark, multiply-add count, machine throughput and
the combined report (called by scripts/bench.sh; run from the test venv that
scripts/torch-env.sh puts on PATH).

Subcommands (each prints one JSON object on stdout, except `report`):

  ort    --models DIR --variant float|int8 --dump DIR --threads N [--runs R] [--profile]
         Times stage 1 and stage 2 in onnxruntime on the inputs `ma-bench --dump DIR`
         wrote (the padded canonical planes and the candidates' patches, so both runtimes
         see exactly the same numbers), stage 2 in the same zero-padded batches as the
         device. Reports the largest difference from tract's outputs.
  macs   --models DIR --variant float|int8 --dump DIR
         Multiply-adds of every Conv and Gemm node (from the ONNX graphs, shapes inferred
         at the dumped input sizes): stage 1 per image, stage 2 per patch and per image.
  peak   --threads N
         The machine's measured float32 throughput: best of a 2048^3 sgemm in numpy
         (OpenBLAS) and a 2048^3 MatMul in onnxruntime (MLAS), at N threads.
  report --tract A.json ... --ort B.json ... --macs C.json ... --peak D.json ...
         The side-by-side table (markdown).
  rewrite SRC.onnx DST.onnx [--pool-before-relu]
         Experimental copy of an exported model with the same outputs (for
         `ma-bench --stage1-onnx/--stage2-onnx`): MaxPool moved before LeakyRelu (they
         commute, the activation then runs on a quarter of the values). Float models only.
  quantize SRC.onnx DST.onnx --format qdq|qoperator --dump DIR [DIR ...] [--crop N]
         Experimental copy of a float model with int8 activations as well as weights (for
         `ma-bench --stage1-onnx/--stage2-onnx`, issue 22's "int8 that pays"): only the
         Conv nodes are quantized (qoperator: QLinearConv; qdq: QuantizeLinear/
         DequantizeLinear around a float Conv), weights int8 per output channel,
         activations uint8 calibrated (min/max) on N x N crops of the stage-1 inputs (or
         the stage-2 patches) that `ma-bench --dump DIR` wrote.
"""

import argparse
import json
import os
import statistics
import sys
import time
import tomllib


def manifest_files(models, variant):
    with open(os.path.join(models, "manifest.toml"), "rb") as f:
        m = tomllib.load(f)
    files = {}
    for e in m["models"]:
        if e["variant"] == variant:
            files[e["role"]] = os.path.join(models, e["file"])
    return m, files


def timed(fn, runs, warmup):
    """Wall-clock and calling-thread CPU milliseconds of `runs` calls (after `warmup`)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    out = None
    for _ in range(runs):
        c = time.thread_time()
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.thread_time() - c) * 1e3)
    return (times, cpu), out


def stats(tc):
    times, cpu = tc if isinstance(tc, tuple) else (tc, [])
    out = {
        "median": round(statistics.median(times), 3),
        "min": round(min(times), 3),
        "max": round(max(times), 3),
        "n": len(times),
        "samples": [round(x, 3) for x in times],
    }
    if cpu:
        out["cpu_median"] = round(statistics.median(cpu), 3)
        out["cpu_min"] = round(min(cpu), 3)
        out["cpu_samples"] = [round(x, 3) for x in cpu]
    return out


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def session(path, threads, profile_prefix=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def node_profile(prof_path):
    """Mean duration (ms) per node of an onnxruntime profile, in first-seen order."""
    with open(prof_path) as f:
        events = json.load(f)
    per = {}
    order = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in per:
            per[name] = []
            order.append(name)
        per[name].append(
            (e["dur"] / 1e3, e.get("args", {}).get("op_name", ""),
             e.get("args", {}).get("output_type_shape", ""))
        )
    out = []
    for name in order:
        runs = per[name]
        out.append({
            "name": name,
            "op": runs[0][1],
            "ms": round(sum(r[0] for r in runs) / len(runs), 3),
            "output": json.dumps(runs[0][2]),
        })
    return out


def cmd_ort(a):
    import numpy as np

    _, files = manifest_files(a.models, a.variant)
    with open(os.path.join(a.dump, "meta.json")) as f:
        meta = json.load(f)
    x1 = np.load(os.path.join(a.dump, "stage1_input.npy"))
    x2 = np.load(os.path.join(a.dump, "stage2_input.npy"))
    m1_tract = np.load(os.path.join(a.dump, "stage1_margin.npy"))
    m2_tract = np.load(os.path.join(a.dump, "stage2_margin.npy"))
    batch = meta["stage2_batch"]
    n = x2.shape[0]

    prof = None
    s1 = session(files["stage1"], a.threads)
    in1 = s1.get_inputs()[0].name
    t1, out1 = timed(lambda: s1.run(None, {in1: x1})[0], a.runs, a.warmup)
    if a.profile:
        sp = session(files["stage1"], a.threads,
                     os.path.join(a.dump, f"ort-profile-{a.variant}-{a.threads}t"))
        for _ in range(1 + min(a.runs, 3)):
            sp.run(None, {in1: x1})
        prof = node_profile(sp.end_profiling())

    s2 = session(files["stage2"], a.threads)
    in2 = s2.get_inputs()[0].name
    chunks = []
    for i in range(0, n, batch):
        c = x2[i:i + batch]
        if c.shape[0] < batch:
            c = np.concatenate([c, np.zeros((batch - c.shape[0],) + c.shape[1:], np.float32)])
        chunks.append((c, min(batch, n - i)))

    def run2():
        return np.concatenate([s2.run(None, {in2: c})[0][:k, 0] for c, k in chunks]) \
            if chunks else np.zeros(0, np.float32)

    t2, out2 = timed(run2, a.runs, a.warmup)
    # Stage 2 in one dynamic batch of exactly n patches (onnxruntime's best case).
    t2_one, _ = timed(lambda: s2.run(None, {in2: x2})[0] if n else None, a.runs, a.warmup)

    d1 = float(np.abs(out1[0, 0] - m1_tract).max())
    d2 = float(np.abs(out2 - m2_tract).max()) if n else 0.0
    json.dump({
        "image": meta["image"],
        "variant": a.variant,
        "threads": a.threads,
        "runs": a.runs,
        "onnxruntime": __import__("onnxruntime").__version__,
        "stage1_input": list(x1.shape),
        "candidates": n,
        "stage2_batches": len(chunks),
        "ms": {"stage1_net": stats(t1), "stage2_net": stats(t2),
               "stage2_net_one_batch": stats(t2_one)},
        "max_abs_diff_vs_tract": {"stage1": d1, "stage2": d2},
        "loadavg": loadavg(),
        "stage1_profile": prof,
    }, sys.stdout)
    print()


def conv_like_macs(model, input_shape):
    """Multiply-adds of each Conv / Gemm / MatMul node with the graph input fixed to
    `input_shape`."""
    import onnx
    from onnx import numpy_helper, shape_inference

    g = model.graph
    dims = g.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, input_shape):
        d.ClearField("dim_param")
        d.dim_value = v
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + \
            list(inferred.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: numpy_helper.to_array(i).shape for i in g.initializer}
    # Weights-only int8: DequantizeLinear outputs have their constant input's shape.
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    layers = []
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w = inits[node.input[1]]
            out = shapes[node.output[0]]
            # w is [out, in / group, kh, kw]: each output value takes in/group*kh*kw.
            macs = out[0] * out[1] * out[2] * out[3] * w[1] * w[2] * w[3]
            layers.append({"name": node.output[0], "op": "Conv",
                           "weight": list(w), "output": out, "macs": macs})
        elif node.op_type in ("Gemm", "MatMul"):
            w = inits[node.input[1]]
            out = shapes[node.output[0]]
            k = w[1] if (node.op_type == "Gemm" and attrs.get("transB", 0)) else w[0]
            macs = 1
            for d in out:
                macs *= d
            macs *= k
            layers.append({"name": node.output[0], "op": node.op_type,
                           "weight": list(w), "output": out, "macs": macs})
    return layers


def cmd_macs(a):
    import onnx

    _, files = manifest_files(a.models, a.variant)
    with open(os.path.join(a.dump, "meta.json")) as f:
        meta = json.load(f)
    w, h = meta["stage1_input"]
    p = meta["patch_size"]
    l1 = conv_like_macs(onnx.load(files["stage1"]), [1, 3, h, w])
    l2 = conv_like_macs(onnx.load(files["stage2"]), [1, 3, p, p])
    s1 = sum(x["macs"] for x in l1)
    per_patch = sum(x["macs"] for x in l2)
    n = meta["candidates"]
    computed = meta["stage2_batches"] * meta["stage2_batch"]
    json.dump({
        "image": meta["image"],
        "variant": a.variant,
        "stage1_input": [w, h],
        "stage1_macs": s1,
        "stage1_layers": l1,
        "stage2_macs_per_patch": per_patch,
        "stage2_layers": l2,
        "candidates": n,
        "stage2_patches_computed": computed,
        "stage2_macs_useful": per_patch * n,
        "stage2_macs_computed": per_patch * computed,
        "cascade_macs_computed": s1 + per_patch * computed,
    }, sys.stdout)
    print()


def cmd_peak(a):
    # Thread counts of the BLAS must be set before numpy is imported.
    for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(a.threads)
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    n = a.size
    flop = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n), dtype=np.float32)
    y = rng.standard_normal((n, n), dtype=np.float32)
    t_np, _ = timed(lambda: x @ y, a.runs, 2)

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = os.path.join(a.tmp, f"matmul-{n}.onnx")
    onnx.save(model, path)
    s = session(path, a.threads)
    t_ort, _ = timed(lambda: s.run(None, {"a": x, "b": y}), a.runs, 2)
    g_np = flop / (min(t_np[0]) / 1e3) / 1e9
    g_ort = flop / (min(t_ort[0]) / 1e3) / 1e9
    # At one thread both run on the calling thread: per CPU-second of that thread, the
    # core's throughput whatever else the machine is doing.
    cpu = None
    if a.threads == 1:
        cpu = round(max(flop / (min(t_np[1]) / 1e3), flop / (min(t_ort[1]) / 1e3)) / 1e9, 2)
    json.dump({
        "threads": a.threads,
        "size": n,
        "numpy_openblas_gflops": round(g_np, 2),
        "onnxruntime_matmul_gflops": round(g_ort, 2),
        "gflops": round(max(g_np, g_ort), 2),
        "cpu_gflops": cpu,
        "loadavg": loadavg(),
    }, sys.stdout)
    print()


def load_lines(paths):
    out = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    out.append(json.loads(line))
    return out


def merge(records, key):
    """Records of the same configuration from several rounds -> one, with the samples of
    every round pooled (medians and minima recomputed) and the worst peak memory."""
    out = {}
    for r in records:
        k = key(r)
        if k not in out:
            out[k] = json.loads(json.dumps(r))
            continue
        m = out[k]
        for name, st in r["ms"].items():
            if name not in m["ms"]:
                m["ms"][name] = st
                continue
            for field in ("samples", "cpu_samples"):
                if field in st:
                    m["ms"][name].setdefault(field, []).extend(st[field])
        for k2, v in r.get("rss_mib", {}).items():
            if v is not None and (m["rss_mib"].get(k2) is None or v > m["rss_mib"][k2]):
                m["rss_mib"][k2] = v
        for field in ("stage1_profile", "stage2_profile"):
            if not m.get(field) and r.get(field):
                m[field] = r[field]
        m["loadavg"] = m["loadavg"] + "; " + r["loadavg"]
    for m in out.values():
        for st in m["ms"].values():
            if st.get("samples"):
                st["median"] = statistics.median(st["samples"])
                st["min"] = min(st["samples"])
                st["n"] = len(st["samples"])
            if st.get("cpu_samples"):
                st["cpu_median"] = statistics.median(st["cpu_samples"])
                st["cpu_min"] = min(st["cpu_samples"])
    return out


def cmd_report(a):
    tract = list(merge(load_lines(a.tract),
                       lambda t: (t["image"], t["variant"], t["threads"])).values())
    ort = merge(load_lines(a.ort), lambda o: (o["image"], o["variant"], o["threads"]))
    macs = {(m["image"], m["variant"]): m for m in load_lines(a.macs)}
    # The throughput is measured at the start and at the end of a run: keep the best.
    peak = {}
    for p in load_lines(a.peak):
        if p["threads"] not in peak or p["gflops"] > peak[p["threads"]]["gflops"]:
            peak[p["threads"]] = p

    def md(d, k, field="median"):
        return d["ms"][k][field]

    def r(x, y):
        return f"{x / y:.2f}" if y else "-"

    def load1(d):
        return " / ".join(x.split()[0] for x in d["loadavg"].split("; "))

    def name(t):
        return os.path.basename(t["image"])

    def ort_e2e(t, o, field="median"):
        """tract's end to end with both networks' times replaced by onnxruntime's."""
        return (md(t, "detect", field) - md(t, "stage1_net", field) - md(t, "stage2_net", field)
                + md(o, "stage1_net", field) + md(o, "stage2_net", field))

    lines = []
    lines.append("### tract through the device library, per stage (ms)\n")
    lines.append("Median over all runs (min in brackets). Stage 1 = network + candidate search, "
                 "stage 2 = patch extraction + network, as `Cascade::detect` times them; end to "
                 "end = decoded image in, detections out (the file's decoding is the decode "
                 "column). Peak RSS: `VmHWM` of a process that loaded the models and decoded and "
                 "detected the image repeatedly. Load: 1-minute load average at the end of "
                 "each round.\n")
    lines.append("| image | variant | threads | decode | preprocess | stage 1 | stage 2 | "
                 "end to end | candidates | peak RSS | load |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for t in tract:
        rss = t["rss_mib"]["peak_e2e"]
        lines.append(
            f"| {name(t)} {t['width']}x{t['height']} | {t['variant']} | {t['threads']} | "
            f"{md(t, 'decode'):.0f} | {md(t, 'preprocess'):.0f} | {md(t, 'stage1'):.0f} | "
            f"{md(t, 'stage2'):.0f} | **{md(t, 'detect'):.0f}** ({md(t, 'detect', 'min'):.0f}) | "
            f"{t['candidates']} | {rss:.0f} MiB = {rss * 1.048576:.0f} MB | {load1(t)} |")

    lines.append("\n### tract vs onnxruntime, same inputs, same thread count (ms)\n")
    lines.append("The two networks alone on identical inputs (the padded canonical planes; the "
                 "candidates' patches in the same zero-padded batches of "
                 f"{tract[0]['stage2_batch'] if tract else 32}). End to end for onnxruntime = "
                 "tract's end to end with both networks' times replaced by onnxruntime's "
                 "(preprocessing, candidate search and patch extraction are the same Rust code). "
                 "Median (min in brackets); ratio of medians.\n")
    lines.append("| image | variant | threads | stage 1 tract | stage 1 ort | ratio | "
                 "stage 2 tract | stage 2 ort | ratio | end to end tract | end to end ort | "
                 "ratio | max abs diff s1 / s2 |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in tract:
        o = ort.get((t["image"], t["variant"], t["threads"]))
        if o is None:
            continue
        s1t, s2t, s1o, s2o = (md(t, "stage1_net"), md(t, "stage2_net"),
                              md(o, "stage1_net"), md(o, "stage2_net"))
        e2t, e2o = md(t, "detect"), ort_e2e(t, o)
        d = o["max_abs_diff_vs_tract"]
        lines.append(
            f"| {name(t)} | {t['variant']} | {t['threads']} | {s1t:.0f} ({md(t, 'stage1_net', 'min'):.0f}) | "
            f"{s1o:.0f} ({md(o, 'stage1_net', 'min'):.0f}) | **{r(s1t, s1o)}** | "
            f"{s2t:.0f} ({md(t, 'stage2_net', 'min'):.0f}) | {s2o:.0f} ({md(o, 'stage2_net', 'min'):.0f}) | "
            f"**{r(s2t, s2o)}** | {e2t:.0f} | {e2o:.0f} | **{r(e2t, e2o)}** | "
            f"{d['stage1']:.1e} / {d['stage2']:.1e} |")

    rows = [(t, ort.get((t["image"], t["variant"], 1))) for t in tract if t["threads"] == 1]
    rows = [(t, o) for t, o in rows if o and "cpu_median" in o["ms"]["stage1_net"]]
    if rows:
        lines.append("\n### One thread, CPU time (ms): the same comparison, insensitive to "
                     "other processes\n")
        lines.append("CPU time of the calling thread, which does all the work at one thread in "
                     "both runtimes (`/proc/thread-self/schedstat`, Python `time.thread_time`). "
                     "Median.\n")
        cpu_peak = max((p.get("cpu_gflops") or 0 for p in load_lines(a.peak)), default=0)
        if cpu_peak:
            lines.append(f"Percentages: 2 x multiply-adds per CPU-second over the core's measured "
                         f"{cpu_peak:.1f} GFLOP per CPU-second (the best one-thread sgemm, timed "
                         f"the same way).\n")
        lines.append("| image | variant | stage 1 tract | stage 1 ort | ratio | stage 2 tract | "
                     "stage 2 ort | ratio | end to end tract | end to end ort | ratio |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for t, o in rows:
            c = lambda d, k: d["ms"][k]["cpu_median"]  # noqa: E731
            s1t, s2t, s1o, s2o = (c(t, "stage1_net"), c(t, "stage2_net"),
                                  c(o, "stage1_net"), c(o, "stage2_net"))
            e2t = c(t, "detect")
            e2o = e2t - s1t - s2t + s1o + s2o
            mm = macs.get((t["image"], t["variant"]))

            def pct(ms_, flop):
                if not (mm and cpu_peak):
                    return ""
                return f" ({100 * flop / (ms_ / 1e3) / cpu_peak:.0f}%)"
            f1 = 2 * mm["stage1_macs"] / 1e9 if mm else 0
            f2 = 2 * mm["stage2_macs_computed"] / 1e9 if mm else 0
            lines.append(
                f"| {name(t)} | {t['variant']} | {s1t:.0f}{pct(s1t, f1)} | {s1o:.0f}{pct(s1o, f1)} | "
                f"**{r(s1t, s1o)}** | {s2t:.0f}{pct(s2t, f2)} | {s2o:.0f}{pct(s2o, f2)} | "
                f"**{r(s2t, s2o)}** | {e2t:.0f}{pct(e2t, f1 + f2)} | {e2o:.0f}{pct(e2o, f1 + f2)} | "
                f"**{r(e2t, e2o)}** |")

    lines.append("\n### tract: float vs int8 (weights-only) models (median ms)\n")
    lines.append("| image | threads | stage 1 float | stage 1 int8 | stage 2 float | "
                 "stage 2 int8 | end to end float | end to end int8 |")
    lines.append("|---|---|---|---|---|---|---|---|")
    by = {(t["image"], t["threads"], t["variant"]): t for t in tract}
    for (img, th, v), f in by.items():
        if v != "float" or (img, th, "int8") not in by:
            continue
        i = by[(img, th, "int8")]
        cpu = ""
        if th == 1 and "cpu_median" in f["ms"]["stage1_net"]:
            cpu = (f" (CPU: stage 1 {f['ms']['stage1_net']['cpu_median']:.0f} vs "
                   f"{i['ms']['stage1_net']['cpu_median']:.0f}, stage 2 "
                   f"{f['ms']['stage2_net']['cpu_median']:.0f} vs "
                   f"{i['ms']['stage2_net']['cpu_median']:.0f})")
        lines.append(
            f"| {os.path.basename(img)} | {th} | {md(f, 'stage1_net'):.0f} | "
            f"{md(i, 'stage1_net'):.0f} | {md(f, 'stage2_net'):.0f} | {md(i, 'stage2_net'):.0f} | "
            f"{md(f, 'detect'):.0f} | {md(i, 'detect'):.0f}{cpu} |")

    if macs:
        lines.append("\n### Multiply-adds and achieved fraction of the measured float "
                     "throughput\n")
    for (img, variant), m in macs.items():
        if variant != "float":
            continue
        w, h = m["stage1_input"]
        layer_list = ", ".join(f"{x['name']} {x['macs'] / 1e9:.2f}" for x in m["stage1_layers"])
        lines.append(f"{os.path.basename(img)}: stage 1 on the padded {w}x{h} canonical image: "
                     f"{m['stage1_macs'] / 1e9:.2f} G multiply-adds ({layer_list}). "
                     f"Stage 2: {m['stage2_macs_per_patch'] / 1e6:.1f} M per patch, "
                     f"{m['candidates']} candidates in {m['stage2_patches_computed']} computed "
                     f"patches = {m['stage2_macs_computed'] / 1e9:.2f} G. Cascade: "
                     f"{m['cascade_macs_computed'] / 1e9:.2f} G multiply-adds per image "
                     f"({2 * m['cascade_macs_computed'] / 1e9:.1f} GFLOP).\n")
    if macs:
        lines.append("Measured float32 throughput, best of a 2048^3 sgemm in numpy/OpenBLAS "
                     "and a 2048^3 MatMul in onnxruntime, measured at the start and at the end: "
                     + ", ".join(
                         f"{th} thread(s) **{p['gflops']:.1f} GFLOP/s** (OpenBLAS "
                         f"{p['numpy_openblas_gflops']:.1f}, onnxruntime "
                         f"{p['onnxruntime_matmul_gflops']:.1f}; load {p['loadavg'].split()[0]})"
                         for th, p in sorted(peak.items())) + ". The best one-thread "
                     "figure per CPU-second of the calling thread (insensitive to other "
                     "processes): " + f"{max((p.get('cpu_gflops') or 0 for p in load_lines(a.peak)), default=0):.1f} GFLOP/s.\n")
        cpu_peak = max((p.get("cpu_gflops") or 0 for p in load_lines(a.peak)), default=0)
        lines.append("Achieved GFLOP/s (2 x multiply-adds / wall time; median time, best run in "
                     "brackets) and its fraction of the machine's throughput at the same thread "
                     "count, taken as the larger of the wall-clock sgemm figure and threads x "
                     f"the per-CPU-second figure ({cpu_peak:.1f}): wall-clock sgemm figures "
                     "undercount when other processes run. End to end counts the networks' "
                     "multiply-adds over the whole `detect` time.\n")
        lines.append("| image | variant | threads | runtime | stage 1 GFLOP/s | % | "
                     "stage 2 GFLOP/s | % | end to end GFLOP/s | % |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for t in tract:
            mm = macs.get((t["image"], t["variant"]))
            p = peak.get(t["threads"])
            if not mm or not p or mm["stage1_input"] != t["stage1_input"]:
                continue
            f1, f2 = 2 * mm["stage1_macs"] / 1e9, 2 * mm["stage2_macs_computed"] / 1e9
            o = ort.get((t["image"], t["variant"], t["threads"]))
            runs = [("tract", t, t)]
            if o:
                runs.append(("onnxruntime", o, None))
            for rt, d, _ in runs:
                vals = []
                for field in ("median", "min"):
                    a1, a2 = md(d, "stage1_net", field), md(d, "stage2_net", field)
                    e = md(t, "detect", field) if rt == "tract" else ort_e2e(t, o, field)
                    vals.append((f1 / (a1 / 1e3), f2 / (a2 / 1e3), (f1 + f2) / (e / 1e3)))
                (g1, g2, ge), (b1, b2, be) = vals
                pk = max(p["gflops"], t["threads"] * cpu_peak)
                lines.append(
                    f"| {name(t)} | {t['variant']} | {t['threads']} | {rt} | "
                    f"{g1:.1f} ({b1:.1f}) | {100 * g1 / pk:.0f}% ({100 * b1 / pk:.0f}%) | "
                    f"{g2:.1f} ({b2:.1f}) | {100 * g2 / pk:.0f}% ({100 * b2 / pk:.0f}%) | "
                    f"{ge:.1f} ({be:.1f}) | {100 * ge / pk:.0f}% ({100 * be / pk:.0f}%) |")

    for t in tract:
        for key, what in (("stage1_profile", "Stage 1"), ("stage2_profile", "Stage 2, one batch")):
            if not t.get(key):
                continue
            lines.append(f"\n### {what} per node, tract ({name(t)}, {t['variant']}, "
                         f"{t['threads']} thread(s); mean ms, nodes >= 0.5 ms)\n")
            lines.append("| ms | node | op | output |")
            lines.append("|---|---|---|---|")
            for n in t[key]:
                if n["ms"] >= 0.5:
                    lines.append(f"| {n['ms']:.1f} | {n['name']} | {n['op']} | {n['output']} |")
    for (img, v, th), o in sorted(ort.items()):
        if not o.get("stage1_profile"):
            continue
        lines.append(f"\n### Stage 1 per node, onnxruntime ({os.path.basename(img)}, {v}, "
                     f"{th} thread(s); mean ms, with profiling on)\n")
        lines.append("| ms | node | op |")
        lines.append("|---|---|---|")
        for n in o["stage1_profile"]:
            if n["ms"] >= 0.5:
                lines.append(f"| {n['ms']:.1f} | {n['name']} | {n['op']} |")
    print("\n".join(lines))


def cmd_rewrite(a):
    import onnx

    m = onnx.load(a.src)
    g = m.graph
    if a.pool_before_relu:
        nodes = list(g.node)
        i = 0
        while i < len(nodes) - 1:
            x, y = nodes[i], nodes[i + 1]
            if x.op_type == "LeakyRelu" and y.op_type == "MaxPool" and y.input[0] == x.output[0]:
                src, mid, dst = x.input[0], x.output[0], y.output[0]
                y.input[0], y.output[0] = src, mid
                x.input[0], x.output[0] = mid, dst
                nodes[i], nodes[i + 1] = y, x
                i += 2
            else:
                i += 1
        del g.node[:]
        g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, a.dst)


def cmd_quantize(a):
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    key = "stage1_input.npy" if a.stage == 1 else "stage2_input.npy"
    feeds = []
    for d in a.dump:
        x = np.load(os.path.join(d, key))
        if a.stage == 1:
            # Crops keep the calibration's per-layer activations small; min/max over a
            # few crops of the fundus and its border covers the range the full image has.
            _, _, h, w = x.shape
            n = min(a.crop, h, w)
            for (y0, x0) in [(0, 0), ((h - n) // 2, (w - n) // 2), (h - n, w - n),
                             ((h - n) // 2, 0), ((h - n) // 2, w - n)]:
                feeds.append(np.ascontiguousarray(x[:, :, y0:y0 + n, x0:x0 + n]))
        else:
            feeds.extend(x[i:i + 1] for i in range(x.shape[0]))
    if not feeds:
        sys.exit("quantize: no calibration inputs (give --dump folders from ma-bench --dump)")

    class Reader(CalibrationDataReader):
        def __init__(self, name):
            self.it = iter({name: f} for f in feeds)

        def get_next(self):
            return next(self.it, None)

    import onnx
    name = onnx.load(a.src).graph.input[0].name
    quantize_static(a.src, a.dst, Reader(name),
                    quant_format=QuantFormat.QDQ if a.format == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=["Conv"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    # The quantizer leaves its shape inference in value_info, with the batch dimension
    # named; tract then refuses to pin it to 1 (stage 2). The graph needs none of it.
    m = onnx.load(a.dst)
    del m.graph.value_info[:]
    onnx.save(m, a.dst)
    print(json.dumps({"src": a.src, "dst": a.dst, "format": a.format,
                      "calibration_inputs": len(feeds)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("ort")
    o.add_argument("--models", required=True)
    o.add_argument("--variant", default="float")
    o.add_argument("--dump", required=True)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--runs", type=int, default=10)
    o.add_argument("--warmup", type=int, default=2)
    o.add_argument("--profile", action="store_true")
    m = sub.add_parser("macs")
    m.add_argument("--models", required=True)
    m.add_argument("--variant", default="float")
    m.add_argument("--dump", required=True)
    p = sub.add_parser("peak")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tmp", default="/tmp")
    r = sub.add_parser("report")
    for k in ("tract", "ort", "macs", "peak"):
        r.add_argument(f"--{k}", nargs="*", default=[])
    w = sub.add_parser("rewrite")
    w.add_argument("src")
    w.add_argument("dst")
    w.add_argument("--pool-before-relu", action="store_true")
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--format", choices=["qdq", "qoperator"], required=True)
    q.add_argument("--dump", nargs="+", required=True)
    q.add_argument("--stage", type=int, choices=[1, 2], default=1)
    q.add_argument("--crop", type=int, default=384)
    a = ap.parse_args()
    {"ort": cmd_ort, "macs": cmd_macs, "peak": cmd_peak, "report": cmd_report,
     "rewrite": cmd_rewrite, "quantize": cmd_quantize}[a.cmd](a)


if __name__ == "__main__":
    main()
