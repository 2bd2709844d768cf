"""Pruning a baked model's linear layers, and recovering what pruning lost by distillation.

Pruning zeroes weights of the decoder's linear layers in place, chosen by a score:

* ``magnitude``: |W_ij|, compared across the whole layer.
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"):
  |W_ij| * ||X_j||_2, where ||X_j||_2 is the L2 norm of input feature j over every token of some
  calibration text, compared within each output row. A small weight on an input that carries
  large activations is kept.

either unstructured (exactly ``round(ratio * numel)`` zeros per layer) or N:M (N of every M
consecutive input weights of an output row kept: 2:4 keeps 2 of every 4), per layer type
(``attention``, ``mlp``, and the LM head only when asked). Masks are returned in each weight's own
layout (GPT-2's Conv1D stores ``[in, out]``), True where a weight is kept.

Recovery is a bake with another teacher: responses are sampled from the dense baked model (no
prompt on either side), its next-token distributions recorded as they are drawn, and the pruned
model's remaining weights are trained with Eq. 3's forward KL at response positions, the pruned
weights held at exactly zero. Quality is KL(dense baked || pruned) on held-out contexts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from promptbake import contexts as contexts_mod, files, mc_kl, modeling, models, versions
from promptbake.config import BakeConfig
from promptbake.decoding import stop_token_ids
from promptbake.framing import Framing
from promptbake.train import (Clock, Divergence, batch_plan, for_training, make_optimizer,
                              optimizer_step, progress_bar)
from promptbake.trajectories import SamplingConfig, Trajectories, sample

log = logging.getLogger("promptbake")

METHODS = ("magnitude", "wanda")
LAYER_TYPES = ("attention", "mlp", "lm_head")
COMPARE = ("layer", "row")
TRAIN = ("pruned", "all", "adapter", "adapter+scales")
# The child module name of export.correction's fp16 branches beside 4-bit weights: trained with
# the adapter (train="adapter" or "adapter+scales") where a student has them.
CORRECTION = "int4_correction"
MANIFEST = "pruning.json"
MASKS = "masks.safetensors"
# A linear layer's type is read off the names of the modules that hold it: Llama's
# layers.N.self_attn.q_proj and mlp.down_proj, GPT-2's h.N.attn.c_attn and mlp.c_fc, GPT-NeoX's
# attention.query_key_value, ...
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "feed_forward", "ffn")
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# Framing builds the student's input from a context; recovery has no prompt on either side, so the
# teacher text it would also build is never used.
_NO_PROMPT = "(no prompt: recovery distils the baked model into its pruned copy)"


# -- what to prune --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Amount:
    """How much of one layer is pruned: an unstructured ``ratio``, or N kept of every M."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def sparsity(self) -> float:
        return self.ratio if self.m is None else 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m is not None else f"{self.ratio:g}"


def parse_amount(value, what: str = "sparsity") -> Amount:
    """An ``Amount`` from a ratio in (0, 1) or an ``"N:M"`` string (N of every M weights kept)."""
    if isinstance(value, str):
        found = _PATTERN.match(value)
        if not found:
            try:
                return parse_amount(float(value), what)
            except ValueError:
                raise ValueError(f"{what}={value!r} is neither a ratio nor an N:M pattern: pass a "
                                 f"fraction of weights to zero such as 0.5, or a pattern such as "
                                 f"'2:4' (2 of every 4 weights kept)") from None
        n, m = int(found[1]), int(found[2])
        if not 1 <= n < m:
            raise ValueError(f"{what}={value!r}: an N:M pattern keeps N of every M consecutive "
                             f"weights, so it needs 1 <= N < M, e.g. '2:4'")
        return Amount(n=n, m=m)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}={value!r}: pass a fraction of weights to zero in (0, 1), such as "
                         f"0.5, or an N:M pattern such as '2:4'")
    ratio = float(value)
    if not (0 < ratio < 1):  # also refuses NaN
        raise ValueError(f"{what}={value!r} is outside (0, 1): pass the fraction of weights to "
                         f"zero, e.g. 0.5 for half of them")
    return Amount(ratio=ratio)


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _transposed(module) -> bool:
    """GPT-2's Conv1D holds its weight as ``[in, out]``, nn.Linear as ``[out, in]``."""
    return not isinstance(module, torch.nn.Linear)


def _rows(module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view: writes reach the parameter)."""
    weight = module.weight.data
    return weight.t() if _transposed(module) else weight


def layer_types(model) -> dict[str, str]:
    """Module name -> ``attention``, ``mlp`` or ``lm_head`` for every linear layer ``prune`` can
    select: those under an attention or MLP block of the decoder, and the output embedding."""
    if any(hasattr(m, "lora_A") for m in model.modules()) or hasattr(model, "peft_config"):
        raise ValueError("this model carries a LoRA adapter: prune a merged copy instead "
                         "(copy.deepcopy(model).merge_and_unload(), or promptbake bake --merge)")
    head = model.get_output_embeddings()
    found = {}
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        if module is head:
            found[name] = "lm_head"
            continue
        holders = [part.lower() for part in name.split(".")[:-1]]
        if any(w in part for part in holders for w in _ATTENTION_WORDS):
            found[name] = "attention"
        elif any(w in part for part in holders for w in _MLP_WORDS):
            found[name] = "mlp"
    return found


def _plan(model, sparsity, pattern, layers) -> dict[str, tuple[str, Amount]]:
    """Module name -> (layer type, amount), every choice checked before any weight changes."""
    if isinstance(layers, Mapping):
        if sparsity is not None or pattern is not None:
            raise ValueError("layers is a mapping of layer type -> sparsity, so sparsity and "
                             "pattern must be None: give every amount in the mapping, e.g. "
                             "layers={'attention': 0.3, 'mlp': '2:4'}")
        amounts = {kind: parse_amount(value, f"layers[{kind!r}]") for kind, value in layers.items()}
    else:
        kinds = (layers,) if isinstance(layers, str) else tuple(layers)
        if pattern is not None:
            amount = parse_amount(pattern, "pattern")
            if amount.m is None:
                raise ValueError(f"pattern={pattern!r} is not an N:M pattern: pass e.g. '2:4', or "
                                 f"an unstructured ratio as sparsity")
            if sparsity is not None and not math.isclose(float(sparsity), amount.sparsity):
                raise ValueError(f"sparsity={sparsity!r} disagrees with pattern={pattern!r} (which "
                                 f"zeroes {amount.sparsity:g} of the weights): pass one of them")
        elif sparsity is None:
            raise ValueError("nothing to prune: pass a sparsity in (0, 1) such as 0.5, a pattern "
                             "such as '2:4', or layers={'mlp': 0.5, ...}")
        else:
            amount = parse_amount(sparsity)
        amounts = {kind: amount for kind in kinds}
    if not amounts:
        raise ValueError(f"layers={layers!r} selects no layer type: name some of "
                         f"{', '.join(LAYER_TYPES)}")
    unknown = [k for k in amounts if k not in LAYER_TYPES]
    if unknown:
        raise ValueError(f"unknown layer type {unknown[0]!r} in layers: choose among "
                         f"{', '.join(LAYER_TYPES)}")
    modules = dict(model.named_modules())
    plan = {name: (kind, amounts[kind]) for name, kind in layer_types(model).items()
            if kind in amounts}
    if not plan:
        raise ValueError(f"this {model.config.model_type} model has no {'/'.join(amounts)} linear "
                         f"layers that promptbake recognises (it looks for nn.Linear or Conv1D "
                         f"under modules named *attn*/*attention* or *mlp*/*ffn*)")
    for name, (kind, amount) in plan.items():
        width = _rows(modules[name]).shape[1]
        if amount.m is not None and width % amount.m:
            raise ValueError(f"pattern {amount} does not divide {name}, which has {width} inputs: "
                             f"choose an M that divides {width} (e.g. '2:4'), or an unstructured "
                             f"ratio")
    if "lm_head" in amounts:
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        if head is embed or head.data_ptr() == embed.data_ptr():
            log.warning("promptbake: the LM head is tied to the input embeddings, so pruning it "
                        "zeroes the same entries of the embeddings")
    return plan


# -- calibration (Wanda) --------------------------------------------------------------------------


def _calibration_sequences(calibration, vocab: int) -> list[list[int]]:
    if isinstance(calibration, Trajectories):
        raise ValueError("calibration needs the prefixes the trajectories follow: pass "
                         "(trajectories, prefixes), as sample_responses returns them")
    if isinstance(calibration, tuple) and len(calibration) == 2 and \
            isinstance(calibration[0], Trajectories):
        trajectories, prefixes = calibration
        sequences = [list(prefixes[c]) + list(r)
                     for c, r in zip(trajectories.context_index, trajectories.responses)]
    else:
        try:
            sequences = [[int(i) for i in s] for s in calibration]
        except (TypeError, ValueError) as err:
            raise ValueError(f"calibration must be a list of token-id lists or (trajectories, "
                             f"prefixes), got {type(calibration).__name__}: {err}") from err
    if not sequences or not all(sequences):
        raise ValueError("calibration holds no tokens (or an empty sequence): pass token-id "
                         "lists of text the model will see, e.g. from sample_responses")
    bad = [i for s in sequences for i in s if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"calibration token id {bad[0]} is outside the model's vocabulary "
                         f"[0, {vocab}): were the ids made by another tokenizer?")
    return sequences


@torch.no_grad()
def input_norms(model, names: Iterable[str], calibration,
                batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` over every calibration token for each input feature j of the named layers:
    name -> fp32 ``[in_features]``. Padding positions are left out."""
    sequences = _calibration_sequences(calibration, model.get_input_embeddings().num_embeddings)
    modules = dict(model.named_modules())
    names = list(names)
    sums = {n: torch.zeros(_rows(modules[n]).shape[1], dtype=torch.float32) for n in names}
    real: dict[str, torch.Tensor] = {}

    def hook(name):
        def collect(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[real["rows"]]
            sums[name] += x.float().pow(2).sum(0).cpu()
        return collect

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    head = model.get_output_embeddings()
    # The LM head's activations are only needed when it is pruned; otherwise the body suffices.
    run = model if any(modules[n] is head for n in names) else modeling.inner(model).base_model
    device = model.get_input_embeddings().weight.device
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = modeling.right_padded(sequences[start:start + batch_size], 0, device)
            real["rows"] = mask.reshape(-1).bool()
            run(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


# -- pruning --------------------------------------------------------------------------------------


def mask_from_scores(scores: torch.Tensor, amount: Amount, compare: str = "layer") -> torch.Tensor:
    """Which weights to keep (bool, True = kept) given their scores ``[out, in]``.

    Unstructured: exactly ``round(ratio * numel)`` lowest scores are dropped, compared across the
    layer (``compare="layer"``) or within each output row (``"row"``, as Wanda does: every row
    loses ``k // rows`` weights, and the ``k % rows`` left over go to the rows whose next weight
    scores lowest). N:M: the M - N lowest of every M consecutive inputs of a row. Ties go to the
    lower index (stable sorts), so the mask is a pure function of the scores.
    """
    rows, width = scores.shape
    keep = torch.ones(rows, width, dtype=torch.bool)
    scores = scores.float().cpu()
    if amount.m is not None:
        groups = scores.reshape(rows, width // amount.m, amount.m)
        order = groups.argsort(dim=-1, stable=True)[..., :amount.m - amount.n]
        return keep.reshape(groups.shape).scatter_(-1, order, False).reshape(rows, width)
    k = round(amount.ratio * scores.numel())
    if compare == "layer":
        if k:  # the k-th lowest score, then ties at it by index: a stable sort's result, in O(n)
            flat = scores.flatten()
            threshold = flat.kthvalue(k).values
            drop = flat < threshold
            ties = (flat == threshold).nonzero().squeeze(1)
            drop[ties[:k - int(drop.sum())]] = True
            keep = ~drop.view(rows, width)
        return keep
    base, extra = divmod(k, rows)
    order = scores.argsort(dim=1, stable=True)
    keep.scatter_(1, order[:, :base], False)
    if extra:
        following = scores.gather(1, order[:, base:base + 1]).squeeze(1)
        chosen = following.argsort(stable=True)[:extra]
        keep[chosen, order[chosen, base]] = False
    return keep


@dataclasses.dataclass
class PruneReport:
    """What ``prune`` did: per-layer masks and the sparsity each layer reached."""

    method: str
    compare: str
    masks: dict[str, torch.Tensor] = dataclasses.field(repr=False)  # name -> bool, weight layout
    layers: list[dict]  # name, type, shape, amount, pruned, zeros, numel, sparsity, per layer
    seconds: dict[str, float]
    calibration: dict | None = None  # sequences and tokens Wanda's norms came from

    @property
    def sparsity(self) -> float:
        """Zeros over weights across the pruned layers (pruned, or zero before)."""
        return sum(r["zeros"] for r in self.layers) / sum(r["numel"] for r in self.layers)

    def by_type(self) -> dict[str, float]:
        kinds: dict[str, list[int]] = {}
        for r in self.layers:
            total = kinds.setdefault(r["type"], [0, 0])
            total[0] += r["zeros"]
            total[1] += r["numel"]
        return {kind: zeros / numel for kind, (zeros, numel) in kinds.items()}

    def to_dict(self) -> dict:
        """Everything but the masks, JSON-ready."""
        return {"method": self.method, "compare": self.compare, "sparsity": self.sparsity,
                "by_type": self.by_type(), "layers": self.layers, "seconds": self.seconds,
                "calibration": self.calibration}


def prune(model, sparsity: float | str | None = None, *, method: str = "magnitude",
          pattern: str | None = None, layers=("attention", "mlp"), calibration=None,
          compare: str | None = None, calibration_batch: int = 8) -> PruneReport:
    """Zeroes weights of the decoder's linear layers in place; returns the masks.

    Args:
        sparsity: fraction of each selected layer's weights to zero, in (0, 1) (exactly
            ``round(sparsity * numel)`` per layer), or an ``"N:M"`` string (as ``pattern``), or
            None with ``pattern`` or a mapping.
        method: ``magnitude`` (|W|) or ``wanda`` (|W| times the input feature's activation norm;
            needs ``calibration``).
        pattern: ``"N:M"``: N of every M consecutive input weights of each output row are kept.
        layers: layer types to prune (``attention``, ``mlp``; ``lm_head`` only when named: it is
            often tied to the embeddings), each at ``sparsity`` / ``pattern``; or a mapping of
            type -> ratio or ``"N:M"``, e.g. ``{"attention": 0.3, "mlp": "2:4"}``.
        calibration: Wanda's data: token-id lists, or ``(Trajectories, prefixes)`` (each response
            follows ``prefixes[context_index]``), e.g. ``sample_responses(...)`` from the baked
            model. Activations are those of the unpruned model, collected in one pass.
        compare: where unstructured scores compete: ``layer`` or ``row``; None: ``layer`` for
            magnitude, ``row`` for wanda (as the Wanda paper does).
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    compare = compare or ("row" if method == "wanda" else "layer")
    if compare not in COMPARE:
        raise ValueError(f"compare={compare!r}: choose 'layer' or 'row'")
    if method == "wanda" and calibration is None:
        raise ValueError("method='wanda' needs calibration data to measure input activations: "
                         "pass calibration=sample_responses(model, tokenizer) or token-id lists, "
                         "or use method='magnitude'")
    if calibration_batch < 1:
        raise ValueError(f"calibration_batch={calibration_batch} must be >= 1")
    plan = _plan(model, sparsity, pattern, layers)
    modules = dict(model.named_modules())
    start = time.perf_counter()
    norms, stats = {}, None
    if method == "wanda":
        sequences = _calibration_sequences(calibration,
                                           model.get_input_embeddings().num_embeddings)
        norms = input_norms(model, plan, sequences, calibration_batch)
        stats = {"sequences": len(sequences), "tokens": sum(len(s) for s in sequences)}
    calibrated = time.perf_counter()
    masks, rows = {}, []
    with torch.no_grad():
        for name, (kind, amount) in plan.items():
            module = modules[name]
            weight = _rows(module)
            scores = weight.abs().float().cpu()
            if method == "wanda":
                scores = scores * norms[name][None, :]
            keep = mask_from_scores(scores, amount, compare).to(weight.device)
            weight.mul_(keep)  # a [out, in] view of the parameter
            masks[name] = keep.t().contiguous() if _transposed(module) else keep
            # "pruned" is exact; "zeros" also counts weights that were zero already (the default
            # model, dequantised from 4-bit GGUF, has some), so achieved sparsity can be higher.
            zeros = int(keep.numel() - weight.count_nonzero())
            rows.append({"name": name, "type": kind, "shape": list(module.weight.shape),
                         "amount": str(amount), "pruned": int((~keep).sum()), "zeros": zeros,
                         "numel": keep.numel(), "sparsity": zeros / keep.numel()})
    done = time.perf_counter()
    report = PruneReport(method, compare, masks, rows,
                         {"calibration": round(calibrated - start, 3),
                          "scoring": round(done - calibrated, 3), "total": round(done - start, 3)},
                         stats)
    log.info("pruned %d layers (%s, %s): sparsity %.3f (%s) in %.1f s", len(rows), method,
             compare, report.sparsity,
             ", ".join(f"{k} {v:.3f}" for k, v in report.by_type().items()), done - start)
    return report


def _masked_modules(model, masks) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    if isinstance(masks, PruneReport):
        masks = masks.masks
    if not masks:
        raise ValueError("masks is empty: pass prune(...).masks (or the PruneReport itself)")
    modules = dict(model.named_modules())
    out = {}
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"mask for {name!r}, which is not a layer of this model: pass the "
                             f"masks prune() returned for this same model")
        if tuple(mask.shape) != tuple(module.weight.shape) or mask.dtype != torch.bool:
            raise ValueError(f"mask for {name} is {mask.dtype} {tuple(mask.shape)}, but its weight "
                             f"is {tuple(module.weight.shape)}: masks must be bool and shaped "
                             f"like the weights they were made for")
        out[name] = (module, mask.to(module.weight.device))
    return out


def check_masks(model, masks) -> None:
    """Refuses a model where some pruned weight is no longer zero."""
    for name, (module, mask) in _masked_modules(model, masks).items():
        alive = int(module.weight.detach()[~mask].count_nonzero())
        if alive:
            raise ValueError(f"{alive} pruned weights of {name} are no longer zero: the model was "
                             f"trained or edited without its masks; re-apply them "
                             f"(weight.mul_(mask)) or prune again")


# -- recovery -------------------------------------------------------------------------------------


def _contexts(spec, part: str, count: int, seed: int) -> list:
    if spec is None or isinstance(spec, str):
        return contexts_mod.for_bake(spec, part, count, seed)
    found = [contexts_mod.as_context(c) for c in spec]
    if not found:
        raise ValueError(f"the list of {part} contexts is empty")
    return found


def _framing(tokenizer, framing: Framing | None) -> Framing:
    # Both sides of recovery see the student's input: the baked model is deployed without prompt.
    return framing if framing is not None else Framing(tokenizer, _NO_PROMPT, "default")


def sample_responses(model, tokenizer, contexts=None, *, count: int = 48,
                     samples_per_context: int = 2, max_new_tokens: int = 64,
                     cache: str = "full", framing: Framing | None = None, seed: int = 0,
                     batch_size: int = 64) -> tuple[Trajectories, list[list[int]]]:
    """(trajectories, prefixes): responses sampled from ``model`` (the dense baked model, no
    prompt) on training contexts, its next-token distributions recorded (``cache``: ``full``,
    ``topk`` or ``none``). Serves as Wanda calibration and as recovery's training data.

    ``contexts``: None or ``"builtin"`` (``count`` of the built-in training contexts, drawn with
    ``seed``), a contexts file, or a list of user messages / message lists. ``framing``: the
    bake's (``baked.framing``), whose student side frames the input; None: no system message.
    """
    framing = _framing(tokenizer, framing)
    prefixes = [framing.student_ids(c) for c in _contexts(contexts, "train", count, seed)]
    config = SamplingConfig(samples_per_context, max_new_tokens, batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        trajectories = sample(model, prefixes, config, stop_token_ids(tokenizer, model),
                              torch.Generator().manual_seed(seed), cache=cache,
                              pad_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return trajectories, prefixes


def kl_to_teacher(student, teacher, prefixes: list[list[int]], trajectories: Trajectories, *,
                  pad_id: int = 0, batch_size: int = 8) -> mc_kl.KL:
    """MC-KL(teacher || student) (Eq. 3 per sequence) on responses sampled from the teacher; both
    see the same ``prefixes`` (no prompt). Standard errors are clustered by context."""
    def logits(model):
        return lambda chunk, responses: modeling.response_logits(
            model, [prefixes[c] for c in chunk], responses, pad_id)

    return mc_kl.sequence_kls(trajectories, logits(teacher), {"student": logits(student)},
                              batch_size=batch_size)["student"]


def recover(student, teacher, tokenizer, *, masks=None, trajectories=None, contexts=None,
            held_out=None, framing: Framing | None = None, steps: int = 60, lr: float = 1e-4,
            batch_size: int = 8, train_contexts: int = 48, samples_per_context: int = 2,
            max_new_tokens: int = 64, eval_contexts: int = 24, train: str = "pruned",
            weight_decay: float = 0.0, warmup: float = 0.1, schedule: str = "cosine",
            max_grad_norm: float = 1.0, teacher_cache: str = "full", precision: str = "auto",
            seed: int = 0, progress: bool | Callable[[int, int, float], None] = False) -> dict:
    """Recovery distillation: trains the pruned (or quantised) ``student`` to match the dense
    ``teacher``.

    The teacher (the dense baked model, e.g. the merged one; no prompt) samples responses on
    training contexts, its distributions recorded as they are drawn; the student's unpruned
    weights are then trained with Eq. 3's forward KL over response positions (AdamW, warm-up and
    ``schedule``, the bake's batching). Pruned weights get no gradient and are re-zeroed after
    every step, so they stay exactly zero (and AdamW's state for them stays zero).

    Args:
        masks: ``prune(...).masks`` or the PruneReport; None for a student that was not pruned
            (``train="adapter"`` or ``"all"``).
        trajectories: ``(Trajectories, prefixes)`` from ``sample_responses`` with a ``full`` or
            ``topk`` cache, to reuse; otherwise ``train_contexts`` of ``contexts`` are sampled.
        held_out: contexts to measure KL(teacher || student) on before and after, one response
            each (a list: all of it; None: the first ``eval_contexts`` built-in held-out ones),
            or ``(Trajectories, prefixes)`` sampled from the teacher on them, to reuse.
        train: ``pruned`` trains only the masked layers' weights, ``all`` every parameter,
            ``adapter`` only the LoRA parameters of a PEFT ``student`` (the export that keeps
            the LoRA beside 4-bit base weights recovers the bake this way) and the fp16
            corrections beside its 4-bit weights if it has them (``export.correction``),
            ``adapter+scales`` those and the 4-bit blocks' scales and float zero points
            (``export.beside.learn_scales``).
        progress: True for a progress bar, or ``progress(step, steps, kl_per_token)``.

    Returns a dict: ``kl_before`` / ``kl_after`` (``KL.to_dict()``), ``kl_reduction`` and its
    standard error, ``train_kl_per_token`` ([step, KL]), ``seconds`` per phase, and the settings.
    """
    if train not in TRAIN:
        raise ValueError(f"train={train!r}: choose 'pruned' (the masked layers' weights), "
                         f"'adapter' (the LoRA parameters), 'adapter+scales' (and the 4-bit "
                         f"scales) or 'all'")
    if masks is None and train == "pruned":
        raise ValueError("train='pruned' needs the masks: pass masks=prune(...).masks")
    if teacher is student:
        raise ValueError("the teacher is the student itself: pass the dense model as teacher and "
                         "a pruned copy (copy.deepcopy) as student")
    # The bake's own loop drives recovery (batches of whole contexts, Eq. 3 on cached targets).
    config = BakeConfig(steps=steps, lr=lr, batch_size=batch_size,
                        samples_per_context=samples_per_context, max_new_tokens=max_new_tokens,
                        weight_decay=weight_decay, warmup=warmup, schedule=schedule,
                        max_grad_norm=max_grad_norm, teacher="cached",
                        teacher_cache=teacher_cache, precision=precision, seed=seed,
                        train_contexts=train_contexts, eval_contexts=eval_contexts)
    config.validate()
    masked = _masked_modules(student, masks) if masks is not None else {}
    if masks is not None:
        check_masks(student, masks)
    if train == "pruned":
        trainable = [m.weight for m, _ in masked.values()]
    elif train in ("adapter", "adapter+scales"):
        kinds = ("lora_", CORRECTION + ".") + (("scale_change", "zero_change")
                                                 if train == "adapter+scales" else ())
        trainable = [p for name, p in student.named_parameters()
                     if any(kind in name for kind in kinds)]
        if not trainable:
            raise ValueError("train='adapter' but the student has no LoRA parameters: pass the "
                             "PEFT model (a Baked's .model, copied)")
    else:
        trainable = [p for p in student.parameters() if p.is_floating_point()]
    shared = {p.data_ptr() for p in trainable} & {p.data_ptr() for p in teacher.parameters()}
    if shared:
        raise ValueError("the teacher shares weights with the student, so pruning the student "
                         "changed the teacher too: prune a copy (copy.deepcopy(model))")
    framing = _framing(tokenizer, framing)
    pad_id = tokenizer.pad_token_id
    clock = Clock()
    teacher.eval()
    student.eval()  # no dropout: the teacher's targets, and the deployed model, have none

    with clock("sample"):
        if trajectories is None:
            trajectories, prefixes = sample_responses(
                teacher, tokenizer, contexts, count=train_contexts,
                samples_per_context=samples_per_context, max_new_tokens=max_new_tokens,
                cache=teacher_cache, framing=framing, seed=seed)
        else:
            trajectories, prefixes = trajectories
            if trajectories.cache not in ("full", "topk"):
                raise ValueError(f"the trajectories were sampled with cache={trajectories.cache!r}"
                                 f": recovery needs the teacher's recorded distributions, so "
                                 f"sample them with cache='full' or 'topk'")
            config.teacher_cache = trajectories.cache
            config.samples_per_context = max(len(ks) for ks in trajectories.by_context().values())
        if isinstance(held_out, tuple) and isinstance(held_out[0], Trajectories):
            eval_traj, eval_prefixes = held_out
        else:
            eval_traj, eval_prefixes = sample_responses(
                teacher, tokenizer, _contexts(held_out, "held_out", eval_contexts, seed),
                samples_per_context=1, max_new_tokens=max_new_tokens, cache="none",
                framing=framing, seed=seed + 1)
    with clock("measure_before"):
        before = kl_to_teacher(student, teacher, eval_prefixes, eval_traj, pad_id=pad_id)
    log.info("KL(dense || student) on held-out contexts before recovery: %s", before)

    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    # Pruned entries get a zero gradient, so AdamW's moments for them stay zero; the weights are
    # also re-zeroed after each step, so nothing (weight decay, rounding) can revive them.
    hooks = [m.weight.register_hook(lambda grad, mask=mask: grad * mask)
             for m, mask in masked.values() if m.weight.requires_grad]
    pairs = [(p, p) for p in prefixes]  # teacher and student see the same input: no prompt
    optimizer, lr_schedule = make_optimizer(student, config, steps)
    objective = Divergence(trajectories, pairs, config, pad_id)
    dtype = config.autocast_dtype(next(student.parameters()).device)
    bar = progress_bar(progress is True, steps, "recovering")
    history = []
    try:
        with clock("train"), for_training(student, dtype):
            for step in range(steps):
                kl = optimizer_step(student, objective, batch_plan(step, trajectories, config),
                                    optimizer, lr_schedule, config.max_grad_norm)
                with torch.no_grad():
                    for module, mask in masked.values():
                        module.weight.mul_(mask)
                history.append([step + 1, kl])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(kl=f"{kl:.4f}/token")
                elif callable(progress):
                    progress(step + 1, steps, kl)
                if (step + 1) % 10 == 0 or step + 1 == steps:
                    log.info("recovery step %d/%d: KL %.4f nats/token", step + 1, steps, kl)
    finally:
        if bar is not None:
            bar.close()
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)
        student.eval()
    if masks is not None:
        check_masks(student, masks)

    with clock("measure_after"):
        after = kl_to_teacher(student, teacher, eval_prefixes, eval_traj, pad_id=pad_id)
    reduction, reduction_se = mc_kl.reduction(before, after)
    log.info("KL(dense || student) after %d recovery steps: %s (%.1f%% lower)", steps, after,
             100 * reduction)
    return {"kl_before": before.to_dict(), "kl_after": after.to_dict(),
            "kl_reduction": reduction if math.isfinite(reduction) else None,
            "kl_reduction_se": reduction_se,
            "settings": {"steps": steps, "lr": lr, "batch_size": batch_size, "train": train,
                         "weight_decay": weight_decay, "warmup": warmup, "schedule": schedule,
                         "max_grad_norm": max_grad_norm, "seed": seed,
                         "precision": "bf16" if dtype == torch.bfloat16 else "fp32"},
            "trainable_parameters": sum(p.numel() for p in trainable),
            "trajectories": {"count": len(trajectories), "tokens": trajectories.tokens(),
                             "cache": trajectories.cache},
            "held_out": {"contexts": len(eval_prefixes), "tokens": eval_traj.tokens()},
            "train_kl_per_token": history, "seconds": clock.seconds(),
            "measured_on": "held-out contexts, responses sampled from the dense model"}


# -- saving ---------------------------------------------------------------------------------------


class Pruned(dict):
    """The record of ``pruner``'s work on one model: the PruneReport's and recovery's."""

    def to_dict(self) -> dict:
        return dict(self)


def pruner(baked, sparsity, *, method: str = "wanda", layers=("attention", "mlp"),
           recover_steps: int = 60, lr: float = 1e-4, contexts: int = 48,
           progress: bool = False) -> Callable:
    """A function that prunes a merged copy of ``baked`` in place and recovers it: Wanda
    calibrated on responses of the dense model, then ``recover_steps`` of recovery distillation
    (0: none) with the dense model as teacher. For ``export.export_baked(..., prune=...)``."""
    import copy

    parse_amount(sparsity)  # refuse a bad amount before any work

    def prune_model(model) -> Pruned:
        dense = copy.deepcopy(model).eval()
        data = sample_responses(dense, baked.tokenizer, framing=baked.framing, count=contexts)
        report = prune(model, sparsity, method=method, layers=layers,
                       calibration=data if method == "wanda" else None)
        record = Pruned(report.to_dict())
        if recover_steps:
            record["recovery"] = recover(model, dense, baked.tokenizer, masks=report,
                                         trajectories=data, held_out=baked.held_out,
                                         framing=baked.framing, steps=recover_steps, lr=lr,
                                         progress=progress)
        return record

    return prune_model


def save_pruned(model, tokenizer, out_dir: str | Path, report: PruneReport, *,
                recovery: dict | None = None, extra: dict | None = None,
                overwrite: bool = False) -> Path:
    """Writes a standalone transformers model directory (dense safetensors, pruned weights zero)
    that ``AutoModelForCausalLM.from_pretrained`` loads alone, plus ``masks.safetensors`` (the
    masks, one bit per weight) and ``pruning.json`` (the report, and ``recovery``'s result).
    The directory appears whole or not at all."""
    import numpy as np
    from safetensors.torch import save_file

    out_dir = files.check_output(Path(out_dir), overwrite=overwrite)
    layer_types(model)  # refuses a model that still carries a LoRA adapter
    check_masks(model, report)
    packed = {name: torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))
              for name, mask in report.masks.items()}
    shapes = {name: list(mask.shape) for name, mask in report.masks.items()}
    manifest = {"format": 1, "promptbake": versions.promptbake_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "pruning": report.to_dict(), "recovery": recovery, "masks_file": MASKS,
                **(extra or {})}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        models.make_portable(tmp)
        save_file(packed, str(tmp / MASKS), metadata={"shapes": json.dumps(shapes)})
        (tmp / MANIFEST).write_text(files.to_json(manifest, indent=2), encoding="utf-8")

    files.replace_dir(out_dir, write, kind="pruned")
    log.info("saved the pruned model to %s", out_dir)
    return out_dir


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """The masks ``save_pruned`` wrote in a directory: module name -> bool, True = kept."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = Path(path) / MASKS
    if not file.is_file():
        raise ValueError(f"{path} has no {MASKS}: it was not written by save_pruned")
    with safe_open(str(file), framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    out = {}
    for name, bits in load_file(str(file)).items():
        numel = math.prod(shapes[name])
        flat = np.unpackbits(bits.numpy(), count=numel).astype(bool)
        out[name] = torch.from_numpy(flat).reshape(shapes[name])
    return out
