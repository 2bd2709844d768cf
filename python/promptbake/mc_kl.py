"""Measuring a bake: Monte Carlo KL (Eq. 3 on held-out contexts) and strength curves.

MC-KL: sample responses y from the prompted model on held-out contexts, then average
sum_t KL(P_theta(. | u, x, y_<t) || P_student(. | x, y_<t)) over the samples. Reported per
sequence (the paper's sum over t) and per token, each with its standard error over sequences.
The KL reduction 1 - KL(prompted || baked) / KL(prompted || base) is computed on the same
samples for both, so most of the sampling noise cancels. Besides the held-out contexts (like the
training ones), every bake is measured on the off-distribution probe set (``contexts.probe``:
kinds it did not train on), which shows a bake that holds only where it was trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterable

import torch

from promptbake import contexts as contexts_mod, formatting, modeling, models, plotting
from promptbake.artifact import HELD_OUT_SAMPLES, PROBE_SAMPLES
from promptbake.decoding import stop_token_ids
from promptbake.distributed import SINGLE, World, more
from promptbake.framing import Framing
from promptbake.modeling import BASE, Variant
from promptbake.ops import divergence
from promptbake.trajectories import SamplingConfig, Trajectories, sample


def _spread(residuals: list[float], clusters: list[int]) -> float:
    """sqrt(G / (G - 1) * sum over clusters of (sum of the cluster's residuals)^2): with one
    sequence per cluster, sqrt(n / (n - 1) * sum r^2). Samples of one context are correlated,
    so the standard errors treat each context, not each sequence, as the independent unit."""
    sums: dict[int, float] = {}
    for r, c in zip(residuals, clusters):
        sums[c] = sums.get(c, 0.0) + r
    g = len(sums)
    if g < 2:
        return float("nan")
    return math.sqrt(g / (g - 1) * sum(x * x for x in sums.values()))


@dataclasses.dataclass
class KL:
    """MC-KL of one student against the prompted teacher, with standard errors (None when there
    are fewer than two contexts to estimate them from)."""

    per_sequence: float
    per_sequence_se: float | None
    per_token: float
    per_token_se: float | None
    sequences: int
    tokens: int
    values: list[float] = dataclasses.field(repr=False)  # per-sequence sums
    lengths: list[int] = dataclasses.field(repr=False)
    clusters: list[int] = dataclasses.field(repr=False)  # the context of each sequence

    @classmethod
    def from_values(cls, values: list[float], lengths: list[int],
                    clusters: list[int] | None = None) -> "KL":
        n = len(values)
        clusters = list(range(n)) if clusters is None else list(clusters)
        mean = sum(values) / n
        tokens = sum(lengths)
        per_token = sum(values) / tokens
        se_sequence = _spread([v - mean for v in values], clusters) / n
        # Ratio estimator sum(v) / sum(len): delta-method standard error.
        se_token = _spread([v - per_token * k for v, k in zip(values, lengths)], clusters) / tokens
        return cls(mean, _finite(se_sequence), per_token, _finite(se_token), n, tokens,
                   list(values), list(lengths), clusters)

    @classmethod
    def merged(cls, parts: list[KL]) -> KL:
        """One estimate from parts measured on disjoint contexts (a distributed bake's ranks):
        the sequences pooled, the errors recomputed over every context."""
        parts = [p for p in parts if p.sequences]
        return cls.from_values([v for p in parts for v in p.values],
                               [k for p in parts for k in p.lengths],
                               [c for p in parts for c in p.clusters])

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("values", "lengths", "clusters")}

    def __str__(self) -> str:
        return (f"{formatting.pm(self.per_sequence, self.per_sequence_se)} nats/sequence "
                f"({formatting.pm(self.per_token, self.per_token_se, '.4f')} nats/token, "
                f"{self.sequences} sequences)")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def reduction(before: KL, after: KL) -> tuple[float, float | None]:
    """1 - after / before on paired sequences, with a delta-method standard error (None with
    fewer than two contexts)."""
    n = len(before.values)
    if n != len(after.values) or before.clusters != after.clusters:
        raise ValueError("the KL reduction needs both measurements on the same sequences")
    mb, ma = before.per_sequence, after.per_sequence
    if mb <= 0:
        return float("nan"), None
    ratio = ma / mb
    resid = [a - ratio * b for a, b in zip(after.values, before.values)]
    return 1 - ratio, _finite(_spread(resid, before.clusters) / (n * mb))


@torch.no_grad()
def sequence_kls(trajectories: Trajectories, teacher: Callable, students: dict[str, Callable], *,
                 batch_size: int = 8, world: World = SINGLE) -> dict[str, KL]:
    """MC-KL of several students against one teacher on ``trajectories``: the batching both
    ``kl_on`` and ``compress.kl_to_teacher`` use.

    ``teacher(contexts, responses)`` and each ``students[name](contexts, responses)`` give the
    logits ``[tokens, V]`` predicting every response token (``modeling.response_logits``) for a
    batch of context indices and their samples. Teacher logits are computed once per batch and
    shared by every student; a context's samples share its prompt's forward pass. With a
    sharded model (``world.sharded``) a rank whose batches ran out repeats its first one, the
    result dropped, until every rank's have.
    """
    groups = trajectories.by_context()
    contexts_per_batch = max(1, batch_size // max(len(ks) for ks in groups.values()))
    order = list(groups)
    sums: dict[str, dict[int, float]] = {name: {} for name in students}
    start = 0
    while more(start < len(order), world):
        mine = start < len(order)
        chunk = order[start:start + contexts_per_batch] if mine else order[:contexts_per_batch]
        start += contexts_per_batch
        ks = [k for c in chunk for k in groups[c]]
        responses = [[trajectories.responses[k] for k in groups[c]] for c in chunk]
        target = teacher(chunk, responses)
        bounds = [0]
        for k in ks:
            bounds.append(bounds[-1] + len(trajectories.responses[k]))
        for name, student in students.items():
            per_token = divergence(student(chunk, responses), target, reduction="none")
            if mine:
                for j, k in enumerate(ks):
                    sums[name][k] = float(per_token[bounds[j]:bounds[j + 1]].sum())
    lengths = [len(r) for r in trajectories.responses]
    return {name: KL.from_values([found[k] for k in range(len(trajectories))], lengths,
                                 trajectories.context_index) for name, found in sums.items()}


def kl_on(model, framing: Framing, contexts, trajectories: Trajectories,
          students: dict[str, Variant], *, pad_id: int = 0, batch_size: int = 8,
          dtype: torch.dtype | None = None, world: World = SINGLE,
          teacher: tuple | None = None, teacher_states: dict | None = None) -> dict[str, KL]:
    """MC-KL (Eq. 3) of several variants of ``model`` (a PeftModel) on the same trajectories.

    The teacher is the prompted base model (``modeling.PROMPTED``), or ``teacher`` = (another
    model, its framing) with the prompt; ``students`` maps a name to a variant without the
    prompt (base, or baked at some strength). ``teacher_states``: a dict that keeps the
    teacher's final hidden states, keyed by the exact inputs of each batch; a later call given
    the same dict (the same teacher, another student: a bake's KL after training, a snapshot)
    reuses them instead of running the teacher again, with the same logits (not on a sharded
    model, whose ranks must run the same passes).
    """
    prompted = [name for name, v in students.items() if v.prompted]
    if prompted:
        raise ValueError(f"students {prompted} see the prompt: MC-KL compares the prompted "
                         f"model with models that do not")

    def logits(variant: Variant) -> Callable:
        def run(chunk, responses):
            with variant.active(model):
                return modeling.response_logits(
                    model, [variant.input_ids(framing, contexts[c]) for c in chunk], responses,
                    pad_id, dtype)
        return run

    lm, their_framing = teacher or (model, framing)
    if world.sharded:  # each forward pass is a collective: every rank must run the same ones
        teacher_states = None

    def prompted_teacher(chunk, responses):
        prefixes = [their_framing.teacher_ids(contexts[c]) for c in chunk]
        key = rows = None
        if teacher_states is not None:
            key = (tuple(map(tuple, prefixes)), tuple(tuple(map(tuple, g)) for g in responses))
            rows = teacher_states.get(key)
        # the adapter off for the head too (it may be adapted)
        with contextlib.nullcontext() if teacher else modeling.PROMPTED.active(model):
            if rows is None:
                rows = modeling.response_hidden(lm, prefixes, responses, pad_id, dtype)
                if key is not None:
                    teacher_states[key] = rows
            return modeling.head_logits(lm, rows, dtype)

    return sequence_kls(trajectories, prompted_teacher,
                        {name: logits(v) for name, v in students.items()},
                        batch_size=batch_size, world=world)


def held_out_samples(baked, contexts=None, *, samples: int = 1,
                     max_new_tokens: int | None = None, seed: int | None = None,
                     teacher: tuple | None = None):
    """(held-out contexts, samples from the prompted model on them) for a ``Baked`` model.

    ``contexts`` None: the bake's own held-out contexts, and with the other defaults its own
    samples (read from its directory, or drawn again with its seed and settings, which gives the
    same tokens). ``"probe"``: the off-distribution probes the bake measured (``probe_samples``).
    Otherwise every context ``contexts`` names (see ``contexts.for_measuring``). ``seed`` None:
    the bake's held-out seed. ``teacher``: a bake's separate teacher (``teacher_of``), which
    the samples are drawn from; without it, a bake that had one is refused.
    """
    check_own_teacher(baked, teacher)
    config = baked.manifest.get("config", {})
    own_seed = config.get("seed", 0) + 1  # what bake() sampled its held-out contexts with
    defaults = (samples, max_new_tokens, seed) == (1, None, None)
    if contexts == contexts_mod.PROBE_NAME and defaults:
        return probe_samples(baked, teacher)
    count = config.get("eval_contexts", 24)
    if contexts is not None:
        held_out = contexts_mod.for_measuring(contexts, count)
    elif baked.held_out is not None:
        held_out = baked.held_out
    else:  # a directory from before held-out contexts were saved in it
        held_out = contexts_mod.for_bake(baked.manifest["contexts"]["source"], "held_out", count)
    saved = baked.path / HELD_OUT_SAMPLES if baked.path else None
    if contexts is None and defaults and saved and saved.is_file():
        return held_out, Trajectories.load(saved)
    return held_out, _sample_prompted(baked, held_out, samples, max_new_tokens,
                                      own_seed if seed is None else seed, teacher)


def probe_samples(baked, teacher: tuple | None = None):
    """(the off-distribution probes a bake measured, its samples on them): read from its
    directory, or drawn again with its settings (seed + 2); a bake from before the probe set
    (or with ``probe_contexts=0``) gets the first 24 probes. ``teacher``: as in
    ``held_out_samples``."""
    check_own_teacher(baked, teacher)
    config = baked.manifest.get("config", {})
    probes = contexts_mod.probe(config.get("probe_contexts") or 24)
    saved = baked.path / PROBE_SAMPLES if baked.path else None
    if saved and saved.is_file():
        return probes, Trajectories.load(saved)
    return probes, _sample_prompted(baked, probes, 1, None, config.get("seed", 0) + 2, teacher)


def check_own_teacher(baked, teacher: tuple | None = None) -> None:
    """Measuring against the bake's own base model prompted (``teacher`` None) is refused for a
    bake that learned another model's prompted distributions (``bake(teacher_model=...)``): not
    what it learned. With that ``teacher`` (``teacher_of``) given, nothing to refuse."""
    record = None if teacher is not None else separate_teacher(baked)
    if record:
        raise ValueError(f"this bake learned the prompted distributions of another model "
                         f"({record['name']}, {record['path']}), not of its own base model "
                         f"with the prompt: compare it with that teacher (promptbake kl, "
                         f"report, evaluate and drift, or mc_kl(baked), load it; pass "
                         f"teacher=teacher_of(baked) where a function takes one)")


def separate_teacher(baked) -> dict | None:
    """The manifest's record of the teacher a bake learned from, when it is another model than
    its own base model (a teacher with the base model's weights, as the engine's ``teacher =
    "base"`` gives its first bake, is the base model: None)."""
    record = baked.manifest.get("teacher_model")
    base = baked.manifest.get("base_model", {}).get("sha256")
    return record if record and record.get("sha256") != base else None


def teacher_of(baked, model=None) -> tuple | None:
    """``kl_on``'s teacher for a ``Baked`` model: None when it learned its own base model's
    prompted distributions; for a bake with a separate teacher (``bake(teacher_model=...)``),
    that model with the bake's prompt, as (model, framing). ``model``: the teacher's directory
    if it moved (default: where the manifest says it was); its weights must be the ones the
    bake learned from (the manifest's sha256)."""
    record = separate_teacher(baked)
    if not record:
        if model is not None:
            raise ValueError(f"--teacher-model {model}: {baked.path or 'this bake'} learned its "
                             f"own base model's prompted distributions, not a separate "
                             f"teacher's; drop --teacher-model")
        return None
    path = Path(model if model is not None else record["path"])
    if not path.is_dir():
        raise ValueError(f"this bake learned from the teacher model {record['name']} at "
                         f"{record['path']}, and {path} is not a directory: give the teacher's "
                         f"directory (promptbake kl --teacher-model DIR)")
    if models.fingerprint(path) != record["sha256"]:
        raise ValueError(f"the model in {path} is not the teacher this bake learned from (its "
                         f"weights differ from the sha256 in the manifest): give that teacher's "
                         f"directory (promptbake kl --teacher-model DIR)")
    lm, tokenizer, _ = models.load(path)
    lm.to(next(baked.model.parameters()).device).eval().requires_grad_(False)
    return lm, Framing(tokenizer, baked.framing.prompt, baked.framing.student)


@contextlib.contextmanager
def prompted_model(baked, teacher: tuple | None = None):
    """The model that reads the prompt, as (model, framing): ``teacher`` (``teacher_of``), or
    the bake's own model with its adapter off for the duration."""
    if teacher is not None:
        yield teacher
        return
    with modeling.PROMPTED.active(baked.model):
        yield baked.model, baked.framing


def _sample_prompted(baked, contexts, samples: int, max_new_tokens: int | None, seed: int,
                     teacher: tuple | None = None):
    """Samples of the prompted model (``prompted_model``)."""
    config = baked.manifest.get("config", {})
    sampling = SamplingConfig(samples_per_context=samples,
                              max_new_tokens=max_new_tokens or config.get("max_new_tokens", 64),
                              temperature=config.get("temperature", 1.0),
                              top_p=config.get("top_p", 1.0),
                              batch_size=config.get("sample_batch", 64))
    tokenizer = baked.tokenizer
    with prompted_model(baked, teacher) as (lm, framing):
        return sample(lm, [framing.teacher_ids(c) for c in contexts], sampling,
                      stop_token_ids(tokenizer, lm), torch.Generator().manual_seed(seed),
                      cache="none", pad_id=tokenizer.pad_token_id)


def mc_kl(baked, contexts=None, *, samples: int = 1, max_new_tokens: int | None = None,
          seed: int | None = None, strengths: Iterable[float] = (1.0,),
          batch_size: int = 8, teacher: tuple | None = None) -> dict:
    """MC-KL (Eq. 3) of a ``Baked`` model on held-out contexts, sampled from the prompted model
    (for a bake with a separate teacher, that teacher with the prompt: ``teacher``, or loaded
    by ``teacher_of``).

    Returns ``{"base": KL, "1": KL, ...}``: the base model and the baked one at each strength,
    all on the same samples (see ``held_out_samples``).
    """
    teacher = teacher or teacher_of(baked)
    held_out, trajectories = held_out_samples(baked, contexts, samples=samples,
                                              max_new_tokens=max_new_tokens, seed=seed,
                                              teacher=teacher)
    students = {"base": BASE, **{f"{a:g}": modeling.BAKED.at(a) for a in strengths}}
    return kl_on(baked.model, baked.framing, held_out, trajectories, students,
                 pad_id=baked.tokenizer.pad_token_id, batch_size=batch_size, teacher=teacher)


def snapshot_curve(baked, snapshots: list, contexts=None, *, teacher: tuple | None = None,
                   **sampling) -> dict[int, KL]:
    """MC-KL of each half-baked snapshot (``snapshots/step-N``) and of the final adapter, on the
    same held-out samples (``teacher``: as in ``mc_kl``). The final adapter is back in place
    afterwards."""
    teacher = teacher or teacher_of(baked)
    held_out, trajectories = held_out_samples(baked, contexts, teacher=teacher, **sampling)
    model = baked.model
    teacher_states: dict = {}  # the teacher does not change from snapshot to snapshot

    def measure() -> KL:
        return kl_on(model, baked.framing, held_out, trajectories, {"s": modeling.BAKED},
                     pad_id=baked.tokenizer.pad_token_id, teacher=teacher,
                     teacher_states=teacher_states)["s"]

    steps = {}
    for path in snapshots:
        with modeling.adapter_weights(model, path):
            steps[int(path.name.split("-")[-1])] = measure()
    last = len(baked.manifest.get("train_kl_per_token", [])) or max(steps, default=0) + 1
    steps[last] = measure()
    return steps


def plot_curve(points: dict[float, KL], path, xlabel: str, title: str,
               reference: KL | None = None) -> None:
    """KL against strength or step, with standard errors; written to a temporary name first."""
    xs = sorted(points)
    with plotting.figure(path) as (_, axes):
        ax = axes[0][0]
        ax.errorbar(xs, [points[x].per_token for x in xs],
                    yerr=[points[x].per_token_se for x in xs], marker="o", capsize=3,
                    label="baked, no prompt")
        if reference is not None:
            ax.axhline(reference.per_token, color="grey", ls="--", label="base, no prompt")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KL(prompted || model), nats/token")
        ax.set_title(title)
        ax.legend()
