"""Divergence suite: forward + backward of KL(teacher || student) from raw logits.

Contenders, on the same inputs in the same process: eager torch (log_softmax + kl_div +
backward), torch.compile of the same function, and every promptbake backend that runs on CPU
tensors. Targets: cpp >= 3x eager and >= 1.5x torch.compile at every shape, peak
extra memory no more than the one N x V gradient buffer.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

import harness
import promptbake

FULL_SHAPES = [(n, v) for n in (512, 2048) for v in (32000, 49152, 151936)]
QUICK_SHAPES = [(512, 32000), (512, 151936)]
TARGET_VS_EAGER = 3.0
TARGET_VS_COMPILE = 1.5
HUGE = 2 << 20


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


def measure_shape(n, vocab, dtype, repeats, log):
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(n, vocab, generator=gen) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, vocab, generator=gen) * 2).to(dtype)
    grad_bytes = n * vocab * student.element_size()
    must_move = n * vocab * (2 * student.element_size() + teacher.element_size())
    log(f"  N={n} V={vocab} {str(dtype).replace('torch.', '')}")

    torch._dynamo.reset()  # compile afresh for this shape (it specialises on it)
    compiled = torch.compile(eager_kl, dynamic=False)
    compile_seconds = harness.timeit(lambda: fwd_bwd(compiled, student, teacher),
                                     repeats=1, warmup=0)["median"]
    student.grad = None
    fns = {"eager": eager_kl, "torch.compile": compiled, **promptbake_contenders()}

    def step(fn):
        fwd_bwd(fn, student, teacher)
        student.grad = None

    timings = harness.timeit_side_by_side(
        {name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}, repeats, warmup=2)

    rows, reference = [], None
    for name, fn in fns.items():
        gc.collect()
        promptbake.ops.empty_cache()  # pooled buffers count as new memory, as they are at first
        loss = None

        def keep_grad():
            nonlocal loss
            loss = fwd_bwd(fn, student, teacher)

        peak = harness.peak_extra_bytes(keep_grad)
        if reference is None:
            reference = (loss, student.grad.float())
            loss_diff = grad_diff = 0.0
        else:
            loss_diff = abs(float(loss) - float(reference[0]))
            grad_diff = float((student.grad.float() - reference[1]).abs().max())
        student.grad = None
        timing = timings[name]
        rows.append({"contender": name, "n": n, "vocab": vocab,
                     "dtype": str(dtype).replace("torch.", ""), "seconds": timing,
                     "compile_seconds": compile_seconds if name == "torch.compile" else None,
                     "peak_extra_bytes": peak,
                     "peak_extra_over_grad": None if peak is None else peak / grad_bytes,
                     "bandwidth_gbs": must_move / timing["median"] / 1e9,
                     "loss": float(loss), "loss_diff_vs_eager": loss_diff,
                     "grad_max_diff_vs_eager": grad_diff})
    return rows


def run(args, log) -> dict:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    repeats = args.repeats or (3 if args.quick else 7)
    largest = max(n * v for n, v in shapes) * 4
    copy = harness.copy_bandwidth(min(largest, 1 << 30), repeats=max(repeats, 5))
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
            "rows": rows, "checks": checks(rows)}


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
