"""The qabox host agent: the only code qabox runs on a host.

qabox pushes this one file to the host (named by its hash) and runs it with the
host's python3 (3.8 or newer, standard library only, no root). Each call reads
one JSON request line on stdin and answers with JSON lines on stdout: zero or
more ``{"progress": ...}`` lines, then one result line
``{"ok": ..., "changed": ..., "data": ..., "error": {"code", "message"}}``.

The same file also runs as two long-lived roles, started by the agent itself:
``supervise`` (one per env: owns the listening socket and the app process) and
``serve`` (the app on Werkzeug's threaded server, run by the release's venv).

Layout on the host, under the base directory (default ``~/.qabox``)::

    agent/agent-<hash>.py      this file
    builds/<sha256>            uploaded builds, content-addressed (+ .part)
    envs/<env>/env.json        the env's port
    envs/<env>/deploy.lock     held by a ``session`` for a deploy's life
    envs/<env>/releases/<id>/  extracted builds, each with release.json
    envs/<env>/current         symlink to the serving release
    envs/<env>/venvs/<key>/    virtualenvs, shared by releases with equal requirements
    envs/<env>/data/           QABOX_DATA_DIR: survives every deploy
    envs/<env>/logs/           <release>.log (app output), supervisor.log
    envs/<env>/state.json      the supervisor's view: state, pid, restarts...
    envs/<env>/ctl.sock        the supervisor's control socket
"""

import array
import errno
import fcntl
import glob
import hashlib
import http.client
import json
import os
import posixpath
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time

PROTOCOL = 1
# Names and ids become paths and key lines on the host: always matched whole
# (fullmatch: "$" alone would accept a trailing newline).
ENV_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
SHA256 = re.compile(r"[0-9a-f]{64}")
RELEASE_ID = re.compile(r"\d{8}-\d{6}(-\d+)?")
HEALTH_PATH = re.compile(r"/[\x21-\x7e]*")  # fullmatch; printable, no spaces: pasted into a request line
RELEASE_FILE = "release.json"  # qabox's record in each release: a build may not bring its own
DEFAULT_MAX_BYTES = 2 * 1024**3
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL = 30
SESSION_IDLE = 30.0


class Fail(Exception):
    """A failure the user can act on: a stable code and a one-line message."""

    def __init__(self, code: str, message: str, **data):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


# ---------------------------------------------------------------- build rules
# qabox checks a build with these same functions before sending it, and the
# host checks it again before extracting: one set of rules on both sides.
# Like the whole agent, this keeps to python 3.6 (no walrus, no `X | None`
# evaluated at run time: such annotations are strings).

DEFAULT_MAX_MEMBERS = 50000
HEADER_BYTES = 512  # each member's tar header, counted so that empty members are not free
NAME_MAX = 255  # bytes in one name of a path: Linux's limit
PATH_MAX = 3072  # bytes in a member's path or link: Linux's 4096 less room for the release's own path
LINK_HOPS = 40  # links one lookup may go through, as Linux's ELOOP limit
DIR, FILE = 0, 1  # kinds in the tree check_members builds; a link's entry is its target (a str)


def name_parts(name: str) -> list:
    """A member's path as its names: ``./a//b/`` is ``["a", "b"]``."""
    return [p for p in name.split("/") if p not in ("", ".")]


def shown(name: str) -> str:
    """A member's name for a one-line message: escaped, at most 100 characters."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= 100 else text[:60] + "..." + text[-37:]


def too_long(path: str):
    """Why a path is longer than the host can create, or None."""
    raw = path.encode("utf-8", "surrogatepass")
    if len(raw) > PATH_MAX:
        return "longer than %d bytes: shorten it" % PATH_MAX
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        return "a name in it is longer than %d bytes, the host's limit: shorten it" % NAME_MAX
    return None


def member_problem(member: tarfile.TarInfo):
    """Why this tar member, taken alone, may not be extracted into a release, or None."""
    name = member.name
    parts = name_parts(name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name_parts(name.replace("\\", "/")):
        return "path with '..'"
    if "\x00" in name:
        return "NUL in name"
    if not parts and not member.isdir():
        return "empty name"
    long_name = too_long(name)
    if long_name:
        return "path " + long_name
    if parts[:1] == [RELEASE_FILE]:
        return "qabox writes each release's own %s there: rename this member" % RELEASE_FILE
    if member.isdev() or member.isfifo():
        return "device or fifo"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            return "link to an absolute path"
        if not target or "\x00" in target:
            return "link with an empty target or a NUL in it"
        long_target = too_long(target)
        if long_target:
            return "link target " + long_target
    elif not (member.isfile() or member.isdir()):
        return "unsupported member type"
    return None


def place(tree: dict, member: tarfile.TarInfo):
    """Add a member to the tree the build makes, or say why it cannot go there.

    A member is judged by where it would land, not by its name alone: nothing
    may be written through a link an earlier member made (``a/b -> ..`` then
    ``a/b/f``), and nothing may replace an earlier member (tar allows the same
    path twice; a link replacing a directory is the classic escape). A
    directory named again is fine.
    """
    parts = tuple(name_parts(member.name))
    for i in range(1, len(parts)):
        node = tree.get(parts[:i])
        if isinstance(node, str):
            return "written through the link %s made by an earlier member" % shown("/".join(parts[:i]))
        if node == FILE:
            return "inside %s, which is a file of the build" % shown("/".join(parts[:i]))
    if parts in tree and not (tree[parts] == DIR and member.isdir()):
        return "an earlier member has the same path: keep only one"
    if member.islnk() and tree.get(tuple(name_parts(member.linkname))) != FILE:
        return "hardlink to %s, which is not a file earlier in the build" % shown(member.linkname)
    for i in range(1, len(parts)):
        tree.setdefault(parts[:i], DIR)
    tree[parts] = member.linkname if member.issym() else DIR if member.isdir() else FILE
    return None


def resolve(tree: dict, base: tuple, target: str):
    """The path a link in directory ``base`` leads to, following the build's
    own links like the kernel would (names not in the build count as
    directories), or a reason it leads nowhere safe."""
    path = list(base)
    todo = target.split("/")[::-1]
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not path:
                return "leads outside the build"
            path.pop()
            continue
        path.append(part)
        node = tree.get(tuple(path))
        if isinstance(node, str):
            hops += 1
            if hops > LINK_HOPS:
                return "goes through more than %d links (a loop?)" % LINK_HOPS
            path.pop()
            todo.extend(node.split("/")[::-1])
    return tuple(path)


def read_members(tar: tarfile.TarFile, max_members: int = DEFAULT_MAX_MEMBERS) -> list:
    """A tar's members, reading at most one past the limit (a small tar.gz
    can hold millions of empty members)."""
    members = []
    for member in tar:
        members.append(member)
        if len(members) > max_members:
            break
    return members


def check_members(members, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_members: int = DEFAULT_MAX_MEMBERS) -> list:
    """All problems of a build's members as ``"name: reason"`` strings."""
    problems = []
    tree = {(): DIR}
    links = []
    total = 0
    for member in members:
        reason = member_problem(member) or place(tree, member)
        if reason:
            problems.append("%s: %s" % (shown(member.name), reason))
        elif member.issym():
            links.append(member)
        total += HEADER_BYTES + (max(member.size, 0) if member.isfile() else 0)
    # Links are judged in the finished tree: a later member can change where one leads.
    for member in links:
        parts = tuple(name_parts(member.name))
        where = resolve(tree, parts[:-1], member.linkname)
        if isinstance(where, str):
            problems.append("%s: link to %s %s" % (shown(member.name), shown(member.linkname), where))
    if len(members) > max_members:
        problems.append("more than %d members, the limit: ship fewer files or raise max_build_members"
                        " in the host's hosts file" % max_members)
    if total > max_bytes:
        problems.append(
            "extracted size %d MB exceeds the limit of %d MB: make the build smaller or raise"
            " max_build_mb in the host's hosts file" % (total // 2**20, max_bytes // 2**20)
        )
    return problems


SAFE_OPTIONS = ("--pre", "--prefer-binary", "--only-binary", "--require-hashes")  # change nothing pip reaches


def requirements_problems(read, name: str = "requirements.txt", seen: set = None) -> list:
    """Lines of a build's requirements (and the files they include) that would
    make pip reach beyond the build or run code at deploy time, as
    ``"file:line: why"``. ``read(path)`` gives a file of the build (a path
    relative to its root) as text, or None when there is none.

    Only named requirements are allowed: no URLs, paths, editables, direct
    references (``pkg @ url``), indexes, or files outside the build.
    """
    if seen is None:
        seen = set()
    elif name in seen:
        return []  # included already
    text = read(name)
    if text is None:
        return ["%s: no such file in the build" % name] if seen else []
    seen.add(name)
    problems = []
    lines = text.replace("\\\n", " ").splitlines()
    for number, line in enumerate(lines, 1):
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        where = "%s:%d: %s" % (name, number, line[:80])
        first, _, rest = line.partition(" ")
        option = first.split("=", 1)[0]
        if option in ("-r", "--requirement", "-c", "--constraint"):
            target = (first.split("=", 1)[1] if "=" in first else rest).strip()
            path = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith(("/", "~")) or path.startswith("..") or "://" in target:
                problems.append("%s: includes a file outside the build" % where)
            else:
                problems += requirements_problems(read, path, seen)
        elif option.startswith("-"):
            if option not in SAFE_OPTIONS:
                problems.append("%s: option %s is not allowed in a build (it can reach "
                                "beyond the build's wheels)" % (where, option))
        else:
            spec = re.split(r"\s--?[a-z]", " " + line)[0].strip()
            extra = [o.split("=", 1)[0] for o in re.findall(r"\s(--?[a-z][\w-]*)", " " + line)]
            if re.search(r"://|^\.|^/|^~|[\\/]|\.(whl|zip|tar\.gz|tgz)$", spec) or "@" in spec:
                problems.append("%s: a URL, path or direct reference (pkg @ url): name the "
                                "package and ship its wheel in wheels/" % where)
            elif set(extra) - {"--hash"}:
                problems.append("%s: option %s is not allowed in a build"
                                % (where, sorted(set(extra) - {"--hash"})[0]))
    return problems


def entry_module_path(entry: str) -> tuple:
    """The files that can hold ``module:callable``'s module, relative to the build."""
    module = entry.split(":", 1)[0]
    base = module.replace(".", "/")
    return (base + ".py", base + "/__init__.py")


# ---------------------------------------------------------------- small helpers


def now() -> float:
    return time.time()


def iso(ts: "float | None") -> "str | None":
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path: str, data) -> None:
    """Write atomically, readable by the deploy account only; a failed write
    (a full disk) leaves the old file and no temporary one."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_port(value) -> bool:
    return is_int(value) and 1 <= value <= 65535


def is_text(value) -> bool:
    return isinstance(value, str)


# What an env's own files may hold (each a JSON object; any key may be null),
# and what to do about one that is damaged.
RECORDS = {
    "env.json": ({"port": is_port, "stopped": lambda v: isinstance(v, bool), "health_interval": is_number,
                  "log_max_bytes": is_int, "start_timeout": is_number},
                 "delete it, and the next deploy records the env's settings anew"),
    "state.json": ({"state": is_text, "pid": is_int, "release": is_text, "probe_port": is_port, "port": is_port,
                    "started_at": is_number, "restarts": is_int, "hangs": is_int, "last_exit": is_int,
                    "last_log": lambda v: isinstance(v, list), "supervisor_pid": is_int,
                    "updated_at": is_number},
                   "delete it, and the env's supervisor writes it anew"),
    RELEASE_FILE: ({"release": is_text, "sha256": is_text, "file": is_text, "entry": is_text,
                    "health": is_text, "venv": is_text, "deployed_at": is_text, "deployed_by": is_text},
                   "deploy again, or roll back to another release"),
}


def read_record(path: str, strict: bool = True) -> dict:
    """One of an env's files (RECORDS), {} if there is none. A damaged one is a
    Fail naming the file and what to do (or, not strict, read as {}), so that
    it stops only what needs it, never another env or the whole host."""
    fields, advice = RECORDS[os.path.basename(path)]
    try:
        with open(path) as f:
            data = json.load(f)
        problem = None if isinstance(data, dict) else "not a JSON object"
    except FileNotFoundError:
        return {}
    except OSError as e:
        data, problem = None, e.strerror
    except ValueError:
        data, problem = None, "not JSON"
    if problem is None:
        bad = sorted(key for key, valid in fields.items() if data.get(key) is not None and not valid(data[key]))
        problem = "bad " + ", ".join(bad) if bad else None
    if problem is None:
        return data
    if strict:
        raise Fail("bad_file", "%s is damaged (%s): %s" % (path, problem, advice), file=path)
    return {}


def makedirs(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def tail(path: str, lines: int = LOG_TAIL) -> list:
    """The last lines of a log file (reads only its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def proc_stat(pid):
    """(name, fields from the state on) of /proc/PID/stat, or None if no such process.
    ``fields[0]`` is the state, ``fields[1]`` the parent, ``fields[19]`` the start."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (OSError, TypeError):
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def own_pids() -> list:
    """The processes of this account: the only ones whose /proc entries it may read."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat("/proc/" + name).st_uid == os.getuid():
                pids.append(int(name))
        except OSError:
            pass
    return pids


def pid_alive(pid) -> bool:
    """Whether pid runs; a zombie counts as dead (an orphan's reaper may be slow)."""
    stat = proc_stat(pid) if pid else None
    return stat is not None and stat[1][0] not in "ZX"


def disk_full(path: str) -> Fail:
    return Fail(
        "disk_full",
        "the host's disk is full at %s: free some space there and deploy again" % path,
    )


def http_probe(port: int, path: str, timeout: float = 2.0) -> dict:
    """GET path on the loopback: the HTTP code and milliseconds, or the error."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "qabox-health"})
        code = conn.getresponse().status
        return {"code": code, "ms": round((time.monotonic() - start) * 1000, 1)}
    except (OSError, http.client.HTTPException) as e:
        return {"code": None, "error": str(e) or type(e).__name__}
    finally:
        conn.close()


# ---------------------------------------------------------------- paths


class Env:
    """Paths of one env under the base directory."""

    def __init__(self, base: str, name: str):
        if not ENV_NAME.fullmatch(name or ""):
            raise Fail("bad_env", "env name %r is not allowed: use a-z, 0-9, - and _" % name)
        self.base = os.path.abspath(os.path.expanduser(base))
        self.name = name
        self.dir = os.path.join(self.base, "envs", name)

    def path(self, *parts) -> str:
        return os.path.join(self.dir, *parts)

    @property
    def builds(self) -> str:
        return os.path.join(self.base, "builds")

    def release_dir(self, release: str) -> str:
        return self.path("releases", release)

    def current(self) -> "str | None":
        """The current release id, from the ``current`` symlink. A deleted link
        is put back from the release the supervisor last recorded as live."""
        try:
            return os.path.basename(os.readlink(self.path("current")))
        except FileNotFoundError:
            pass
        except OSError:
            return None
        release = self.state().get("release")
        if not (release and RELEASE_ID.fullmatch(release) and os.path.isdir(self.release_dir(release))):
            return None
        try:
            link_current(self, release)
        except OSError:
            pass  # a full disk: still the release, and put back once there is room
        return release

    def releases(self) -> list:
        try:
            names = os.listdir(self.path("releases"))
        except OSError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def release_info(self, release: str, strict: bool = False) -> dict:
        return read_record(os.path.join(self.release_dir(release), RELEASE_FILE), strict)

    def settings(self, strict: bool = True) -> dict:
        """env.json: the env's port, whether it was stopped on purpose, its timings."""
        return read_record(self.path("env.json"), strict)

    def state(self) -> dict:
        """state.json, the supervisor's last record (a cache: never trusted with a pid)."""
        return read_record(self.path("state.json"), strict=False)

    def problems(self) -> list:
        """What is damaged among the env's files, each naming the file and what to do."""
        current = self.current()
        paths = [self.path("env.json"), self.path("state.json")]
        if current:
            paths.append(os.path.join(self.release_dir(current), RELEASE_FILE))
        found = []
        for path in paths:
            try:
                read_record(path)
            except Fail as e:
                found.append(e.message)
        return found

    def ensure(self) -> None:
        for sub in ("releases", "venvs", "data", "logs"):
            makedirs(self.path(sub))
        makedirs(self.builds)
        os.chmod(self.base, 0o700)


def all_envs(base: str) -> list:
    try:
        names = os.listdir(os.path.join(os.path.expanduser(base), "envs"))
    except OSError:
        return []
    return sorted(n for n in names if ENV_NAME.fullmatch(n))


def existing_env(base: str, name: str) -> Env:
    """An env that must be on this host already; if it is not, say which are."""
    env = Env(base, name)
    if not os.path.isdir(env.dir):
        envs = all_envs(base)
        raise Fail("no_env", "there is no env %s on this host (%s)" % (
            name, "its envs: " + ", ".join(envs) if envs else "nothing is deployed there yet"))
    return env


# ---------------------------------------------------------------- commands


def cmd_hello(req, io) -> dict:
    """Facts about the host, for ``qabox hosts check``."""
    import importlib.util

    base = os.path.abspath(os.path.expanduser(req["base"]))
    existing = base
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    ports = {}
    for name in all_envs(base):
        env = Env(base, name)
        port = env.settings(strict=False).get("port")
        if port:
            ports[name] = {"port": port, "ours": supervisor_ping(env) is not None,
                           "free": port_is_free(port)}
    wanted = req.get("port")
    return {
        "protocol": PROTOCOL,
        "agent": os.path.basename(__file__),
        "python": sys.version.split()[0],
        "venv": importlib.util.find_spec("venv") is not None and importlib.util.find_spec("ensurepip") is not None,
        "user": os.environ.get("USER") or str(os.getuid()),
        "time": now(),
        "free_bytes": shutil.disk_usage(existing).free,
        "base": base,
        "envs": ports,
        "port_free": port_is_free(wanted) if wanted else None,
    }


def port_is_free(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", int(port)))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def cmd_session(req, io) -> None:
    """Hold an env's deploy lock and run the deploy's requests under it.

    The lock is an flock owned by this process, which lives exactly as long
    as qabox's channel: when qabox exits, dies or goes silent (no heartbeat
    for SESSION_IDLE seconds), the running step is cancelled and cleaned up,
    this process exits, and the lock is free. It can never be left stale.
    """
    env = Env(req["base"], req["env"]) if req.get("create") else existing_env(req["base"], req["env"])
    makedirs(env.dir)
    path = env.path("deploy.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + float(req.get("timeout", 60))
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            holder = read_json(path, {}) or {}
            raise Fail(
                "lock_held",
                "another deploy to env %s holds the lock: %s since %s; wait for it, or try "
                "again with a longer --lock-timeout" % (env.name, holder.get("by", "unknown"),
                                                         holder.get("since", "?")),
                holder=holder,
            )
        if io.gone.wait(0.2):
            return None
    os.ftruncate(fd, 0)
    holder = {"by": req.get("by"), "since": iso(now()), "pid": os.getpid()}
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    io.emit({"ok": True, "changed": False, "data": {"locked": True}})
    io.locked_env = env.name
    while True:
        line = io.next_request()
        if line is None:
            return None
        handle(line, io, in_session=True)


def cmd_upload_state(req, io) -> dict:
    """What the host has of a build: all of it, part of it (resume), or none."""
    sha = req["sha256"]
    if not SHA256.fullmatch(sha):
        raise Fail("bad_request", "not a sha256: %r" % sha)
    builds = makedirs(os.path.join(os.path.abspath(os.path.expanduser(req["base"])), "builds"))
    if os.path.islink(builds):
        raise Fail("unsafe", "%s is a symlink: qabox does not write through it; remove it" % builds)
    final = os.path.join(builds, sha)
    part = final + ".part"
    for path in (final, part):
        if os.path.islink(path):  # planted: the upload must never write through it
            os.unlink(path)
    if req.get("discard"):  # the client gave up on a partial upload (disk full)
        if os.path.isfile(part):
            os.unlink(part)
        return {"discarded": True, "free_bytes": shutil.disk_usage(builds).free}
    env = Env(req["base"], req["env"])
    current = env.current()
    info = env.release_info(current) if current else {}
    return {
        "have": os.path.isfile(final),
        "part": os.path.getsize(part) if os.path.isfile(part) else 0,
        "part_path": part,
        "current": current,
        "current_sha256": info.get("sha256"),
        "free_bytes": shutil.disk_usage(builds).free,
    }


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def take_build(builds: str, sha: str) -> str:
    """The verified build file: a finished upload is checked before first use."""
    final = os.path.join(builds, sha)
    if os.path.isfile(final) and not os.path.islink(final):
        return final
    part = final + ".part"
    if not os.path.isfile(part):
        raise Fail("no_build", "the build was not uploaded: deploy again")
    if file_sha256(part) != sha:
        os.unlink(part)
        raise Fail("checksum", "the uploaded build does not match its sha256: deploy again")
    os.replace(part, final)
    return final


def remove(path: str) -> None:
    """Delete a file, a symlink (not what it points to) or a tree."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def new_release_id(env: Env) -> str:
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rid, n = base, 1
    while os.path.lexists(env.release_dir(rid)):
        n += 1
        rid = "%s-%d" % (base, n)
    return rid


OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: int, parts: list) -> int:
    """A descriptor of directory ``root/parts``, made one level at a time if
    missing, never through a link (``O_NOFOLLOW`` at every level)."""
    fd = os.dup(root)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int) -> None:
    """Write one member under the directory ``root``, following no link.

    Safe even for a member check_members would refuse: it fails instead of
    writing outside. Modes are the deploy account's only: directories 0700,
    files 0600, or 0700 when the build has them executable.
    """
    parts = name_parts(member.name)
    if ".." in parts:
        raise OSError(errno.EINVAL, "'..' in its path")
    if not parts:
        return  # the build's root: the release directory itself
    parent = open_dir(root, parts[:-1])
    name = parts[-1]
    try:
        if member.isdir():
            os.close(open_dir(parent, [name]))
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            source = name_parts(member.linkname)
            if not source or ".." in source:
                raise OSError(errno.EINVAL, "a hardlink to '..' or to no name")
            where = open_dir(root, source[:-1])
            try:
                if not stat.S_ISREG(os.stat(source[-1], dir_fd=where, follow_symlinks=False).st_mode):
                    raise OSError(errno.EINVAL, "a hardlink to something that is not a file")
                os.link(source[-1], name, src_dir_fd=where, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(where)
        elif member.isfile():
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(name, flags, 0o600, dir_fd=parent), "wb") as out:
                shutil.copyfileobj(tar.extractfile(member), out, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), member.mode & 0o700 | 0o600)
                try:  # the build's mtimes, as tar keeps them: static files' Last-Modified survives a deploy
                    os.utime(out.fileno(), (member.mtime, member.mtime))
                except (OSError, OverflowError, ValueError):
                    pass
        else:
            raise OSError(errno.EINVAL, "not a file, directory or link")
    finally:
        os.close(parent)


def extract(build: str, dest: str, max_bytes: int, max_members: int = DEFAULT_MAX_MEMBERS) -> None:
    """Extract a checked build into a new directory, never outside it.

    Not tarfile.extractall: pythons before 3.11.4 (Debian 12 has 3.11.2) have
    no extraction filter, and extractall writes through links a build made.
    """
    try:
        tar = tarfile.open(build)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise Fail("bad_build", "the build is not a readable tar file: %s" % e)
    with tar:
        try:
            members = read_members(tar, max_members)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise Fail("bad_build", "the build is truncated or corrupt: %s" % e)
        problems = check_members(members, max_bytes, max_members)
        if problems:
            more = "; and %d more" % (len(problems) - 10) if len(problems) > 10 else ""
            raise Fail("bad_build", "the build has unsafe members: %s%s: rebuild it without them"
                       % ("; ".join(problems[:10]), more))
        os.mkdir(dest, 0o700)
        root = os.open(dest, OPEN_DIR)
        try:
            for member in members:
                try:
                    extract_member(tar, member, root)
                except (tarfile.TarError, EOFError) as e:
                    raise Fail("bad_build", "the build is truncated or corrupt at %s (%s): make it again"
                               % (shown(member.name), e))
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise Fail("bad_build", "%s could not be extracted: %s: change or remove it in the"
                               " build and deploy again" % (shown(member.name), e.strerror or e))
        finally:
            os.close(root)


def venv_key(release_dir: str, python: str) -> str:
    """Releases whose requirements and wheels are equal share one virtualenv."""
    h = hashlib.sha256(python.encode())
    req = os.path.join(release_dir, "requirements.txt")
    if os.path.isfile(req):
        with open(req, "rb") as f:
            h.update(f.read())
    wheels = os.path.join(release_dir, "wheels")
    if os.path.isdir(wheels):
        for name in sorted(os.listdir(wheels)):
            h.update(("%s:%d\n" % (name, os.path.getsize(os.path.join(wheels, name)))).encode())
    return h.hexdigest()[:16]


def prepare_venv(env: Env, release_dir: str, io) -> tuple:
    """Create (or reuse) the release's virtualenv; installs offline from wheels/."""
    key = venv_key(release_dir, sys.executable)
    venv = env.path("venvs", key)
    python = os.path.join(venv, "bin", "python")
    if os.path.isfile(os.path.join(venv, ".complete")):
        return key, python, False
    req = os.path.join(release_dir, "requirements.txt")
    problems = requirements_problems(lambda name: read_text_in(release_dir, name))
    if problems:
        raise Fail("bad_build", "the build's requirements are refused: %s" % "; ".join(problems[:5]))
    shutil.rmtree(venv, ignore_errors=True)
    wheels = os.path.join(release_dir, "wheels")
    io.emit({"progress": "creating virtualenv"})
    pip_wheel = bundled_pip() if os.path.isfile(req) else None
    cmd = [sys.executable, "-m", "venv", venv]
    if not os.path.isfile(req):
        cmd.insert(3, "--system-site-packages")
    elif pip_wheel:
        cmd.insert(3, "--without-pip")  # installing pip into the venv is most of venv's time
    run_step(cmd, "could not create a virtualenv on the host (is python3-venv installed?)")
    if os.path.isfile(req):
        io.emit({"progress": "installing requirements"})
        pip = [python] + ([os.path.join(pip_wheel, "pip")] if pip_wheel else ["-m", "pip"])
        pip += ["install", "--disable-pip-version-check", "--no-input", "-q", "--only-binary=:all:",
                "-r", req]
        if os.path.isdir(wheels):
            pip[-3:-3] = ["--no-index", "--find-links", wheels]
        run_step(pip, "could not install the build's requirements.txt on the host"
                 " (ship every wheel in the build's wheels/ directory)")
    with open(os.path.join(venv, ".complete"), "w"):
        pass
    return key, python, True


def read_text_in(root: str, name: str):
    """A file's text inside ``root`` (None if there is none), never through a
    link that leads outside it."""
    path = os.path.realpath(os.path.join(root, name))
    if not path.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def bundled_pip():
    """The pip wheel that venv itself would install, to run pip straight from it."""
    import ensurepip

    places = [os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"), "/usr/share/python-wheels"]
    for place in places:
        found = sorted(glob.glob(os.path.join(place, "pip-*.whl")))
        if found:
            return found[-1]
    return None


def run_step(cmd: list, what: str) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode:
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        if any("No space left" in line for line in lines):
            raise Fail("disk_full", "the host's disk is full: free some space and deploy again")
        raise Fail("step_failed", what, log=lines[-LOG_TAIL:])


def locked(req, io) -> Env:
    """The env of a command that changes it: only under that env's deploy lock."""
    env = Env(req["base"], req["env"])
    if io.locked_env != env.name:
        raise Fail("bad_request", "%s runs only in a session holding env %s's lock"
                   % (req.get("cmd", "this command"), env.name))
    return env


def cmd_deploy(req, io) -> dict:
    """Extract an uploaded build as a new release and switch the env to it.

    The current release keeps serving until the new one passes its health
    check; on any failure the new release is removed and nothing else changes.
    """
    env = locked(req, io)
    env.ensure()
    sha = req["sha256"]
    if not SHA256.fullmatch(sha):
        raise Fail("bad_request", "not a sha256: %r" % sha)
    started = time.monotonic()
    current = env.current()
    settings = env_settings(env, req)
    give_testers_ports(env.base)
    health = req.get("health") or "/"
    if not HEALTH_PATH.fullmatch(health):
        raise Fail("bad_build", "the health path %r is not a URL path: use one like \"/health\" "
                   "(printable characters, no spaces) in the build's qabox.toml" % health)
    if current and env.release_info(current).get("sha256") == sha:
        pong = supervisor_ping(env)
        if pong and pong.get("state") == "running" and pong.get("port") == settings["port"]:
            return {"release": current, "previous": current, "port": settings["port"],
                    "testers": connected_testers(env), "changed": False}
    build = take_build(env.builds, sha)
    release = new_release_id(env)
    rdir = env.release_dir(release)
    tmp = env.path("releases", "." + release + ".tmp")
    try:
        io.emit({"progress": "extracting"})
        remove(tmp)
        extract(build, tmp, int(req.get("max_bytes") or DEFAULT_MAX_BYTES),
                int(req.get("max_members") or DEFAULT_MAX_MEMBERS))
        io.check()
        key, python, created = prepare_venv(env, tmp, io)
        io.check()
        info = {
            "release": release,
            "sha256": sha,
            "file": req.get("file"),
            "entry": req["entry"],
            "health": health,
            "venv": key,
            "deployed_at": iso(now()),
            "deployed_by": req.get("by"),
        }
        write_json(os.path.join(tmp, RELEASE_FILE), info)
        os.rename(tmp, rdir)
        io.check()
        io.emit({"progress": "starting"})
        switch_to(env, release, settings)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if env.current() == release:
            pass  # it failed after the switch: the release is live, and it stays
        else:
            shutil.rmtree(rdir, ignore_errors=True)
            full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            if full or getattr(e, "code", None) == "disk_full":
                drop_build(env.base, sha)  # it cannot be extracted here anyway: give its space back
            if full:
                raise disk_full(env.base)
            raise
    pruned = prune(env, int(req.get("keep") or 5))
    return {
        "release": release,
        "previous": current,
        "port": settings["port"],
        "venv_created": created,
        "pruned": pruned,
        "testers": connected_testers(env),
        "seconds": round(time.monotonic() - started, 2),
        "changed": True,
    }


def env_settings(env: Env, req: dict) -> dict:
    """The env's recorded settings, updated with what this request asks.

    The port is as asked, else as recorded (or served), else the first free
    one from 8080 that no other env on the host has taken. A new port is
    recorded only once it is bound (see switch_to): a refused one changes
    nothing, and it is refused here already, before any work is done.
    """
    settings = env.settings()
    others = {name: Env(env.base, name).settings(strict=False).get("port")
              for name in all_envs(env.base) if name != env.name}
    pong = supervisor_ping(env)
    serving = pong.get("port") if pong else None
    port = req.get("port")
    if port:
        if not is_port(port):
            raise Fail("bad_request", "port %r is not a port from 1 to 65535" % (port,))
        taken = [name for name, p in others.items() if p == port]
        if taken:
            raise Fail("port_in_use", "port %d is already the port of env %s on this host: "
                       "pick another with --port" % (port, taken[0]))
        if port not in (serving, settings.get("port")):
            bind_listener(port).close()
    update_settings(env, **{key: req[key] for key in ("health_interval", "log_max_bytes", "start_timeout")
                            if req.get(key)})
    settings = env.settings()
    settings["port"] = port or settings.get("port") or serving or free_port(8080, set(others.values()))
    return settings


def update_settings(env: Env, **changes) -> None:
    """Record settings in env.json (written only when something changed)."""
    settings = env.settings()
    if any(settings.get(key) != value for key, value in changes.items()):
        settings.update(changes)
        makedirs(env.dir)
        write_json(env.path("env.json"), settings)


def free_port(start: int, taken: set) -> int:
    for port in range(start, start + 1000):
        if port not in taken and port_is_free(port):
            return port
    raise Fail("port_in_use", "no free port from %d to %d on the host" % (start, start + 999))


def switch_to(env: Env, release: str, settings: dict) -> dict:
    """Have the env's supervisor serve ``release`` on the settings' port, live
    only once it is healthy; the port is recorded once the switch is done.

    A supervisor that dies during the switch is revived (it adopts what
    serves and ends the rest), and the answer is whatever is live then.
    """
    held = foreign_listeners(env, settings["port"])
    if held:
        raise Fail("port_taken", held[0] + ": stop that process (or remove the tester "
                   "whose key made it), then try again; nothing was changed")
    update_settings(env, stopped=False)
    port = settings["port"]
    ensure_supervisor(env, port)
    timeout = float(settings.get("start_timeout") or START_TIMEOUT)
    request = {"cmd": "switch", "release": release, "timeout": timeout, "port": port}
    try:
        result = supervisor_call(env, request, timeout=timeout + STOP_TIMEOUT + 10)
    except (Fail, OSError) as e:  # no answer: it died (a Fail: it closed the socket) or hangs
        revive(env)
        live = env.current()
        if live != release:
            raise Fail("supervisor", "the supervisor of env %s %s while switching to release %s, and was "
                       "restarted: %s; deploy again" % (
                           env.name, "died" if isinstance(e, Fail) else "failed (%s)" % (e.strerror or e),
                           release, "release %s keeps serving" % live if live else "nothing was deployed"))
        pong = supervisor_ping(env) or {}
        result = {"ok": True, "pid": (pong.get("record") or {}).get("pid")}
    if not result.get("ok"):
        err = result.get("error", {})
        raise Fail(err.get("code", "start_failed"), err.get("message", "the app did not start"),
                   log=err.get("log", []))
    update_settings(env, port=port)
    return result


def prune(env: Env, keep: int) -> list:
    """Delete releases beyond the newest ``keep``, never the current one,
    then the virtualenvs and builds no kept release uses.

    Pruning runs under the env's deploy lock, as do rollbacks, so it never
    races a rollback to the release it would delete."""
    current = env.current()
    releases = env.releases()
    old = [r for r in releases[: max(0, len(releases) - keep)] if r != current]
    for release in old:
        shutil.rmtree(env.release_dir(release), ignore_errors=True)
        for log in glob.glob(env.path("logs", release + ".log*")):
            os.unlink(log)
    kept = [env.release_info(r) for r in env.releases()]
    venvs = {i.get("venv") for i in kept}
    for key in os.listdir(env.path("venvs")):
        if key not in venvs:
            shutil.rmtree(env.path("venvs", key), ignore_errors=True)
    for name in os.listdir(env.builds):
        path = os.path.join(env.builds, name)
        # an hour's grace: a build just uploaded for another env's deploy is not garbage yet
        if not name.endswith(".part") and now() - os.path.getmtime(path) > 3600:
            drop_build(env.base, name)
    return old


def drop_build(base: str, sha: str) -> None:
    """Delete an uploaded build that no kept release of any env uses."""
    for name in all_envs(base):
        other = Env(base, name)
        if any(other.release_info(r).get("sha256") == sha for r in other.releases()):
            return
    path = os.path.join(os.path.abspath(os.path.expanduser(base)), "builds", sha)
    if os.path.isfile(path):
        os.unlink(path)


def cmd_rollback(req, io) -> dict:
    """Switch back to the previous (or the named) kept release, zero-downtime."""
    env = locked(req, io)
    current = env.current()
    releases = env.releases()
    target = req.get("to")
    if target:
        if target not in releases:
            raise Fail("no_release", "release %r is not kept on this host; kept: %s"
                       % (target, ", ".join(releases) or "none"))
    else:
        older = [r for r in releases if current is None or r < current]
        if not older:
            raise Fail("no_release", "there is no release before %s to roll back to" % current)
        target = older[-1]
    if target == current and supervisor_state(env) == "running":
        return {"release": current, "previous": current, "changed": False}
    switch_to(env, target, env_settings(env, {}))
    return {"release": target, "previous": current, "changed": True}


def cmd_start(req, io) -> dict:
    """Start the env's current release if it is not running (clears ``crashed``)."""
    env = locked(req, io)
    current = env.current()
    if current is None:
        raise Fail("no_release", "nothing is deployed to env %s: deploy a build first" % env.name)
    if supervisor_state(env) == "running":
        return {"release": current, "changed": False}
    switch_to(env, current, env_settings(env, {}))
    return {"release": current, "changed": True}


def cmd_restart(req, io) -> dict:
    """Start a fresh process of the current release, then retire the old one."""
    env = locked(req, io)
    current = env.current()
    if current is None:
        raise Fail("no_release", "nothing is deployed to env %s: deploy a build first" % env.name)
    result = switch_to(env, current, env_settings(env, {}))
    return {"release": current, "pid": result.get("pid"), "changed": True}


def cmd_stop(req, io) -> dict:
    """Stop the env's app gracefully and its supervisor; nothing revives it."""
    env = locked(req, io)
    update_settings(env, stopped=True)
    if supervisor_ping(env) is None:  # whatever apps of the env run, no supervisor runs them
        apps = env_apps(env)
        if not apps:
            return {"changed": False}
        for app in apps:
            stop_group(app["pid"], STOP_TIMEOUT)
    else:
        supervisor_call(env, {"cmd": "stop"}, timeout=STOP_TIMEOUT + 10)
    return {"changed": True}


def stop_group(pid: int, timeout: float) -> None:
    """SIGTERM a process group, wait for it, then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    wait_for(lambda: not pid_alive(pid), timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cmd_on_boot(req, io) -> dict:
    """Have cron bring this host's envs back after a reboot (no root needed)."""
    base = os.path.abspath(os.path.expanduser(req["base"]))
    if re.search(r"[\x00-\x1f\x7f%]", base):  # cron reads a new line, or a %, as a line's end
        raise Fail("bad_request", "the deploy directory %r has control characters or a %%: name a plain "
                   "one" % base)
    tag = "# qabox %s" % base
    # cron runs the line with sh: quoted, whatever the hosts file's dir (checked there too)
    line = "@reboot %s %s" % (" ".join(shlex.quote(a) for a in (sys.executable, os.path.abspath(__file__),
                                                                 "boot", base)), tag)
    if shutil.which("crontab") is None:
        raise Fail("no_cron", "crontab is not available on the host: install cron there, or "
                   "deploy without --on-boot")
    listing = subprocess.run(["crontab", "-l"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = listing.stdout.decode().splitlines() if listing.returncode == 0 else []
    if line in lines:
        return {"changed": False}
    lines = [x for x in lines if not x.endswith(tag)] + [line]
    done = subprocess.run(["crontab", "-"], input=("\n".join(lines) + "\n").encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode:
        raise Fail("no_cron", "crontab refused the @reboot entry: %s"
                   % done.stdout.decode("utf-8", "replace").strip())
    return {"changed": True}


def boot(base: str) -> None:
    """At reboot (from cron): give every env that should be up its supervisor."""
    for name in all_envs(base):
        revive(Env(base, name))


def cmd_releases(req, io) -> dict:
    env = existing_env(req["base"], req["env"])
    current = env.current()
    return {"current": current,
            "releases": [dict(env.release_info(r), release=r, current=r == current) for r in env.releases()]}


def cmd_logs(req, io) -> None:
    """The current release's log: the last lines, then (follow) new ones as written."""
    env = existing_env(req["base"], req["env"])
    release = env.current()
    if release is None:
        raise Fail("no_release", "nothing is deployed to env %s" % env.name)
    path = env.path("logs", release + ".log")
    for line in tail(path, int(req.get("lines", 50))):
        io.emit({"line": line})
    if not req.get("follow"):
        io.emit({"ok": True, "changed": False, "data": {"release": release}})
        return None
    position = os.path.getsize(path) if os.path.exists(path) else 0
    heartbeat = time.monotonic()
    while not io.gone.wait(0.2):
        if time.monotonic() - heartbeat > 5:  # lets qabox tell a quiet log from a dead link
            heartbeat = time.monotonic()
            io.emit({"hb": 1})
        if env.current() != release:  # a deploy or rollback switched: follow the new log
            release = env.current()
            io.emit({"line": "--- now release %s ---" % release})
            path, position = env.path("logs", release + ".log"), 0
        try:
            size = os.path.getsize(path)
        except OSError:
            continue
        if size < position:  # rotated
            position = 0
        if size > position:
            with open(path, "rb") as f:
                f.seek(position)
                data = f.read(size - position)
            complete = data.rfind(b"\n") + 1
            position += complete
            for line in data[:complete].decode("utf-8", "replace").splitlines():
                io.emit({"line": line})
    return None


# ---------------------------------------------------------------- testers
# A tester's public key goes into the deploy account's authorized_keys with
# OpenSSH's restrictions: no shell, no command but the agent's tester-session,
# and port forwarding only to the tester's own ports, one per env. The app's
# supervisor listens on those ports too, so the access log can name the tester.

TESTER_MARK = " qabox-tester:"
PUBKEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com|"
                    r"sk-ecdsa-sha2-nistp256@openssh\.com) ([A-Za-z0-9+/]+={0,3})(?: [^\r\n]*)?")
FIRST_TESTER_PORT = 18080
MAX_SESSIONS = 8  # open tunnels per tester: a few machines each, not a flood
MAX_CONNECTIONS_PER_PORT = 64  # a browser opens about 6 at once per site
MAX_CONNECTIONS = 256  # app threads, all ports together
IDLE_TIMEOUT = 30.0  # seconds a connection may send nothing


def testers_file(base: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "testers.json")


def read_testers(base: str) -> dict:
    """The tester store: ``{"testers": {name: tester}, "retired_ports": [...]}``,
    kept in testers.json and retired-ports.json (older agents read the first).

    A store that exists but cannot be read is an error, never "no testers":
    rewriting authorized_keys from it would drop every tester's key.
    """
    path = testers_file(base)
    testers = read_json(path) if os.path.lexists(path) else {}
    retired = read_json(path.replace("testers.json", "retired-ports.json"), [])
    if not (isinstance(testers, dict) and isinstance(retired, list)
            and all(isinstance(t, dict) and isinstance(t.get("key"), str) for t in testers.values())):
        raise Fail("bad_state", "%s is not a readable tester list: restore it from a backup, or "
                   "move it away and add the testers again (their keys stay in authorized_keys "
                   "until then)" % path)
    return {"testers": testers, "retired_ports": retired}


def load_testers(base: str) -> dict:
    return read_testers(base)["testers"]


def tester_ports(env: Env) -> dict:
    """Each tester's own port for this env."""
    return {name: t["ports"][env.name] for name, t in load_testers(env.base).items()
            if env.name in t.get("ports", {})}


class TestersLock:
    """Serialises edits of testers.json and authorized_keys on this host."""

    def __init__(self, base: str):
        makedirs(os.path.abspath(os.path.expanduser(base)))
        self.fd = os.open(testers_file(base) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def ssh_connections() -> list:
    """``[pid, start time]`` of this account's sshd processes: its SSH
    connections open now, any of which may hold a forward to a tester's port."""
    found = []
    for pid in own_pids():
        stat = proc_stat(pid)
        if stat and stat[0].startswith("sshd"):
            found.append([pid, int(stat[1][19])])
    return found


def retire(ports) -> list:
    """Retired ports, each with the SSH connections open when it was retired:
    it is not given to anyone again while one of them lasts (a removed tester's
    ``ssh -N`` keeps its forward to it, and sshd cannot tell us whose it is)."""
    now_open = ssh_connections()
    return [{"port": port, "sshd": now_open} for port in sorted(ports)]


def allocate_tester_ports(base: str, store: dict) -> bool:
    """Give every tester a port of their own in every env. True if any was added.

    A retired port is given again only once every SSH connection that was open
    when it was retired has ended (see ``retire``).
    """
    base = os.path.abspath(os.path.expanduser(base))
    testers = store["testers"]
    alive = {tuple(c) for c in ssh_connections()}
    store["retired_ports"] = [r for r in store["retired_ports"] if isinstance(r, dict)
                              and isinstance(r.get("port"), int)
                              and alive & {tuple(c) for c in r.get("sshd") or []}]
    taken = {Env(base, e).settings(strict=False).get("port") for e in all_envs(base)}
    taken.update(r["port"] for r in store["retired_ports"])
    for t in testers.values():
        taken.update(t.get("ports", {}).values())
    changed = False
    envs = set(all_envs(base))
    for name in sorted(testers):
        ports = testers[name].setdefault("ports", {})
        gone = [env for env in ports if env not in envs]  # envs deleted since
        if gone:
            store["retired_ports"] += retire(ports.pop(env) for env in gone)
            changed = True
        for env in sorted(envs):
            if env not in ports:
                ports[env] = free_port(FIRST_TESTER_PORT, taken)
                taken.add(ports[env])
                changed = True
    return changed


def give_testers_ports(base: str) -> None:
    """Ports for every tester in a new env (a deploy calls this)."""
    with TestersLock(base):
        store = read_testers(base)
        if allocate_tester_ports(base, store):
            store_testers(base, store)  # the new env's supervisor binds them as it starts


SAFE_PATH = re.compile(r"[A-Za-z0-9._/+-]+")
LINE_BASE = re.compile(r'tester-session (\S+) [^ "]+"')


def authorized_line(base: str, name: str, tester: dict) -> str:
    """The tester's key line: a tunnel to their own ports and nothing else.

    ``restrict`` takes everything away; ``port-forwarding`` gives back local
    *and* remote forwarding, so ``permitlisten`` names a port the account can
    never bind, and ``permitopen`` the tester's own ports. (Unix-socket
    forwards cannot be refused per key: see ``peer_pid`` for why that is safe.)
    """
    options = ["restrict"]
    ports = sorted(tester.get("ports", {}).values())
    if ports:
        options += ["port-forwarding", 'permitlisten="127.0.0.1:1"']
        options += ['permitopen="127.0.0.1:%d"' % port for port in ports]
    words = [sys.executable, os.path.abspath(__file__), os.path.abspath(os.path.expanduser(base))]
    for word in words:
        if not SAFE_PATH.fullmatch(word):
            raise Fail("bad_path", "%r cannot go into a forced command: use a directory and a "
                       "python whose paths have only letters, digits and . _ / + -" % word)
    options.append('command="%s %s tester-session %s %s"' % (words[0], words[1], words[2], name))
    return "%s %s%s%s" % (",".join(options), tester["key"], TESTER_MARK, name)


def write_authorized_keys(base: str, testers: dict) -> None:
    """Rewrite this base's tester lines atomically, leaving every other line
    (the deploy account's own keys, testers of another base) as it was."""
    ssh_dir = makedirs(os.path.expanduser("~/.ssh"))
    path = os.path.join(ssh_dir, "authorized_keys")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    here = os.path.abspath(os.path.expanduser(base))

    def ours(line: str) -> bool:
        found = LINE_BASE.search(line) if TESTER_MARK in line else None
        return bool(found) and found.group(1) == here

    kept = [line for line in lines if not ours(line)]
    mine = [authorized_line(base, name, testers[name]) for name in sorted(testers)]
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(kept + mine) + "\n")
    os.replace(tmp, path)


def store_testers(base: str, store: dict) -> None:
    write_json(testers_file(base).replace("testers.json", "retired-ports.json"), store["retired_ports"])
    write_json(testers_file(base), store["testers"])
    write_authorized_keys(base, store["testers"])


def save_testers(base: str, store: dict) -> None:
    """Store the testers and have every running app serve their ports."""
    store_testers(base, store)
    for env in all_envs(base):  # hand the new ports to running apps
        env = Env(base, env)
        try:
            if supervisor_ping(env):
                ensure_supervisor(env)  # one of an older agent would not know the command
                supervisor_call(env, {"cmd": "testers"}, timeout=START_TIMEOUT + STOP_TIMEOUT + 10)
        except (Fail, OSError):
            pass  # that env's app gets the ports at its next start; the key is in place


def key_fingerprint(key: str) -> str:
    import base64

    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_sshd(banner: str) -> None:
    """Refuse tester keys on an sshd that would let them listen on the host.

    ``permitlisten`` came in OpenSSH 7.8, and an sshd that does not know a key
    option rejects the whole line: below 7.8 no safe tester line exists.
    """
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", banner or "")
    if not found:
        raise Fail("sshd_unsupported", "the host's SSH server (%s) is not OpenSSH: tester keys need "
                   "OpenSSH 7.8 or newer there" % (banner or "unknown"))
    if (int(found.group(1)), int(found.group(2))) < (7, 8):
        raise Fail("sshd_too_old", "the host runs OpenSSH %s.%s, which cannot stop a key from opening "
                   "listeners on the host (permitlisten came in 7.8), so a tester could take over "
                   "other testers' ports: no tester key was added; have the host's admin upgrade "
                   "openssh-server to 7.8 or newer" % found.groups())


def cmd_tester_add(req, io) -> dict:
    name, key = req["name"], " ".join(req["key"].split()[:2])
    if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
        raise Fail("bad_name", "tester name %r is not allowed: use a-z, 0-9, - and _" % name)
    if not PUBKEY.fullmatch(req["key"].strip()):
        raise Fail("bad_key", "that is not an OpenSSH public key line (type, base64 key, comment)")
    check_sshd(req.get("sshd"))
    with TestersLock(req["base"]):
        try:
            with open(os.path.expanduser("~/.ssh/authorized_keys")) as f:
                unrestricted = [line for line in f if key.split()[1] in line and TESTER_MARK not in line]
        except FileNotFoundError:
            unrestricted = []
        if unrestricted:
            raise Fail("key_in_use", "this key already logs in to the deploy account without "
                       "restrictions: give the tester a key of their own")
        store = read_testers(req["base"])
        testers = store["testers"]
        for other, t in testers.items():
            if t["key"] == key and other != name:
                raise Fail("key_in_use", "this key is tester %s's already" % other)
        old = testers.get(name, {})
        if old.get("key") == key:
            save_testers(req["base"], store)  # unchanged, but make sure every app listens
            return {"name": name, "fingerprint": old["fingerprint"], "ports": old["ports"], "changed": False}
        testers[name] = {"key": key, "fingerprint": key_fingerprint(key), "added_at": iso(now()),
                         "added_by": req.get("by"), "ports": old.get("ports", {})}
        allocate_tester_ports(req["base"], store)
        save_testers(req["base"], store)
    return {"name": name, "fingerprint": testers[name]["fingerprint"], "ports": testers[name]["ports"],
            "changed": True}


def cmd_tester_remove(req, io) -> dict:
    """Take a tester's key out, close their ports (never given again) and end
    their open sessions: an open SSH connection outlives its key."""
    with TestersLock(req["base"]):
        store = read_testers(req["base"])
        gone = store["testers"].pop(req["name"], None)
        if gone is None:
            raise Fail("no_tester", "there is no tester %r on this host" % req["name"])
        store["retired_ports"] += retire(gone.get("ports", {}).values())
        save_testers(req["base"], store)
    ended = 0
    for record in connected(req["base"]):
        if record["name"] == req["name"]:
            ended += end_connection(record["pid"])
    return {"changed": True, "disconnected": ended}


def cmd_tester_list(req, io) -> dict:
    base = req["base"]
    online = connected(base)
    return {"testers": [
        {"name": name, "fingerprint": t["fingerprint"], "ports": t.get("ports", {}),
         "added_at": t.get("added_at"), "added_by": t.get("added_by"),
         "connected": [c for c in online if c["name"] == name]}
        for name, t in sorted(load_testers(base).items())]}


def tcp_sockets() -> list:
    """(local port, state, inode) of every TCP socket in this network namespace,
    whoever owns it (/proc/net/tcp{,6}); state "0A" is listening, "01" open."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            found.append((int(fields[1].rsplit(":", 1)[1], 16), fields[3], int(fields[9])))
    return found


def socket_inodes(pid) -> set:
    """The inodes of the sockets a process of ours holds open."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    except (OSError, TypeError):
        pass
    return inodes


def holder(inode: int) -> str:
    """Which process holds a socket, as far as this account can see."""
    for pid in own_pids():
        if inode in socket_inodes(pid):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                command = "?"
            return "pid %s (%s)" % (pid, command[:80])
    return "a process qabox cannot inspect (an SSH session's forward?)"


def foreign_listeners(env: Env, port: int) -> list:
    """Listeners on the env's ports (``port``, its testers') that are not its
    supervisor's or app's: another program, or a tester's ``ssh -R``. Such a
    port would serve someone else's page to whoever connects."""
    pong = supervisor_ping(env) or {}
    record = pong.get("record") or env.state()  # its own word beats state.json, which may be damaged
    ports = {port: "the env's port"}
    try:
        ports.update({p: "tester %s's port" % name for name, p in tester_ports(env).items()})
    except Fail:
        pass  # a broken tester list is reported where testers are read
    ours = set()
    for pid, role in ((pong.get("pid") or record.get("supervisor_pid"), ["supervise", env.base, env.name]),
                      (record.get("pid"), ["serve"])):
        if isinstance(pid, int) and (agent_args(pid) or [None])[:len(role)] == role:
            ours |= socket_inodes(pid)
    return ["%s %d is held by %s" % (ports[port], port, holder(inode))
            for port, kind, inode in tcp_sockets()
            if kind == "0A" and port in ports and inode not in ours]


def connected(base: str) -> list:
    """Testers connected now: those whose tunnel's session is open, and those
    with a connection open to one of their ports (``ssh -N`` opens no session)."""
    folder = os.path.join(os.path.abspath(os.path.expanduser(base)), "connected")
    result = []
    for name in sorted(glob.glob(os.path.join(folder, "*.json"))):
        record = read_json(name)
        if record and pid_alive(record.get("pid")):
            result.append(record)
    in_use = {port for port, kind, _ in tcp_sockets() if kind == "01"}
    seen = {r["name"] for r in result}
    for name, tester in sorted(load_testers(base).items()):
        if name not in seen and in_use & set(tester.get("ports", {}).values()):
            result.append({"name": name, "from": "a forward without a session", "since": None})
    return result


def end_connection(pid: int) -> bool:
    """End the SSH connection a tester's session runs under (its sshd process):
    taking their key out of authorized_keys ends no connection already open."""
    while pid > 1:
        stat = proc_stat(pid)
        if stat is None:
            return False
        name, rest = stat
        if name.startswith("sshd"):
            try:
                os.kill(pid, signal.SIGTERM)
                return True
            except OSError:
                return False
        pid = int(rest[1])  # the parent
    return False


def connected_testers(env: Env) -> list:
    ports = tester_ports(env)
    return [c for c in connected(env.base) if c["name"] in ports]


def tester_requests(env: Env, name: str) -> int:
    """Requests a tester made to the current release, from its access log."""
    release = env.current()
    if not release:
        return 0
    prefix = (name + " - - [").encode()
    count = 0
    for path in glob.glob(env.path("logs", release + ".log*")):
        with open(path, "rb") as f:
            count += sum(1 for line in f if line.startswith(prefix))
    return count


def tester_session(base: str, name: str, io: "Stream") -> int:
    """The forced command of a tester's key: say which ports are theirs, count
    them as connected while the tunnel is open, and pass on deploy notices."""
    testers = load_testers(base)
    if name not in testers:
        io.emit({"ok": False, "error": {"code": "no_tester", "message": "tester %s was removed" % name}})
        return 1
    open_now = [c for c in connected(base) if c["name"] == name]
    if len(open_now) >= MAX_SESSIONS:
        io.emit({"ok": False, "error": {"code": "too_many_sessions", "message":
                 "tester %s has %d tunnels open already: close one first" % (name, len(open_now))}})
        return 1
    folder = makedirs(os.path.join(os.path.abspath(os.path.expanduser(base)), "connected"))
    record_path = os.path.join(folder, "%s-%d.json" % (name, os.getpid()))
    origin = (os.environ.get("SSH_CONNECTION") or "local").split()[0]
    write_json(record_path, {"name": name, "from": origin, "since": iso(now()), "pid": os.getpid()})
    try:
        ports = testers[name].get("ports", {})
        seen = {env: Env(base, env).current() for env in ports}
        io.emit({"ok": True, "changed": False, "data": {"tester": name, "envs": {
            env: {"port": port, "release": seen[env]} for env, port in ports.items()}}})
        while not io.gone.wait(1.0):
            for env in ports:
                release = Env(base, env).current()
                if release != seen[env]:
                    seen[env] = release
                    info = Env(base, env).release_info(release) if release else {}
                    io.emit({"notice": {"env": env, "release": release, "by": info.get("deployed_by")}})
    finally:
        os.unlink(record_path)
    return 0


def cmd_tester_session(req, io) -> None:
    """The same session, asked for with the deploy account's own key."""
    tester_session(req["base"], req["name"], io)
    return None


def cmd_status(req, io) -> dict:
    """Every env on this host (or the one asked): release, state, health.

    An env whose supervisor died is noticed here and given a new one, which
    adopts the app if it still runs.
    """
    base = req["base"]
    names = [existing_env(base, req["env"]).name] if req.get("env") else all_envs(base)
    return {"envs": [env_status_or_problem(Env(base, name)) for name in names]}


def env_status_or_problem(env: Env) -> dict:
    """An env's status; whatever goes wrong in one env is its problem, not the host's."""
    try:
        return env_status(env)
    except (Fail, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        keys = ("release", "sha256", "file", "deployed_at", "deployed_by", "pid", "uptime", "last_exit",
                "last_log", "port", "supervisor_pid", "health")
        return dict({key: None for key in keys}, env=env.name, state="unknown", restarts=0, hangs=0,
                    supervisor_revived=False, testers=[], requests={},
                    problems=["cannot tell the state of env %s: %s" % (env.name, getattr(e, "message", e))])


def supervisor_state(env: Env):
    pong = supervisor_ping(env)
    return pong.get("state") if pong else None


def revive(env: Env) -> bool:
    """Restart a dead supervisor of an env that should be up. True if it did."""
    try:
        if env.settings().get("stopped") or env.current() is None or supervisor_ping(env) is not None:
            return False
        ensure_supervisor(env)
    except (Fail, OSError):
        return False  # a damaged env.json (status names it), or no room to start one
    return True


def env_status(env: Env) -> dict:
    """One env's status. What a running supervisor says beats the files (a full
    disk may keep it from writing them); a damaged file is named in problems."""
    revived = revive(env)
    current = env.current()
    info = env.release_info(current) if current else {}
    pong = supervisor_ping(env)
    state = (pong or {}).get("record") or env.state()
    port = (pong or {}).get("port") or env.settings(strict=False).get("port", 8080)
    status = pong.get("state", "stopped") if pong else ("crashed" if state.get("state") == "crashed" else "stopped")
    problems = env.problems() + foreign_listeners(env, port)
    try:
        testers = [dict(c, requests=tester_requests(env, c["name"])) for c in connected_testers(env)]
        requests = {name: tester_requests(env, name) for name in tester_ports(env)}
    except Fail as e:
        testers, requests = [], {}
        problems.append(e.message)
    started = state.get("started_at")
    return {
        "env": env.name,
        "release": current,
        "sha256": info.get("sha256"),
        "file": info.get("file"),
        "deployed_at": info.get("deployed_at"),
        "deployed_by": info.get("deployed_by"),
        "state": status,
        "pid": state.get("pid") if status in ("running", "starting") else None,
        "uptime": round(now() - started, 1) if started and status == "running" else None,
        "restarts": state.get("restarts") or 0,
        "hangs": state.get("hangs") or 0,
        "last_exit": state.get("last_exit"),
        "last_log": state.get("last_log") if status == "crashed" else None,
        "port": port,
        "supervisor_pid": pong.get("pid") if pong else None,
        "supervisor_revived": revived,
        "testers": testers,
        "requests": requests,
        "problems": problems,  # a port that serves someone else's page is not healthy
        "health": {"error": problems[0]} if problems else
                  http_probe(port, info.get("health", "/")) if current and status != "stopped" else None,
    }


COMMANDS = {
    "hello": cmd_hello,
    "session": cmd_session,
    "upload-state": cmd_upload_state,
    "deploy": cmd_deploy,
    "rollback": cmd_rollback,
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "releases": cmd_releases,
    "on-boot": cmd_on_boot,
    "tester-add": cmd_tester_add,
    "tester-remove": cmd_tester_remove,
    "tester-list": cmd_tester_list,
    "tester-session": cmd_tester_session,
    "logs": cmd_logs,
    "status": cmd_status,
}


# ---------------------------------------------------------------- supervisor


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a unix socket, as the kernel saw it
    (SO_PEERCRED); 0 when it runs as another user.

    Why: a tester's key cannot be kept from ``ssh -R /path/ctl.sock:...``
    (unix-socket forwards can only be switched off in sshd_config), so the
    socket at a path may be sshd's, not ours: each end checks who the other is.
    """
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize("3i")))
    return pid if uid == os.getuid() else 0


def agent_args(pid: int):
    """A process's arguments after the agent file (``["supervise", base, env]``),
    or None when it is not an agent of this host's agent directory."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
        if len(argv) < 2:
            return None
        path = os.path.join(os.readlink("/proc/%d/cwd" % pid), argv[1])  # qabox runs it by a relative path
    except (OSError, ValueError):
        return None
    if os.path.dirname(os.path.normpath(path)) != os.path.dirname(os.path.abspath(__file__)):
        return None
    return [a for a in argv[2:] if a]


def foreign_peer(sock: socket.socket, pid: int = 0, role: list = ()):
    """None when the peer is the process qabox started (``pid`` exactly, or
    else an agent whose arguments start with ``role``); otherwise what it is."""
    peer = peer_pid(sock)
    if pid:
        ok = peer == pid
    else:
        args = agent_args(peer) if peer else None
        ok = args is not None and args[:len(role)] == list(role)
    return None if ok else ("pid %d" % peer if peer else "a process of another user")


def expect_peer(sock: socket.socket, what: str, pid: int = 0, role: list = ()) -> None:
    """Connected to ``what``: talk on only if qabox started the other end."""
    foreign = foreign_peer(sock, pid, role)
    if foreign:
        raise Fail("foreign_socket", "%s is held by %s, which qabox did not start: refused; "
                   "`qabox hosts check` says how to stop testers from making such sockets"
                   % (what, foreign))


def supervisor_call(env: Env, request: dict, timeout: float = 5.0) -> dict:
    """Send one request to the env's supervisor and wait for its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(env.path("ctl.sock"))
        expect_peer(sock, "env %s's control socket" % env.name, role=["supervise", env.base, env.name])
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = recv_line(sock)
    finally:
        sock.close()
    try:
        return json.loads(data.decode())
    except ValueError:
        raise Fail("supervisor", "the supervisor of env %s did not answer: run `qabox status` "
                   "(it revives a dead supervisor) and try again" % env.name)


def recv_line(sock: socket.socket) -> bytes:
    """One JSON line from a control socket (empty if the peer closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def supervisor_ping(env: Env):
    """The supervisor's answer to ping, or None if none is running."""
    try:
        return supervisor_call(env, {"cmd": "ping"}, timeout=3.0)
    except (OSError, Fail):
        return None


def ensure_supervisor(env: Env, port: int = None) -> None:
    """Have a supervisor of this agent run the env (on whatever port: a switch
    moves it to another, see Supervisor.switch).

    A fresh supervisor gets a listening socket on ``port`` (default: the
    recorded one) bound here, so that a port in use is reported at once, and
    before anything stops. If apps of the env outlived their supervisor, the
    new supervisor adopts one of them, socket and all, and ends the others.
    """
    port = port or env.settings().get("port", 8080)
    pong = supervisor_ping(env)
    if pong and pong.get("agent") == os.path.basename(__file__):
        return
    if pong:
        # A supervisor of an older agent hands over: on SIGTERM it leaves and
        # its app keeps serving, for the new supervisor to adopt below.
        try:
            os.kill(pong["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not wait_for(lambda: not pid_alive(pong["pid"]), 5.0):
            os.kill(pong["pid"], signal.SIGKILL)
            wait_for(lambda: not pid_alive(pong["pid"]), 5.0)  # its lock is free once it is gone
    listener = None
    if env_apps(env):
        fd_arg = "adopt:%d" % port  # the port to listen on if none of them can be adopted
    else:
        listener = bind_listener(port)
        fd_arg = str(listener.fileno())
        update_settings(env, port=port)
    log = os.open(env.path("logs", "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "supervise", env.base, env.name, fd_arg],
        pass_fds=[listener.fileno()] if listener else [], stdin=subprocess.DEVNULL, stdout=log,
        stderr=log, start_new_session=True, close_fds=True,
    )
    os.close(log)
    if listener:
        listener.close()
    if not wait_for(lambda: supervisor_ping(env) is not None, 10.0):
        raise Fail("supervisor", "the supervisor did not start on the host; see %s"
                   % env.path("logs", "supervisor.log"), log=tail(env.path("logs", "supervisor.log")))


def bind_listener(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as e:
        listener.close()
        if e.errno == errno.EADDRINUSE:
            raise Fail("port_in_use", "port %d is already in use on the host's loopback by another "
                       "program: stop it, or deploy with --port N" % port)
        if e.errno == errno.EACCES:
            raise Fail("port_privileged", "port %d is privileged on the host (below %s, only root may "
                       "listen there): deploy with a --port of 1024 or more" % (port, privileged_below()))
        raise
    listener.listen(128)
    return listener


def privileged_below() -> str:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return f.read().strip()
    except OSError:
        return "1024"


def env_apps(env: Env) -> list:
    """The env's app processes, found in /proc rather than in state.json (which
    a full disk or a user may have lost): each {"pid", "release", "probe_fd"}."""
    releases = env.path("releases")
    apps = []
    for pid in own_pids():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
            if len(args) < 4 or args[2] != "serve" or not args[1].endswith(".py"):
                continue
            spec = json.loads(args[3])
            release_dir = spec["release_dir"]
        except (ValueError, OSError, KeyError, TypeError):
            continue
        if os.path.dirname(release_dir) == releases and pid_alive(pid):
            apps.append({"pid": pid, "release": os.path.basename(release_dir), "probe_fd": spec.get("probe_fd")})
    return apps


def listening_port(pid: int, fd):
    """The local port of a process's TCP socket: the probe port of an adopted app."""
    try:
        link = os.readlink("/proc/%d/fd/%d" % (pid, fd))  # socket:[INODE]
    except (OSError, TypeError):
        return None
    return next((port for port, _, inode in tcp_sockets() if link == "socket:[%d]" % inode), None)


def process_started(pid: int) -> float:
    """When a process started (epoch seconds), from /proc."""
    try:
        ticks = int(proc_stat(pid)[1][19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError, StopIteration):
        return now()


def link_current(env: Env, release: str) -> None:
    """Point ``current`` at a release atomically (a new link renamed over it)."""
    link = env.path(".current.%d.tmp" % os.getpid())
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.join("releases", release), link)
    os.replace(link, env.path("current"))


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def fd_port(fd: int) -> int:
    """The port a listening socket (by its file descriptor) is bound to."""
    sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a dup, closed below
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def app_ctl_path(env: Env, pid: int) -> str:
    """Where an app process offers its listening socket to a new supervisor."""
    return env.path("run", "app-%d.sock" % pid)


def send_fds(sock: socket.socket, fds: dict, **message) -> None:
    """Send a JSON message with named file descriptors over a unix socket."""
    names = sorted(fds)
    payload = json.dumps(dict(message, names=names)).encode()
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                array.array("i", [fds[n] for n in names]).tobytes())] if names else []
    sock.sendmsg([payload], ancdata)


def recv_fds(sock: socket.socket) -> tuple:
    """(message, {name: fd}) as send_fds sent them."""
    size = array.array("i").itemsize
    payload, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_LEN(64 * size))
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % size])
    message = json.loads(payload.decode()) if payload else {}
    if isinstance(message, list):  # an app of an older agent sends just the names
        message = {"names": message}
    names = message.get("names", [])
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise OSError("expected %d file descriptors, got %d" % (len(names), len(fds)))
    return message, dict(zip(names, fds))


def app_request(env: Env, pid: int, fds: dict, **message) -> tuple:
    """Ask a running app over its control socket: (its answer, the fds it sent)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(app_ctl_path(env, pid))
        expect_peer(sock, "the app's control socket", pid=pid)
        try:
            send_fds(sock, fds, **message)
        except BrokenPipeError:
            pass  # an app of an older agent answers without reading: its answer is still there
        return recv_fds(sock)
    finally:
        sock.close()


class AppProcess:
    """One app process serving a release: started by this supervisor, or adopted."""

    def __init__(self, env: Env, release: str, pid: int, probe_port: int, started_at: float, proc=None):
        self.env = env
        self.release = release
        self.pid = pid
        self.probe_port = probe_port
        self.started_at = started_at
        self.proc = proc
        self.health = env.release_info(release).get("health", "/")
        self.log_path = env.path("logs", release + ".log")

    @classmethod
    def spawn(cls, env: Env, release: str, sockets: dict, live: bool) -> "AppProcess":
        """Start ``agent.py serve`` for a release with the env's sockets:
        ``sockets[""]`` is the main port, the others testers' own ports."""
        info = env.release_info(release, strict=True)
        if not (info.get("entry") and info.get("venv")):
            raise Fail("no_release", "release %s is not complete on the host (no %s in %s): deploy again, "
                       "or roll back to another release" % (release, RELEASE_FILE, env.release_dir(release)))
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.bind(("127.0.0.1", 0))
        probe.listen(64)
        probe_port = probe.getsockname()[1]
        makedirs(env.path("run"))
        spec = {
            "release_dir": env.release_dir(release),
            "entry": info["entry"],
            "sockets": sockets,
            "probe_fd": probe.fileno(),
            "live": live,
            "ctl_dir": env.path("run"),
            "base": env.base,
            "env": env.name,
        }
        python = env.path("venvs", info["venv"], "bin", "python")
        child_env = dict(os.environ)
        for name in ("FLASK_DEBUG", "WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD"):
            child_env.pop(name, None)
        child_env.update(
            QABOX_DATA_DIR=env.path("data"),
            QABOX_ENV=env.name,
            QABOX_RELEASE=release,
            PYTHONUNBUFFERED="1",
            PATH=os.path.dirname(python) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        )
        log = os.open(env.path("logs", release + ".log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                [python, os.path.abspath(__file__), "serve", json.dumps(spec)],
                cwd=spec["release_dir"], env=child_env,
                pass_fds=list(sockets.values()) + [probe.fileno()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            os.close(log)
            probe.close()
        return cls(env, release, proc.pid, probe_port, now(), proc)

    @classmethod
    def adopt(cls, env: Env, found: dict):
        """Take over an app of the env that no supervisor runs (as env_apps found
        it, whatever state.json says); returns (app, its sockets)."""
        pid = found["pid"]
        _, fds = app_request(env, pid, {}, cmd="sockets")
        probe_port = listening_port(pid, found["probe_fd"])
        if probe_port is None or "" not in fds:
            for fd in fds.values():
                os.close(fd)
            raise OSError("app %d does not show its sockets" % pid)
        return cls(env, found["release"], pid, probe_port, process_started(pid)), fds

    def poll(self):
        """The exit code once the process has ended (-1 if adopted and unknown), else None."""
        if self.proc is not None:
            return self.proc.poll()
        return None if pid_alive(self.pid) else -1

    def healthy(self, timeout: float = 2.0) -> dict:
        return http_probe(self.probe_port, self.health, timeout)

    def wait_healthy(self, timeout: float) -> dict:
        """Probe until the app answers < 500, exits, or the time is up."""
        deadline = time.monotonic() + timeout
        result = {"code": None, "error": "no answer within %.0f s" % timeout}
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return {"code": None, "error": "exited with code %s" % self.poll(), "exited": True}
            probe = self.healthy(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if probe.get("code") is not None:
                result = probe
                if probe["code"] < 500:
                    return result
            time.sleep(0.1)
        return result

    def go_live(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    def hand_over(self, sockets: dict) -> bool:
        """Have the app serve exactly these sockets (testers added or removed)
        without a restart. False if it cannot (an app of an older agent)."""
        try:
            answer, fds = app_request(self.env, self.pid, sockets, cmd="serve")
        except (OSError, ValueError):
            return False
        for fd in fds.values():
            os.close(fd)
        return answer.get("ok") is True

    def stop(self, timeout: float = STOP_TIMEOUT):
        """SIGTERM the app's process group, give it time to drain, then SIGKILL."""
        if self.poll() is None:
            stop_group(self.pid, timeout)
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # leftovers of its group
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc is not None:
            self.proc.wait()
        return self.poll()


class Supervisor:
    """Keeps one env's app running, and switches releases without a gap.

    It owns the env's listening socket for its whole life and hands it to each
    app process, so connections queue in the kernel and are never refused
    while one process replaces another. It restarts an app that exits (with
    backoff, giving up after a crash loop) or stops answering its health probe.
    """

    CRASH_LOOP = 5  # this many exits, each within CRASH_WINDOW of starting...
    CRASH_WINDOW = 60.0  # ...and the app counts as crashed: no more restarts
    HANG_PROBES = 3  # failed health probes in a row that count as a hang

    def __init__(self, env: Env, listen_fd):
        self.env = env
        self.listen_fd = listen_fd
        self.sockets = {}  # "" -> the main listening fd; tester name -> their port's fd
        self.port = None
        self.app = None
        self.release = None  # the live release, kept while its app is down: current is put back from it
        saved = env.state()
        self.state = "stopped"
        self.restarts = saved.get("restarts") or 0
        self.hangs = saved.get("hangs") or 0
        self.last_exit = saved.get("last_exit")
        self.last_log = None
        self.quick_exits = []
        self.backoff = 0.5
        self.restart_at = None
        self.failed_probes = 0
        self.next_probe = 0.0
        self.next_rotate = 0.0
        self.next_testers = 0.0
        self.missing_testers = False  # a tester port could not be bound: tick() retries
        self.unsaved = False  # state.json could not be written (a full disk): tick retries
        self.next_save = 0.0

    @property
    def settings(self) -> dict:
        return self.env.settings(strict=False)  # damaged: the defaults, and the app keeps serving

    def log(self, message: str) -> None:
        """A line in supervisor.log; a full disk loses the line, never the supervisor."""
        try:
            print("%s %s" % (iso(now()), message), flush=True)
        except OSError:
            pass

    def save(self) -> None:
        """Write state.json. A write that fails (a full disk) kills nothing: the
        supervisor keeps its state, answers status with it, and retries."""
        try:
            write_json(self.env.path("state.json"), self.record())
        except OSError as e:
            if not self.unsaved:
                self.log("cannot write state.json (%s): retrying every 2 s" % e)
            self.unsaved = True
        else:
            self.unsaved = False

    def record(self) -> dict:
        """What state.json holds, and what ping tells status."""
        app = self.app
        return {
            "state": self.state,
            "pid": app.pid if app else None,
            "release": self.release,
            "probe_port": app.probe_port if app else None,
            "started_at": app.started_at if app else None,
            "restarts": self.restarts,
            "hangs": self.hangs,
            "last_exit": self.last_exit,
            "last_log": self.last_log,
            "port": self.port,
            "supervisor_pid": os.getpid(),
            "updated_at": now(),
        }

    def run(self) -> None:
        lock = os.open(self.env.path("supervisor.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("another supervisor runs for this env; exiting")
            return
        ctl_path = self.env.path("ctl.sock")
        if os.path.lexists(ctl_path):
            os.unlink(ctl_path)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(ctl_path)
        os.chmod(ctl_path, 0o600)
        ctl.listen(16)
        signal.signal(signal.SIGTERM, lambda *_: self.exit())
        if self.listen_fd.startswith("adopt"):
            self.adopt()
            if self.app is not None:
                self.update_testers()  # testers added while no supervisor ran
        if self.app is None:
            if self.listen_fd.startswith("adopt"):  # nothing could be adopted: listen anew
                port = self.listen_fd.partition(":")[2] or self.settings.get("port", 8080)
                try:
                    self.listen_fd = str(bind_listener(int(port)).detach())
                except Fail as e:
                    self.log("%s; supervisor exits" % e.message)
                    return
            self.sockets[""] = int(self.listen_fd)
            self.port = fd_port(self.sockets[""])
            self.bind_testers()
            current = self.env.current()
            if current and not self.settings.get("stopped"):
                self.start(current)
        self.log("supervisor %d started, port %d" % (os.getpid(), self.port))
        self.save()
        while True:
            ready, _, _ = select.select([ctl], [], [], 0.1)
            if ready:
                conn, _ = ctl.accept()
                foreign = foreign_peer(conn)
                if foreign:
                    self.log("refused a control connection from %s: not a qabox agent" % foreign)
                    conn.close()
                    continue
                self.handle(conn)
            self.tick()

    def adopt(self) -> None:
        """Take over an app of this env that no supervisor runs, socket and all,
        and end the others: a supervisor that died mid-switch leaves two apps,
        and a full disk or a lost state.json one that state.json does not name.
        The one kept serves the current release (the recorded one first)."""
        current, recorded = self.env.current(), self.env.state().get("pid")
        found = sorted(env_apps(self.env), reverse=True,
                       key=lambda a: (a["release"] == current, a["pid"] == recorded, a["pid"]))
        enders = []
        for app in found:
            if self.app is None:
                try:
                    self.app, self.sockets = AppProcess.adopt(self.env, app)
                except (OSError, ValueError) as e:
                    self.log("cannot adopt %s (pid %d): %s" % (app["release"], app["pid"], e))
                else:
                    self.app.go_live()  # it may have been starting beside the one that served
                    self.release, self.state, self.port = app["release"], "running", fd_port(self.sockets[""])
                    self.log("adopted %s (pid %d)" % (app["release"], app["pid"]))
                    continue
            self.log("ending %s (pid %d): an app of this env that no supervisor ran" % (app["release"], app["pid"]))
            enders.append(threading.Thread(target=stop_group, args=(app["pid"], STOP_TIMEOUT), daemon=True))
            enders[-1].start()
        if self.app is None:
            for ender in enders:  # they hold the port this supervisor listens on next
                ender.join()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = {}
            try:
                data = recv_line(conn)
                if not data:
                    return
                request = json.loads(data.decode())
                reply = self.dispatch(request)
            except Fail as e:
                reply = {"ok": False, "error": dict(code=e.code, message=e.message, **e.data)}
            except (OSError, ValueError, KeyError) as e:
                reply = {"ok": False, "error": {"code": "supervisor", "message": str(e)}}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
        if request.get("cmd") == "stop":
            self.log("stopped on request; supervisor exits")
            sys.exit(0)

    def dispatch(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "port": self.port, "state": self.state, "pid": os.getpid(),
                    "agent": os.path.basename(__file__), "record": self.record()}
        if cmd == "switch":
            return self.switch(request["release"], float(request.get("timeout", START_TIMEOUT)),
                               request.get("port"))
        if cmd == "stop":
            self.stop_app()
            return {"ok": True}
        if cmd == "testers":
            return self.update_testers()
        raise Fail("bad_request", "unknown supervisor command %r" % cmd)

    def update_testers(self) -> dict:
        """Serve exactly the testers' ports of now, in the running app too."""
        if self.bind_testers() and self.app is not None and not self.app.hand_over(self.sockets):
            return self.switch(self.app.release, START_TIMEOUT)  # a new process gets them
        return {"ok": True}

    def bind_testers(self) -> bool:
        """Listen on each tester's own port for this env. True if anything changed.

        A port it cannot get (held by another process) is tried again from
        tick(); an unreadable tester list changes nothing.
        """
        try:
            wanted = tester_ports(self.env)
        except Fail as e:
            self.log(e.message)
            return False
        self.missing_testers = False
        changed = False
        for name in [n for n in self.sockets if n and n not in wanted]:
            os.close(self.sockets.pop(name))
            changed = True
        for name, port in wanted.items():
            if name not in self.sockets:
                try:
                    self.sockets[name] = bind_listener(port).detach()  # the fd, kept open
                    changed = True
                except (Fail, OSError) as e:
                    if not self.missing_testers:
                        self.log("cannot listen on tester %s's port %d (retrying): %s" % (name, port, e))
                    self.missing_testers = True
        return changed

    def start(self, release: str) -> None:
        """Start a release straight onto the listening socket (no old one to keep)."""
        try:
            self.app = AppProcess.spawn(self.env, release, self.sockets, live=True)
            self.release, self.state = release, "starting"
            self.log("started %s (pid %d)" % (release, self.app.pid))
        except (Fail, OSError, KeyError) as e:
            self.log("cannot start %s: %s" % (release, e))
            self.app, self.state = None, "crashed"
        self.save()

    def switch(self, release: str, timeout: float, port=None) -> dict:
        """Start ``release`` beside the old one; only a healthy one goes live.

        With a new port, it is bound first (or refused) and only the new app
        listens there; the old one serves the old port until the switch, so a
        refused port or a failed release changes nothing.
        """
        if port is not None and not is_port(port):
            raise Fail("bad_request", "port %r is not a port from 1 to 65535" % (port,))
        sockets = dict(self.sockets)
        if port and port != self.port:
            sockets[""] = bind_listener(port).detach()
        moved = sockets[""] != self.sockets[""]
        try:
            new = AppProcess.spawn(self.env, release, sockets, live=False)
        except BaseException:
            if moved:
                os.close(sockets[""])
            raise
        self.log("starting %s (pid %d)" % (release, new.pid))
        result = new.wait_healthy(timeout)
        failed = result.get("code") is None or result["code"] >= 500
        if not failed:
            try:
                link_current(self.env, release)
            except OSError as e:
                result, failed = {"error": "cannot point current at it: %s" % e.strerror}, True
        if failed:
            code = new.stop(timeout=2)
            if moved:
                os.close(sockets[""])
            reason = result.get("error") or "health check answered HTTP %s" % result.get("code")
            self.log("release %s failed to start: %s" % (release, reason))
            return {"ok": False, "error": {
                "code": "app_exited" if result.get("exited") else "unhealthy",
                "message": "the new release %s did not pass its health check (%s): the previous "
                           "release keeps serving; fix the app and deploy again" % (release, reason),
                "exit": code,
                "log": tail(new.log_path),
            }}
        new.go_live()
        old, self.app, self.release = self.app, new, release
        if moved:
            os.close(self.sockets[""])  # the old app keeps its own copy until it is retired
            self.sockets, self.port = sockets, port
        self.state, self.last_log, self.quick_exits, self.backoff = "running", None, [], 0.5
        self.restart_at, self.failed_probes = None, 0
        self.save()
        self.log("release %s is live (pid %d)" % (release, new.pid))
        if old:
            old.stop()
            self.log("retired %s (pid %d)" % (old.release, old.pid))
        return {"ok": True, "pid": new.pid, "health": result}

    def tick(self) -> None:
        """Restart an app that died or hangs; mark one that became healthy; rotate
        logs; try again for tester ports it could not listen on."""
        clock = time.monotonic()
        if self.missing_testers and clock >= self.next_testers:
            self.next_testers = clock + 2.0
            self.update_testers()
        if self.unsaved and clock >= self.next_save:
            self.next_save = clock + 2
            self.save()
        app = self.app
        if app is None:
            if self.restart_at is not None and clock >= self.restart_at:
                self.restart_at = None
                release = self.env.current() or self.release
                if release:
                    self.start(release)
            return
        code = app.poll()
        if code is not None:
            self.exited(app, code)
            return
        if self.state == "starting":
            if (app.healthy(timeout=0.5).get("code") or 500) < 500:
                self.state, self.failed_probes = "running", 0
                self.next_probe = clock + float(self.settings.get("health_interval", 10))
                self.save()
        elif clock >= self.next_probe:
            self.probe(app)
        if clock >= self.next_rotate:
            self.next_rotate = clock + 2
            rotate(app.log_path, int(self.settings.get("log_max_bytes", 10 * 2**20)))

    def probe(self, app: AppProcess) -> None:
        """A live app that stops answering is hung: restart it, counted as a hang."""
        settings = self.settings
        self.next_probe = time.monotonic() + float(settings.get("health_interval", 10))
        code = app.healthy(timeout=2.0).get("code")
        self.failed_probes = 0 if code is not None and code < 500 else self.failed_probes + 1
        if self.failed_probes >= self.HANG_PROBES:
            self.log("app %s (pid %d) failed %d health probes: restarting it"
                     % (app.release, app.pid, self.failed_probes))
            self.hangs += 1
            self.failed_probes = 0
            app.stop(timeout=2)
            self.start(app.release)

    def exited(self, app: AppProcess, code) -> None:
        """Restart with exponential backoff, or give up after a crash loop."""
        self.log("app %s (pid %d) exited with code %s" % (app.release, app.pid, code))
        app.stop(timeout=0)  # reap it, and anything left in its group
        self.app, self.last_exit = None, code
        clock = time.monotonic()
        if now() - app.started_at < self.CRASH_WINDOW:
            self.quick_exits = [t for t in self.quick_exits if clock - t < 10 * self.CRASH_WINDOW]
            self.quick_exits.append(clock)
        else:
            self.quick_exits, self.backoff = [], 0.5
        if len(self.quick_exits) >= self.CRASH_LOOP:
            self.state, self.last_log = "crashed", tail(app.log_path, 20)
            self.log("crash loop: %d quick exits in a row; not restarting" % len(self.quick_exits))
        else:
            self.restarts += 1
            self.state = "starting"
            self.restart_at = clock + self.backoff
            self.backoff = min(self.backoff * 2, 30.0)
        self.save()

    def stop_app(self) -> None:
        if self.app:
            self.app.stop()
            self.log("stopped %s (pid %d)" % (self.app.release, self.app.pid))
            self.app = None
        self.state, self.restart_at = "stopped", None
        self.save()

    def exit(self) -> None:
        """On SIGTERM the supervisor leaves, but the app keeps serving: a new
        supervisor adopts it. (``qabox stop`` is the way to stop the app.)"""
        self.log("supervisor terminated; the app keeps running")
        sys.exit(0)


def rotate(path: str, max_bytes: int, keep: int = 5) -> None:
    """Rotate a log by size, copy-then-truncate, since the app keeps it open
    (O_APPEND). On a full disk it waits for the next try."""
    try:
        if os.path.getsize(path) <= max_bytes:
            return
        for n in range(keep - 1, 0, -1):
            if os.path.exists("%s.%d" % (path, n)):
                os.replace("%s.%d" % (path, n), "%s.%d" % (path, n + 1))
        shutil.copyfile(path, path + ".1")
        with open(path, "r+b") as f:
            f.truncate(0)
    except OSError:
        pass


# ---------------------------------------------------------------- the app process


def load_app(entry: str):
    """Import ``module:attr`` and return the WSGI app, with debugging forced off."""
    import importlib

    module_name, _, attr = entry.partition(":")
    obj = importlib.import_module(module_name)
    for part in (attr or "app").split("."):
        obj = getattr(obj, part)
    if hasattr(obj, "debug"):
        obj.debug = False  # a Flask app in debug mode would show tracebacks to testers
    while type(obj).__name__ == "DebuggedApplication" and hasattr(obj, "app"):
        obj = obj.app  # never the interactive debugger, whatever the build says
    return obj


def serve(spec: dict) -> None:
    """Run the app on Werkzeug's threaded server over the inherited sockets.

    It serves the private probe socket at once and the shared listening socket
    after SIGUSR1 (when the supervisor has seen it healthy). On SIGTERM it stops
    accepting, lets in-flight requests finish (Werkzeug alone would kill them
    mid-response), and exits. On ``run/app-PID.sock`` a new supervisor can ask
    it for its sockets (adoption), and its supervisor hands it the sockets of
    testers added since (and takes back those of testers removed).
    """
    import threading

    go_live = threading.Event()
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: go_live.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.path.insert(0, spec["release_dir"])
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    active = [0]
    active_lock = threading.Lock()
    open_by = {}  # tester name -> their connections open now (closed when they are removed)

    class Handler(WSGIRequestHandler):
        # One request per connection: nothing idles in a keep-alive that a
        # release switch would cut, and each tunnel request is its own channel.
        protocol_version = "HTTP/1.0"
        tester = ""
        timeout = IDLE_TIMEOUT  # a connection that sends nothing is let go

        def handle(self):
            with active_lock:
                active[0] += 1
                open_by.setdefault(self.tester, set()).add(self.connection)
            try:
                super().handle()
            finally:
                with active_lock:
                    active[0] -= 1
                    open_by.get(self.tester, set()).discard(self.connection)

    def tester_handler(name: str):
        class TesterHandler(Handler):
            tester = name

            def address_string(self):
                return name  # the access log names the tester, not 127.0.0.1

        return TesterHandler

    class QuietHandler(Handler):
        def log_request(self, *args, **kwargs):
            pass  # the supervisor's health probes are not testers' requests

    app = load_app(spec["entry"])
    sockets = dict(spec["sockets"])  # what this app serves once live, by name
    servers = {}  # the same names, once live
    lock = threading.Lock()  # sockets and servers: the control thread changes them too

    counts = {}  # port name -> connections it serves now
    refused_at = {}  # port name -> when its cap was last logged

    class Server(ThreadedWSGIServer):
        """A thread per connection, but only so many per port and in all: one
        tester holding hundreds of idle connections is turned away, and the
        others (and the supervisor's health probe, which is not counted) are
        still served."""

        name = ""

        def process_request(self, request, client_address):
            with active_lock:
                mine, total = counts.get(self.name, 0), sum(counts.values())
                full = mine >= MAX_CONNECTIONS_PER_PORT or total >= MAX_CONNECTIONS
                if not full:
                    counts[self.name] = mine + 1
            if full:
                if time.monotonic() - refused_at.get(self.name, -60) > 60:
                    refused_at[self.name] = time.monotonic()
                    print("connection cap reached (%s has %d open, %d in all; caps %d and %d): "
                          "refusing new connections" % (self.name or "the app's port", mine, total,
                                                        MAX_CONNECTIONS_PER_PORT, MAX_CONNECTIONS), flush=True)
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                with active_lock:
                    counts[self.name] -= 1

    class ProbeServer(ThreadedWSGIServer):
        pass  # uncapped: the health probe must get through a flood

    def start(fd: int, handler, kind=Server):
        server = kind("127.0.0.1", 0, app, handler=handler, fd=fd)
        server.name = handler.tester
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return server

    def serve_all() -> None:
        for name, fd in sockets.items():
            if name not in servers:
                servers[name] = start(fd, tester_handler(name) if name else Handler)

    def serve_only(fds: dict) -> None:
        """The supervisor's sockets now: testers were added or removed."""
        for name in [n for n in sockets if n not in fds]:
            server = servers.pop(name, None)
            if server is not None:
                server.shutdown()
                server.server_close()
            os.close(sockets.pop(name))
            with active_lock:  # a removed tester keeps no connection they opened before
                for conn in open_by.pop(name, ()):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        for name, fd in fds.items():
            if name in sockets:
                os.close(fd)  # the same socket, already served
            else:
                sockets[name] = fd
        if go_live.is_set():
            serve_all()

    def control(path: str) -> None:
        """A new supervisor asks for the sockets (adoption), or sends new ones."""
        if os.path.lexists(path):
            os.unlink(path)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(path)
        ctl.listen(4)
        while True:
            conn, _ = ctl.accept()
            with conn:
                conn.settimeout(5)
                try:
                    foreign = foreign_peer(conn, role=["supervise", spec["base"], spec["env"]])
                    if foreign:
                        raise OSError("refused a connection from %s: not this env's supervisor" % foreign)
                    message, fds = recv_fds(conn)
                    with lock:
                        if message.get("cmd") == "serve":
                            serve_only(fds)
                            send_fds(conn, {}, ok=True)
                        else:
                            send_fds(conn, sockets)
                except (OSError, ValueError) as e:
                    print("control request failed: %s" % e, flush=True)

    ctl_path = os.path.join(spec["ctl_dir"], "app-%d.sock" % os.getpid())
    threading.Thread(target=control, args=(ctl_path,), daemon=True).start()
    probe = start(spec["probe_fd"], QuietHandler, ProbeServer)
    if spec.get("live"):
        go_live.set()
    live = False
    while not stop.is_set():
        if go_live.is_set() and not live:
            with lock:
                serve_all()
            live = True
        stop.wait(0.05)
    with lock:
        for server in [probe] + list(servers.values()):
            server.shutdown()
    deadline = time.monotonic() + STOP_TIMEOUT - 1
    while active[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    if os.path.lexists(ctl_path):
        os.unlink(ctl_path)
    sys.exit(0)


# ---------------------------------------------------------------- entry point


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


def handle(line: str, io: Stream, in_session: bool = False) -> int:
    """Run one JSON request and write its result: the agent's whole protocol."""
    def fail(code: str, message: str, **data) -> int:
        io.emit({"ok": False, "changed": False, "error": dict(code=code, message=message, **data)})
        return 1

    try:
        req = json.loads(line)
        if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
            raise Fail("bad_request", "unknown request: %.100r" % line)
        if req.get("protocol") != PROTOCOL:
            raise Fail("protocol", "qabox speaks protocol %s, this agent %d"
                       % (req.get("protocol"), PROTOCOL))
        if in_session and req["cmd"] == "session":
            raise Fail("bad_request", "a session cannot be nested")
        data = COMMANDS[req["cmd"]](req.get("args") or {}, io)
    except Fail as e:
        return fail(e.code, e.message, **e.data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return fail("bad_request", "malformed request: %s" % e)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            full = disk_full(e.filename or "the deploy directory")
            return fail(full.code, full.message)
        return fail("os_error", str(e))
    if data is not None:
        changed = data.pop("changed", False)
        io.emit({"ok": True, "changed": changed, "data": data})
    return 0


def main(argv: list) -> int:
    os.umask(0o077)
    if len(argv) > 1 and argv[1] == "supervise":
        Supervisor(Env(argv[2], argv[3]), argv[4]).run()
        return 0
    if len(argv) > 1 and argv[1] == "tester-session":  # a tester key's forced command
        # qabox sends its one request line, then heartbeats only
        return tester_session(argv[2], argv[3], Stream(sys.stdout, sys.stdin, max_requests=1))
    if len(argv) > 1 and argv[1] == "boot":
        boot(argv[2])
        return 0
    if len(argv) > 1 and argv[1] == "serve":
        serve(json.loads(argv[2]))
        return 0
    io = Stream(sys.stdout, sys.stdin)
    line = io.next_request()
    return 1 if line is None else handle(line, io)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
