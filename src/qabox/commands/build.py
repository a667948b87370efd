"""``qabox build``: pack a project directory into a deployable build.

The app's files (minus what .gitignore and ``[build] exclude`` leave out),
and a ``wheels/`` wheelhouse of its requirements for the host's Python, so the
host never needs an index. The wheelhouse is resolved for a Target (the host's
python with ``--for``, else this machine's), recorded in the build as
``wheels/resolved-for.json``; the project's own ``wheels/`` is searched too.
Same inputs, byte-identical tarball (``pack``).
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
from typing import TYPE_CHECKING, Callable

import pathspec
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qabox import build_check, host_python, wheelhouse
from qabox.agent import rules
from qabox.errors import BuildError
from qabox.host_python import Target
from qabox.pack import PackError, pack

if TYPE_CHECKING:
    from qabox.context import Context  # loads paramiko, which only --for needs

SECRETS = (".env", ".env.*", "id_rsa*", "id_ed25519*", "id_ecdsa*", "*.pem", "*.key", "*.p12", ".netrc")
SERVER = "werkzeug"  # qabox's app server: every build brings it
BOTH_TARGETS = "--for names the host's python and platform: leave out --python-version and --platform"
# wheels/: the build's is the resolved wheelhouse, the project's own wheels/ is searched for it
ALWAYS_OUT = (".git/", "__pycache__/", "*.pyc", ".venv/", "venv/", "wheels/", ".qabox/")


@dataclass(frozen=True)
class BuildReport:
    path: Path
    files: int
    wheels: int
    size: int
    secrets: tuple[str, ...]
    requirements: str  # where the build's requirements come from
    entry: str
    entry_reason: str | None  # why qabox picked the entry, when none was given
    target: str = ""  # the python its wheels are for, described
    built: tuple[str, ...] = ()  # requirements built into wheels here, from their sdists


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


def server_packages(src: Path) -> list[str]:
    """The app servers' packages a build of ``src`` needs: Werkzeug (the default
    server, and what serves ``[app] static``), and the one its qabox.toml's
    ``[app] server`` names."""
    try:
        server = tomllib.loads((src / "qabox.toml").read_text()).get("app", {}).get("server")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        server = None  # none, or broken: the build's check says what is wrong with it
    extra = rules.SERVER_PACKAGES.get(server) if server != SERVER else None
    return [SERVER] + ([extra] if extra else [])


def project_requirements(src: Path) -> tuple[list[str], str]:
    """What the project requires beyond its requirements.txt, and where its
    requirements come from: its requirements.txt, else its pyproject.toml's
    ``[project] dependencies`` (its own code is shipped as it is, importable
    from the release, not installed: a code change keeps the virtualenv)."""
    pyproject = src / "pyproject.toml"
    if (src / "requirements.txt").is_file():
        return [], "requirements.txt"
    if not pyproject.is_file():
        return [], "no requirements"
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"{pyproject}: {e}") from None
    if "dependencies" in project.get("dynamic", []):
        raise BuildError(f"{pyproject}: its dependencies are dynamic, so qabox cannot read them: "
                         f"list them in a requirements.txt beside it")
    dependencies = project.get("dependencies", [])
    for dependency in dependencies if isinstance(dependencies, list) else [dependencies]:
        try:
            Requirement(dependency)
        except (InvalidRequirement, TypeError) as e:
            raise BuildError(f"{pyproject}: [project] dependencies: {dependency!r} is not a requirement "
                             f"({e})") from None
    return list(dependencies), "pyproject.toml's [project] dependencies"


def requirement_pins(src: Path, added: list[str], tmp: Path, target: Target, find_links: list[Path]) -> list[str]:
    """The pins of the project's requirements.txt (if any) and the ``added`` requirements for ``target``."""
    own = src / "requirements.txt"
    lines = ([f"-r {own.resolve()}"] if own.is_file() else []) + added
    if not lines:
        return []
    (tmp / "requirements.txt").write_text("".join(line + "\n" for line in lines))
    return wheelhouse.pins(tmp / "requirements.txt", target, find_links)


def target_of(ctx: Context, host: str) -> Target:
    """The python ``host`` installs a build with, asked through its agent (for ``make``'s ``target``)."""
    with ctx.remote(host) as remote:
        return host_python.of_host(remote, host)


def sources(src: Path, entry: str | None) -> tuple[Callable[[str, bool], bool], dict[str, bytes]]:
    """What of ``src`` goes in its build: which of its files (``include(name, is_dir)``),
    and the files written for it (the qabox.toml that names ``entry``)."""
    if not src.is_dir():
        raise BuildError(f"{src} is not a directory: give the project's directory")
    spec = exclusions(src)
    extra = {"qabox.toml": with_entry(src / "qabox.toml", entry)} if entry else {}
    return (lambda rel, is_dir: not spec.match_file(rel + ("/" if is_dir else "")) and rel not in extra), extra


def make(src: Path, out: Path, python_version: str | None = None, platform: str | None = None,
         entry: str | None = None, target: Target | None = None) -> BuildReport:
    """Pack ``src`` with its requirements' wheels into ``out``; checks the result like deploy does.
    ``entry`` (--app) is written into the build's qabox.toml. The wheels are for ``target``
    (``host_python.of_host``: a host's python), else for this machine's python, or the one
    ``python_version``/``platform`` name."""
    keep, extra = sources(src, entry)
    if target and (python_version or platform):
        raise BuildError(BOTH_TARGETS)
    target = target or host_python.here(python_version, platform)
    try:
        with tempfile.TemporaryDirectory(prefix="qabox-wheels-") as tmp:
            added, origin = project_requirements(src)
            find_links = [src / "wheels"] if (src / "wheels").is_dir() else []
            pinned = requirement_pins(src, added, Path(tmp), target, find_links)
            for package in server_packages(src):  # qabox serves with them: added unless required already
                name = canonicalize_name(Requirement(package).name)
                if not any(canonicalize_name(pin.split("==")[0]) == name for pin in pinned):
                    added.append(package)
                    pinned = requirement_pins(src, added, Path(tmp), target, find_links)
                    origin += f", and {name} " + ("(qabox's app server)" if name == SERVER else "(its [app] server)")
            wheels, built = wheelhouse.fetch(pinned, Path(tmp) / "wheels", target, find_links)
            if added:
                own = (src / "requirements.txt").read_text() if origin.startswith("requirements.txt") else ""
                extra["requirements.txt"] = (own + ("\n" if own and not own.endswith("\n") else "")
                                             + "".join(line + "\n" for line in added)).encode()
            extra[build_check.RESOLVED_FOR] = (json.dumps(target.to_json(), indent=1, sort_keys=True) + "\n").encode()
            pack(src, out, wheels=wheels, extra=extra, include=keep)
    except PackError as e:
        raise BuildError(str(e)) from None
    checked = build_check.inspect(out)
    with tarfile.open(out) as tar:
        packed = [m.name for m in tar.getmembers() if m.isfile() and not m.name.startswith("wheels/")]
    secrets = tuple(f for f in packed if any(fnmatch.fnmatch(Path(f).name, s) for s in SECRETS))
    return BuildReport(path=out, files=len(packed), wheels=len(wheels), size=out.stat().st_size,
                       secrets=secrets, requirements=origin, entry=checked.entry, entry_reason=checked.entry_reason,
                       target=target.describe(), built=tuple(built))
