"""The deploy lock: a session holds an env's lock for as long as qabox's channel lives."""

import fcntl
import json
import os
import time

from .envs import Env, existing_env
from .files import iso, makedirs, now, read_json
from .procs import pid_alive
from .protocol import Fail


def cmd_session(req, io) -> None:
    """Hold an env's deploy lock and run the deploy's requests under it.

    The lock is an flock owned by this process, which lives exactly as long
    as qabox's channel: when qabox exits, dies or goes silent (no heartbeat
    for SESSION_IDLE seconds), the running step is cancelled and cleaned up,
    this process exits, and the lock is free. It can never be left stale.
    """
    env = Env(req["base"], req["env"]) if req.get("create") else existing_env(req["base"], req["env"])
    makedirs(env.dir)
    path = env.path("deploy.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + float(req.get("timeout", 60))
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            holder = read_json(path, {}) or {}
            raise Fail(
                "lock_held",
                "another deploy to env %s holds the lock: %s since %s; wait for it, or try "
                "again with a longer --lock-timeout" % (env.name, holder.get("by", "unknown"),
                                                         holder.get("since", "?")),
                holder=holder,
            )
        if io.gone.wait(0.2):
            return None
    os.ftruncate(fd, 0)
    holder = {"by": req.get("by"), "since": iso(now()), "pid": os.getpid()}
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    from .main import handle  # main imported this module, so no cycle at import time
    from .persist import settle_restore

    settle_restore(env)  # a rollback --with-data killed midway: its data is the old or the new, whole
    io.emit({"ok": True, "changed": False, "data": {"locked": True}})
    io.locked_env = env.name
    from . import releases  # noqa: F401 (what a session's requests run: loaded while qabox sends the first)

    while True:
        line = io.next_request()
        if line is None:
            return None
        handle(line, io, in_session=True)


def deploying(env: Env) -> bool:
    """Whether a session holds the env's deploy lock now (the holder it
    recorded still lives), without touching the lock."""
    holder = read_json(env.path("deploy.lock"), {})
    pid = holder.get("pid") if isinstance(holder, dict) else None
    return isinstance(pid, int) and pid_alive(pid)


def locked(req, io) -> Env:
    """The env of a command that changes it: only under that env's deploy lock."""
    env = Env(req["base"], req["env"])
    if io.locked_env != env.name:
        raise Fail("bad_request", "%s runs only in a session holding env %s's lock"
                   % (req.get("cmd", "this command"), env.name))
    return env
