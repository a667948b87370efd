"""A spare app process, so that a redeploy's new release starts warm.

Most of an app process's start is importing its libraries (Flask alone takes
about 0.1 s, Django more), and most redeploys keep their virtualenv. So once
a release runs, its supervisor starts a spare: a process of the live
release's virtualenv python, with its environment and the env's sockets,
that imports what the live app imported from that virtualenv (up to the
first module that cannot be imported without the app itself) and waits. A
release that needs exactly that (the same python, the same environment but
for QABOX_RELEASE, the same sockets) is handed to the spare: it is sent the
release's spec and goes on from there as a fresh process would. Anything
else ends the spare, and a process is started as always. A spare never
imports a release's own code before it is handed one, and a release that
provides a module the spare imported starts afresh (an exec: the same pid
and sockets). It costs one idle app process's memory: ``spare_app = false`` in
the hosts file turns it off.
"""

import importlib
import importlib.machinery
import json
import os
import select
import signal
import sys

from .files import read_json, write_json
from .sockets import probe_listener

MODULES_FILE = "qabox-modules.json"  # in a virtualenv: what its last app imported from it
RELEASE_KEYS = ("QABOX_RELEASE",)  # the environment a spare is given with its release


def remember_modules() -> None:
    """Record in the virtualenv which of its modules this app process imported
    (called once its server and app are loaded): the next spare imports them."""
    prefix = os.path.join(sys.prefix, "")
    names = [name for name, module in list(sys.modules.items())
             if (getattr(module, "__file__", None) or "").startswith(prefix)]
    path = os.path.join(sys.prefix, MODULES_FILE)
    if names and read_json(path) != names:
        try:
            write_json(path, names)
        except OSError:
            pass  # a full or read-only disk: the next release starts cold


def modules_file(python: str) -> str:
    """Where apps of a virtualenv's python record their modules."""
    return os.path.join(os.path.dirname(os.path.dirname(python)), MODULES_FILE)


def handed_path(ctl_dir: str, pid: int) -> str:
    """Where a spare handed a release keeps its spec: its command line still
    shows the spare's, and a new supervisor must find the app (control.env_apps)."""
    return os.path.join(ctl_dir, "app-%d.json" % pid)


def die_with_parent(on: bool) -> None:
    """While a spare, die with the supervisor (Linux's PR_SET_PDEATHSIG), even in
    an import that hangs: it holds copies of the env's sockets. Not once it is
    the app, which outlives its supervisor for the next one to adopt."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL if on else 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass  # no ctypes or no prctl: a spare whose supervisor died exits at its stdin's end


def wait_to_serve(spare_spec: dict) -> dict:
    """The spare's side: import the virtualenv's recorded modules, say so on
    its ready pipe, wait for a release on stdin (its end: exit), then become that
    release's app process (its directory, environment and log, stdin from
    /dev/null) and return its spec."""
    parent = os.getppid()
    die_with_parent(True)
    if os.getppid() != parent:
        os._exit(0)  # the supervisor died before that took effect
    handed = handed_path(spare_spec["ctl_dir"], os.getpid())
    if os.path.lexists(handed):
        os.unlink(handed)  # an earlier process's with this pid
    names = read_json(os.path.join(sys.prefix, MODULES_FILE), [])
    for name in names:
        before = set(sys.modules)
        try:
            importlib.import_module(name)
        except BaseException:  # it needs the app (Django's models need its settings): the rest is the app's
            for added in set(sys.modules) - before:
                del sys.modules[added]  # as if never tried: the app imports it afresh
            break
    try:
        os.write(spare_spec["ready_fd"], b"1")  # only now may it be handed a release (Spare.ready)
        os.close(spare_spec["ready_fd"])
    except OSError:  # its supervisor is gone
        os._exit(0)
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)
    die_with_parent(False)
    given = json.loads(line.decode())
    spec = given["spec"]
    os.environ.update(given["environ"])
    os.chdir(spec["release_dir"])
    log = os.open(given["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, onto in ((null, 0), (log, 1), (log, 2)):
        os.dup2(fd, onto)
    os.close(null)
    os.close(log)
    if not shadowed(spec["release_dir"], names):  # else a fresh process would import the release's own
        try:
            write_json(handed, spec)
            return spec
        except OSError:  # a full disk: unrecorded, a new supervisor would not find this app (env_apps)
            pass
    os.execv(sys.executable, [sys.executable, sys.argv[0], "serve", json.dumps(spec)])


def shadowed(release_dir: str, names: list) -> list:
    """The top-level modules among ``names`` that the release provides itself."""
    suffixes = [""] + importlib.machinery.all_suffixes()
    tops = sorted({name.partition(".")[0] for name in names})
    return [top for top in tops if any(os.path.exists(os.path.join(release_dir, top + s)) for s in suffixes)]


class Spare:
    """The supervisor's side: a spare's process and what it was started with."""

    def __init__(self, proc, python: str, environ: dict, spec: dict, probe_port: int, ready: int):
        self.proc, self.python, self.environ, self.sockets = proc, python, environ, dict(spec["sockets"])
        self.probe_fd, self.probe_port = spec["probe_fd"], probe_port
        self.release = os.path.basename(spec["release_dir"])  # the live one's when it started
        self.ready_fd, self.is_ready = ready, False  # a pipe: a byte once its imports are done

    @classmethod
    def start(cls, archive: str, python: str, spec: dict, environ: dict, cwd: str) -> "Spare":
        """Start a spare that would serve ``spec``'s sockets with ``environ``
        (``spec`` is the live release's)."""
        import subprocess

        probe = probe_listener()
        probe_port = probe.getsockname()[1]
        ready, readied = os.pipe()
        try:
            spec = dict(spec, probe_fd=probe.fileno(), ready_fd=readied, spare=True)
            proc = subprocess.Popen(
                [python, archive, "serve", json.dumps(spec)], cwd=cwd, env=environ,
                pass_fds=list(spec["sockets"].values()) + [probe.fileno(), readied], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            os.close(ready)
            raise
        finally:
            probe.close()
            os.close(readied)
        return cls(proc, python, environ, spec, probe_port, ready)

    def fits(self, python: str, spec: dict, environ: dict) -> bool:
        """Whether a process started for ``spec`` with ``environ`` would be this spare."""
        def fixed(env):
            return {k: v for k, v in env.items() if k not in RELEASE_KEYS}
        return self.proc.poll() is None and python == self.python and spec["sockets"] == self.sockets \
            and fixed(environ) == fixed(self.environ)

    def ready(self) -> bool:
        """Whether it has imported all it was to (a spare still at it, or stuck in
        an import, is no faster or no surer than a fresh process)."""
        if not self.is_ready and self.ready_fd is not None and select.select([self.ready_fd], [], [], 0)[0]:
            self.is_ready = os.read(self.ready_fd, 1) == b"1"  # b"": it ended
        return self.is_ready

    def hand(self, spec: dict, environ: dict, log: str):
        """Have it serve a release (``spec``, as it fits): its process, now the release's app."""
        spec = dict(spec, probe_fd=self.probe_fd)
        given = {"spec": spec, "environ": {k: environ[k] for k in RELEASE_KEYS if k in environ}, "log": log}
        self.proc.stdin.write(json.dumps(given).encode() + b"\n")
        self.proc.stdin.flush()  # raises if it died meanwhile
        self.close_pipes()
        return self.proc

    def close_pipes(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    def end(self) -> None:
        """Kill it: it has served nothing, and holds only copies of the env's sockets.
        One that ended already (its pid may be another's by now) is only let go of."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.close_pipes()
        self.proc.wait()
