"""``qabox logs``: an env's output and access log, from one host or many at once."""

from __future__ import annotations

from typing import Callable

from qabox.context import Context, check_env
from qabox.errors import QaboxError
from qabox.fleet import each_host


def logs(ctx: Context, host: str, env: str, lines: int, follow: bool,
         on_line: Callable[[str], None]) -> None:
    """Pass the env's log lines to ``on_line``; with follow, until Ctrl-C."""
    check_env(env)
    with ctx.remote(host) as remote:
        remote.follow("logs", lambda m: on_line(m["line"]) if "line" in m else None,
                      env=env, lines=lines, follow=follow)


def logs_of_hosts(ctx: Context, hosts: list[str], env: str, lines: int, follow: bool,
                  on_line: Callable[[str, str], None]) -> dict[str, QaboxError]:
    """Every host's log lines as they come, as ``on_line(host, line)`` from each
    host's own thread; the error of each host that failed. With one host, its
    error is raised instead. Ctrl-C raises KeyboardInterrupt here."""
    outcomes = each_host(hosts, lambda host: logs(ctx, host, env, lines, follow,
                                                  lambda line: on_line(host, line)),
                         parallel=len(hosts))
    errors = {o.host: o.error for o in outcomes if o.error}
    if errors and len(hosts) == 1:
        raise errors[hosts[0]]
    return errors
