"""Scale suite: one bake on one process and on two ranks here, data parallel and with FSDP2.

Each row is a fresh set of processes (one process with two threads, or two gloo ranks with one
thread each: the same two cores), run one after another. Measured per row: the bake's phase
times (its manifest's clock), the bytes handed to each collective per training step and while
sampling, counted at ``torch.distributed``'s calls, resident memory per rank (the peak, loading
included, and the peak while training), and the bake's KL reduction and last training loss.

Two models: the default SmolLM2-135M on a small bake, for time; a Llama built from a config
(TinyLlama-1.1B's shape with random weights and the default model's tokenizer, the largest
here that two whole copies plus their loading fit in 24 GiB), on a minimal bake, for memory per
rank. Every rank loads the whole model before FSDP2 shards it, so the peak counts a whole copy
per rank; the memory while training is where sharding shows.

The 8-GPU projection is arithmetic on the measured bytes (ring collectives: an all-gather or a
reduce-scatter sends (N-1)/N of its whole buffer per rank, an all-reduce twice that) at stated
link speeds; compute on a GPU is not measured here, so it is given as the step time below
which communication would take more than a tenth of the step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import harness
import torch

from promptbake import BakeConfig, models
from promptbake.persona import pirate

CACHE = Path(__file__).resolve().parent / ".cache"
LINKS = {"NVLink (100 GB/s)": 100e9, "PCIe 4 (10 GB/s)": 10e9}  # stated, not measured here
PROJECTED_RANKS = 8
MODES = [("1 process", 1, False), ("2 ranks DDP", 2, False), ("2 ranks FSDP2", 2, True)]
LARGE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)  # TinyLlama-1.1B's shape
QUICK_LARGE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2)


def bakes(quick: bool) -> dict[str, BakeConfig]:
    small = BakeConfig(train_contexts=16, eval_contexts=8, probe_contexts=4, epochs=1.0,
                       checkpoint_every=10_000)
    minimal = BakeConfig(train_contexts=4, eval_contexts=2, probe_contexts=2,
                         samples_per_context=1, max_new_tokens=8, batch_size=2, steps=2,
                         checkpoint_every=10_000)
    if quick:
        small = BakeConfig(train_contexts=4, eval_contexts=2, probe_contexts=2,
                           samples_per_context=1, max_new_tokens=16, steps=2,
                           checkpoint_every=10_000)
    return {"default": small, "large": minimal}


def large_model(quick: bool) -> Path:
    """A Llama of LARGE's shape with random weights and the default model's tokenizer, saved
    once under bench/.cache."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = QUICK_LARGE if quick else LARGE
    path = CACHE / ("scale-llama-" + "-".join(str(v) for v in shape.values()))
    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(models.ensure_default())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    model = LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(path)
    return path


# -- inside each process ------------------------------------------------------------------------


class Counter:
    """Bytes handed to torch.distributed's collectives, by phase and kind, and the resident set
    sampled every 20 ms, by phase. The phase is the bake step running (wrapped below)."""

    KINDS = {"all_gather_single": "all-gather", "all_gather_into_tensor": "all-gather",
             "reduce_scatter_single": "reduce-scatter", "reduce_scatter_tensor": "reduce-scatter",
             "all_reduce": "all-reduce"}

    def __init__(self):
        self.phase = "setup"
        self.bytes: dict[str, dict[str, int]] = {}
        self.rss: dict[str, int] = {}
        self.steps = 0
        self._stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def stop(self) -> None:
        self._stop = True

    def install(self) -> None:
        import importlib

        import torch.distributed as dist

        bake_module = importlib.import_module("promptbake.bake")  # the module, not the function

        for name, kind in self.KINDS.items():
            original = getattr(dist, name)

            def counted(*args, _original=original, _kind=kind, _name=name, **kwargs):
                # the buffer that travels: an all-gather's output, a reduce-scatter's input
                tensor = kwargs.get("input") if "reduce_scatter" in _name else \
                    kwargs.get("output_tensor", kwargs.get("tensor"))
                if tensor is None:
                    tensor = args[1] if "reduce_scatter" in _name else args[0]
                per = self.bytes.setdefault(self.phase, {})
                per[_kind] = per.get(_kind, 0) + tensor.numel() * tensor.element_size()
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        for name, phase in (("sample_trajectories", "sample"), ("optimizer_step", "train"),
                            ("kl_on", "measure")):
            original = getattr(bake_module, name)

            def phased(*args, _original=original, _phase=phase, **kwargs):
                self.phase = _phase
                try:
                    return _original(*args, **kwargs)
                finally:
                    if _phase == "train":
                        self.steps += 1
                    self.phase = "other"

            setattr(bake_module, name, phased)

    def _sample(self) -> None:
        while not self._stop:
            rss = _status_kb("VmRSS")
            self.rss[self.phase] = max(self.rss.get(self.phase, 0), rss)
            time.sleep(0.02)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(rank: int, size: int, init: str, model: str, config: dict, fsdp: bool,
            out: str, results: str) -> None:
    import torch.distributed as dist

    from promptbake import bake

    torch.set_num_threads(2 // size)
    harness.can_measure_memory()  # freed buffers go back to the OS, as the resident set shows
    counter = Counter()
    if size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size))
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    counter.install()
    try:
        baked = bake(pirate().prompt, model=model, config=BakeConfig(**config), out=out,
                     overwrite=True, fsdp=fsdp)
        found = {"rank": rank, "bytes": counter.bytes, "rss": counter.rss,
                 "peak_rss": _status_kb("VmHWM"), "steps": counter.steps,
                 "seconds": baked.manifest["wall_seconds"],
                 "reduction": baked.manifest["kl"]["reduction"],
                 "last_loss": baked.manifest["train_kl_per_token"][-1][1],
                 # a sharded parameter's numel is its whole size
                 "parameters": sum(p.numel() for p in baked.model.parameters())}
    finally:
        counter.stop()
        if size > 1:
            dist.destroy_process_group()
    Path(results.format(rank=rank)).write_text(json.dumps(found))


def measure(label: str, model: str, config: BakeConfig, size: int, fsdp: bool, log) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        results = str(Path(tmp) / "rank{rank}.json")
        start = time.perf_counter()
        mp.start_processes(_worker, args=(size, f"file://{tmp}/rendezvous", str(model),
                                          dataclasses.asdict(config), fsdp,
                                          str(Path(tmp) / "baked"), results),
                           nprocs=size, start_method="spawn")
        wall = time.perf_counter() - start
        ranks = [json.loads(Path(results.format(rank=r)).read_text()) for r in range(size)]
    first = ranks[0]
    steps = max(1, first["steps"])
    train_bytes = first["bytes"].get("train", {})
    row = {"model": label, "ranks": size, "fsdp": fsdp, "wall_seconds": wall,
           "phases": first["seconds"], "steps": first["steps"],
           "step_seconds": first["seconds"].get("train", 0.0) / steps,
           "bytes_per_step": {k: v / steps for k, v in train_bytes.items()},
           "bytes_by_phase": first["bytes"], "parameters": first["parameters"],
           "peak_rss_per_rank": max(r["peak_rss"] for r in ranks),
           "train_rss_per_rank": max(r["rss"].get("train", 0) for r in ranks),
           "reduction": first["reduction"], "last_loss": first["last_loss"]}
    log(f"    {label}, {size} rank(s){' FSDP2' if fsdp else ''}: {wall:.0f} s, "
        f"train step {row['step_seconds']:.2f} s, peak RSS/rank "
        f"{row['peak_rss_per_rank'] / 2**30:.2f} GiB")
    return row


def projection(row: dict, ranks: int = PROJECTED_RANKS) -> dict:
    """Bytes each rank sends per step with ``ranks`` ring ranks, from the bytes this row's
    collectives carried (their whole buffers do not depend on the rank count, their shares
    do), and the time that takes at each link speed."""
    buffers = row["bytes_per_step"]
    share = (ranks - 1) / ranks
    sent = share * (buffers.get("all-gather", 0) + buffers.get("reduce-scatter", 0)) + \
        2 * share * buffers.get("all-reduce", 0)
    seconds = {name: sent / speed for name, speed in LINKS.items()}
    # communication at most a tenth of the step, not overlapped: the step takes >= 10x it
    return {"ranks": ranks, "bytes_sent_per_rank": sent, "comm_seconds": seconds,
            "step_for_90pct": {name: 9 * s for name, s in seconds.items()}}


def run(args, log) -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    harness.can_measure_memory()
    configs = bakes(args.quick)
    models_ = {"default": models.ensure_default(), "large": large_model(args.quick)}
    rows = []
    for key in ("default", "large"):
        label = "SmolLM2-135M" if key == "default" else "Llama (config-built, random)"
        for _, size, fsdp in MODES:
            rows.append(measure(label, models_[key], configs[key], size, fsdp, log))
    for row in rows:
        row["projection"] = projection(row)
    gpu = "no GPU: CPU and gloo only" if not torch.cuda.is_available() else \
        "a GPU is present, but this suite runs the CPU rows only"
    return {"suite": "scale", "machine": harness.machine(), "rows": rows,
            "configs": {k: c.__dict__ for k, c in configs.items()}, "gpu": gpu,
            "links": LINKS}


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def _mb(x) -> str:
    return f"{x / 1e6:.1f}"


def _tables(result):
    headers = ["model", "params", "run", "wall s", "sample s", "train s", "measure s",
               "train step s", "MB / step (gather, scatter, all-reduce)", "peak RSS/rank GiB",
               "train RSS/rank GiB", "KL reduction", "last loss"]
    rows = []
    for r in result["rows"]:
        ph, b = r["phases"], r["bytes_per_step"]
        run = "1 process" if r["ranks"] == 1 else f"{r['ranks']} ranks " + (
            "FSDP2" if r["fsdp"] else "DDP")
        measure_s = ph.get("measure_before", 0) + ph.get("measure_after", 0)
        rows.append([r["model"], f"{r['parameters'] / 1e6:.0f}M", run, f"{r['wall_seconds']:.0f}",
                     f"{ph.get('sample', 0):.0f}", f"{ph.get('train', 0):.0f}",
                     f"{measure_s:.0f}", f"{r['step_seconds']:.2f}",
                     (f"{_mb(b.get('all-gather', 0))}, {_mb(b.get('reduce-scatter', 0))}, "
                      f"{_mb(b.get('all-reduce', 0))}"),
                     _gib(r["peak_rss_per_rank"]), _gib(r["train_rss_per_rank"]),
                     f"{100 * r['reduction']:.1f}%", f"{r['last_loss']:.4f}"])
    p_headers = ["model", "run", f"MB sent / rank / step at {PROJECTED_RANKS} ranks"] + \
        [f"comm s at {n}" for n in LINKS] + [f"step for 90% at {n}" for n in LINKS]
    p_rows = []
    for r in result["rows"]:
        if r["ranks"] == 1:
            continue
        p = r["projection"]
        p_rows.append([r["model"], "FSDP2" if r["fsdp"] else "DDP",
                       _mb(p["bytes_sent_per_rank"])]
                      + [f"{s * 1e3:.1f} ms" for s in p["comm_seconds"].values()]
                      + [f">= {s * 1e3:.0f} ms" for s in p["step_for_90pct"].values()])
    return headers, rows, p_headers, p_rows


def report(result) -> str:
    headers, rows, p_headers, p_rows = _tables(result)
    return (harness.table(headers, rows)
            + f"\n\nProjected to {PROJECTED_RANKS} ranks from the bytes above (ring collectives, "
            "stated link speeds, communication not overlapped):\n"
            + harness.table(p_headers, p_rows) + f"\nGPU: {result['gpu']}")


def markdown(result) -> str:
    headers, rows, p_headers, p_rows = _tables(result)

    def md(h, rs):
        return "\n".join(["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
                         + ["| " + " | ".join(map(str, r)) + " |" for r in rs])

    return md(headers, rows) + "\n\n" + md(p_headers, p_rows)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model'].split(' ')[0]}\n" + ("1 proc" if r["ranks"] == 1 else
                                                   "FSDP2" if r["fsdp"] else "DDP")
              for r in result["rows"]]
    axes[0].bar(labels, [r["wall_seconds"] for r in result["rows"]], color="tab:blue")
    axes[0].set_ylabel("bake wall time (s)")
    axes[0].set_title("same bake, 1 process vs 2 ranks (2 cores)")
    x = range(len(labels))
    axes[1].bar([i - 0.2 for i in x], [r["peak_rss_per_rank"] / 2**30 for r in result["rows"]],
                width=0.4, label="peak (loading included)")
    axes[1].bar([i + 0.2 for i in x], [r["train_rss_per_rank"] / 2**30 for r in result["rows"]],
                width=0.4, label="while training")
    axes[1].set_xticks(list(x), labels)
    axes[1].set_ylabel("resident memory per rank (GiB)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
