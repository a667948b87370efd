"""Tunnels running on this machine: their records (pid, URL, state) for
``qabox tunnels``, stopping them, and starting one in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from qabox.agent.files import write_json
from qabox.agent.procs import pid_alive
from qabox.context import Context
from qabox.errors import ConnectError

if TYPE_CHECKING:
    from qabox.tunnel import Tunnel, TunnelState


def record_path(ctx: Context, user: str, host: str, env: str):
    return ctx.state_dir / "tunnels" / f"{user}@{host}-{env}.json"


class Recorder:
    """Keeps a running tunnel's record (pid, URL, state) for `qabox tunnels`."""

    def __init__(self, ctx: Context, tunnel: Tunnel):
        self.path = record_path(ctx, tunnel.user, tunnel.host, tunnel.env)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tunnel = tunnel
        self.started = time.time()
        self.written = 0.0
        self.state = None
        self.requests = 0

    def __call__(self, status: TunnelState) -> None:
        if (status.state, status.reason) == self.state and (status.requests == self.requests
                                                            or time.time() - self.written < 1):
            return  # request counts: at most once a second
        self.state, self.requests, self.written = (status.state, status.reason), status.requests, time.time()
        t = self.tunnel
        data = {"pid": os.getpid(), "user": t.user, "host": t.host, "env": t.env, "url": t.url,
                "port": t.port, "state": status.state, "reason": status.reason,
                "requests": status.requests, "since": self.started}
        write_json(str(self.path), data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def running(ctx: Context) -> list[dict]:
    """Tunnels recorded on this machine whose process still runs (stale records go)."""
    found = []
    for path in sorted((ctx.state_dir / "tunnels").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(record.get("pid")):
            found.append(record)
        else:
            path.unlink(missing_ok=True)
    return found


def stop_tunnels(ctx: Context, user: str | None, host: str | None, env: str | None) -> list[dict]:
    """SIGTERM the matching tunnels and wait (bounded) for them to end."""
    chosen = [r for r in running(ctx) if (user is None or r["user"] == user)
              and (host is None or r["host"] == host) and (env is None or r["env"] == env)]
    for record in chosen:
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(pid_alive(r["pid"]) for r in chosen) and time.monotonic() < deadline:
        time.sleep(0.05)
    for record in chosen:
        record_path(ctx, record["user"], record["host"], record["env"]).unlink(missing_ok=True)
    return chosen


def detach(ctx: Context, user: str, host: str, env: str, port: int, identity: str | None) -> dict:
    """Run the tunnel in the background (log beside its record); wait until it is up."""
    for record in running(ctx):
        if (record["user"], record["host"], record["env"]) == (user, host, env):
            return record
    log_path = record_path(ctx, user, host, env).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "qabox", "tunnel", "--user", user, "--host", host, "--env", env,
            "--port", str(port)] + (["-i", identity] if identity else [])
    child_env = dict(os.environ, QABOX_HOSTS_DIR=str(ctx.hosts_dir), QABOX_STATE_DIR=str(ctx.state_dir))
    if ctx.ssh_config:
        child_env["QABOX_SSH_CONFIG"] = str(ctx.ssh_config)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=child_env, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise ConnectError(lines[-1].removeprefix("qabox: error: ") if lines else
                               f"the tunnel exited with code {proc.returncode}; see {log_path}")
        record = next((r for r in running(ctx) if r["pid"] == proc.pid), None)
        if record and record["state"] == "connected":
            return record
        time.sleep(0.1)
    raise ConnectError(f"the tunnel did not come up within 30 s; see {log_path}")
