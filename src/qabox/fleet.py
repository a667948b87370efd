"""Deploying one build to many hosts at once: bounded parallelism, a row per host,
and one host's failure never stops the others (unless asked to)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from qabox import deploy as deploying
from qabox.context import Context
from qabox.errors import QaboxError


def deploy_many(ctx: Context, hosts: list[str], build: Path, parallel: int, fail_fast: bool,
                hooks_for: Callable[[str], deploying.Hooks], **options) -> list[dict]:
    """Deploy to every host; returns a row per host, in the order given."""
    stop = threading.Event()

    def one(host: str) -> dict:
        if stop.is_set():
            return {"host": host, "ok": False, "release": None, "result": "skipped (--fail-fast)",
                    "seconds": 0.0}
        try:
            result = deploying.deploy(ctx, host, build, hooks=hooks_for(host), **options)
        except QaboxError as e:
            if fail_fast:
                stop.set()
            return {"host": host, "ok": False, "release": None, "result": f"failed: {e.message}",
                    "seconds": None}
        return {"host": host, "ok": True, "release": result.release,
                "result": "deployed" if result.changed else "unchanged", "seconds": result.seconds}

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(hosts)))) as pool:
        return list(pool.map(one, hosts))
