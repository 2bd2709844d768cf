"""The package builds into a wheel with the compiled module and the Triton kernels; the wheel
installs and runs in a fresh environment with no compiler; and the package installs as pure
Python (torch backend) where no C++ compiler works."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp("compiled"))


def test_wheel_holds_the_compiled_module_and_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("promptbake/_C.") and n.endswith((".so", ".pyd")) for n in names)
    assert "promptbake/kernels/divergence.py" in names
    assert "promptbake/ops/divergence.py" in names


def test_the_wheel_runs_in_a_fresh_environment_without_a_compiler(wheel, tmp_path):
    # A fresh virtual environment; the wheel is installed into it with pip. Its dependencies
    # (torch, transformers, ...) are this environment's, reached through a path file rather than
    # installed again, so nothing is downloaded; promptbake itself comes from the wheel only.
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(fresh)
    python = fresh / "bin" / "python"
    paths = subprocess.run([python, "-c", "import sysconfig; p = sysconfig.get_paths(); "
                            "print(p['purelib']); print(p['platlib'])"],
                           capture_output=True, text=True, check=True).stdout.split()
    fresh_libs = [Path(p).resolve() for p in paths]
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (fresh_libs[0] / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    # --ignore-installed: this environment's promptbake is visible through the path file
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    path = str(fresh / "bin")  # no gcc, cc, c++, clang or cmake on it
    assert not [c for c in ("gcc", "g++", "cc", "c++", "clang", "cmake")
                if shutil.which(c, path=path)]
    env = {"PATH": path, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    probe = ("import promptbake, promptbake._C as c; "
             "print(promptbake.__file__); print(c.__file__)")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    package, compiled = (Path(line).resolve() for line in done.stdout.split())
    assert any(package.is_relative_to(lib) for lib in fresh_libs), package
    assert any(compiled.is_relative_to(lib) for lib in fresh_libs), compiled
    done = subprocess.run([fresh / "bin" / "promptbake", "backends"], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()}
    assert rows["cpp"] == "available" and rows["torch"] == "available", done.stdout
    assert "compiled kernels unavailable" not in done.stderr


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
