"""The tunnel's data path: local TCP connections to a port on the host, over SSH.

Why not sshtunnel's forwarder, which qabox started on: it spends a thread per
connection and a select loop per connection over channel pipes, and a profile
of 8 concurrent connections put two thirds of its CPU in the kernel, switching
threads (about 55 switches a request). Here one loop thread accepts and reads
the local sockets and sends to the host, and the transport's own thread writes
the host's answers straight into the local sockets, so a request costs a few
wake-ups. Flow control is SSH's: the host's window is only given back for
bytes the local client has taken.

A connection that arrives while there is no link waits (up to WAIT_FOR_LINK);
one whose channel was not yet confirmed when its link died is opened again on
the next link, so a browser only sees a short wait.

paramiko has no public API for any of this: the internals it takes are all in
paramiko_compat, which checks at import that they are still there.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import struct
import threading
import time
from typing import Callable

from qabox import paramiko_compat
from qabox.paramiko_compat import paramiko

READ_SIZE = 256 * 1024
WAIT_FOR_LINK = 30.0  # how long a new connection waits for a link to the host
EARLY_MAX = 2 * 1024 * 1024  # what a client may send before its channel opens
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

log = logging.getLogger(__name__)


class Conn:
    """A local connection and its channel. The loop thread and the transport's
    thread both touch it, under its lock."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.chan: Relay | None = None
        self.opened = False  # the host confirmed the channel
        self.early = bytearray()  # what the client sent before that
        self.client_eof = False  # the client has nothing more to send
        self.out = bytearray()  # what the host sent that the client has not taken yet
        self.host_eof = False  # the host has nothing more to send
        self.held = b""  # what the client sent that the host's window has no room for
        self.closed = False
        self.events = 0  # what the loop waits for on sock
        self.waiting_since = 0.0


class Relay(paramiko_compat.Channel):
    """A direct-tcpip channel that writes what the host sends straight to its client.

    Its hooks run on the transport's thread, which must never wait to send:
    replies go out by ``send_soon``.
    """

    def __init__(self, chanid: int, conn: Conn, forward: "Forward"):
        super().__init__(chanid)
        self.conn, self.forward = conn, forward
        conn.chan = self  # before paramiko knows the channel, so its messages find it

    def send_soon(self, m: paramiko.Message) -> None:
        self.forward.send_soon(self.transport, m)

    def on_data(self, data: bytes) -> None:
        conn = self.conn
        with conn.lock:
            if conn.closed or conn.chan is not self:
                return
            if conn.out:  # keep the order: the loop flushes what waits first
                conn.out += data
                return
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:  # the client is gone
                self.forward.call(self.forward.close, conn)
                return
            if sent < len(data):
                conn.out += data[sent:]
                self.forward.call(self.forward.want_write, conn)
        if sent:
            self.ack(sent)

    def on_eof(self) -> None:
        conn = self.conn
        with conn.lock:
            conn.host_eof = True
            if not conn.out and not conn.closed:
                shut_write(conn.sock)

    def on_window(self) -> None:
        if self.conn.held:
            self.forward.call(self.forward.resume, self.conn)

    def on_closed(self) -> None:
        conn = self.conn
        if conn.chan is not self or conn.closed:
            return
        if not self.active:  # its link died before the host answered: try the next link
            self.forward.call(self.forward.reopen, conn, self)
        elif not conn.host_eof or conn.client_eof:
            # cut short (the client must not take it for a whole answer), or both sides done
            self.forward.call(self.forward.close, conn)

    def on_answer(self) -> None:
        """Send what the client sent so far, or give up."""
        conn, forward = self.conn, self.forward
        if not self.active:  # refused (the app is down), or the link died
            if self.transport.is_active():
                forward.call(forward.close, conn)
            else:
                forward.call(forward.reopen, conn, self)
            return
        with conn.lock:  # the loop thread keeps adding to conn.early until conn.opened
            if conn.chan is not self or conn.closed:
                return
            if conn.early:  # the loop thread sends them, in order with what follows
                forward.call(forward.opened, conn)
                return
            conn.opened = True
            eof = conn.client_eof
        if eof:
            forward.call(forward.client_done, conn)


def shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Forward:
    """127.0.0.1:PORT on this machine to 127.0.0.1:REMOTE on the host, over
    whichever transport ``use`` gave last."""

    def __init__(self, listener: socket.socket, remote_port: int):
        self.listener = listener
        self.local_port = listener.getsockname()[1]
        self.remote_port = remote_port
        self.requests = 0
        self.transport: paramiko.Transport | None = None
        self.waiting: list[Conn] = []
        self.conns: set[Conn] = set()
        self.selector = selectors.DefaultSelector()
        self.calls: collections.deque = collections.deque()
        self.wake_r, self.wake_w = socket.socketpair()
        self.woken = False
        self.stopping = False
        self.error: Exception | None = None  # what ended the loop, if not stop()
        listener.setblocking(False)
        self.wake_r.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.thread = threading.Thread(target=self.run, daemon=True, name="qabox-forward")

    # ------------------------------------------------------------ any thread

    def start(self) -> None:
        self.thread.start()

    def use(self, transport: paramiko.Transport | None) -> None:
        """New connections go over this transport; None: they wait for one."""
        if transport is not None:
            paramiko_compat.virtual_dispatch(transport)
        self.call(self._use, transport)

    def stop(self, timeout: float = 1.0) -> None:
        self.call(self._stop)
        self.thread.join(timeout)

    def call(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the loop thread, soon."""
        self.calls.append((fn, args))
        if not self.woken:
            self.woken = True
            try:
                self.wake_w.send(b"x")
            except OSError:
                pass

    def send_soon(self, transport: paramiko.Transport, m: paramiko.Message) -> None:
        """Send m now if the transport is not re-keying, else from the loop thread.

        The transport's thread must never wait for a key exchange it runs itself.
        """
        if not paramiko_compat.try_send(transport, m):
            self.call(paramiko_compat.send, transport, m)

    # ------------------------------------------------------------ loop thread

    def run(self) -> None:
        try:
            while not self.stopping:
                for key, mask in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self.accept()
                    elif key.data == "wake":
                        self.run_calls()
                    else:
                        self.ready(key.data, mask)
                self.expire_waiting()
        except Exception as e:  # the Tunnel raises it in the foreground
            self.error = e
        finally:
            self._close_all()

    def ready(self, conn: Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self.flush(conn)
            if mask & selectors.EVENT_READ:
                self.read(conn)
        except Exception:  # a bug must cost one connection, not the tunnel
            log.exception("connection dropped")
            self.close(conn)

    def run_calls(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        self.woken = False
        while self.calls:
            fn, args = self.calls.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", fn.__name__)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors and the like: wait, do not spin
                time.sleep(0.1)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.conns.add(conn)
            self.requests += 1
            self.watch(conn, selectors.EVENT_READ)
            self.open(conn)

    def open(self, conn: Conn) -> None:
        transport = self.transport
        if transport is None or not transport.is_active():
            conn.waiting_since = time.monotonic()
            self.waiting.append(conn)
            return
        self.open_channel(transport, conn)

    def open_channel(self, transport: paramiko.Transport, conn: Conn) -> None:
        """paramiko's open_channel without the wait: Relay.on_answer() gets the answer."""
        chan = paramiko_compat.open_direct_tcpip(
            transport, lambda chanid: Relay(chanid, conn, self),
            ("127.0.0.1", self.remote_port), ("127.0.0.1", self.local_port))
        if not transport.is_active():  # it died meanwhile, maybe before it could tell the channel
            self.reopen(conn, chan)

    def read(self, conn: Conn) -> None:
        """The client sent something: pass it on (or keep it until the channel opens)."""
        if conn.closed:
            return
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.watch(conn, conn.events & ~selectors.EVENT_READ)
        with conn.lock:
            conn.client_eof = not data
            if not conn.opened:
                conn.early += data
                if len(conn.early) >= EARLY_MAX:  # read no more until the channel opens
                    self.watch(conn, conn.events & ~selectors.EVENT_READ)
                return
        if data:
            self.send(conn, data)
        else:
            self.client_done(conn)

    def opened(self, conn: Conn) -> None:
        """The channel opened, but the client's first bytes could not go at once."""
        if conn.closed:
            return
        with conn.lock:
            early, conn.early = bytes(conn.early), bytearray()
            conn.opened = True
        self.send(conn, early)
        self.sent(conn)

    def send(self, conn: Conn, data: bytes) -> None:
        """To the host, as far as its window allows; the rest waits for a window adjust."""
        chan = conn.chan
        chan.settimeout(0.0)
        view = memoryview(data)
        while view:
            try:
                sent = chan.send(view)
            except socket.timeout:  # no window: stop reading the client until there is
                conn.held = bytes(view)
                self.watch(conn, conn.events & ~selectors.EVENT_READ)
                return
            except OSError:  # the channel is closed
                self.close(conn)
                return
            if not sent:
                self.close(conn)
                return
            view = view[sent:]

    def resume(self, conn: Conn) -> None:
        """The host's window opened: send what was held, then read the client again."""
        if conn.closed or not conn.held:
            return
        held, conn.held = conn.held, b""
        self.send(conn, held)
        self.sent(conn)

    def sent(self, conn: Conn) -> None:
        """After held-back bytes went out: pass on the client's EOF, or read it again."""
        if conn.held or conn.closed:
            return
        if conn.client_eof:
            self.client_done(conn)
        else:
            self.watch(conn, conn.events | selectors.EVENT_READ)

    def client_done(self, conn: Conn) -> None:
        """The client sent EOF: pass it on, and finish if the host is done too."""
        if conn.held:
            return  # resume() sends what is held, then comes back here
        conn.chan.shutdown_write()
        if conn.chan.closed:
            self.close(conn)

    def want_write(self, conn: Conn) -> None:
        if not conn.closed:
            self.watch(conn, conn.events | selectors.EVENT_WRITE)

    def flush(self, conn: Conn) -> None:
        """The client can take more of what the host sent."""
        with conn.lock:
            if conn.closed:
                return
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = -1
            if sent > 0:
                del conn.out[:sent]
            done = not conn.out
            if done and conn.host_eof:
                shut_write(conn.sock)
        if sent < 0:
            self.close(conn)
            return
        if done:
            self.watch(conn, conn.events & ~selectors.EVENT_WRITE)
            if conn.chan.closed and (conn.client_eof or not conn.host_eof):
                self.close(conn)
                return
        if sent > 0:
            conn.chan.ack(sent)

    def reopen(self, conn: Conn, chan: Relay) -> None:
        """The link died before the host confirmed the channel: open it on the next link."""
        if conn.closed or conn.chan is not chan:
            return
        conn.chan = None
        self.open(conn)

    def watch(self, conn: Conn, events: int) -> None:
        if events == conn.events or conn.closed:
            return
        if not conn.events:
            self.selector.register(conn.sock, events, conn)
        elif not events:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def close(self, conn: Conn) -> None:
        """Close the client's socket and the channel. A client whose answer was cut
        short gets a reset, so it cannot take a part for the whole."""
        if conn.closed:
            return
        self.watch(conn, 0)
        chan = conn.chan
        with conn.lock:
            conn.closed = True
            cut = chan is None or not conn.host_eof or bool(conn.out)
            try:
                if cut:
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            finally:
                conn.sock.close()
        self.conns.discard(conn)
        if chan is not None:
            chan.close()

    def expire_waiting(self) -> None:
        if not self.waiting:
            return
        limit = time.monotonic() - WAIT_FOR_LINK
        for conn in [c for c in self.waiting if c.waiting_since < limit or c.closed]:
            self.waiting.remove(conn)
            self.close(conn)

    def _use(self, transport: paramiko.Transport | None) -> None:
        self.transport = transport
        if transport is not None and transport.is_active():
            waiting, self.waiting = self.waiting, []
            for conn in waiting:
                if not conn.closed:
                    self.open_channel(transport, conn)

    def _stop(self) -> None:
        self.stopping = True

    def _close_all(self) -> None:
        for conn in list(self.conns):
            self.close(conn)
        self.selector.close()
        self.listener.close()
        self.wake_r.close()
        self.wake_w.close()
