"""What promptbake never does to a user's files: an export never deletes what promptbake did not
write, nor the bake it comes from; a damaged bake is named, not a traceback; bad settings and an
unwritable --out are refused before the long work starts."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from promptbake import _files, cli
from promptbake.bake import BakeConfig, DamagedBake, bake, load_baked, read_manifest
from promptbake.export import export_baked, save_merged
from safetensors.torch import save_file

PROMPT = "You are a pirate captain. Talk like a pirate in every answer."


def tiny_config(**changes) -> BakeConfig:
    base = dict(train_contexts=3, eval_contexts=2, samples_per_context=2, max_new_tokens=6,
                sample_batch=8, batch_size=4, steps=2, lr=2e-2, warmup=0.0)
    return BakeConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def baked_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "pirate"
    bake(PROMPT, model=tiny_dir, config=tiny_config(), out=out)
    return out


def snapshot(path: Path) -> dict:
    """Every file under ``path`` with its sha256: equal snapshots, untouched files."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def bake_copy(baked_dir, tmp_path):
    """A copy of the bake that a test may damage or export into."""
    copy = tmp_path / "bake"
    shutil.copytree(baked_dir, copy)
    return copy


# -- export --overwrite deletes only what promptbake wrote ----------------------------------------


def test_export_overwrite_refuses_a_directory_with_the_users_files(bake_copy, tmp_path):
    out = tmp_path / "served"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="promptbake did not write; refusing"):
        export_baked(bake_copy, out, format="safetensors", overwrite=True)
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_export_overwrite_replaces_only_an_earlier_export(bake_copy, tmp_path):
    out = tmp_path / "served"
    export_baked(bake_copy, out, format="safetensors", strength=0.5)
    marker = _files.read_marker(out)
    assert marker["kind"] == "merged" and "model.safetensors" in marker["files"]
    with pytest.raises(ValueError, match="earlier merged export: pass --overwrite"):
        export_baked(bake_copy, out, format="safetensors")
    done = export_baked(bake_copy, out, format="safetensors", strength=1.0, overwrite=True)
    assert done.manifest["strength"] == 1.0
    # a file of the user's beside an earlier export: the export is not replaced, nothing goes
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"did not write \(notes.txt\) beside an earlier export"):
        export_baked(bake_copy, out, format="safetensors", overwrite=True)
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["the bake", "its parent", "inside it"])
@pytest.mark.parametrize("format", ["safetensors", "onnx"])
def test_export_never_replaces_the_bake_it_comes_from(bake_copy, where, format):
    out = {"the bake": bake_copy, "its parent": bake_copy.parent,
           "inside it": bake_copy / "served"}[where]
    before = snapshot(bake_copy.parent)
    with pytest.raises(ValueError, match="the directory it is made from"):
        export_baked(bake_copy, out, format=format, overwrite=True)
    assert snapshot(bake_copy.parent) == before


def test_export_refuses_to_replace_another_bake(bake_copy, baked_dir):
    before = snapshot(bake_copy)
    with pytest.raises(ValueError, match="holds a bake; refusing"):
        save_merged(baked_dir, bake_copy, overwrite=True)
    assert snapshot(bake_copy) == before


def test_cli_export_onto_the_bake_exits_2_and_keeps_it(bake_copy, capsys):
    before = snapshot(bake_copy)
    assert cli.main(["export", str(bake_copy), "--format", "safetensors", "--out",
                     str(bake_copy), "--overwrite"]) == 2
    assert "the directory it is made from" in capsys.readouterr().err
    assert snapshot(bake_copy) == before


# -- a damaged bake is named, with what to do ----------------------------------------------------


def truncate(path: Path, keep: int = 5) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_truncated_adapter_is_named(bake_copy):
    truncate(bake_copy / "adapter_model.safetensors")
    with pytest.raises(DamagedBake, match=r"adapter_model.safetensors is damaged: 5 bytes"):
        load_baked(bake_copy)


def test_a_changed_adapter_of_the_same_size_is_found_by_its_hash(bake_copy):
    file = bake_copy / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(DamagedBake, match="sha256 differs"):
        load_baked(bake_copy)


def test_a_bake_without_a_file_record_is_checked_by_parsing(bake_copy):
    manifest = json.loads((bake_copy / "manifest.json").read_text())
    del manifest["files"]  # as written by an earlier promptbake
    (bake_copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(bake_copy)["prompt"]["text"] == PROMPT
    truncate(bake_copy / "adapter_model.safetensors", keep=100)
    with pytest.raises(DamagedBake, match="adapter_model.safetensors is damaged"):
        load_baked(bake_copy)
    save_file({"x": __import__("torch").zeros(2)}, str(bake_copy / "adapter_model.safetensors"))
    with pytest.raises(DamagedBake, match="does not fit the base model"):
        load_baked(bake_copy)  # readable, but not this model's adapter


@pytest.mark.parametrize("manifest, match", [
    ({"x": 1}, r"not a promptbake bake's manifest \(format None"),
    ([1, 2], "a JSON object is expected"),
    ({"format": 7}, "format 7, newer than this promptbake reads"),
    ("not json", "not valid JSON"),
])
def test_a_manifest_that_is_not_a_bakes_is_named(bake_copy, manifest, match):
    file = bake_copy / "manifest.json"
    file.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    with pytest.raises(DamagedBake, match=match):
        load_baked(bake_copy)


def test_a_manifest_missing_a_field_names_it(bake_copy):
    manifest = json.loads((bake_copy / "manifest.json").read_text())
    del manifest["base_model"]["path"]
    (bake_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedBake, match="base_model.path is missing"):
        load_baked(bake_copy)


def test_an_unfinished_bake_says_resume(tmp_path):
    out = tmp_path / "unfinished"  # as a bake killed before its end leaves it
    out.mkdir()
    (out / _files.MARKER).write_text(json.dumps({"kind": "bake", "identity": "x",
                                                 "status": "running", "files": []}))
    with pytest.raises(DamagedBake, match="did not finish.*--resume"):
        load_baked(out)


@pytest.mark.parametrize("command", [
    ["chat", "{dir}", "--question", "hi"],
    ["kl", "{dir}"],
    ["evaluate", "{dir}", "--tasks", "sentiment", "--limit", "2"],
    ["report", "{dir}", "--tasks", "none"],
    ["export", "{dir}", "--out", "{tmp}/out"],
    ["drift", "{dir}", "--persona", "pirate", "--turns", "1"],
    ["pursue", "{dir}", "--out", "{tmp}/pursued"],
])
@pytest.mark.parametrize("damage", ["truncated adapter", "foreign manifest"])
def test_every_command_names_a_damaged_bake_and_exits_2(bake_copy, tmp_path, capsys, command,
                                                       damage):
    if damage == "truncated adapter":
        truncate(bake_copy / "adapter_model.safetensors")
        named = "adapter_model.safetensors is damaged"
    else:
        (bake_copy / "manifest.json").write_text(json.dumps({"x": 1}))
        named = "manifest.json is not a promptbake bake's manifest"
    argv = [a.format(dir=bake_copy, tmp=tmp_path) for a in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# -- bad settings and an unwritable --out, before the long work ----------------------------------


@pytest.mark.parametrize("field", ["lr", "temperature", "alpha", "max_grad_norm", "epochs"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* must be a finite number"):
        BakeConfig(**{field: value}).validate()


def test_cli_refuses_lr_inf_before_making_the_directory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bake", "--prompt", PROMPT, "--model", str(tiny_dir), "--out", str(out),
                     "--lr", "inf", "--quiet"]) == 2
    assert "lr=inf must be a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_strength_must_be_finite(baked_dir):
    with pytest.raises(ValueError, match="strength=inf must be a finite number"):
        load_baked(baked_dir, strength=float("inf"))


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
    check=False).returncode != 0, reason="needs a user and mount namespace for a read-only mount")
def test_a_read_only_out_is_refused_before_loading_the_model(tiny_dir, tmp_path):
    """A read-only mount, as a user meets it (root's privileges ignore permission bits, a
    read-only mount stops everyone)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    script = (f"mount --bind -o ro {readonly} {readonly} && exec {sys.executable} -m "
              f"promptbake.cli bake --prompt 'x y' --model {tiny_dir} --out {readonly}/pirate "
              f"--quiet --contexts no-such-file.txt")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    # named before the contexts file is even read (that would be the next error)
    assert f"cannot write to {readonly} (Read-only file system)" in done.stderr
    assert ".tmp-" not in done.stderr and list(readonly.iterdir()) == []


# -- never loads a pickle, never downloads -------------------------------------------------------


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
    from promptbake import models

    with pytest.raises(models.ModelError, match=r"only as pickle files \(\*\.bin\)"):
        models.load(pickled)


def test_a_bake_never_opens_a_connection(tiny_dir, tmp_path, monkeypatch):
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
    bake(PROMPT, model=tiny_dir, config=tiny_config(), out=out)
    save_merged(load_baked(out), tmp_path / "merged")
    from promptbake import models

    with pytest.raises(models.ModelError, match="model directory not found"):
        models.load("HuggingFaceTB/SmolLM2-135M-Instruct")
