"""Make build tarballs: an app's files plus the wheels it needs.

A qabox box may have no route to PyPI, so a build carries its dependencies as
wheels and the box installs them offline.  The tarball is also reproducible
(same inputs, same bytes), so its hash identifies a release and an unchanged
app does not produce a "new" build just because files were touched.

Standard library only: this runs on the developer's machine before anything
else is installed, and must import on Python 3.9+.
"""
from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

# A fixed timestamp for every member (and the gzip header): real mtimes would
# make two builds of identical files differ.  2023-11-14, any constant works.
FIXED_MTIME = 1700000000

# Never worth shipping: bytecode is rebuilt on the box, VCS data is not the app.
SKIP_DIRS = frozenset({"__pycache__", ".git"})
SKIP_SUFFIXES = (".pyc",)

# Suffix -> tarfile compression.  Checked in order, so ".tar.gz" wins over ".tar".
_COMPRESSION = (
    (".tar.gz", "gz"),
    (".tgz", "gz"),
    (".tar.bz2", "bz2"),
    (".tar.xz", "xz"),
    (".tar", ""),
)


class PackError(Exception):
    """A build could not be made (pip failed, bad output name, clashing names...)."""


def download_wheels(
    requirements: Path,
    dest: Path,
    python_version: str | None = None,
    platform: str | None = None,
) -> list[Path]:
    """Download wheels for everything in `requirements` into `dest`.

    Binary-only on purpose: the box must install without compilers or network,
    so an sdist-only dependency should fail here, on the developer's machine,
    not later during a deploy.  `python_version` / `platform` select wheels for
    a box that differs from this interpreter (pip's own flags, passed through).

    Returns every ``*.whl`` in `dest` (sorted), so `dest` should be a fresh or
    dedicated directory.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "-r", str(requirements),
        "-d", str(dest),
    ]
    if python_version:
        cmd += ["--python-version", python_version]
    if platform:
        cmd += ["--platform", platform]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise PackError(f"pip download failed (exit {proc.returncode}) for {requirements}:\n{tail}")
    return sorted(dest.glob("*.whl"))


def pack(
    src: Path,
    out: Path,
    wheels: Iterable[Path] = (),
    extra: Mapping[str, bytes] | None = None,
    include: Callable[[str, bool], bool] | None = None,
) -> Path:
    """Write `src`'s files, `wheels` (under ``wheels/``) and `extra` to the tar `out`.

    Compression follows `out`'s suffix (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz).
    `extra` maps member names to contents, for generated files (build info,
    assets) that should not have to be written into the app directory first.
    `include(relative_path, is_dir)`, when given, says which of `src`'s files
    and directories go in (a directory left out is not walked).

    Reproducible: members are sorted by name, and everything that would vary
    between machines or runs (mtime, owner, umask-dependent modes, the gzip
    header's time and file name) is fixed.  Files keep only "executable or
    not" (0755 / 0644); directories are 0755.  Symlinked directories inside
    `src` are not followed; symlinked files are stored as regular files.

    The tarball is written to a temporary name and renamed into place, so a
    failed build never leaves a truncated `out` behind.  Returns `out`.
    """
    src, out = Path(src), Path(out)
    compression = _compression_for(out)
    if not src.is_dir():
        raise PackError(f"not a directory: {src}")

    # name -> (is_dir, executable, source): source is a Path, bytes, or None for dirs.
    entries: dict[str, tuple[bool, bool, Path | bytes | None]] = {}

    def add(name: str, executable: bool, source: Path | bytes) -> None:
        if name in entries:
            raise PackError(f"duplicate member {name!r} (from {source if isinstance(source, Path) else 'extra'})")
        for parent in list(PurePosixPath(name).parents)[:-1]:  # implied dirs, minus "."
            if not entries.setdefault(str(parent), (True, True, None))[0]:
                raise PackError(f"{str(parent)!r} is both a file and a directory")
        entries[name] = (False, executable, source)

    for rel, path in walk(src, include, skip=out):
        if path is None:
            entries.setdefault(rel, (True, True, None))  # keeps empty dirs too
        else:
            add(rel, bool(path.stat().st_mode & 0o111), path)

    for wheel in wheels:
        add(f"wheels/{Path(wheel).name}", False, Path(wheel))
    for name, data in (extra or {}).items():
        add(_member_name(name), False, bytes(data))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            _write_tar(raw, compression, entries)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def walk(src: Path, include: Callable[[str, bool], bool] | None = None,
         skip: Path | None = None) -> Iterator[tuple[str, Path | None]]:
    """What of `src` goes in a build, in walk order: (relative name, path), or
    (relative name, None) for a directory. `skip` (the build being written) never does."""
    skipped = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(src):
        base = Path(dirpath)
        rel_dir = base.relative_to(src).as_posix()
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and (
            include is None or include((base / d).relative_to(src).as_posix(), True)))
        if rel_dir != ".":
            yield rel_dir, None
        for fname in sorted(filenames):
            path = base / fname
            if fname.endswith(SKIP_SUFFIXES) or fname in SKIP_DIRS or path.resolve() == skipped:
                continue
            if include is not None and not include(path.relative_to(src).as_posix(), False):
                continue
            yield path.relative_to(src).as_posix(), path


def _compression_for(out: Path) -> str:
    name = out.name.lower()
    for suffix, compression in _COMPRESSION:
        if name.endswith(suffix):
            return compression
    raise PackError(f"unknown archive type for {out.name!r}: use .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz")


def _member_name(name: str) -> str:
    """Normalise an `extra` name; refuse ones that would escape the tarball root."""
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or name.startswith("/") or ".." in parts:
        raise PackError(f"bad member name {name!r}: must be a relative path inside the archive")
    return "/".join(parts)


def _write_tar(raw: BinaryIO, compression: str, entries: Mapping[str, tuple]) -> None:
    # gzip is wrapped by hand: tarfile's "w:gz" would stamp the current time and
    # the output file name into the gzip header.  bz2 and xz have no such fields.
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=FIXED_MTIME) if compression == "gz" else None
    mode = "w:" + compression if compression in ("bz2", "xz") else "w"
    try:
        with tarfile.open(fileobj=gz or raw, mode=mode, format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(entries):
                is_dir, executable, source = entries[name]
                info = tarfile.TarInfo(name)
                info.mtime = FIXED_MTIME
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if executable else 0o644
                if is_dir:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif isinstance(source, bytes):
                    info.size = len(source)
                    tar.addfile(info, io.BytesIO(source))
                else:
                    with open(source, "rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        tar.addfile(info, f)
    finally:
        if gz is not None:
            gz.close()
