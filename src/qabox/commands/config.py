"""``qabox config``: the app's environment variables per env, kept on the host.

Values travel in the JSON request on the agent's stdin, never in a command
line; qabox's own messages name variables, never their values.
"""

from __future__ import annotations

from pathlib import Path

from qabox.agent import rules
from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError


def check_names(names) -> None:
    """Refuse the first name the app's environment cannot have, saying why."""
    for name in names:
        problem = rules.config_name_problem(name)
        if problem:
            raise ConfigError(problem)


def check_values(values: dict) -> None:
    """Refuse a table the app's environment cannot hold before connecting (the agent
    checks again); the message names the variable, never its value."""
    problems = rules.environment_problems(values)
    if problems:
        raise ConfigError(problems[0])


def read_dotenv(path: Path) -> dict:
    """The variables of a dotenv file (``python-dotenv``'s syntax: quotes, ``export``,
    multi-line quoted values), taken as written: ``${VAR}`` is not expanded, since
    it would bring in this machine's environment, not the host's."""
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    if not path.is_file():
        raise ConfigError(f"--from-file {path}: there is no such file: name a dotenv file (KEY=VALUE lines)")
    with open(path, encoding="utf-8") as f:  # dotenv_values only logs a line it cannot parse, and drops it
        bad = next((binding.original.line for binding in parse_stream(f) if binding.error), None)
    if bad is not None:  # the line itself may hold a secret: named by number only
        raise ConfigError(f"--from-file {path}: line {bad} is not KEY=VALUE (a quote left open?): nothing was set")
    values = dotenv_values(path, interpolate=False)
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"--from-file {path}: {missing[0]} has no value: write {missing[0]}=VALUE there "
                          f"(or {missing[0]}= for an empty one)")
    return dict(values)


def change(ctx: Context, host: str, env: str, values: dict | None = None, unset: list | None = None,
           restart: bool = True, lock_timeout: float = 60) -> dict:
    """Set and unset variables under the env's deploy lock, then (unless not ``restart``)
    restart its app as ``qabox restart`` does, with no failed requests (a change the
    app does not start with is undone). The agent's
    answer (``names`` changed, ``not_set``, ``release``), with ``restarted``: the
    restart's result, or None."""
    check_env(env)
    values, unset = values or {}, unset or []
    check_names([*values, *unset])
    check_values(values)
    hosts_environment = ctx.settings(host).env_environment(env)
    with ctx.remote(host) as remote, remote.session(env, lock_timeout, whoami(), create=True) as session:
        result = session.call("config-change", timeout=120, env=env, set=values, unset=unset,
                              hosts_environment=hosts_environment, apply=restart)
        applies = result.pop("restart") and result["changed"]
        result["restarted"] = result.get("restarted")
        result["deferred"] = bool(applies and not restart)
    return result


def listing(ctx: Context, host: str, env: str, show: bool = False) -> dict:
    """The env's configured variables with their source; values only with ``show``."""
    check_env(env)
    with ctx.remote(host) as remote:
        return remote.call("config-list", env=env, show=show)
