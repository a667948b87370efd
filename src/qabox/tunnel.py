"""A tester's tunnel: a stable ``http://127.0.0.1:PORT`` to an env's app.

What a plain sshtunnel forward lacks for testers: the host key verified
(through qabox's own connection), a dead link noticed within seconds
(keepalives whose replies are counted), reconnection while the local port
stays bound, so a browser only sees a short wait, and a data path that keeps
up with ``ssh -L`` (``forward.py``).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from qabox import ssh
from qabox.context import Context
from qabox.errors import ConfigError, HostKeyError, QaboxError
from qabox.forward import Forward
from qabox.remote import Remote

KEEPALIVE_INTERVAL = 3.0  # like ServerAliveInterval x ServerAliveCountMax, but from the
# first unanswered keepalive (3 s) fresh links are tried, and the first that works is used
RECONNECT_BACKOFF = (0.1, 0.2, 0.5, 1.0)
FINAL_CODES = ("login_refused", "no_tester")  # errors that no retry can fix


@dataclass
class TunnelState:
    """What the status line and ``qabox tunnels`` show."""

    state: str = "connecting"
    reason: str | None = None
    requests: int = 0
    since: float = 0.0


def port_free(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Link:
    """One verified SSH connection of a tester: transport plus the tester session."""

    def __init__(self, ctx: Context, host: str, env: str, user: str, identity: str | None,
                 connect_timeout: float | None = None):
        target = ctx.target(host)
        if identity:
            target = replace(target, identity_files=(identity,), identities_only=True)
        if connect_timeout:
            target = replace(target, connect_timeout=connect_timeout)
        self.client = ssh.connect(target, ctx.accept_new_host_key)
        self.transport = self.client.get_transport()
        self.remote = Remote(host, self.client, ctx.settings(host))
        self.channel = self.remote._open("tester-session", {"name": user})
        first = self.remote._read(self.channel, 30, None)
        data = self.remote._result("tester-session", *first)
        envs = data.get("envs", {})
        if env not in envs:
            self.close()
            raise ConfigError(f"tester {user} has no port for env {env} on {host}: deploy the env, "
                              f"then run `qabox testers add {user} --host {host}` again")
        self.remote_port = envs[env]["port"]

    def alive(self, timeout: float) -> bool:
        """One keepalive@openssh.com request, answered within timeout (any answer counts)."""
        if not self.transport.is_active():
            return False
        answered = threading.Event()

        def ask() -> None:
            self.transport.global_request("keepalive@openssh.com", wait=True)
            answered.set()

        threading.Thread(target=ask, daemon=True).start()
        return answered.wait(timeout) and self.transport.is_active()

    def close(self) -> None:
        try:
            self.channel.close()
        finally:
            self.client.close()


class Tunnel:
    """A tester's tunnel: the local port stays while links come and go."""

    def __init__(self, ctx: Context, host: str, env: str, user: str, port: int,
                 identity: str | None = None, on_change: Callable[[TunnelState], None] = lambda s: None,
                 on_notice: Callable[[str], None] = lambda text: None):
        self.ctx, self.host, self.env, self.user = ctx, host, env, user
        self.identity = identity
        self.port = port
        self.on_change, self.on_notice = on_change, on_notice
        self.status = TunnelState(since=time.time())
        self.link: Link | None = None
        self.stopping = threading.Event()
        self.forward: Forward | None = None
        self.error: Exception | None = None  # what ended the watch thread

    def __enter__(self) -> "Tunnel":
        try:
            self.start()
        except BaseException:  # Ctrl-C while connecting, say
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Bind the port, connect once (errors here are the user's to fix), serve."""
        listener = listen(self.port)
        try:
            link = Link(self.ctx, self.host, self.env, self.user, self.identity)
        except BaseException:
            listener.close()
            raise
        self.forward = Forward(listener, link.remote_port)
        self._use(link)
        self.forward.start()
        threading.Thread(target=self._watch, daemon=True, name="qabox-tunnel-watch").start()

    def _use(self, link: Link) -> None:
        self.link = link
        self.forward.remote_port = link.remote_port
        self.forward.use(link.transport)
        self._set("connected", None)
        threading.Thread(target=self._notices, args=(link,), daemon=True).start()

    def _set(self, state: str, reason: str | None) -> None:
        self.status.state, self.status.reason, self.status.since = state, reason, time.time()
        self.on_change(self.status)

    def refresh(self) -> None:
        """Report the requests served, if more came since the last call; raise
        what a background thread died of, rather than serve nothing quietly."""
        error = self.error or (self.forward and self.forward.error)
        if isinstance(error, QaboxError):
            raise error
        if error is not None:
            raise TunnelBroken(f"the tunnel stopped ({type(error).__name__}: {error}): start it "
                               f"again; run it with -v to see where") from error
        if self.forward is not None and self.forward.requests != self.status.requests:
            self.status.requests = self.forward.requests
            self.on_change(self.status)

    def _notices(self, link: Link) -> None:
        """Deploy notices from the host's tester session, printed as they come."""
        def on_message(message: dict) -> None:
            notice = message.get("notice")
            if notice:
                self.on_notice(f"{self.host}/{notice['env']}: release {notice['release']} "
                               f"deployed by {notice.get('by') or 'someone'}")

        try:
            link.remote._read(link.channel, float("inf"), on_message)
        except QaboxError:
            pass

    def _watch(self) -> None:
        """The watch thread: what ends it, refresh() raises in the foreground."""
        try:
            self._keep_alive()
        except Exception as e:
            self.error = e

    def _keep_alive(self) -> None:
        """Keepalives whose answers are counted; on a missed one, find a working link.

        New requests wait (the local port stays bound) while fresh connections
        are tried: one that gets through wins, since the old connection may sit
        in TCP's backed-off retransmits for seconds after the network is back.
        The old link wins instead if it answers again first.
        """
        while not self.stopping.wait(KEEPALIVE_INTERVAL):
            link = self.link
            if link.alive(KEEPALIVE_INTERVAL):
                continue
            self.forward.use(None)
            self._set("reconnecting", "no answer from the host" if link.transport.is_active()
                      else "connection closed")
            self._replace(link)
            if self.error:
                return

    def _replace(self, old: Link) -> None:
        attempt = 0
        while not self.stopping.is_set():
            try:
                new = Link(self.ctx, self.host, self.env, self.user, self.identity, connect_timeout=1.5)
            except QaboxError as e:
                if isinstance(e, (HostKeyError, ConfigError)) or e.code in FINAL_CODES:
                    # Retrying would not help (and failed logins every second get
                    # an address banned): end, saying why.
                    why = (f"the host no longer accepts {self.user}'s key (removed as a tester?): "
                           f"ask for `qabox testers add {self.user} --host {self.host}` again"
                           if e.code == "login_refused" else e.message)
                    self.error = type(e)(f"{self.user}'s tunnel to {self.host}/{self.env} ended: {why}",
                                         code=e.code)
                    return  # refresh() raises it in the foreground
                self._set("reconnecting", e.message)
            else:
                threading.Thread(target=old.close, daemon=True).start()
                self._use(new)
                return
            if old.transport.is_active() and old.alive(0.5):
                self.forward.use(old.transport)
                self._set("connected", None)
                return
            self.stopping.wait(RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)])
            attempt += 1

    def stop(self) -> None:
        """Stop serving (open connections are reset) and close the link; the last
        status counts every request served, not just those refresh() saw."""
        self.stopping.set()
        if self.forward is not None:
            self.forward.stop()
            self.status.requests = self.forward.requests
        if self.link is not None:
            self.link.close()
        self._set("stopped", None)


class TunnelBroken(QaboxError):
    """A background thread of the tunnel failed: a bug, not the network."""


def listen(port: int) -> socket.socket:
    """The tunnel's local port, on 127.0.0.1 only: other machines never reach it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"local port {port} cannot be used ({e.strerror}): pick another with "
                          f"--port, or stop what listens there") from None
    return sock
