"""The code-task sandbox: each way out named in the issue (writing or deleting through a
``dir_fd``, a fifo, an extended attribute, a shell started by ``_posixsubprocess``, a fork loop)
fails and leaves the outside untouched. Each is tried through three layers:

* ``sandbox``: ``run_python`` as callers get it, the jail with the audit hook in it;
* ``jail``: the operating system's part alone (no audit hook), to show it holds by itself;
* ``hook``: the audit hook and limits alone, the opt-in fallback, for what it claims to stop.
"""

import logging
import os
import random
import re
import sys
import tempfile

import pytest
from promptbake.tasks import sandbox

needs_jail = pytest.mark.skipif(not sandbox.namespaces(),
                                reason=f"no namespace jail here: {sandbox.unavailable()}")
ALL = [pytest.param("sandbox", marks=needs_jail), pytest.param("jail", marks=needs_jail),
       "hook"]
JAILED = [pytest.param("sandbox", marks=needs_jail), pytest.param("jail", marks=needs_jail)]


def run(layer: str, code: str, tests: str = "", **limits) -> sandbox.Result:
    if layer == "sandbox":
        return sandbox.run_python(code, tests, **limits)
    limits = {"timeout": sandbox.TIMEOUT, "memory": sandbox.MEMORY_BYTES, **limits}
    return sandbox._run(code, tests, jail=layer == "jail", hook=layer == "hook", **limits)


def listing(folder) -> dict:
    """Every path under folder with its size and mode, to compare before and after a run."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mode) for p in sorted(folder.rglob("*"))}


def processes_with(marker: str) -> list[int]:
    """The host's processes whose command line holds marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture
def outside(tmp_path):
    """A directory of the user's, with a file in it that must survive."""
    (tmp_path / "victim.txt").write_text("keep me")
    return tmp_path


# -- what must keep working ---------------------------------------------------------------------

def test_pass_and_fail():
    code = "def double(x):\n    return 2 * x\n"
    assert sandbox.run_python(code, "assert double(2) == 4\n").passed
    failed = sandbox.run_python(code, "assert double(2) == 5\n")
    assert failed.status == "failed" and "AssertionError" in failed.output
    broken = sandbox.run_python("def double(x:\n", "assert double(2) == 4\n")
    assert broken.status == "failed" and "SyntaxError" in broken.output


@pytest.mark.parametrize("layer", ALL)
def test_python_named_by_a_path_through_dotdot(layer, tmp_path, monkeypatch):
    """``python bench/`` run from bench/ as ../.venv/bin/python: the directory before ".." is
    not in the jail, so the path must be normalised before it goes in."""
    python = os.path.abspath(sys.executable)
    through = str(tmp_path) + "/.." * (len(tmp_path.parts) - 1) + python
    assert os.path.samefile(through, python) and ".." in through
    monkeypatch.setattr(sys, "executable", through)
    assert run(layer, "def double(x):\n    return 2 * x\n", "assert double(2) == 4\n").passed


@pytest.mark.parametrize("layer", ALL)
def test_answer_uses_its_own_directory(layer):
    code = ("import os, shutil, tempfile, asyncio, subprocess\n"
            "os.makedirs('tree/sub')\n"
            "open('tree/sub/a.txt', 'w').write('a')\n"
            "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n"
            "    f.write('b')\n"
            "os.rename(f.name, 'tree/b.txt')\n"
            "assert sorted(os.listdir('tree')) == ['b.txt', 'sub']\n"
            "shutil.rmtree('tree')\n"  # through dir_fd, in this directory
            "open(os.devnull, 'w').write('x')\n")
    result = run(layer, code, "assert not os.path.exists('tree')\n")
    assert result.passed, result.output


@pytest.mark.parametrize("layer", ALL)
def test_writes_land_in_the_runs_directory_which_goes(layer):
    code = ("import os\n"
            "open('inside.txt', 'w').write('ok')\n"
            "print('HERE', os.path.realpath('inside.txt'))\n")
    result = run(layer, code)
    here = re.search(r"HERE (\S+)", result.output).group(1)
    run_directory = os.path.dirname(os.path.dirname(here))
    assert os.path.basename(run_directory).startswith("promptbake-code-")
    assert os.path.dirname(run_directory) == os.path.realpath(tempfile.gettempdir())
    assert not os.path.exists(run_directory)


def test_timeout():
    result = sandbox.run_python("while True:\n    pass\n", "", timeout=1.0)
    assert result.status == "timeout" and not result.passed


def test_memory_limit():
    result = sandbox.run_python("x = bytearray(4 << 30)\n", "", memory=256 << 20)
    assert result.status == "failed" and "MemoryError" in result.output


def test_output_is_cut_to_its_end():
    result = sandbox.run_python("for i in range(20000):\n    print('x' * 999)\nprint('END')\n",
                                "")
    assert result.passed and len(result.output) == sandbox.OUTPUT_CHARS
    assert result.output.endswith("x\nEND\n")


# -- the ways out -------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ALL)
def test_writing_through_dir_fd(layer, outside):
    before = listing(outside)
    code = ("import os\n"
            f"fd = os.open({str(outside)!r}, os.O_RDONLY)\n"
            "os.close(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n")
    result = run(layer, code)
    assert result.status == "failed", result.output
    assert listing(outside) == before


@pytest.mark.parametrize("layer", ALL)
def test_deleting_through_dir_fd(layer, outside):
    before = listing(outside)
    code = ("import os\n"
            f"fd = os.open({str(outside)!r}, os.O_RDONLY)\n"
            "os.unlink('victim.txt', dir_fd=fd)\n")
    result = run(layer, code)
    assert result.status == "failed", result.output
    assert listing(outside) == before and (outside / "victim.txt").read_text() == "keep me"


@pytest.mark.parametrize("layer", ALL)
def test_deleting_through_an_inner_dir_fd_and_a_deeper_directory(layer, outside):
    # The hook judges a relative path from the working directory, which it keeps in place:
    # from there ten ../ reach / ; from twenty levels below it they do not.
    before = listing(outside)
    code = ("import os\n"
            "os.makedirs('a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t')\n"
            "fd = os.open('.', os.O_RDONLY)\n"
            "os.chdir('a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t')\n"
            f"os.unlink({'../' * 10 + str(outside / 'victim.txt')[1:]!r}, dir_fd=fd)\n")
    result = run(layer, code)
    assert result.status == "failed", result.output
    assert listing(outside) == before


@pytest.mark.parametrize("layer", JAILED)  # os.mkfifo raises no audit event
def test_fifo_outside(layer, outside):
    before = listing(outside)
    result = run(layer, f"import os\nos.mkfifo({str(outside / 'fifo')!r})\n")
    assert result.status == "failed", result.output
    assert listing(outside) == before


@pytest.mark.parametrize("layer", ALL)
def test_extended_attribute_outside(layer, outside):
    control = outside / "control.txt"
    control.write_text("")
    try:  # the escape would work here without the sandbox
        os.setxattr(control, "user.probe", b"1")
    except OSError as error:
        pytest.skip(f"{outside} takes no user extended attributes: {error}")
    victim = outside / "victim.txt"
    result = run(layer, f"import os\nos.setxattr({str(victim)!r}, 'user.escaped', b'1')\n")
    assert result.status == "failed", result.output
    assert os.listxattr(victim) == []


@pytest.mark.parametrize("layer", ["sandbox", "hook"])
def test_shell_through_fork_exec_is_refused(layer, outside):
    if layer == "sandbox" and not sandbox.namespaces():
        pytest.skip(f"no namespace jail here: {sandbox.unavailable()}")
    before = listing(outside)
    # Whatever the arguments: _posixsubprocess.fork_exec raises no audit event, the runner
    # replaces it.
    code = "import _posixsubprocess\n_posixsubprocess.fork_exec(*[None] * 22)\n"
    result = run(layer, code)
    assert result.status == "failed" and "starting processes is not allowed" in result.output
    again = ("import sys, importlib.util\n"
             "del sys.modules['_posixsubprocess']\n"
             "import _posixsubprocess\n")
    assert "_posixsubprocess again is not allowed" in run(layer, again).output
    assert listing(outside) == before


@needs_jail
def test_shell_in_the_jail_cannot_write_outside(outside):
    """Without the hook (subprocess runs through _posixsubprocess.fork_exec) the shell starts,
    and finds nothing of the host's to write to."""
    before = listing(outside)
    marker = f"escaped-{random.randrange(1 << 30)}"
    script = (f"echo started; echo x > {outside}/{marker}; echo x > {outside}/victim.txt; "
              f"echo x > /tmp/{marker}; echo x > /{marker}; rm -f {outside}/victim.txt; "
              f"echo x > $HOME/../{marker}; echo done")
    code = f"import subprocess\nsubprocess.run(['/bin/sh', '-c', {script!r}])\n"
    result = run("jail", code)
    assert "started" in result.output and "done" in result.output, result.output
    assert listing(outside) == before
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/{marker}")


@pytest.mark.parametrize("layer", ALL)
def test_fork_loop_is_bounded(layer):
    marker = f"{random.uniform(100, 200):.6f}"  # sleep's argument, to find its processes
    code = ("import subprocess\n"
            "started = []\n"
            "try:\n"
            "    for _ in range(200):\n"
            f"        started.append(subprocess.Popen(['sleep', {marker!r}]))\n"
            "finally:\n"
            "    print('STARTED', len(started))\n")
    if layer != "jail":  # straight to fork_exec, past the audit event of subprocess.Popen
        code = code.replace("subprocess.Popen(", "__import__('_posixsubprocess').fork_exec(")
    result = run(layer, code)
    started = int(re.search(r"STARTED (\d+)", result.output).group(1))
    assert result.status == "failed", result.output
    if layer == "jail":
        # The answer's Python counts, and as an ordinary user so does unshare, in the namespace.
        assert sandbox.PROCESSES - 3 <= started < sandbox.PROCESSES, result.output
        assert "Resource temporarily unavailable" in result.output
    else:
        assert started == 0 and "starting processes is not allowed" in result.output
    assert processes_with(marker) == []  # none is left on the host


@needs_jail
def test_timeout_kills_every_process():
    marker = f"{random.uniform(100, 200):.6f}"
    code = ("import subprocess\n"
            f"subprocess.Popen(['sleep', {marker!r}])\n"
            f"subprocess.Popen(['setsid', 'sleep', {marker!r}])\n"  # out of the process group
            "while True:\n"
            "    pass\n")
    result = run("jail", code, timeout=1.0)
    assert result.status == "timeout"
    assert processes_with(marker) == []


@pytest.mark.parametrize("layer", JAILED)
def test_the_users_files_are_not_there(layer, outside):
    secret = outside / "secret.txt"
    secret.write_text("the user's secret")
    # the checkout the tests run from is the user's too (the installed package, inside Python's
    # prefix, is visible read-only where the package is installed into that prefix)
    paths = [str(secret), str(outside), __file__, "/run", "/var", "/sys",
             f"/proc/1/root{secret}"]
    code = f"import os\nprint('VISIBLE', [p for p in {paths!r} if os.path.exists(p)])\n"
    result = run(layer, code)
    assert result.passed and "VISIBLE []" in result.output, result.output
    assert "the user's secret" not in result.output


@pytest.mark.parametrize("layer", JAILED)
def test_the_directory_is_bounded(layer):
    code = ("import errno\n"
            "written = 0\n"
            "try:\n"
            "    for i in range(100):\n"
            "        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(bytes(8 << 20))\n"
            "        written += 8 << 20\n"
            "except OSError as error:\n"
            "    print('FULL', errno.errorcode[error.errno], written)\n")
    result = run(layer, code)
    full = re.search(r"FULL (\w+) (\d+)", result.output)
    assert full and full.group(1) == "ENOSPC", result.output
    assert int(full.group(2)) < sandbox.DIRECTORY_BYTES


@pytest.mark.parametrize("layer", ALL)
def test_writes_elsewhere_fail(layer, outside):
    marker = f"escaped-{random.randrange(1 << 30)}"
    places = [f"/{marker}", f"/usr/{marker}", f"/etc/{marker}", f"/tmp/{marker}",
              os.path.join(os.path.realpath(os.path.dirname(os.__file__)), marker),
              f"/dev/{marker}", f"{outside}/{marker}"]
    code = ("import os\n"
            "failed = []\n"
            f"for place in {places!r}:\n"
            "    try:\n"
            "        open(place, 'w').close()\n"
            "    except OSError as error:\n"
            "        failed.append(place)\n"
            "print('FAILED', len(failed))\n")
    result = run(layer, code)
    assert f"FAILED {len(places)}" in result.output, result.output
    assert not any(os.path.exists(place) for place in places)


@pytest.mark.parametrize("layer", ["sandbox", "hook"])
def test_sockets_are_refused(layer):
    if layer == "sandbox" and not sandbox.namespaces():
        pytest.skip(f"no namespace jail here: {sandbox.unavailable()}")
    code = ("import socket\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
            "except OSError as err:\n"
            "    print('refused:', err)\n"
            "    raise SystemExit(3)\n")
    result = run(layer, code)
    assert result.status == "failed" and "refused" in result.output


@needs_jail
def test_the_network_is_a_loopback_that_is_down():
    code = ("import errno, socket\n"
            "names = [line.split(':')[0].strip() for line in open('/proc/net/dev')"
            ".read().splitlines()[2:]]\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
            "except OSError as err:\n"
            "    unreachable = err.errno == errno.ENETUNREACH\n")
    result = run("jail", code, "assert names == ['lo'], names\nassert unreachable\n")
    assert result.passed, result.output


@needs_jail
def test_answer_runs_unprivileged():
    # As root, another uid (RLIMIT_NPROC never holds for uid 0); else root of its own user
    # namespace without capabilities.
    uid = sandbox.NOBODY if os.geteuid() == 0 else 0
    code = ("import os\n"
            "status = dict(line.split(':\\t') for line in open('/proc/self/status')"
            ".read().splitlines() if ':\\t' in line)\n")
    tests = ("assert all(int(status[c], 16) == 0 for c in ('CapEff', 'CapPrm', 'CapBnd')), "
             "status\n"
             "assert status['NoNewPrivs'] == '1'\n"
             f"assert os.getuid() == os.getgid() == {uid}, os.getuid()\n")
    result = run("jail", code, tests)
    assert result.passed, result.output


# -- where the jail is unavailable --------------------------------------------------------------

def test_without_namespaces_run_python_refuses_unless_told(monkeypatch, caplog):
    reason = f"no namespaces in this test {random.randrange(1 << 30)}"
    monkeypatch.setattr(sandbox, "unavailable", lambda: reason)
    monkeypatch.delenv("PROMPTBAKE_SANDBOX", raising=False)
    with pytest.raises(sandbox.SandboxUnavailable, match="PROMPTBAKE_SANDBOX=audit-hook") as err:
        sandbox.run_python("x = 1\n", "assert x == 1\n")
    assert reason in str(err.value)
    monkeypatch.setenv("PROMPTBAKE_SANDBOX", "nothing")
    with pytest.raises(ValueError, match="namespaces .* or audit-hook"):
        sandbox.run_python("x = 1\n", "assert x == 1\n")
    monkeypatch.setenv("PROMPTBAKE_SANDBOX", "audit-hook")
    with caplog.at_level(logging.WARNING, logger="promptbake"):
        assert sandbox.run_python("x = 1\n", "assert x == 1\n").passed
        assert sandbox.run_python("x = 2\n", "assert x == 2\n").passed
    warnings = [r for r in caplog.records if "audit hook" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()


@needs_jail
def test_the_fallback_is_not_taken_where_the_jail_works(monkeypatch, outside):
    monkeypatch.setenv("PROMPTBAKE_SANDBOX", "audit-hook")
    victim = outside / "victim.txt"
    result = sandbox.run_python("import os\n", f"assert not os.path.exists({str(victim)!r})\n")
    assert result.passed, result.output


@pytest.mark.parametrize("layer", ALL)
@pytest.mark.parametrize("stop", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                                  "raise SystemExit\n"])
def test_an_answer_that_exits_before_its_tests_fails(layer, stop):
    result = run(layer, "def double(x):\n    return 2 * x\n" + stop, "assert double(2) == 4\n")
    assert result.status == "failed", result
    assert run(layer, "def double(x):\n    return 2 * x\n", "import sys\nsys.exit(0)\n").status \
        == "failed"
