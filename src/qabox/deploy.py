"""``qabox deploy``: check a build, send it once, and switch the env to it.

Order matters for "nothing half-done": the build is checked locally before
connecting, the lock is taken before anything is written, the upload lands in
a ``.part`` file the host verifies by sha256, and only a release that passed
its health check becomes current (the agent and supervisor see to that).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from qabox import build as builds
from qabox.context import Context, check_env, whoami
from qabox.errors import ConfigError, ConnectError
from qabox.remote import Remote

CHUNK = 1 << 20


@dataclass
class DeployResult:
    host: str
    env: str
    file: str
    release: str
    previous: str | None
    changed: bool
    port: int
    sent_bytes: int
    seconds: float
    venv_created: bool = False
    pruned: list = field(default_factory=list)
    testers: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def to_json(self) -> dict:
        return {**asdict(self), "url": self.url}


@dataclass
class Hooks:
    """How a deploy reports progress: the CLI shows it, tests ignore it."""

    step: Callable[[str], None] = lambda text: None
    upload: Callable[[int, int], None] = lambda sent, total: None


def deploy(ctx: Context, host: str, path: Path, env: str = "main", port: int | None = None,
           entry: str | None = None, lock_timeout: float = 60, on_boot: bool = False,
           hooks: Hooks | None = None) -> DeployResult:
    """Deploy the build at ``path`` to ``host``/``env``; raises QaboxError on failure."""
    hooks = hooks or Hooks()
    started = time.monotonic()
    check_env(env)
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range: use 1-65535")
    hooks.step("checking build")
    settings = ctx.settings(host)
    build = builds.inspect(path, entry, settings.max_build_mb * 2**20)
    hooks.step("connecting")
    with ctx.remote(host) as remote:
        hooks.step("waiting for the deploy lock")
        with remote.session(env, lock_timeout, whoami()) as session:
            state = session.call("upload-state", env=env, sha256=build.sha256)
            sent = 0
            if not state["have"]:
                sent = upload(remote, build, state["part_path"], state["part"], hooks)
            data = session.call(
                "deploy", timeout=900, progress=hooks.step, env=env, sha256=build.sha256,
                file=path.name, entry=build.entry, health=build.health,
                port=port or settings.env_port(env), keep=settings.keep, by=whoami(),
                start_timeout=settings.start_timeout, max_bytes=settings.max_build_mb * 2**20,
                health_interval=settings.health_interval,
                log_max_bytes=int(settings.log_max_mb * 2**20),
            )
            if on_boot:
                session.call("on-boot")
    ctx.remember_host(host)
    return DeployResult(
        host=host, env=env, file=path.name, release=data["release"], previous=data.get("previous"),
        changed=data["changed"], port=data["port"], sent_bytes=sent,
        seconds=round(time.monotonic() - started, 2), venv_created=data.get("venv_created", False),
        pruned=data.get("pruned", []), testers=data.get("testers", []),
    )


def upload(remote: Remote, build: builds.Build, part_path: str, offset: int, hooks: Hooks) -> int:
    """Send the build to its ``.part`` file over SFTP, resuming after ``offset`` bytes."""
    if offset > build.size:
        offset = 0
    hooks.upload(offset, build.size)
    try:
        with open(build.path, "rb") as local, remote.sftp.open(part_path, "r+b" if offset else "wb") as f:
            f.chmod(0o600)
            f.set_pipelined(True)
            local.seek(offset)
            f.seek(offset)
            done = offset
            while block := local.read(CHUNK):
                f.write(block)
                done += len(block)
                hooks.upload(done, build.size)
    except OSError as e:
        if "No space left" in str(e) or getattr(e, "errno", None) == 28:
            raise ConnectError(f"{remote.name}: the host's disk is full: free some space in "
                               f"{remote.settings.dir} and deploy again") from None
        raise ConnectError(f"{remote.name}: the upload failed ({e}); deploy again to resume it") from None
    return build.size - offset
