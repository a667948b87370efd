"""One-off processes of a release: ``qabox run``'s commands and release hooks.

Both run in a release's directory with what the app runs with (appenv: the
venv first on PATH, the env's environment, ``QABOX_DATA_DIR``), in a process
group of their own, exec'd from an argument list: never through a shell.

``run`` speaks the agent's JSON lines both ways, so that binary output and
a terminal's bytes arrive exactly as written:

- qabox sends the request line ``{"cmd": "run", "args": {"env", "argv": [...],
  "tty": {"rows", "cols", "term"} or null}}``, then, while the command runs,
  ``{"in": BASE64}`` (its stdin), ``{"eof": 1}`` (stdin ended),
  ``{"resize": [rows, cols]}`` and heartbeats ``{}``;
- the agent answers ``{"started": {"release": R}}`` once the command runs
  (qabox sends its stdin from then on), ``{"out": BASE64}`` and ``{"err": BASE64}`` (with a tty,
  the terminal's output, all as ``out``), ``{"hb": 1}`` after 5 s of silence,
  then the result ``{"ok": true, "data": {"exit": N, "release": R}}``, N the
  command's exit status (128 + the signal that ended it), or a refusal
  ``{"ok": false, ...}`` when it cannot start (nothing deployed, no such command).

With ``tty`` the agent makes the pty (``pty.openpty()``; the command gets it as
its controlling terminal, so Ctrl-C, sent as a byte, interrupts it as on any
terminal): no pty is asked of sshd, and the channel stays the agent's JSON.
When qabox goes away, the command's process group is ended.
"""

import base64
import collections
import fcntl
import json
import os
import select
import struct
import subprocess
import termios
import threading
import time

from .appenv import app_environ
from .envs import existing_env
from .files import LOG_TAIL
from .procs import stop_group
from .protocol import Fail
from .rules import hook_argv

HEARTBEAT = 5.0
HOOK_STOP_TIMEOUT = 5.0


def hooks_left(env) -> str:
    """What a deploy failing once its hooks ran leaves: not "nothing changed", since
    a hook (a migration) may have changed the env's data before it failed."""
    live = env.current()
    serving = "release %s keeps serving" % live if live else "nothing was deployed"
    return "the new release was removed and %s, on the env's data as the release hooks left it; " \
           "fix it and deploy again" % serving


def spawn(env, release: str, info: dict, cwd: str, argv: list, what: str, extra: "dict | None" = None,
          **popen) -> subprocess.Popen:
    """Start ``argv`` in ``cwd`` as a process of the release, in its own process group,
    with the app's environment (and ``extra``)."""
    environ = app_environ(env, release, info)
    environ.update(extra or {})
    try:
        return subprocess.Popen(argv, cwd=cwd, env=environ, start_new_session=True, **popen)
    except (FileNotFoundError, PermissionError) as e:
        raise Fail("no_command", "%s: cannot run %s (%s) in release %s: name a command of the release's "
                   "virtualenv or the host's PATH" % (
                       what, argv[0], "not found" if isinstance(e, FileNotFoundError) else "not executable",
                       release))


def pump(proc: subprocess.Popen, fds: dict, on_output, io, deadline: float = float("inf")) -> bool:
    """Pass what the process writes on ``fds`` ({fd: kind}) to ``on_output(kind, bytes)``
    until they end and the process has exited; False if ``deadline`` came first (the
    group is then ended). A client gone away ends the group too, and is a Fail."""
    fds = dict(fds)
    said = time.monotonic()
    while fds or proc.poll() is None:
        if io.gone.is_set() or time.monotonic() > deadline:
            stop_group(proc.pid, HOOK_STOP_TIMEOUT)
            proc.wait()
            io.check()
            return False
        ready, _, _ = select.select(list(fds), [], [], 0.2)
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: a pty whose every other end is closed
                data = b""
            if data:
                on_output(fds[fd], data)
                said = time.monotonic()
            else:
                del fds[fd]
        if time.monotonic() - said > HEARTBEAT:  # lets qabox tell a quiet command from a dead link
            io.emit({"hb": 1})
            said = time.monotonic()
    return True


def exit_status(proc: subprocess.Popen) -> int:
    """The exit status as a shell gives it: 128 + N for a process ended by signal N."""
    return 128 - proc.returncode if proc.returncode < 0 else proc.returncode


def current_release(env, then: str = "run commands in it") -> tuple:
    """The env's current release and its release.json, or a Fail saying nothing is deployed."""
    release = env.current()
    if release is None:
        raise Fail("no_release", "nothing is deployed to env %s: deploy a build first, then %s"
                   % (env.name, then))
    return release, env.release_info(release, strict=True)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def take_terminal() -> None:
    """In the child, after setsid: make its stdin, the pty, its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def cmd_run(req, io) -> dict:
    """Run a command in the env's current release, its bytes to and from qabox (see above)."""
    argv = req["argv"]
    if not argv or not all(isinstance(a, str) for a in argv):
        raise Fail("bad_request", "run needs a command: a list of strings")
    env = existing_env(req["base"], req["env"])
    release, info = current_release(env)
    cwd = env.release_dir(release)
    tty = req.get("tty")
    if tty:
        import pty

        master, slave = pty.openpty()
        set_size(slave, tty["rows"], tty["cols"])
        proc = spawn(env, release, info, cwd, argv, "run", {"TERM": tty.get("term") or "xterm"},
                     stdin=slave, stdout=slave, stderr=slave, preexec_fn=take_terminal)
        os.close(slave)
        fds, stdin_fd = {master: "out"}, master
    else:
        proc = spawn(env, release, info, cwd, argv, "run", None, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        fds, stdin_fd = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}, proc.stdin.fileno()
    io.emit({"started": {"release": release}})
    threading.Thread(target=feed, args=(io, stdin_fd, bool(tty)), daemon=True).start()
    pump(proc, fds, lambda kind, data: io.emit({kind: base64.b64encode(data).decode("ascii")}), io)
    return {"exit": exit_status(proc), "release": release}


def feed(io, fd: int, tty: bool) -> None:
    """qabox's messages to the running command: its stdin, its end, the terminal's size."""
    writing = True
    while True:
        line = io.next_request()
        if line is None:
            return
        try:
            message = json.loads(line)
            if "in" in message and writing:
                data = base64.b64decode(message["in"])
                while data:
                    data = data[os.write(fd, data):]
            elif "eof" in message and not tty:
                os.close(fd)
                writing = False
            elif "resize" in message and tty:
                set_size(fd, *message["resize"])
        except (OSError, ValueError, TypeError):
            writing = False  # the command closed its stdin or exited: the rest of it is dropped


def run_release_hooks(env, release: str, info: dict, io) -> None:
    """Run the release's hooks (release.json) in order, in its directory, before it
    starts; their output goes to the release's log. A hook that fails or outlasts
    ``release_timeout`` (all hooks together) is a Fail with its last lines."""
    hooks = info.get("release_hooks") or []
    deadline = time.monotonic() + float(info["release_timeout"])
    log_path = env.path("logs", release + ".log")
    for hook in hooks:
        io.emit({"progress": "running release hook: %s" % hook})
        last = collections.deque(maxlen=LOG_TAIL)
        partial = [b""]
        with open(log_path, "ab") as log:
            log.write(("--- release hook: %s ---\n" % hook).encode())
            log.flush()

            def output(kind, data):
                log.write(data)
                log.flush()
                lines = (partial[0] + data).split(b"\n")
                partial[0] = lines.pop()
                last.extend(line.decode("utf-8", "replace") for line in lines)

            proc = spawn(env, release, info, env.release_dir(release), hook_argv(hook),
                         "release hook `%s`" % hook, None, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                finished = pump(proc, {proc.stdout.fileno(): "out"}, output, io, deadline)
            finally:
                proc.stdout.close()
        if partial[0]:
            last.append(partial[0].decode("utf-8", "replace"))
        if not finished:
            raise Fail("hook_timeout", "release hook `%s` did not finish within release_timeout (%g s) "
                       "and was stopped: %s" % (hook, info["release_timeout"], hooks_left(env)), log=list(last))
        if proc.returncode != 0:
            raise Fail("hook_failed", "release hook `%s` failed (exit status %d): %s"
                       % (hook, exit_status(proc), hooks_left(env)),
                       log=list(last))
