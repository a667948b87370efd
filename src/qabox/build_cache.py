"""Builds of project directories, cached by their inputs, for ``qabox deploy DIR``.

A build is named by a hash of everything that goes into it: each file qabox
packs (name, mode, content) and the project's prebuilt wheels, the entry, the
python it is resolved for (``host_python.Target``), and qabox's own build rules. An unchanged project therefore redeploys its cached
build without resolving a single requirement again. Requirements that name no
exact version stay as they were resolved into the cached build until the
project changes, as with a lock file; ``--rebuild`` resolves them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

from qabox.agent_zip import AGENT_HASH
from qabox.commands.build import BuildReport, make, sources
from qabox.host_python import Target
from qabox.pack import walk

KEEP = 10  # builds kept in the cache, the most recently used


def inputs_key(src: Path, entry: str | None, target: Target) -> str:
    """The hash of what the build of ``src`` is made from (its prebuilt ``wheels/`` included)."""
    include, extra = sources(src, entry)
    h = hashlib.sha256(json.dumps({"rules": AGENT_HASH, "entry": entry, "target": target.to_json()},
                                  sort_keys=True).encode())
    wheels = sorted(p for p in (src / "wheels").glob("*.whl") if p.is_file())
    for name, path in [*walk(src, include), *((f"wheels/{w.name}", w) for w in wheels)]:
        if name in extra:
            continue
        h.update(b"\0" + name.encode("utf-8", "surrogateescape"))
        if path is not None:
            h.update(b"x" if os.access(path, os.X_OK) else b"f")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    for name in sorted(extra):
        h.update(b"\0" + name.encode() + b"\0" + extra[name])
    return h.hexdigest()[:32]


def cached_build(src: Path, cache_dir: Path, entry: str | None, target: Target,
                 rebuild: bool = False) -> tuple[Path, BuildReport | None]:
    """The build of ``src`` for ``target``: (its path, the report of a new build, or None
    when it came from the cache). Concurrent deploys of one project build it once."""
    key = inputs_key(src, entry, target)
    builds = cache_dir / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    path = builds / f"{src.resolve().name or 'build'}-{key}.tar"
    with FileLock(str(path) + ".lock", timeout=600):
        if path.is_file() and not rebuild:
            os.utime(path)  # most recently used: kept by prune
            return path, None
        report = make(src, path, entry=entry, target=target)
    prune(builds)
    return path, report


def prune(builds: Path) -> None:
    """Keep the KEEP most recently used builds."""
    found = sorted(builds.glob("*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in found[KEEP:]:
        old.unlink(missing_ok=True)
        Path(str(old) + ".lock").unlink(missing_ok=True)

