"""Running a model's Python answer against asserts, in a jail the operating system enforces.

Model output and the ``tests`` field of a user's task file reach this module, so the code it
runs is treated as hostile. Each run gets a fresh temporary directory on the host (removed
afterwards) and a new Python in isolated mode (``-I -B``) with a minimal environment. Layers,
from the kernel up:

* **Namespaces** (util-linux ``unshare``: mount, PID, network and IPC, and a user namespace
  when promptbake runs as an ordinary user). A first Python in them, the same as the answer's,
  builds a new root on a tmpfs, moves into it with ``pivot_root`` and detaches the host's tree:

  - the filesystem holds only what Python needs, bound read-only, nosuid and nodev: /usr and
    the /bin, /lib... beside it, a few files of /etc (the loader's cache, passwd, group, the
    time zone, certificates), Python's prefixes (a venv's included), /dev/null, zero, full,
    random and urandom, and a read-only /proc of its own. The run's directory (its working
    directory, HOME and TMPDIR) is a tmpfs of ``DIRECTORY_BYTES`` where nothing can be
    executed, the only writable place; what the answer writes never reaches the host. Home
    directories, /tmp, /run (with its sockets) and the user's files are not there at all, but
    for Python's own directories where they lie in them;
  - the PID namespace shows only the run's own processes, so it can signal nothing else; when
    its first process ends or is killed, the kernel kills all the others, and ``run_python``
    returns only after that;
  - the network namespace has only a loopback interface, which is down;
  - the IPC namespace has none of the host's SysV IPC objects or POSIX message queues.
* **No privileges.** When promptbake runs as root, the answer runs as uid and gid 65534
  (nobody), not as root of a user namespace: the kernel never applies ``RLIMIT_NPROC`` to real
  uid 0, with capabilities or without, so only another uid bounds a fork loop. As an ordinary
  user, the answer runs as root of its own user namespace (your uid outside) with every
  capability and the bounding set dropped. Both with ``no_new_privs``, so that no executable
  gains rights.
* **Resource limits** (``setrlimit``, per process): ``PROCESSES`` processes or threads, CPU
  seconds, address space, the size of any file written, open files, no core dumps; and a
  wall-clock **timeout**, after which the namespace's first process, and with it every other,
  is killed. Output is read as it comes and only its last ``OUTPUT_CHARS`` characters are kept.
* **An audit hook** (PEP 578), a second layer installed before the answer runs: it refuses
  sockets, starting processes (``_posixsubprocess.fork_exec``, which raises no event, is
  replaced), ctypes, changing limits or the working directory, and writing, removing,
  renaming or setting attributes on a path outside the run's directory (through a ``dir_fd``
  too), or opening a directory outside it.

Where the namespaces cannot be made (not Linux, no ``unshare``, user namespaces disabled, a
container without the right to mount), ``run_python`` raises :class:`SandboxUnavailable`
saying why. Setting ``PROMPTBAKE_SANDBOX=audit-hook`` accepts, on such machines only, running
with the limits and the audit hook alone, logged once as a warning. That mode guards against
model mistakes (a stray ``open('out.txt', 'w')``, an infinite loop, a runaway allocation, a
download), not against hostile code: the hook is no boundary (CPython says so; it never sees
``os.mkfifo``, for one), the answer runs as your user and can read your files, its directory is
on the host's disk, and there is no process limit (it would count all of your processes).

Limits, honestly. The jail shares the kernel with the host: a kernel bug is a way out, and
the answer may still make namespaces of its own where the host allows unprivileged user
namespaces, which exposes more of the kernel (a container or VM, or a seccomp filter, would
narrow that). The limits hold per process, so a run that forks up to its process limit may
hold ``PROCESSES`` times the memory limit at once (a cgroup, which this module does not set
up, would bound the sum). It can read the world-readable files of the trees above, and its
output reaches the caller.
As root, the process limit counts every process of uid 65534 on the machine, so a run that
forks up to it can make another run at the same time fail. Before Linux 5.12 (no
``mount_setattr``) only the top mount of each bound tree is made read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("promptbake")

TIMEOUT = 5.0  # seconds of wall clock per run
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
DIRECTORY_BYTES = 64 << 20  # all the files of a run together, in the jail
PROCESSES = 32  # RLIMIT_NPROC in the jail: the run's processes and threads, its Python's too
OUTPUT_CHARS = 2000  # of stdout/stderr kept in the result
PASSED = 86  # the runner's exit status when the tests ran to their end (see _RUNNER)
NOBODY = 65534  # the uid and gid answers run as when promptbake runs as root

# Runs as the answer's Python, in both modes: sets the limits, installs the audit hook, then
# executes the answer and the tests, each compiled under its own file name so a traceback says
# which one failed.
_RUNNER = r'''
import os, resource, sys


def _install(cpu, memory, file_size, hook):
    # Limits first; the hook then refuses resource.setrlimit, so the answer cannot lift them.
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    if hook != "hook":
        return

    # _posixsubprocess.fork_exec starts processes without an audit event. subprocess and
    # asyncio import the module, so it is loaded now with fork_exec replaced, and loading it
    # afresh is refused below.
    import _posixsubprocess

    def fork_exec(*args):
        raise PermissionError("sandbox: starting processes is not allowed")

    _posixsubprocess.fork_exec = fork_exec

    root = os.path.realpath(os.getcwd())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    refused = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty",
               "os.posix_spawn", "os.spawn", "os.kill", "os.killpg", "pty.spawn", "ctypes.",
               "os.startfile", "webbrowser.", "urllib.Request", "http.client.", "ftplib.",
               "smtplib.", "imaplib.", "poplib.", "nntplib.", "telnetlib.",
               "resource.setrlimit", "resource.prlimit",
               # The events of open and os.open carry no dir_fd: the working directory stays
               # where the hook's root is, so that a relative path is judged from there.
               "os.chdir")
    # event: (index of a path argument, index of the dir_fd it is relative to, or None), ...
    path_events = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
                   "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
                   "os.symlink": ((0, None), (1, 2)), "os.truncate": ((0, None),),
                   "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
                   "os.chflags": ((0, None),), "os.setxattr": ((0, None),),
                   "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
                   "shutil.move": ((0, None), (1, None)), "shutil.copyfile": ((1, None),),
                   "shutil.copytree": ((1, None),), "shutil.chown": ((0, None),)}
    # Bound now: the answer shares the os module and could change its attributes.
    realpath, fsdecode, isabs, isdir, join, readlink, sep, devnull = (
        os.path.realpath, os.fsdecode, os.path.isabs, os.path.isdir, os.path.join, os.readlink,
        os.sep, os.devnull)

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # an already open file descriptor
            return True
        path = fsdecode(path)
        if dir_fd not in (None, -1) and not isabs(path):  # -1: the event's "no dir_fd"
            try:
                path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
            except OSError:
                return False
        real = realpath(path)
        return real == root or real.startswith(root + sep)

    def guard(event, args):
        if event.startswith(refused) and event != "socket.gethostname":
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] == "_posixsubprocess":
            raise PermissionError("sandbox: loading _posixsubprocess again is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writing and path != devnull and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
            # Nor may a descriptor of a directory outside be had, to be a dir_fd.
            if not writing and isdir(path) and not inside(path):
                raise PermissionError(f"sandbox: opening the directory {path!r} outside the "
                                      f"working directory")
        elif event in path_events:
            for index, fd_index in path_events[event]:
                if index >= len(args) or args[index] is None:
                    continue
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                if not inside(args[index], dir_fd):
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
_install(*(int(a) for a in sys.argv[1:4]), sys.argv[4])
del _install, _sources, resource
_namespace = {"__name__": "answer", "__builtins__": __builtins__}  # no main blocks
try:
    exec(_answer, _namespace)
    exec(_tests, _namespace)
except SystemExit as stop:  # sys.exit(0) in an answer must not count as its tests passing
    sys.stdout.flush()
    print(f"the answer or its tests exited ({stop.code!r}) before the tests finished",
          file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
os._exit(86)  # PASSED: reached when every test ran. A hostile answer could exit with it too:
# the jail protects the machine from the answer, not the score from an answer that cheats.
'''

# Runs as root of the new namespaces (pid 1 of the PID namespace), the same Python as the
# answer's but without site (-S): builds the new root, drops privileges, then executes the
# runner in its place. Its one argument, in JSON: "user", the uid to become, or "capabilities"
# to drop those instead; "processes", the process limit; "home", the run's directory on the
# host, and "size", the bytes it holds in the jail; "root", an empty directory to mount the new
# root on; "python", the directories Python needs; "runner", the runner's command line.
_JAIL = r'''
import ctypes, errno, json, os, resource, signal, sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2
# MOUNT_ATTR_RDONLY, _NOSUID, _NODEV, _NOEXEC are the same bits as MS_RDONLY ... MS_NOEXEC
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_SETATTR = 442  # one number on every architecture: added after the tables were unified
PIVOT_ROOT = {"x86_64": 155, "i386": 217, "i686": 217,  # asm-generic's for the others
              "aarch64": 41, "riscv64": 41, "loongarch64": 41}.get(os.uname().machine)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
       "nsswitch.conf", "hosts", "ssl", "mime.types", "os-release")
DEVICES = ("null", "zero", "full", "random", "urandom")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def check(result, what):
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"sandbox: {what}: {os.strerror(error)}")


def prctl(option, value):
    return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0),
                      ctypes.c_ulong(0), ctypes.c_ulong(0))


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and os.fsencode(source), os.fsencode(target),
                     fstype and fstype.encode(), ctypes.c_ulong(flags), data and data.encode()),
          f"mount {source or fstype} on {target}")


def restrict(target, attrs, recursive=True):
    attr = (ctypes.c_uint64 * 4)(attrs, 0, 0, 0)  # struct mount_attr: set, clear, ...
    if libc.syscall(ctypes.c_long(MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), os.fsencode(target),
                    ctypes.c_long(AT_RECURSIVE if recursive else 0), attr,
                    ctypes.c_long(ctypes.sizeof(attr))) == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        check(-1, f"mount_setattr {target}")
    # Before Linux 5.12: remount the top mount only, keeping the flags the kernel may have
    # locked (the ST_ bits of statvfs are the MS_ bits for these four).
    kept = os.statvfs(target).f_flag & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount(None, target, None, MS_REMOUNT | MS_BIND | kept | attrs)


def expose(path, root, attrs):
    """Makes the host's path appear at the same place under root: a symlink copied as a
    symlink (usrmerge's /bin -> usr/bin), a directory or file bound with attrs."""
    target = root + path
    if os.path.lexists(target) or not os.path.lexists(path):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
        return
    if os.path.isdir(path):
        os.mkdir(target)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    mount(path, target, None, MS_BIND | MS_REC)
    restrict(target, attrs)


def build(root, workdir, size, python):
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # so that nothing here reaches the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=1m")
    system = list(SYSTEM) + [f"/etc/{name}" for name in ETC]
    for path in system:
        expose(path, root, MS_RDONLY | MS_NOSUID | MS_NODEV)
    covered = [os.path.realpath(path) for path in system if os.path.exists(path)]
    for path in python:
        real = os.path.realpath(path)
        if not any(real == c or real.startswith(c + os.sep) for c in covered):
            for place in (real, os.path.abspath(path)):  # a venv may sit behind a symlink
                expose(place, root, MS_RDONLY | MS_NOSUID | MS_NODEV)
            covered.append(real)
    for name in DEVICES:  # device files work only on a mount without nodev
        expose(f"/dev/{name}", root, MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(f"{root}/proc")
    try:  # a /proc of this PID namespace, mounted before the host's one is gone
        mount("proc", f"{root}/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # a container's /proc with masked files may not be mounted again; Python copes
    # The run's directory: a small tmpfs, so that what the answer writes fills neither the
    # host's disk nor its memory; the answer, the tests and the runner are copied in.
    os.makedirs(root + workdir)
    mount("tmpfs", root + workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"mode=755,size={size},nr_inodes=4096")
    for name in os.listdir(workdir):
        with open(os.path.join(workdir, name), "rb") as f, open(root + workdir + "/" + name,
                                                                 "wb") as copy:
            copy.write(f.read())
    restrict(root, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, recursive=False)


def enter(root):
    # Not chroot: the host's tree would stay in the namespace, and an answer that makes a user
    # namespace of its own may chroot again and climb out.
    if PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"sandbox: pivot_root's number on {os.uname().machine} "
                                    f"is not known here")
    os.chdir(root)
    check(libc.syscall(ctypes.c_long(PIVOT_ROOT), b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the host's root")  # it lay under the new one
    os.chdir("/")


def drop(user, processes, workdir):
    # Set while still privileged; the kernel counts it per user namespace and real uid.
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    cap = 0
    while prctl(PR_CAPBSET_DROP, cap) == 0:  # until EINVAL past the last capability
        cap += 1
    if user == "capabilities":
        header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # 0: this process
        check(libc.capset(header, (ctypes.c_uint32 * 6)()), "drop capabilities")
    else:
        uid = int(user)
        for name in [workdir] + [os.path.join(workdir, f) for f in os.listdir(workdir)]:
            os.chown(name, uid, uid)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    check(prctl(PR_SET_NO_NEW_PRIVS, 1), "set no_new_privs")
    # Changing credentials cleared the parent-death signal unshare --kill-child had set.
    check(prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "set the parent-death signal")


config = json.loads(sys.argv[1])
try:
    os.umask(0o022)
    build(config["root"], config["home"], config["size"], config["python"])
    enter(config["root"])
    os.chdir(config["home"])
    drop(config["user"], config["processes"], config["home"])
except OSError as error:
    sys.stderr.write(f"{error}\n")
    sys.exit(125)
os.execve(config["runner"][0], config["runner"], os.environ)
'''


class SandboxUnavailable(ValueError):
    """The namespace jail cannot run on this machine, and the weaker mode was not accepted."""


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
def unavailable() -> str | None:
    """Why code answers cannot run in the namespace jail here, or None when they can (tested
    once, by a trivial run)."""
    if not sys.platform.startswith("linux"):
        return f"namespaces are Linux's, and this is {sys.platform}"
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not on PATH"
    try:
        result = _run("", "", timeout=10.0, memory=MEMORY_BYTES, jail=True, hook=True)
    except OSError as error:
        return str(error)
    if result.passed:
        return None
    return result.output.strip() or f"a trivial run ended with {result.status}"


def namespaces() -> bool:
    """Whether code answers run in the namespace jail on this machine."""
    return unavailable() is None


@functools.cache
def _warn_hook_only(reason: str) -> None:
    log.warning("promptbake: code answers run with only resource limits and an audit hook, "
                "as PROMPTBAKE_SANDBOX=audit-hook allows, because they cannot run in "
                "namespaces here (%s); that is no boundary against hostile code", reason)


def _use_jail() -> bool:
    """Whether to run in the jail (True) or, where it is unavailable and that was accepted,
    with the audit hook alone (False)."""
    choice = os.environ.get("PROMPTBAKE_SANDBOX", "namespaces")
    if choice not in ("namespaces", "audit-hook"):
        raise ValueError(f"PROMPTBAKE_SANDBOX={choice!r} is not a sandbox mode: use namespaces "
                         f"(the default) or audit-hook")
    reason = unavailable()
    if reason is None:
        return True
    if choice == "audit-hook":
        _warn_hook_only(reason)
        return False
    raise SandboxUnavailable(
        f"cannot run code answers in namespaces here: {reason}. Run promptbake where "
        f"util-linux's unshare can make mount, PID and network namespaces (for an ordinary "
        f"user, with unprivileged user namespaces enabled), or set "
        f"PROMPTBAKE_SANDBOX=audit-hook to run them with resource limits and an audit hook "
        f"only, which stops model mistakes but not hostile code")


def require() -> None:
    """Raises SandboxUnavailable now, before any work, where ``run_python`` would."""
    _use_jail()


def run_python(code: str, tests: str, *, timeout: float = TIMEOUT,
               memory: int = MEMORY_BYTES) -> Result:
    """Runs ``code`` and then ``tests`` (asserts) in a sandboxed Python (see the module
    docstring); ``memory`` bounds the address space in bytes. Raises SandboxUnavailable where
    the namespace jail cannot run and PROMPTBAKE_SANDBOX=audit-hook is not set."""
    return _run(code, tests, timeout=timeout, memory=memory, jail=_use_jail(), hook=True)


def _run(code: str, tests: str, *, timeout: float, memory: int, jail: bool,
         hook: bool) -> Result:
    """One run in the jail or not, with the audit hook or not (tests check each layer alone)."""
    workdir = Path(tempfile.mkdtemp(prefix="promptbake-code-"))
    try:
        home = workdir / "home"  # the answer's working directory; workdir holds the jail's files
        home.mkdir()
        (home / "answer.py").write_text(code, encoding="utf-8")
        (home / "tests.py").write_text(tests, encoding="utf-8")
        (home / "runner.py").write_text(_RUNNER, encoding="utf-8")
        # Its path without "..": inside the jail the directories on the way to ".." are gone
        # (python bench/ run from bench/ as ../.venv/bin/python).
        python = os.path.abspath(sys.executable)
        runner = [python, "-I", "-B", "runner.py", str(int(timeout) + 1), str(memory),
                  str(FILE_BYTES), "hook" if hook else "no-hook"]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        if jail:
            (workdir / "jail.py").write_text(_JAIL, encoding="utf-8")
            (workdir / "root").mkdir()
            command = [shutil.which("unshare") or "unshare", "--mount", "--pid", "--net", "--ipc",
                       "--fork", "--kill-child"]
            if os.geteuid() != 0:
                command[1:1] = ["--user", "--map-root-user"]
            config = {"user": str(NOBODY) if os.geteuid() == 0 else "capabilities",
                      "processes": PROCESSES, "home": str(home), "size": DIRECTORY_BYTES,
                      "root": str(workdir / "root"),
                      "python": _python_paths(python), "runner": runner}
            command += [python, "-I", "-B", "-S", str(workdir / "jail.py"),
                        json.dumps(config)]
        else:
            command = runner
        process = subprocess.Popen(command, cwd=home, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            output, finished = _read(process, timeout)
        finally:
            if process.returncode is None:  # timed out or interrupted
                _kill(process, jail)
            process.stdout.close()
        text = output.decode(errors="replace")[-OUTPUT_CHARS:]
        if not finished:
            return Result("timeout", text, None)
        if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return Result("timeout", text, process.returncode)
        return Result("passed" if process.returncode == PASSED else "failed", text,
                      process.returncode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _python_paths(executable: str) -> list[str]:
    """The directories the answer's Python needs besides the system's: its prefixes (a venv's
    and the installation's) and its ``executable``'s (a normalised path), before and after
    symlinks."""
    return list(dict.fromkeys([sys.prefix, sys.exec_prefix, sys.base_prefix,
                               sys.base_exec_prefix, os.path.dirname(executable),
                               os.path.dirname(os.path.realpath(executable))]))


def _kill(process: subprocess.Popen, jail: bool) -> None:
    """Ends a run that is still going, and everything it started, before returning. In the
    jail, first the PID namespace's first process, unshare's child: the kernel kills every
    other process in the namespace before unshare sees that child end. Then the process group
    (the runner and its children without the jail; anything left otherwise)."""
    if jail:
        try:
            with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
                (child,) = map(int, f.read().split())
            handle = os.pidfd_open(child)  # the pid stays this process's, even if reused
            try:
                with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
                    if str(child) in f.read().split():  # so still unshare's child
                        signal.pidfd_send_signal(handle, signal.SIGKILL)
            finally:
                os.close(handle)
            process.wait(timeout=5.0)
            return
        except (OSError, ValueError, AttributeError, subprocess.TimeoutExpired):
            pass  # no child yet, or no pidfd (Linux before 5.3): the group alone
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _read(process: subprocess.Popen, timeout: float) -> tuple[bytes, bool]:
    """The last bytes the process wrote, and whether it ended within ``timeout`` seconds.
    Reading as it comes keeps a flood of output from filling the host's memory."""
    deadline = time.monotonic() + timeout
    keep = 4 * OUTPUT_CHARS  # bytes: OUTPUT_CHARS characters of UTF-8 at most
    tail = bytearray()
    fd = process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # every writer has closed the pipe
                try:
                    process.wait(max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    return bytes(tail), False
                return bytes(tail), True
            tail += chunk
            del tail[:-keep]
    return bytes(tail), False


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
