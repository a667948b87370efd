"""``qabox debug``: the env's current release under Werkzeug's debugger, at a
local URL, for the developer alone, until Ctrl-C.

The agent starts the debug process on a second loopback port of the host
(``qabox.agent.debug``: never the app's or a tester's port) and sends its port
and PIN. This side forwards a local 127.0.0.1 port to it over the deploy
account's own SSH connection (``forward.Forward``, a tester tunnel's data
path), so only the deploy account's key reaches it. On Ctrl-C or SIGTERM it
has the agent stop the process, then closes the local port; should this
process die instead, the agent stops the debugger when the channel goes.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from qabox.commands.run import passing_output
from qabox.context import Context, check_env
from qabox.errors import RemoteError
from qabox.forward import Forward
from qabox.tunnel import listen


@dataclass(frozen=True)
class Debugger:
    """What the developer is shown once the debugger serves."""

    host: str
    env: str
    release: str
    url: str
    pin: str
    remote_port: int


def debug(ctx: Context, host: str, env: str, port: int | None, on_up: Callable[[Debugger], None],
          stdout: BinaryIO, stderr: BinaryIO) -> dict:
    """Serve the debugger at a local URL until Ctrl-C (the debug process's output
    goes to ``stdout`` and ``stderr``); the agent's result once it stopped it.
    The local port is bound first, so a taken one changes nothing on the host."""
    check_env(env)
    listener = listen(port or 0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    up, stop = threading.Event(), threading.Event()
    forwards: list[Forward] = []
    show = passing_output(stdout, stderr)

    def feed(send: Callable[[dict], None]) -> None:
        stop.wait()
        send({"stop": 1})

    try:
        with ctx.remote(host) as remote, stopping_on_signals(up, stop):
            def on_message(message: dict) -> None:
                show(message)
                started = message.get("debugging")
                if started and not forwards:
                    forward = Forward(listener, started["port"])
                    forward.use(remote.client.get_transport())
                    forward.start()
                    forwards.append(forward)
                    up.set()
                    on_up(Debugger(host, env, started["release"], url, started["pin"], started["port"]))

            try:
                return remote.follow("debug", on_message, feed=feed, env=env)
            except RemoteError as e:
                if e.code is None and up.is_set():  # no result: the agent itself ended
                    raise RemoteError(f"the debugger of {host}/{env} ended with its agent on the host "
                                      f"({e.message.rsplit(': ', 1)[-1]}), and so did its process: "
                                      f"run qabox debug again", log=e.log) from None
                raise
    finally:
        stop.set()  # the feed thread's last send goes nowhere once the channel is closed
        if forwards:
            forwards[0].stop()  # closes the listener too
        else:
            listener.close()


@contextmanager
def stopping_on_signals(up: threading.Event, stop: threading.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM once the debugger is up sets ``stop`` (the agent then stops it
    and says so); before that, or a second time, they interrupt as usual."""
    def on_signal(signum, frame) -> None:
        if not up.is_set() or stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
