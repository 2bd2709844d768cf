"""Exporting a (baked) Llama-architecture model to GGUF, for llama.cpp and Ollama.

``export_gguf`` writes into a temporary directory: ``model.gguf`` (llama metadata, the tokenizer,
the tensors under gguf's names, in f32, f16, q8_0, q4_1 or q4_0), then loads that file back with
transformers' GGUF loader alone (model and tokenizer, no other file) and compares it with the
merged model: the tokenizer must encode a fixed set of texts to the same ids, and the logits must
pass ``parity.check`` (max |logit difference|, top-1 agreement, greedy tokens). Only then are
``manifest.json`` and an Ollama ``Modelfile`` written and the directory renamed to its name; a
failed check raises ``ParityError`` and leaves nothing behind.

With ``adapter`` (``export_baked``'s default for q4_1), ``model.gguf`` holds the *base* weights
and the bake's LoRA goes beside them into ``adapter.gguf``, llama.cpp's LoRA adapter format
(``llama-cli -m model.gguf --lora adapter.gguf``; the Modelfile's ``ADAPTER``), in f32: the
rounding of the base cannot erase the bake, as it does when the merged weights are rounded to 4
bits (q4_0 merged kept -32% of the pirate bake). The check reads the adapter back too and adds
its delta to the model transformers rebuilt, as llama.cpp applies it.

Pass criteria (16 greedy steps from each of 8 held-out contexts, 128 positions):

* f32: the weights are stored exactly, so the fp32 criterion of the ONNX export applies (max
  |logit difference| <= 1e-3, identical greedy tokens). SmolLM2-135M: 7e-5, from rms_norm_eps,
  which GGUF stores as a float32.
* f16, q8_0, q4_1, q4_0 change the weights by design: top-1 agreement with the fp32 model at
  the positions of its own greedy continuation must reach ``TOP1_FLOOR``. Measured on
  SmolLM2-135M: f16 99.2% (one near-tie of 128 flips: f16 moves logits by up to 0.04), q8_0
  99.2%, q4_0 77.3% (KL 0.28 nats/token), q4_1 100% and a max |logit difference| of 6e-5: the
  default model is llama.cpp's Q4_1 file, and q4_1 writes its blocks back byte for byte. A
  broken export (f32 with the rope rows left in transformers' order) agrees on 29.7%. Floors:
  f16 0.98 and q8_0 0.95 (rounding may flip a near-tie, nothing more), q4_1 and q4_0 0.6
  (halfway between a working and a broken file). The numbers are recorded in the manifest
  either way.

llama.cpp stores the query and key projections with the rows of each head reordered for its
rotary embedding (the two halves of a head interleaved); transformers' loader undoes exactly that
(``LlamaTensorProcessor``), so the round trip is exact. A tied output head is written once, as
``token_embd``: without an ``output`` tensor both llama.cpp and transformers tie it. In q4_0 and
q4_1 the embedding (which is also the output head of a tied model) is stored as q8_0, as
llama.cpp keeps its output head at 6 bits: on SmolLM2-135M a 4-bit embedding costs q4_0 5 points
of top-1 agreement (71.9%, KL 0.36) to save 14 of 92 MB. A weight whose rows are not a multiple
of the 32-element block is stored as f16.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import gguf  # the gguf package (llama.cpp's gguf-py), not this module
import numpy as np
import torch

from promptbake import files, versions
from promptbake.export import GGUF_QUANTIZATIONS, parity
from promptbake.export.graph import UnsupportedArchitecture
from promptbake.export.runtime import Generation

log = logging.getLogger("promptbake")

ParityError = parity.ParityError

SUPPORTED = ("llama",)  # model_type values the GGUF export writes
FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"  # the LoRA beside the base, with lora="adapter"
KIND = "gguf"
# What a GGUF export may replace with overwrite: any whole-directory export promptbake wrote.
KINDS = files.MODEL_DIRS

# Minimum top-1 agreement with the fp32 model (see the module docstring for why these).
TOP1_FLOOR = {"f16": 0.98, "q8_0": 0.95, "q4_1": 0.6, "q4_0": 0.6}
STEPS = 16  # greedy steps compared per context
CONTEXTS = 8  # built-in held-out contexts the parity check runs

# Texts the GGUF's tokenizer must encode exactly as the original: words, digits, code, accents,
# scripts beyond Latin, emoji, runs of spaces and newlines, and special tokens inside text.
TOKENIZER_TEXTS = (
    "Hello, world! How are you today?",
    "In 2024, 1234567 people paid $89.99 (or 3.5%) each.",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "naïve café — Straße, Ελληνικά, русский, 東京, مرحبا 🙂👍",
    "  leading and   inner   spaces, trailing   \n\n\nnewlines\r\n",
    "<|im_start|>user\nArrr!<|im_end|>\n<|endoftext|>",
    "don't I'll we've they're it's",
)


@dataclasses.dataclass
class GgufExport:
    """A GGUF export directory (``model.gguf``, ``manifest.json``, ``Modelfile``, and
    ``adapter.gguf`` when the bake's LoRA is kept beside the base)."""

    path: Path
    manifest: dict

    @property
    def file(self) -> Path:
        return self.path / self.manifest["file"]

    @property
    def adapter(self) -> Path | None:
        """The LoRA adapter file beside ``file``, if the export keeps one."""
        kept = self.manifest.get("adapter")
        return self.path / kept["file"] if kept else None

    def load(self, dtype: torch.dtype = torch.float32):
        """(model, tokenizer) read back from the file by transformers' GGUF loader, with the
        adapter's delta added as llama.cpp adds it at its default scale, if there is one."""
        return load(self.file, dtype=dtype, adapter=self.adapter)


def load(path: str | Path, dtype: torch.dtype = torch.float32, adapter: str | Path | None = None):
    """(model, tokenizer) from a GGUF file alone, dequantised to ``dtype``, model in eval mode;
    with ``adapter``, a llama.cpp LoRA adapter's delta added to the weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    if adapter is not None:
        _add_deltas(model, adapter_deltas(adapter, model))
    return model.eval(), tokenizer


def check_supported(model) -> None:
    """Raises ``UnsupportedArchitecture`` (a ValueError) naming what the GGUF export cannot write
    for ``model``, before anything is written."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"cannot export a {kind or type(model).__name__!r} model to GGUF: the GGUF export "
            f"supports {', '.join(SUPPORTED)} (Llama-architecture models such as SmolLM2); "
            f"export it as merged safetensors (--format safetensors) or ONNX (--format onnx)")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    unsupported = {
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        f"rope_type={rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
        f"hidden_act={config.hidden_act!r}": config.hidden_act != "silu",
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise UnsupportedArchitecture(
            f"cannot export this Llama model to GGUF: {', '.join(found)} is not written by the "
            f"GGUF export (it writes plain Llama: no biases, default RoPE, SiLU); export it as "
            f"merged safetensors instead (--format safetensors)")


# -- the file -------------------------------------------------------------------------------------


def _rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a query or key projection [heads * head_dim, hidden]: within
    each head, the rotary pairs (i, i + head_dim/2) become adjacent rows. transformers'
    ``LlamaTensorProcessor._reverse_permute_weights`` is the inverse."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _unrope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``_rope_rows``: transformers' row order back."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _storage(name: str, shape: tuple[int, ...], precision: str):
    """The GGML type a tensor is stored as in an export of ``precision``."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or precision == "f32":  # norms stay f32 in every llama.cpp file
        return types.F32
    if precision == "f16":
        return types.F16
    four = {"q4_0": types.Q4_0, "q4_1": types.Q4_1}
    qtype = types.Q8_0 if precision == "q8_0" or name in ("token_embd.weight",
                                                          "output.weight") else four[precision]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else types.F16


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One tensor of the file: the model's weight ``key``, stored as ``name`` in ``qtype``."""

    key: str
    name: str
    kind: gguf.MODEL_TENSOR
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def _plan(model, precision: str) -> list[_Planned]:
    """Every weight of ``model`` with its llama.cpp name and storage type."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    tied = "lm_head.weight" in state and torch.equal(state["lm_head.weight"],
                                                     state["model.embed_tokens.weight"])
    planned = []
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue  # token_embd serves as the output head when no output tensor is written
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UnsupportedArchitecture(f"the GGUF export has no llama.cpp name for the weight "
                                          f"{key!r} of this {config.model_type} model")
        kind, name = found
        shape = tuple(value.shape)
        planned.append(_Planned(key, name, kind, shape, _storage(name, shape, precision)))
    return planned


def _rope_heads(kind: gguf.MODEL_TENSOR, config) -> int | None:
    """The heads whose rows llama.cpp reorders in a weight of ``kind`` (None: no reordering)."""
    return {gguf.MODEL_TENSOR.ATTN_Q: config.num_attention_heads,
            gguf.MODEL_TENSOR.ATTN_K: config.num_key_value_heads}.get(kind)


def _stored(tensor: _Planned, value: torch.Tensor, config) -> np.ndarray:
    """The bytes (or f32 / f16 values) of one weight as the file holds them."""
    weight = value.detach().to(torch.float32, copy=True).cpu().numpy()
    heads = _rope_heads(tensor.kind, config)
    if heads:
        weight = _rope_rows(weight, heads)
    return gguf.quants.quantize(weight, tensor.qtype)


# -- the LoRA beside the base: a llama.cpp adapter ------------------------------------------------

_ADAPTABLE = {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
              gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP,
              gguf.MODEL_TENSOR.FFN_DOWN}


@dataclasses.dataclass
class Adapter:
    """What ``export_gguf`` keeps beside the base weights with the LoRA as an adapter: the base
    model, whose weights ``model.gguf`` holds, and the bake's LoRA factors
    (``merging.lora_factors``: ``{module: (A [K, r], B [r, N])}``, the scaling folded into B),
    which ``adapter.gguf`` holds."""

    base: torch.nn.Module
    factors: dict[str, tuple[np.ndarray, np.ndarray]]


def _adapted(planned: list[_Planned], factors: dict) -> list[tuple[_Planned, np.ndarray,
                                                                     np.ndarray]]:
    """(the adapted weight's tensor, A, B) for every LoRA layer; a ValueError for a layer a
    llama.cpp adapter cannot hold, before anything is written."""
    by_key = {tensor.key: tensor for tensor in planned}
    adapted = []
    for module, (a, b) in sorted(factors.items()):
        tensor = by_key.get(module + ".weight")
        if tensor is None or tensor.kind not in _ADAPTABLE:
            raise ValueError(f"the bake adapts {module}, which a llama.cpp LoRA adapter does not "
                             f"hold (it holds the attention and MLP projections): export with "
                             f"--gguf-lora merge (lora='merge')")
        adapted.append((tensor, a, b))
    return adapted


def _write_adapter(path: Path, config, adapted: list, name: str) -> dict:
    """Writes the LoRA as llama.cpp's adapter GGUF (what ``llama-cli --lora`` and Ollama's
    ``ADAPTER`` read): ``<weight>.lora_a`` [r, K] and ``<weight>.lora_b`` [N, r] in f32, B's
    rows in the order of the weight they adapt. ``adapter.lora.alpha`` is 0, so llama.cpp
    scales ``lora_b @ lora_a`` by the user's ``--lora-scaled`` factor alone (1 by default;
    a non-zero alpha would scale it by alpha / rank): the bake's scaling, strength *
    lora_alpha / r, is in lora_b already."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    for tensor, a, b in adapted:
        lora_b = b.T
        heads = _rope_heads(tensor.kind, config)
        if heads:
            lora_b = _rope_rows(lora_b, heads)
        writer.add_tensor(tensor.name + ".lora_a", np.ascontiguousarray(a.T, dtype=np.float32))
        writer.add_tensor(tensor.name + ".lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"file": ADAPTER_FILE, "layers": len(adapted), "type": "F32",
            "ranks": sorted({int(a.shape[1]) for _, a, _ in adapted}),
            "alpha": 0.0, "scaling": "in lora_b (strength * lora_alpha / r)"}


def adapter_deltas(path: str | Path, model) -> dict[str, torch.Tensor]:
    """``{weight key: delta [N, K]}`` that the llama.cpp LoRA adapter at ``path`` adds to
    ``model``'s weights at llama.cpp's default scale, in transformers' layout (B's rows back
    in transformers' order): how the export reads its own adapter back to check it."""
    reader = gguf.GGUFReader(path)
    kind = reader.fields.get(gguf.Keys.Adapter.TYPE)
    if kind is None or _scalar(kind) != "lora":
        raise ValueError(f"{path} is no llama.cpp LoRA adapter (adapter.type is not 'lora')")
    found = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(_scalar(found)) if found is not None else 0.0  # llama.cpp's default
    stored = {tensor.name: np.array(tensor.data, dtype=np.float32) for tensor in reader.tensors}
    deltas = {}
    for tensor in _plan(model, "f32"):
        pair = (tensor.name + ".lora_a", tensor.name + ".lora_b")
        if not any(name in stored for name in pair):
            continue
        if not all(name in stored for name in pair):
            raise ValueError(f"{path} holds one of {pair[0]} and {pair[1]}, not both")
        lora_a, lora_b = stored.pop(pair[0]), stored.pop(pair[1])
        heads = _rope_heads(tensor.kind, model.config)
        if heads:
            lora_b = _unrope_rows(lora_b, heads)
        scale = alpha / lora_a.shape[0] if alpha else 1.0  # llama.cpp's rule
        deltas[tensor.key] = torch.from_numpy(lora_b @ lora_a) * scale
    if stored:
        raise ValueError(f"{path} adapts tensors this model does not have: "
                         f"{', '.join(sorted(stored)[:3])}")
    return deltas


def _scalar(field):
    """A string or number metadata field's value, read as every gguf version since 0.10 can
    (``ReaderField.contents`` came later)."""
    value = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode()
    return value[0].item()


def _add_deltas(model, deltas: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            parameters[key].add_(delta.to(parameters[key].dtype))


def _vocabulary(tokenizer, vocab_size: int) -> dict:
    """The byte-level BPE tokenizer as llama.cpp's ``tokenizer.ggml.*`` fields."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if bpe.get("type") != "BPE" or pre is None:
        what = bpe.get("type") or type(tokenizer).__name__
        raise ValueError(
            f"cannot write this tokenizer ({what}, pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}) to GGUF: the GGUF export writes "
            f"byte-level BPE tokenizers (GPT-2 style, as SmolLM2's and Llama 3's); export it "
            f"as merged safetensors instead (--format safetensors)")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                         f"{vocab_size}: llama.cpp needs a row for every token; resize the "
                         f"model's embeddings (model.resize_token_embeddings) before exporting")
    count = vocab_size
    tokens: list[str | None] = [None] * count
    types = [gguf.TokenType.NORMAL] * count
    for token, index in bpe["vocab"].items():
        tokens[index] = token
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] \
            else gguf.TokenType.USER_DEFINED
    for index, token in enumerate(tokens):
        if token is None:  # rows of the embedding no token uses
            tokens[index], types[index] = f"[PAD{index}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre,
            "add_bos": len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id,
            "add_eos": len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id}


_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                 "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _pre_tokenizer(spec: dict | None) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level pre-tokenizer; None for one
    it does not know."""
    if not spec:
        return None
    steps = spec["pretokenizers"] if spec["type"] == "Sequence" else [spec]
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") \
            == _LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def _write(path: Path, model, tokenizer, vocab: dict, planned: list[_Planned], precision: str,
           name: str) -> dict:
    """Writes ``model.gguf`` at ``path``; returns the tensor types and tokenizer it wrote."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[precision]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(len(vocab["tokens"]))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    # Declared first, then converted and written one at a time: memory for one tensor, not
    # for a second copy of the model.
    for tensor in planned:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=tensor.qtype)
    state = model.state_dict()
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in planned:
            writer.write_tensor_data(_stored(tensor, state[tensor.key], config))
    finally:
        writer.close()
    return {"tensor_types": dict(Counter(tensor.qtype.name for tensor in planned)),
            "tokenizer": {"model": "gpt2", "pre": vocab["pre"], "tokens": len(vocab["tokens"]),
                          "merges": len(vocab["merges"]), "add_bos": vocab["add_bos"]}}


# -- the check ------------------------------------------------------------------------------------


class _Reloaded:
    """The GGUF as transformers rebuilt it, answering the two calls ``parity.check`` makes of an
    export: the logits of a sequence, and greedy decoding through the KV cache."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def logits(self, ids) -> np.ndarray:
        return self.model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()

    @torch.no_grad()
    def generate(self, prompts_ids, max_new_tokens: int, *, eos_token_ids=(),
                 return_logits: bool = False) -> Generation:
        (ids,) = prompts_ids  # parity.check decodes one context at a time, never stopping
        out = self.model(input_ids=torch.tensor([list(ids)]), use_cache=True)
        tokens, logits = [], []
        for _ in range(max_new_tokens):
            row = out.logits[:, -1].float()
            logits.append(row.numpy())
            tokens.append(int(row[0].argmax()))
            out = self.model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache,
                             use_cache=True)
        return Generation([tokens], 0.0, [], logits if return_logits else None)


def _tokenizer_report(original, reloaded, prompts: list[list[int]]) -> dict:
    """Do both tokenizers encode ``TOKENIZER_TEXTS`` and the decoded parity prompts to the same
    ids, and carry the same chat template and special tokens?"""
    texts = list(TOKENIZER_TEXTS) + [original.decode(p) for p in prompts]
    different = [t for t in texts if list(original(t)["input_ids"]) !=
                 list(reloaded(t)["input_ids"])]
    specials = {name: (getattr(original, name), getattr(reloaded, name))
                for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    wrong = {k: v for k, v in specials.items() if v[0] is not None and v[0] != v[1]}
    template = getattr(original, "chat_template", None) == getattr(reloaded, "chat_template", None)
    return {"texts": len(texts), "identical": len(texts) - len(different),
            "different": different[:3], "special_ids_differ": wrong,
            "chat_template_identical": template,
            "passed": not different and not wrong and template}


def export_gguf(model, tokenizer, out: str | Path, *, quantize: str | None = None,
                overwrite: bool = False, source: dict | None = None, framing=None,
                name: str | None = None, tolerances: parity.Tolerances | None = None,
                top1_floor: float | None = None, source_dirs: tuple = (),
                baked=None, adapter: Adapter | None = None) -> GgufExport:
    """Writes ``model`` (a transformers Llama causal LM) and ``tokenizer`` as ``out/model.gguf``,
    checked by loading it back with transformers, with ``manifest.json`` and a ``Modelfile``.

    Args:
        quantize: None or "f32" (exact), "f16", "q8_0", "q4_1" or "q4_0" (llama.cpp's block
            formats).
        adapter: the bake's LoRA kept beside the base instead of merged: ``model.gguf`` holds
            ``adapter.base``'s weights and ``adapter.gguf`` the factors, a llama.cpp LoRA
            adapter (``llama-cli -m model.gguf --lora adapter.gguf``; the Modelfile's
            ``ADAPTER``); the check then compares ``model`` (the merged bake) with the file
            read back plus the adapter read back. 4-bit rounding then cannot erase the bake.
        framing: the bake's ``Framing``, so the parity contexts are templated as the baked
            model sees them.
        name: the file's ``general.name`` (default: the model's directory name).
        tolerances: steps, contexts and the f32 logit tolerance of the parity check.
        top1_floor: the minimum top-1 agreement of f16, q8_0 and q4_0 (default
            ``TOP1_FLOOR[quantize]``; a randomly initialised model, whose every choice is a
            near-tie, needs a lower one).
        overwrite: replace an earlier export at ``out`` that holds nothing else
            (``files.check_output``); ``source_dirs`` may not be, hold or contain ``out``.
        baked: the ``Baked`` that ``model`` merges: the manifest then records the file's
            held-out KL to the prompted model and the share of the bake it retains
            (``parity.held_out_kl``, on the model read back from the file).

    Raises ``UnsupportedArchitecture`` (a ValueError) before writing anything, and
    ``ParityError`` when the file does not match the model (nothing is left at ``out``).
    """
    precision = quantize or "f32"
    if precision not in GGUF_QUANTIZATIONS:
        hint = " (int8 is the ONNX export's: use --format onnx)" if precision == "int8" else ""
        raise ValueError(f"quantize={quantize!r} for GGUF: choose one of "
                         f"{', '.join(GGUF_QUANTIZATIONS)}{hint}")
    check_supported(model)
    vocab = _vocabulary(tokenizer, model.config.vocab_size)
    written_model = adapter.base if adapter is not None else model
    planned = _plan(written_model, precision)
    adapted = _adapted(planned, adapter.factors) if adapter is not None else None
    out = Path(out)
    files.check_output(out, overwrite=overwrite, kinds=KINDS, sources=tuple(source_dirs))
    tolerances = tolerances or parity.Tolerances(steps=STEPS, contexts=CONTEXTS)
    lossy = precision != "f32"
    if lossy:
        floor = TOP1_FLOOR[precision] if top1_floor is None else top1_floor
        tolerances = dataclasses.replace(tolerances, int8_top1=floor)
    prompts = parity.default_prompts(tokenizer, framing, tolerances.contexts)
    name = name or Path(getattr(model.config, "_name_or_path", "") or "model").name
    model.eval()
    seconds: dict[str, float] = {}
    result: dict = {}

    def write(tmp: Path) -> None:
        start = time.perf_counter()
        written = _write(tmp / FILE, written_model, tokenizer, vocab, planned, precision, name)
        if adapted is not None:
            written["adapter"] = _write_adapter(tmp / ADAPTER_FILE, model.config, adapted, name)
        seconds["write"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        reloaded, reloaded_tokenizer = load(tmp / FILE, adapter=tmp / ADAPTER_FILE
                                            if adapted is not None else None)
        seconds["load"] = round(time.perf_counter() - start, 2)
        words = _tokenizer_report(tokenizer, reloaded_tokenizer, prompts)
        if not words["passed"]:
            raise ParityError(f"the tokenizer transformers reads back from the GGUF export to "
                              f"{out} differs from the original: {words['identical']} of "
                              f"{words['texts']} texts encode to the same ids (first that does "
                              f"not: {(words['different'] or [None])[0]!r}), special ids "
                              f"differing: {words['special_ids_differ'] or 'none'}, chat template "
                              f"identical: {words['chat_template_identical']}. Nothing was "
                              f"written", {"tokenizer": words})
        start = time.perf_counter()
        report = parity.check(model, _Reloaded(reloaded), prompts, quantized=lossy,
                              tolerances=tolerances)
        seconds["parity"] = round(time.perf_counter() - start, 2)
        if not report["passed"]:
            raise ParityError(f"the GGUF export to {out} ({precision}) does not match the torch "
                              f"model: {parity.summary(report)}; criterion: "
                              f"{report['criterion']}. Nothing was written (an earlier export "
                              f"there is unchanged)", report)
        kept = {}
        if baked is not None:
            start = time.perf_counter()
            kept["held_out_kl"] = parity.kl_record(_Reloaded(reloaded), baked, name="gguf")
            seconds["held_out_kl"] = round(time.perf_counter() - start, 2)
        del reloaded
        sizes = {path.name: path.stat().st_size for path in (tmp / FILE, tmp / ADAPTER_FILE)
                 if path.exists()}
        if adapted is not None:
            written["adapter"]["bytes"] = sizes[ADAPTER_FILE]
        manifest = {
            "format": 1, "kind": KIND, "promptbake": versions.promptbake_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "precision": precision, "file": FILE, "bytes": sum(sizes.values()),
            "file_bytes": sizes, "lora": "adapter" if adapted is not None else "merge",
            **written,
            "architecture": {"model_type": model.config.model_type,
                             "layers": model.config.num_hidden_layers,
                             "vocab": model.config.vocab_size,
                             "max_positions": model.config.max_position_embeddings},
            "parity": report, "tokenizer_parity": words, **kept,
            "tolerances": {"steps": tolerances.steps, "contexts": tolerances.contexts,
                           **({"top1_floor": tolerances.int8_top1} if lossy else
                              {"fp32_logit": tolerances.fp32_logit})},
            "source": source,
            "wall_seconds": seconds,
            "versions": versions.libraries("torch", "transformers", "gguf"),
        }
        (tmp / "manifest.json").write_text(files.to_json(manifest, indent=2))
        (tmp / "Modelfile").write_text(_modelfile(tokenizer, adapted is not None))
        result["manifest"] = manifest

    files.replace_dir(out, write, kind=KIND)
    manifest = result["manifest"]
    log.info("exported %s to %s (GGUF %s%s, %.1f MB): %s", model.config.model_type, out / FILE,
             precision, ", the LoRA in " + ADAPTER_FILE if adapted is not None else "",
             manifest["bytes"] / 1e6, parity.summary(manifest["parity"]))
    return GgufExport(out, manifest)


def _modelfile(tokenizer, adapter: bool = False) -> str:
    """An Ollama Modelfile (``ollama create NAME -f Modelfile``): the file, the LoRA adapter if
    there is one, and the end-of-turn token as a stop sequence (the chat template is read from
    the GGUF)."""
    lines = [f"FROM ./{FILE}"] + ([f"ADAPTER ./{ADAPTER_FILE}"] if adapter else [])
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    return "\n".join(lines) + "\n"
