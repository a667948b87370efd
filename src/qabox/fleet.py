"""Running one thing on many hosts at once: the fan-out every multi-host command uses.

At most ``parallel`` hosts at a time, taken in the order given (so one at a
time is a rolling change), one host's failure never stops the others unless
asked to, and a result per host, in the order given.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from qabox.errors import QaboxError


@dataclass
class Outcome:
    """What running on one host gave: its result, or the error that stopped it,
    or neither when it was skipped (a failure elsewhere, with ``fail_fast``)."""

    host: str
    result: Any = None
    error: QaboxError | None = None
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped


def each_host(hosts: list[str], run: Callable[[str], Any], parallel: int = 8,
              fail_fast: bool = False) -> list[Outcome]:
    """``run(host)`` for every host; a QaboxError is that host's outcome.

    The workers are daemon threads, so Ctrl-C (a KeyboardInterrupt here, in the
    caller's thread) ends the command at once rather than waiting for hosts that
    may never answer (``logs -f``). Any other exception is a bug, raised here.
    """
    outcomes = [Outcome(host) for host in hosts]
    pending = iter(outcomes)
    taking = threading.Lock()
    failed = threading.Event()
    bugs: list[BaseException] = []

    def worker() -> None:
        while True:
            with taking:
                outcome = next(pending, None)
            if outcome is None:
                return
            if failed.is_set():
                outcome.skipped = True
                continue
            try:
                outcome.result = run(outcome.host)
            except QaboxError as e:
                outcome.error = e
                if fail_fast:
                    failed.set()
            except Exception as e:  # noqa: BLE001 - raised again in the caller's thread
                bugs.append(e)

    workers = [threading.Thread(target=worker, daemon=True, name="qabox-fleet")
               for _ in range(max(1, min(parallel, len(hosts))))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if bugs:
        raise bugs[0]
    return outcomes
