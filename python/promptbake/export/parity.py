"""Does the exported graph compute what the torch model computes? And what did int8 cost?

The parity check every export runs, on held-out contexts framed as the baked model sees them
(the chat template without a system prompt): torch decodes ``steps`` greedy tokens from each
context; the export then (a) recomputes the logits of context + continuation in one prefill,
(b) decodes the same number of greedy tokens itself through its KV cache, one step at a time.

fp32 export, passes when:
* max |logit_onnx - logit_torch| <= ``fp32_logit`` (default 1e-3 nats) over (a) and over every
  decode step of (b). Both sides compute in fp32 and differ only in the order of their sums;
  measured on the pirate bake of SmolLM2-135M (30 layers, logits of magnitude ~20) the gap is
  8e-5, so 1e-3 leaves a 10x margin. A mis-traced graph (mask, positions, cache)
  is off by 0.1 or more.
* the greedy tokens are identical for ``steps`` steps. A divergence is excused only at a
  near-tie: when torch's own logits for its token and the export's token differ by at most
  twice the logit tolerance, fp32 rounding may legitimately pick either (recorded as a tie).

int8 export: quantisation changes logits by design, so identical tokens are not required. The
report records the logit gap, greedy agreement (identical continuations, and the mean number
of steps before the first divergence), and, at the positions of the torch continuation, top-1
agreement and KL(torch fp32 || int8) per token. It fails when top-1 agreement falls below
``int8_top1`` (default 0.9), which rejects a quantisation that broke the model while accepting
rounding noise: on the pirate bake the default int8 agrees on 98.8% of positions, onnxruntime's
``quantize_dynamic`` on 69% (see ``quantize.py``).

int4 export: the same report; the floor is ``int4_top1`` (default 0.6). 4-bit weights move a
135M model's choices far more than int8: on the pirate bake of SmolLM2-135M every int4 variant
measured agrees with torch on 73-78% of positions (the default, HQQ in blocks of 32: 77.0%,
KL 0.26 nats/token), as llama.cpp's q4_0 does (77.3%, ``gguf.py``), while a broken export
(GGUF with the rope rows in the wrong order) agrees on ~30%. 0.6 sits between the two: it
rejects a broken graph, not the coarseness 4 bits bring, which the KL and the bake's retention
record (see ``quantize.py``: no int4 variant keeps the bake).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from promptbake import contexts as contexts_mod, mc_kl, modeling
from promptbake.modeling import BAKED, BASE
from promptbake.ops import divergence

log = logging.getLogger("promptbake")


@dataclasses.dataclass
class Tolerances:
    """The pass criteria of the parity check (see the module docstring for why these)."""

    fp32_logit: float = 1e-3  # max |logit difference| of an fp32 export, nats
    int8_top1: float = 0.9  # min top-1 agreement of an int8 export with torch fp32
    int4_top1: float = 0.6  # min top-1 agreement of an int4 export with torch fp32
    steps: int = 32  # greedy steps compared per context
    contexts: int = 8  # held-out contexts used when none are given


class ParityError(ValueError):
    """The export does not compute what the torch model computes; ``report`` has the numbers."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def framed(tokenizer, contexts, framing=None) -> list[list[int]]:
    """Token ids of ``contexts`` as the baked model sees them: ``framing.student_ids`` when a
    bake's framing is given, else the chat template with no system message (the default
    framing), else plain text for a tokenizer without a template."""
    out = []
    for context in contexts:
        if isinstance(context, str):
            context = [{"role": "user", "content": context}]
        if framing is not None:
            out.append(framing.student_ids(context))
        elif getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(context, tokenize=False,
                                                 add_generation_prompt=True)
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            text = "\n\n".join(m["content"] for m in context)
            out.append(list(tokenizer(text)["input_ids"]))
    return out


def default_prompts(tokenizer, framing=None, count: int = Tolerances.contexts) -> list[list[int]]:
    return framed(tokenizer, contexts_mod.builtin("held_out")[:count], framing)


@torch.no_grad()
def _torch_greedy(model, ids: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens (never stopping at EOS: parity compares a fixed length)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    tokens = []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device),
                    cache=out.cache, use_cache=True)
    return tokens


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@torch.no_grad()
def check(model, lm, prompts: list[list[int]], *, quantized: bool,
          tolerances: Tolerances | None = None, top1_floor: float | None = None) -> dict:
    """Compares the export ``lm`` (an ``OnnxLM``) with the torch ``model`` on ``prompts``.

    ``top1_floor``: a quantized export's minimum top-1 agreement (None: ``int8_top1``).
    Returns the report (``passed`` says whether it met the criteria); the caller decides what
    a failure does (``export_onnx`` raises ``ParityError``).
    """
    tol = tolerances or Tolerances()
    model.eval()
    device = next(model.parameters()).device
    prefill_gap = decode_gap = 0.0
    identical, ties, first_divergence = 0, [], []
    agree = positions = 0
    kl = 0.0
    for ids in prompts:
        reference = _torch_greedy(model, ids, tol.steps)
        sequence = ids + reference
        want = modeling.inner(model)(input_ids=torch.tensor([sequence], device=device)).logits[0]
        want = want.float().cpu().numpy()
        got = lm.logits(sequence)
        prefill_gap = max(prefill_gap, float(np.abs(got - want).max()))
        # Positions whose logits chose the continuation: the context's last, then each token's.
        at = slice(len(ids) - 1, len(sequence) - 1)
        agree += int((got[at].argmax(-1) == want[at].argmax(-1)).sum())
        positions += tol.steps
        p, q = _log_softmax(want[at]), _log_softmax(got[at])
        kl += float((np.exp(p) * (p - q)).sum())

        run = lm.generate([ids], tol.steps, eos_token_ids=(), return_logits=True)
        tokens = run.tokens[0]
        diverged = next((k for k, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
        same = tol.steps if diverged is None else diverged
        for k in range(same + (diverged is not None)):  # the diverging step's logits are valid
            decode_gap = max(decode_gap, float(np.abs(run.logits[k][0] - want[len(ids) - 1 + k])
                                               .max()))
        first_divergence.append(diverged)
        if diverged is None:
            identical += 1
        else:
            row = want[len(ids) - 1 + diverged]
            margin = float(row[reference[diverged]] - row[tokens[diverged]])
            if margin <= 2 * tol.fp32_logit:
                ties.append({"context": len(first_divergence) - 1, "step": diverged,
                             "margin": margin})
    report = {
        "contexts": len(prompts), "steps": tol.steps,
        "max_abs_logit_diff": max(prefill_gap, decode_gap),
        "max_abs_logit_diff_prefill": prefill_gap, "max_abs_logit_diff_decode": decode_gap,
        "greedy_identical": identical, "greedy_ties": ties,
        "greedy_steps_before_divergence": float(np.mean(
            [tol.steps if d is None else d for d in first_divergence])),
        "top1_agreement": agree / positions, "kl_per_token": kl / positions,
        "quantized": quantized,
    }
    if quantized:
        floor = tol.int8_top1 if top1_floor is None else top1_floor
        report["criterion"] = f"top-1 agreement with torch fp32 >= {floor}"
        report["passed"] = report["top1_agreement"] >= floor
    else:
        report["criterion"] = (f"max |logit difference| <= {tol.fp32_logit} and identical greedy "
                               f"tokens for {tol.steps} steps (near-ties within "
                               f"{2 * tol.fp32_logit} excused)")
        report["passed"] = (report["max_abs_logit_diff"] <= tol.fp32_logit and
                            identical + len(ties) == len(prompts))
    return report


def summary(report: dict) -> str:
    """One line of a parity report: logit gap, greedy agreement, top-1 agreement, KL."""
    return (f"max |logit diff| {report['max_abs_logit_diff']:.3g}, identical greedy "
            f"{report['greedy_identical']}/{report['contexts']} contexts, top-1 agreement "
            f"{100 * report['top1_agreement']:.1f}%, KL {report['kl_per_token']:.2g} nats/token")


@torch.no_grad()
def held_out_kl(lm, baked, *, contexts=None, samples: int = 1, max_new_tokens: int | None = None,
                seed: int | None = None) -> dict:
    """MC-KL (Eq. 3) of the export ``lm`` against the prompted model (for a bake from a separate
    teacher, that teacher with the prompt: ``mc_kl.teacher_of``), next to the torch baked and
    base models, on the same held-out samples (``promptbake.mc_kl.held_out_samples``).

    Returns ``{"onnx": KL, "baked": KL, "base": KL, "reduction": {...}, "retention": r}``:
    reduction = 1 - KL(prompted || m) / KL(prompted || base) for m in onnx and baked, and the
    retention ``reduction_onnx / reduction_baked``, the share of what the bake achieved that the
    export keeps. ``baked`` is used at its current strength.
    """
    other = mc_kl.teacher_of(baked)  # a bake from a separate teacher is measured against it
    held_out, trajectories = mc_kl.held_out_samples(
        baked, contexts, samples=samples, max_new_tokens=max_new_tokens, seed=seed,
        teacher=other)
    model, framing, pad = baked.model, baked.framing, baked.tokenizer.pad_token_id
    found = mc_kl.kl_on(model, framing, held_out, trajectories,
                        {"base": BASE, "baked": BAKED.at(baked.strength)}, pad_id=pad,
                        teacher=other)
    values = []
    for k, response in enumerate(trajectories.responses):
        context = held_out[trajectories.context_index[k]]
        with mc_kl.prompted_model(baked, other) as (reader, frame):
            teacher = modeling.response_logits(reader, [frame.teacher_ids(context)],
                                               [[response]], pad)
        prefix = framing.student_ids(context)
        student = lm.logits(prefix + response[:-1])[len(prefix) - 1:]
        per_token = divergence(torch.from_numpy(np.ascontiguousarray(student)), teacher,
                               reduction="none")
        values.append(float(per_token.sum()))
    onnx_kl = mc_kl.KL.from_values(values, [len(r) for r in trajectories.responses],
                                   trajectories.context_index)
    reduction = {name: mc_kl.reduction(found["base"], kl)
                 for name, kl in (("onnx", onnx_kl), ("baked", found["baked"]))}
    baked_reduction = reduction["baked"][0]
    retention = reduction["onnx"][0] / baked_reduction \
        if baked_reduction and math.isfinite(baked_reduction) else float("nan")
    return {"onnx": onnx_kl, "baked": found["baked"], "base": found["base"],
            "reduction": {k: {"value": v, "se": se} for k, (v, se) in reduction.items()},
            "retention": retention}


def kl_record(lm, baked, name: str = "onnx") -> dict:
    """``held_out_kl`` as an export's manifest records it, the export's KL under ``name``."""
    found = held_out_kl(lm, baked)
    return {name: found["onnx"].to_dict(), "baked": found["baked"].to_dict(),
            "base": found["base"].to_dict(),
            "reduction": {(name if k == "onnx" else k): v for k, v in found["reduction"].items()},
            "retention": found["retention"],
            "measured_on": "the bake's held-out contexts and samples from the prompted model"}
