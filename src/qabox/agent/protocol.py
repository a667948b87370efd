"""The agent's protocol: one JSON request line in, JSON lines out.

Zero or more ``{"progress": ...}`` (or streamed) lines, then one result line
``{"ok": ..., "changed": ..., "data": ..., "error": {"code", "message"}}``.
"""

import json
import os
import select
import time

PROTOCOL = 1
SESSION_IDLE = 30.0


class Fail(Exception):
    """A failure the user can act on: a stable code and a one-line message."""

    def __init__(self, code: str, message: str, **data):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class Stream:
    """The agent's side of one SSH channel: requests in, JSON lines out.

    A reader thread owns stdin, so that the agent notices qabox going away
    (EOF, or no line at all for SESSION_IDLE seconds: qabox sends heartbeats)
    even in the middle of a long step, which then stops at its next check().
    """

    MAX_LINE = 1 << 20  # a request is a small JSON line; builds go by SFTP

    def __init__(self, stdout, stdin=None, max_requests=None):
        import queue
        import threading

        self.stdout = stdout
        self.requests_left = max_requests  # None: any number
        self.gone = threading.Event()
        self.inbox = queue.Queue()
        self.locked_env = None  # set by a session holding that env's deploy lock
        if stdin is not None:
            self.fd = stdin.fileno()
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer, last = b"", time.monotonic()
        while True:
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                buffer += chunk
                last = time.monotonic()
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip() and line.strip() != b"{}":  # {} is a heartbeat
                        if self.requests_left is not None:
                            self.requests_left -= 1
                        self.inbox.put(line.decode("utf-8", "replace"))
                if len(buffer) > self.MAX_LINE or (self.requests_left or 0) < 0:
                    break  # a flood, not qabox: end the call rather than buffer it
            elif time.monotonic() - last > SESSION_IDLE:
                break
        self.gone.set()
        self.inbox.put(None)

    def next_request(self):
        """The next request line, or None once qabox has gone."""
        return self.inbox.get()

    def emit(self, message: dict) -> None:
        try:
            self.stdout.write(json.dumps(message) + "\n")
            self.stdout.flush()
        except (BrokenPipeError, ValueError):
            self.gone.set()

    def check(self) -> None:
        """Stop a step whose client has gone: nobody would see its result."""
        if self.gone.is_set():
            raise Fail("cancelled", "qabox went away: the step was cancelled and cleaned up")
