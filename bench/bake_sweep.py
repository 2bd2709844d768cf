"""Bake-sweep suite: how the bake's defaults were chosen.

The README's persona on the default model, one setting changed at a time around the defaults:
fresh trajectories for each data setting (same seeds), the same held-out samples for all, the
held-out KL reduction and the sampling and training wall time of each run.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

import harness
from bake import PROMPT
from promptbake import BakeConfig, contexts as contexts_mod, mc_kl, models
from promptbake.framing import Framing
from promptbake.modeling import BAKED, BASE
from promptbake.train import (Divergence, attach_lora, batch_plan, for_training, make_optimizer,
                              optimizer_step, sample_trajectories)

MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "defaults": {},
    "lora_alpha 1 (the original code's)": {"alpha": 1.0},
    "lr 1e-3": {"lr": 1e-3},
    "lr 6e-3": {"lr": 6e-3},
    "rank 2, alpha 4": {"rank": 2, "alpha": 4.0},
    "rank 16, alpha 32": {"rank": 16, "alpha": 32.0},
    "adapters on the MLP too": {"target_modules": MLP},
    "96 contexts (fewer trajectories)": {"train_contexts": 96},
    "1 sample per context (same steps)": {"samples_per_context": 1, "steps": 144},
    "5 epochs (more steps)": {"epochs": 5.0},
    "constant lr": {"schedule": "constant"},
    "fp32 matmuls": {"precision": "fp32"},
}
QUICK = ["defaults", "lr 1e-3"]


def run(args, log) -> dict:
    lm, tokenizer, _ = models.load(None)
    base = BakeConfig()
    framing = Framing(tokenizer, PROMPT, base.framing)
    # Every held-out context (not the bake's first 24): close settings need the smaller error.
    held_out = contexts_mod.resolve(None, "held_out")
    held_traj = sample_trajectories(lm, tokenizer, [framing.teacher_ids(c) for c in held_out],
                                    base, "none", seed=base.seed + 1, samples=1)
    before = mc_kl.kl_on(lm, framing, held_out, held_traj, {"base": BASE},
                         pad_id=tokenizer.pad_token_id)["base"]
    rows, cache = [], {}
    for name in (QUICK if args.quick else VARIANTS):
        config = dataclasses.replace(base, **VARIANTS[name])
        log(f"  {name}")
        drawn = contexts_mod.for_bake(None, "train", config.train_contexts, config.seed)
        model, row = variant(lm, tokenizer, framing, drawn, config, cache,
                             (held_out, held_traj, before))
        rows.append({"variant": name, "changes": VARIANTS[name], **row})
        del model
    return {"suite": "bake-sweep", "machine": harness.machine(), "prompt": PROMPT,
            "defaults": dataclasses.asdict(base), "before": before.to_dict(), "rows": rows}


def variant(lm, tokenizer, framing, drawn: list, config: BakeConfig, cache: dict, measured_on):
    """One variant of a sweep: trajectories on the ``drawn`` training contexts (sampled once per
    (contexts, samples) setting and kept in ``cache``), a LoRA trained on them as ``bake``
    trains, and its held-out KL reduction on ``measured_on`` = (contexts, samples, KL before).
    Returns (the trained model, its row: trajectories, steps, times, KL after, reduction)."""
    held_out, held_traj, before = measured_on
    prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in drawn]
    key = (config.train_contexts, config.samples_per_context)
    start = time.perf_counter()
    if key not in cache:
        cache[key] = sample_trajectories(lm, tokenizer, [p[0] for p in prefixes], config, "full",
                                         seed=config.seed, samples=config.samples_per_context)
    sample_seconds = time.perf_counter() - start
    trajectories = cache[key]
    model, train_seconds = train(lm, config, Divergence(trajectories, prefixes, config,
                                                        tokenizer.pad_token_id), trajectories)
    after = mc_kl.kl_on(model, framing, held_out, held_traj, {"b": BAKED},
                        pad_id=tokenizer.pad_token_id)["b"]
    reduction, se = mc_kl.reduction(before, after)
    return model, {"trajectories": len(trajectories), "steps": config.total_steps(trajectories),
                   "sample_seconds": sample_seconds, "train_seconds": train_seconds,
                   "kl_after": after.to_dict(), "reduction": reduction, "reduction_se": se}


def train(lm, config: BakeConfig, objective, trajectories, init=None):
    """(a LoRA-adapted copy of ``lm`` trained on ``objective`` as ``bake`` trains, in eval mode;
    the training's wall seconds, ``init(model)`` included: another initialisation of the
    adapter, before the optimizer takes its parameters)."""
    total = config.total_steps(trajectories)
    torch.manual_seed(config.seed)
    model = attach_lora(copy.deepcopy(lm), config)
    start = time.perf_counter()
    if init is not None:
        init(model)
    optimizer, schedule = make_optimizer(model, config, total)
    model.train()
    with for_training(model, config.autocast_dtype(torch.device("cpu"))):
        for step in range(total):
            optimizer_step(model, objective, batch_plan(step, trajectories, config), optimizer,
                           schedule, config.max_grad_norm)
    model.eval()
    return model, time.perf_counter() - start


def report(result) -> str:
    body = [[r["variant"], r["trajectories"], r["steps"],
             "(shared)" if r["sample_seconds"] < 1 else f"{r['sample_seconds']:.0f}",
             f"{r['train_seconds']:.0f}", f"{r['kl_after']['per_token']:.4f}",
             f"{100 * r['reduction']:.1f}% ± {100 * r['reduction_se']:.1f}%"]
            for r in result["rows"]]
    return (f"KL(prompted || base) {result['before']['per_token']:.4f} nats/token on "
            f"{result['before']['sequences']} held-out samples\n" + harness.table(
                ["variant", "traj", "steps", "sample s", "train s", "KL/token after",
                 "reduction"], body))


def markdown(result) -> str:
    lines = [f"`{result['command']}` — {result['machine']['cpu']}, "
             f"{result['machine']['torch_threads']} threads, {result['machine']['date'][:10]}",
             "", "| variant | trajectories | steps | train s | held-out KL reduction |",
             "|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['trajectories']} | {r['steps']} | "
                     f"{r['train_seconds']:.0f} | {100 * r['reduction']:.1f}% ± "
                     f"{100 * r['reduction_se']:.1f}% |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["variant"] for r in rows], [100 * r["reduction"] for r in rows],
            xerr=[100 * r["reduction_se"] for r in rows], color="tab:blue")
    ax.axvline(90, color="k", ls="--", lw=0.8)
    ax.set_xlabel("held-out KL reduction, %")
    ax.set_xlim(min(100 * r["reduction"] for r in rows) - 5, 100)
    ax.invert_yaxis()
    ax.set_title("one change at a time around the defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
