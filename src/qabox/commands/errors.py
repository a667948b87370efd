"""``qabox errors``: what the app raised while serving requests, as the host captured it."""

from __future__ import annotations

from typing import Callable

from qabox.context import Context, check_env
from qabox.errors import ConfigError


def errors_list(ctx: Context, host: str, env: str | None = None, tester: str | None = None,
                since: int | None = None, follow: bool = False,
                on_new: Callable[[dict], None] | None = None,
                on_groups: Callable[[dict], None] | None = None) -> dict | None:
    """The host's captured errors grouped by where they were raised, newest
    first (of one env, of one tester, of the last ``since`` seconds). With
    follow, the groups go to ``on_groups``, then each new error to ``on_new``
    until Ctrl-C (KeyboardInterrupt)."""
    if env:
        check_env(env)
    args = dict(env=env, tester=tester, since=since)
    with ctx.remote(host) as remote:
        if not follow:
            return remote.call("errors-list", **args)

        def message(m: dict) -> None:
            if "groups" in m and on_groups:
                on_groups(m)
            elif "error" in m and on_new:
                on_new(m["error"])

        remote.follow("errors-list", message, follow=True, **args)
    return None


def error_show(ctx: Context, host: str, error_id: str, env: str | None = None) -> dict:
    """One captured error, whole: its traceback, request, tester, release and time."""
    if env:
        check_env(env)
    error_id = error_id.strip().lower()
    if not error_id:
        raise ConfigError("no error id given: name one from `qabox errors list`")
    with ctx.remote(host) as remote:
        return remote.call("error-show", id=error_id, env=env)["error"]
