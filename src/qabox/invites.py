"""Invites: everything a tester's side needs, in one line a developer can send.

``qabox-invite:1:<base64url of compact JSON>``: the host's address as the
tester reaches it, the deploy account, the host's public keys (pinned, so the
tester never trusts a key on first use), the tester's name, envs and ports,
the expiry, and maybe a private key made for them. Decoding checks all of it:
the invite comes from a chat, a mail or a file, and is never trusted as it is.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shlex
from dataclasses import asdict, dataclass, field

from qabox.agent.rules import ENV_NAME
from qabox.errors import ConfigError
from qabox.hosts import HOST_NAME

PREFIX = "qabox-invite:"
VERSION = 1
MAX_LENGTH = 20_000
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
ADDRESS = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]+")  # a name, IPv4 or IPv6
ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
EXPIRES = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")
FIRST_LOCAL_PORT = 8080  # the plain-ssh command's local ports: 8080, 8081, ... one per env


class InviteError(ConfigError):
    """An invite that cannot be used as it is: nothing was stored."""


@dataclass(frozen=True)
class Invite:
    host: str  # the developer's name for the host: the tester's --host
    address: str
    port: int
    account: str
    host_keys: tuple[str, ...]  # "type base64" each, as in known_hosts
    tester: str
    ports: dict = field(default_factory=dict)  # env -> the tester's port on the host
    envs: tuple[str, ...] | None = None  # their scope: None for every env
    expires: str | None = None  # ISO UTC
    key: str | None = field(default=None, repr=False)  # their private key (OpenSSH), if made for them

    @property
    def key_name(self) -> str:
        """The host's name in known_hosts, as OpenSSH looks it up."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def known_hosts_lines(self) -> list[str]:
        return [f"{self.key_name} {key}" for key in self.host_keys]

    def encode(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["host_keys"], data["envs"] = list(self.host_keys), None if self.envs is None else list(self.envs)
        payload = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
        return f"{PREFIX}{VERSION}:{base64.urlsafe_b64encode(payload).decode().rstrip('=')}"

    def ssh_command(self, key: str, known_hosts: str) -> str | None:
        """The plain OpenSSH command of this tunnel (None while the tester has no port):
        it trusts the pinned key only, and offers only the tester's key."""
        if not self.ports:
            return None
        forwards = " ".join(f"-L {FIRST_LOCAL_PORT + i}:127.0.0.1:{port}"
                            for i, (_, port) in enumerate(sorted(self.ports.items())))
        return (f"ssh -N {forwards} -i {shlex.quote(key)} -o IdentitiesOnly=yes "
                f"-o UserKnownHostsFile={shlex.quote(known_hosts)} -o StrictHostKeyChecking=yes "
                f"-o ExitOnForwardFailure=yes -o ServerAliveInterval=15 -p {self.port} "
                f"{self.account}@{self.address}")

    def local_urls(self) -> list[str]:
        """What the plain-ssh command's forwards serve, env by env."""
        return [f"{env}: http://127.0.0.1:{FIRST_LOCAL_PORT + i}" for i, env in enumerate(sorted(self.ports))]


def decode(text: str) -> Invite:
    """The invite in ``text`` (its line, also wrapped by a chat), checked; else an InviteError."""
    text = "".join(text.split())
    if not text.startswith(PREFIX):
        raise InviteError(f"that is not a qabox invite: it starts with {PREFIX}{VERSION}:")
    version, _, payload = text[len(PREFIX):].partition(":")
    if version != str(VERSION):
        raise InviteError(f"this invite is of version {version[:10]!r}, this qabox reads version {VERSION}: "
                          f"upgrade qabox, or ask for a new invite")
    if len(payload) > MAX_LENGTH or not BASE64URL.fullmatch(payload):
        raise InviteError("this invite is damaged (not base64url): copy the whole line again")
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        raise InviteError("this invite is damaged (not JSON inside): copy the whole line again") from None
    if not isinstance(data, dict):
        raise InviteError("this invite is damaged (not a JSON object inside): ask for a new one")
    return checked(data)


def checked(data: dict) -> Invite:
    """An Invite of the decoded JSON, every field checked (unknown fields are a newer qabox's: ignored)."""
    def field_(name: str, ok) -> object:
        value = data.get(name)
        if not ok(value):
            raise InviteError(f"this invite's {name} is missing or not valid ({str(value)[:60]!r}): "
                              f"ask for a new invite")
        return value

    def is_int(v, low: int, high: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    invite = Invite(
        host=field_("host", lambda v: isinstance(v, str) and bool(HOST_NAME.fullmatch(v))),
        address=field_("address", lambda v: isinstance(v, str) and bool(ADDRESS.fullmatch(v))),
        port=field_("port", lambda v: is_int(v, 1, 65535)),
        account=field_("account", lambda v: isinstance(v, str) and bool(ACCOUNT.fullmatch(v))),
        host_keys=tuple(field_("host_keys", lambda v: isinstance(v, list) and 1 <= len(v) <= 8
                               and all(isinstance(k, str) for k in v))),
        tester=field_("tester", lambda v: isinstance(v, str) and bool(ENV_NAME.fullmatch(v))),
        ports=field_("ports", lambda v: isinstance(v, dict) and all(
            isinstance(e, str) and ENV_NAME.fullmatch(e) and is_int(p, 1, 65535) for e, p in v.items())),
        envs=scope(field_("envs", lambda v: v is None or isinstance(v, list) and all(
            isinstance(e, str) and ENV_NAME.fullmatch(e) for e in v))),
        expires=field_("expires", lambda v: v is None or isinstance(v, str) and bool(EXPIRES.fullmatch(v))),
        key=field_("key", lambda v: v is None or isinstance(v, str) and len(v) < 4096),
    )
    for line in invite.host_keys:
        check_host_key(line)
    if invite.key is not None:
        check_private_key(invite.key)
    return invite


def scope(envs) -> tuple[str, ...] | None:
    return None if envs is None else tuple(envs)


def check_host_key(line: str) -> None:
    """A host public key as known_hosts holds it: a known type, whose blob says that type."""
    from qabox.paramiko_compat import paramiko

    kind, _, blob = line.partition(" ")
    if kind not in HOST_KEY_TYPES or not blob or " " in blob:
        raise InviteError(f"this invite pins a host key of type {kind[:40]!r}: qabox takes "
                          f"{', '.join(HOST_KEY_TYPES)}; ask for a new invite")
    try:
        paramiko.PKey.from_type_string(kind, base64.b64decode(blob, validate=True))
    except Exception:  # binascii.Error, SSHException, ValueError... for a blob that is not a key
        raise InviteError(f"this invite's pinned {kind} host key is damaged: ask for a new invite") from None


def check_private_key(text: str) -> None:
    """The tester's private key: an unencrypted OpenSSH ed25519 key, as ``testers invite`` makes."""
    import io

    from qabox.paramiko_compat import paramiko

    try:
        paramiko.Ed25519Key.from_private_key(io.StringIO(text))
    except Exception:  # paramiko raises several types for a bad key
        raise InviteError("this invite's private key is damaged or not an ed25519 key: ask for a new invite") from None


def generate_key(comment: str) -> tuple[str, str]:
    """A fresh ed25519 key pair: the private key (OpenSSH format) and its public line.
    paramiko cannot make ed25519 keys; cryptography (which paramiko needs) can."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def address_option(text: str, default_port: int) -> tuple[str, int]:
    """``--address HOST[:PORT]`` (``[v6]:PORT`` for IPv6): what testers connect to."""
    host, port = text, default_port
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if bracketed:
        host, port = bracketed.group(1), int(bracketed.group(2) or default_port)
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = int(number) if number.isdigit() else 0
    if not ADDRESS.fullmatch(host) or not 1 <= port <= 65535:
        raise ConfigError(f"--address {text!r} is not HOST[:PORT] (a name or an IP address, a port from 1 to 65535)")
    return host, port

