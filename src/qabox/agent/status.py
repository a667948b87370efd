"""What the host and its envs look like now: hello, status, logs."""

import os
import shutil
import sys
import time

from . import agents, compiled
from .control import foreign_listeners, revive, supervisor_ping
from .envs import Env, all_envs, existing_env
from .errors import release_count
from .files import now, tail
from .protocol import PROTOCOL, Fail
from .rules import DEFAULT_SERVER
from .sockets import http_probe, port_is_free
from .testers import connected_testers, tester_ports, tester_requests


def cmd_hello(req, io) -> dict:
    """Facts about the host, for ``qabox hosts check``."""
    import importlib.util

    base = os.path.abspath(os.path.expanduser(req["base"]))
    existing = base
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    ports = {}
    for name in all_envs(base):
        env = Env(base, name)
        port = env.settings(strict=False).get("port")
        if port:
            current = env.current()
            info = env.release_info(current) if current else {}
            ports[name] = {"port": port, "ours": supervisor_ping(env) is not None,
                           "free": port_is_free(port), "server": info.get("server") or DEFAULT_SERVER,
                           "server_options": info.get("server_options") or {}}
    wanted = req.get("port")
    return {
        "protocol": PROTOCOL,
        "agent": agents.name(),
        "compiled": compiled.USED is not None,  # this python loads the agent from its compiled copy
        "python": sys.version.split()[0],
        "venv": importlib.util.find_spec("venv") is not None and importlib.util.find_spec("ensurepip") is not None,
        "user": os.environ.get("USER") or str(os.getuid()),
        "time": now(),
        "free_bytes": shutil.disk_usage(existing).free,
        "base": base,
        "envs": ports,
        "port_free": port_is_free(wanted) if wanted else None,
        "cores": os.cpu_count(),
        "memory_bytes": memory_bytes(),
    }


def memory_bytes():
    """The host's memory (MemTotal of /proc/meminfo), or None if it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cmd_logs(req, io) -> None:
    """The current release's log: the last lines, then (follow) new ones as written."""
    env = existing_env(req["base"], req["env"])
    release = env.current()
    if release is None:
        raise Fail("no_release", "nothing is deployed to env %s" % env.name)
    path = env.path("logs", release + ".log")
    for line in tail(path, int(req.get("lines", 50))):
        io.emit({"line": line})
    if not req.get("follow"):
        io.emit({"ok": True, "changed": False, "data": {"release": release}})
        return None
    position = os.path.getsize(path) if os.path.exists(path) else 0
    heartbeat = time.monotonic()
    while not io.gone.wait(0.2):
        if time.monotonic() - heartbeat > 5:  # lets qabox tell a quiet log from a dead link
            heartbeat = time.monotonic()
            io.emit({"hb": 1})
        if env.current() != release:  # a deploy or rollback switched: follow the new log
            release = env.current()
            io.emit({"line": "--- now release %s ---" % release})
            path, position = env.path("logs", release + ".log"), 0
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size < position:  # rotated
            position = 0
        if size > position:
            with open(path, "rb") as f:
                f.seek(position)
                data = f.read(size - position)
            complete = data.rfind(b"\n") + 1
            position += complete
            for line in data[:complete].decode("utf-8", "replace").splitlines():
                io.emit({"line": line})
    return None


def cmd_status(req, io) -> dict:
    """Every env on this host (or the one asked): release, state, health.

    An env whose supervisor died is noticed here and given a new one, which
    adopts the app if it still runs.
    """
    base = req["base"]
    names = [existing_env(base, req["env"]).name] if req.get("env") else all_envs(base)
    return {"envs": [env_status_or_problem(Env(base, name)) for name in names]}


def env_status_or_problem(env: Env) -> dict:
    """An env's status; whatever goes wrong in one env is its problem, not the host's."""
    try:
        return env_status(env)
    except (Fail, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        keys = ("release", "sha256", "file", "deployed_at", "deployed_by", "server", "pid", "uptime", "last_exit",
                "last_log", "port", "supervisor_pid", "health")
        return dict({key: None for key in keys}, env=env.name, state="unknown", restarts=0, hangs=0,
                    supervisor_revived=False, testers=[], requests={}, errors=0,
                    problems=["cannot tell the state of env %s: %s" % (env.name, getattr(e, "message", e))])


def env_status(env: Env) -> dict:
    """One env's status. What a running supervisor says beats the files (a full
    disk may keep it from writing them); a damaged file is named in problems."""
    revived = revive(env)
    current = env.current()
    info = env.release_info(current) if current else {}
    pong = supervisor_ping(env)
    state = (pong or {}).get("record") or env.state()
    port = (pong or {}).get("port") or env.settings(strict=False).get("port", 8080)
    status = pong.get("state", "stopped") if pong else ("crashed" if state.get("state") == "crashed" else "stopped")
    problems = env.problems() + foreign_listeners(env, port)
    try:
        testers = [dict(c, requests=tester_requests(env, c["name"])) for c in connected_testers(env)]
        requests = {name: tester_requests(env, name) for name in tester_ports(env)}
    except Fail as e:
        testers, requests = [], {}
        problems.append(e.message)
    started = state.get("started_at")
    return {
        "env": env.name,
        "release": current,
        "sha256": info.get("sha256"),
        "file": info.get("file"),
        "deployed_at": info.get("deployed_at"),
        "deployed_by": info.get("deployed_by"),
        "server": (info.get("server") or DEFAULT_SERVER) if current else None,
        "state": status,
        "pid": state.get("pid") if status in ("running", "starting") else None,
        "uptime": round(now() - started, 1) if started and status == "running" else None,
        "restarts": state.get("restarts") or 0,
        "hangs": state.get("hangs") or 0,
        "last_exit": state.get("last_exit"),
        "last_log": state.get("last_log") if status == "crashed" else None,
        "port": port,
        "supervisor_pid": pong.get("pid") if pong else None,
        "supervisor_revived": revived,
        "testers": testers,
        "requests": requests,
        "errors": release_count(env, current) if current else 0,  # captured, of the current release
        "problems": problems,  # a port that serves someone else's page is not healthy
        "health": {"error": problems[0]} if problems else
                  http_probe((state.get("probe_port") if pong else None) or port,  # quiet: no access log line
                             info.get("health", "/")) if current and status != "stopped" else None,
    }
