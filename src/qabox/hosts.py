"""qabox's own per-host settings: the optional ``hosts/NAME.toml`` files.

SSH itself (address, user, keys, jumps) comes from ssh_config, as for ``ssh``;
these files only add what qabox needs to know on top.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qabox.errors import ConfigError

HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,253}$")


@dataclass(frozen=True)
class HostSettings:
    """What qabox needs to know about a host besides how to SSH to it."""

    name: str
    dir: str = ".qabox"
    port: int = 8080
    keep: int = 5
    python: str = "python3"
    start_timeout: float = 30.0
    max_build_mb: int = 2048
    source: Path | None = None


# key: (type, check, what a valid value is)
KEYS = {
    "dir": (str, lambda v: bool(v.strip()) and "\x00" not in v, "a directory path"),
    "port": (int, lambda v: 1 <= v <= 65535, "a port from 1 to 65535"),
    "keep": (int, lambda v: 1 <= v <= 100, "a number of releases from 1 to 100"),
    "python": (str, lambda v: bool(v.strip()) and "\x00" not in v, "a python command"),
    "start_timeout": ((int, float), lambda v: 1 <= v <= 600, "seconds from 1 to 600"),
    "max_build_mb": (int, lambda v: 1 <= v <= 1024 * 1024, "megabytes, at least 1"),
}


def check_host_name(name: str) -> str:
    if not HOST_NAME.match(name or ""):
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
        if isinstance(value, bool) or not isinstance(value, kind) or not valid(value):
            raise ConfigError(f"{where}: {key} = {value!r} is not {what}")
        values[key] = value
    return HostSettings(name=name, source=path, **values)


def line_of(text: str, key: str) -> int:
    """The line a top-level key is set on (TOML parsers do not say)."""
    pattern = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*[=.]")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return 1
