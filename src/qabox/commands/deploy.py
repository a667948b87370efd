"""``qabox deploy``: check a build, send it once, and switch the env to it (on one host or many).

Order matters for "nothing half-done": the build is checked locally (while
connecting: nothing is written before it passed, and a new env is made only
then), the lock is taken before anything is written, only what the host
lacks is sent (the manifest, then the content it names that the host does not
hold, as one delta in a ``.part`` file the host verifies piece by piece), and
only a release that passed its health check becomes current (the agent and
supervisor see to that).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rich.filesize import decimal

from qabox.agent import manifest, rules
from qabox.build_check import Build, Checking, check_early
from qabox.context import Context, check_env, whoami
from qabox.errors import BuildError, ConfigError, ConnectError, QaboxError, RemoteError
from qabox.fleet import each_host
from qabox.paramiko_compat import paramiko
from qabox.remote import Remote

CHUNK = 1 << 20
STALL = 20.0


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
    entry: str = ""
    entry_reason: str | None = None  # why qabox picked the entry, when none was given
    built: str | None = None  # deploying a directory: its build was "built" now, or "cached"
    venv_created: bool = False
    wheels_linked: int = 0  # from the host's wheel cache, not installed by pip
    wheels_installed: int = 0
    pruned: list = field(default_factory=list)
    testers: list = field(default_factory=list)
    snapshot_skipped: str | None = None

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
           rebuild: bool = False, hooks: Hooks | None = None, checking: Checking | None = None) -> DeployResult:
    """Deploy the build at ``path`` (a build file, or a project directory to build
    for the host, cached) to ``host``/``env``; raises QaboxError on failure.
    ``checking`` is the file's check if the caller started it already (check_early)."""
    hooks = hooks or Hooks()
    started = time.monotonic()
    check_env(env)
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range: use 1-65535")
    settings = ctx.settings(host)
    limits = (settings.max_build_mb * 2**20, settings.max_build_members)
    project = path.is_dir()
    if not project:
        hooks.step("checking build")
        checking = checking or check_early(ctx, host, path, entry)
    hooks.step("connecting")
    with checking_first(checking), ctx.remote(host) as remote:
        target = None
        from qabox import build_check, host_python  # loaded by now: the Checking thread imports them
        if project:  # built before the lock is taken: resolving can take a while
            target = host_python.of_host(remote, host)
            hooks.step(f"building {path}")
            from qabox.build_cache import cached_build  # building brings pathspec, packaging, uv: only here

            built, report = cached_build(path, ctx.cache_dir, entry, target, rebuild)
            build = build_check.checked(built, None, *limits, ctx.cache_dir)
        hooks.step("waiting for the deploy lock")
        with locked_session(remote, env, lock_timeout, checking) as session:
            if checking:
                build = checking.result()
            server, server_options = settings.env_server(env, build.server, build.server_options)
            problems = rules.server_problems(server, server_options, f"{build.path.name} on {host}")
            if problems:
                raise ConfigError("; ".join(problems) + (f" (with {settings.source})" if settings.source else ""))
            if server != build.server and not build_check.build_brings(build, server):
                raise ConfigError(f"{settings.source} runs env {env} on {server}, which {build.path.name} does not "
                                  f"bring: add `{server}` to its requirements (qabox build adds it when its "
                                  f"qabox.toml says [app] server = \"{server}\"), or drop the override")
            ask = dict(  # what makes a deploy a change: upload-state answers "unchanged" if none is
                env=env, manifest=build.id, entry=build.entry, health=build.health,
                health_status=build.health_status, static=build.static, environment=build.environment,
                release_hooks=build.release_hooks, persist=list(build.persist), server=server,
                server_options=server_options, port=port or settings.env_port(env),
                hosts_environment=settings.env_environment(env), start_timeout=settings.start_timeout,
                health_interval=settings.health_interval, log_max_bytes=int(settings.log_max_mb * 2**20),
                spare_app=settings.spare_app,
                max_bytes=settings.max_build_mb * 2**20, max_members=settings.max_build_members)
            state = session.call("upload-state", **ask)
            sent = 0
            if not state.get("unchanged"):  # a build that runs there installs there (upload-state says its python)
                target = host_python.told(state["python"], host)
                host_python.check_build(build, target, host)
                if build.requirements is None:
                    host_python.check_host_servers(target, build, server, host)
            if "manifest_path" in state:  # a build new to the host
                listed = manifest.canonical(build.manifest)
                check_space(remote, len(listed), state["free_bytes"])
                send(remote, [listed], state["manifest_path"], 0, len(listed), Hooks())
                sent = len(listed)
                state = session.call("upload-state", uploaded=True, **ask)
            if state.get("unchanged"):
                data = state
            else:
                if state["blobs"]:
                    check_space(remote, state["size"] - state["part"], state["free_bytes"])
                    try:
                        sent += upload(remote, build, state, hooks)
                    except UploadFailed as e:
                        if e.code != "stalled":
                            # A full disk shows as a bare SFTP "Failure": ask the host, and clean up.
                            left = session.call("upload-state", timeout=15, discard=True, **ask)
                            check_space(remote, state["size"], left["free_bytes"])
                        raise
                data = session.call(
                    "deploy", timeout=900 + build.release_timeout, progress=hooks.step, file=path.name,
                    release_timeout=build.release_timeout, snapshot_max_bytes=build.snapshot_max_mb * 2**20,
                    keep=settings.keep, by=whoami(), **ask)
            if on_boot:
                session.call("on-boot")
    ctx.remember_host(host)
    return DeployResult(
        host=host, env=env, file=path.name, release=data["release"], previous=data.get("previous"),
        changed=data["changed"], port=data["port"], sent_bytes=sent,
        built=None if not project else "cached" if report is None else "built",
        seconds=round(time.monotonic() - started, 2), entry=build.entry, entry_reason=build.entry_reason, venv_created=data.get("venv_created", False),
        pruned=data.get("pruned", []), testers=data.get("testers", []),
        wheels_linked=data.get("wheels_linked", 0), wheels_installed=data.get("wheels_installed", 0),
        snapshot_skipped=data.get("snapshot_skipped"),
    )


@contextmanager
def checking_first(checking: Checking | None) -> Iterator[None]:
    """A build's own problem is reported before any trouble reaching its host:
    it is the first thing to fix, and it would stop the deploy anyway."""
    try:
        yield
    except QaboxError:
        if checking:
            checking.result()
        raise


@contextmanager
def locked_session(remote: Remote, env: str, lock_timeout: float, checking: Checking | None) -> Iterator:
    """The env's deploy lock. Taken while the build is still being checked, it
    is taken only on an existing env: a session makes the env it locks, and a
    build that fails its check must leave no new env behind. A new env is
    made, and locked, once the check has passed."""
    with ExitStack() as stack:
        try:
            session = stack.enter_context(remote.session(env, lock_timeout, whoami(), create=checking is None))
        except RemoteError as e:
            if e.code != "no_env":
                raise
            checking.result()
            session = stack.enter_context(remote.session(env, lock_timeout, whoami(), create=True))
        yield session


def deploy_many(ctx: Context, hosts: list[str], build: Path, parallel: int, fail_fast: bool,
                hooks_for: Callable[[str], Hooks], **options) -> list[dict]:
    """Deploy one build to many hosts at once; a row per host, in the order given.
    One host's failure never stops the others, unless ``fail_fast``."""
    rows = []
    for o in each_host(hosts, lambda host: deploy(ctx, host, build, hooks=hooks_for(host), **options),
                       parallel, fail_fast):
        if o.skipped:
            rows.append({"host": o.host, "ok": False, "release": None, "result": "skipped (--fail-fast)",
                         "seconds": 0.0})
        elif o.error:
            rows.append({"host": o.host, "ok": False, "release": None, "result": f"failed: {o.error.message}",
                         "seconds": None})
        else:
            rows.append({"host": o.host, "ok": True, "release": o.result.release,
                         "result": "deployed" if o.result.changed else "unchanged", "seconds": o.result.seconds})
    return rows


class Watchdog:
    """Closes the connection when an upload makes no progress for ``limit`` seconds.

    paramiko retries a blocked socket write for as long as the transport is
    open, so a cut link would hang the upload; closing it makes the write fail.
    """

    def __init__(self, client: paramiko.SSHClient, limit: float):
        self.client, self.limit = client, limit
        self.last = time.monotonic()
        self.fired = False
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            if time.monotonic() - self.last > self.limit:
                self.fired = True
                self.client.close()
                return

    def stop(self) -> None:
        self.done.set()


class UploadFailed(ConnectError):
    """The upload broke off; what was sent stays on the host for the next try."""


def check_space(remote: Remote, needed: int, free: int) -> None:
    """Refuse an upload that cannot fit (with 1 MB to spare), saying how much is missing."""
    wanted = needed + (1 << 20)
    if free < wanted:
        raise RemoteError(
            f"{remote.name}: the host's disk is full: {decimal(free)} free for {remote.settings.dir}, "
            f"the upload needs {decimal(wanted)} ({decimal(needed)} still to send and 1 MB to "
            f"spare), and extracting it more: free at least {decimal(wanted - free)} there and "
            f"deploy again", code="disk_full")


def upload(remote: Remote, build: Build, state: dict, hooks: Hooks) -> int:
    """Send the delta the host asked for (the content it lacks, in manifest
    order) to its ``.part`` file, resuming after what it holds of it already."""
    import tarfile  # build_check has it loaded by now

    offset = state["part"] if state["part"] <= state["size"] else 0
    try:
        with tarfile.open(build.path, "r|*") as tar:
            blocks = manifest.delta_blocks(tar, build.manifest, state["hashes"], offset)
            return send(remote, blocks, state["part_path"], offset, state["size"], hooks)
    except (tarfile.TarError, ValueError) as e:
        raise BuildError(f"{build.path.name} changed while it was sent ({e}): deploy it again") from None


def send(remote: Remote, blocks, part_path: str, offset: int, total: int, hooks: Hooks) -> int:
    """Write ``blocks`` to ``part_path`` over SFTP after its first ``offset`` bytes; the bytes sent.

    A write that makes no progress for STALL seconds (a cut link) fails the
    upload instead of hanging; the next deploy resumes where it stopped.
    """
    hooks.upload(offset, total)
    sftp = remote.sftp
    sftp.get_channel().settimeout(STALL)
    watchdog = Watchdog(remote.client, STALL)
    done = offset
    try:
        f = sftp.open(part_path, "r+b" if offset else "wb")
        f.chmod(0o600)
        f.set_pipelined(True)
        f.seek(offset)
        for block in blocks:
            for start in range(0, len(block), CHUNK):
                f.write(block[start:start + CHUNK])
            watchdog.progress()
            done += len(block)
            hooks.upload(done, total)
        f.close()  # waits for the host to acknowledge every write
    except (OSError, EOFError, paramiko.SSHException) as e:
        sftp.get_channel().close()  # not f.close(): it would wait for acks that never come
        if watchdog.fired or isinstance(e, socket.timeout):
            raise UploadFailed(f"{remote.name}: the upload stalled (no progress for {STALL:.0f} s): "
                               f"check the network, then deploy again to resume it", code="stalled") from None
        raise UploadFailed(f"{remote.name}: the upload failed ({e or type(e).__name__}); "
                           f"deploy again to resume it") from None
    finally:
        watchdog.stop()
    return done - offset
