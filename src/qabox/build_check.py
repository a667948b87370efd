"""Checking a build file before anything is sent: format, members, entry point,
and its manifest (what the host assembles it from), all in one read of the file.

The member rules are the agent's own (``rules.check_members``), so the host
refuses exactly what qabox refuses here.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tarfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qabox.agent import manifest, rules
from qabox.agent.files import write_json
from qabox.agent_zip import AGENT_HASH
from qabox.errors import BuildError


KEEP_CHECKS = 100  # remembered checks (see checked)
RESOLVED_FOR = "wheels/resolved-for.json"  # written by qabox build (host_python.Target.to_json)
SERVER_BROUGHT_BY = {"werkzeug": ("werkzeug", "flask"), "waitress": ("waitress",), "gunicorn": ("gunicorn",)}
SERVER_TITLES = {"werkzeug": "Werkzeug", "waitress": "waitress", "gunicorn": "gunicorn"}


@dataclass(frozen=True)
class Build:
    """A checked build: its file, its manifest (and so its identity) and how to start its app."""

    path: Path
    manifest: dict
    id: str  # the sha256 of the manifest: the build's identity on the host
    entry: str
    entry_reason: str | None  # why qabox picked the entry, when none was given
    health: str
    health_status: str
    static: dict  # URL prefix -> directory of the release, served ahead of the app
    members: int
    environment: dict  # [app.environment]: the app's non-secret defaults
    release_hooks: list[str]
    release_timeout: float
    persist: tuple = tuple(rules.DEFAULT_PERSIST)
    snapshot_max_mb: int = 500
    server: str = rules.DEFAULT_SERVER  # [app] server: the app server the host runs it on
    server_options: dict = field(default_factory=dict)  # [server]: its knobs
    wheels: tuple = ()  # the names of its wheels/*.whl
    resolved_for: dict | None = None  # its RESOLVED_FOR: the python qabox build resolved its wheels for
    requirements: str | None = None  # its requirements.txt


def normalise(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def inspect(path: Path, entry: str | None = None, max_bytes: int = rules.DEFAULT_MAX_BYTES,
            max_members: int = rules.DEFAULT_MAX_MEMBERS) -> Build:
    """Open and check a build; raise BuildError naming every problem found."""
    if not path.is_file():
        raise BuildError(f"build file {path} does not exist: give the path to a .tar or .tar.gz build")
    try:
        texts = {}
        # a stream: the file is read once, whatever its compression; in large reads (a quarter less time)
        with tarfile.open(path, "r|*", bufsize=1 << 20) as tar:
            members, listed = manifest.scan(
                tar, max_members, lambda m, data: texts.setdefault(normalise(m.name), data))
            problems = rules.check_members(members, max_bytes, max_members)
            if problems:
                shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
                raise BuildError(f"{path.name} is refused, unsafe members: {shown}")
            files = {normalise(m.name) for m in members if m.isfile()}
            config = read_config(texts, path)
            app = config.get("app", {})
            chosen, reason = entry or app.get("entry"), None
            if chosen is None:
                chosen, reason = default_entry(files, lambda name: member_text(texts, name), path)
            problems = rules.requirements_problems(lambda name: member_text(texts, name))
            if problems:
                raise BuildError(f"{path.name} is refused: " + "; ".join(problems[:5]))
            requirements = member_text(texts, "requirements.txt")
            resolved_for = read_resolved_for(member_text(texts, RESOLVED_FOR))
            server, server_options = app.get("server", rules.DEFAULT_SERVER), config.get("server", {})
            problems = rules.server_problems(server, server_options, f"qabox.toml in {path.name}")
            if problems:
                raise BuildError("; ".join(problems))
            for needed in needed_servers(server, app.get("static")):
                if requirements is not None and not brings_server(files, requirements, needed):
                    why = "which serves its [app] static" if needed != server else \
                        "qabox's app server" if server == rules.DEFAULT_SERVER else "the app server its qabox.toml names"
                    raise BuildError(f"{path.name} does not bring {SERVER_TITLES[needed]}, {why}: add `{needed}` to its "
                                     f"requirements.txt (and its wheel to wheels/), or make the build with "
                                     f"`qabox build`, which adds it")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BuildError(
            f"{path.name} is not a readable tar build ({e}): make one with tar -czf, "
            f"a .tar, .tar.gz, .tar.bz2 or .tar.xz"
        ) from None
    try:
        rules.parse_entry(chosen)
    except ValueError as e:
        raise BuildError(str(e)) from None
    if not set(rules.entry_module_path(chosen)) & files:
        module = chosen.split(":")[0]
        raise BuildError(f"app entry {chosen}: {path.name} has no module {module} "
                         f"({' or '.join(rules.entry_module_path(chosen))})")
    health = app.get("health", "/")
    if not isinstance(health, str) or not rules.HEALTH_PATH.fullmatch(health):
        raise BuildError(f"qabox.toml in {path.name}: [app] health = {health!r} is not a URL path: use one "
                         f"like \"/health\" (printable characters, no spaces)")
    environment = app.get("environment", {})
    problems = rules.environment_problems(environment)
    if problems:
        raise BuildError(f"qabox.toml in {path.name}: [app.environment]: {'; '.join(problems)}")
    try:
        hooks = rules.release_hooks(app.get("release", []))
    except rules.Fail as e:
        raise BuildError(f"qabox.toml in {path.name}: {e.message}") from None
    timeout = app.get("release_timeout", rules.RELEASE_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise BuildError(f"qabox.toml in {path.name}: [app] release_timeout = {timeout!r} is not a number of "
                         f"seconds above 0")
    persist = app.get("persist", rules.DEFAULT_PERSIST)
    bad = rules.persist_problems(persist)
    if bad:
        raise BuildError(f"qabox.toml in {path.name}: [app] persist: " + "; ".join(bad))
    snapshot_max_mb = app.get("snapshot_max_mb", 500)
    if not isinstance(snapshot_max_mb, int) or isinstance(snapshot_max_mb, bool) or snapshot_max_mb < 0:
        raise BuildError(f"qabox.toml in {path.name}: [app] snapshot_max_mb = {snapshot_max_mb!r} is not "
                         f"a number of MB (0 or more)")
    health_status = app.get("health_status", rules.DEFAULT_HEALTH_STATUS)
    try:
        rules.health_codes(health_status)
    except ValueError as e:
        raise BuildError(f"qabox.toml in {path.name}: [app] {e}") from None
    static = app.get("static", {})
    problems = rules.static_problems(static)
    if problems:
        raise BuildError(f"qabox.toml in {path.name}: " + "; ".join(problems))
    return Build(path=path, manifest=listed, id=manifest.identity(listed), entry=chosen,
                 entry_reason=reason, health=health, health_status=health_status, static=static,
                 members=len(members), environment=environment, release_hooks=hooks,
                 release_timeout=float(timeout), persist=tuple(persist), snapshot_max_mb=snapshot_max_mb,
                 wheels=tuple(sorted(f[len("wheels/"):] for f in files if re.fullmatch(r"wheels/[^/]+\.whl", f))),
                 resolved_for=resolved_for, requirements=requirements, server=server, server_options=server_options)


def default_entry(files: set, read, path: Path) -> tuple[str, str]:
    """The entry qabox picks for a build that names none, and why: ``wsgi:app``
    (a wsgi.py), ``app:app`` (an app.py), a Django project's ``PKG.wsgi:application``,
    a package's app factory ``PKG:create_app()``."""
    if "wsgi.py" in files:
        return "wsgi:app", "none given, and the build has wsgi.py"
    if "app.py" in files:
        return "app:app", "none given, and the build has app.py (no wsgi.py)"

    def packages(file: str, defines: str) -> list:
        """The top-level packages whose ``file`` has a line starting with ``defines``."""
        matches = (re.fullmatch(r"([A-Za-z_]\w*)/" + re.escape(file), name) for name in sorted(files))
        return [m.group(1) for m in matches if m and re.search("^" + defines, read(m.group(0)) or "", re.M)]

    picks = [(f"{p}.wsgi:application", f"none given, and {p}/wsgi.py (a Django project's) defines application")
             for p in packages("wsgi.py", r"application\s*=")] or [
        (f"{p}:create_app()", f"none given, and {p}/__init__.py defines the app factory create_app")
        for p in packages("__init__.py", r"def create_app\(")]
    if len(picks) > 1:
        raise BuildError(f"{path.name} has several apps ({', '.join(e for e, _ in picks)}): name one with "
                         f"`[app] entry` in its qabox.toml or --app")
    if not picks:
        raise BuildError(
            f"{path.name} has no app entry: add `[app] entry = \"module:app\"` to its qabox.toml, "
            f"pass --app module:callable (or module:create_app() for a factory), or ship a wsgi.py "
            f"or app.py defining `app`")
    return picks[0]


def needed_servers(server: str, static) -> list:
    """The server packages a build must bring: its server's, and Werkzeug
    (whose SharedDataMiddleware serves ``[app] static``) when it has static directories."""
    return [server] + (["werkzeug"] if static and server != "werkzeug" else [])


def brings_server(files: set, requirements: str, server: str = rules.DEFAULT_SERVER) -> bool:
    """Whether a build with requirements installs ``server``'s package: its
    wheel in wheels/, or (no wheels/) a requirement of it (or, for Werkzeug, Flask)."""
    if any(name.startswith("wheels/") for name in files):
        wheel = re.compile(rf"wheels/{server}-[^/]*\.whl", re.I)
        return any(wheel.fullmatch(name) for name in files)
    names = "|".join(SERVER_BROUGHT_BY[server])
    return re.search(rf"^[ \t]*({names})[ \t]*([\[<>=!~;#]|$)", requirements, re.I | re.M) is not None


def build_brings(build: Build, server: str) -> bool:
    """Whether a checked build installs ``server``'s package (one without
    requirements installs nothing: it brings none)."""
    if build.requirements is None:
        return False
    return brings_server({f"wheels/{name}" for name in build.wheels}, build.requirements, server)


def read_resolved_for(text: str | None) -> dict | None:
    """The python a build says its wheels are for; a record it cannot read says nothing."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(record, dict) or not all(isinstance(v, (str, type(None))) for v in record.values()):
        return None
    return record if re.fullmatch(r"\d+\.\d+(\.\d+)?", record.get("python") or "") else None


def member_text(texts: dict, name: str) -> str | None:
    """A regular file of the build (its first by that name, of at most 1 MB) as
    text, or None if it has none."""
    data = texts.get(name)
    return None if data is None else data.decode("utf-8", "replace")


def read_config(texts: dict, path: Path) -> dict:
    """The build's own qabox.toml, if it has one."""
    text = member_text(texts, "qabox.toml")
    if text is None:
        return {}
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"qabox.toml in {path.name}: {e}") from None
    if not isinstance(config.get("app", {}), dict):
        raise BuildError(f"qabox.toml in {path.name}: [app] must be a table")
    return config


def checked(path: Path, entry: str | None, max_bytes: int, max_members: int, cache_dir: Path) -> Build:
    """``inspect(path, ...)``, remembered by the file's device, inode,
    size, mtime and ctime (which any write changes, ``touch -d`` included): a
    redeploy of the same file does not read and hash all of it again. The host
    verifies every piece it is sent against the manifest regardless."""
    if not path.is_file():
        return inspect(path, entry, max_bytes, max_members)  # its error
    st = path.stat()
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # these checks, as they are now
    key = hashlib.sha256(json.dumps([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                     st.st_ctime_ns, entry, max_bytes, max_members, AGENT_HASH, code]).encode())
    folder = cache_dir / "checked"
    memo = folder / f"{key.hexdigest()[:32]}.json"
    try:
        saved = json.loads(memo.read_text())
        return Build(**{**saved, "path": path, "persist": tuple(saved["persist"]), "wheels": tuple(saved["wheels"])})
    except (OSError, ValueError, TypeError, KeyError):
        pass  # none yet, or damaged: check the file
    build = inspect(path, entry, max_bytes, max_members)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(str(memo), {**asdict(build), "path": str(path)})
        for old in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_CHECKS:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # a full or read-only cache costs the next deploy a read of the file, nothing more
    return build


class Checking:
    """A build file's check (``checked``), started first: it reads and hashes
    the whole file, the longest step of a redeploy but for the app's start, so
    it runs while qabox loads its SSH stack, connects and takes the lock.
    ``result()`` is the Build, or raises what the check raised.

    On Linux, while the process has one thread, it runs in a forked child: in
    a thread it waited for the GIL on every block, taking 2-3 times as long
    while paramiko was being imported. Where that cannot be done, or the child
    gives no answer, it runs in a thread of this process."""

    def __init__(self, path: Path, entry: str | None, max_bytes: int, max_members: int, cache_dir: Path):
        self.args = (path, entry, max_bytes, max_members, cache_dir)
        self.build, self.error = None, None
        child = self._fork() if sys.platform == "linux" and threading.active_count() == 1 else None
        self.thread = threading.Thread(target=self._run, args=(child,), daemon=True)
        self.thread.start()

    def _fork(self):
        """(pid, the read end of its pipe) of a child that checks the file, or None."""
        import os
        import pickle

        try:
            read, write = os.pipe()
            pid = os.fork()
        except OSError:
            return None
        if pid:
            os.close(write)
            return pid, read
        try:  # the child: its answer, pickled, then gone without running the parent's exit handlers
            os.close(read)
            try:
                answer = (checked(*self.args), None)
            except BaseException as e:
                answer = (None, e)
            with open(write, "wb") as out:
                out.write(pickle.dumps(answer))
        finally:
            os._exit(0)

    def _run(self, child) -> None:
        try:
            from qabox import host_python  # noqa: F401 (what the deploy needs next, loaded off its path)

            if child is not None:
                self.build, self.error = self._answer(*child)
            if self.build is None and self.error is None:
                self.build = checked(*self.args)
        except BaseException as e:  # raised again by result(), in the deploy's thread
            self.error = e

    @staticmethod
    def _answer(pid: int, read: int) -> tuple:
        import os
        import pickle

        with open(read, "rb") as answer:
            raw = answer.read()
        os.waitpid(pid, 0)
        try:
            return pickle.loads(raw)
        except Exception:  # it died, or its error does not unpickle: check here instead
            return None, None

    def result(self) -> Build:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.build


def check_early(ctx, host: str, path: Path, entry: str | None) -> Checking:
    """Start checking the build file at ``path`` within ``host``'s limits (its hosts file's)."""
    settings = ctx.settings(host)
    return Checking(path, entry, settings.max_build_mb * 2**20, settings.max_build_members, ctx.cache_dir)
