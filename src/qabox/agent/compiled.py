"""This python's compiled copy of the agent, beside its archive.

zipimport never writes bytecode, so every agent process compiled the modules
it imports from source, again and again: about 40 ms of each deploy session
and 10 ms of each app start. ``install`` writes, once per version and python,
a zip of the archive's modules compiled for the python it runs on::

    agent/agent-<hash>.<cache tag>-<magic>-<sha256 of the zip, 16>.zip

and the archive's ``__main__`` puts it first on the package's path. Its name
carries the hash of its own bytes, checked before it is used, so a damaged or
foreign file is never loaded (the sources in the archive are); it is written
whole (renamed into place) and never changed, like the archive itself, and
removed with it (``agents.prune``).
"""

import hashlib
import os
import sys

PACKAGE = __name__.rpartition(".")[0]
USED = None  # the compiled copy this process imports from, if any (hello reports it)


def prefix(archive: str) -> str:
    """The start of the compiled copies' names for this archive and python: its
    cache tag and bytecode magic (a pre-release may change the magic, not the tag)."""
    from importlib.util import MAGIC_NUMBER

    return "%s.%s-%s-" % (os.path.basename(archive)[:-len(".pyz")], sys.implementation.cache_tag,
                          MAGIC_NUMBER[:2].hex())


def copies_of(archive: str) -> list:
    """Every compiled copy of ``archive`` beside it, for any python."""
    stem = os.path.basename(archive)[:-len(".pyz")] + "."
    try:
        names = os.listdir(os.path.dirname(archive))
    except OSError:
        return []
    return [name for name in names if name.startswith(stem) and name.endswith(".zip")]


def find(archive: str):
    """The sound compiled copy of ``archive`` for this python, or None."""
    start = prefix(archive)
    folder = os.path.dirname(archive)
    for name in copies_of(archive):
        if not name.startswith(start):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                sound = hashlib.sha256(f.read()).hexdigest()[:16] == name[len(start):-len(".zip")]
        except OSError:
            continue
        if sound:
            return path
    return None


def use(archive: str) -> bool:
    """Import the agent's modules from this python's compiled copy when there is one.
    This module itself is compiled from source on every start: it imports little."""
    global USED
    if sys.implementation.cache_tag is None:
        return False
    USED = find(os.path.abspath(archive))
    if USED is None:
        return False
    sys.modules[PACKAGE].__path__.insert(0, os.path.join(USED, PACKAGE))
    return True


def pyc(code) -> bytes:
    """A sourceless .pyc: its source is not beside it, so nothing is checked against it."""
    import marshal
    from importlib.util import MAGIC_NUMBER

    header = MAGIC_NUMBER + (b"\0" * 4 if sys.version_info >= (3, 7) else b"")  # 3.7+: flags (timestamp)
    return header + b"\0" * 8 + marshal.dumps(code)  # source mtime and size: none


def write(archive: str) -> bool:
    """Write this python's compiled copy of ``archive`` if it has none. True if written."""
    if sys.implementation.cache_tag is None or find(archive) is not None:
        return False
    import io
    import zipfile

    from .files import write_text

    out = io.BytesIO()
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for name in sorted(source.namelist()):
            if name.startswith(PACKAGE + "/") and name.endswith(".py"):
                code = compile(source.read(name), os.path.join(archive, name), "exec", dont_inherit=True)
                target.writestr(zipfile.ZipInfo(name[:-len(".py")] + ".pyc", (1980, 1, 1, 0, 0, 0)), pyc(code))
    data = out.getvalue()
    path = os.path.join(os.path.dirname(archive),
                        prefix(archive) + hashlib.sha256(data).hexdigest()[:16] + ".zip")
    write_text(path, data)
    return True
