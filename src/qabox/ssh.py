"""SSH connections that behave like ``ssh NAME``: ssh_config, keys, known_hosts.

Host keys are always verified against known_hosts. An unknown key is refused
with its fingerprint and the command that trusts it; a changed key is refused,
full stop. paramiko's AutoAddPolicy is never used. A tester's joined invite
gives a target of its own whose only known_hosts is the key it pinned.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from qabox.context import absolute
from qabox.errors import ConfigError, ConnectError, HostKeyError
from qabox.paramiko_compat import paramiko

DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")

# paramiko's transport threads log tracebacks of failures qabox reports itself
# in one line; without a handler, Python would print them to stderr.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Target:
    """Where and how to log in, as ssh_config resolves an alias."""

    alias: str
    hostname: str
    port: int = 22
    user: str | None = None
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    known_hosts: tuple[str, ...] = DEFAULT_KNOWN_HOSTS
    proxy_jump: str | None = None
    proxy_command: str | None = None
    connect_timeout: float = 10.0
    keepalive: int = 15
    config_file: str | None = field(default=None, compare=False)
    pinned_by: str | None = None  # the invite whose key alone is trusted: never a new one


    @property
    def key_name(self) -> str:
        """The host's name in known_hosts: ``host`` or ``[host]:port``."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def ssh_command(target: Target) -> str:
    """The ``ssh`` command that reaches the target as qabox does, for advice:
    with ``-F`` when qabox's ssh_config is not the one ssh reads by itself."""
    if target.pinned_by:
        key = "".join(f" -i {shlex.quote(p)}" for p in target.identity_files)
        return (f"ssh{key} -o UserKnownHostsFile={shlex.quote(target.known_hosts[0])} -p {target.port} "
                f"{target.user}@{target.hostname}")
    config = target.config_file
    if config and Path(config) != absolute("~/.ssh/config"):
        return f"ssh -F {shlex.quote(config)} {target.alias}"
    return f"ssh {target.alias}"


def resolve(alias: str, ssh_config: Path | None) -> Target:
    """Resolve a host alias through ssh_config, as ``ssh -G`` would."""
    config = paramiko.SSHConfig()
    if ssh_config:
        try:
            config = paramiko.SSHConfig.from_path(str(ssh_config))
        except Exception as e:  # paramiko raises several types for a bad file
            raise ConfigError(f"{ssh_config}: cannot parse it: {e}") from None
    user, _, host = alias.rpartition("@") if "@" in alias else (None, "", alias)
    found = config.lookup(host)
    try:
        port = int(found.get("port", 22))
        timeout = float(found.get("connecttimeout", 10))
        keepalive = int(found.get("serveraliveinterval", 15))
    except ValueError as e:
        raise ConfigError(f"{ssh_config}: bad value for host {host}: {e}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{ssh_config}: port {port} for host {host} is out of range (1-65535)")
    known = found.get("userknownhostsfile")
    return Target(
        alias=alias,
        hostname=found.get("hostname", host),
        port=port,
        user=user or found.get("user"),
        identity_files=tuple(str(absolute(p)) for p in found.get("identityfile", [])),
        identities_only=found.get("identitiesonly", "no").lower() == "yes",
        known_hosts=tuple(str(absolute(p)) for p in known.split()) if known else DEFAULT_KNOWN_HOSTS,
        proxy_jump=None if found.get("proxyjump", "none") == "none" else found["proxyjump"],
        proxy_command=None if found.get("proxycommand", "none") == "none" else found["proxycommand"],
        connect_timeout=timeout,
        keepalive=keepalive,
        config_file=str(ssh_config) if ssh_config else None,
    )


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a host key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class UnknownHostKey(Exception):
    def __init__(self, key: paramiko.PKey):
        self.key = key


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """Refuse any host whose key is not in known_hosts (as StrictHostKeyChecking=yes)."""

    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(key)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """Trust a first-seen key and record it (StrictHostKeyChecking=accept-new)."""

    def __init__(self, target: Target):
        self.target = target

    def missing_host_key(self, client, hostname, key):
        add_known_host(self.target, key)


def known_hosts_file(target: Target) -> Path:
    """The file new keys are written to: the first known_hosts file."""
    return Path(os.path.expanduser(target.known_hosts[0]))


def add_known_host(target: Target, key: paramiko.PKey) -> Path:
    path = known_hosts_file(target)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{target.key_name} {key.get_name()} {key.get_base64()}\n")
    return path


def trust_hint(target: Target) -> str:
    return f"qabox hosts trust {target.alias}"


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once (Linux). sshd
    keeps Nagle's algorithm on until a session starts, so its reply to a
    channel open waits for the ACK of the packet it sent just before, and the
    kernel delays that ACK by 40 ms: every connection's first channel paid it."""

    def recv(self, bufsize, flags=0):
        data = super().recv(bufsize, flags)
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


def dial(target: Target) -> socket.socket:
    """A TCP connection to the target's sshd."""
    host = target.hostname
    if host.isascii():  # a str would be encoded with the idna codec, loaded for it (5 ms)
        host = host.encode()
    sock = socket.create_connection((host, target.port), timeout=target.connect_timeout)
    if not hasattr(socket, "TCP_QUICKACK"):
        return sock
    quick = _QuickAckSocket(fileno=sock.detach())
    quick.settimeout(target.connect_timeout)
    return quick


def gcm_first_transport(sock, *args, **kwargs) -> paramiko.Transport:
    """paramiko's Transport, offering AES-GCM first: one pass per packet instead
    of AES-CTR and then an HMAC, so less CPU at both ends (uploads, tunnels).
    On a TCP socket of its own (no proxy), small requests must not wait on
    Nagle's algorithm."""
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = paramiko.Transport(sock, *args, **kwargs)
    options = t.get_security_options()
    first = tuple(c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if c in options.ciphers)
    options.ciphers = first + tuple(c for c in options.ciphers if c not in first)
    return t


def connect(target: Target, accept_new_host_key: bool = False, _jumped: int = 0) -> paramiko.SSHClient:
    """A logged-in SSHClient for the target, or a ConnectError/HostKeyError saying why."""
    client = paramiko.SSHClient()
    for path in target.known_hosts:
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            try:
                client.load_system_host_keys(path)
            except (OSError, paramiko.SSHException) as e:
                raise ConfigError(f"known_hosts file {path} cannot be read: {e}") from None
    accept_new = accept_new_host_key and not target.pinned_by
    client.set_missing_host_key_policy(_AcceptNew(target) if accept_new else _RefuseUnknown())
    where = f"{target.user + '@' if target.user else ''}{target.hostname}:{target.port}"
    sock = None
    try:
        sock = _proxy_sock(target, accept_new, _jumped) or dial(target)
        client.connect(
            target.hostname,
            port=target.port,
            username=target.user,
            key_filename=[p for p in target.identity_files if os.path.isfile(p)] or None,
            allow_agent=not target.identities_only,
            look_for_keys=not target.identity_files,
            timeout=target.connect_timeout,
            banner_timeout=target.connect_timeout,
            auth_timeout=target.connect_timeout,
            channel_timeout=target.connect_timeout,
            sock=sock,
            transport_factory=gcm_first_transport,
        )
    except (UnknownHostKey, paramiko.BadHostKeyException) as e:
        client.close()
        raise _host_key_error(target, e) from None
    except paramiko.AuthenticationException:
        client.close()
        if target.pinned_by:
            raise ConnectError(
                f"SSH login to {where} ({target.alias}) was refused: your invite ({target.pinned_by}) may "
                f"have been replaced, removed or expired; ask the developer for a new one",
                code="login_refused") from None
        raise ConnectError(
            f"SSH login to {where} ({target.alias}) was refused: check the user and key "
            f"(User/IdentityFile in ssh_config, or `ssh-add`), and that `{ssh_command(target)}` works",
            code="login_refused") from None
    except socket.gaierror:
        client.close()
        if target.pinned_by:
            raise ConnectError(f"host {target.hostname!r} (from your invite) does not resolve: check your "
                               f"network or VPN, or ask the developer for an invite with --address") from None
        raise ConnectError(
            f"host {target.hostname!r} does not resolve: add `Host {target.alias}` with a HostName "
            f"to {target.config_file or '~/.ssh/config'}, or use the host's address"
        ) from None
    except (OSError, paramiko.SSHException, EOFError) as e:
        client.close()
        reason = str(e) or type(e).__name__
        raise ConnectError(
            f"cannot connect to {where} ({target.alias}): {reason}; check the host is up and "
            f"that `{ssh_command(target)}` works"
        ) from None
    client.get_transport().set_keepalive(target.keepalive)
    return client


def _host_key_error(target: Target, e: Exception) -> HostKeyError:
    """Why the host's key is refused, and what to do: a developer trusts a host's
    new key themselves; a tester's invite pinned one key, and only that one counts."""
    if target.pinned_by:
        return HostKeyError(
            f"host {target.alias} ({target.key_name}) presented the host key {e.key.get_name()} "
            f"{fingerprint(e.key)}, not a key your invite ({target.pinned_by}) pinned: refusing to "
            f"connect; ask the developer whether the host was reinstalled, and for a new invite")
    if isinstance(e, UnknownHostKey):
        return HostKeyError(
            f"host {target.alias} ({target.key_name}) has an unknown host key {e.key.get_name()} "
            f"{fingerprint(e.key)}: if that is the host's key, trust it with "
            f"`{trust_hint(target)}` or deploy with --accept-new-host-key")
    return HostKeyError(
        f"host {target.alias} ({target.key_name}) sent a DIFFERENT host key than known_hosts "
        f"has ({fingerprint(e.key)}, expected {fingerprint(e.expected_key)}): refusing to "
        f"connect; if the host was reinstalled, remove the old key with "
        f"`ssh-keygen -R '{target.key_name}' -f {known_hosts_file(target)}` and trust it again")


def _proxy_sock(target: Target, accept_new: bool, jumped: int):
    """A socket-like object through ProxyJump or ProxyCommand, or None to dial directly."""
    if target.proxy_jump:
        if jumped > 8:
            raise ConfigError(f"ProxyJump for {target.alias} loops: check your ssh_config")
        hops = target.proxy_jump.split(",")
        last = hops[-1].strip()
        user, _, hostport = last.rpartition("@")
        host, _, port = hostport.partition(":")
        config = Path(target.config_file) if target.config_file else None
        jump = resolve(host, config)
        jump = replace(jump, user=user or jump.user, port=int(port) if port else jump.port,
                        proxy_jump=",".join(hops[:-1]) or jump.proxy_jump)
        jump_client = connect(jump, accept_new, jumped + 1)
        channel = jump_client.get_transport().open_channel(
            "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
            timeout=target.connect_timeout,
        )
        channel._qabox_jump = jump_client  # keep the jump host's client alive with the channel
        return channel
    if target.proxy_command:
        return paramiko.ProxyCommand(target.proxy_command)
    return None


def server_key(target: Target) -> paramiko.PKey:
    """The host key the server presents, without logging in (for ``hosts trust``)."""
    sock = _proxy_sock(target, False, 0)
    try:
        if sock is None:
            sock = dial(target)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=target.connect_timeout)
            return transport.get_remote_server_key()
        finally:
            transport.close()
    except socket.gaierror:
        raise ConnectError(f"host {target.hostname!r} does not resolve: check your ssh_config") from None
    except (OSError, paramiko.SSHException, EOFError) as e:
        raise ConnectError(f"cannot connect to {target.hostname}:{target.port}: {e or type(e).__name__}") from None


def known_key(target: Target) -> paramiko.PKey | None:
    """The key known_hosts has for the target (of the given type), if any."""
    keys = paramiko.HostKeys()
    for path in target.known_hosts:
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            keys.load(path)
    return keys.lookup(target.key_name)
