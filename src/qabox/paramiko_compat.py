"""Every private (or undocumented) paramiko name qabox uses, and nowhere else.

The tunnel's data path (forward.py) relays a channel on the transport's own
thread and opens channels without waiting for the host's answer; paramiko has
no public API for either, so it builds on Channel and Transport internals.
They are all here, and ``check()`` runs at import: a paramiko that renamed one
fails with one line naming its version, not with an AttributeError mid-tunnel.
pyproject.toml pins paramiko to the major versions CI tests (SUPPORTED).
"""

from __future__ import annotations

import importlib.util
import socket
import sys


class _Invoke:
    """Stands in for ``paramiko.config.invoke`` until a ``Match exec`` line runs."""

    def __getattr__(self, name: str):
        import invoke

        paramiko.config.invoke = invoke
        return getattr(invoke, name)


def defer_invoke() -> None:
    """paramiko.config imports invoke, a third of paramiko's import time, only to
    run ssh_config's ``Match exec``: import paramiko without it, and load it when
    such a line is evaluated. Every qabox module takes paramiko from here."""
    defer = ("paramiko" not in sys.modules and "invoke" not in sys.modules
             and importlib.util.find_spec("invoke") is not None)
    if defer:
        sys.modules["invoke"] = None  # `import invoke` fails, and paramiko goes on without it
    try:
        import paramiko.config
    finally:
        if defer:
            del sys.modules["invoke"]
    if defer and paramiko.config.invoke is None:
        paramiko.config.invoke, paramiko.config.invoke_import_error = _Invoke(), None


defer_invoke()
import paramiko  # noqa: E402
import paramiko.common  # noqa: E402
import paramiko.config  # noqa: E402

from qabox.errors import QaboxError

SUPPORTED = ">=3.4.1,<6"  # as pyproject.toml pins it; tests/test_paramiko_compat.py tests both ends
SUPPORTED_TEXT = "3.4.1 to 5.x"  # 3.4.0 prints cryptography's TripleDES warning on every command

# What forward.py needs, by owner. Instance attributes are looked up on a real
# (unconnected) object, since paramiko sets them in __init__.
CHANNEL = ("_feed", "_handle_eof", "_handle_close", "_handle_request", "_window_adjust", "_set_closed",
           "_check_add_window", "_close_internal", "_set_transport", "_set_window", "lock")
TRANSPORT = ("_channel_handler_table", "_send_message", "_send_user_message", "_next_channel",
             "_unlink_channel", "_sanitize_window_size", "_sanitize_packet_size", "lock", "_channels",
             "channel_events", "channels_seen", "clear_to_send", "clear_to_send_lock")
COMMON = ("cMSG_CHANNEL_OPEN", "cMSG_CHANNEL_WINDOW_ADJUST", "cMSG_CHANNEL_FAILURE")
CONFIG = ("invoke", "invoke_import_error")  # module globals defer_invoke sets


class IncompatibleParamiko(QaboxError):
    """The installed paramiko lacks an internal the tunnel builds on."""


def check() -> None:
    """Raise IncompatibleParamiko, in one line, if any name above is gone."""
    sock = socket.socket()
    try:
        owners = (("Channel", paramiko.Channel(0), CHANNEL), ("Transport", paramiko.Transport(sock), TRANSPORT),
                  ("paramiko.common", paramiko.common, COMMON), ("paramiko.config", paramiko.config, CONFIG))
    finally:
        sock.close()
    for owner, obj, names in owners:
        for name in names:
            if not hasattr(obj, name):
                version = getattr(paramiko, "__version__", "of unknown version")
                raise IncompatibleParamiko(
                    f"qabox needs paramiko {SUPPORTED_TEXT} (this is paramiko {version}: {owner}.{name} is gone): "
                    f"pip install 'paramiko{SUPPORTED}'", code="paramiko_version")


check()

from paramiko.common import cMSG_CHANNEL_FAILURE, cMSG_CHANNEL_OPEN, cMSG_CHANNEL_WINDOW_ADJUST  # noqa: E402


class Channel(paramiko.Channel):
    """A channel whose messages from the host arrive as public-named hooks.

    The hooks run on the transport's thread (see ``virtual_dispatch``), which
    must never wait to send: during a key exchange, which that thread runs
    itself, it would wait for itself (paramiko's own close and request
    handlers do, so they are replaced here). Replies go out by ``send_soon``,
    which a subclass provides, as it does the hooks.
    """

    def send_soon(self, m: paramiko.Message) -> None:
        raise NotImplementedError

    def on_data(self, data: bytes) -> None:
        """The host sent data (no window is given back until ``ack``)."""

    def on_eof(self) -> None:
        """The host has nothing more to send."""

    def on_window(self) -> None:
        """The host gave us more window."""

    def on_closed(self) -> None:
        """Closed by the host, by us, or with its transport (paramiko holds self.lock)."""

    def on_answer(self) -> None:
        """The host answered the channel open (``active`` says how), or the transport died."""

    def ack(self, n: int) -> None:
        """Give the host back window for n bytes taken (paramiko batches them)."""
        n = self._check_add_window(n)
        if n:
            m = paramiko.Message()
            m.add_byte(cMSG_CHANNEL_WINDOW_ADJUST)
            m.add_int(self.remote_chanid)
            m.add_int(n)
            self.send_soon(m)

    def _feed(self, m) -> None:
        self.on_data(m if isinstance(m, bytes) else m.get_binary())

    def _handle_eof(self, m) -> None:
        super()._handle_eof(m)
        self.on_eof()

    def _handle_close(self, m) -> None:
        """The host closed the channel: close our end too."""
        with self.lock:
            replies = self._close_internal()
            self.transport._unlink_channel(self.chanid)
        for reply in replies:
            if reply is not None:
                self.send_soon(reply)

    def _handle_request(self, m) -> None:
        """A channel request from the host (sshd's keepalive, say): we have none to grant."""
        m.get_text()
        if m.get_boolean():  # want_reply
            reply = paramiko.Message()
            reply.add_byte(cMSG_CHANNEL_FAILURE)
            reply.add_int(self.remote_chanid)
            self.send_soon(reply)

    def _window_adjust(self, m) -> None:
        super()._window_adjust(m)
        self.on_window()

    def _set_closed(self) -> None:
        super()._set_closed()
        self.on_closed()


class _Answered:
    """Stands in for the Event paramiko sets when the host answers a channel open."""

    def __init__(self, chan: Channel):
        self.set = chan.on_answer


def virtual_dispatch(transport: paramiko.Transport) -> None:
    """Let channel messages reach a Channel subclass's methods.

    paramiko's transport calls ``Channel._feed(chan, m)`` and so on from a
    class-level table, which skips a subclass's methods; on this transport,
    call them as methods instead. Plain channels behave as before.
    """
    table = paramiko.Transport._channel_handler_table
    transport._channel_handler_table = {
        ptype: (lambda name: lambda chan, m: getattr(chan, name)(m))(fn.__name__)
        for ptype, fn in table.items()
    }


def open_direct_tcpip(transport: paramiko.Transport, make_channel, dest: tuple[str, int],
                      origin: tuple[str, int]) -> Channel:
    """paramiko's ``open_channel("direct-tcpip", dest, origin)`` without the wait:
    the channel's ``on_answer`` hears the answer. ``make_channel(chanid)`` runs
    under the transport's lock, before any message for the channel can arrive."""
    window = transport._sanitize_window_size(None)
    packet = transport._sanitize_packet_size(None)
    with transport.lock:
        chanid = transport._next_channel()
        chan = make_channel(chanid)
        transport._channels.put(chanid, chan)
        transport.channel_events[chanid] = _Answered(chan)
        transport.channels_seen[chanid] = True
        chan._set_transport(transport)
        chan._set_window(window, packet)
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_OPEN)
    m.add_string("direct-tcpip")
    m.add_int(chanid)
    m.add_int(window)
    m.add_int(packet)
    m.add_string(dest[0])
    m.add_int(dest[1])
    m.add_string(origin[0])
    m.add_int(origin[1])
    send(transport, m)
    return chan


def try_send(transport: paramiko.Transport, m: paramiko.Message) -> bool:
    """Send m now, unless a key exchange is under way (then False): never waits for one."""
    with transport.clear_to_send_lock:
        if transport.clear_to_send.is_set():
            transport._send_message(m)
            return True
    return False


def send(transport: paramiko.Transport, m: paramiko.Message) -> None:
    """Send m, waiting out a key exchange (as paramiko sends a channel's messages)."""
    transport._send_user_message(m)
