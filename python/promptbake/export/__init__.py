"""Serving a baked model: merge, ONNX export with a KV cache, int8 / int4, packed pruned weights,
GGUF.

* ``merge(baked, strength)`` / ``save_merged(baked, out, strength)``: the LoRA delta merged into
  plain transformers weights (``merging.py``).
* ``export_onnx(model, tokenizer, out)``: one ONNX graph for prefill and cached decode
  (``graph.py``, each size computed once: ``shapes.py``), optionally int8 or int4
  (``quantize.py``; int4's terms beside each MatMul computed per input: ``branches.py``) and
  with pruned weights packed (``sparse.py``), written only after it passed the parity check
  against torch (``parity.py``).
* ``export_gguf(model, tokenizer, out, quantize=..., adapter=...)``: a GGUF file for llama.cpp
  and Ollama (f32, f16, q8_0, q4_1 or q4_0; with ``adapter``, the base in it and the LoRA beside
  it in a llama.cpp adapter file, as ``export_baked`` does for q4_1), written only after
  transformers' GGUF loader read it back and it passed the parity check (``gguf.py``).
* ``export_baked(dir, out, format=..., strength=..., quantize=..., prune=...)``: any of these,
  from a bake's directory (what ``promptbake export`` runs).
* ``OnnxLM(path)``: onnxruntime generation (greedy, sampling, batches) with timings
  (``runtime.py``).
"""

import importlib

FORMATS = ("onnx", "safetensors", "gguf")  # what ``export_baked`` writes
QUANTIZATIONS = ("int8", "int4")  # weight quantizations of the ONNX export
INT4_METHODS = ("hqq", "hqq-int", "rtn", "gptq")  # how int4 chooses its codes (``quantize.Int4Options``)
INT4_LORA = ("merge", "beside")  # int4 of the merged bake, or of the base with the LoRA beside
GGUF_QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_1", "q4_0")  # precisions of the GGUF export
GGUF_LORA = ("merge", "adapter")  # the bake merged into the GGUF, or beside it: adapter.gguf

# Where each public name lives. Loaded on first use: merging needs only torch and peft, while the
# ONNX side needs the optional onnx and onnxruntime packages (pip install "promptbake[onnx]").
_NAMES = {
    "Export": "exporter", "check_quantize": "exporter", "export_baked": "exporter",
    "export_model": "exporter",
    "export_onnx": "exporter", "GgufExport": "gguf", "export_gguf": "gguf",
    "check_gguf_lora": "exporter",
    "model_bytes": "exporter", "SUPPORTED": "graph", "UnsupportedArchitecture": "graph",
    "merge": "merging", "save_merged": "merging", "ParityError": "parity",
    "Tolerances": "parity", "held_out_kl": "parity", "Int8Options": "quantize",
    "Int4Options": "quantize",
    "Generation": "runtime", "OnnxLM": "runtime", "OnnxLoadError": "runtime",
}
__all__ = [
    "FORMATS",
    "GGUF_LORA",
    "GGUF_QUANTIZATIONS",
    "INT4_LORA",
    "INT4_METHODS",
    "QUANTIZATIONS",
    "SUPPORTED",
    "Export",
    "Generation",
    "GgufExport",
    "Int4Options",
    "Int8Options",
    "OnnxLM",
    "OnnxLoadError",
    "ParityError",
    "Tolerances",
    "UnsupportedArchitecture",
    "check_gguf_lora",
    "check_quantize",
    "export_baked",
    "export_gguf",
    "export_model",
    "export_onnx",
    "held_out_kl",
    "merge",
    "model_bytes",
    "save_merged",
]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'promptbake.export' has no attribute {name!r}")
    module = importlib.import_module(f"promptbake.export.{_NAMES[name]}")
    return getattr(module, name)
