"""``qabox status``: what runs where, asked of every host at once."""

from __future__ import annotations

from qabox.context import Context, check_env
from qabox.errors import ConfigError, QaboxError
from qabox.fleet import each_host


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


def status(ctx: Context, hosts: list[str], env: str | None = None) -> dict:
    """Every named host's status, in the order named (default: every host deployed
    to from here); a dead host delays no other. ``problems`` are the envs' own
    (a damaged state file, say), as ``host/env: problem`` lines."""
    hosts = hosts or ctx.remembered_hosts()
    if not hosts:
        raise ConfigError("no hosts known yet: name one with --host NAME")
    if env:
        check_env(env)
    outcomes = each_host(hosts, lambda h: host_status(ctx, h, env, alone=len(hosts) == 1))
    for o in outcomes:
        if o.error:
            raise o.error
    rows = [o.result for o in outcomes]
    problems = [f"{h['host']}/{e['env']}: {p}" for h in rows for e in h["envs"] for p in e.get("problems") or []]
    return {"hosts": rows, "problems": problems}
