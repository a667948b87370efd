"""``qabox hosts list``, ``check`` and ``trust``: what hosts there are, whether
each is ready for qabox (every check with its fix), and trusting a host's key."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.filesize import decimal

from qabox import ssh
from qabox.agent import rules
from qabox.agent.protocol import PROTOCOL, Fail
from qabox.context import Context
from qabox.errors import ConnectError, HostKeyError, QaboxError
from qabox.hosts import HOST_NAME
from qabox.paramiko_compat import paramiko

MIN_FREE = 500 * 10**6
MAX_SKEW = 60.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # passes, but says what an admin may want to change


def list_hosts(ctx: Context) -> list[dict]:
    """Hosts named by hosts/*.toml files and by ssh_config's plain Host entries."""
    names = set(ctx.host_files())
    if ctx.ssh_config:
        config = paramiko.SSHConfig.from_path(str(ctx.ssh_config))
        names |= {h for h in config.get_hostnames() if HOST_NAME.fullmatch(h)}
    rows = []
    for name in sorted(names):
        target = ctx.target(name)
        settings = ctx.settings(name)
        rows.append({"host": name, "address": target.hostname, "port": target.port, "user": target.user,
                     "envs": sorted(settings.envs) or (["main"] if settings.source else []),
                     "settings": str(settings.source) if settings.source else None})
    return rows


def tester_checks(remote, user: str | None) -> list[Check]:
    """What tester keys can do on this host's sshd.

    A key can be kept from listening on TCP ports (``permitlisten``, OpenSSH
    7.8+), but not from unix-socket forwards, which only sshd_config can turn
    off. qabox checks every socket's peer, so such a socket cannot fool it;
    an admin can still take the possibility away. As the deploy account we
    cannot read sshd_config, so we ask for such a forward and see.
    """
    banner = remote.sshd_version
    try:
        rules.check_sshd(banner)
        version = Check("sshd fits tester keys", True, banner)
    except Fail as e:
        version = Check("sshd fits tester keys", False, banner, e.message)
    transport = remote.client.get_transport()
    path = f"/tmp/qabox-probe-{secrets.token_hex(8)}.sock"
    allowed = transport.global_request("streamlocal-forward@openssh.com", (path,), wait=True) is not None
    if allowed:
        transport.global_request("cancel-streamlocal-forward@openssh.com", (path,), wait=True)
        try:
            remote.sftp.remove(path)
        except OSError:
            pass
    account = user or "DEPLOY_USER"
    forwards = Check("unix-socket forwards", True,
                     "possible for tester keys (qabox checks every socket's peer, so they cannot fool it)"
                     if allowed else "off", warning=allowed,
                     fix=f"to turn them off, an admin adds to sshd_config: "
                         f"`Match User {account}` / `    AllowStreamLocalForwarding no`, then reloads sshd")
    return [version, forwards]


def check_host(ctx: Context, name: str) -> list[Check]:
    """Connect and check everything a deploy needs, stopping at the first blocker."""
    target = ctx.target(name)
    settings = ctx.settings(name)
    try:
        with ctx.remote(name) as remote:
            checks = [Check("host key known", True, ssh.fingerprint(remote.client.get_transport().get_remote_server_key())),
                      Check("login works", True, f"{target.user or 'default user'}@{target.hostname}:{target.port}")]
            asked = time.time()
            facts = remote.call("hello", port=settings.env_port("main"))
            answered = time.time()
            checks += tester_checks(remote, target.user)
    except HostKeyError as e:
        return [Check("host key known", False, e.message, f"qabox hosts trust {name}")]
    except ConnectError as e:
        return [Check("host key known", True, "not reached"),
                Check("login works", False, e.message, f"check that `{ssh.ssh_command(target)}` works")]
    except QaboxError as e:
        return [Check("agent runs", False, e.message, f"set `python` in hosts/{name}.toml")]
    version = tuple(int(x) for x in facts["python"].split(".")[:2])
    skew = facts["time"] - (asked + answered) / 2
    port = settings.env_port("main") or 8080
    main = facts["envs"].get("main", {})
    port_ok = facts["port_free"] is not False or (main.get("port") == port and main.get("ours"))
    checks += [
        Check("python 3.6+", version >= (3, 6), f"{settings.python} is {facts['python']}",
              f"install Python 3.6+ on the host, or set `python` in hosts/{name}.toml"),
        Check("venv available", facts["venv"], "python -m venv" if facts["venv"] else "no venv/ensurepip module",
              "install the python3-venv package on the host"),
        Check("disk free", facts["free_bytes"] >= MIN_FREE, f"{decimal(facts['free_bytes'])} free at {facts['base']}",
              f"free at least {decimal(MIN_FREE)} there, or set `dir` in the hosts file to a roomier place"),
        Check("app port free", port_ok, f"127.0.0.1:{port}" + (" (the main env's own)" if main.get("ours") else ""),
              "stop what listens there, or set `port` in the hosts file"),
        server_check(settings, facts),
        Check("clock skew", abs(skew) <= MAX_SKEW, f"{skew:+.1f} s", "sync the host's clock (NTP)"),
        Check("agent version", facts["protocol"] == PROTOCOL, facts["agent"], "upgrade qabox here"),
    ]
    return checks


def server_check(settings, facts: dict) -> Check:
    """Whether the host's cores and memory fit the app processes its hosts file
    asks for (gunicorn's workers): a warning, never a failure, when they do not."""
    cores, memory = facts.get("cores"), facts.get("memory_bytes")
    deployed = facts.get("envs") or {}  # each env's current release: its server
    asked = {env: settings.env_server(env, deployed.get(env, {}).get("server") or rules.DEFAULT_SERVER,
                                      deployed.get(env, {}).get("server_options") or {})
             for env in dict.fromkeys(["main", *deployed, *settings.envs])}
    processes = {env: rules.server_processes(server, options, cores) for env, (server, options) in asked.items()}
    total = sum(processes.values())
    detail = (f"{cores or '?'} cores, {decimal(memory) if memory else '? bytes'} of memory; "
              + ", ".join(f"{env} on {server}" + (f" ({processes[env]} workers)" if server == "gunicorn" else "")
                          for env, (server, _) in asked.items()))
    over = [f"{env}'s {n} workers are more than 2 per core and one ({2 * cores + 1})"
            for env, n in processes.items() if cores and n > 2 * cores + 1]
    if memory and total * rules.PROCESS_MB * 10**6 > memory // 2:
        over.append(f"{total} app processes at about {rules.PROCESS_MB} MB each take more than half its memory")
    return Check("cores and memory fit the app servers", True, detail + ("; " + "; ".join(over) if over else ""),
                 "set fewer `workers` in the hosts file's server_options" if over else "", warning=bool(over))


@dataclass(frozen=True)
class HostKey:
    """The key a host presents, as ``hosts trust`` shows it."""

    host: str
    key_name: str  # the host's name in known_hosts: host or [host]:port
    kind: str  # ssh-ed25519, ...
    fingerprint: str


@dataclass(frozen=True)
class Trusted:
    key: HostKey
    added_to: Path | None  # the known_hosts file written, None if it was trusted already


def trust(ctx: Context, name: str, confirm: Callable[[HostKey], bool]) -> Trusted:
    """Add the host's key to known_hosts if ``confirm(key)`` says so; a key that
    differs from the known one is refused, whatever confirm would say."""
    target = ctx.target(name)
    key = ssh.server_key(target)
    known = ssh.known_key(target)
    shown = HostKey(name, target.key_name, key.get_name(), ssh.fingerprint(key))
    if known and key.get_name() in known:
        if known[key.get_name()] == key:
            return Trusted(shown, None)
        raise QaboxError(
            f"{name} ({target.key_name}) presents a DIFFERENT {key.get_name()} key than known_hosts "
            f"has ({shown.fingerprint}): refusing; if the host was reinstalled, remove the old key with "
            f"`ssh-keygen -R '{target.key_name}' -f {ssh.known_hosts_file(target)}` first")
    if not confirm(shown):
        raise QaboxError("not trusted: nothing was written")
    return Trusted(shown, ssh.add_known_host(target, key))
