"""The host agent as one file: a deterministic zipapp of ``qabox.agent``.

Inside, the package is ``qabox_agent`` (an app's own ``agent`` module must not
meet it on ``sys.path`` in the app process), next to a ``__main__.py`` that
runs it. Names are sorted, timestamps fixed and nothing compressed, so the
same source always gives the same bytes, and its hash names the version on
the host. The host's python runs it directly, from 3.6 on.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from importlib.resources import files

PACKAGE = "qabox_agent"
# Run through the stable entry (``current``, a symlink), the agent starts again from the archive
# it names before it imports anything of itself: zipimport reads each module from the path it was
# given, and ``current`` may be switched to another file meanwhile (see agent.agents).
MAIN = (b"import os, sys\n"
        b"if os.path.islink(sys.argv[0]):\n"
        b"    os.execv(sys.executable, [sys.executable, os.path.realpath(sys.argv[0])] + sys.argv[1:])\n"
        b"from qabox_agent import compiled\ncompiled.use(sys.argv[0])\n"  # see agent.compiled
        b"from qabox_agent.main import run\nrun()\n")
STAMP = (1980, 1, 1, 0, 0, 0)  # the oldest time a zip can hold


def build() -> bytes:
    """The archive's bytes."""
    members = {"__main__.py": MAIN}
    for source in files("qabox.agent").iterdir():
        if source.name.endswith(".py"):
            members[f"{PACKAGE}/{source.name}"] = source.read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, STAMP)
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[name])
    return out.getvalue()


def hash_of(archive: bytes) -> str:
    """The version an archive is on the host (``agent-<hash>.pyz``): its sha256's first 16 hex digits."""
    return hashlib.sha256(archive).hexdigest()[:16]


AGENT_PYZ = build()
AGENT_HASH = hash_of(AGENT_PYZ)
