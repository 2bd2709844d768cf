"""Prompt-sweep suite: changes to the defaults, each measured on several prompts at once.

What a change to the defaults must show before it becomes one: the held-out and the
off-distribution KL reduction of each prompt of a panel (``prompts.PANEL``, the ones named by
``PROMPTS``), with the change and without it, on the same held-out and probe samples. The
changes are those the prompts benchmark suggested when a prompt missed its target: sampling the
trajectories at another temperature, more samples on the short task-like contexts (whose
responses are short, so they hold few of a bake's tokens), a regularisation term added to
Eq. 3 through the training objective (an L2 pull on the LoRA update, ``sum ||B A||^2``, so the
update stays small where the data do not ask for it) — those three measured and dropped — and
twice the training, spent two ways: the same contexts for 8 epochs, or 288 contexts for 4; and
the default budget spent otherwise: twice the steps of half the batch, the learning rate
doubled, halved or cut to a third, or LoRA+ (the B factors at 4 or 16 times the learning rate
of the A factors; Hayou et al., 2024), or one sample each of more contexts; and the adapter
started otherwise (EVA: each A from the principal directions of its layer's inputs)
(``SWEEP`` names the variants a run measures,
``PROMPTS`` the prompts; ``--variant`` and ``--prompt`` pick others).
Run on demand (``python bench/ --only prompt-sweep``): about an hour on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import time

import torch

import harness
from bake_sweep import train
from prompts import PANEL, pct
from promptbake import BakeConfig, contexts as contexts_mod, mc_kl, models
from promptbake.framing import Framing
from promptbake.modeling import BAKED, BASE, right_padded
from promptbake.train import Divergence, sample_trajectories

PROMPTS = ["cat (persona)", "terse (style)"]  # a persona, and the style furthest below target
VARIANTS = {
    "defaults": {},
    "L2 on the LoRA update, 1/4 of Eq. 3 at the end": {"l2": 0.25},  # the defaults' samples
    "temperature 0.7": {"config": {"temperature": 0.7}},
    "4 samples on short contexts (same steps)": {"short_samples": 4},
    # Twice the training, two ways: the same contexts twice as often, or twice the contexts.
    "8 epochs (twice the steps)": {"config": {"epochs": 8.0}},
    "288 contexts (twice the steps)": {"config": {"train_contexts": 288}},
    "288 contexts, 8 epochs (4x the steps)": {"config": {"train_contexts": 288, "epochs": 8.0}},
    # The default budget on more contexts: as many trajectories and steps, one sample a context.
    "288 contexts, 1 sample each (same steps)": {"config": {"train_contexts": 288,
                                                            "samples_per_context": 1}},
    "354 contexts (all), 1 sample each (same steps)": {"config": {"train_contexts": 354,
                                                                  "samples_per_context": 1,
                                                                  "steps": 144}},
    # The default budget spent otherwise: twice the optimizer steps of half the size (the same
    # sequences and compute), or the learning rate doubled or halved.
    "batch 4 (twice the steps, same compute)": {"config": {"batch_size": 4}},
    "lr 6e-3 (twice the default)": {"config": {"lr": 6e-3}},
    "lr 1.5e-3 (half the default)": {"config": {"lr": 1.5e-3}},
    "lr 1e-3 (a third of the default)": {"config": {"lr": 1e-3}},
    "LoRA+ (B at 4x the lr)": {"config": {"lr_b_ratio": 4.0}},
    # AdamW's second moment over ~20 steps, not ~1000: with beta2 0.999 over a 144-step bake its
    # estimate stays near the large gradients of the first steps, which shrinks the late steps
    # on top of the cosine schedule.
    "Adam beta2 0.95": {"config": {"adam_beta2": 0.95}},
    # The learning rate held after the warm-up instead of decayed to 0 over the last steps.
    "constant lr after warm-up": {"config": {"schedule": "constant"}},
    "LoRA+ (B at 16x the lr)": {"config": {"lr_b_ratio": 16.0}},
    # More adapter: four times the rank at the default's alpha / rank, or every linear layer
    # (the MLP too) at half the lr (rank 32 on every layer diverged at the default lr on tools).
    "rank 32 (alpha 64)": {"config": {"rank": 32, "alpha": 64.0}},
    # ... and at a quarter of the learning rate, for four times the trainable numbers.
    "rank 32 (alpha 64), lr 7.5e-4": {"config": {"rank": 32, "alpha": 64.0, "lr": 7.5e-4}},
    "every linear layer, lr 1.5e-3": {"config": {"lr": 1.5e-3, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
    # The adapter's A factors started from the principal directions of each layer's inputs on
    # the student's training sequences (EVA), not at random; B = 0 still, so the student starts
    # as the base. Rank 8 in every layer (rho = 1).
    "EVA init (rho 1)": {"init": "eva"},
    # The teacher sampling the training trajectories (and its recorded targets) in fp32 or bf16:
    # held-out and probe samples, and every measurement, stay fp32.
    "fp32 teacher sampling": {"config": {"sample_precision": "fp32"}},
    "bf16 teacher sampling": {"config": {"sample_precision": "bf16"}},
}
# The variants this run measures (the first three were measured on 2026-12-03 on the cat and
# JSON prompts and dropped: the README keeps their table).
SWEEP = ["defaults", "8 epochs (twice the steps)", "288 contexts (twice the steps)"]
QUICK = {"prompts": ["cat (persona)"], "variants": ["defaults", "temperature 0.7"]}


def lora_penalty(model) -> torch.Tensor:
    """sum over the LoRA layers of ||scale * B A||_F^2: the squared size of the update."""
    return sum((m.scaling["default"] * m.lora_B["default"].weight
                @ m.lora_A["default"].weight).pow(2).sum()
               for m in model.modules() if "default" in getattr(m, "lora_A", {}))


class WithL2:
    """Eq. 3 plus ``weight * lora_penalty`` per sequence: the training step averages an
    objective over the step's sequences, so the term is added once per sequence of the
    micro-batch."""

    def __init__(self, objective, weight: float):
        self.objective, self.weight = objective, weight

    def __call__(self, model, batch: list[int]) -> tuple[torch.Tensor, int]:
        loss, tokens = self.objective(model, batch)
        return loss + self.weight * len(batch) * lora_penalty(model), tokens


def run(args, log) -> dict:
    names = args.prompt or (QUICK["prompts"] if args.quick else PROMPTS)
    variants = args.variant or (QUICK["variants"] if args.quick else SWEEP)
    _refuse_unknown(names, PANEL, "prompt {!r} in the panel")
    _refuse_unknown(variants, VARIANTS, "variant {!r}")
    if variants[0] != "defaults" and any({"l2", "short_samples"} & VARIANTS[v].keys()
                                         for v in variants):
        raise SystemExit("prompt-sweep: the L2 and short-sample variants are sized from the "
                         "defaults' bake: put --variant defaults first")
    torch.set_num_threads(2)
    lm, tokenizer, _ = models.load(None)
    base = BakeConfig()
    pad = tokenizer.pad_token_id
    if args.quick:
        base = dataclasses.replace(base, train_contexts=16, eval_contexts=8, probe_contexts=8,
                                   epochs=1.0)
    short = {c[0]["content"] for c in contexts_mod.builtin("train", ("short",))}
    panel = {}
    for name in names:
        log(f"  {name}")
        framing = Framing(tokenizer, PANEL[name], base.framing)
        sets = {"held-out": contexts_mod.for_bake(None, "held_out", base.eval_contexts),
                "off-distribution": contexts_mod.probe(base.probe_contexts)}
        measured = {}
        for (what, contexts), seed in zip(sets.items(), (base.seed + 1, base.seed + 2)):
            samples = sample_trajectories(lm, tokenizer, [framing.teacher_ids(c) for c in contexts],
                                          base, "none", seed=seed, samples=1)
            before = mc_kl.kl_on(lm, framing, contexts, samples, {"base": BASE}, pad_id=pad)
            measured[what] = (contexts, samples, before["base"])
        rows, default_steps, scale, sampled = [], None, None, {}
        for variant in variants:
            change = VARIANTS[variant]
            config = variant_config(base, change, args.quick)
            drawn = contexts_mod.for_bake(None, "train", config.train_contexts, base.seed)
            if "short_samples" in change:  # a short context twice: its own draws, 2 x 2 samples
                config = dataclasses.replace(config, steps=default_steps)
                extra = change["short_samples"] // base.samples_per_context - 1
                contexts = drawn + [c for c in drawn if c[0]["content"] in short] * extra
            else:
                contexts = drawn
            prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in contexts]
            log(f"    {variant}: {len(contexts)} contexts")
            start = time.perf_counter()
            dtype = config.sampling_dtype(torch.device("cpu"))
            key = (config.temperature, len(contexts), config.samples_per_context,
                   dtype)  # L2 trains on the defaults'
            if key not in sampled:
                sampled.clear()  # 1.5 GB each: keep one
                sampled[key] = sample_trajectories(lm, tokenizer, [p[0] for p in prefixes],
                                                   config, "full", seed=config.seed,
                                                   samples=config.samples_per_context,
                                                   dtype=dtype)
            trajectories = sampled[key]
            sample_seconds = time.perf_counter() - start
            objective = Divergence(trajectories, prefixes, config, pad)
            if "l2" in change:  # in the loss's own units: a share of Eq. 3 at the defaults' end
                objective = WithL2(objective, change["l2"] * scale)
            init = eva_init(prefixes, trajectories, pad) if change.get("init") == "eva" else None
            model, train_seconds = train(lm, config, objective, trajectories, init)
            if variant == "defaults":
                default_steps = config.total_steps(trajectories)
                with torch.no_grad():
                    batch = list(range(config.batch_size))
                    loss, _ = objective(model, batch)
                    scale = float(loss) / len(batch) / float(lora_penalty(model))
            row = {"variant": variant, "trajectories": len(trajectories),
                   "steps": config.total_steps(trajectories), "sample_seconds": sample_seconds,
                   "train_seconds": train_seconds}
            for what, (contexts_m, samples, before) in measured.items():
                after = mc_kl.kl_on(model, framing, contexts_m, samples, {"b": BAKED},
                                    pad_id=pad)["b"]
                r, se = mc_kl.reduction(before, after)
                row[what] = {"before": before.per_token, "after": after.per_token,
                             "reduction": r, "se": se}
            if isinstance(objective, WithL2):
                row["l2_weight"] = objective.weight
            log(f"      held-out {pct(row['held-out'])}, off-distribution "
                f"{pct(row['off-distribution'])}")
            rows.append(row)
            del model, trajectories
        sampled.clear()
        panel[name] = rows
    return {"suite": "prompt-sweep", "machine": harness.machine(),
            "defaults": dataclasses.asdict(base), "variants": {v: VARIANTS[v] for v in variants},
            "panel": panel}


def eva_init(prefixes: list, trajectories, pad: int):
    """An initialiser for ``bake_sweep.train``: EVA (Paischer et al., 2024; PEFT's
    ``initialize_lora_eva_weights``) sets each LoRA A to the top right-singular vectors of its
    layer's inputs, from incremental PCA over the student's training sequences (prompt and
    response), B staying 0; rho = 1 keeps rank 8 in every layer."""

    def init(model) -> None:
        from peft import EvaConfig, initialize_lora_eva_weights

        lora = model.peft_config["default"]
        lora.init_lora_weights, lora.eva_config = "eva", EvaConfig(rho=1.0)
        sequences = [prefixes[c][1] + response for c, response
                     in zip(trajectories.context_index, trajectories.responses)]
        batches = []
        for at in range(0, len(sequences), 8):
            ids, mask = right_padded(sequences[at:at + 8], pad, "cpu")
            batches.append({"input_ids": ids, "attention_mask": mask})
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
        lora.init_lora_weights = True

    return init


def _refuse_unknown(given: list[str], known: dict, what: str) -> None:
    """Stop, before the model loads, at the first of ``given`` not in ``known``, listing them."""
    for name in given:
        if name not in known:
            raise SystemExit(f"prompt-sweep: no {what.format(name)}; choose from "
                             + ", ".join(repr(k) for k in known))


def variant_config(base: BakeConfig, change: dict, quick: bool) -> BakeConfig:
    """``base`` with the variant's settings. Under ``--quick`` a change of the training budget
    (contexts, epochs) scales the quick budget by the factor it scales the defaults' by, so a
    quick run of "288 contexts" trains on twice the quick 16, not on 288."""
    values = dict(change.get("config", {}))
    if quick:
        defaults = BakeConfig()
        for field in ("train_contexts", "epochs"):
            if field in values:
                factor = values[field] / getattr(defaults, field)
                values[field] = type(values[field])(getattr(base, field) * factor)
    return dataclasses.replace(base, **values)


def report(result) -> str:
    rows = []
    for name, found in result["panel"].items():
        for r in found:
            rows.append([name, r["variant"], r["trajectories"], r["steps"],
                         f"{r['sample_seconds']:.0f}", f"{r['train_seconds']:.0f}",
                         pct(r["held-out"]), pct(r["off-distribution"])])
    return harness.table(["prompt", "variant", "traj", "steps", "sample s", "train s",
                          "held-out", "off-distribution"], rows)


def markdown(result) -> str:
    mach = result["machine"]
    lines = [f"`{result['command']}` — {mach['cpu']}, {mach['torch_threads']} threads, "
             f"{mach['date'][:10]}; the same held-out and probe samples for every variant of a "
             f"prompt", "",
             "| prompt | variant | trajectories | steps | sampling s | training s | "
             "held-out KL reduction | off-distribution |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, found in result["panel"].items():
        for r in found:
            lines.append(f"| {name} | {r['variant']} | {r['trajectories']} | {r['steps']} | "
                         f"{r['sample_seconds']:.0f} | {r['train_seconds']:.0f} | "
                         f"{pct(r['held-out'])} | "
                         f"{pct(r['off-distribution'])} |")
    return "\n".join(lines)


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["panel"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = result["panel"][name]
        y = range(len(rows))
        for offset, key in ((-0.2, "held-out"), (0.2, "off-distribution")):
            ax.barh([i + offset for i in y], [100 * r[key]["reduction"] for r in rows],
                    height=0.4, xerr=[100 * (r[key]["se"] or 0) for r in rows], label=key)
        ax.set_yticks(list(y), [r["variant"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="KL reduction, %", title=name, xlim=(40, 100))
        ax.axvline(90, color="k", ls="--", lw=0.8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
