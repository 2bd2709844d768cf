"""A small fp16 correction beside each 4-bit matrix: the third way to keep a bake in 4 bits.

Learned scales move the grid the 4-bit codes sit on but keep the codes; the LoRA kept beside
the base (``beside.py``) keeps the bake exactly but sits on the attention only.
``Int4Options(correction_rank=r)`` adds, beside every 4-bit ``MatMulNBits`` (the MLP's, the
attention's and the tied head's), a rank-r branch ``(x @ C) @ D`` stored in fp16: ``y =
MatMulNBits(x) + (x @ C) @ D`` (+ the bake's LoRA branch where there is one). The tied
embedding, whose rows the graph unpacks from the head's 4-bit codes, is corrected by the head's
branch too, at no further size: row v of the error is column v of ``C @ D``, ``D[:, v] @
C^T``, gathered from the same initializers.

The branch starts as the best rank-r approximation of the matrix's rounding error, ``W -
Q(W)`` (its truncated SVD, as LoftQ starts a LoRA on a quantised base), and with
``recover_steps`` trains with the LoRA and the scales toward the fp32 bake
(``compress.recover``), so it learns the part of the error the bake's outputs feel rather than
the largest part of the error.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from promptbake.compress import CORRECTION
from promptbake.export import quantize as quantize_mod
from promptbake.export.merging import PREFIX  # a PeftModel's name for the model's modules


def initial(fp32: dict[str, np.ndarray], quantized: dict[str, np.ndarray],
            rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module name: (C [K, r], D [r, N])}``: for each 4-bit weight, the rank-``rank``
    truncated SVD of its rounding error ``fp32[name] - quantized[name]`` (both [N, K], torch's
    ``Linear.weight`` layout; ``quantized`` as ``quantize.weights_4bit`` gives it), split evenly
    (``C = U sqrt(S)``, ``D = sqrt(S) V^T``) so that ``x @ C @ D`` is x times the approximated
    error; rounded to fp16, as stored."""
    out = {}
    for name, weight in quantized.items():
        error = torch.from_numpy(fp32[name] - weight).double().T  # [K, N]
        u, s, vt = torch.linalg.svd(error, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        c = (u[:, :r] * root).to(torch.float16).numpy()
        d = (root[:, None] * vt[:r]).to(torch.float16).numpy()
        out[name] = (c, d)
    return out


class Correction(torch.nn.Module):
    """One branch in torch, as a forward hook on its module: the module's output plus
    ``(x @ c) @ d``; ``c`` and ``d`` are trained in fp32 and stored in fp16 (``factors``).
    ``lookup`` is the hook for a tied input embedding: row v of the same correction."""

    def __init__(self, c: np.ndarray, d: np.ndarray):
        super().__init__()
        self.c = torch.nn.Parameter(torch.from_numpy(c.astype(np.float32)))
        self.d = torch.nn.Parameter(torch.from_numpy(d.astype(np.float32)))

    def hook(self, module, inputs, output):
        x = inputs[0]
        return output + ((x @ self.c.to(x.dtype)) @ self.d.to(x.dtype)).to(output.dtype)

    def lookup(self, module, inputs, output):
        rows = torch.nn.functional.embedding(inputs[0], self.d.T)  # [..., r]
        return output + (rows @ self.c.T).to(output.dtype)


def attach(student, factors: dict[str, tuple[np.ndarray, np.ndarray]],
           tied: bool = False) -> dict[str, Correction]:
    """Hooks a ``Correction`` onto each named module of ``student`` (a PeftModel; names as in
    the transformers model, ``lm_head`` included), as a child named ``compress.CORRECTION``, so
    that its parameters are the student's and recovery trains them; with ``tied``, the head's
    also corrects the input embedding, as the graph's lookup does. Returns them by name."""
    modules = dict(student.named_modules())
    attached = {}
    for name, (c, d) in factors.items():
        module = modules.get(PREFIX + name)
        if module is None:
            raise AssertionError(f"the 4-bit graph quantised {name}, which the bake's model lacks")
        branch = Correction(c, d)
        module.add_module(CORRECTION, branch)
        module.register_forward_hook(branch.hook)
        if tied and name == "lm_head":
            student.get_input_embeddings().register_forward_hook(branch.lookup)
        attached[name] = branch
    return attached


def factors(attached: dict[str, Correction]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The trained branches' (C, D), rounded to fp16 as the graph stores them."""
    with torch.no_grad():
        return {name: (b.c.to(torch.float16).numpy(), b.d.to(torch.float16).numpy())
                for name, b in attached.items()}


def tied_lookups(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes whose output is an embedding row unpacked from the tied head's 4-bit codes
    (``quantize._share_4bit_head``)."""
    return [n for n in model.graph.node if n.name.endswith("_q4/" + quantize_mod.LOOKUP_ROW)]


def add(model: onnx.ModelProto, factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Puts the branches into the 4-bit graph beside their MatMulNBits (fp16 initializers, cast
    to fp32 in the graph) and, when the head's is among them, beside each tied embedding lookup:
    ``row + D^T[ids] @ C^T`` from the same initializers. Returns how many MatMuls got one."""
    added = quantize_mod.add_adapters(model, factors, kind="correction")
    if "lm_head" not in factors:
        return added
    graph = model.graph
    prefix = "lm_head.correction"
    nodes = list(graph.node)
    for row in tied_lookups(model):
        at = next(i for i, n in enumerate(nodes) if n.name == row.name)
        t = row.name[:-len(quantize_mod.LOOKUP_ROW)]  # the lookup's own name prefix
        ids = next(n for n in nodes if n.name == t + "bytes").input[1]  # the gathered token ids
        out = row.output[0]
        nodes[at].output[0] = out + "_uncorrected"
        c = t + "correction_"
        nodes[at + 1:at + 1] = [
            helper.make_node("Cast", [prefix + "_A"], [c + "A"], name=c + "A",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Cast", [prefix + "_B"], [c + "B"], name=c + "B",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Transpose", [c + "A"], [c + "A_t"], name=c + "A_t", perm=[1, 0]),
            helper.make_node("Transpose", [c + "B"], [c + "B_t"], name=c + "B_t", perm=[1, 0]),
            helper.make_node("Gather", [c + "B_t", ids], [c + "rows"], name=c + "rows", axis=0),
            helper.make_node("MatMul", [c + "rows", c + "A_t"], [c + "up"], name=c + "up"),
            helper.make_node("Add", [out + "_uncorrected", c + "up"], [out], name=c + "add"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return added
