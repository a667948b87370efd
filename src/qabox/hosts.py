"""qabox's own per-host settings: the optional ``hosts/NAME.toml`` files.

SSH itself (address, user, keys, jumps) comes from ssh_config, as for ``ssh``;
these files only add what qabox needs to know on top.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qabox.agent import rules
from qabox.errors import ConfigError

HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,253}")  # fullmatch
# The deploy directory ends up in commands the host's shell runs (a tester key's
# forced command, the @reboot crontab line): only a plain relative or ~/ path
# of these characters, no '.' or '..' part, no part starting with '-'.
DIR_PART = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9_.][A-Za-z0-9_.-]*")  # fullmatch


def plain_dir(value: str) -> bool:
    parts = (value[2:] if value.startswith("~/") else value).split("/")
    return len(value) <= 200 and all(DIR_PART.fullmatch(part) for part in parts)


@dataclass(frozen=True)
class HostSettings:
    """What qabox needs to know about a host besides how to SSH to it."""

    name: str
    dir: str = ".qabox"
    port: int | None = None
    keep: int = 5
    python: str = "python3"
    start_timeout: float = 30.0
    max_build_mb: int = 2048
    max_build_members: int = 50_000
    health_interval: float = 10.0
    log_max_mb: float = 10.0
    spare_app: bool = True  # a warm spare app process per env, for the next release (agent/spare.py)
    server: str | None = None  # overrides the build's [app] server on this host
    server_options: dict = field(default_factory=dict)  # ...and its [server] knobs
    envs: dict = field(default_factory=dict)
    testers: dict = field(default_factory=dict)
    source: Path | None = None

    def env_environment(self, env: str) -> dict:
        """The app's environment defaults the hosts file gives an env (``[envs.NAME.environment]``)."""
        return self.envs.get(env, {}).get("environment", {})

    def env_server(self, env: str, server: str, options: dict) -> tuple[str, dict]:
        """A build's ``[app] server`` and ``[server]`` as this host runs them in ``env``:
        the hosts file's ``server``/``server_options`` override them, an env's own
        (``[envs.NAME]``) those of the host. Knobs are merged key by key."""
        table = self.envs.get(env, {})
        chosen = table.get("server") or self.server or server
        return chosen, {**options, **self.server_options, **table.get("server_options", {})}

    def env_port(self, env: str) -> int | None:
        """The port the hosts file sets for an env (``port`` is main's), if any."""
        port = self.envs.get(env, {}).get("port")
        return port if port is not None or env != "main" else self.port


# key: (type, check, what a valid value is)
KEYS = {
    "dir": (str, plain_dir, "a plain directory path relative to the home directory (like .qabox or "
            "~/qa/box: letters, digits, '.', '_' and '-')"),
    "port": (int, lambda v: 1 <= v <= 65535, "a port from 1 to 65535"),
    "keep": (int, lambda v: 1 <= v <= 100, "a number of releases from 1 to 100"),
    "python": (str, lambda v: bool(v.strip()) and "\x00" not in v, "a python command"),
    "start_timeout": ((int, float), lambda v: 1 <= v <= 600, "seconds from 1 to 600"),
    "max_build_mb": (int, lambda v: 1 <= v <= 1024 * 1024, "megabytes, at least 1"),
    "max_build_members": (int, lambda v: 1 <= v <= 10_000_000, "a number of members from 1 to 10,000,000"),
    "health_interval": ((int, float), lambda v: 0.2 <= v <= 3600, "seconds from 0.2 to 3600"),
    "log_max_mb": ((int, float), lambda v: 0.001 <= v <= 10240, "megabytes, more than 0"),
    "spare_app": (bool, lambda v: True, "true or false"),
    "server": (str, lambda v: v in rules.SERVERS, "an app server: " + ", ".join(rules.SERVERS)),
    "server_options": (dict, lambda v: True, "a table of [server] knobs, like {threads = 8}"),
    "envs": (dict, lambda v: True, "a table of envs"),
    "testers": (dict, lambda v: True, "a table of testers"),
}
TABLE_KEYS = {
    "envs": {"port": KEYS["port"], "environment": (dict, lambda v: True, "a table of NAME = \"text\""),
             "server": KEYS["server"], "server_options": KEYS["server_options"]},
    "testers": {"port": KEYS["port"], "key": (str, lambda v: bool(v.strip()), "a private key file")},
}


def check_host_name(name: str) -> str:
    if not HOST_NAME.fullmatch(name or ""):
        raise ConfigError(f"host name {name!r} is not valid: use letters, digits, '.', '-' and '_'")
    return name


def load_settings(name: str, hosts_dir: Path) -> HostSettings:
    """The host's settings from ``hosts_dir/NAME.toml``, or the defaults if absent."""
    check_host_name(name)
    path = hosts_dir / f"{name}.toml"
    if not path.is_file():
        return HostSettings(name=name)
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}; fix the TOML syntax there") from None
    values = {}
    for key, value in data.items():
        where = f"{path}:{line_of(text, key)}"
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
        kind, valid, what = KEYS[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or not valid(value):
            raise ConfigError(f"{where}: {key} = {value!r} is not {what}")
        values[key] = value
    for kind, known in TABLE_KEYS.items():
        for entry, table in values.get(kind, {}).items():
            where = f"{path}:{line_of(text, entry, table=kind)}"
            if not rules.ENV_NAME.fullmatch(entry) or not isinstance(table, dict):
                raise ConfigError(f"{where}: [{kind}.{entry}] must be a table with a name of a-z, 0-9, - and _")
            for key, value in table.items():
                if key not in known:
                    raise ConfigError(f"{where}: unknown key {key!r} in [{kind}.{entry}]; known keys: {', '.join(known)}")
                kind_, valid, what = known[key]
                if isinstance(value, bool) or not isinstance(value, kind_) or not valid(value):
                    shown = "..." if key == "environment" else repr(value)  # it may hold a secret
                    raise ConfigError(f"{where}: [{kind}.{entry}] {key} = {shown} is not {what}")
                problems = rules.environment_problems(value) if key == "environment" else []
                if problems:  # names only: a value is never shown
                    raise ConfigError(f"{where}: [{kind}.{entry}.environment]: {'; '.join(problems)}")
    return HostSettings(name=name, source=path, **values)


def line_of(text: str, key: str, table: str | None = None) -> int:
    """The line a top-level key (or a [table.NAME]) is set on: TOML parsers do not say."""
    name = rf"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    pattern = re.compile(rf"^\s*\[\s*{table}\.{name}\s*\]" if table else rf"^\s*{name}\s*[=.]")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 1


def expand(names: list[str], hosts_dir: Path) -> list[str]:
    """Host names with groups (``hosts/groups.toml``: ``qa = ["oldbox", "spare"]``) expanded."""
    path = hosts_dir / "groups.toml"
    groups = {}
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            groups = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}; fix the TOML syntax there") from None
        for name, members in groups.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise ConfigError(f"{path}:{line_of(text, name)}: group {name} must be a list of host names")
    result = []
    for name in names:
        for host in groups.get(name, [name]):
            if check_host_name(host) not in result:
                result.append(host)
    return result
