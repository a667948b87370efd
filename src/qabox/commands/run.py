"""``qabox run``: a one-off command in an env's current release on the host.

Its stdout and stderr come back as the agent streams them; its stdin is
passed on, with its end. With a terminal here, the command gets one on the
host (the agent makes the pty, see ``qabox.agent.oneoff``): this terminal
goes raw for the command's life, so keys (Ctrl-C included) reach it as typed,
and a resize here (SIGWINCH) resizes it there.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import termios
import threading
import tty
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator

from qabox.context import Context, check_env
from qabox.errors import ConfigError

Send = Callable[[dict], None]


def run(ctx: Context, host: str, env: str, argv: list[str], stdin: BinaryIO, stdout: BinaryIO,
        stderr: BinaryIO, terminal: bool) -> int:
    """Run ``argv`` in the env's current release; its exit status. ``terminal``:
    stdin and stdout are this side's terminal, and the command gets one too."""
    check_env(env)
    if not argv:
        raise ConfigError("name the command to run after --, e.g. qabox run --host oldbox -- "
                          "python manage.py migrate")
    show = passing_output(stdout, stderr)
    with ctx.remote(host) as remote:
        if not terminal:
            data = remote.follow("run", show, feed=stream_feed(stdin), env=env, argv=argv, tty=None)
        else:
            fd = stdin.fileno()
            with raw_terminal(fd) as resized:
                size = os.get_terminal_size(fd)
                data = remote.follow("run", show, feed=terminal_feed(fd, resized), env=env, argv=argv,
                                     tty={"rows": size.lines, "cols": size.columns,
                                          "term": os.environ.get("TERM")})
    return data["exit"]


def passing_output(stdout: BinaryIO, stderr: BinaryIO) -> Callable[[dict], None]:
    """Write a process's output, as the agent streams it (``out`` and ``err``, base64), here."""
    outputs = {"out": stdout, "err": stderr}

    def show(message: dict) -> None:
        for kind, stream in outputs.items():
            if kind in message:
                stream.write(base64.b64decode(message[kind]))
                stream.flush()

    return show


def stream_feed(stdin: BinaryIO) -> Callable[[Send], None]:
    """Send stdin as it comes, then its end."""
    def feed(send: Send) -> None:
        while True:
            data = stdin.read1(65536)
            if not data:
                send({"eof": 1})
                return
            send({"in": base64.b64encode(data).decode("ascii")})

    return feed


def terminal_feed(fd: int, resized: threading.Event) -> Callable[[Send], None]:
    """Send the keys typed on the raw terminal ``fd``, and its size whenever it changes."""
    def feed(send: Send) -> None:
        while True:
            if resized.is_set():
                resized.clear()
                size = os.get_terminal_size(fd)
                send({"resize": [size.lines, size.columns]})
            if select.select([fd], [], [], 0.2)[0]:
                data = os.read(fd, 4096)
                if not data:
                    return
                send({"in": base64.b64encode(data).decode("ascii")})

    return feed


@contextmanager
def raw_terminal(fd: int) -> Iterator[threading.Event]:
    """The terminal ``fd`` in raw mode, put back as it was afterwards; yields an
    event set on each SIGWINCH (when this runs in the main thread)."""
    resized = threading.Event()
    saved = termios.tcgetattr(fd)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGWINCH, lambda *_: resized.set()) if main else None
    tty.setraw(fd)
    try:
        yield resized
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if main:
            signal.signal(signal.SIGWINCH, previous)
