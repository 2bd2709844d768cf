"""Bakes on top of bakes: LoRA deltas extracted, stacked into one adapter, and baked upon.

A new prompt is baked on top of a baked model by merging the current model into plain weights and
baking a fresh LoRA adapter on them with ``promptbake.bake`` (teacher: the current model with the
prompt; student: it without). LoRA deltas add up exactly by concatenation:
sum_i s_i B_i A_i = [s_1 B_1 | s_2 B_2 | ...] [A_1; A_2; ...], so the result stays one PEFT
adapter on the original base model (rank: the sum of the ranks), loadable by
``peft.PeftModel.from_pretrained`` and scalable by a strength like any bake. ``LoraStack`` keeps
the deltas of every bake so far: pursuit and sequential baking are loops over its ``push``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from promptbake.artifact import Baked, write_merged
from promptbake.bake import bake
from promptbake.config import BakeConfig


def lora_deltas(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A [r, in], B [out, r], scale)} of a PeftModel's active LoRA adapter, the
    delta of each module being scale * B @ A (scale includes the current strength)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):]
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            found[name] = (module.lora_A[adapter].weight.detach().clone(),
                           module.lora_B[adapter].weight.detach().clone(),
                           float(module.scaling[adapter]))
    if not found:
        raise ValueError("this model has no LoRA adapter to stack")
    return found



def stack(baked: Baked, deltas: list[dict]) -> Baked:
    """A ``Baked`` on ``baked``'s base model whose one adapter is the sum of ``deltas`` (each
    from ``lora_deltas``), at strength 1. ``baked`` is left as it was (the weights are copied)."""
    from peft import LoraConfig, get_peft_model

    names = set(deltas[0])
    if any(set(d) != names for d in deltas):
        raise ValueError("the adapters to stack cover different modules: bake them with the same "
                         "--target-modules")
    ranks = [next(iter(d.values()))[0].shape[0] for d in deltas]
    rank = sum(ranks)
    base = copy.deepcopy(baked.model).unload()  # the base weights without LoRA layers
    targets = sorted({name.rsplit(".", 1)[-1] for name in names})
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0,
                        task_type="CAUSAL_LM")  # lora_alpha = r: scale 1, the scales live in B
    model = get_peft_model(base, config)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            layer = modules["base_model.model." + name]
            layer.lora_A["default"].weight.copy_(torch.cat([d[name][0] for d in deltas]))
            layer.lora_B["default"].weight.copy_(torch.cat([d[name][2] * d[name][1]
                                                            for d in deltas], dim=1))
    model.eval()
    stacked = Baked(model, baked.tokenizer, baked.framing, dict(baked.manifest), baked.path,
                    baked.held_out)
    stacked.strength = 1.0
    return stacked



def merged_dir(baked: Baked, where: Path) -> Path:
    """The baked model (at its strength) merged into plain weights, saved under ``where``:
    the base model of the next bake on top."""
    path = where / f"merged-{time.monotonic_ns()}"
    write_merged(baked, path, baked.strength)
    return path



def bake_on_top(baked: Baked, prompt: str, config: BakeConfig, contexts=None, *,
                progress: bool = False, teacher_model=None, rehearse=()) -> tuple[Baked, dict]:
    """Bakes ``prompt`` into the baked model (teacher: it with ``prompt``, or ``teacher_model``
    with ``prompt`` when given, e.g. the base model; student: the baked model without it), with
    ``rehearse`` (``bake.Rehearsal``s: earlier prompts' contexts, taught by them) if given.

    Returns (the new bake, on the merged weights, whose manifest holds the round's KL before and
    after; the new adapter's deltas, to stack on ``baked``'s).
    """
    with tempfile.TemporaryDirectory(prefix="promptbake-on-top-") as tmp:
        merged = merged_dir(baked, Path(tmp))
        top = bake(prompt, model=merged, contexts=contexts, config=config, progress=progress,
                   teacher_model=teacher_model, rehearse=rehearse)
        deltas = lora_deltas(top.model)
    return top, deltas



class LoraStack:
    """The LoRA deltas of a bake and of every bake pushed on top of it; ``current`` is the
    ``Baked`` with all of them stacked into one adapter on the base model (strength 1)."""

    def __init__(self, first: Baked):
        self.deltas = [lora_deltas(first.model)]
        self.current = stack(first, self.deltas)

    def push(self, prompt: str, config: BakeConfig, contexts=None, *,
             progress: bool = False, teacher_model=None, rehearse=()) -> dict:
        """Bakes ``prompt`` on top of ``current`` (``bake_on_top``, with its ``teacher_model``
        and ``rehearse``) and stacks its delta. Returns the new bake's KL record (its
        manifest's ``kl``: before and after, held out)."""
        top, deltas = bake_on_top(self.current, prompt, config, contexts, progress=progress,
                                  teacher_model=teacher_model, rehearse=rehearse)
        kl = top.manifest["kl"]
        del top  # its model: the merged weights of the previous state
        self.deltas.append(deltas)
        self.current = stack(self.current, self.deltas)
        return kl

    def upto(self, index: int) -> Baked:
        """The first ``index + 1`` deltas stacked: the state after push number ``index``."""
        return stack(self.current, self.deltas[:index + 1])
