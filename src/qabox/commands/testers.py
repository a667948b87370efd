"""``qabox testers``: keys that reach an env's app through a tunnel and nothing else."""

from __future__ import annotations

import getpass
import os
from datetime import datetime
from pathlib import Path

from qabox import ssh
from qabox.agent.files import write_text
from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError
from qabox.expiry import iso_utc
from qabox.invites import HOST_KEY_TYPES, Invite, address_option, generate_key


def tester_add(ctx: Context, host: str, name: str, key_file: Path | str,
               envs: list[str] | None = None, expires: datetime | None = None) -> dict:
    """Install a tester's public key (a .pub file, or the key line itself),
    restricted to their own ports on the host: of ``envs`` only (None: every
    env, also those deployed later), and until ``expires`` (an aware datetime;
    None: never). Adding again sets both anew."""
    check_env(name)  # tester names follow the same rule as env names
    for env in envs or ():
        check_env(env)
    key = key_file if isinstance(key_file, str) else public_key(key_file)
    with ctx.remote(host) as remote:
        return remote.call("tester-add", name=name, key=key, by=whoami(), sshd=remote.sshd_version,
                           envs=sorted(set(envs)) if envs else None, expires=iso_utc(expires), timeout=120)


def public_key(key_file: Path) -> str:
    try:
        key = key_file.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the tester's public key {key_file}: {e.strerror}") from None
    if key_file.suffix != ".pub" and "PRIVATE KEY" in key:
        raise ConfigError(f"{key_file} is a private key: pass the public one ({key_file}.pub)")
    return key


def tester_invite(ctx: Context, host: str, name: str, key_file: Path | None, output: Path,
                  envs: list[str] | None = None, expires: datetime | None = None,
                  address: str | None = None) -> tuple[dict, Invite]:
    """Add the tester (with a key made for them, unless ``key_file`` names theirs)
    and write their invite to ``output`` (0600 when it holds their key): the host
    as they reach it (``address``: HOST[:PORT], else as ssh_config says), the host
    keys known_hosts has for it, pinned."""
    writable(output)
    target = ctx.target(host)
    if address:
        hostname, port = address_option(address, target.port)
    elif target.proxy_jump or target.proxy_command:
        raise ConfigError(f"{host} is reached through {'ProxyJump' if target.proxy_jump else 'ProxyCommand'}: "
                          f"say where testers reach it with --address HOST[:PORT]")
    else:
        hostname, port = target.hostname, target.port
    known = ssh.known_key(target) or {}
    host_keys = tuple(f"{k.get_name()} {k.get_base64()}" for k in known.values() if k.get_name() in HOST_KEY_TYPES)
    if not host_keys:
        raise ConfigError(f"known_hosts has no key for {host} ({target.key_name}) to pin in the invite: "
                          f"trust the host first with `qabox hosts trust {host}`")
    private = None
    if key_file is None:
        private, key_file = generate_key(f"{name}@{host}-qabox-invite")
    result = tester_add(ctx, host, name, key_file, envs, expires)  # its login checks the keys pinned
    invite = Invite(host=host, address=hostname, port=port, account=target.user or getpass.getuser(),
                    host_keys=host_keys, tester=name, ports=result["ports"],
                    envs=None if result.get("envs") is None else tuple(result["envs"]),
                    expires=result.get("expires"), key=private)
    write_text(str(output), invite.encode() + "\n", 0o600 if private is not None else 0o644)
    return result, invite


def writable(path: Path) -> None:
    """Refuse before the tester is added if the invite cannot be written there."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write the invite to {path}: pick a writable place with -o FILE")


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
