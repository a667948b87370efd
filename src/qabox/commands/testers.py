"""``qabox testers``: keys that reach an env's app through a tunnel and nothing else."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError
from qabox.expiry import iso_utc


def tester_add(ctx: Context, host: str, name: str, key_file: Path,
               envs: list[str] | None = None, expires: datetime | None = None) -> dict:
    """Install a tester's public key, restricted to their own ports on the host:
    of ``envs`` only (None: every env, also those deployed later), and until
    ``expires`` (an aware datetime; None: never). Adding again sets both anew."""
    check_env(name)  # tester names follow the same rule as env names
    for env in envs or ():
        check_env(env)
    try:
        key = key_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the tester's public key {key_file}: {e.strerror}") from None
    if key_file.suffix != ".pub" and "PRIVATE KEY" in key:
        raise ConfigError(f"{key_file} is a private key: pass the public one ({key_file}.pub)")
    with ctx.remote(host) as remote:
        return remote.call("tester-add", name=name, key=key, by=whoami(), sshd=remote.sshd_version,
                           envs=sorted(set(envs)) if envs else None, expires=iso_utc(expires), timeout=120)


def tester_extend(ctx: Context, host: str, name: str, expires: datetime | None) -> dict:
    """Change only a tester's expiry (None: never)."""
    check_env(name)
    with ctx.remote(host) as remote:
        return remote.call("tester-extend", name=name, expires=iso_utc(expires), sshd=remote.sshd_version,
                           timeout=120)


def tester_remove(ctx: Context, host: str, name: str) -> dict:
    check_env(name)
    with ctx.remote(host) as remote:
        return remote.call("tester-remove", name=name, timeout=120)


def tester_list(ctx: Context, host: str) -> dict:
    with ctx.remote(host) as remote:
        return remote.call("tester-list")
