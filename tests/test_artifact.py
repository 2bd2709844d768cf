"""A bake on disk: a damaged directory is named with what to do, never a traceback; settings
read back from the manifest; checkpoints hold no pickle."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from promptbake import files
from promptbake.artifact import DamagedBake, load_baked, read_manifest


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


def test_a_bake_without_a_file_record_is_checked_by_parsing(bake_copy, prompt):
    manifest = json.loads((bake_copy / "manifest.json").read_text())
    del manifest["files"]  # as written by an earlier promptbake
    (bake_copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(bake_copy)["prompt"]["text"] == prompt
    truncate(bake_copy / "adapter_model.safetensors", keep=100)
    with pytest.raises(DamagedBake, match="adapter_model.safetensors is damaged"):
        load_baked(bake_copy)
    save_file({"x": torch.zeros(2)}, str(bake_copy / "adapter_model.safetensors"))
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
    (out / files.MARKER).write_text(json.dumps({"kind": "bake", "identity": "x",
                                                 "status": "running", "files": []}))
    with pytest.raises(DamagedBake, match="did not finish.*--resume"):
        load_baked(out)


def test_strength_must_be_finite(small_bake):
    with pytest.raises(ValueError, match="strength=inf must be a finite number"):
        load_baked(small_bake, strength=float("inf"))


def test_a_marker_naming_files_elsewhere_deletes_nothing(tiny_dir, tmp_path, prompt):
    """A marker is only trusted for names inside its own directory: ``--overwrite`` on a
    directory whose marker lists ``../victim`` removes nothing and says why."""
    from promptbake import BakeConfig, bake

    victim = tmp_path / "victim"
    victim.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / files.MARKER).write_text(json.dumps({"kind": "bake", "identity": "x",
                                                "files": ["../victim", "/etc/hostname"]}))
    with pytest.raises(ValueError, match="not files of that directory"):
        bake(prompt, model=tiny_dir, out=out, overwrite=True,
             config=BakeConfig(train_contexts=2, eval_contexts=2, steps=1, max_new_tokens=4))
    assert victim.read_text() == "mine"
    with pytest.raises(ValueError, match="not files of that directory"):
        files.check_output(out, overwrite=True, kinds=("bake",))


def test_a_files_record_that_is_not_an_object_is_named(bake_copy):
    manifest = json.loads((bake_copy / "manifest.json").read_text())
    manifest["files"] = ["adapter_model.safetensors"]
    (bake_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedBake, match="files is not an object"):
        load_baked(bake_copy)
