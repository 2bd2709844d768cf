"""A causal LM as promptbake uses it: logits at response positions only, and its variants.

One copy of the weights serves teacher and student: the teacher is the model with the LoRA
adapter disabled, the student the model with it enabled (at a strength that scales the LoRA
delta: the half-baked model). A ``Variant`` names one of the four models a bake is compared
across (base, prompted, baked, baked + prompt) at a strength; reprompt, drift, MC-KL and
``Baked.generate`` all spell them the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Callable

import torch

from promptbake.ops import attention


def left_padded(prefixes: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, position ids), each ``[len(prefixes), longest]``: every prefix ends
    at the last column, so the next token of all of them is predicted at the same place."""
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def right_padded(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask), each ``[len(sequences), longest]``, padding at the end."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, :len(s)] = 1
    return ids, mask


def inner(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


GROUPED = "promptbake_grouped"  # ops.attention.grouped_attention, as transformers names it
# Architectures on which GROUPED computes what their eager attention does (tested), when no
# sliding window, logit softcap or attention dropout is configured.
GROUPED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def grouped_fits(config) -> bool:
    """Whether ``GROUPED`` attention computes what eager attention does for this model."""
    sliding = getattr(config, "sliding_window", None) is not None and \
        getattr(config, "use_sliding_window", True)
    return config.model_type in GROUPED_TYPES and not sliding and \
        not getattr(config, "attention_dropout", 0.0) and \
        getattr(config, "attn_logit_softcapping", None) is None


@contextlib.contextmanager
def use_attention(model, implementation: str):
    """``model`` (a transformers model, or PEFT's around one) with attention
    ``implementation`` (``GROUPED``, or a transformers name) for the duration."""
    lm = inner(model)
    if implementation == GROUPED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(GROUPED, attention.grouped_attention)
        AttentionMaskInterface.register(GROUPED, eager_mask)  # the additive float mask
    before = lm.config._attn_implementation
    if before != implementation:
        lm.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        if lm.config._attn_implementation != before:
            lm.set_attn_implementation(before)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One of the models a bake is compared across: the base weights or the baked ones (the LoRA
    delta on, scaled by ``strength``), with the prompt u in the input (``prompted``) or not."""

    baked: bool
    prompted: bool
    strength: float = 1.0

    @property
    def name(self) -> str:
        return _NAMES[(self.baked, self.prompted)]

    def at(self, strength: float) -> Variant:
        if not math.isfinite(strength):
            raise ValueError(f"strength={strength} must be a finite number (1 is the full bake)")
        return dataclasses.replace(self, strength=float(strength))

    def active(self, model):
        """A context in which ``model`` (a PeftModel) is this variant's weights."""
        return adapter(model, enabled=self.baked, strength=self.strength)

    def input_ids(self, framing, context) -> list[int]:
        """``context``'s token ids as this variant reads them: with u (the teacher's framing)
        or without (the student's)."""
        return framing.teacher_ids(context) if self.prompted else framing.student_ids(context)


_NAMES = {(False, False): "base", (False, True): "prompted", (True, False): "baked",
          (True, True): "baked+prompt"}
BASE, PROMPTED, BAKED, BAKED_PROMPTED = (Variant(b, p) for (b, p) in _NAMES)
VARIANTS = {v.name: v for v in (BASE, PROMPTED, BAKED, BAKED_PROMPTED)}


def variant(name: str, strength: float = 1.0) -> Variant:
    """The variant called ``name`` (base, prompted, baked, baked+prompt) at ``strength``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name].at(strength)


def response_logits(model, prefixes: list[list[int]], responses: list[list[list[int]]],
                    pad_id: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits ``[tokens, V]`` (fp32, or fp64 for a fp64 model) predicting every response token.

    ``responses[i]`` are the responses that follow ``prefixes[i]`` (the samples of one context);
    rows come out response by response: prefix 0's responses in order, then prefix 1's, ... Each
    prefix goes through the model once and its keys and values (a KV cache, or the same packed
    pass: ``response_hidden``), autograd history included, serve all of its responses, so a
    context's prompt tokens cost one forward and one backward however many samples follow
    them (the same logits and gradients as whole sequences: tested). Only response positions
    reach the LM head. ``dtype``: autocast dtype for the matmuls (None: fp32).
    """
    return head_logits(model, response_hidden(model, prefixes, responses, pad_id, dtype), dtype)


def head_logits(model, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's logits ``[tokens, V]`` (fp32, or fp64 for a fp64 model) from final hidden
    states ``rows`` (``response_hidden``): its LM head and what the architecture does after."""
    lm = inner(model)
    with torch.autocast(rows.device.type, dtype=dtype, enabled=dtype is not None):
        logits = finish_logits(lm.config, lm.get_output_embeddings()(rows))
    return logits if logits.dtype == torch.float64 else logits.float()


def response_hidden(model, prefixes: list[list[int]], responses: list[list[list[int]]],
                    pad_id: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The final hidden states ``[tokens, H]`` that the LM head turns into ``response_logits``
    (same rows, same arguments), for a loss that applies the head itself (``fused_head``).

    When the prefixes start alike for ``SHARED_START`` tokens or more (a prompt u and the chat
    template around it), that start goes through the model once for all of them, its cache
    (autograd history included) copied to each: one forward and one backward of it per call.
    With ``GROUPED`` attention (``for_training`` chooses it) the prompts and the responses go
    through the model in one pass, packed into one row without padding
    (``ops.attention.Packed``)."""
    if len(prefixes) != len(responses) or not all(prefixes) or \
            not all(group and all(group) for group in responses):
        raise ValueError("every prefix needs at least one token and one or more non-empty "
                         "responses")
    lm = inner(model)
    body = lm.base_model
    device = lm.get_output_embeddings().weight.device
    start = common_start(prefixes)
    if start < SHARED_START or _sharded(lm):  # a sharded model's passes must pair up across ranks
        start = 0
    owners = [i for i, group in enumerate(responses) for _ in group]
    flat = [r for group in responses for r in group]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        shared = None
        if start:
            shared = body(input_ids=torch.tensor([prefixes[0][:start]], device=device),
                          use_cache=True).cache
        if lm.config._attn_implementation == GROUPED and grouped_fits(lm.config):
            return _packed_hidden(lm, prefixes, flat, owners, start, shared, device)
        # Right padding throughout (prompts, then responses): every query row, padding
        # included, sees at least one real token, so no attention row is fully masked
        # (NaN-prone in eager attention).
        ids, mask = right_padded([p[start:] for p in prefixes], pad_id, device)
        ends = torch.tensor([len(p) - start for p in prefixes], device=device)
        owner = torch.tensor(owners, device=device)
        # y_t is predicted from y_<t: the inputs after the prompt are y_0 .. y_{n-2}.
        r_ids, r_mask = right_padded([r[:-1] for r in flat], pad_id, device)
        own = {}
        if start:
            shared.batch_select_indices(torch.zeros(len(prefixes), dtype=torch.long,
                                                    device=device))
            mask = torch.cat([mask.new_ones(len(prefixes), start), mask], dim=1)
            positions = start + torch.arange(ids.shape[1], device=device)
            own = dict(cache=shared, position_ids=positions.expand(len(prefixes), -1))
        out = body(input_ids=ids, attention_mask=mask, use_cache=r_ids.shape[1] > 0, **own)
        first = out.last_hidden_state[owner, ends[owner] - 1]  # the prompt's end predicts y_0
        if r_ids.shape[1] > 0:
            cache = out.cache
            cache.batch_select_indices(owner)  # an indexing op: gradients flow to the prompt
            positions = start + ends[owner, None] + torch.arange(r_ids.shape[1], device=device)
            rest = body(input_ids=r_ids, attention_mask=torch.cat([mask[owner], r_mask], dim=1),
                        position_ids=positions, cache=cache).last_hidden_state
        return torch.cat([torch.cat([first[k:k + 1], rest[k, :len(r) - 1]]) if len(r) > 1
                          else first[k:k + 1] for k, r in enumerate(flat)])


def _packed_hidden(lm, prefixes, flat, owners, start, shared, device) -> torch.Tensor:
    """``response_hidden`` in one pass without padding: the prompts after their ``start``
    shared tokens (in the cache ``shared``) and then the responses, laid end to end in one row;
    each prompt attends to the start and itself, each response to the start, its prompt and
    itself (``ops.attention.pack``: the prompts and the responses are padded for attention as
    two groups, so a long prompt does not widen the responses' layout)."""
    body = lm.base_model
    mask_dtype = lm.get_input_embeddings().weight.dtype  # as transformers' eager masks
    # y_t is predicted from y_<t: the inputs after the prompt are y_0 .. y_{n-2}.
    inputs = [(k, r[:-1]) for k, r in enumerate(flat) if len(r) > 1]
    prompts = [p[start:] for p in prefixes]
    ends = list(itertools.accumulate(len(p) for p in prompts))  # each prompt's end in the row
    before = torch.arange(start, device=device)
    groups = [attention.pack([before] * len(prompts), [len(p) for p in prompts], start,
                             mask_dtype)]
    if inputs:  # each prompt's keys, seen by its responses after the shared start
        seen_by = [torch.cat([before, start + torch.arange(end - len(p), end, device=device)])
                   for p, end in zip(prompts, ends)]
        groups.append(attention.pack([seen_by[owners[k]] for k, _ in inputs],
                                     [len(r) for _, r in inputs], start, mask_dtype,
                                     at=ends[-1]))
    sequences = prompts + [r for _, r in inputs]
    firsts = [start] * len(prompts) + [len(prefixes[owners[k]]) for k, _ in inputs]
    ids = torch.tensor([[t for s in sequences for t in s]], device=device)
    positions = torch.cat([torch.arange(p, p + len(s), device=device)
                           for p, s in zip(firsts, sequences)])[None]
    # A 4D mask is passed through as it is (transformers builds none); the attention reads
    # each group's own.
    hidden = body(input_ids=ids, position_ids=positions, attention_mask=groups[0].mask,
                  cache=shared, use_cache=shared is not None,
                  packed=tuple(groups)).last_hidden_state[0]
    # Rows in response order: the last row of its prompt predicts y_0, then its own rows (the
    # responses' inputs follow the prompts in the row, in order).
    index, at = [], ends[-1]
    for k, r in enumerate(flat):
        index.append(ends[owners[k]] - 1)
        index.extend(range(at, at + len(r) - 1))
        at += len(r) - 1
    return hidden[torch.tensor(index, device=device)]


# Tokens all prefixes must share before response_hidden encodes that start once: a separate
# pass costs more than it saves below ~30 tokens (a chat template's default system turn, with
# gradients), and saves 4x on a teacher pass after a 700-token tool prompt (measured on CPU).
SHARED_START = 32


def _sharded(lm) -> bool:
    """Whether ``lm`` is sharded with FSDP2 (``distributed.shard``): each of its forward passes
    is a collective, so every rank must run the same passes whatever its batch."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(lm, FSDPModule)


def common_start(prefixes: list[list[int]]) -> int:
    """How many tokens every prefix starts with alike, one token of each left out (so that every
    prefix keeps a token of its own to feed after it); 0 for fewer than two prefixes."""
    if len(prefixes) < 2:
        return 0
    first, length = prefixes[0], min(len(p) for p in prefixes) - 1
    for p in prefixes[1:]:
        common = 0
        while common < length and p[common] == first[common]:
            common += 1
        length = common
    return length


FUSED_HEAD_ENV = "PROMPTBAKE_FUSED_HEAD"


def fused_head(model) -> torch.Tensor | None:
    """The LM head's weight ``[V, H]`` when a loss may apply it to ``response_hidden`` itself
    (``ops.linear_divergence``): a frozen, plain linear head without bias whose output is the
    model's logits as is. Otherwise (a trained or adapted head, soft-capping, scaling), or with
    ``PROMPTBAKE_FUSED_HEAD=0`` in the environment (the unfused path, for comparison), None."""
    if os.environ.get(FUSED_HEAD_ENV, "1") == "0":
        return None
    lm = inner(model)
    head = lm.get_output_embeddings()
    config = lm.config
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logits_scaling",
                                                    "logit_scale")):
        return None
    return head.weight


@torch.no_grad()
def continuation_logprobs(model, prefixes: list[list[int]], continuations: list[list[list[int]]],
                          pad_id: int, batch_size: int = 16,
                          progress: Callable[[int], None] | None = None) -> list[list[tuple]]:
    """For each prefix i and each continuation j of it: (sum of log P(token | prefix, earlier
    continuation tokens), whether every token is the greedy choice).

    ``continuations[i]`` are token lists following ``prefixes[i]`` (a question's choices). A
    prefix goes through the model once per batch and its KV cache serves all of its
    continuations (``response_logits``). ``batch_size`` counts prefixes; ``progress(n)`` is
    called after each batch with the number of prefixes done in it.
    """
    out: list[list[tuple]] = []
    for start in range(0, len(prefixes), batch_size):
        chunk, conts = prefixes[start:start + batch_size], continuations[start:start + batch_size]
        logits = response_logits(model, chunk, conts, pad_id)
        logp = torch.log_softmax(logits.double(), dim=-1)  # fp64 sums: ties stay exact ties
        row = 0
        for group in conts:
            scored = []
            for tokens in group:
                rows = logp[row:row + len(tokens)]
                target = torch.tensor(tokens, device=rows.device)
                total = float(rows.gather(1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                scored.append((total, greedy))
                row += len(tokens)
            out.append(scored)
        if progress:
            progress(len(chunk))
    return out



def finish_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What some architectures do to the LM head's output (Gemma's soft-capping, Granite's and
    Cohere's scaling), so that ``response_logits`` are the model's own logits."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    return logits


@torch.no_grad()
def check_logits(model, ids: list[int]) -> None:
    """Refuses a model whose logits ``response_logits`` would not reproduce (an architecture that
    transforms its LM head's output in a way ``finish_logits`` does not know)."""
    full = model(input_ids=torch.tensor([ids], device=inner(model).device)).logits[0, :-1]
    ours = response_logits(model, [ids[:1]], [[ids[1:]]], pad_id=0)
    gap = float((full.float() - ours).abs().max())
    if gap > 1e-3 * max(1.0, float(full.abs().max())):
        raise ValueError(f"this {inner(model).config.model_type} model's logits differ from its "
                         f"LM head's output by up to {gap:.3g} after the known post-processing: "
                         f"promptbake cannot compute its logits at response positions exactly")


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapter(model, enabled: bool = True, strength: float = 1.0):
    """Runs the block with the LoRA adapter disabled (the base model) or enabled at ``strength``."""
    if not math.isfinite(strength):
        raise ValueError(f"strength={strength} must be a finite number (1 is the full bake)")
    if not hasattr(model, "disable_adapter"):
        if enabled:
            raise ValueError("this model has no LoRA adapter to enable")
        yield model
        return
    if not enabled:
        with model.disable_adapter():
            yield model
        return
    layers = lora_layers(model)
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for name in layer.scaling:
            layer.set_scale(name, strength)
    try:
        yield model
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


@contextlib.contextmanager
def adapter_weights(model, directory):
    """Runs the block with the LoRA weights of another adapter directory (a snapshot) in place
    of the model's own; the model's own weights are back afterwards."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    own = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    try:
        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
        yield model
    finally:
        set_peft_model_state_dict(model, own)

