"""Divergence suite: forward + backward of KL(teacher || student) from raw logits.

Contenders, on the same inputs, timed in turns in a process of their own (the C allocator's
defaults; ``harness.in_child``), their memory measured in this one: eager torch (log_softmax +
kl_div + backward), torch.compile of the same function, and every promptbake backend that runs
on CPU tensors. Targets: cpp >= 3x eager and >= 1.5x torch.compile at every shape, peak
extra memory no more than the one N x V gradient buffer.

On a CUDA machine, GPU rows besides: promptbake[triton] against eager, torch.compile and
Liger-Kernel's JSD (beta = 0 is forward KL; after log_softmax, as Liger takes log-probabilities;
if ``liger_kernel`` is installed), for forward KL and JSD(0.5) in bf16, with GB/s of the bytes
the op must move (read both logits, write the gradient) against the device's measured copy
bandwidth. Targets there: forward KL >= 85% of copy bandwidth at V >= 32k, >= 1.2x Liger.
Without a GPU those rows are skipped ("no GPU").
"""

from __future__ import annotations

import gc
import math
import statistics

import torch
import torch.nn.functional as F

import harness
import promptbake

FULL_SHAPES = [(n, v) for n in (512, 2048) for v in (32000, 49152, 151936)]
QUICK_SHAPES = [(512, 32000), (512, 151936)]
TARGET_VS_EAGER = 3.0
TARGET_VS_COMPILE = 1.5
HUGE = 2 << 20
CUDA_SHAPES = [(8192, 32000), (8192, 128256), (4096, 151936)]
CUDA_QUICK_SHAPES = [(4096, 32000), (4096, 128256)]
CUDA_KINDS = {"forward_kl": 0.0, "jsd": 0.5}  # kind -> Liger's beta (0: forward KL)
TARGET_OF_COPY = 0.85
TARGET_VS_LIGER = 1.2


def eager_kl(student, teacher):
    return F.kl_div(F.log_softmax(student, -1, dtype=torch.float32),
                    F.log_softmax(teacher, -1, dtype=torch.float32),
                    reduction="batchmean", log_target=True)


def promptbake_contenders():
    found = {}
    for name, info in promptbake.backends().items():
        if info.available and name != "triton":  # triton on CPU is the interpreter: not a speed path
            found[f"promptbake[{name}]"] = (
                lambda s, t, _b=name: promptbake.divergence(s, t, backend=_b))
    return found


def fwd_bwd(fn, student, teacher):
    loss = fn(student, teacher)
    loss.backward()
    return loss.detach()


def against(reference, loss, grad):
    """(reference, |loss diff|, max |grad diff|): the first contender (eager) is the reference."""
    if reference is None:
        return (loss, grad.float()), 0.0, 0.0
    return (reference, abs(float(loss) - float(reference[0])),
            float((grad.float() - reference[1]).abs().max()))


def logits(n: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's (requiring grad) and the teacher's random logits, seeded."""
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(n, vocab, generator=gen) * 2).to(dtype).requires_grad_(True)
    return student, (torch.randn(n, vocab, generator=gen) * 2).to(dtype)


def contenders() -> dict:
    torch._dynamo.reset()  # compile afresh for this shape (it specialises on it)
    return {"eager": eager_kl, "torch.compile": torch.compile(eager_kl, dynamic=False),
            **promptbake_contenders()}


def time_shape(n: int, vocab: int, dtype: str, repeats: int) -> dict:
    """The contenders' times, taken in turns, and torch.compile's first call. ``measure_shape``
    runs this in a process of its own (``harness.in_child``), so the clocks run under the C
    allocator's defaults, not the switch the memory measurement needs."""
    student, teacher = logits(n, vocab, getattr(torch, dtype))
    fns = contenders()
    compile_seconds = harness.timeit(lambda: fwd_bwd(fns["torch.compile"], student, teacher),
                                     repeats=1, warmup=0)["median"]
    student.grad = None

    def step(fn):
        fwd_bwd(fn, student, teacher)
        student.grad = None

    return {"compile_seconds": compile_seconds, "timings": harness.timeit_side_by_side(
        {name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}, repeats, warmup=2)}


def measure_shape(n, vocab, dtype, repeats, log):
    dtype_name = str(dtype).replace("torch.", "")
    log(f"  N={n} V={vocab} {dtype_name}")
    timed = harness.in_child("divergence", "divergence.time_shape(*args)",
                             [n, vocab, dtype_name, repeats])
    compile_seconds, timings = timed["compile_seconds"], timed["timings"]
    student, teacher = logits(n, vocab, dtype)
    grad_bytes = n * vocab * student.element_size()
    must_move = n * vocab * (2 * student.element_size() + teacher.element_size())
    fns = contenders()
    rows, reference = [], None
    for name, fn in fns.items():
        fwd_bwd(fn, student, teacher)  # once before measuring: compiles, warms the backend
        student.grad = None
        gc.collect()
        promptbake.ops.empty_cache()  # pooled buffers count as new memory, as they are at first
        loss = None

        def keep_grad():
            nonlocal loss
            loss = fwd_bwd(fn, student, teacher)

        peak = harness.peak_extra_bytes(keep_grad)
        reference, loss_diff, grad_diff = against(reference, loss, student.grad)
        student.grad = None
        timing = timings[name]
        rows.append({"contender": name, "n": n, "vocab": vocab,
                     "dtype": dtype_name, "seconds": timing,
                     "compile_seconds": compile_seconds if name == "torch.compile" else None,
                     "peak_extra_bytes": peak,
                     "peak_extra_over_grad": None if peak is None else peak / grad_bytes,
                     "bandwidth_gbs": must_move / timing["median"] / 1e9,
                     "loss": float(loss), "loss_diff_vs_eager": loss_diff,
                     "grad_max_diff_vs_eager": grad_diff})
    return rows


# -- GPU rows ------------------------------------------------------------------------------


def gpu_timeit(fns, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Seconds per call on the GPU (CUDA events around each call), contenders in turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3)
    return {name: {"median": statistics.median(x), "min": min(x), "max": max(x), "samples": x}
            for name, x in samples.items()}


def gpu_copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device tensor copy (read + write): the GPU's yardstick."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = gpu_timeit({"copy": lambda: dst.copy_(src)}, max(repeats, 5))["copy"]
    return 2 * nbytes / t["median"]


def eager_jsd(student, teacher, beta):
    lq = F.log_softmax(student, -1, dtype=torch.float32)
    lp = F.log_softmax(teacher, -1, dtype=torch.float32)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return (beta * F.kl_div(lm, lp, reduction="batchmean", log_target=True)
            + (1 - beta) * F.kl_div(lm, lq, reduction="batchmean", log_target=True))


def liger_jsd():
    """Liger-Kernel's JSD on log-probabilities, or None if liger_kernel is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_jsd as jsd
    except ImportError:
        return None
    return jsd


def gpu_contenders(kind: str) -> dict:
    beta = CUDA_KINDS[kind]
    eager = eager_kl if kind == "forward_kl" else (lambda s, t: eager_jsd(s, t, beta))
    torch._dynamo.reset()  # compile afresh for this shape (it specialises on it)
    fns = {"eager": eager, "torch.compile": torch.compile(eager, dynamic=False),
           "promptbake[triton]": lambda s, t: promptbake.divergence(s, t, kind=kind, beta=beta,
                                                                    backend="triton")}
    jsd = liger_jsd()
    if jsd is not None:
        fns["liger"] = lambda s, t: jsd(F.log_softmax(s, -1), F.log_softmax(t, -1), beta=beta)
    return fns


def measure_gpu_shape(n, vocab, kind, dtype, repeats, log, device="cuda", timeit=gpu_timeit):
    gen = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(n, vocab, generator=gen, device=device) * 2).to(dtype)
    student.requires_grad_(True)
    teacher = (torch.randn(n, vocab, generator=gen, device=device) * 2).to(dtype)
    must_move = n * vocab * (2 * student.element_size() + teacher.element_size())
    log(f"  cuda {kind} N={n} V={vocab} {str(dtype).replace('torch.', '')}")
    fns = gpu_contenders(kind)

    def step(fn):
        fwd_bwd(fn, student, teacher)
        student.grad = None

    for fn in fns.values():  # compile, autotune
        step(fn)
    timings = timeit({name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}, repeats)
    rows, reference = [], None
    for name, fn in fns.items():
        fwd_bwd(fn, student, teacher)  # once before measuring: compiles, warms the backend
        student.grad = None
        gc.collect()
        peak = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        loss = fwd_bwd(fn, student, teacher)
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        reference, loss_diff, grad_diff = against(reference, loss, student.grad)
        student.grad = None
        t = timings[name]
        rows.append({"contender": name, "kind": kind, "n": n, "vocab": vocab,
                     "dtype": str(dtype).replace("torch.", ""), "seconds": t,
                     "peak_extra_bytes": peak,
                     "bandwidth_gbs": must_move / t["median"] / 1e9,
                     "loss": float(loss), "loss_diff_vs_eager": loss_diff,
                     "grad_max_diff_vs_eager": grad_diff})
    return rows


def gpu_checks(rows, copy_gbs) -> list[dict]:
    """Per shape and kind: promptbake[triton] against copy bandwidth (forward KL) and Liger."""
    index = {(r["kind"], r["dtype"], r["n"], r["vocab"], r["contender"]): r for r in rows}
    out = []
    for (kind, dtype, n, vocab, name), r in index.items():
        if name != "promptbake[triton]":
            continue
        liger = index.get((kind, dtype, n, vocab, "liger"))
        of_copy = r["bandwidth_gbs"] / copy_gbs
        vs_liger = None if liger is None else liger["seconds"]["median"] / r["seconds"]["median"]
        out.append({"kind": kind, "dtype": dtype, "n": n, "vocab": vocab, "of_copy": of_copy,
                    "speedup_vs_liger": vs_liger,
                    "pass_copy": of_copy >= TARGET_OF_COPY
                    if kind == "forward_kl" and vocab >= 32000 else None,
                    "pass_liger": None if vs_liger is None else vs_liger >= TARGET_VS_LIGER})
    return out


def gpu_skipped(log) -> dict | None:
    """``{"skipped": why}`` when the GPU rows cannot run here (no GPU, or no Triton), else None."""
    if not torch.cuda.is_available():
        log("  no GPU: CUDA rows skipped")
        return {"skipped": "no GPU"}
    triton = promptbake.backends()["triton"]
    if not triton.available:
        log(f"  CUDA rows skipped: {triton.detail}")
        return {"skipped": triton.detail}
    return None


def run_gpu(args, repeats, log) -> dict:
    """The GPU rows, or why there are none."""
    skipped = gpu_skipped(log)
    if skipped:
        return skipped
    shapes = CUDA_QUICK_SHAPES if args.quick else CUDA_SHAPES
    largest = max(n * v for n, v in shapes) * 2
    copy = gpu_copy_bandwidth(min(largest, 1 << 30), repeats)
    rows = []
    for kind in CUDA_KINDS:
        for n, vocab in shapes:
            rows.extend(measure_gpu_shape(n, vocab, kind, torch.bfloat16, repeats, log))
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": copy / 1e9,
            "liger": liger_jsd() is not None,
            "targets": {"of_copy_forward_kl": TARGET_OF_COPY, "speedup_vs_liger": TARGET_VS_LIGER},
            "rows": rows, "checks": gpu_checks(rows, copy / 1e9)}


def run(args, log) -> dict:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    repeats = args.repeats or (3 if args.quick else 7)
    largest = max(n * v for n, v in shapes) * 4
    copy = harness.copy_bandwidth(min(largest, 1 << 30), repeats=max(repeats, 5))
    harness.can_measure_memory()  # for good in this process: the clocks run in children
    rows = []
    for dtype in dtypes:
        for n, vocab in shapes:
            rows.extend(measure_shape(n, vocab, dtype, repeats, log))
    return {"suite": "divergence", "machine": harness.machine(),
            "backends": {k: v.detail for k, v in promptbake.backends().items()},
            "repeats": repeats, "copy_bandwidth_gbs": copy / 1e9,
            "targets": {"speedup_vs_eager": TARGET_VS_EAGER,
                        "speedup_vs_compile": TARGET_VS_COMPILE,
                        "peak_extra_over_grad": 1.0},
            "rows": rows, "checks": checks(rows), "cuda": run_gpu(args, repeats, log)}


def _by(rows):
    return {(r["dtype"], r["n"], r["vocab"], r["contender"]): r for r in rows}


def checks(rows) -> list[dict]:
    """One line per shape: the cpp backend against each target, measured in this run."""
    index, out = _by(rows), []
    for (dtype, n, vocab, name), r in index.items():
        if name != "promptbake[cpp]":
            continue
        t = r["seconds"]["median"]
        eager = index[(dtype, n, vocab, "eager")]["seconds"]["median"] / t
        compiled = index[(dtype, n, vocab, "torch.compile")]["seconds"]["median"] / t
        memory = r["peak_extra_over_grad"]
        # The gradient buffer, rounded up to whole 2 MiB huge pages by the pool, plus up to
        # 2 MiB of per-thread scratch rows and the row losses.
        grad = n * vocab * (4 if dtype == "float32" else 2)
        allowed = (-(-grad // HUGE) * HUGE + HUGE) / grad
        out.append({"dtype": dtype, "n": n, "vocab": vocab, "speedup_vs_eager": eager,
                    "speedup_vs_compile": compiled, "peak_extra_over_grad": memory,
                    "peak_allowed_over_grad": allowed,
                    "pass_eager": eager >= TARGET_VS_EAGER,
                    "pass_compile": compiled >= TARGET_VS_COMPILE,
                    "pass_memory": memory is None or memory <= allowed})
    return out


def report(result) -> str:
    rows = result["rows"]
    lines = [f"copy bandwidth (read + write): {result['copy_bandwidth_gbs']:.1f} GB/s; "
             f"median of {result['repeats']} repeats after 2 warm-ups"]
    headers = ["dtype", "N", "V", "contender", "fwd+bwd ms", "GB/s", "peak extra MB",
               "x grad buf", "|dloss|", "|dgrad|max"]
    body = []
    for r in rows:
        peak = r["peak_extra_bytes"]
        body.append([r["dtype"], r["n"], r["vocab"], r["contender"],
                     f"{r['seconds']['median'] * 1e3:.1f}", f"{r['bandwidth_gbs']:.1f}",
                     "-" if peak is None else f"{peak / 2**20:.0f}",
                     "-" if peak is None else f"{r['peak_extra_over_grad']:.2f}",
                     f"{r['loss_diff_vs_eager']:.1e}", f"{r['grad_max_diff_vs_eager']:.1e}"])
    lines.append(harness.table(headers, body))
    lines.append("")
    headers = ["dtype", "N", "V", "cpp vs eager", "cpp vs compile", "peak / grad buf", "targets"]
    body = []
    for c in result["checks"]:
        ok = c["pass_eager"] and c["pass_compile"] and c["pass_memory"]
        body.append([c["dtype"], c["n"], c["vocab"], f"{c['speedup_vs_eager']:.1f}x",
                     f"{c['speedup_vs_compile']:.1f}x",
                     "-" if c["peak_extra_over_grad"] is None else f"{c['peak_extra_over_grad']:.2f}",
                     harness.verdict(ok)])
    lines.append(f"targets: cpp >= {TARGET_VS_EAGER}x eager, >= {TARGET_VS_COMPILE}x "
                 f"torch.compile, peak extra <= one gradient buffer (in whole 2 MiB pages, "
                 f"+ 2 MiB scratch)")
    lines.append(harness.table(headers, body))
    lines.append("")
    lines.append(report_gpu(result.get("cuda", {"skipped": "not measured"})))
    return "\n".join(lines)


def report_gpu(cuda) -> str:
    if "skipped" in cuda:
        return f"CUDA rows: skipped ({cuda['skipped']})"
    lines = [f"CUDA rows on {cuda['device']}: copy bandwidth (read + write) "
             f"{cuda['copy_bandwidth_gbs']:.0f} GB/s"
             + ("" if cuda["liger"] else "; liger_kernel not installed")]
    headers = ["kind", "dtype", "N", "V", "contender", "fwd+bwd ms", "GB/s", "of copy",
               "peak extra MB", "|dloss|", "|dgrad|max"]
    body = [[r["kind"], r["dtype"], r["n"], r["vocab"], r["contender"],
             f"{r['seconds']['median'] * 1e3:.2f}", f"{r['bandwidth_gbs']:.0f}",
             f"{r['bandwidth_gbs'] / cuda['copy_bandwidth_gbs']:.0%}",
             "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}",
             f"{r['loss_diff_vs_eager']:.1e}", f"{r['grad_max_diff_vs_eager']:.1e}"]
            for r in cuda["rows"]]
    lines.append(harness.table(headers, body))
    lines.append(f"targets: forward KL >= {TARGET_OF_COPY:.0%} of copy bandwidth at V >= 32k, "
                 f">= {TARGET_VS_LIGER}x Liger")
    body = [[c["kind"], c["dtype"], c["n"], c["vocab"], f"{c['of_copy']:.0%}",
             "-" if c["speedup_vs_liger"] is None else f"{c['speedup_vs_liger']:.2f}x",
             harness.verdict(c["pass_copy"]), harness.verdict(c["pass_liger"])]
            for c in cuda["checks"]]
    lines.append(harness.table(["kind", "dtype", "N", "V", "of copy", "vs liger", "copy target",
                                "liger target"], body))
    return "\n".join(lines)


def markdown(result) -> str:
    """The summary table for the README: one row per shape, promptbake[cpp] against the rest."""
    index = _by(result["rows"])
    lines = [f"`{result['command']}` — {result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} threads, torch {result['machine']['torch']}, "
             f"{result['machine']['date'][:10]}; memory-copy bandwidth "
             f"{result['copy_bandwidth_gbs']:.1f} GB/s",
             "",
             "| dtype | N × V | eager ms | torch.compile ms | cpp ms | cpp vs eager | "
             "cpp vs compile | cpp GB/s | peak extra / grad |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["checks"]:
        key = (c["dtype"], c["n"], c["vocab"])
        ms = {name: index[(*key, name)]["seconds"]["median"] * 1e3
              for name in ("eager", "torch.compile", "promptbake[cpp]")}
        cpp = index[(*key, "promptbake[cpp]")]
        lines.append(f"| {c['dtype']} | {c['n']} × {c['vocab']} | {ms['eager']:.0f} | "
                     f"{ms['torch.compile']:.0f} | {ms['promptbake[cpp]']:.1f} | "
                     f"{c['speedup_vs_eager']:.1f}× | {c['speedup_vs_compile']:.1f}× | "
                     f"{cpp['bandwidth_gbs']:.1f} | {c['peak_extra_over_grad']:.2f} |")
    cuda = result.get("cuda", {})
    if "rows" in cuda:  # a GPU was there
        index = {(r["kind"], r["n"], r["vocab"], r["contender"]): r for r in cuda["rows"]}
        lines += ["", (f"GPU ({cuda['device']}, bf16, copy bandwidth "
                       f"{cuda['copy_bandwidth_gbs']:.0f} GB/s):"), "",
                  ("| kind | N × V | eager ms | torch.compile ms | Liger ms | triton ms | "
                   "triton GB/s | of copy | vs Liger |"),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in cuda["checks"]:
            ms = {name: (index[(c["kind"], c["n"], c["vocab"], name)]["seconds"]["median"] * 1e3
                         if (c["kind"], c["n"], c["vocab"], name) in index else None)
                  for name in ("eager", "torch.compile", "liger", "promptbake[triton]")}
            cell = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}"
            triton = index[(c["kind"], c["n"], c["vocab"], "promptbake[triton]")]
            lines.append(f"| {c['kind']} | {c['n']} × {c['vocab']} | {cell(ms['eager'])} | "
                         f"{cell(ms['torch.compile'])} | {cell(ms['liger'])} | "
                         f"{cell(ms['promptbake[triton]'])} | {triton['bandwidth_gbs']:.0f} | "
                         f"{c['of_copy']:.0%} | {cell(c['speedup_vs_liger'], '×')} |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = list(dict.fromkeys(r["contender"] for r in rows))
    groups = list(dict.fromkeys((r["dtype"], r["n"], r["vocab"]) for r in rows))
    index = _by(rows)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + i * width for g in range(len(groups))]
        ms = [index[(*grp, name)]["seconds"]["median"] * 1e3 for grp in groups]
        mem = [index[(*grp, name)]["peak_extra_over_grad"] or 0 for grp in groups]
        axes[0].bar(xs, ms, width, label=name)
        axes[1].bar(xs, mem, width, label=name)
    labels = [f"{d}\n{n}x{v}" for d, n, v in groups]
    for ax in axes:
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], labels)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("forward + backward, ms (median)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"KL(teacher || student) from logits, {result['machine']['cpu']}, "
                      f"{result['machine']['torch_threads']} threads")
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_ylabel("peak extra memory / N x V grad")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
