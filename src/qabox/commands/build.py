"""``qabox build``: pack a project directory into a deployable build.

The app's files (minus what .gitignore and ``[build] exclude`` leave out),
and a ``wheels/`` wheelhouse of its requirements for the host's Python, so the
host never needs an index. Same inputs, byte-identical tarball (``pack``).
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pathspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qabox import build_check
from qabox.errors import BuildError
from qabox.pack import PackError, download_wheels, pack

SECRETS = (".env", ".env.*", "id_rsa*", "id_ed25519*", "id_ecdsa*", "*.pem", "*.key", "*.p12", ".netrc")
ALWAYS_OUT = (".git/", "__pycache__/", "*.pyc", ".venv/", "venv/", "wheels/", ".qabox/")


@dataclass(frozen=True)
class BuildReport:
    path: Path
    files: int
    wheels: int
    size: int
    secrets: tuple[str, ...]
    entry: str
    entry_reason: str | None  # why qabox picked the entry, when none was given


def exclusions(src: Path) -> pathspec.PathSpec:
    """What stays out: .gitignore's patterns, qabox.toml's [build] exclude, and the usual."""
    lines = list(ALWAYS_OUT)
    gitignore = src / ".gitignore"
    if gitignore.is_file():
        lines += gitignore.read_text(errors="replace").splitlines()
    config = src / "qabox.toml"
    if config.is_file():
        try:
            exclude = tomllib.loads(config.read_text()).get("build", {}).get("exclude", [])
        except tomllib.TOMLDecodeError as e:
            raise BuildError(f"{config}: {e}") from None
        if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
            raise BuildError(f"{config}: [build] exclude must be a list of patterns, like [\"tests/\"]")
        lines += exclude
    return pathspec.GitIgnoreSpec.from_lines(lines)


def with_entry(config: Path, entry: str) -> bytes:
    """The project's qabox.toml (or a new one) with ``[app] entry`` set to ``entry``."""
    text = config.read_text() if config.is_file() else ""
    line = f"entry = {json.dumps(entry)}"
    header = re.search(r"^\[app\][ \t]*(#.*)?$", text, re.M)
    if header is None:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"[app]\n{line}\n"
    else:
        following = re.compile(r"^\[", re.M).search(text, header.end())
        end = following.start() if following else len(text)
        section = text[header.end():end]
        section, found = re.subn(r"^[ \t]*entry[ \t]*=.*$", line, section, count=1, flags=re.M)
        text = text[:header.end()] + ("" if found else "\n" + line) + section + text[end:]
    try:
        written = tomllib.loads(text).get("app", {}).get("entry")
    except tomllib.TOMLDecodeError:
        written = None
    if written != entry:
        raise BuildError(f"{config}: cannot set the entry for --app there: write `entry = {json.dumps(entry)}` "
                         f"under [app] in it yourself")
    return text.encode()


def make(src: Path, out: Path, python_version: str | None = None, platform: str | None = None,
         entry: str | None = None) -> BuildReport:
    """Pack ``src`` with its requirements' wheels into ``out``; checks the result like deploy does.
    ``entry`` (--app) is written into the build's qabox.toml."""
    if not src.is_dir():
        raise BuildError(f"{src} is not a directory: give the project's directory")
    spec = exclusions(src)
    extra = {"qabox.toml": with_entry(src / "qabox.toml", entry)} if entry else {}
    keep = lambda rel, is_dir: not spec.match_file(rel + ("/" if is_dir else "")) and rel not in extra  # noqa: E731
    try:
        with tempfile.TemporaryDirectory(prefix="qabox-wheels-") as tmp:
            requirements = src / "requirements.txt"
            wheels = (download_wheels(requirements, Path(tmp), python_version, platform)
                      if requirements.is_file() else [])
            pack(src, out, wheels=wheels, extra=extra, include=keep)
    except PackError as e:
        raise BuildError(str(e)) from None
    checked = build_check.inspect(out)
    with tarfile.open(out) as tar:
        packed = [m.name for m in tar.getmembers() if m.isfile() and not m.name.startswith("wheels/")]
    secrets = tuple(f for f in packed if any(fnmatch.fnmatch(Path(f).name, s) for s in SECRETS))
    return BuildReport(path=out, files=len(packed), wheels=len(wheels), size=out.stat().st_size,
                       secrets=secrets, entry=checked.entry, entry_reason=checked.entry_reason)
