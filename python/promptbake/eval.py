"""Measuring a bake: Monte Carlo KL (Eq. 3 on held-out contexts) and strength curves.

MC-KL: sample responses y from the prompted model on held-out contexts, then average
sum_t KL(P_theta(. | u, x, y_<t) || P_student(. | x, y_<t)) over the samples. Reported per
sequence (the paper's sum over t) and per token, each with its standard error over sequences.
The KL reduction 1 - KL(prompted || baked) / KL(prompted || base) is computed on the same
samples for both, so most of the sampling noise cancels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch

from promptbake import _lm, framing as framing_mod
from promptbake.ops import divergence


@dataclasses.dataclass
class KL:
    """MC-KL of one student against the prompted teacher."""

    per_sequence: float
    per_sequence_se: float
    per_token: float
    per_token_se: float
    sequences: int
    tokens: int
    values: list[float] = dataclasses.field(repr=False)  # per-sequence sums
    lengths: list[int] = dataclasses.field(repr=False)

    @classmethod
    def from_values(cls, values: list[float], lengths: list[int]) -> "KL":
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
        tokens = sum(lengths)
        per_token = sum(values) / tokens
        # Ratio estimator sum(v) / sum(len): delta-method standard error over sequences.
        mean_len = tokens / n
        resid = [v - per_token * length for v, length in zip(values, lengths)]
        r_var = sum(r * r for r in resid) / (n - 1) if n > 1 else float("nan")
        return cls(mean, math.sqrt(var / n), per_token, math.sqrt(r_var / n) / mean_len, n,
                   tokens, list(values), list(lengths))

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("values", "lengths")}

    def __str__(self) -> str:
        return (f"{self.per_sequence:.3f} ± {self.per_sequence_se:.3f} nats/sequence "
                f"({self.per_token:.4f} ± {self.per_token_se:.4f} nats/token, "
                f"{self.sequences} sequences)")


def reduction(before: KL, after: KL) -> tuple[float, float]:
    """1 - after / before on paired sequences, with a delta-method standard error."""
    n = len(before.values)
    if n != len(after.values):
        raise ValueError("the KL reduction needs both measurements on the same sequences")
    mb, ma = before.per_sequence, after.per_sequence
    if mb <= 0:
        return float("nan"), float("nan")
    ratio = ma / mb
    if n < 2:
        return 1 - ratio, float("nan")
    resid = [a - ratio * b for a, b in zip(after.values, before.values)]
    var = sum(r * r for r in resid) / (n - 1)
    return 1 - ratio, math.sqrt(var / n) / mb


@torch.no_grad()
def kl_on(model, framing: framing_mod.Framing, contexts, trajectories,
          students: dict[str, tuple[bool, float]], *, pad_id: int = 0, batch_size: int = 8,
          dtype: torch.dtype | None = None) -> dict[str, KL]:
    """MC-KL of several students on the same trajectories.

    ``students`` maps a name to (adapter enabled, strength); the teacher is the model with the
    adapter disabled and the prompt in its input. Teacher logits are computed once per batch and
    shared by every student; a context's samples share its prompt's forward pass.
    """
    groups = trajectories.by_context()
    contexts_per_batch = max(1, batch_size // max(len(ks) for ks in groups.values()))
    order = list(groups)
    sums: dict[str, dict[int, float]] = {name: {} for name in students}
    for start in range(0, len(order), contexts_per_batch):
        chunk = order[start:start + contexts_per_batch]
        ks = [k for c in chunk for k in groups[c]]
        responses = [[trajectories.responses[k] for k in groups[c]] for c in chunk]
        with _lm.adapter(model, enabled=False):
            teacher = _lm.response_logits(model, [framing.teacher_ids(contexts[c]) for c in chunk],
                                          responses, pad_id, dtype)
        student_prefixes = [framing.student_ids(contexts[c]) for c in chunk]
        bounds = [0]
        for k in ks:
            bounds.append(bounds[-1] + len(trajectories.responses[k]))
        for name, (enabled, strength) in students.items():
            with _lm.adapter(model, enabled=enabled, strength=strength):
                student = _lm.response_logits(model, student_prefixes, responses, pad_id, dtype)
            per_token = divergence(student, teacher, reduction="none")
            for j, k in enumerate(ks):
                sums[name][k] = float(per_token[bounds[j]:bounds[j + 1]].sum())
    lengths = [len(r) for r in trajectories.responses]
    return {name: KL.from_values([found[k] for k in range(len(trajectories))], lengths)
            for name, found in sums.items()}


def held_out_samples(baked, contexts=None, *, samples: int = 1,
                     max_new_tokens: int | None = None, seed: int = 1):
    """(held-out contexts, samples from the prompted model on them) for a ``Baked`` model.

    With the defaults these are the bake's own held-out samples: read from its directory, or
    drawn again with the same seed and settings, which gives the same tokens.
    """
    from promptbake import contexts as contexts_mod
    from promptbake.trajectories import SamplingConfig, Trajectories, sample, stop_token_ids

    config = baked.manifest.get("config", {})
    source = contexts if contexts is not None else baked.manifest["contexts"].get("source")
    held_out = contexts_mod.resolve(source, "held_out")
    if contexts is None:
        held_out = held_out[:config.get("eval_contexts", len(held_out))]
    saved = baked.path / "eval_trajectories.safetensors" if baked.path else None
    if (contexts, samples, max_new_tokens, seed) == (None, 1, None, 1) and saved and saved.is_file():
        return held_out, Trajectories.load(saved)
    sampling = SamplingConfig(samples_per_context=samples,
                              max_new_tokens=max_new_tokens or config.get("max_new_tokens", 64),
                              temperature=config.get("temperature", 1.0),
                              top_p=config.get("top_p", 1.0),
                              batch_size=config.get("sample_batch", 16))
    model, tokenizer = baked.model, baked.tokenizer
    with _lm.adapter(model, enabled=False):
        trajectories = sample(model, [baked.framing.teacher_ids(c) for c in held_out], sampling,
                              stop_token_ids(tokenizer, model),
                              torch.Generator().manual_seed(seed), cache="none",
                              pad_id=tokenizer.pad_token_id)
    return held_out, trajectories


def mc_kl(baked, contexts=None, *, samples: int = 1, max_new_tokens: int | None = None,
          seed: int = 1, strengths: Iterable[float] = (1.0,), batch_size: int = 8) -> dict:
    """MC-KL (Eq. 3) of a ``Baked`` model on held-out contexts, sampled from the prompted model.

    Returns ``{"base": KL, "1": KL, ...}``: the base model and the baked one at each strength,
    all on the same samples (see ``held_out_samples``).
    """
    held_out, trajectories = held_out_samples(baked, contexts, samples=samples,
                                              max_new_tokens=max_new_tokens, seed=seed)
    students = {"base": (False, 1.0), **{f"{a:g}": (True, float(a)) for a in strengths}}
    return kl_on(baked.model, baked.framing, held_out, trajectories, students,
                 pad_id=baked.tokenizer.pad_token_id, batch_size=batch_size)


def snapshot_curve(baked, snapshots: list, contexts=None, **sampling) -> dict[int, KL]:
    """MC-KL of each half-baked snapshot (``snapshots/step-N``) and of the final adapter, on the
    same held-out samples. The final adapter is back in place afterwards."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    held_out, trajectories = held_out_samples(baked, contexts, **sampling)
    model = baked.model
    final = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    steps = {}
    try:
        for path in snapshots:
            step = int(path.name.split("-")[-1])
            set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
            steps[step] = kl_on(model, baked.framing, held_out, trajectories, {"s": (True, 1.0)},
                                pad_id=baked.tokenizer.pad_token_id)["s"]
    finally:
        set_peft_model_state_dict(model, final)
    last = len(baked.manifest.get("train_kl_per_token", [])) or max(steps, default=0) + 1
    steps[last] = kl_on(model, baked.framing, held_out, trajectories, {"s": (True, 1.0)},
                        pad_id=baked.tokenizer.pad_token_id)["s"]
    return steps


def strength_curve(model, framing, contexts, trajectories, strengths: Iterable[float],
                   **kwargs) -> dict[float, KL]:
    """MC-KL of the baked model at each strength alpha (the LoRA delta scaled by alpha)."""
    students = {f"{a:g}": (True, float(a)) for a in strengths}
    found = kl_on(model, framing, contexts, trajectories, students, **kwargs)
    return {float(name): kl for name, kl in found.items()}


def plot_curve(points: dict[float, KL], path, xlabel: str, title: str,
               reference: KL | None = None) -> None:
    """KL against strength or step, with standard errors; written to a temporary name first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from promptbake import _files

    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, [points[x].per_token for x in xs], yerr=[points[x].per_token_se for x in xs],
                marker="o", capsize=3, label="baked, no prompt")
    if reference is not None:
        ax.axhline(reference.per_token, color="grey", ls="--", label="base, no prompt")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL(prompted || model), nats/token")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _files.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
