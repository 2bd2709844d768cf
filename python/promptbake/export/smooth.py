"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438) before int8: outlier activation channels moved
into the weights, so quantising activations to int8 loses less.

For a linear layer y = x W^T whose input channel c is scaled by 1/s_c and the weight's column c
by s_c, y is unchanged (SmoothQuant's equation 1: Y = (X diag(s)^-1) (diag(s) W)). The 1/s is
folded into whatever produces x, so the model computes the same function in fp32 and only the
ranges the quantiser sees change: s_c = max|x_c|^m / max|W_c|^(1 - m) (SmoothQuant's equation 4,
m its migration strength), with max|x_c| over calibration prompts. Llama layers, each fold exact:

* q/k/v and gate/up inputs are RMSNorm outputs: the norm's weight is divided by s;
* the down projection's input is silu(gate) * up: the up projection's output rows are divided;
* the output projection's input is attention over the values: the value projection's output rows
  are divided, with one s per key/value head shared by the query heads that read it (GQA).

The LM head's input is not smoothed: its weight is tied to the embedding.
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger("promptbake")

SUPPORTED = ("llama",)


def _scale(activation: torch.Tensor, weights: list[torch.Tensor], migration: float) -> torch.Tensor:
    """SmoothQuant's scale (its equation 4) per input channel; ``weights`` are [out, in] matrices
    reading the same input."""
    weight = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    return (activation.clamp(min=1e-5) ** migration / weight.clamp(min=1e-5) ** (1 - migration)) \
        .clamp(min=1e-5)


def _divide_outputs(linear: torch.nn.Linear, s: torch.Tensor) -> None:
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)


@torch.no_grad()
def input_ranges(model, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """max |input| per channel of every decoder linear layer over ``prompts`` (token ids)."""
    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach()
            peak = x.abs().reshape(-1, x.shape[-1]).amax(0).float()
            ranges[name] = torch.maximum(ranges[name], peak) if name in ranges else peak
        return record

    head = model.get_output_embeddings()
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    try:
        device = next(model.parameters()).device
        for ids in prompts:
            model(input_ids=torch.tensor([ids], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


@torch.no_grad()
def smoothed(model, prompts: list[list[int]], migration: float = 0.5):
    """A copy of ``model`` with SmoothQuant's scales folded in (the same function in fp32), or
    None when the architecture is not supported; ``model`` is left as it was."""
    if model.config.model_type not in SUPPORTED:
        log.info("SmoothQuant is implemented for %s, not %s: quantising without it",
                 ", ".join(SUPPORTED), model.config.model_type)
        return None
    if not 0 <= migration <= 1:
        raise ValueError(f"SmoothQuant's migration strength {migration} must be in [0, 1] (0.5 "
                         f"is the paper's)")
    ranges = input_ranges(model, prompts)
    model = copy.deepcopy(model)
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // kv_heads
    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}."
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        s = _scale(ranges[name + "self_attn.q_proj"], [p.weight for p in projections], migration)
        layer.input_layernorm.weight.div_(s)
        for projection in projections:
            projection.weight.mul_(s)
        s = _scale(ranges[name + "mlp.gate_proj"], [mlp.gate_proj.weight, mlp.up_proj.weight],
                   migration)
        layer.post_attention_layernorm.weight.div_(s)
        mlp.gate_proj.weight.mul_(s)
        mlp.up_proj.weight.mul_(s)
        s = _scale(ranges[name + "mlp.down_proj"], [mlp.down_proj.weight], migration)
        _divide_outputs(mlp.up_proj, s)
        mlp.down_proj.weight.mul_(s)
        # o_proj's input channel (head h, dim d) is value channel (h // group, d).
        grouped = ranges[name + "self_attn.o_proj"].view(kv_heads, group, head_dim).amax(1)
        weight = attention.o_proj.weight.abs().amax(0).view(kv_heads, group, head_dim).amax(1)
        s = (grouped.clamp(min=1e-5) ** migration / weight.clamp(min=1e-5) ** (1 - migration)) \
            .clamp(min=1e-5)
        _divide_outputs(attention.v_proj, s.reshape(-1))
        attention.o_proj.weight.mul_(s[:, None, :].expand(kv_heads, group, head_dim).reshape(-1))
    return model
