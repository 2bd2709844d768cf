"""Attention as transformers' eager implementation computes it, without a copy of the keys and
values per query head, and over sequences packed into one row.

``grouped_attention`` has the signature of a transformers attention function (``module, query,
key, value, attention_mask, scaling=..., dropout=..., **kwargs``); ``modeling.use_attention``
registers it. With grouped keys and values (GQA), each key/value head's query heads are stacked
along the sequence, ``[batch, kv_heads, heads / kv_heads * seq, head_dim]``, and attend to that
head's keys as they are: the eager and sdpa implementations first copy every key/value head
``heads / kv_heads`` times (``repeat_kv``), which a decoding step pays in proportion to the whole
cache and a training step pays again in its backward pass.

``Packed`` (the keyword ``packed=``) says that the batch is one row of sequences laid end to end
(no padding) and which of the keys each sequence sees: the projections, MLPs and norms of the
model then run on real tokens only, and attention alone runs on a padded layout that these
indices gather (and scatter back). ``modeling.response_hidden`` packs a bake's prompts and
responses so: ~14% of the rows of a default bake's training step were padding.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Packed:
    """Sequences laid end to end in one row of queries, each seeing some earlier keys first.

    ``queries [S, Lq]``: the position in the packed row of sequence s's j-th token (padding: 0);
    ``keys [S, Lk]``: the key positions (the cache's, then this pass's) sequence s sees, those it
    sees before its own tokens, then its own (padding: 0); ``mask [S, 1, Lq, Lk]``: additive,
    causal over its own keys; ``rows [T]``: where each packed query sits in the ``[S * Lq]``
    padded layout. Built by ``pack``."""

    queries: Tensor
    keys: Tensor
    mask: Tensor
    rows: Tensor


def pack(seen: list[Tensor], lengths: list[int], start: int, dtype=torch.float32) -> Packed:
    """``Packed`` for sequences of ``lengths`` tokens laid end to end after ``start`` cached keys
    (their own keys are then ``start + offset ..``); sequence s also sees the key positions
    ``seen[s]`` (a long tensor, possibly empty: a shared start, its prompt's keys), all of them.
    ``dtype``: the mask's (transformers' eager masks are in the embeddings' dtype)."""
    device = seen[0].device
    count = len(lengths)
    offsets = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
    own_len = torch.tensor(lengths, device=device)
    seen_len = torch.tensor([len(s) for s in seen], device=device)
    width_q, width_k = max(lengths), int((seen_len + own_len).max())
    j = torch.arange(width_q, device=device)
    real_q = j < own_len[:, None]  # [S, Lq]
    queries = torch.where(real_q, offsets[:, None] + j, 0)
    i = torch.arange(width_k, device=device)
    keys = torch.zeros(count, width_k, dtype=torch.long, device=device)
    for s in range(count):
        n = len(seen[s])
        keys[s, :n] = seen[s]
        keys[s, n:n + lengths[s]] = start + offsets[s] + torch.arange(lengths[s], device=device)
    # Query j sees what came before the sequence and its own keys up to itself; a padding query
    # sees its sequence's keys (so no row is fully masked), never a padding key.
    limit = torch.minimum(seen_len[:, None] + j, seen_len[:, None] + own_len[:, None] - 1)
    visible = i[None, None, :] <= limit[:, :, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    rows = (torch.arange(count, device=device)[:, None] * width_q + j)[real_q]
    return Packed(queries, keys, mask[:, None], rows)


def grouped_attention(module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, scaling: float | None = None,
                      dropout: float = 0.0, packed: Packed | None = None, **kwargs):
    """Softmax attention as transformers' eager implementation computes it (the scaling applied
    to the queries, before the product; softmax in fp32): ``query [batch, heads, seq, dim]``,
    ``key`` / ``value [batch, kv_heads, total, dim]``, an additive ``attention_mask [batch, 1,
    seq, total]``; returns ``([batch, seq, heads, dim], None)``. With ``packed``, the batch is one
    packed row (``Packed``) and its ``mask`` replaces ``attention_mask``."""
    unsupported = {k: v for k, v in kwargs.items()
                   if k in ("sliding_window", "softcap", "s_aux", "sinks") and v is not None}
    if unsupported or (dropout and module.training):
        raise ValueError(f"grouped_attention computes plain softmax attention, not "
                         f"{sorted(unsupported) or 'dropout'}: use attention='eager'")
    config = module.config  # head counts from the config: a tracer records no op for them
    heads = config.num_attention_heads
    groups = getattr(config, "num_key_value_heads", None) or heads
    dim = query.shape[-1]
    if packed is not None:  # one packed row -> each sequence padded, for attention only
        # (index_copy and index_select: their backward passes are a gather and an index_add,
        # where advanced indexing's is a slower accumulating index_put)
        count, width = packed.queries.shape
        query = query.new_zeros(heads, count * width, dim).index_copy(1, packed.rows, query[0])
        query = query.view(heads, count, width, dim).transpose(0, 1)  # [S, heads, Lq, dim]
        key, value = (t[0].transpose(0, 1).index_select(0, packed.keys.flatten())
                      .view(count, -1, groups, dim).transpose(1, 2)  # [S, kv_heads, Lk, dim]
                      for t in (key, value))
        attention_mask = packed.mask
    batch = query.shape[0]
    scale = dim ** -0.5 if scaling is None else scaling
    stacked = (query * scale).reshape(batch, groups, -1, dim)
    scores = torch.matmul(stacked, key.transpose(2, 3))  # [b, groups, rep * seq, total]
    total = scores.shape[-1]
    scores = scores.reshape(batch, groups, heads // groups, -1, total)  # [.., rep, seq, total]
    if attention_mask is not None:  # [b, 1, seq, total], additive
        scores = scores + attention_mask.unsqueeze(2)
    if query.dtype == torch.float32:  # a traced graph: no Cast around the Softmax
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.reshape(batch, groups, -1, total), value)  # [.., rep * seq, dim]
    out = out.reshape(batch, heads, -1, dim).transpose(1, 2)  # [b, seq, heads, dim]
    if packed is not None:
        return out.reshape(-1, heads, dim).index_select(0, packed.rows)[None], None
    return out.contiguous(), None
