"""The agent's entry: one request per call, or one of its long-lived roles.

``python3 agent-<hash>.pyz`` reads one JSON request on stdin; the same
archive also runs as ``supervise`` (one per env), ``serve`` (the app, with
the release's venv python), ``debug-serve`` (``qabox debug``'s app),
``tester-session`` (a tester key's forced command) and ``boot`` (from cron).
Each command's module is imported only when that command runs, so a call
compiles little more than it uses.
"""

import errno
import importlib
import json
import os
import sys

from . import agents
from .protocol import PROTOCOL, Fail, Stream


COMMANDS = {  # request name: (module, function), imported when it runs
    "hello": ("status", "cmd_hello"),
    "install": ("agents", "cmd_install"),
    "session": ("session", "cmd_session"),
    "upload-state": ("releases", "cmd_upload_state"),
    "python-info": ("venvs", "cmd_python_info"),
    "deploy": ("releases", "cmd_deploy"),
    "rollback": ("releases", "cmd_rollback"),
    "start": ("releases", "cmd_start"),
    "stop": ("releases", "cmd_stop"),
    "restart": ("releases", "cmd_restart"),
    "releases": ("releases", "cmd_releases"),
    "on-boot": ("boot", "cmd_on_boot"),
    "config-change": ("config", "cmd_config_change"),
    "config-list": ("config", "cmd_config_list"),
    "tester-add": ("testers", "cmd_tester_add"),
    "tester-remove": ("testers", "cmd_tester_remove"),
    "tester-list": ("testers", "cmd_tester_list"),
    "tester-extend": ("testers", "cmd_tester_extend"),
    "tester-session": ("testers", "cmd_tester_session"),
    "logs": ("status", "cmd_logs"),
    "errors-list": ("errors", "cmd_errors_list"),
    "error-show": ("errors", "cmd_error_show"),
    "run": ("oneoff", "cmd_run"),
    "debug": ("debug", "cmd_debug"),
    "status": ("status", "cmd_status"),
}


def command(name: str):
    module, function = COMMANDS[name]
    return getattr(importlib.import_module("." + module, __package__), function)


def handle(line: str, io: Stream, in_session: bool = False) -> int:
    """Run one JSON request and write its result: the agent's whole protocol."""
    def fail(code: str, message: str, **data) -> int:
        io.emit({"ok": False, "changed": False, "error": dict(code=code, message=message, **data)})
        return 1

    try:
        req = json.loads(line)
        if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
            raise Fail("bad_request", "unknown request: %.100r" % line)
        if req.get("protocol") != PROTOCOL:
            raise Fail("protocol", "qabox speaks protocol %s, this agent %d"
                       % (req.get("protocol"), PROTOCOL))
        if in_session and req["cmd"] == "session":
            raise Fail("bad_request", "a session cannot be nested")
        data = command(req["cmd"])(req.get("args") or {}, io)
    except Fail as e:
        return fail(e.code, e.message, **e.data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return fail("bad_request", "malformed request: %s" % e)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            from .files import disk_full

            full = disk_full(e.filename or "the deploy directory")
            return fail(full.code, full.message)
        return fail("os_error", str(e))
    if data is not None:
        changed = data.pop("changed", False)
        io.emit({"ok": True, "changed": changed, "data": data})
    return 0


def main(archive: str, args: list) -> int:
    """Run one role of the agent; ``archive`` is the hash-named file it runs from."""
    agents.ARCHIVE = archive
    os.umask(0o077)
    role = args[0] if args else None
    if role == "supervise":
        from .envs import Env
        from .supervisor import Supervisor

        Supervisor(Env(args[1], args[2]), args[3]).run()
        return 0
    if role == "tester-session":  # a tester key's forced command
        from .testers import tester_session

        # qabox sends its one request line, then heartbeats only
        return tester_session(args[1], args[2], Stream(sys.stdout, sys.stdin, max_requests=1))
    if role == "boot":
        from .boot import boot

        boot(args[1])
        return 0
    if role == "serve":
        from .serve import serve

        serve(json.loads(args[1]))
        return 0
    if role == "debug-serve":  # qabox debug's process, never the supervisor's
        from .debug import debug_serve

        debug_serve(json.loads(args[1]))
        return 0
    io = Stream(sys.stdout, sys.stdin)
    line = io.next_request()
    return 1 if line is None else handle(line, io)


def run() -> None:
    """The archive's ``__main__``, run from the hash-named archive: started through
    the stable entry, the ``__main__`` has already started again from the file it
    names, which never changes under a process, unlike ``current`` (see agents)."""
    sys.exit(main(os.path.abspath(sys.argv[0]), sys.argv[1:]))
