"""``qabox testers``: keys that reach an env's app through a tunnel and nothing else."""

from __future__ import annotations

from pathlib import Path

from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError


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
    check_env(name)
    with ctx.remote(host) as remote:
        return remote.call("tester-remove", name=name, timeout=120)


def tester_list(ctx: Context, host: str) -> dict:
    with ctx.remote(host) as remote:
        return remote.call("tester-list")
