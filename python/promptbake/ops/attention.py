"""Attention as transformers' eager implementation computes it, without a copy of the keys and
values per query head, and over sequences packed into one row.

``grouped_attention`` has the signature of a transformers attention function (``module, query,
key, value, attention_mask, scaling=..., dropout=..., **kwargs``); ``modeling.use_attention``
registers it. With grouped keys and values (GQA), each key/value head's query heads are stacked
along the sequence, ``[batch, kv_heads, heads / kv_heads * seq, head_dim]``, and attend to that
head's keys as they are: the eager and sdpa implementations first copy every key/value head
``heads / kv_heads`` times (``repeat_kv``), which a decoding step pays in proportion to the whole
cache and a training step pays again in its backward pass.

``Packed`` (the keyword ``packed=``, one or a tuple of them) says that the batch is one row of
sequences laid end to end (no padding) and which of the keys each sequence sees: the
projections, MLPs and norms of the model then run on real tokens only, and attention alone runs
on a padded layout, group by group, that these indices gather (and scatter back).
``modeling.response_hidden`` packs a bake's prompts and responses so, in two groups (so that a
long prompt does not widen the responses' layout, nor the reverse): ~14% of the rows of a
default bake's training step were padding. The results are eager attention's up to rounding:
the scaling is applied to the queries, before the product (exact for a power-of-two head
dimension, as SmolLM2's 64), and the order of some sums differs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Packed:
    """A group of sequences laid end to end in the packed row from position ``at``, each seeing
    some earlier keys before its own. ``count`` sequences, the longest ``width`` tokens;
    ``keys [count, Lk]``: the key positions (the cache's, then this pass's) each sees, those it
    sees before its own tokens, then its own (padding: 0); ``mask [count, 1, width, Lk]``:
    additive, causal over its own keys; ``rows [tokens]``: where each of the group's tokens sits
    in the ``[count * width]`` padded layout. Built by ``pack``."""

    at: int
    count: int
    width: int
    keys: Tensor
    mask: Tensor
    rows: Tensor


def pack(seen: list[Tensor], lengths: list[int], start: int, dtype=torch.float32, *,
         at: int = 0) -> Packed:
    """``Packed`` for sequences of ``lengths`` tokens laid end to end from position ``at`` of a
    row that follows ``start`` cached keys (their own keys are then ``start + at + offset ..``);
    sequence s also sees the key positions ``seen[s]`` (a long tensor, possibly empty: a
    shared start, its prompt's keys), all of them. ``dtype``: the mask's (transformers' eager
    masks are in the embeddings' dtype)."""
    device = seen[0].device
    count = len(lengths)
    own_len = torch.tensor(lengths, device=device)
    seen_len = torch.tensor([len(s) for s in seen], device=device)
    width_q, width_k = max(lengths), int((seen_len + own_len).max())
    keys = torch.zeros(count, width_k, dtype=torch.long, device=device)
    first = start + at
    for s, n in enumerate(lengths):
        keys[s, :len(seen[s])] = seen[s]
        keys[s, len(seen[s]):len(seen[s]) + n] = torch.arange(first, first + n, device=device)
        first += n
    # Query j sees what came before the sequence and its own keys up to itself; a padding query
    # sees its sequence's keys (so no row is fully masked), never a padding key.
    j = torch.arange(width_q, device=device)
    limit = torch.minimum(seen_len[:, None] + j, seen_len[:, None] + own_len[:, None] - 1)
    visible = torch.arange(width_k, device=device)[None, None, :] <= limit[:, :, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    rows = (torch.arange(count, device=device)[:, None] * width_q + j)[j < own_len[:, None]]
    return Packed(at, count, width_q, keys, mask[:, None], rows)


def grouped_attention(module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, packed: Packed | tuple[Packed, ...] | None = None,
                      **kwargs):
    """Softmax attention as transformers' eager implementation computes it (softmax in fp32):
    ``query [batch, heads, seq, dim]``, ``key`` / ``value [batch, kv_heads, total, dim]``, an
    additive ``attention_mask [batch, 1, seq, total]``; returns ``([batch, seq, heads, dim],
    None)``. With ``packed``, the batch is one packed row, its groups (``Packed``, in order)
    covering its ``seq`` tokens, and their masks replace ``attention_mask``."""
    unsupported = {k: v for k, v in kwargs.items()
                   if k in ("sliding_window", "softcap", "s_aux", "sinks") and v is not None}
    if unsupported or (dropout and module.training):
        raise ValueError(f"grouped_attention computes plain softmax attention, not "
                         f"{sorted(unsupported) or 'dropout'}: use attention='eager'")
    config = module.config  # head counts from the config: a tracer records no op for them
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    dim = query.shape[-1]
    scale = dim ** -0.5 if scaling is None else scaling
    if packed is None:
        out = _attend(query * scale, key, value, attention_mask, groups)
        return out.transpose(1, 2).contiguous(), None
    # One packed row -> each group's sequences padded, for attention only (index_copy and
    # index_select: their backward passes are a gather and an index_add, where advanced
    # indexing's is a slower accumulating index_put).
    parts = []
    for group in (packed,) if isinstance(packed, Packed) else packed:
        count, width = group.count, group.width
        own = query[0, :, group.at:group.at + len(group.rows)] * scale
        padded = own.new_zeros(heads, count * width, dim).index_copy(1, group.rows, own)
        padded = padded.view(heads, count, width, dim).transpose(0, 1)  # [S, heads, Lq, dim]
        seen = (t[0].transpose(0, 1).index_select(0, group.keys.flatten())
                .view(count, -1, groups, dim).transpose(1, 2)  # [S, kv_heads, Lk, dim]
                for t in (key, value))
        out = _attend(padded, *seen, group.mask, groups).transpose(1, 2)  # [S, Lq, heads, dim]
        parts.append(out.reshape(-1, heads, dim).index_select(0, group.rows))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if out.shape[0] != query.shape[2]:
        raise ValueError(f"the packed groups cover {out.shape[0]} of the row's "
                         f"{query.shape[2]} tokens")
    return out[None], None


def _attend(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
            groups: int) -> Tensor:
    """``softmax(query keyᵀ + mask) value``, ``[batch, heads, seq, dim]``, the (scaled) queries
    of each key/value head stacked along the sequence."""
    batch, heads, _, dim = query.shape
    stacked = query.reshape(batch, groups, -1, dim)
    scores = torch.matmul(stacked, key.transpose(2, 3))  # [b, groups, rep * seq, total]
    total = scores.shape[-1]
    scores = scores.reshape(batch, groups, heads // groups, -1, total)  # [.., rep, seq, total]
    if mask is not None:  # [b, 1, seq, total], additive
        scores = scores + mask.unsqueeze(2)
    if query.dtype == torch.float32:  # a traced graph: no Cast around the Softmax
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.reshape(batch, groups, -1, total), value)  # [.., rep * seq, dim]
    return out.reshape(batch, heads, -1, dim)
