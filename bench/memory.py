"""Memory suite: forward + backward of the LM head and the baking loss, with a frozen head.

The student's logits are ``hidden @ weight.T`` ([N, V]); the loss is KL(teacher || student) with
the teacher as cached log-probabilities, the bake's case. Contenders, on the same inputs in the
same process: eager torch (F.linear, log_softmax, kl_div, backward), torch.compile of the same
function, the unfused cpp path (F.linear, then ``promptbake.ops.divergence`` on the cpp
backend), and ``promptbake.ops.linear_divergence`` (blocks of rows under its default memory
budget; never N x V). Random weights: the op's cost does not depend on them. On the CPU the
times are taken in a process of their own with the C allocator's defaults, the memory in this
one (``harness.in_child``).

Targets: peak extra memory >= 5x below eager and >= 3x below the unfused cpp path; time at most
1.1x the unfused cpp path. On a CUDA machine the same rows run on the GPU (Triton backend,
peak allocated bytes from the caching allocator); without one they say "no GPU".
"""

from __future__ import annotations

import gc

import harness
import torch
import torch.nn.functional as F
from divergence import gpu_skipped, gpu_timeit

import promptbake
from promptbake.ops import divergence, linear_divergence

FULL_SHAPES = [(4096, 49152, 576), (2048, 128256, 2048)]  # (N, V, H)
QUICK_SHAPES = [(1024, 49152, 576)]
LARGE = 2048 * 128256  # N x V above which three repeats are enough (each step takes seconds)
TARGET_VS_EAGER = 5.0
TARGET_VS_UNFUSED = 3.0
TARGET_TIME_VS_UNFUSED = 1.1


def eager(hidden, weight, teacher):
    logits = F.linear(hidden, weight)
    return F.kl_div(F.log_softmax(logits, -1, dtype=torch.float32), teacher.float(),
                    reduction="batchmean", log_target=True)


def contenders(backend: str) -> dict:
    torch._dynamo.reset()  # compile afresh for this shape (it specialises on it)
    return {
        "eager": eager,
        "torch.compile": torch.compile(eager, dynamic=False),
        f"unfused {backend}": lambda h, w, t: divergence(F.linear(h, w), t, backend=backend,
                                                         teacher_is_logprobs=True),
        "linear_divergence": lambda h, w, t: linear_divergence(h, w, t, backend=backend,
                                                               teacher_is_logprobs=True),
    }


def inputs(n, vocab, width, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, width, generator=gen, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=gen, device=device) / width**0.5).to(dtype)
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=gen, device=device) * 2,
                                -1).to(dtype)
    return hidden, weight, teacher


def step(fn, hidden, weight, teacher):
    """One forward + backward of ``fn``; the loss, detached (the gradient stays in hidden.grad)."""
    loss = fn(hidden, weight, teacher)
    loss.backward()
    return loss.detach()


def timed_runs(hidden, weight, teacher, backend: str) -> tuple[float, dict]:
    """The seconds of torch.compile's first call, and each contender as a function for the
    clocks (forward + backward, the gradient dropped)."""
    fns = contenders(backend)
    compile_seconds = harness.timeit(lambda: step(fns["torch.compile"], hidden, weight, teacher),
                                     1, warmup=0)["median"]
    hidden.grad = None
    return compile_seconds, {k: (lambda fn=fn: (step(fn, hidden, weight, teacher),
                                                setattr(hidden, "grad", None)))
                             for k, fn in fns.items()}


def time_shape(n: int, vocab: int, width: int, dtype: str, repeats: int) -> dict:
    """The contenders' times on the CPU, taken in turns, and torch.compile's first call.
    ``measure_shape`` runs this in a process of its own (``harness.in_child``), so the clocks
    run under the allocator's defaults, not the switch the memory measurement needs."""
    compile_seconds, runs = timed_runs(*inputs(n, vocab, width, getattr(torch, dtype), "cpu"),
                                       "cpp")
    return {"compile_seconds": compile_seconds,
            "timings": harness.timeit_side_by_side(runs, repeats, warmup=1)}


def measure_shape(n, vocab, width, dtype, repeats, log, device="cpu"):
    backend = "cpp" if device == "cpu" else "triton"
    name = str(dtype).replace("torch.", "")
    log(f"  {device} N={n} V={vocab} H={width} {name}")
    if device == "cpu":
        timed = harness.in_child("memory", "memory.time_shape(*args)",
                                 [n, vocab, width, name, repeats])
        compile_seconds, timings = timed["compile_seconds"], timed["timings"]
    else:
        compile_seconds, runs = timed_runs(*inputs(n, vocab, width, dtype, device), backend)
        timings = gpu_timeit(runs, repeats)
    hidden, weight, teacher = inputs(n, vocab, width, dtype, device)
    fns = contenders(backend)
    rows, reference = [], None
    for contender, fn in fns.items():
        step(fn, hidden, weight, teacher)  # once before measuring: compiles, warms the backend
        hidden.grad = None
        gc.collect()
        promptbake.ops.empty_cache()
        loss = None

        def keep_grad(fn=fn):
            nonlocal loss
            loss = step(fn, hidden, weight, teacher)

        peak = peak_extra(keep_grad, device)
        got = (float(loss), hidden.grad.float().clone())
        reference = reference or got
        hidden.grad = None
        rows.append({"contender": contender, "device": device, "n": n, "vocab": vocab,
                     "width": width, "dtype": name, "seconds": timings[contender],
                     "compile_seconds": compile_seconds if contender == "torch.compile" else None,
                     "peak_extra_bytes": peak,
                     "logits_bytes": n * vocab * hidden.element_size(),
                     "loss": got[0], "loss_diff_vs_eager": abs(got[0] - reference[0]),
                     "grad_max_diff_vs_eager": float((got[1] - reference[1]).abs().max())})
    return rows


def peak_extra(fn, device) -> int | None:
    if device == "cpu":
        return harness.peak_extra_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run(args, log) -> dict:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats = args.repeats or (3 if args.quick else 7)
    harness.can_measure_memory()  # for good in this process: the clocks run in children
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n, vocab, width in shapes:
            r = min(repeats, 3) if n * vocab >= LARGE else repeats
            rows.extend(measure_shape(n, vocab, width, dtype, r, log))
    gpu = gpu_skipped(log)
    if gpu is None:
        gpu = {"device": torch.cuda.get_device_name(), "rows": [
            row for n, vocab, width in shapes
            for row in measure_shape(n, vocab, width, torch.bfloat16, repeats, log, "cuda")]}
        gpu["checks"] = checks(gpu["rows"])
    return {"suite": "memory", "machine": harness.machine(),
            "backends": {k: v.detail for k, v in promptbake.backends().items()},
            "repeats": repeats, "repeats_note": "at most 3 at N x V >= 2048 x 128256",
            "targets": {"memory_vs_eager": TARGET_VS_EAGER, "memory_vs_unfused": TARGET_VS_UNFUSED,
                        "time_vs_unfused": TARGET_TIME_VS_UNFUSED},
            "rows": rows, "checks": checks(rows), "cuda": gpu}


def _groups(rows):
    out: dict[tuple, dict] = {}
    for r in rows:
        out.setdefault((r["device"], r["dtype"], r["n"], r["vocab"], r["width"]),
                       {})[r["contender"]] = r
    return out


def checks(rows) -> list[dict]:
    """One line per shape and dtype: linear_divergence against each target, in this run."""
    out = []
    for (device, dtype, n, vocab, width), by in _groups(rows).items():
        fused = by["linear_divergence"]
        unfused = next(r for k, r in by.items() if k.startswith("unfused"))
        mem = fused["peak_extra_bytes"]
        vs_eager = by["eager"]["peak_extra_bytes"] / mem if mem else None
        vs_unfused = unfused["peak_extra_bytes"] / mem if mem else None
        time_ratio = fused["seconds"]["median"] / unfused["seconds"]["median"]
        out.append({"device": device, "dtype": dtype, "n": n, "vocab": vocab, "width": width,
                    "memory_vs_eager": vs_eager, "memory_vs_unfused": vs_unfused,
                    "time_vs_unfused": time_ratio,
                    "pass_memory_eager": vs_eager is not None and vs_eager >= TARGET_VS_EAGER,
                    "pass_memory_unfused": vs_unfused is not None
                    and vs_unfused >= TARGET_VS_UNFUSED,
                    "pass_time": time_ratio <= TARGET_TIME_VS_UNFUSED})
    return out


def _mb(x):
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def _tables(result) -> tuple[list[str], list[list], list[str], list[list]]:
    headers = ["device", "dtype", "N x V x H", "contender", "ms (median)", "peak extra MB",
               "loss diff (abs)", "max grad diff (abs)"]
    rows = [[r["device"], r["dtype"], f"{r['n']}x{r['vocab']}x{r['width']}", r["contender"],
             f"{r['seconds']['median'] * 1e3:.0f}", _mb(r["peak_extra_bytes"]),
             f"{r['loss_diff_vs_eager']:.1e}", f"{r['grad_max_diff_vs_eager']:.1e}"]
            for r in result["rows"] + result["cuda"].get("rows", [])]
    check_headers = ["device", "dtype", "N x V x H", "memory vs eager", "memory vs unfused",
                     "time vs unfused", "verdict"]
    check_rows = []
    for c in result["checks"] + result["cuda"].get("checks", []):
        ok = c["pass_memory_eager"] and c["pass_memory_unfused"] and c["pass_time"]
        check_rows.append([c["device"], c["dtype"], f"{c['n']}x{c['vocab']}x{c['width']}",
                           f"{c['memory_vs_eager']:.1f}x (>= {TARGET_VS_EAGER:g}x)",
                           f"{c['memory_vs_unfused']:.1f}x (>= {TARGET_VS_UNFUSED:g}x)",
                           f"{c['time_vs_unfused']:.2f}x (<= {TARGET_TIME_VS_UNFUSED:g}x)",
                           harness.verdict(ok)])
    return headers, rows, check_headers, check_rows


def report(result) -> str:
    headers, rows, check_headers, check_rows = _tables(result)
    gpu = "" if "rows" in result["cuda"] else f"\nGPU: {result['cuda']['skipped']}"
    return (harness.table(headers, rows) + "\n\nlinear_divergence against the targets:\n"
            + harness.table(check_headers, check_rows) + gpu)


def markdown(result) -> str:
    headers, rows, check_headers, check_rows = _tables(result)

    def md(h, rs):
        return "\n".join(["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
                         + ["| " + " | ".join(map(str, r)) + " |" for r in rs])

    return (f"LM head + KL(teacher || student), forward + backward, frozen head "
            f"({result['machine']['cpu']}, {result['machine']['torch_threads']} threads; "
            f"`{result.get('command', 'python bench/ --only memory')}`)\n\n"
            + md(headers, rows) + "\n\n" + md(check_headers, check_rows))


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(result["rows"])
    names = list(dict.fromkeys(r["contender"] for r in result["rows"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(groups)), 8))
    width = 0.8 / len(names)
    keys = list(groups)
    for i, name in enumerate(names):
        xs = [g + i * width for g in range(len(keys))]
        axes[0].bar(xs, [groups[k][name]["seconds"]["median"] for k in keys], width, label=name)
        axes[1].bar(xs, [(groups[k][name]["peak_extra_bytes"] or 0) / 2**20 for k in keys],
                    width, label=name)
    labels = [f"{d} {dt}\n{n}x{v}x{h}" for d, dt, n, v, h in keys]
    for ax in axes:
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(keys))], labels)
    axes[0].set_ylabel("forward + backward, s (median)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"LM head + KL, frozen head: {result['machine']['cpu']}, "
                      f"{result['machine']['torch_threads']} threads")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("peak extra memory, MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
