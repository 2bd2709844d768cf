"""Writing files: atomic, with the permissions an ordinary open() gives, and whole directories
that replace only what promptbake wrote."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from promptbake import files


@pytest.fixture
def umask():
    """Runs the test under a chosen umask, and restores the process's afterwards."""
    before = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask):
    """safetensors creates its files 0600; what promptbake writes through files.* gets what
    open() would give under the umask, so a serving process of another user can read it."""
    umask(mask)
    want, want_dir = 0o666 & ~mask, 0o777 & ~mask
    tensors = {"x": torch.zeros(2)}
    files.write_with(tmp_path / "a.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    files.write_text(tmp_path / "a.json", "{}")

    def model_dir(tmp):
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir()
        save_file(tensors, str(tmp / "sub" / "inner.safetensors"))

    files.replace_dir(tmp_path / "out", model_dir, kind="merged")
    files.write_into(tmp_path, lambda tmp: save_file(tensors, str(tmp / "adapter.safetensors")))
    assert mode(tmp_path / "a.safetensors") == want and mode(tmp_path / "a.json") == want
    assert mode(tmp_path / "adapter.safetensors") == want
    assert mode(tmp_path / "out") == want_dir and mode(tmp_path / "out" / "sub") == want_dir
    for name in ("model.safetensors", "sub/inner.safetensors", files.MARKER):
        assert mode(tmp_path / "out" / name) == want, name


def test_replace_dir_lists_what_it_wrote(tmp_path):
    files.replace_dir(tmp_path / "out", lambda tmp: (tmp / "a.txt").write_text("a"), kind="onnx")
    assert files.read_marker(tmp_path / "out") == {"kind": "onnx", "files": ["a.txt"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_check_output_rules(tmp_path):
    source = tmp_path / "bake"
    source.mkdir()
    new = tmp_path / "new"
    assert files.check_output(new, overwrite=False, sources=(source,)) == new
    empty = tmp_path / "empty"
    empty.mkdir()
    files.check_output(empty, overwrite=False)  # an empty directory is free to use
    for out, match in ((source, "is inside"), (source / "x", "is inside"),
                       (tmp_path, "contains")):
        with pytest.raises(ValueError, match=match):
            files.check_output(out, overwrite=True, sources=(source,))
    (empty / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files promptbake did not write"):
        files.check_output(empty, overwrite=True)
    export = tmp_path / "export"
    files.replace_dir(export, lambda tmp: (tmp / "model.onnx").write_text("x"), kind="onnx")
    with pytest.raises(ValueError, match="earlier onnx export: pass --overwrite"):
        files.check_output(export, overwrite=False)
    files.check_output(export, overwrite=True)
    with pytest.raises(ValueError, match="holds a bake"):
        (source / files.MARKER).write_text(json.dumps({"kind": "bake", "identity": "x",
                                                      "files": []}))
        (source / "adapter_model.safetensors").write_text("x")
        files.check_output(source, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        files.check_output(tmp_path / "file", overwrite=True)
    (tmp_path / "link").symlink_to(export)
    with pytest.raises(ValueError, match="symbolic link"):
        files.check_output(tmp_path / "link", overwrite=True)


def test_check_writable_names_the_directory(tmp_path):
    files.check_writable(tmp_path / "a" / "b")  # the nearest existing parent is checked
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="is a file"):
        files.check_writable(tmp_path / "file" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # the probe is gone
