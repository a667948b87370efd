"""Talking to the host-side agent over an SSH connection.

The agent file is pushed once per version (its name carries its hash) and run
with the host's python; requests and results are JSON lines, so no user text
is ever pasted into a shell command.
"""

from __future__ import annotations

import json
import posixpath
import secrets
import shlex
import socket
import threading
import time
from contextlib import contextmanager
from functools import cached_property
from typing import Callable, Iterator

from qabox.agent.protocol import PROTOCOL
from qabox.agent_zip import AGENT_HASH, AGENT_PYZ
from qabox.errors import ConnectError, LockHeld, RemoteError
from qabox.hosts import HostSettings
from qabox.paramiko_compat import paramiko

AGENT_MISSING = 97

# What a failed agent run's exit code usually means, and what to do about it.
EXIT_ADVICE = {
    126: "the python command on the host is not executable: set `python` in hosts/{host}.toml",
    127: "`{python}` was not found on the host: install Python 3.6+ there, or set `python` "
         "in hosts/{host}.toml",
}


class Remote:
    """One host's agent, reached through a logged-in SSH client."""

    def __init__(self, name: str, client: paramiko.SSHClient, settings: HostSettings):
        self.name = name
        self.client = client
        self.settings = settings
        self.base = settings.dir[2:] if settings.dir.startswith("~/") else settings.dir
        self.agent_path = posixpath.join(self.base, "agent", f"agent-{AGENT_HASH}.pyz")

    @property
    def sshd_version(self) -> str:
        """The host's SSH banner, e.g. ``SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6``."""
        return self.client.get_transport().remote_version

    @cached_property
    def sftp(self) -> paramiko.SFTPClient:
        return self.client.open_sftp()

    def close(self) -> None:
        self.client.close()

    def _command(self) -> str:
        path = shlex.quote(self.agent_path)
        return f"test -f {path} || exit {AGENT_MISSING}; exec {shlex.quote(self.settings.python)} {path}"

    def _open(self, cmd: str, args: dict) -> paramiko.Channel:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectError(f"the connection to {self.name} was lost: run the command again")
        channel = None
        request = {"protocol": PROTOCOL, "cmd": cmd, "args": {"base": self.base, **args}}
        try:
            channel = transport.open_session(timeout=15)
            channel.exec_command(self._command())
            channel.sendall(json.dumps(request).encode() + b"\n")
        except (paramiko.SSHException, OSError, EOFError) as e:
            # A command that ended at once (exit 97: no agent yet) may close the
            # channel before the request goes out: the caller reads its status.
            if channel is None or not channel.exit_status_ready():
                raise ConnectError(f"the connection to {self.name} failed: {e or type(e).__name__}") from None
        return channel

    def call(self, cmd: str, timeout: float = 60, progress: Callable[[str], None] | None = None,
             **args) -> dict:
        """Run one agent command and return its data; progress lines go to ``progress``."""
        return self._run(cmd, args, timeout, _progress_only(progress), keep_open=False)

    def follow(self, cmd: str, on_message: Callable[[dict], None], idle: float = 20,
               feed: Callable[[Callable[[dict], None]], None] | None = None, **args) -> dict:
        """Run a command that streams messages until its result, or until Ctrl-C.

        The agent sends heartbeats while it has nothing to say, so a link that
        died is noticed within ``idle`` seconds instead of hanging for ever.
        ``feed(send)``, run in a thread of its own from the agent's first
        message on (so that nothing it reads is lost on a channel that found no
        agent), sends the command messages of its own while it runs (``run``'s stdin).
        """
        return self._run(cmd, args, float("inf"), on_message, keep_open=True, idle=idle, feed=feed)

    def _run(self, cmd: str, args: dict, timeout: float, on_message, keep_open: bool,
             idle: float | None = None, feed=None) -> dict:
        """One agent command on its own channel; pushes the agent first if the host lacks it."""
        for attempt in range(2):
            channel = self._open(cmd, args)
            session = Session(self, channel) if keep_open else None  # heartbeats keep it open
            if session is None:
                channel.shutdown_write()
            try:
                result, status, stderr = self._read(channel, timeout, _feeding(on_message, feed, session),
                                                    idle=idle)
            finally:
                (session or channel).close()
            if status == AGENT_MISSING and attempt == 0:
                self.push_agent()
                continue
            return self._result(cmd, result, status, stderr)
        raise AssertionError("unreachable")

    def _read(self, channel: paramiko.Channel, timeout: float, on_message, idle: float | None = None) -> tuple:
        """Read JSON lines until the result line (the one with "ok") or the channel ends."""
        deadline = time.monotonic() + timeout
        heard = time.monotonic()
        channel.settimeout(0.5)
        buffer, stderr, result = b"", b"", None
        while result is None:
            clock = time.monotonic()
            if clock > deadline:
                raise RemoteError(f"{self.name} did not answer within {timeout:.0f} s: "
                                  f"check the host's load and network, then run the command again")
            if idle is not None and clock - heard > idle:
                raise ConnectError(f"the connection to {self.name} went silent for {idle:.0f} s "
                                   f"(network down or host frozen): run the command again")
            try:
                chunk = channel.recv(65536)
            except socket.timeout:
                chunk = None
            except OSError as e:
                raise ConnectError(f"the connection to {self.name} broke: {e}") from None
            while channel.recv_stderr_ready():
                stderr += channel.recv_stderr(65536)
            if chunk == b"":
                break
            if chunk:
                heard = clock
                buffer += chunk
                while b"\n" in buffer and result is None:
                    line, buffer = buffer.split(b"\n", 1)
                    message = _parse(line)
                    if message is None:
                        continue
                    if "ok" in message:
                        result = message
                    elif on_message:
                        on_message(message)
        if result is None and buffer.strip():
            result = _parse(buffer)
        if result is None and not channel.get_transport().is_active():
            raise ConnectError(f"the connection to {self.name} was lost (network down or sshd "
                               f"restarted): run the command again")
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(65536)
        status = channel.recv_exit_status() if result is None else 0
        return result, status, stderr.decode("utf-8", "replace")

    def _result(self, cmd: str, result: dict | None, status: int, stderr: str) -> dict:
        if result is None:
            if status in EXIT_ADVICE:
                advice = EXIT_ADVICE[status].format(host=self.name, python=self.settings.python)
                raise RemoteError(f"cannot run the qabox agent on {self.name}: {advice}")
            last = stderr.strip().splitlines()[-1:] or [f"exit status {status}"]
            raise RemoteError(f"the qabox agent on {self.name} failed ({cmd}): {last[0]}",
                              log=stderr.strip().splitlines()[-20:])
        if result.get("ok"):
            data = result.get("data") or {}
            data["changed"] = result.get("changed", False)
            return data
        error = result.get("error") or {}
        kind = LockHeld if error.get("code") == "lock_held" else RemoteError
        raise kind(f"{self.name}: {error.get('message', 'the agent failed')}",
                   log=error.get("log") or [], code=error.get("code"))

    def push_agent(self) -> None:
        """Install this version of the agent on the host (0700 directory, atomic
        rename), then have it make itself the host's newest (see agents.cmd_install)."""
        sftp = self.sftp
        path = ""
        for part in posixpath.dirname(self.agent_path).split("/"):
            path = posixpath.join(path, part) if path else part
            try:
                sftp.mkdir(path, 0o700)
            except OSError:
                pass  # exists already
        tmp = f"{self.agent_path}.{secrets.token_hex(4)}.tmp"  # two qabox may push at once
        with sftp.open(tmp, "wb") as f:
            f.chmod(0o600)
            f.write(AGENT_PYZ)
        sftp.posix_rename(tmp, self.agent_path)
        self.call("install")

    @contextmanager
    def session(self, env: str, lock_timeout: float, by: str, create: bool = False) -> Iterator["Session"]:
        """Hold the env's deploy lock on the host and run requests under it.

        One agent process holds the lock for as long as this channel is open
        and hears from us (heartbeats), so a client that dies or loses its
        network can never leave the lock stale.
        """
        for attempt in range(2):
            channel = self._open("session", {"env": env, "timeout": lock_timeout, "by": by, "create": create})
            try:
                result, status, stderr = self._read(channel, lock_timeout + 30, None)
            except BaseException:
                channel.close()
                raise
            if result is None and status == AGENT_MISSING and attempt == 0:
                channel.close()
                self.push_agent()
                continue
            break
        session = Session(self, channel)
        try:
            self._result("session", result, status, stderr)
            yield session
        finally:
            session.close()


class Session:
    """Requests sent one at a time over a channel that holds a deploy lock."""

    HEARTBEAT = 5.0

    def __init__(self, remote: Remote, channel: paramiko.Channel):
        self.remote = remote
        self.channel = channel
        self.write_lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _send(self, data: bytes) -> None:
        with self.write_lock:
            self.channel.sendall(data)

    def send(self, message: dict) -> None:
        """One message to the running command; nothing once the channel is gone."""
        try:
            self._send(json.dumps(message).encode() + b"\n")
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def _heartbeat(self) -> None:
        """Tell the agent we are alive, so it can tell a dead client from a slow one."""
        while not self.closed.wait(self.HEARTBEAT):
            try:
                self._send(b"{}\n")
            except (OSError, EOFError, paramiko.SSHException):
                return

    def call(self, cmd: str, timeout: float = 60, progress: Callable[[str], None] | None = None,
             **args) -> dict:
        request = {"protocol": PROTOCOL, "cmd": cmd, "args": {"base": self.remote.base, **args}}
        try:
            self._send(json.dumps(request).encode() + b"\n")
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise ConnectError(f"the connection to {self.remote.name} broke: {e}") from None
        result, status, stderr = self.remote._read(self.channel, timeout, _progress_only(progress))
        return self.remote._result(cmd, result, status, stderr)

    def close(self) -> None:
        self.closed.set()
        self.channel.close()


def _feeding(on_message, feed, session: Session | None):
    """``on_message``, starting ``feed(session.send)`` in a thread at the first message."""
    if feed is None:
        return on_message
    fed = threading.Event()

    def first(message: dict) -> None:
        if not fed.is_set():
            fed.set()
            threading.Thread(target=feed, args=(session.send,), daemon=True).start()
        on_message(message)

    return first


def _progress_only(progress: Callable[[str], None] | None) -> Callable[[dict], None]:
    return lambda message: progress(message["progress"]) if progress and "progress" in message else None


def _parse(line: bytes) -> dict | None:
    try:
        message = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
