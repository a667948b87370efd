"""What every command needs to find and reach hosts, passed around explicitly."""

from __future__ import annotations

import getpass
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import platformdirs

from qabox import hosts
from qabox.agent import rules
from qabox.agent.files import write_json
from qabox.errors import ConfigError

if TYPE_CHECKING:
    from qabox import ssh
    from qabox.remote import Remote

# paramiko (ssh, remote) loads only once a host is reached: a deploy checks its
# build meanwhile (build_check.Checking), and commands that reach none never load it.


def config_path(explicit: str | Path | None) -> Path | None:
    """``--ssh-config``, else ``$QABOX_SSH_CONFIG``, else ``~/.ssh/config`` if present;
    made absolute once, so that it means the same file in advice and child processes."""
    chosen = explicit or os.environ.get("QABOX_SSH_CONFIG")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise ConfigError(f"ssh config {path} does not exist: check --ssh-config or QABOX_SSH_CONFIG")
        return absolute(path)
    default = Path("~/.ssh/config").expanduser()
    return default if default.is_file() else None


def absolute(path: str | Path) -> Path:
    """``~`` expanded and a relative path taken from the current directory, as
    OpenSSH does with IdentityFile and UserKnownHostsFile (not from the config's)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


@dataclass(frozen=True)
class Context:
    """Where ssh_config, hosts files, local state and cached builds are; how to treat new host keys."""

    ssh_config: Path | None
    hosts_dir: Path
    state_dir: Path
    cache_dir: Path
    accept_new_host_key: bool = False

    @classmethod
    def create(cls, ssh_config=None, hosts_dir=None, accept_new_host_key=False) -> "Context":
        return cls(
            ssh_config=config_path(ssh_config),
            hosts_dir=Path(hosts_dir or os.environ.get("QABOX_HOSTS_DIR") or "hosts"),
            state_dir=Path(os.environ.get("QABOX_STATE_DIR") or platformdirs.user_state_dir("qabox")),
            cache_dir=Path(os.environ.get("QABOX_CACHE_DIR") or platformdirs.user_cache_dir("qabox")),
            accept_new_host_key=accept_new_host_key,
        )

    def target(self, name: str) -> ssh.Target:
        from qabox import ssh

        hosts.check_host_name(name)
        return ssh.resolve(name, self.ssh_config)

    @contextmanager
    def remote(self, name: str) -> Iterator[Remote]:
        """A connected agent on the named host, closed after the block."""
        from qabox import ssh
        from qabox.remote import Remote

        settings = self.settings(name)
        client = ssh.connect(self.target(name), self.accept_new_host_key)
        remote = Remote(name, client, settings)
        try:
            yield remote
        finally:
            remote.close()

    def settings(self, name: str) -> hosts.HostSettings:
        return hosts.load_settings(name, self.hosts_dir)

    def expand(self, names: list[str]) -> list[str]:
        """Host names as given, with groups (``hosts/groups.toml``) expanded."""
        return hosts.expand(names, self.hosts_dir)

    def host_files(self) -> list[str]:
        """Hosts with a hosts/NAME.toml (example.toml and groups.toml name none)."""
        return sorted(p.stem for p in self.hosts_dir.glob("*.toml") if p.stem not in ("example", "groups"))

    # Local state (hosts deployed to, testers' ports), as small JSON files.
    def load_state(self, name: str) -> dict | list:
        try:
            return json.loads((self.state_dir / name).read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, name: str, data) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_json(str(self.state_dir / name), data)

    def remember_host(self, name: str) -> None:
        """Hosts deployed to from this machine, so that a bare `qabox status` knows them."""
        if name in self.remembered_hosts():
            return  # known already: no lock, no write (and filelock need not load)
        from filelock import FileLock

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.state_dir / "hosts.json.lock"), timeout=10):
            self.save_state("hosts.json", sorted(set(self.remembered_hosts()) | {name}))

    def remembered_hosts(self) -> list[str]:
        return sorted(self.load_state("hosts.json") or [])


def check_env(env: str) -> str:
    """Env names become paths on the host: refuse anything but a plain name."""
    if not isinstance(env, str) or not rules.ENV_NAME.fullmatch(env):
        raise ConfigError(f"env name {env!r} is not allowed: use up to 32 of a-z, 0-9, - and _")
    return env


def whoami() -> str:
    """``user@machine``, recorded as who deployed a release or holds a lock."""
    return f"{getpass.getuser()}@{socket.gethostname()}"
