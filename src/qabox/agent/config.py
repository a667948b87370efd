"""The app's configuration per env: environment variables kept on the host.

    envs/<env>/config.json   {"values": what ``qabox config`` set,
                              "hosts_file": the hosts file's [envs.<env>.environment]}

The app sees the release's own defaults (its qabox.toml's [app.environment],
recorded in release.json) < the hosts file's < ``qabox config``'s. Values
arrive in the JSON request on the agent's stdin, never on a command line,
and leave the host only in ``config-list`` with ``show``: never in an error,
a log line or ``status``.
"""

from .envs import Env
from .files import makedirs, read_record, write_json
from .protocol import Fail
from .rules import config_name_problem, environment_problems
from .session import locked

FILE = "config.json"
SOURCES = ("qabox.toml", "hosts file", "config")  # lowest first


def stored(env: Env) -> dict:
    """config.json ({} if there is none; a damaged one is a Fail naming it)."""
    return read_record(env.path(FILE))


def layers(env: Env, info: dict) -> list:
    """(source, table) of each layer of the app's configuration, lowest first."""
    record = stored(env)
    return list(zip(SOURCES, (info.get("environment") or {}, record.get("hosts_file") or {},
                              record.get("values") or {})))


def environment(env: Env, info: dict) -> dict:
    """The variables a process of the release ``info`` (its release.json) gets from configuration."""
    result = {}
    for _, table in layers(env, info):
        result.update(table)
    return result


def checked_environment(table, what: str) -> dict:
    """A table of variables as sent, or a Fail naming what is wrong (names only, never values)."""
    problems = environment_problems(table)
    if problems:
        raise Fail("bad_config", "%s: %s; nothing was changed" % (what, "; ".join(problems)))
    return table


def save(env: Env, record: dict) -> None:
    makedirs(env.dir)
    write_json(env.path(FILE), record)  # atomic, 0600


def record_hosts_file(env: Env, table) -> bool:
    """Keep the hosts file's table for the env as qabox last sent it (None: not sent).
    True if that changed what the app gets."""
    if table is None:
        return False
    checked_environment(table, "the hosts file's [envs.%s.environment]" % env.name)
    record = stored(env)
    if (record.get("hosts_file") or {}) == table:
        return False
    record["hosts_file"] = table
    save(env, record)
    return True


def cmd_config_change(req, io) -> dict:
    """Set and unset variables of the env's configuration, under its deploy lock.
    Says what changed (names only) and whether a release runs that a restart
    would give them to. With ``apply``, restarts it then, as ``qabox restart``
    does; if it does not start with them, the change is undone (the running
    process kept the configuration it had: a stored one it lacks would fail the
    next deploy instead, which would look like the build's fault)."""
    env = locked(req, io)
    before_change = stored(env)
    values = checked_environment(req.get("set") or {}, "config set")
    unset = req.get("unset") or []
    problems = [p for p in map(config_name_problem, unset) if p]
    if problems:
        raise Fail("bad_config", "config unset: %s; nothing was changed" % "; ".join(problems))
    hosts_changed = record_hosts_file(env, req.get("hosts_environment"))  # checked before anything is written
    record = stored(env)
    before = record.get("values") or {}
    after = dict(before, **values)
    for name in unset:
        after.pop(name, None)
    names = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
    if names:
        record["values"] = after
        save(env, record)
    release = env.current()
    result = {"changed": bool(names) or hosts_changed, "names": names,
              "not_set": sorted(set(unset) - set(before)), "release": release,
              "restart": release is not None and not env.settings(strict=False).get("stopped")}
    if req.get("apply") and result["restart"] and result["changed"]:
        from .releases import cmd_restart  # releases reads the configuration: imported here, not at the top

        try:
            result["restarted"] = cmd_restart(req, io)
        except Fail as e:
            save(env, before_change)
            raise Fail(e.code, "the app did not start with the new configuration, so the change was not kept: "
                       "%s" % e.message, **e.data)
    return result


def cmd_config_list(req, io) -> dict:
    """The variables the env's app gets from configuration, each with where it comes
    from; the values only with ``show``."""
    env = Env(req["base"], req["env"])
    release = env.current()
    info = env.release_info(release, strict=True) if release else {}
    effective = {}
    for source, table in layers(env, info):
        effective.update((name, (source, value)) for name, value in table.items())
    show = bool(req.get("show"))
    return {"release": release, "shown": show, "variables": [
        {"name": name, "source": source, "value": value if show else None}
        for name, (source, value) in sorted(effective.items())]}
