"""Talking to an env's supervisor and apps, and starting a supervisor."""

import json
import os
import signal
import socket
import sys

from . import agents, testers
from .envs import Env, update_settings
from .files import read_json, tail
from .procs import own_pids, pid_alive, proc_stat, wait_for
from .protocol import Fail
from .sockets import bind_listener, expect_peer, holder, recv_fds, recv_line, send_fds, socket_inodes, tcp_sockets
from .spare import handed_path


def foreign_listeners(env: Env, port: int) -> list:
    """Listeners on the env's ports (``port``, its testers') that are not its
    supervisor's or app's: another program, or a tester's ``ssh -R``. Such a
    port would serve someone else's page to whoever connects."""
    pong = supervisor_ping(env) or {}
    record = pong.get("record") or env.state()  # its own word beats state.json, which may be damaged
    ports = {port: "the env's port"}
    try:
        ports.update({p: "tester %s's port" % name for name, p in testers.tester_ports(env).items()})
    except Fail:
        pass  # a broken tester list is reported where testers are read
    ours = set()
    for pid, role in ((pong.get("pid") or record.get("supervisor_pid"), ["supervise", env.base, env.name]),
                      (record.get("pid"), ["serve"])):
        if isinstance(pid, int) and (agents.agent_args(pid) or [None])[:len(role)] == role:
            ours |= socket_inodes(pid)
    return ["%s %d is held by %s" % (ports[port], port, holder(inode))
            for port, kind, inode in tcp_sockets()
            if kind == "0A" and port in ports and inode not in ours]


def supervisor_state(env: Env):
    pong = supervisor_ping(env)
    return pong.get("state") if pong else None


def revive(env: Env) -> bool:
    """Restart a dead supervisor of an env that should be up. True if it did."""
    try:
        if env.settings().get("stopped") or env.current() is None or supervisor_ping(env) is not None:
            return False
        ensure_supervisor(env)
    except (Fail, OSError):
        return False  # a damaged env.json (status names it), or no room to start one
    return True


def supervisor_call(env: Env, request: dict, timeout: float = 5.0) -> dict:
    """Send one request to the env's supervisor and wait for its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(env.path("ctl.sock"))
        expect_peer(sock, "env %s's control socket" % env.name, role=["supervise", env.base, env.name])
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = recv_line(sock)
    finally:
        sock.close()
    try:
        return json.loads(data.decode())
    except ValueError:
        raise Fail("supervisor", "the supervisor of env %s did not answer: run `qabox status` "
                   "(it revives a dead supervisor) and try again" % env.name)


def supervisor_ping(env: Env):
    """The supervisor's answer to ping, or None if none is running."""
    try:
        return supervisor_call(env, {"cmd": "ping"}, timeout=3.0)
    except (OSError, Fail):
        return None


def ensure_supervisor(env: Env, port: int = None) -> None:
    """Have a supervisor of this agent run the env (on whatever port: a switch
    moves it to another, see Supervisor.switch).

    A fresh supervisor gets a listening socket on ``port`` (default: the
    recorded one) bound here, so that a port in use is reported at once, and
    before anything stops. If apps of the env outlived their supervisor, the
    new supervisor adopts one of them, socket and all, and ends the others.
    """
    port = port or env.settings().get("port", 8080)
    pong = supervisor_ping(env)
    if pong and pong.get("agent") == agents.name():
        return
    if pong:
        # A supervisor of an older agent hands over: on SIGTERM it leaves and
        # its app keeps serving, for the new supervisor to adopt below.
        try:
            os.kill(pong["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not wait_for(lambda: not pid_alive(pong["pid"]), 5.0):
            os.kill(pong["pid"], signal.SIGKILL)
            wait_for(lambda: not pid_alive(pong["pid"]), 5.0)  # its lock is free once it is gone
    listener = None
    if env_apps(env):
        fd_arg = "adopt:%d" % port  # the port to listen on if none of them can be adopted
    else:
        listener = bind_listener(port)
        fd_arg = str(listener.fileno())
        update_settings(env, port=port)
    import subprocess

    log = os.open(env.path("logs", "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    subprocess.Popen(
        [sys.executable, agents.archive(), "supervise", env.base, env.name, fd_arg],
        pass_fds=[listener.fileno()] if listener else [], stdin=subprocess.DEVNULL, stdout=log,
        stderr=log, start_new_session=True, close_fds=True,
    )
    os.close(log)
    if listener:
        listener.close()
    if not wait_for(lambda: supervisor_ping(env) is not None, 10.0):
        raise Fail("supervisor", "the supervisor did not start on the host; see %s"
                   % env.path("logs", "supervisor.log"), log=tail(env.path("logs", "supervisor.log")))


def env_apps(env: Env) -> list:
    """The env's app processes, found in /proc rather than in state.json (which
    a full disk or a user may have lost): each {"pid", "release", "probe_fd"}."""
    releases = env.path("releases")
    apps = []
    for pid in own_pids():
        args = agents.agent_args(pid) or []
        if len(args) < 2 or args[0] != "serve":
            continue
        try:
            spec = json.loads(args[1])
            if spec.get("spare"):  # an app once handed a release, else no app yet (spare.py)
                spec = read_json(handed_path(spec["ctl_dir"], pid))
            release_dir = spec["release_dir"]
        except (ValueError, OSError, KeyError, TypeError):
            continue
        if os.path.dirname(release_dir) == releases and pid_alive(pid):
            apps.append({"pid": pid, "release": os.path.basename(release_dir), "probe_fd": spec.get("probe_fd"),
                         "parent": (proc_stat(pid) or ("", ["", "0"]))[1][1]})
    pids = {str(app["pid"]) for app in apps}
    return [dict((k, v) for k, v in app.items() if k != "parent") for app in apps
            if app["parent"] not in pids]  # a gunicorn worker has its master's command line: not an app


def app_ctl_path(env: Env, pid: int) -> str:
    """Where an app process offers its listening socket to a new supervisor."""
    return env.path("run", "app-%d.sock" % pid)


def stop_accepting(env: Env, pid: int) -> bool:
    """Have an app take no new connection (those open are still served), at
    once; False if it did not say so: an app of an older agent answers with its
    sockets instead, and SIGTERM alone stops it."""
    try:
        answer, fds = app_request(env, pid, {}, cmd="retire")
    except (OSError, ValueError):
        return False
    for fd in fds.values():
        os.close(fd)
    return answer.get("ok") is True


def app_request(env: Env, pid: int, fds: dict, **message) -> tuple:
    """Ask a running app over its control socket: (its answer, the fds it sent)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(app_ctl_path(env, pid))
        expect_peer(sock, "the app's control socket", pid=pid)
        try:
            send_fds(sock, fds, **message)
        except BrokenPipeError:
            pass  # an app of an older agent answers without reading: its answer is still there
        return recv_fds(sock)
    finally:
        sock.close()
