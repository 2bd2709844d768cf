"""int4 that keeps the bake: the base model's weights in 4 bits, the bake's LoRA beside them.

Merging first and quantising the merged weights rounds W + s B A to 4 bits; the rounding step of
a block (a sixteenth of its range) is larger than most entries of the low-rank delta, so most of
the bake is rounded away (the pirate bake keeps 21% of its KL reduction at 4 bits). With
``Int4Options(lora="beside")`` the base weights W are quantised alone, and each adapted layer
computes ``MatMulNBits(x, W) + (x @ A) @ B`` with the LoRA factors computed in fp32 (the
scaling folded into B; rank 8 on q/k/v/o of SmolLM2 is 0.9 M numbers, 1.8 MB stored in fp16 by
default, ``quantize.store_half``, 3.7 MB in fp32): the bake is kept and only the base's own
rounding remains.

``recover_steps`` then trains those factors on the 4-bit base, read back from the graph to the
bit (``quantize.blocks_4bit``), toward the fp32 baked model with the bake's own loss
(``compress.recover``): the LoRA learns to undo part of the rounding too. With
``recover_scales`` the blocks' scales and (float) zero points train with it (``LearnedScales``:
the 4-bit codes stay, the grid they sit on moves), and are written back into the graph, so the
export's size and speed do not change. On the pirate bake with a 4-bit head (hqq, block 32, 60
steps): the LoRA beside alone keeps 70% of the bake, recovered 80% (82% after 200 steps), with
the scales 85%. With the 8-bit head (the default) it keeps 99.6% before any recovery, and 60
steps raised its held-out KL to the fp32 bake 3.9x: a recovery that raises that KL is dropped
(``recovery["kept"]``), the export keeping its start. ``correction_rank`` adds a small fp16
correction beside every 4-bit matrix, trained with them (``correction.py``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch

from promptbake import compress, modeling
from promptbake.export import correction, quantize as quantize_mod
from promptbake.export.graph import save
from promptbake.export.merging import PREFIX, lora_factors


def _base_layer(module) -> tuple[torch.nn.Module, bool]:
    """The layer holding a module's base weight (under the LoRA where there is one), and whether
    that weight is stored transposed against ``Linear.weight`` (GPT-2's Conv1D holds [in, out])."""
    target = getattr(module, "base_layer", module)
    return target, not isinstance(target, (torch.nn.Linear, torch.nn.Embedding))


def base_weights(peft_model, names) -> dict[str, np.ndarray]:
    """``{name: [N, K] fp32}``: the base model's weights of the named modules, in torch's
    ``Linear.weight`` layout."""
    modules = dict(peft_model.named_modules())
    out = {}
    for name in names:
        target, transposed = _base_layer(modules[PREFIX + name])
        weight = target.weight.detach().float()
        out[name] = (weight.T if transposed else weight).numpy().copy()
    return out


def on_quantized_base(peft_model, weights: dict[str, np.ndarray], strength: float):
    """A copy of ``peft_model`` (adapter at ``strength``) whose base weights are ``weights``
    (``quantize.weights_4bit``: what the graph computes with), for recovery in torch."""
    student = copy.deepcopy(peft_model)
    for layer in modeling.lora_layers(student):
        for name in layer.scaling:
            layer.set_scale(name, float(strength))
    modules = dict(student.named_modules())
    for name, weight in weights.items():
        module = modules.get(PREFIX + name)
        if module is None:
            raise AssertionError(f"the 4-bit graph quantised {name}, which the bake's model lacks")
        target, transposed = _base_layer(module)
        value = torch.from_numpy(weight)
        if transposed:
            value = value.T
        if tuple(target.weight.shape) != tuple(value.shape):
            raise AssertionError(f"{name}: the graph's weight is {tuple(value.shape)}, torch's "
                                 f"{tuple(target.weight.shape)}")
        with torch.no_grad():
            target.weight.copy_(value)
    return student.eval()


class LearnedScales(torch.nn.Module):
    """A 4-bit weight as the graph computes it, ``(code - zero) * scale`` per block, with the
    blocks' scales and float zero points trainable (the codes and integer zero points fixed): a
    parametrization of a torch layer's weight (``torch.nn.utils.parametrize``), so recovery can
    move the rounding grid the
    4-bit weights sit on. Trained as relative changes, ``scale * (1 + scale_change)`` and ``zero +
    zero_change`` (in code units), both starting at 0: one learning rate suits every layer."""

    rate = 0.3  # the changes' step relative to the LoRA's, under the one learning rate (1.0 kept
    # as much of the pirate bake, 85.4% against 85.6%, with a spike in the training KL)

    def __init__(self, blocks: quantize_mod.Blocks4, transposed: bool = False):
        super().__init__()
        n, count, _ = blocks.codes.shape
        # symmetric (zero 8) or integer zero points: the zeros stay, in MatMulNBits' arithmetic
        self.k, self.transposed = blocks.k, transposed
        self.fixed_zero = blocks.zeros is None or blocks.integer_zeros
        self.register_buffer("codes", torch.from_numpy(blocks.codes.copy()), persistent=False)
        self.register_buffer("scale", torch.from_numpy(blocks.scales.copy()).unsqueeze(-1),
                             persistent=False)
        zeros = np.full((n, count), 8, np.float32) if blocks.zeros is None else blocks.zeros
        self.register_buffer("zero", torch.from_numpy(zeros.copy()).unsqueeze(-1),
                             persistent=False)
        self.scale_change = torch.nn.Parameter(torch.zeros(n, count, 1))
        if self.fixed_zero:
            self.register_buffer("zero_change", torch.zeros(n, count, 1), persistent=False)
        else:
            self.zero_change = torch.nn.Parameter(torch.zeros(n, count, 1))

    def scales(self) -> tuple[np.ndarray, np.ndarray]:
        """The learned ([N, blocks] scales, zero points), for ``quantize.set_scales_4bit``."""
        with torch.no_grad():
            scale = self.scale * (1 + self.rate * self.scale_change)
            zero = self.zero + self.rate * self.zero_change
        return scale.squeeze(-1).numpy(), zero.squeeze(-1).numpy()

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        scale = self.scale * (1 + self.rate * self.scale_change)
        # MatMulNBits' own arithmetic, so unchanged scales give the graph's weights to the bit
        codes = self.codes.to(scale.dtype)
        if self.fixed_zero:
            weight = (codes - self.zero) * scale
        else:
            weight = codes * scale - (self.zero + self.rate * self.zero_change) * scale
        weight = weight.reshape(weight.shape[0], -1)[:, :self.k]
        return weight.T if self.transposed else weight


def learn_scales(student, blocks: dict[str, quantize_mod.Blocks4]) -> dict[str, LearnedScales]:
    """Parametrizes each 4-bit layer's weight of ``student`` (``on_quantized_base``'s copy) as
    ``LearnedScales``; a tied head and embedding share one. Returns them by module name."""
    from torch.nn.utils import parametrize

    modules = dict(student.named_modules())
    learned = {}
    for name, block in blocks.items():
        module = modules[PREFIX + name]
        target, transposed = _base_layer(module)
        learned[name] = LearnedScales(block, transposed)
        tied = [m for m in student.modules() if m._parameters.get("weight") is target.weight]
        for layer in tied:  # the tied head's weight is the embedding's: both read the same grid
            parametrize.register_parametrization(layer, "weight", learned[name], unsafe=True)
    return learned


@dataclasses.dataclass
class Beside:
    """What ``export_baked`` hands ``export_onnx`` for ``Int4Options(lora="beside")``: the base
    model to trace and quantise, and the bake whose LoRA goes beside it."""

    base: torch.nn.Module
    baked: object
    strength: float
    recover_steps: int = 0
    recover_lr: float = 1e-3
    recover_scales: bool = True
    recover_contexts: int = 48
    correction_rank: int = 0
    progress: bool = False

    def attach(self, graph_path: Path, teacher) -> dict:
        """Adds the LoRA branches to the 4-bit graph at ``graph_path`` (after recovery toward
        ``teacher``, the fp32 merged bake, when ``recover_steps``); returns the record."""
        model = onnx.load(str(graph_path))
        record: dict = {"strength": self.strength, "recover_steps": self.recover_steps}
        adapter = self.baked.model
        blocks = quantize_mod.blocks_4bit(model)
        found = lora_factors(adapter, self.strength)
        missing = sorted(set(found) - set(blocks))
        if missing:  # before the minutes of recovery
            raise ValueError(f"lora='beside' puts the LoRA beside 4-bit weights, but {missing[0]}"
                             f" (and {len(missing) - 1} more) stayed in fp32: do not exclude "
                             f"adapted layers from int4, or use lora='merge'")
        quantized = {n: b.weight() for n, b in blocks.items()}  # what the graph computes with
        corrections = correction.initial(base_weights(adapter, blocks), quantized,
                                         self.correction_rank) if self.correction_rank else {}
        if self.recover_steps:
            # an 8-bit head (Int4Options(head_bits=8)) is read back too: the student computes
            # with every weight as the graph does
            adapter = on_quantized_base(adapter, {**quantized, **quantize_mod.weights_8bit(model)},
                                        self.strength)
            learned = learn_scales(adapter, blocks) if self.recover_scales else {}
            attached = correction.attach(adapter, corrections,
                                         tied=bool(correction.tied_lookups(model)))
            recovery = record["recovery"] = compress.recover(
                adapter, teacher, self.baked.tokenizer,
                train="adapter+scales" if self.recover_scales else "adapter",
                held_out=self.baked.held_out, framing=self.baked.framing,
                steps=self.recover_steps, lr=self.recover_lr,
                train_contexts=self.recover_contexts, progress=self.progress)
            # what recovery made worse on its held-out samples is dropped: started near the fp32
            # bake (the default model's 8-bit head: KL 0.0005/token), bf16 training chases its
            # own rounding (the pirate bake's KL to fp32 rose 3.9x in 60 steps)
            recovery["kept"] = recovery["kl_after"]["per_token"] < \
                recovery["kl_before"]["per_token"]
            record["scales_learned"] = 0
            if recovery["kept"]:
                record["scales_learned"] = len(learned)
                for name, scales in learned.items():
                    quantize_mod.set_scales_4bit(model, name, blocks[name], *scales.scales())
                found = lora_factors(adapter, self.strength)  # the recovered LoRA
                corrections = correction.factors(attached)  # and corrections
        if corrections:
            record["correction"] = {
                "rank": self.correction_rank,
                "branches": correction.add(model, corrections),
                "parameters": int(sum(c.size + d.size for c, d in corrections.values()))}
        record["branches"] = quantize_mod.add_adapters(model, found)
        record["parameters"] = int(sum(a.size + b.size for a, b in found.values()))
        save(model, graph_path)
        return record
