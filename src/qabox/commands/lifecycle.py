"""Changing an env after deploy (start, stop, restart, rollback), on one host or
many, under its deploy lock; and the releases it keeps."""

from __future__ import annotations

from qabox.agent import rules
from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError
from qabox.fleet import each_host

CHANGING = ("start", "stop", "restart", "rollback")


def change(ctx: Context, host: str, env: str, cmd: str, lock_timeout: float = 60, **args) -> dict:
    """Run a command that changes the env, under its deploy lock like a deploy."""
    assert cmd in CHANGING
    check_env(env)
    with ctx.remote(host) as remote, remote.session(env, lock_timeout, whoami()) as session:
        return session.call(cmd, timeout=120, env=env, **args)


def change_hosts(ctx: Context, hosts: list[str], env: str, cmd: str, lock_timeout: float = 60,
                 **args) -> list[dict]:
    """``change`` on every host at once: a row per host (``host``, ``ok``, ``result``,
    ``error``), in the order given. With one host, its error is raised instead."""
    if cmd == "rollback":
        check_release_id(args.get("to"))
    outcomes = each_host(hosts, lambda host: change(ctx, host, env, cmd, lock_timeout, **args))
    if len(outcomes) == 1 and outcomes[0].error:
        raise outcomes[0].error
    return [{"host": o.host, "ok": o.ok, "result": o.result, "error": o.error and o.error.message}
            for o in outcomes]


def check_release_id(release: str | None) -> str | None:
    """A release id to roll back to, as the host names them (or None: the previous one)."""
    if release is not None and not rules.RELEASE_ID.fullmatch(release):
        raise ConfigError(f"--to {release!r} is not a release id (like 20261124-104000): see `qabox releases`")
    return release


def releases(ctx: Context, host: str, env: str) -> dict:
    check_env(env)
    with ctx.remote(host) as remote:
        return remote.call("releases", env=env)
