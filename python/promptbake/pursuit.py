"""Prompt pursuit (Eq. 4) and sequential baking: bakes on top of bakes.

Pursuit: theta_u^(i+1) = B(theta_u^(i), u). The teacher of round i+1 is the current baked model
*with* u, the student the same model without it, on trajectories sampled afresh from that teacher;
each round amplifies what the prompt does. Rounds stop when the tracked score improves by less
than a relative threshold for ``patience`` rounds in a row (a plateau), or at the round limit.

Sequential baking: bake u1, then u2 on top (teacher: the u1-baked model with u2), and check that
u1's effect survives.

Both are done the same way: the current model is merged into plain weights, a new LoRA adapter is
baked on it with ``promptbake.bake``, and the deltas are stacked. LoRA deltas add up exactly by
concatenation: sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 | ...] [A_1; A_2; ...], so the result stays
one PEFT adapter on the original base model (rank: the sum of the ranks), loadable by
``peft.PeftModel.from_pretrained`` and scalable by a strength alpha like any bake.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from promptbake import _files, _lm, eval as eval_mod
from promptbake.bake import BakeConfig, Baked, _RunDir, _save_adapter, bake
from promptbake.reprompt import score as score_cell

log = logging.getLogger("promptbake")


# -- stacking LoRA deltas -----------------------------------------------------------------------


def lora_deltas(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A [r, in], B [out, r], scale)} of a PeftModel's active LoRA adapter, the
    delta of each module being scale * B @ A (scale includes the current strength)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            found[name] = (module.lora_A[adapter].weight.detach().clone(),
                           module.lora_B[adapter].weight.detach().clone(),
                           float(module.scaling[adapter]))
    if not found:
        raise ValueError("this model has no LoRA adapter to stack")
    return found


def stack(baked: Baked, deltas: list[dict]) -> Baked:
    """A ``Baked`` on ``baked``'s base model whose one adapter is the sum of ``deltas`` (each
    from ``lora_deltas``), at strength 1. ``baked`` is left as it was (the weights are copied)."""
    import copy

    from peft import LoraConfig, get_peft_model

    names = set(deltas[0])
    if any(set(d) != names for d in deltas):
        raise ValueError("the adapters to stack cover different modules: bake them with the same "
                         "--target-modules")
    ranks = [next(iter(d.values()))[0].shape[0] for d in deltas]
    rank = sum(ranks)
    base = copy.deepcopy(baked.model).unload()  # the base weights without LoRA layers
    targets = sorted({name.rsplit(".", 1)[-1] for name in names})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0,
                        task_type="CAUSAL_LM")  # alpha = r: scale 1, the scales live in B
    model = get_peft_model(base, config)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            layer = modules["base_model.model." + name]
            layer.lora_A["default"].weight.copy_(torch.cat([d[name][0] for d in deltas]))
            layer.lora_B["default"].weight.copy_(torch.cat([d[name][2] * d[name][1]
                                                            for d in deltas], dim=1))
    model.eval()
    stacked = Baked(model, baked.tokenizer, baked.framing, dict(baked.manifest), baked.path,
                    baked.held_out)
    stacked.strength = 1.0
    return stacked


def _merged_dir(baked: Baked, where: Path) -> Path:
    """The baked model (at its strength) merged into plain weights, saved under ``where``:
    the base model of the next bake on top."""
    from promptbake.bake import _save_merged

    path = where / f"merged-{time.monotonic_ns()}"
    _save_merged(baked, path)
    return path


def bake_on_top(baked: Baked, prompt: str, config: BakeConfig, contexts=None, *,
                progress: bool = False) -> tuple[Baked, dict]:
    """Bakes ``prompt`` into the baked model (teacher: it with ``prompt``; student: it without).

    Returns (the new bake, on the merged weights, whose manifest holds the round's KL before and
    after; the new adapter's deltas, to stack on ``baked``'s).
    """
    with tempfile.TemporaryDirectory(prefix="promptbake-on-top-") as tmp:
        merged = _merged_dir(baked, Path(tmp))
        top = bake(prompt, model=merged, contexts=contexts, config=config, progress=progress)
        deltas = lora_deltas(top.model)
    return top, deltas


# -- prompt pursuit --------------------------------------------------------------------------


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


def _gains(value: float, reference: float, threshold: float) -> bool:
    """True when ``value`` beats ``reference`` by more than ``threshold`` of its magnitude."""
    return value - reference > threshold * max(abs(reference), 1e-12)


def plateaued(metrics: list[float], threshold: float, patience: int) -> bool:
    """True when each of the last ``patience`` rounds improved on the best before it by less than
    ``threshold`` (relative to its magnitude)."""
    if len(metrics) <= patience:
        return False
    for i in range(len(metrics) - patience, len(metrics)):
        if _gains(metrics[i], max(metrics[:i]), threshold):
            return False
    return True


def stopping(metrics: list[float], threshold: float, patience: int) -> tuple[int, int, str]:
    """Where pursuit stops on rounds that scored ``metrics`` (round 0 first): a tuple of the last
    round it runs, the best round (the one it keeps) and why it stopped ("plateau" or "round
    limit")."""
    if not metrics:
        raise ValueError("no rounds: metrics must hold at least round 0's score")
    best = 0
    for n in range(1, len(metrics)):
        if metrics[n] > metrics[best]:
            best = n
        if plateaued(metrics[:n + 1], threshold, patience):
            return n, best, "plateau"
    return len(metrics) - 1, best, "round limit"


def plateau_round(metrics: list[float], threshold: float) -> int:
    """The first round after which no round improves on the best so far by ``threshold``
    (relative) or more: where the curve ``metrics`` (round 0 first) levels off."""
    if not metrics:
        raise ValueError("no rounds: metrics must hold at least round 0's score")
    for i in range(len(metrics)):
        best = max(metrics[:i + 1])
        if not any(_gains(m, best, threshold) for m in metrics[i + 1:]):
            return i
    raise AssertionError("unreachable: the last round always qualifies")


def meets_target(metrics: list[float], stopped_at: int, threshold: float,
                 within: int = 2) -> bool:
    """The target for a pursuit that ran rounds 0..``stopped_at``: it improved on round 0 by more
    than ``threshold`` (relative), or it stopped no earlier than the plateau of ``metrics`` and at
    most ``within`` rounds after it. Pass every round measured, beyond the stop too when there
    are any, so that a stop before a later improvement fails."""
    if not 0 <= stopped_at < len(metrics):
        raise ValueError(f"stopped_at={stopped_at} is not a round of the {len(metrics)} measured")
    improved = _gains(max(metrics[1:stopped_at + 1], default=-math.inf), metrics[0], threshold)
    plateau = plateau_round(metrics, threshold)
    return improved or plateau <= stopped_at <= plateau + within


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
    if threshold < 0 or patience < 1:
        raise ValueError(f"threshold={threshold} must be >= 0 and patience={patience} >= 1")
    prompt = prompt or baked.prompt
    if not prompt.strip():
        raise ValueError("prompt is empty: pass the prompt to pursue")
    config = config or _config_of(baked)
    contexts = _contexts_of(baked, contexts)
    run = _prepare(out, baked, prompt, config, contexts, overwrite)
    held_out, samples = eval_mod.held_out_samples(baked)
    tracked = getattr(evaluator, "name", "evaluator") if evaluator else \
        "-KL(base + u || model) per token"

    def measure(current: Baked, number: int, kl_round: dict, seconds: float) -> Round:
        kl = eval_mod.kl_on(current.model, current.framing, held_out, samples,
                            {"m": (True, 1.0)}, pad_id=current.tokenizer.pad_token_id)["m"]
        result = score_cell(current, evaluator, adapter=True, prompted=False) if evaluator \
            else None
        metric = result.value if result is not None else -kl.per_token
        return Round(number, kl_round["before"], kl_round["after"], kl.to_dict(), result, metric,
                     seconds)

    history = [lora_deltas(baked.model)]
    current = stack(baked, history)  # round 0: the bake itself, at its strength
    records = [measure(current, 0, baked.manifest["kl"], 0.0)]
    log.info("pursuit round 0: tracked %s = %.4f", tracked, records[0].metric)
    for number in range(1, rounds + 1):
        start = time.perf_counter()
        round_config = dataclasses.replace(config, seed=config.seed + number, merge=False)
        top, deltas = bake_on_top(current, prompt, round_config, contexts, progress=progress)
        kl_round = top.manifest["kl"]
        del top  # its model: the merged weights of the previous round
        history.append(deltas)
        current = stack(current, history)
        records.append(measure(current, number, kl_round, time.perf_counter() - start))
        log.info("pursuit round %d: tracked %s = %.4f", number, tracked, records[-1].metric)
        if run is not None:
            run.wrote("rounds")
            _files.replace_dir(run.path / "rounds" / f"round-{number}",
                               lambda tmp: current.model.save_pretrained(tmp))
        _, best, stopped = stopping([r.metric for r in records], threshold, patience)
        if stopped == "plateau":
            break
    result = Pursuit(stack(current, history[:best + 1]), records, best, stopped, threshold,
                     patience, tracked)
    result.baked.manifest = _manifest(baked, result, prompt, config)
    if run is not None:
        _finish(run, result)
    return result


# -- sequential baking -----------------------------------------------------------------------


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
    if len(prompts) < 2 or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("sequential baking needs two or more non-empty prompts")
    config = config or BakeConfig()
    evaluators = evaluators or {}
    first = bake(prompts[0], model=model, contexts=contexts, config=config, progress=progress)
    measured = [eval_mod.held_out_samples(first)]  # u_k's held-out contexts and samples
    frames = [first.framing]
    history = [lora_deltas(first.model)]
    current = stack(first, history)
    stages = []

    def survey(stage: int, own: dict) -> dict:
        entry = {"stage": stage, "prompt": prompts[stage], "own_bake_kl": own, "effects": []}
        for k in range(stage + 1):
            held_out, samples = measured[k]
            found = eval_mod.kl_on(current.model, frames[k], held_out, samples,
                                   {"base": (False, 1.0), "model": (True, 1.0)},
                                   pad_id=current.tokenizer.pad_token_id)
            effect = {"prompt": k, "kl_base": found["base"].to_dict(),
                      "kl_model": found["model"].to_dict(),
                      "reduction": eval_mod.reduction(found["base"], found["model"])[0]}
            if k in evaluators:
                view = dataclasses.replace(current, framing=frames[k])
                effect["score"] = score_cell(view, evaluators[k], adapter=True,
                                             prompted=False).to_dict()
            entry["effects"].append(effect)
        return entry

    stages.append(survey(0, first.manifest["kl"]))
    for stage in range(1, len(prompts)):
        top, deltas = bake_on_top(current, prompts[stage], config, contexts, progress=progress)
        # u_k's effect is measured against the base model prompted with u_k, on fresh samples
        frames.append(dataclasses.replace(first.framing, prompt=prompts[stage]))
        with _lm.adapter(current.model, enabled=False):
            measured.append(_samples_for(current, frames[-1], config, first))
        history.append(deltas)
        current = stack(current, history)
        stages.append(survey(stage, top.manifest["kl"]))
        del top
    current.manifest = {**first.manifest, "kind": "sequential",
                        "sequential": {"prompts": prompts, "stages": stages}}
    return Sequential(current, prompts, stages)


def _samples_for(baked: Baked, framing, config: BakeConfig, like: Baked):
    """Held-out samples from the base model prompted by ``framing``'s prompt, on the held-out
    contexts of ``like``."""
    from promptbake.bake import _sample

    held_out = like.held_out
    traj = _sample(baked.model, baked.tokenizer, [framing.teacher_ids(c) for c in held_out],
                   config, "none", seed=config.seed + 1, samples=1, progress=False, what="")
    return held_out, traj


# -- plumbing ----------------------------------------------------------------------------------


def _config_of(baked: Baked) -> BakeConfig:
    fields = {f.name for f in dataclasses.fields(BakeConfig)}
    saved = {k: v for k, v in baked.manifest.get("config", {}).items() if k in fields}
    return BakeConfig(**saved)


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
    from promptbake import models

    model = baked.manifest["base_model"]["path"]
    run = _RunDir.prepare(out, prompt, config, contexts, model, overwrite=overwrite,
                          resume=False)
    run.create(models.fingerprint(Path(model)) if Path(model).is_dir() else "", baked.held_out
               or [])
    if baked.path is not None and (baked.path / "eval_trajectories.safetensors").is_file():
        run.wrote("eval_trajectories.safetensors")
        _files.write_with(run.path / "eval_trajectories.safetensors", lambda tmp: tmp.write_bytes(
            (baked.path / "eval_trajectories.safetensors").read_bytes()))
    return run


def _manifest(first: Baked, result: Pursuit, prompt: str, config: BakeConfig) -> dict:
    manifest = json.loads(_files.to_json(first.manifest))
    manifest["kind"] = "pursuit"
    manifest["pursuit"] = {**result.to_dict(), "prompt": prompt,
                           "round_config": dataclasses.asdict(config),
                           "started_from": str(first.path) if first.path else None}
    return manifest


def _finish(run: _RunDir, result: Pursuit) -> None:
    _save_adapter(result.baked.model, run.path, run.wrote)
    run.wrote("pursuit.json", "manifest.json")
    _files.write_text(run.path / "pursuit.json", _files.to_json(result.to_dict(), indent=2))
    run.write_manifest(result.baked.manifest)
    result.baked.path = run.path
