"""A tester's tunnel: a stable ``http://127.0.0.1:PORT`` to an env's app.

What a plain sshtunnel forward lacks for testers: the host key verified
(through qabox's own connection), a dead link noticed within seconds
(keepalives whose replies are counted), reconnection while the local port
stays bound, so a browser only sees a short wait, and a data path that keeps
up with ``ssh -L`` (``forward.py``), and a tester session kept open beside
it (heartbeats; opened again should it end while the link stays up), since
that session is what counts the tester as connected and brings deploy notices.
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
from qabox.remote import Remote, Session

KEEPALIVE_INTERVAL = 3.0  # like ServerAliveInterval x ServerAliveCountMax, but from the
# first unanswered keepalive (3 s) fresh links are tried, and the first that works is used
RECONNECT_BACKOFF = (0.1, 0.2, 0.5, 1.0)
FINAL_CODES = ("login_refused", "no_tester", "expired")  # errors that no retry can fix
# A session that ends while its link stays up is opened again after these
# waits (the last one repeats), counted afresh once one lasted SESSION_STEADY s.
SESSION_BACKOFF = (0.2, 1.0, 3.0, 10.0)
SESSION_STEADY = 30.0


@dataclass
class TunnelState:
    """What the status line and ``qabox tunnels`` show."""

    state: str = "connecting"
    reason: str | None = None
    requests: int = 0
    since: float = 0.0


class Link:
    """One verified SSH connection of a tester: transport plus the tester session."""

    def __init__(self, ctx: Context, host: str, env: str, user: str, identity: str | None,
                 connect_timeout: float | None = None, target: ssh.Target | None = None):
        target = target or ctx.target(host)
        if identity:
            target = replace(target, identity_files=(identity,), identities_only=True)
        if connect_timeout:
            target = replace(target, connect_timeout=connect_timeout)
        self.host, self.env, self.user = host, env, user
        self.client = ssh.connect(target, ctx.accept_new_host_key)
        self.transport = self.client.get_transport()
        self.remote = Remote(host, self.client, ctx.settings(host))
        try:
            self.envs = self.open_session()
        except BaseException:
            self.client.close()
            raise

    def open_session(self) -> dict:
        """Open the tester session on this connection (again, if it ended): the
        tester's envs, each with its port and release.

        Its heartbeats keep it open: the host ends a session that sends nothing
        for SESSION_IDLE (30) seconds, and with it the tester's presence.
        """
        channel = self.remote._open("tester-session", {"name": self.user})
        session = Session(self.remote, channel)
        try:
            data = self.remote._result("tester-session", *self.remote._read(channel, 30, None))
            envs = data.get("envs", {})
            if self.env not in envs:
                theirs = f" (theirs: {', '.join(sorted(envs))})" if envs else ""
                raise ConfigError(f"tester {self.user} has no port for env {self.env} on {self.host}{theirs}: "
                                  f"pick one with --env, or deploy the env, then run "
                                  f"`qabox testers add {self.user} --host {self.host}` again")
        except BaseException:
            session.close()
            raise
        self.session, self.remote_port = session, envs[self.env]["port"]
        return envs

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
            self.session.close()
        finally:
            self.client.close()


class Tunnel:
    """A tester's tunnel: the local port stays while links come and go."""

    def __init__(self, ctx: Context, host: str, env: str, user: str, port: int,
                 identity: str | None = None, on_change: Callable[[TunnelState], None] = lambda s: None,
                 on_notice: Callable[[str], None] = lambda text: None, target: ssh.Target | None = None):
        self.ctx, self.host, self.env, self.user = ctx, host, env, user
        self.target = target  # a joined invite's, or None: the host's, as ssh_config has it
        self.identity = identity
        self.port = port
        self.on_change, self.on_notice = on_change, on_notice
        self.status = TunnelState(since=time.time())
        self.link: Link | None = None
        self.releases: dict[str, str | None] = {}  # each env's release, as last heard
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
            link = Link(self.ctx, self.host, self.env, self.user, self.identity, target=self.target)
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
        self._caught_up(link.envs)
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
        """Deploy notices from the link's tester session, printed as they come.

        A session that ends while its link stays up (its process on the host
        was killed, say) is opened again, with a backoff: it is what counts the
        tester as connected. A dead link is the watch thread's to replace; a
        refusal no retry can fix ends the tunnel, saying why.
        """
        attempt = 0
        while True:
            opened = time.monotonic()
            try:
                link.remote._read(link.session.channel, float("inf"), self._on_message)
            except QaboxError:
                pass  # the link broke: the watch thread sees it too
            link.session.close()
            if time.monotonic() - opened >= SESSION_STEADY:
                attempt = 0
            envs = None
            while envs is None:
                if self.stopping.wait(SESSION_BACKOFF[min(attempt, len(SESSION_BACKOFF) - 1)]):
                    return
                if self.link is not link or not link.transport.is_active():
                    return  # the watch thread replaces the link, and its session with it
                attempt += 1
                self._set_if_connected("host session ended, opening it again: no deploy notices meanwhile")
                try:
                    envs = link.open_session()
                except QaboxError as e:
                    if isinstance(e, ConfigError) or e.code in FINAL_CODES + ("too_many_sessions",):
                        self._end(e)
                        return
            self._caught_up(envs)
            self._set_if_connected(None)

    def _on_message(self, message: dict) -> None:
        notice = message.get("notice")
        if notice:
            self.releases[notice["env"]] = notice["release"]
            self._notice(notice["env"], notice["release"], notice.get("by"))

    def _notice(self, env: str, release: str | None, by: str | None) -> None:
        self.on_notice(f"{self.host}/{env}: release {release} deployed by {by or 'someone'}")

    def _caught_up(self, envs: dict) -> None:
        """Notices of the deploys made while no session was open (none at the start)."""
        for env, info in sorted(envs.items()):
            release = info.get("release")
            if env in self.releases and release and release != self.releases[env]:
                self._notice(env, release, info.get("by"))
            self.releases[env] = release

    def _set_if_connected(self, reason: str | None) -> None:
        """The session's news, unless the link's state (reconnecting, stopped) says more."""
        if self.status.state == "connected" and self.status.reason != reason:
            self._set("connected", reason)

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
                new = Link(self.ctx, self.host, self.env, self.user, self.identity, connect_timeout=1.5,
                           target=self.target)
            except QaboxError as e:
                if isinstance(e, (HostKeyError, ConfigError)) or e.code in FINAL_CODES:
                    # Retrying would not help (and failed logins every second get
                    # an address banned): end, saying why.
                    self._end(e)
                    return
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

    def _end(self, e: QaboxError) -> None:
        """End the tunnel, saying why: refresh() raises it in the foreground."""
        why = (f"the host no longer accepts {self.user}'s key (removed as a tester?): "
               f"ask for `qabox testers add {self.user} --host {self.host}` again"
               if e.code == "login_refused" else e.message)
        self.error = type(e)(f"{self.user}'s tunnel to {self.host}/{self.env} ended: {why}", code=e.code)

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
