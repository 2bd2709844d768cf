"""Prompt pursuit (Eq. 4) and sequential baking: short loops over a ``LoraStack``.

Pursuit: theta_u^(i+1) = B(theta_u^(i), u). The teacher of round i+1 is the current baked model
*with* u, the student the same model without it, on trajectories sampled afresh from that teacher;
each round amplifies what the prompt does. Rounds stop when the tracked score improves by less
than a relative threshold for ``patience`` rounds in a row (a plateau, ``stopping``), or at the
round limit; the best round is kept.

Sequential baking: bake u1, then u2 on top (teacher: the u1-baked model with u2), and measure
after every stage whether each earlier prompt's effect survives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

from promptbake import files, models
from promptbake.artifact import HELD_OUT_SAMPLES, Baked, RunDir, save_adapter, write_adapter
from promptbake.bake import bake
from promptbake.config import BakeConfig
from promptbake.framing import prompt_messages
from promptbake.mc_kl import held_out_samples, kl_on, reduction
from promptbake.modeling import BAKED, BASE
from promptbake.orchestrate.plateau import stopping
from promptbake.orchestrate.stacking import LoraStack
from promptbake.reprompt import score
from promptbake.train import sample_trajectories

log = logging.getLogger("promptbake")


# -- prompt pursuit ----------------------------------------------------------------------------


@dataclasses.dataclass
class Round:
    """One round of pursuit, measured on held-out contexts."""

    round: int
    kl_teacher_before: dict | None  # KL(theta_i + u || theta_i): what u still changes
    kl_teacher_after: dict | None  # KL(theta_i + u || theta_{i+1})
    kl_to_prompted: dict  # KL(base + u || theta_{i+1}), on the first bake's held-out samples
    score: object | None  # the evaluator's Score of theta_{i+1} without u
    metric: float  # what the plateau rule tracks (higher is better)
    seconds: float

    def to_dict(self) -> dict:
        return {"round": self.round, "kl_teacher_before": self.kl_teacher_before,
                "kl_teacher_after": self.kl_teacher_after, "kl_to_prompted": self.kl_to_prompted,
                "score": None if self.score is None else self.score.to_dict(),
                "metric": self.metric, "seconds": round(self.seconds, 2)}



@dataclasses.dataclass
class Pursuit:
    """Every round, why pursuit stopped, and the best model (the one kept)."""

    baked: Baked  # the best round's model (stacked adapter on the base)
    rounds: list[Round]
    best: int
    stopped: str  # "plateau" or "round limit"
    threshold: float
    patience: int
    tracked: str

    def to_dict(self) -> dict:
        return {"rounds": [r.to_dict() for r in self.rounds], "best_round": self.best,
                "stopped": self.stopped, "threshold": self.threshold, "patience": self.patience,
                "tracked": self.tracked}



def pursue(baked: Baked, prompt: str | None = None, rounds: int = 3,
           evaluator: Callable | None = None, *, config: BakeConfig | None = None,
           contexts=None, threshold: float = 0.02, patience: int = 1,
           out: str | Path | None = None, overwrite: bool = False,
           progress: bool = False) -> Pursuit:
    """Prompt pursuit from a baked model (round 0): up to ``rounds`` more bakes (Eq. 4).

    Args:
        prompt: the prompt to pursue (default: the one ``baked`` was baked with).
        evaluator: scores each round's model without the prompt; the plateau rule tracks it.
            Without one it tracks -KL(base + u || model) per token, the distance to the prompted
            base model.
        config: each round's bake settings (default: the first bake's); round i uses seed + i, so
            its trajectories are fresh.
        contexts: training contexts of the rounds (default: the first bake's source).
        threshold, patience: stop when ``patience`` rounds in a row improve the tracked metric
            by less than ``threshold`` (relative).
        out: a directory for the best model (adapter + manifest, loadable by ``load_baked``),
            ``pursuit.json`` and each round's adapter under ``rounds/``.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    if not threshold >= 0 or patience < 1:  # NaN too
        raise ValueError(f"threshold={threshold} must be >= 0 and patience={patience} >= 1")
    prompt = prompt or baked.prompt
    prompt_messages(prompt)  # a text or a conversation, or a clear error
    config = config or BakeConfig.from_manifest(baked.manifest)
    contexts = _contexts_of(baked, contexts)
    run = _prepare(out, baked, prompt, config, contexts, overwrite)
    held_out, samples = held_out_samples(baked)
    tracked = getattr(evaluator, "name", "evaluator") if evaluator else \
        "-KL(base + u || model) per token"

    def measure(current: Baked, number: int, kl_round: dict, seconds: float) -> Round:
        kl = kl_on(current.model, current.framing, held_out, samples, {"m": BAKED},
                   pad_id=current.tokenizer.pad_token_id)["m"]
        result = score(current, evaluator, BAKED) if evaluator else None
        metric = result.value if result is not None else -kl.per_token
        return Round(number, kl_round["before"], kl_round["after"], kl.to_dict(), result, metric,
                     seconds)

    layers = LoraStack(baked)  # round 0: the bake itself, at its strength
    records = [measure(layers.current, 0, baked.manifest["kl"], 0.0)]
    log.info("pursuit round 0: tracked %s = %.4f", tracked, records[0].metric)
    stopped, best = "round limit", 0
    for number in range(1, rounds + 1):
        start = time.perf_counter()
        round_config = dataclasses.replace(config, seed=config.seed + number, merge=False)
        kl_round = layers.push(prompt, round_config, contexts, progress=progress)
        records.append(measure(layers.current, number, kl_round, time.perf_counter() - start))
        log.info("pursuit round %d: tracked %s = %.4f", number, tracked, records[-1].metric)
        if run is not None:
            run.wrote("rounds")
            files.replace_dir(run.path / "rounds" / f"round-{number}",
                              lambda tmp: write_adapter(layers.current.model, tmp))
        _, best, stopped = stopping([r.metric for r in records], threshold, patience)
        if stopped == "plateau":
            break
    result = Pursuit(layers.upto(best), records, best, stopped, threshold, patience, tracked)
    result.baked.manifest = _manifest(baked, result, prompt, config)
    if run is not None:
        _finish(run, result)
    return result


# -- sequential baking -------------------------------------------------------------------------


@dataclasses.dataclass
class Sequential:
    """Prompts baked one after another, and whether each earlier prompt's effect survived."""

    baked: Baked  # every delta stacked on the base model
    prompts: list[str]
    stages: list[dict]  # per prompt: its own bake's KL, and every prompt's KL after each stage

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "stages": self.stages}



def sequential(prompts: list[str], model=None, contexts=None, config: BakeConfig | None = None,
               evaluators: dict | None = None, *, progress: bool = False) -> Sequential:
    """Bakes ``prompts[0]``, then each next prompt on top of the result (stacked adapters).

    After every stage, each prompt baked so far is measured again: MC-KL(base + u_k || model)
    on u_k's held-out samples, and ``evaluators[k]`` (a prompt's index -> evaluator) without
    any prompt, so the survival of u_1 after u_2 is a number with an error.
    """
    if len(prompts) < 2:
        raise ValueError("sequential baking needs two or more non-empty prompts")
    for p in prompts:
        prompt_messages(p)  # each a text or a conversation, or a clear error
    config = config or BakeConfig()
    evaluators = evaluators or {}
    first = bake(prompts[0], model=model, contexts=contexts, config=config, progress=progress)
    measured = [held_out_samples(first)]  # u_k's held-out contexts and samples
    frames = [first.framing]
    layers = LoraStack(first)

    def survey(stage: int, own: dict) -> dict:
        current = layers.current
        entry = {"stage": stage, "prompt": prompts[stage], "own_bake_kl": own, "effects": []}
        for k in range(stage + 1):
            held_out, samples = measured[k]
            found = kl_on(current.model, frames[k], held_out, samples,
                          {"base": BASE, "model": BAKED}, pad_id=current.tokenizer.pad_token_id)
            effect = {"prompt": k, "kl_base": found["base"].to_dict(),
                      "kl_model": found["model"].to_dict(),
                      "reduction": reduction(found["base"], found["model"])[0]}
            if k in evaluators:
                view = dataclasses.replace(current, framing=frames[k])
                effect["score"] = score(view, evaluators[k], BAKED).to_dict()
            entry["effects"].append(effect)
        return entry

    stages = [survey(0, first.manifest["kl"])]
    for stage in range(1, len(prompts)):
        # u_k's effect is measured against the base model prompted with u_k, on fresh samples
        frames.append(dataclasses.replace(first.framing, prompt=prompts[stage]))
        with BASE.active(layers.current.model):
            measured.append(_samples_for(layers.current, frames[-1], config, first))
        own = layers.push(prompts[stage], config, contexts, progress=progress)
        stages.append(survey(stage, own))
    current = layers.current
    current.manifest = {**first.manifest, "kind": "sequential",
                        "sequential": {"prompts": prompts, "stages": stages}}
    return Sequential(current, prompts, stages)


def _samples_for(baked: Baked, framing, config: BakeConfig, like: Baked):
    """Held-out samples from the base model prompted by ``framing``'s prompt, on the held-out
    contexts of ``like``."""
    held_out = like.held_out
    traj = sample_trajectories(baked.model, baked.tokenizer,
                               [framing.teacher_ids(c) for c in held_out], config, "none",
                               seed=config.seed + 1, samples=1)
    return held_out, traj


# -- plumbing ----------------------------------------------------------------------------------


def _contexts_of(baked: Baked, contexts):
    if contexts is not None:
        return contexts
    source = baked.manifest.get("contexts", {}).get("source", "builtin")
    if source == "list":
        raise ValueError("this bake's training contexts were a Python list, which its directory "
                         "does not keep: pass contexts= (or --contexts FILE) to pursue")
    if source not in ("builtin", "none") and not Path(source).is_file():
        raise ValueError(f"this bake's contexts file {source} is gone: pass --contexts FILE")
    return source



def _prepare(out, baked: Baked, prompt: str, config: BakeConfig, contexts, overwrite: bool):
    if out is None:
        return None
    model = baked.manifest["base_model"]["path"]
    run = RunDir.prepare(out, prompt, config, contexts, model, overwrite=overwrite,
                         resume=False)
    run.create(models.fingerprint(Path(model)) if Path(model).is_dir() else "", baked.held_out
               or [])
    if baked.path is not None:
        run.copy_in(baked.path, HELD_OUT_SAMPLES)
    return run


def _manifest(first: Baked, result: Pursuit, prompt: str, config: BakeConfig) -> dict:
    manifest = json.loads(files.to_json(first.manifest))
    manifest["kind"] = "pursuit"
    manifest["pursuit"] = {**result.to_dict(), "prompt": prompt,
                           "round_config": dataclasses.asdict(config),
                           "started_from": str(first.path) if first.path else None}
    return manifest



def _finish(run: RunDir, result: Pursuit) -> None:
    save_adapter(result.baked.model, run.path, run.wrote)
    run.wrote("pursuit.json", "manifest.json")
    files.write_text(run.path / "pursuit.json", files.to_json(result.to_dict(), indent=2))
    run.write_manifest(result.baked.manifest)
    result.baked.path = run.path

