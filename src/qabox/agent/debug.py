"""``qabox debug``: the env's current release under Werkzeug's debugger, for the
deploy account alone, for as long as its command runs.

The debugger is a remote shell for whoever has its PIN, so it never runs in
the app the supervisor serves (``serve.load_app`` strips it there): the agent
starts a process of its own (``agent.pyz debug-serve SPEC`` with the release's
venv python and environment) on a second loopback port that the kernel picks
(never the app's port or a tester's: those are bound), unsupervised, not in
``status``. Testers' keys cannot reach it: their ``permitopen`` names their own
ports only. The PIN is made here, handed over in ``WERKZEUG_DEBUG_PIN`` (never
argv, never a log) and sent to qabox alone.

The exchange, in the agent's JSON lines (as ``run``'s):

- qabox sends ``{"cmd": "debug", "args": {"env"}}``, then heartbeats ``{}``,
  and ``{"stop": 1}`` to end it;
- the agent answers ``{"progress": ...}``, ``{"debugging": {"release", "port",
  "pin"}}`` once the debugger serves, the process's output as ``{"out": BASE64}``
  and ``{"err": BASE64}``, ``{"hb": 1}`` after 5 s of silence, then the result
  ``{"ok": true, "data": {"release", "port", "stopped": true}}`` once it stopped
  the process; a refusal (nothing deployed) or a Fail when the process ended
  by itself.

The process ends with its command: on ``stop``, when qabox goes away (EOF or
silence: the group is ended), and when this agent dies (the process watches a
socket whose other end only this agent holds, and ends its group at its EOF).
"""

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import threading

from . import agents
from .appenv import venv_python
from .envs import existing_env
from .oneoff import HOOK_STOP_TIMEOUT, current_release, exit_status, pump, spawn
from .procs import stop_group
from .protocol import Fail

PIN_VARIABLE = "WERKZEUG_DEBUG_PIN"
READY = b"ready\n"


def new_pin() -> str:
    """Nine random digits in Werkzeug's 3-3-3 form (taken as they are, not hashed from the machine)."""
    digits = "%09d" % secrets.randbelow(10 ** 9)
    return "-".join(digits[i:i + 3] for i in (0, 3, 6))


def cmd_debug(req, io) -> dict:
    """Serve the env's current release under the debugger until qabox says stop (see above)."""
    env = existing_env(req["base"], req["env"])
    release, info = current_release(env, "debug it")
    if not (info.get("entry") and info.get("venv")):
        raise Fail("no_release", "release %s is not complete on the host: deploy again" % release)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # the kernel's pick: no port that anything holds
    listener.listen(64)
    port = listener.getsockname()[1]
    mine, theirs = socket.socketpair()
    spec = {"release_dir": env.release_dir(release), "entry": info["entry"], "static": info.get("static") or {},
            "listen_fd": listener.fileno(), "watch_fd": theirs.fileno()}
    pin = new_pin()
    io.emit({"progress": "starting release %s under Werkzeug's debugger" % release})
    try:
        proc = spawn(env, release, info, env.release_dir(release),
                     [venv_python(env, info), agents.archive(), "debug-serve", json.dumps(spec)],
                     "debug", {PIN_VARIABLE: pin}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, pass_fds=(listener.fileno(), theirs.fileno()))
    finally:
        listener.close()
        theirs.close()
    state = {"ready": False, "stopped": False}

    def output(kind: str, data: bytes) -> None:
        if kind == "watch":
            if data.startswith(READY) and not state["ready"]:
                state["ready"] = True
                io.emit({"debugging": {"release": release, "port": port, "pin": pin}})
            return
        io.emit({kind: base64.b64encode(data).decode("ascii")})

    threading.Thread(target=wait_for_stop, args=(io, proc, state), daemon=True).start()
    try:
        pump(proc, {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err", mine.fileno(): "watch"},
             output, io)
    finally:
        mine.close()
        proc.stdout.close()
        proc.stderr.close()
    if state["stopped"]:
        return {"release": release, "port": port, "stopped": True}
    if not state["ready"]:
        raise Fail("debug_failed", "release %s did not start under the debugger (exit status %d): its "
                   "output above says why" % (release, exit_status(proc)))
    raise Fail("debug_ended", "the debug process of release %s ended by itself (exit status %d): its output "
               "above says why; run qabox debug again" % (release, exit_status(proc)))


def wait_for_stop(io, proc: subprocess.Popen, state: dict) -> None:
    """qabox's ``stop``: end the debug process's group (pump then sees it gone)."""
    while True:
        line = io.next_request()
        if line is None:
            return  # qabox went away: pump ends the group
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("stop"):
            state["stopped"] = True
            stop_group(proc.pid, HOOK_STOP_TIMEOUT)
            return


def propagate_exceptions(app) -> None:
    """Let the app's exceptions reach the debugger instead of its framework's 500 page
    (what ``flask run --debug`` and Django's DEBUG_PROPAGATE_EXCEPTIONS do)."""
    import sys

    config = getattr(app, "config", None)
    if isinstance(config, dict) and "PROPAGATE_EXCEPTIONS" in config:  # Flask
        config["PROPAGATE_EXCEPTIONS"] = True
    if "django.conf" in sys.modules:
        settings = sys.modules["django.conf"].settings
        if settings.configured:
            settings.DEBUG_PROPAGATE_EXCEPTIONS = True


def debug_serve(spec: dict) -> None:
    """The debug process: the release's app in ``DebuggedApplication(evalex=True)`` on the
    listening socket it inherited, until the agent's end of ``watch_fd`` closes."""
    import sys

    sys.path.insert(0, spec["release_dir"])
    from werkzeug.debug import DebuggedApplication
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    from .serve import load_app

    class Handler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):
            if "__debugger__=" not in self.requestline:  # the PIN goes by in pinauth's query
                super().log_request(*args, **kwargs)

    app = load_app(spec["entry"])
    propagate_exceptions(app)
    if spec.get("static"):
        from werkzeug.middleware.shared_data import SharedDataMiddleware

        app = SharedDataMiddleware(app, {prefix: os.path.join(spec["release_dir"], path)
                                         for prefix, path in spec["static"].items()})
    app = DebuggedApplication(app, evalex=True, pin_logging=False)
    server = ThreadedWSGIServer("127.0.0.1", 0, app, handler=Handler, fd=spec["listen_fd"])
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    watch = spec["watch_fd"]
    os.write(watch, READY)
    try:
        while os.read(watch, 64):
            pass
    except OSError:
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)  # the agent is gone: so is this group, the app's children too
