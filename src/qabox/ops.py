"""Operating an env after deploy: start, stop, restart, rollback, releases, logs."""

from __future__ import annotations

from typing import Callable

from qabox.context import Context, check_env, whoami

CHANGING = ("start", "stop", "restart", "rollback")


def change(ctx: Context, host: str, env: str, cmd: str, lock_timeout: float = 60, **args) -> dict:
    """Run a command that changes the env, under its deploy lock like a deploy."""
    assert cmd in CHANGING
    check_env(env)
    with ctx.remote(host) as remote, remote.session(env, lock_timeout, whoami()) as session:
        return session.call(cmd, timeout=120, env=env, **args)


def releases(ctx: Context, host: str, env: str) -> dict:
    check_env(env)
    with ctx.remote(host) as remote:
        return remote.call("releases", env=env)


def logs(ctx: Context, host: str, env: str, lines: int, follow: bool,
         on_line: Callable[[str], None]) -> None:
    """Print the env's log lines through ``on_line``; with follow, until Ctrl-C."""
    check_env(env)
    with ctx.remote(host) as remote:
        remote.follow("logs", lambda m: on_line(m["line"]) if "line" in m else None,
                      env=env, lines=lines, follow=follow)
