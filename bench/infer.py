"""Infer suite: the baked persona served every way promptbake exports it, side by side.

The README's pirate bake on the default model, batch 1, greedy, prompts from the held-out
contexts. Contenders:

* torch eager fp32 *with the system prompt*: what a user runs without baking;
* torch eager fp32 baked (merged, no prompt);
* ONNX Runtime fp32 baked, int8 baked, int4 as exported by default (``MatMulNBits``, HQQ,
  block 32, the base's weights in 4 bits with the bake's LoRA beside them in fp32, the head and
  tied embedding in 8 bits, fp32 compute), the same with 60 steps of recovery (the LoRA and
  the 4-bit scales trained on the 4-bit base), the same with int8 compute, the same with a 4-bit
  head, the merged bake in 4 bits (head too: what int4 was before the LoRA beside), and pruned +
  int8 at each pruning setting the README shows (Wanda 25%, 50% and 2:4, each recovered);
* GGUF (llama.cpp's formats) q8_0 merged, q4_1 with the LoRA beside the base in a llama.cpp
  adapter (the export's default at 4 bits; the default model's own format) and q4_0 merged:
  size (the adapter included), parity and retention, measured on the file as transformers' GGUF
  loader reads it back (with the adapter's delta added); decode latency with llama.cpp where
  ``llama-cpp-python`` is installed (not a dependency: it compiles llama.cpp on install,
  ``pip install llama-cpp-python``, ~8 minutes on 2 cores), otherwise none.

For each: time to first token (the prompt's forward pass), per-token decode latency (p50 and p95
over every decode step of every prompt, at least 200), size on disk, and accuracy: held-out
KL(prompted || model) on the bake's held-out samples and the share of the bake's KL reduction
kept (retention). Torch decodes with its KV cache in a plain loop (no ``generate`` overhead);
decoding runs to the full length (EOS ignored) so that every contender decodes the same number of
steps; contenders take turns on each prompt. The SparseLinear kernel's own table is the
``sparse`` suite (``python bench/ --only sparse``).

Targets on the 2-core CPU: ONNX Runtime int8 decode p95 < 50 ms per token; >= 3x faster decode
than torch eager fp32 with the prompt; >= 75% smaller on disk with int8;
int8 keeps >= 99% of the baked fp32 model's accuracy (reported for pruning); int4 >= 85% smaller
with >= 97% retention and a decode p50 <= 0.8x int8's; pruning >= 80% smaller with >= 95%
retention (or off the documented serving path); every export passes its parity check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import harness
from common import CACHE, PIRATE, cached_bake, pirate_config
from promptbake import compress, contexts as contexts_mod, load_baked
from promptbake.export import Int4Options, OnnxLM, ParityError, export_baked, merge

TARGET_P95_MS = 50.0
TARGET_SPEEDUP = 3.0
TARGET_SMALLER_INT8 = 0.75
TARGET_SMALLER_PRUNED = 0.80  # with TARGET_RETENTION_PRUNED, or pruning leaves the README
TARGET_RETENTION = 0.99
TARGET_SMALLER_INT4 = 0.85
TARGET_RETENTION_INT4 = 0.97
TARGET_INT4_DECODE = 0.8  # int4 decode p50 / int8's
TARGET_RETENTION_PRUNED = 0.95
PRUNINGS = {"onnx pruned 25% + int8": ("pruned25-int8", 0.25),  # the settings the README shows
            "onnx pruned 50% + int8": ("pruned-int8", 0.5),
            "onnx pruned 2:4 + int8": ("pruned24-int8", "2:4")}
# int4 contenders: Int4Options by export key (the default first)
INT4_RECOVER_STEPS = 60
INT4 = {"onnx-int4": Int4Options(),
        "int4-recovered": Int4Options(recover_steps=INT4_RECOVER_STEPS),
        "int4-int8": Int4Options(accuracy_level=4),
        "int4-head4": Int4Options(head_bits=4),
        "int4-merged": Int4Options(lora="merge", head_bits=4)}
ONNX = {"onnx fp32 baked": "onnx-fp32", "onnx int8 baked": "onnx-int8",
        "onnx int4 (default: LoRA beside, 8-bit head)": "onnx-int4",
        f"onnx int4 + recovery ({INT4_RECOVER_STEPS} steps)": "int4-recovered",
        "onnx int4, int8 compute": "int4-int8", "onnx int4, 4-bit head": "int4-head4",
        "onnx int4 merged, 4-bit head": "int4-merged",
        **{name: key for name, (key, _) in PRUNINGS.items()}}
# GGUF contenders: (quantize, lora) by row; the export's default at 4 bits keeps the LoRA in a
# llama.cpp adapter beside the base
GGUF = {"gguf q8_0": ("q8_0", "merge"),
        "gguf q4_1 + LoRA adapter (default at 4 bits)": ("q4_1", "adapter"),
        "gguf q4_0 merged": ("q4_0", "merge")}


def _gguf_key(name: str) -> str:
    return "gguf-{}-{}".format(*GGUF[name])


def _has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@contextlib.contextmanager
def _no_repack(llama_cpp):
    """llama.cpp's weight repacking off (``llama-cli --no-repack``) for the models loaded in the
    block. llama-cpp-python's ``Llama`` has no argument for it, so its default model parameters
    are wrapped. On a CPU with AMX, the llama.cpp of llama-cpp-python 0.3.36 crashes on the
    first decode of every quantised model whose weights it repacked for AMX (q8_0, q4_1, q4_0,
    with or without a LoRA adapter; measured 2026-12-07), as llama.cpp issue 20824 reports."""
    default = llama_cpp.llama_model_default_params

    def params():
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = default


def llama_cpp_decoder(path: Path, threads: int, new_tokens: int, lora: Path | None = None):
    """``decode(ids) -> (time to first token, decode step times)`` of greedy decoding of the GGUF
    file at ``path`` (with the LoRA adapter file ``lora``) with llama.cpp
    (``llama-cpp-python``; weight repacking off on a CPU with AMX), or None when it is not
    installed."""
    try:
        import llama_cpp.llama_cpp as llama_cpp
        from llama_cpp import Llama
    except ImportError:
        return None
    with _no_repack(llama_cpp) if _has_amx() else contextlib.nullcontext():
        llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads,
                    n_threads_batch=threads, verbose=False,
                    **({"lora_path": str(lora)} if lora is not None else {}))

    def decode(ids: list[int]) -> tuple[float, list[float]]:
        llm.reset()  # no prefix reuse from the previous prompt: every prompt is a cold prefill
        steps, first = [], None
        last = start = time.perf_counter()
        for count, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1), start=1):
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                steps.append(now - last)
            last = now
            if count == new_tokens:
                break
        return first, steps

    decode.close = llm.close  # before the interpreter exits, or llama-cpp-python's __del__ fails
    return decode


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@torch.no_grad()
def torch_decode(model, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """(time to first token, decode step times) of a greedy KV-cached loop in eager torch."""
    start = time.perf_counter()
    out = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    first = time.perf_counter() - start
    steps = []
    past = out.cache
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=token, cache=past, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.cache
        steps.append(time.perf_counter() - start)
    return first, steps


def run(args, log) -> dict:
    quick = args.quick
    prompts_n, new_tokens = (3, 24) if quick else (6, 48)
    recover_steps = 4 if quick else 60
    recover_steps_int4 = 4 if quick else INT4_RECOVER_STEPS
    config = pirate_config(quick)
    result = {"suite": "infer", "machine": harness.machine(), "quick": quick,
              "threads": torch.get_num_threads(), "new_tokens": new_tokens,
              "prompts": prompts_n, "recover_steps": recover_steps,
              "prunings": {key: str(amount) for key, amount in PRUNINGS.values()}}
    made = cached_bake("pirate-quick" if quick else "pirate", PIRATE, config, log=log)
    baked = load_baked(made["path"])
    exports = CACHE / ("infer-quick" if quick else "infer")
    exports.mkdir(parents=True, exist_ok=True)

    log(f"  exports: ONNX fp32, int8, int4 ({len(INT4)} ways), pruned + int8 (3 settings); GGUF "
        f"q8_0, q4_1 with the LoRA as an adapter, q4_0 merged (each checked against torch, each "
        f"measured on the bake's held-out samples)")
    built, failed = {}, {}
    for name, options in (("onnx-fp32", {}), ("onnx-int8", {"quantize": "int8"}),
                          *((key, {"quantize": "int4", "int4": dataclasses.replace(
                              int4, recover_steps=int4.recover_steps and recover_steps_int4)})
                            for key, int4 in INT4.items()),
                          *((key, {"quantize": "int8",
                                   "prune": compress.pruner(baked, amount,
                                                            recover_steps=recover_steps)})
                            for key, amount in PRUNINGS.values()),
                          *((_gguf_key(name), {"format": "gguf", "quantize": q, "gguf_lora": lora})
                            for name, (q, lora) in GGUF.items())):
        start = time.perf_counter()
        try:
            done = export_baked(baked, exports / name, overwrite=True, **options)
        except ParityError as err:  # recorded; the suite goes on without this contender
            failed[name] = err.report
            log(f"    {name}: FAILED its parity check: {err}")
            continue
        built[name] = {"path": done.path, "manifest": done.manifest,
                       "seconds": time.perf_counter() - start}
        log(f"    {name}: {done.manifest['bytes'] / 1e6:.1f} MB in {built[name]['seconds']:.0f} s")

    merged = merge(baked, 1.0).eval()
    base = baked.model.get_base_model()  # the adapter's layers pass through when disabled
    threads = torch.get_num_threads()
    sessions = {key: OnnxLM(built[key]["path"], threads=threads) for key in ONNX.values()
                if key in built}
    held_out = contexts_mod.builtin("held_out")[:prompts_n]
    teacher_ids = [baked.framing.teacher_ids(c) for c in held_out]
    student_ids = [baked.framing.student_ids(c) for c in held_out]

    def run_torch(model, ids):
        if model is base:
            with baked.model.disable_adapter():
                return torch_decode(model, ids, new_tokens)
        return torch_decode(model, ids, new_tokens)

    def run_onnx(name, ids):
        g = sessions[name].generate([ids], new_tokens, eos_token_ids=())
        return g.prefill_seconds, g.step_seconds

    contenders = {
        "torch fp32 + prompt": lambda k: run_torch(base, teacher_ids[k]),
        "torch fp32 baked": lambda k: run_torch(merged, student_ids[k]),
        "onnx fp32 baked": lambda k: run_onnx("onnx-fp32", student_ids[k]),
        **{name: (lambda k, key=key: run_onnx(key, student_ids[k]))
           for name, key in ONNX.items() if key != "onnx-fp32" and key in built},
    }
    decoders = []
    for name in GGUF:  # llama.cpp, where llama-cpp-python is installed
        if _gguf_key(name) in built:
            path = built[_gguf_key(name)]["path"]
            adapter = path / "adapter.gguf"
            decode = llama_cpp_decoder(path / "model.gguf", threads, new_tokens,
                                       adapter if adapter.exists() else None)
            if decode is not None:
                decoders.append(decode)
                contenders[name] = lambda k, decode=decode: decode(student_ids[k])
    log(f"  latency: {prompts_n} held-out prompts x {new_tokens} tokens, contenders in turns")
    for fn in contenders.values():  # warm-up
        fn(0)
    timings = {name: {"ttft": [], "steps": []} for name in contenders}
    for k in range(prompts_n):
        for name, fn in contenders.items():
            first, steps = fn(k)
            timings[name]["ttft"].append(first)
            timings[name]["steps"].extend(steps)
    for decode in decoders:
        decode.close()

    # Accuracy: each export's manifest holds its held-out KL to the prompted model, measured at
    # export on the bake's held-out samples (the same samples for every export).
    accuracy = {key: info["manifest"]["held_out_kl"] for key, info in built.items()}
    bake_kl = accuracy["onnx-fp32"]
    fp32_bytes = built["onnx-fp32"]["manifest"]["bytes"]
    rows = {}
    for name in [*timings, *(n for n in GGUF if _gguf_key(n) in built and n not in timings)]:
        t = timings.get(name)
        row = {"ttft_ms": None, "decode_p50_ms": None, "decode_p95_ms": None, "decode_steps": 0}
        if t is not None:
            row = {"ttft_ms": 1e3 * statistics.median(t["ttft"]),
                   "decode_p50_ms": 1e3 * _percentile(t["steps"], 50),
                   "decode_p95_ms": 1e3 * _percentile(t["steps"], 95),
                   "decode_steps": len(t["steps"])}
        key = ONNX.get(name) or (_gguf_key(name) if name in GGUF else None)
        if key is not None:
            kl = accuracy[key]
            own = kl["gguf" if key.startswith("gguf") else "onnx"]
            row.update(bytes=built[key]["manifest"]["bytes"], kl_per_token=own["per_token"],
                       kl_se=own["per_token_se"], retention=kl["retention"])
        elif name == "torch fp32 baked":
            row.update(bytes=_weights_bytes(baked),  # merged: the base model's size
                       kl_per_token=bake_kl["baked"]["per_token"],
                       kl_se=bake_kl["baked"]["per_token_se"], retention=1.0)
        else:
            row.update(bytes=_weights_bytes(baked), kl_per_token=0.0, kl_se=0.0,
                       retention=None)
        row["smaller_than_fp32"] = 1 - row["bytes"] / fp32_bytes
        rows[name] = row
    result["rows"] = rows
    result["base_kl_per_token"] = bake_kl["base"]["per_token"]
    result["exports"] = {name: {"seconds": info["seconds"], "parity": info["manifest"]["parity"],
                                "pruning": info["manifest"].get("source", {}).get("pruning"),
                                "int4": info["manifest"].get("int4")}
                         for name, info in built.items()}
    result["exports"].update({name: {"parity": report, "failed": True}
                              for name, report in failed.items()})
    result["llama_cpp_repack"] = not _has_amx()  # repacking off where AMX would crash it
    result["ttft_ratio_baked_vs_prompted"] = \
        rows["torch fp32 baked"]["ttft_ms"] / rows["torch fp32 + prompt"]["ttft_ms"]
    result["checks"] = checks(result)
    if not quick:
        shutil.rmtree(exports, ignore_errors=True)  # ~1.3 GB of exports
    return result


def _weights_bytes(baked) -> int:
    """Size of the base model's weight files (what the prompted user serves)."""
    path = Path(baked.manifest["base_model"]["path"])
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def checks(result) -> list[dict]:
    r = result["rows"]
    int8, prompted = r["onnx int8 baked"], r["torch fp32 + prompt"]
    # an export that failed its parity check has no row: it keeps nothing of the bake
    missing = {"smaller_than_fp32": 0.0, "retention": float("-inf"), "bytes": 0.0,
               "decode_p50_ms": float("inf")}
    # the pruning setting that keeps the most of the bake answers for pruning
    pruned_name = max((n for n in PRUNINGS if n in r), default="no pruned export",
                      key=lambda n: r[n]["retention"])
    pruned = r.get(pruned_name, missing)
    # the int4 option that keeps the most of the bake answers for int4
    best = max((n for n in r if n.startswith("onnx int4")), default="no int4 export",
               key=lambda n: r[n]["retention"])
    int4 = r.get(best, missing)
    speedup = prompted["decode_p50_ms"] / int8["decode_p50_ms"]
    int4_decode = int4["decode_p50_ms"] / int8["decode_p50_ms"]
    failed = [name for name, e in result["exports"].items() if not e["parity"]["passed"]]
    return [
        {"target": f"ONNX Runtime int8 decode p95 < {TARGET_P95_MS:g} ms/token",
         "measured": f"{int8['decode_p95_ms']:.1f} ms (p50 {int8['decode_p50_ms']:.1f})",
         "pass": int8["decode_p95_ms"] < TARGET_P95_MS},
        {"target": f">= {TARGET_SPEEDUP:g}x faster decode than torch eager fp32 with the prompt",
         "measured": f"{speedup:.2f}x (p50 {prompted['decode_p50_ms']:.1f} -> "
                     f"{int8['decode_p50_ms']:.1f} ms)", "pass": speedup >= TARGET_SPEEDUP},
        {"target": f">= {100 * TARGET_SMALLER_INT8:.0f}% smaller on disk with int8",
         "measured": f"{100 * int8['smaller_than_fp32']:.1f}% ({int8['bytes'] / 1e6:.1f} MB)",
         "pass": int8["smaller_than_fp32"] >= TARGET_SMALLER_INT8},
        {"target": f"int8 keeps >= {100 * TARGET_RETENTION:.0f}% of the baked fp32 accuracy",
         "measured": f"{100 * int8['retention']:.2f}% of the KL reduction",
         "pass": int8["retention"] >= TARGET_RETENTION},
        _smaller_and_kept("int4", best, int4, TARGET_SMALLER_INT4, TARGET_RETENTION_INT4),
        {"target": f"int4 decode p50 <= {TARGET_INT4_DECODE:g}x int8's",
         "measured": f"{best}: {int4_decode:.2f}x ({int4['decode_p50_ms']:.1f} vs "
                     f"{int8['decode_p50_ms']:.1f} ms)", "pass": int4_decode <= TARGET_INT4_DECODE},
        _smaller_and_kept("pruning", pruned_name, pruned, TARGET_SMALLER_PRUNED,
                          TARGET_RETENTION_PRUNED, " (or off the serving path)"),
        {"target": "every export passes its parity check",
         "measured": f"{len(result['exports']) - len(failed)} of {len(result['exports'])}"
                     + (f" (failed: {', '.join(failed)})" if failed else ""),
         "pass": not failed},
    ]


def _smaller_and_kept(what: str, name: str, row: dict, smaller: float, kept: float,
                      note: str = "") -> dict:
    """The check that the export ``name`` (the best of ``what``) is small and keeps the bake."""
    return {"target": f"{what} >= {100 * smaller:.0f}% smaller with >= {100 * kept:.0f}% "
                      f"retention{note}",
            "measured": f"{name}: {100 * row['smaller_than_fp32']:.1f}% smaller "
                        f"({row['bytes'] / 1e6:.1f} MB), {100 * row['retention']:.1f}% kept",
            "pass": row["smaller_than_fp32"] >= smaller and row["retention"] >= kept}


HEADERS = ["contender", "TTFT ms", "decode p50 ms", "decode p95 ms", "MB on disk", "smaller",
           "KL nats/token", "retention"]


def _cells(name: str, row: dict) -> list[str]:
    retention = "—" if row["retention"] is None else f"{100 * row['retention']:.1f}%"
    if row["decode_p50_ms"] is None:  # GGUF: no llama.cpp runtime here
        times = ["—", "—", "—"]
    else:
        times = [f"{row['ttft_ms']:.0f}", f"{row['decode_p50_ms']:.1f}",
                 f"{row['decode_p95_ms']:.1f}"]
    return [name, *times, f"{row['bytes'] / 1e6:.0f}",
            f"{100 * row['smaller_than_fp32']:.1f}%",
            f"{row['kl_per_token']:.4f} ± {row['kl_se'] or 0:.4f}", retention]


def report(result) -> str:
    lines = [harness.table(HEADERS, [_cells(n, r) for n, r in result["rows"].items()]),
             f"decode steps per contender: {result['rows']['onnx int8 baked']['decode_steps']}; "
             f"KL(prompted || base) {result['base_kl_per_token']:.4f} nats/token; "
             f"time to first token, baked / prompted (torch): "
             f"{result['ttft_ratio_baked_vs_prompted']:.2f}", "",
             harness.checks_table(result["checks"])]
    return "\n".join(lines)


def markdown(result) -> str:
    m = result["machine"]
    lines = [f"`{result['command']}` — {m['cpu']}, {result['threads']} threads, {m['date'][:10]}; "
             f"batch 1, {result['prompts']} held-out prompts × {result['new_tokens']} tokens",
             "", "| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(_cells(n, r)) + " |" for n, r in result["rows"].items()]
    lines += ["", f"Time to first token, baked / prompted (torch eager): "
                  f"{result['ttft_ratio_baked_vs_prompted']:.2f}. Sizes: smaller than the fp32 "
                  f"ONNX export; retention: the share of the bake's held-out KL reduction kept.",
              "", *harness.checks_markdown(result["checks"])]
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["rows"])
    rows = [result["rows"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [r["decode_p50_ms"] or 0 for r in rows], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["decode_p95_ms"] or 0 for r in rows], 0.4, label="p95")
    axes[0].axhline(TARGET_P95_MS, color="grey", ls="--", label="target p95")
    axes[0].set(ylabel="ms per token", title="decode latency, batch 1")
    axes[0].legend()
    axes[1].bar(x, [r["bytes"] / 1e6 for r in rows])
    axes[1].set(ylabel="MB", title="size on disk")
    axes[2].bar(x, [r["kl_per_token"] for r in rows], yerr=[r["kl_se"] or 0 for r in rows],
                capsize=4)
    axes[2].axhline(result["base_kl_per_token"], color="grey", ls="--", label="base, no prompt")
    axes[2].set(ylabel="KL(prompted || model), nats/token", title="held-out accuracy")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
