"""Running a model's Python answer against asserts, away from the network and the user's files.

Each run gets a fresh temporary directory (its working directory, HOME and TMPDIR, removed
afterwards) and a new Python in isolated mode (``-I``: no environment variables, no user site,
no script directory on the path) with a minimal environment. Layers, from the kernel up:

* **No network**, when the kernel allows unprivileged user namespaces: the process runs under
  ``unshare --net --map-root-user`` in a network namespace of its own that has only a loopback
  interface which is down, so no connection can leave it. This is enforced by the kernel.
* **Resource limits** (``setrlimit``, set by the child before the answer runs, so no
  ``preexec_fn`` runs in a process that has threads): address space, CPU seconds, size of any
  file written, open files; and a wall-clock **timeout**, after which the whole process group
  is killed.
* **An audit hook** (PEP 578), installed before the answer runs, that refuses to create
  sockets, start processes, load native code through ctypes, or open for writing, remove or
  rename any path outside the temporary directory.

Limits, honestly: the audit hook is not a security boundary (CPython says so: native code can
get around it), and the process runs as the same user, so without the namespace a determined
program could still reach the network, and files outside the temporary directory are protected
only by the hook. This is a guard against model mistakes (a stray ``open('out.txt', 'w')``, an
infinite loop, a runaway allocation, a download), not a jail for hostile code: run untrusted
models' code inside a container or VM as well.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("promptbake")

TIMEOUT = 5.0  # seconds of wall clock per run
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
OUTPUT_CHARS = 2000  # of stdout/stderr kept in the result

# Runs inside the child: installs the audit hook, then executes the answer and the tests, each
# compiled under its own file name so a traceback says which one failed.
_RUNNER = r'''
import os, resource, sys


def _install(cpu, memory, file_size):
    # Limits first; the hook then refuses resource.setrlimit, so the answer cannot lift them.
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))

    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    refused = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty",
               "os.posix_spawn", "os.spawn", "os.kill", "os.killpg", "pty.spawn", "ctypes.",
               "os.startfile", "webbrowser.", "urllib.Request", "http.client.", "ftplib.",
               "smtplib.", "imaplib.", "poplib.", "nntplib.", "telnetlib.",
               "resource.setrlimit", "resource.prlimit")
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
                   "os.symlink": (0, 1), "os.link": (0, 1), "os.truncate": (0,),
                   "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                   "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
                   "shutil.copytree": (1,)}
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(path):
        if isinstance(path, int):  # an already open file descriptor
            return True
        real = realpath(fsdecode(path))
        return real == root or real.startswith(root + sep)

    def guard(event, args):
        if event.startswith(refused) and event != "socket.gethostname":
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in path_events:
            for index in path_events[event]:
                if index < len(args) and args[index] is not None and not inside(args[index]):
                    raise PermissionError(f"sandbox: {event} on {args[index]!r} outside the "
                                          f"working directory")

    sys.addaudithook(guard)


def _sources():
    # Read before the answer runs; each is compiled under its own name, so a traceback says
    # whether the answer or the tests failed.
    out = []
    for name in ("answer.py", "tests.py"):
        with open(name, encoding="utf-8") as f:
            out.append(compile(f.read(), name, "exec"))
    return out


_answer, _tests = _sources()
_install(*(int(a) for a in sys.argv[1:4]))
del _install, _sources, resource
_namespace = {"__name__": "answer", "__builtins__": __builtins__}  # no main blocks
exec(_answer, _namespace)
exec(_tests, _namespace)
'''


@dataclasses.dataclass
class Result:
    """What one run did: ``status`` is passed, failed (an assert or an error), or timeout."""

    status: str
    output: str
    returncode: int | None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace() -> bool:
    """Whether ``unshare --net --map-root-user`` works here (it needs user namespaces)."""
    tool = shutil.which("unshare")
    if tool is None or not sys.platform.startswith("linux"):
        return False
    try:
        done = subprocess.run([tool, "--net", "--map-root-user", "true"], capture_output=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    if done.returncode != 0:
        log.warning("promptbake: cannot run code answers in a network namespace (%s); they "
                    "run with an audit hook that refuses sockets, which native code could "
                    "bypass", done.stderr.decode(errors="replace").strip() or "unshare failed")
    return done.returncode == 0


def run_python(code: str, tests: str, *, timeout: float = TIMEOUT,
               memory: int = MEMORY_BYTES) -> Result:
    """Runs ``code`` and then ``tests`` (asserts) in a sandboxed Python (see the module
    docstring); ``memory`` bounds the address space in bytes."""
    workdir = Path(tempfile.mkdtemp(prefix="promptbake-code-"))
    try:
        (workdir / "answer.py").write_text(code, encoding="utf-8")
        (workdir / "tests.py").write_text(tests, encoding="utf-8")
        (workdir / "runner.py").write_text(_RUNNER, encoding="utf-8")
        command = [sys.executable, "-I", "runner.py", str(int(timeout) + 1), str(memory),
                   str(FILE_BYTES)]
        if network_namespace():
            command = [shutil.which("unshare"), "--net", "--map-root-user"] + command
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the group: any children it started too
            output, _ = process.communicate()
            return Result("timeout", output.decode(errors="replace")[-OUTPUT_CHARS:], None)
        text = output.decode(errors="replace")[-OUTPUT_CHARS:]
        if process.returncode == -signal.SIGXCPU or process.returncode == -signal.SIGKILL:
            return Result("timeout", text, process.returncode)
        return Result("passed" if process.returncode == 0 else "failed", text,
                      process.returncode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(answer: str, entry_point: str | None = None) -> str | None:
    """The code in a model's answer: the first fenced block that defines ``entry_point`` (else
    the first fenced Python block; an unclosed fence runs to the end), or, without fences, the
    text from its first ``def``/``import`` line on. None if there is no code."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    blocks = [(lang, body) for lang, body in blocks if lang in ("", "python", "py", "python3")]
    if blocks:
        if entry_point:
            for _, body in blocks:
                if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.MULTILINE):
                    return body
        return blocks[0][1]
    start = re.search(r"^(def |import |from \w+ import )", answer, re.MULTILINE)
    return answer[start.start():] if start else None
