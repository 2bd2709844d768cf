"""Sparse suite: promptbake.nn.SparseLinear against dense ``F.linear`` on SmolLM2's layers.

Shapes are SmolLM2-135M's (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536), pruned by
magnitude to 50%, 70% and 90% unstructured sparsity and to the 2:4 pattern, at batch 1 (decode)
and 8. Two settings:

* cold: each sample runs a stack of distinct layers of the shape, twice the last-level cache in
  all, as decoding does (between two calls of a layer the rest of the model passes), so the
  weights come from memory;
* hot: the same layer again and again, its weights in cache (the kernel's arithmetic).

The torch backend (the reference, which rebuilds the dense weight per call) is timed hot at
batch 1; the triton backend runs on CUDA only (on CPU it is the interpreter, not timed).

Times are per layer: the median over samples, contenders in turns. Target: at 70%
sparsity SparseLinear >= 1.5x faster than dense at batch 1 (cold, as in decoding).

On a CUDA machine, GPU rows besides: SparseLinear[triton] against dense ``F.linear`` (cuBLAS)
in bf16 at batch 1 and 8, cold (a stack of layers twice the L2 cache), on SmolLM2's shapes and
an LM head, with GB/s of the weight bytes read against the device's measured copy bandwidth
(information, no target yet). Without a GPU those rows are skipped ("no GPU").
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

import harness
import promptbake
from divergence import gpu_copy_bandwidth, gpu_skipped, gpu_timeit
from promptbake.nn import SparseLinear
from promptbake.nn.sparse_linear import last_level_cache_bytes
from promptbake.ops.sparse_linear import nbytes

SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (192, 576),
          "gate_proj, up_proj": (1536, 576), "down_proj": (576, 1536)}
QUICK_SHAPES = ("q_proj, o_proj", "gate_proj, up_proj")
PATTERNS = ("50%", "70%", "90%", "2:4")
BATCHES = (1, 8)
TARGET_SPARSITY, TARGET_SPEEDUP = "70%", 1.5
CUDA_SHAPES = {**SHAPES, "lm_head": (49152, 576)}
CUDA_QUICK_SHAPES = ("gate_proj, up_proj", "lm_head")


def prune(w: torch.Tensor, pattern: str) -> torch.Tensor:
    """Magnitude pruning: the smallest weights of the whole matrix, or 2 of every 4 in a row."""
    w = w.clone()
    if pattern == "2:4":
        groups = w.view(w.shape[0], -1, 4)
        groups.scatter_(-1, groups.abs().topk(2, dim=-1, largest=False).indices, 0.0)
        return w
    drop = round(float(pattern.rstrip("%")) / 100 * w.numel())
    order = w.abs().flatten().argsort()
    w.view(-1)[order[:drop]] = 0.0
    return w


def contenders(stack, x):
    """Name -> a function running x through every layer of the stack once."""
    dense = [(linear.weight, linear.bias) for linear, _ in stack]
    fns = {"dense": lambda: [F.linear(x, w, b) for w, b in dense]}
    for name, info in promptbake.backends().items():
        if not info.available or name == "triton":  # on CPU, triton is the interpreter
            continue
        layers = []
        for _, layer in stack:
            view = copy.copy(layer)  # shares the packed weight; only the backend differs
            view.backend = name
            layers.append(view)
        fns[f"sparse[{name}]"] = lambda layers=layers: [s(x) for s in layers]
    return fns


def measure(label, out_f, in_f, pattern, repeats, log, with_reference):
    cache = last_level_cache_bytes()
    layers = max(2, math.ceil(2 * cache / (out_f * in_f * 4)))
    gen = torch.Generator().manual_seed(out_f * in_f)
    stack = []
    for _ in range(layers):
        linear = torch.nn.Linear(in_f, out_f)
        with torch.no_grad():
            linear.weight.copy_(prune(torch.randn(out_f, in_f, generator=gen) * 0.05, pattern))
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.05)
        stack.append((linear, SparseLinear.from_dense(linear)))
    sparsity = stack[0][1].sparsity
    dense_bytes = out_f * in_f * 4 + out_f * 4
    sparse_bytes = nbytes(stack[0][1].bitmap, stack[0][1].values, stack[0][1].row_offsets) \
        + out_f * 4
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=gen)
        linear, layer = stack[0]
        with torch.no_grad():
            diff = float((layer(x) - linear(x)).abs().max())
        for mode, chosen in (("cold", stack), ("hot", [stack[0]] * layers)):
            fns = contenders(chosen, x)
            # The torch backend rebuilds the dense weight on every call: it is the reference,
            # timed on its own (its big temporaries would disturb the others' turns), once per
            # shape (hot, batch 1), to show what the kernels save.
            reference = fns.pop("sparse[torch]", None)
            with torch.no_grad():
                timings = harness.timeit_side_by_side(fns, repeats, warmup=1)
                if reference is not None and with_reference and mode == "hot" and batch == 1:
                    one = contenders(chosen[:1], x)["sparse[torch]"]
                    t = harness.timeit(one, max(1, repeats // 2))
                    timings["sparse[torch]"] = {k: (v * layers if k != "samples"
                                                    else [s * layers for s in v])
                                                for k, v in t.items()}
            dense_s = timings["dense"]["median"] / layers
            for name, t in timings.items():
                per_layer = {k: (v / layers if k != "samples" else [s / layers for s in v])
                             for k, v in t.items()}
                moved = dense_bytes if name == "dense" else sparse_bytes
                rows.append({"layers": label, "out": out_f, "in": in_f, "pattern": pattern,
                             "sparsity": sparsity, "batch": batch, "mode": mode,
                             "contender": name, "stack": layers, "seconds": per_layer,
                             "weight_bytes": moved,
                             "bandwidth_gbs": moved / per_layer["median"] / 1e9,
                             "speedup_vs_dense": dense_s / per_layer["median"],
                             "max_abs_diff_vs_dense": 0.0 if name == "dense" else diff})
        cpp = next(r for r in rows if r["batch"] == batch and r["mode"] == "cold"
                   and r["contender"] == "sparse[cpp]")
        log(f"  {out_f}x{in_f} {pattern} batch {batch}: cold {cpp['speedup_vs_dense']:.2f}x dense")
    return rows


def measure_gpu(label, out_f, in_f, pattern, repeats, log, device="cuda", timeit=gpu_timeit,
                cache_bytes=None):
    """Cold rows on the GPU: dense bf16 F.linear against SparseLinear (triton), per layer."""
    if cache_bytes is None:
        cache_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    layers = max(2, math.ceil(2 * cache_bytes / (out_f * in_f * 2)))
    gen = torch.Generator().manual_seed(out_f * in_f)
    dense, sparse = [], []
    for _ in range(layers):
        linear = torch.nn.Linear(in_f, out_f, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(prune(torch.randn(out_f, in_f, generator=gen) * 0.05, pattern))
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.05)
        linear = linear.to(device)
        dense.append((linear.weight, linear.bias))
        sparse.append(SparseLinear.from_dense(linear, backend="triton"))
    dense_bytes = out_f * in_f * 2 + out_f * 2
    sparse_bytes = nbytes(sparse[0].bitmap, sparse[0].values, sparse[0].row_offsets) + out_f * 2
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=gen).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            diff = float((sparse[0](x).float() - F.linear(x, *dense[0]).float()).abs().max())
            timings = timeit({"dense": lambda x=x: [F.linear(x, w, b) for w, b in dense],
                              "sparse[triton]": lambda x=x: [layer(x) for layer in sparse]},
                             repeats)
        dense_s = timings["dense"]["median"] / layers
        for name, t in timings.items():
            per_layer = t["median"] / layers
            moved = dense_bytes if name == "dense" else sparse_bytes
            rows.append({"layers": label, "out": out_f, "in": in_f, "pattern": pattern,
                         "sparsity": sparse[0].sparsity, "batch": batch, "mode": "cold",
                         "contender": name, "stack": layers, "seconds_per_layer": per_layer,
                         "weight_bytes": moved, "bandwidth_gbs": moved / per_layer / 1e9,
                         "speedup_vs_dense": dense_s / per_layer,
                         "max_abs_diff_vs_dense": 0.0 if name == "dense" else diff})
        log(f"  cuda {out_f}x{in_f} {pattern} batch {batch}: "
            f"{rows[-1]['speedup_vs_dense']:.2f}x dense")
    return rows


def run_gpu(args, repeats, log) -> dict:
    """The GPU rows, or why there are none."""
    skipped = gpu_skipped(log)
    if skipped:
        return skipped
    cache = torch.cuda.get_device_properties(0).L2_cache_size
    copy = gpu_copy_bandwidth(4 * cache, repeats)
    rows = []
    for label in CUDA_QUICK_SHAPES if args.quick else tuple(CUDA_SHAPES):
        out_f, in_f = CUDA_SHAPES[label]
        for pattern in PATTERNS:
            rows.extend(measure_gpu(label, out_f, in_f, pattern, repeats, log))
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": copy / 1e9,
            "l2_cache_bytes": cache, "rows": rows}


def report_gpu(cuda) -> str:
    if "skipped" in cuda:
        return f"CUDA rows: skipped ({cuda['skipped']})"
    headers = ["shape", "pattern", "batch", "contender", "us / layer", "GB/s", "of copy",
               "x dense", "|diff|"]
    body = [[f"{r['out']}x{r['in']}", r["pattern"], r["batch"], r["contender"],
             f"{r['seconds_per_layer'] * 1e6:.1f}", f"{r['bandwidth_gbs']:.0f}",
             f"{r['bandwidth_gbs'] / cuda['copy_bandwidth_gbs']:.0%}",
             f"{r['speedup_vs_dense']:.2f}x", f"{r['max_abs_diff_vs_dense']:.1e}"]
            for r in cuda["rows"]]
    title = (f"CUDA rows on {cuda['device']} (bf16, cold): copy bandwidth (read + write) "
             f"{cuda['copy_bandwidth_gbs']:.0f} GB/s")
    return "\n".join([title, harness.table(headers, body)])


def run(args, log) -> dict:
    names = QUICK_SHAPES if args.quick else tuple(SHAPES)
    repeats = args.repeats or (3 if args.quick else 7)
    copy = harness.copy_bandwidth(2 * last_level_cache_bytes(), repeats=max(repeats, 5))
    rows = []
    for label in names:
        out_f, in_f = SHAPES[label]
        for pattern in PATTERNS:
            rows.extend(measure(label, out_f, in_f, pattern, repeats, log,
                                with_reference=not args.quick))
    return {"suite": "sparse", "machine": harness.machine(),
            "backends": {k: v.detail for k, v in promptbake.backends().items()},
            "isa": (promptbake.ops._dispatch.compiled().isas() or ["-"])[0],
            "repeats": repeats, "copy_bandwidth_gbs": copy / 1e9,
            "last_level_cache_bytes": last_level_cache_bytes(),
            "targets": {"sparsity": TARGET_SPARSITY, "batch": 1, "mode": "cold",
                        "speedup_vs_dense": TARGET_SPEEDUP},
            "rows": rows, "checks": checks(rows), "cuda": run_gpu(args, repeats, log)}


def checks(rows) -> list[dict]:
    """The target, per shape: sparse[cpp] at 70%, batch 1, cold."""
    out = []
    for r in rows:
        if (r["contender"], r["pattern"], r["batch"], r["mode"]) == \
                ("sparse[cpp]", TARGET_SPARSITY, 1, "cold"):
            out.append({"layers": r["layers"], "out": r["out"], "in": r["in"],
                        "speedup_vs_dense": r["speedup_vs_dense"],
                        "pass": r["speedup_vs_dense"] >= TARGET_SPEEDUP})
    return out


def _index(rows):
    return {(r["out"], r["in"], r["pattern"], r["batch"], r["mode"], r["contender"]): r
            for r in rows}


def report(result) -> str:
    rows, index = result["rows"], _index(result["rows"])
    lines = [f"copy bandwidth (read + write): {result['copy_bandwidth_gbs']:.1f} GB/s; per-layer "
             f"median of {result['repeats']} samples; cold = a stack of layers twice the "
             f"{result['last_level_cache_bytes'] >> 20} MiB cache, hot = one layer repeated"]
    headers = ["shape", "pattern", "batch", "mode", "dense us", "cpp us", "cpp x dense",
               "dense GB/s", "cpp GB/s", "torch-ref us", "|diff|"]
    body = []
    for r in rows:
        if r["contender"] != "dense":
            continue
        key = (r["out"], r["in"], r["pattern"], r["batch"], r["mode"])
        cpp = index.get((*key, "sparse[cpp]"))
        ref = index.get((*key, "sparse[torch]"))
        body.append([f"{r['out']}x{r['in']}", r["pattern"], r["batch"], r["mode"],
                     f"{r['seconds']['median'] * 1e6:.1f}",
                     f"{cpp['seconds']['median'] * 1e6:.1f}" if cpp else "-",
                     f"{cpp['speedup_vs_dense']:.2f}x" if cpp else "-",
                     f"{r['bandwidth_gbs']:.1f}",
                     f"{cpp['bandwidth_gbs']:.1f}" if cpp else "-",
                     f"{ref['seconds']['median'] * 1e6:.0f}" if ref else "-",
                     f"{cpp['max_abs_diff_vs_dense']:.1e}" if cpp else "-"])
    lines.append(harness.table(headers, body))
    lines.append("")
    lines.append(f"target: SparseLinear (cpp) at {TARGET_SPARSITY} sparsity >= {TARGET_SPEEDUP}x "
                 f"dense at batch 1 (cold)")
    lines.append(harness.table(["layers", "shape", "cpp x dense", "target"],
                               [[c["layers"], f"{c['out']}x{c['in']}",
                                 f"{c['speedup_vs_dense']:.2f}x",
                                 harness.verdict(c["pass"])] for c in result["checks"]]))
    lines.append("")
    lines.append(report_gpu(result.get("cuda", {"skipped": "not measured"})))
    return "\n".join(lines)


def markdown(result) -> str:
    """The README table: cold (decode-like) speedups of SparseLinear[cpp] over dense."""
    index = _index(result["rows"])
    m = result["machine"]
    lines = [f"`{result['command']}` — {m['cpu']} ({result['isa']}), {m['torch_threads']} "
             f"threads, torch {m['torch']}, {m['date'][:10]}; memory-copy bandwidth "
             f"{result['copy_bandwidth_gbs']:.1f} GB/s. Per-layer median, weights streamed from "
             f"memory (cold); in parentheses the same layer repeated in cache (hot).",
             "",
             "| layers | shape | pattern | batch 1: dense µs | cpp µs | speedup | "
             "batch 8: dense µs | cpp µs | speedup |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    shapes = dict.fromkeys((r["layers"], r["out"], r["in"]) for r in result["rows"])
    for label, out_f, in_f in shapes:
        for pattern in PATTERNS:
            cells = []
            for batch in BATCHES:
                d = index.get((out_f, in_f, pattern, batch, "cold", "dense"))
                c = index.get((out_f, in_f, pattern, batch, "cold", "sparse[cpp]"))
                hot = index.get((out_f, in_f, pattern, batch, "hot", "sparse[cpp]"))
                if d is None or c is None:
                    cells += ["-", "-", "-"]
                    continue
                cells += [f"{d['seconds']['median'] * 1e6:.0f}",
                          f"{c['seconds']['median'] * 1e6:.0f}",
                          f"{c['speedup_vs_dense']:.2f}× ({hot['speedup_vs_dense']:.2f}×)"]
            lines.append(f"| {label} | {out_f}×{in_f} | {pattern} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _index(result["rows"])
    shapes = list(dict.fromkeys((r["out"], r["in"]) for r in result["rows"]))
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(6 * len(BATCHES), 4.5))
    width = 0.8 / len(PATTERNS)
    for ax, batch in zip(axes, BATCHES):
        for i, pattern in enumerate(PATTERNS):
            xs = [g + i * width for g in range(len(shapes))]
            cold = [index[(o, n, pattern, batch, "cold", "sparse[cpp]")]["speedup_vs_dense"]
                    for o, n in shapes]
            hot = [index[(o, n, pattern, batch, "hot", "sparse[cpp]")]["speedup_vs_dense"]
                   for o, n in shapes]
            ax.bar(xs, cold, width, label=f"{pattern} (cold)")
            ax.scatter(xs, hot, color="k", marker="_", s=80,
                       label="in cache (hot)" if i == 0 else None)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(TARGET_SPEEDUP, color="r", lw=0.8, ls="--", label="target at 70%, batch 1")
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(shapes))],
                      [f"{o}x{n}" for o, n in shapes])
        ax.set_yscale("log")
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("SparseLinear (cpp) speedup over dense F.linear")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"SparseLinear vs dense, SmolLM2-135M layer shapes, {result['machine']['cpu']}, "
                 f"{result['machine']['torch_threads']} threads")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
