"""``ops.attention``: transformers' eager attention's results without a copy of the keys and
values per query head, and over sequences packed into one row (``pack``)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from promptbake.ops import attention


class Heads(torch.nn.Module):
    """What an attention function reads of its module: the config and ``num_key_value_groups``
    (eager's ``repeat_kv``)."""

    def __init__(self, heads, groups):
        super().__init__()
        self.config = type("Config", (), {"num_attention_heads": heads,
                                          "num_key_value_heads": groups})()
        self.num_key_value_groups = heads // groups


@pytest.mark.parametrize("heads,groups", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_computes_what_eager_attention_does(heads, groups, dtype):
    gen = torch.Generator().manual_seed(0)
    batch, seq, past, dim = 2, 3, 5, 8
    query = torch.randn(batch, heads, seq, dim, generator=gen).to(dtype)
    key, value = (torch.randn(batch, groups, past + seq, dim, generator=gen).to(dtype)
                  for _ in range(2))
    mask = torch.zeros(batch, 1, seq, past + seq)
    mask[0, :, :, :2] = torch.finfo(torch.float32).min  # the first row's left padding
    mask[:, :, 0, past + 1:] = torch.finfo(torch.float32).min  # causal, for the first query
    module = Heads(heads, groups).eval()
    for scaling in (dim ** -0.5, 0.3):
        want, _ = eager_attention_forward(module, query, key, value, mask.to(dtype), scaling)
        got, weights = attention.grouped_attention(module, query, key, value, mask.to(dtype),
                                                   scaling=scaling)
        assert got.shape == want.shape == (batch, seq, heads, dim) and weights is None
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="not \\['sliding_window'\\]"):
        attention.grouped_attention(module, query, key, value, None, sliding_window=4)


@pytest.mark.parametrize("split", [False, True])
def test_packed_sequences_attend_as_padded_ones(split):
    # Three sequences laid end to end after 4 cached keys: the first two see cached keys 0-1
    # (a shared start) and 2-3 (a prompt), the last sees key 0 only; each also sees itself,
    # causally. The packed result, in one group or two, equals each sequence's own attention
    # computed alone.
    gen = torch.Generator().manual_seed(0)
    heads, groups, dim, cached = 6, 2, 8, 4
    lengths = [3, 1, 2]
    seen = [torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), torch.tensor([0])]
    total = sum(lengths)
    query = torch.randn(1, heads, total, dim, generator=gen, dtype=torch.float64)
    key, value = (torch.randn(1, groups, cached + total, dim, generator=gen, dtype=torch.float64)
                  for _ in range(2))
    if split:
        packed = (attention.pack(seen[:2], lengths[:2], cached, torch.float64),
                  attention.pack(seen[2:], lengths[2:], cached, torch.float64, at=4))
        assert packed[1].keys.tolist() == [[0, 8, 9]]
    else:
        packed = attention.pack(seen, lengths, cached, torch.float64)
        assert (packed.count, packed.width) == (3, 3) and packed.keys.shape == (3, 7)
        assert packed.rows.tolist() == [0, 1, 2, 3, 6, 7]
    module = Heads(heads, groups).eval()
    got, _ = attention.grouped_attention(module, query, key, value, None, packed=packed)
    assert got.shape == (1, total, heads, dim)
    at = 0
    for s, n in enumerate(lengths):
        own = torch.arange(cached + at, cached + at + n)
        keys = torch.cat([seen[s], own])
        causal = torch.ones(n, len(keys), dtype=torch.bool).tril(len(seen[s]))
        mask = torch.zeros(1, 1, n, len(keys), dtype=torch.float64).masked_fill(
            ~causal, torch.finfo(torch.float64).min)
        want, _ = eager_attention_forward(module, query[:, :, at:at + n], key[:, :, keys],
                                          value[:, :, keys], mask, dim ** -0.5)
        torch.testing.assert_close(got[:, at:at + n], want)
        at += n
    with pytest.raises(ValueError, match="cover 4 of the row's 6 tokens"):
        attention.grouped_attention(module, query, key, value, None, packed=packed[:1] if split
                                    else attention.pack(seen[:2], lengths[:2], cached))
