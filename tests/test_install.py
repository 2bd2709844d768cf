"""The package builds into a wheel with the compiled module and the Triton kernels, and installs
as pure Python (torch backend) where no C++ compiler works."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(),
                                reason="needs the source tree")


def build_wheel(tmp_path, **env):
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(out),
           f"--config-settings=build-dir={tmp_path / 'build'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env},
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def test_wheel_holds_the_compiled_module_and_kernels(tmp_path):
    names = zipfile.ZipFile(build_wheel(tmp_path)).namelist()
    assert any(n.startswith("promptbake/_C.") and n.endswith((".so", ".pyd")) for n in names)
    assert "promptbake/kernels/divergence.py" in names
    assert "promptbake/ops/divergence.py" in names


def test_without_a_compiler_installs_pure_python(tmp_path):
    wheel = build_wheel(tmp_path, CMAKE_ARGS="-DCMAKE_CXX_COMPILER=/bin/false")
    assert wheel.name.endswith("-py3-none-any.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    # A developer's editable install would shadow the wheel: drop its import hook first.
    probe = ("import sys; sys.meta_path = [f for f in sys.meta_path "
             "if 'editable' not in type(f).__module__]; "
             "import torch, promptbake; b = promptbake.backends(); "
             "print(b['cpp'].available, float(promptbake.divergence(torch.zeros(2, 5), "
             "torch.zeros(2, 5))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0.0"]
    assert "compiled kernels unavailable" in done.stderr  # the one-line notice


def test_the_public_api_is_where_the_readme_says():
    import promptbake
    from promptbake import cli, export

    for name in ("bake", "load_baked", "BakeConfig", "Baked", "divergence", "DivergenceLoss",
                 "pursue", "sequential", "backends"):
        assert callable(getattr(promptbake, name)), name
    assert callable(cli.main) and callable(export.export_baked) and callable(export.merge)
    assert promptbake.BakeConfig().loss == "forward_kl"


def test_the_repository_root_holds_no_importable_package():
    # `python -m pytest` (the README's test command) and `python bench/` run with the repository
    # root first on sys.path: a package there hides an installed one of the same name. A top-level
    # kernels/ hid Hugging Face's `kernels`, and transformers then failed to import.
    root = Path(__file__).resolve().parents[1]
    packages = sorted(p.parent.name for p in root.glob("*/__init__.py"))
    assert packages == [], f"move {packages} under python/promptbake/"
