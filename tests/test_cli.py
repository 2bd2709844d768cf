import subprocess
import sys

from promptbake import cli


def test_backends_lists_all_three(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["cpp", "triton", "torch"]


def test_help_and_version_from_the_installed_command():
    done = subprocess.run([sys.executable, "-m", "promptbake.cli", "--help"], capture_output=True,
                          text=True, check=True)
    assert "backends" in done.stdout
    done = subprocess.run([sys.executable, "-m", "promptbake.cli", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("promptbake ")
