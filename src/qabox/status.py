"""``qabox status``: what runs where, asked of every host at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from qabox.context import Context
from qabox.errors import ConfigError, QaboxError


def host_status(ctx: Context, host: str, env: str | None = None, alone: bool = False) -> dict:
    """One host's envs, or why the host could not be asked. A config error stops
    all; so does an env the host does not have when it is the only host asked
    (an error, as for logs); among several hosts it is that host's row."""
    try:
        with ctx.remote(host) as remote:
            data = remote.call("status", env=env, timeout=30)
        return {"host": host, "reachable": True, "error": None, "envs": data["envs"]}
    except ConfigError:
        raise
    except QaboxError as e:
        if e.code == "no_env":
            if alone:
                raise
            return {"host": host, "reachable": True, "error": e.message, "env": env, "envs": []}
        return {"host": host, "reachable": False, "error": e.message, "envs": []}


def status(ctx: Context, hosts: list[str], env: str | None = None) -> list[dict]:
    """Every named host's status, in the order named; a dead host delays no other."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(hosts)))) as pool:
        return list(pool.map(lambda h: host_status(ctx, h, env, alone=len(hosts) == 1), hosts))
