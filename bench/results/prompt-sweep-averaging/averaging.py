"""A one-off session script (2026-12-07), kept with its results in ``averaging.json``: iterate
averaging of the LoRA parameters (EMAs at three decays, uniform averages of the last quarter and
the last half of the steps), all tracked in one training run per prompt and schedule, each
measured on the prompt-sweep's held-out and probe samples (the same seeds). From the repository
root: ``python bench/results/prompt-sweep-averaging/averaging.py "cat (persona),terse (style)"
defaults,constant OUT.json``."""

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/, for the panel
from prompts import PANEL  # noqa: E402

from promptbake import BakeConfig, contexts as contexts_mod, mc_kl, models  # noqa: E402
from promptbake.framing import Framing  # noqa: E402
from promptbake.modeling import BAKED, BASE  # noqa: E402
from promptbake.train import (Divergence, attach_lora, batch_plan, for_training,  # noqa: E402
                              make_optimizer, optimizer_step, sample_trajectories)

SCHEDULES = {"defaults": {}, "constant": {"schedule": "constant"}}
DECAYS, TAILS = (0.9, 0.95, 0.98), (0.25, 0.5)


def measure_sets(lm, tokenizer, framing, base):
    """The sweep's held-out and probe samples (seeds + 1 and + 2) and the base model's KL."""
    out = {}
    sets = {"held-out": contexts_mod.for_bake(None, "held_out", base.eval_contexts),
            "off-distribution": contexts_mod.probe(base.probe_contexts)}
    for (what, contexts), seed in zip(sets.items(), (base.seed + 1, base.seed + 2)):
        samples = sample_trajectories(lm, tokenizer, [framing.teacher_ids(c) for c in contexts],
                                      base, "none", seed=seed, samples=1)
        before = mc_kl.kl_on(lm, framing, contexts, samples, {"base": BASE},
                             pad_id=tokenizer.pad_token_id)["base"]
        out[what] = (contexts, samples, before)
    return out


def train_averaged(lm, config, objective, trajectories):
    """The bake's training loop, with every average of the LoRA parameters kept beside it."""
    total = config.total_steps(trajectories)
    torch.manual_seed(config.seed)
    model = attach_lora(copy.deepcopy(lm), config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    emas = {d: {n: p.detach().clone() for n, p in params.items()} for d in DECAYS}
    tails = {f: {n: torch.zeros_like(p) for n, p in params.items()} for f in TAILS}
    counts = dict.fromkeys(TAILS, 0)
    optimizer, schedule = make_optimizer(model, config, total)
    model.train()
    start = time.perf_counter()
    with for_training(model, config.autocast_dtype(torch.device("cpu"))):
        for step in range(total):
            optimizer_step(model, objective, batch_plan(step, trajectories, config), optimizer,
                           schedule, config.max_grad_norm)
            with torch.no_grad():
                for d, ema in emas.items():
                    for n, p in params.items():
                        ema[n].mul_(d).add_(p, alpha=1 - d)
                for f, acc in tails.items():
                    if step >= total * (1 - f):
                        counts[f] += 1
                        for n, p in params.items():
                            acc[n].add_(p)
    seconds = time.perf_counter() - start
    model.eval()
    states = {"last": {n: p.detach().clone() for n, p in params.items()},
              **{f"ema {d}": ema for d, ema in emas.items()},
              **{f"tail {f}": {n: a / counts[f] for n, a in acc.items()}
                 for f, acc in tails.items()}}
    return model, params, states, seconds


def main(prompts: list[str], schedules: list[str], out: str) -> None:
    torch.set_num_threads(2)
    lm, tokenizer, _ = models.load(None)
    base, pad, results = BakeConfig(), tokenizer.pad_token_id, {}
    for name in prompts:
        framing = Framing(tokenizer, PANEL[name], base.framing)
        measured = measure_sets(lm, tokenizer, framing, base)
        drawn = contexts_mod.for_bake(None, "train", base.train_contexts, base.seed)
        prefixes = [(framing.teacher_ids(c), framing.student_ids(c)) for c in drawn]
        trajectories = sample_trajectories(lm, tokenizer, [p[0] for p in prefixes], base,
                                           "full", seed=base.seed,
                                           samples=base.samples_per_context)
        for schedule in schedules:
            config = dataclasses.replace(base, **SCHEDULES[schedule])
            objective = Divergence(trajectories, prefixes, config, pad)
            model, params, states, seconds = train_averaged(lm, config, objective, trajectories)
            for which, state in states.items():
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(state[n])
                row = {}
                for what, (contexts, samples, before) in measured.items():
                    after = mc_kl.kl_on(model, framing, contexts, samples, {"b": BAKED},
                                        pad_id=pad)["b"]
                    r, se = mc_kl.reduction(before, after)
                    row[what] = (round(100 * r, 2), round(100 * se, 2))
                print(name, schedule, which, row, f"train {seconds:.0f}s", flush=True)
                results.setdefault(name, {}).setdefault(schedule, {})[which] = row
            Path(out).write_text(json.dumps(results, indent=1))
            del model


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3])
