"""Operating an env after deploy: start, stop, restart, rollback, releases, logs, testers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError

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


def tester_add(ctx: Context, host: str, name: str, key_file: Path) -> dict:
    """Install a tester's public key, restricted to their own ports on the host."""
    check_env(name)  # tester names follow the same rule as env names
    try:
        key = key_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the tester's public key {key_file}: {e.strerror}") from None
    if key_file.suffix != ".pub" and "PRIVATE KEY" in key:
        raise ConfigError(f"{key_file} is a private key: pass the public one ({key_file}.pub)")
    with ctx.remote(host) as remote:
        return remote.call("tester-add", name=name, key=key, by=whoami(), sshd=remote.sshd_version,
                           timeout=120)


def tester_remove(ctx: Context, host: str, name: str) -> dict:
    with ctx.remote(host) as remote:
        return remote.call("tester-remove", name=name, timeout=120)


def tester_list(ctx: Context, host: str) -> dict:
    with ctx.remote(host) as remote:
        return remote.call("tester-list")
