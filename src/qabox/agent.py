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

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

PROTOCOL = 1
ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
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


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why this tar member may not be extracted into a release, or None."""
    name = member.name
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "path with '..'"
    if "\x00" in name:
        return "NUL in name"
    if not parts and not member.isdir():
        return "empty name"
    if member.isdev() or member.isfifo():
        return "device or fifo"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            return "link to an absolute path"
        base = parts[:-1] if member.issym() else []
        depth = len(base)
        for part in target.replace("\\", "/").split("/"):
            if part in ("", "."):
                continue
            depth = depth - 1 if part == ".." else depth + 1
            if depth < 0:
                return "link pointing outside the build"
    elif not (member.isfile() or member.isdir()):
        return "unsupported member type"
    return None


def check_members(members, max_bytes: int = DEFAULT_MAX_BYTES) -> list:
    """All problems of a build's members as ``"name: reason"`` strings."""
    problems = []
    total = 0
    for member in members:
        reason = member_problem(member)
        if reason:
            problems.append("%s: %s" % (member.name, reason))
        total += max(member.size, 0)
    if total > max_bytes:
        problems.append(
            "extracted size %d MB exceeds the limit of %d MB"
            % (total // 2**20, max_bytes // 2**20)
        )
    return problems


def entry_module_path(entry: str) -> tuple:
    """The files that can hold ``module:callable``'s module, relative to the build."""
    module = entry.split(":", 1)[0]
    base = module.replace(".", "/")
    return (base + ".py", base + "/__init__.py")


# ---------------------------------------------------------------- small helpers


def now() -> float:
    return time.time()


def iso(ts: float | None) -> str | None:
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
    """Write atomically, readable by the deploy account only."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


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


def pid_alive(pid) -> bool:
    """Whether pid runs; a zombie counts as dead (an orphan's reaper may be slow)."""
    if not pid:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


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
        if not ENV_NAME.match(name or ""):
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

    def current(self) -> str | None:
        """The current release id, from the ``current`` symlink."""
        try:
            return os.path.basename(os.readlink(self.path("current")))
        except OSError:
            return None

    def releases(self) -> list:
        try:
            names = os.listdir(self.path("releases"))
        except OSError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def release_info(self, release: str) -> dict:
        return read_json(os.path.join(self.release_dir(release), "release.json"), {}) or {}

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
    return sorted(n for n in names if ENV_NAME.match(n))


# ---------------------------------------------------------------- commands


def cmd_hello(req, io) -> dict:
    """Handshake: protocol version and facts about the host."""
    return {
        "protocol": PROTOCOL,
        "python": sys.version.split()[0],
        "user": os.environ.get("USER") or str(os.getuid()),
        "time": now(),
    }


def cmd_session(req, io) -> None:
    """Hold an env's deploy lock and run the deploy's requests under it.

    The lock is an flock owned by this process, which lives exactly as long
    as qabox's channel: when qabox exits, dies or goes silent (no heartbeat
    for SESSION_IDLE seconds), the running step is cancelled and cleaned up,
    this process exits, and the lock is free. It can never be left stale.
    """
    env = Env(req["base"], req["env"])
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
    if not SHA256.match(sha):
        raise Fail("bad_request", "not a sha256: %r" % sha)
    builds = makedirs(os.path.join(os.path.abspath(os.path.expanduser(req["base"])), "builds"))
    final = os.path.join(builds, sha)
    part = final + ".part"
    env = Env(req["base"], req["env"])
    current = env.current()
    info = env.release_info(current) if current else {}
    return {
        "have": os.path.isfile(final),
        "part": os.path.getsize(part) if os.path.isfile(part) else 0,
        "part_path": os.path.relpath(part, os.path.expanduser("~")),
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
    if os.path.isfile(final):
        return final
    part = final + ".part"
    if not os.path.isfile(part):
        raise Fail("no_build", "the build was not uploaded: deploy again")
    if file_sha256(part) != sha:
        os.unlink(part)
        raise Fail("checksum", "the uploaded build does not match its sha256: deploy again")
    os.replace(part, final)
    return final


def new_release_id(env: Env) -> str:
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rid, n = base, 1
    while os.path.lexists(env.release_dir(rid)):
        n += 1
        rid = "%s-%d" % (base, n)
    return rid


def extract(build: str, dest: str, max_bytes: int) -> None:
    """Extract a checked build into a new directory, never outside it."""
    try:
        tar = tarfile.open(build)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise Fail("bad_build", "the build is not a readable tar file: %s" % e)
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise Fail("bad_build", "the build is truncated or corrupt: %s" % e)
        problems = check_members(members, max_bytes)
        if problems:
            raise Fail("bad_build", "the build has unsafe members: " + "; ".join(problems[:10]))
        os.mkdir(dest, 0o700)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tar.extractall(dest, members=members, **kwargs)
        except (tarfile.TarError, EOFError) as e:
            raise Fail("bad_build", "the build is truncated or corrupt: %s" % e)
    for root, dirs, files in os.walk(dest):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o700 | 0o600)


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
    shutil.rmtree(venv, ignore_errors=True)
    req = os.path.join(release_dir, "requirements.txt")
    wheels = os.path.join(release_dir, "wheels")
    io.emit({"progress": "creating virtualenv"})
    cmd = [sys.executable, "-m", "venv", venv]
    if not os.path.isfile(req):
        cmd.insert(3, "--system-site-packages")
    run_step(cmd, "could not create a virtualenv on the host (is python3-venv installed?)")
    if os.path.isfile(req):
        io.emit({"progress": "installing requirements"})
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "-r", req]
        if os.path.isdir(wheels):
            pip[4:4] = ["--no-index", "--find-links", wheels]
        run_step(pip, "could not install the build's requirements.txt on the host"
                 " (ship every wheel in the build's wheels/ directory)")
    with open(os.path.join(venv, ".complete"), "w"):
        pass
    return key, python, True


def run_step(cmd: list, what: str) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode:
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        if any("No space left" in line for line in lines):
            raise Fail("disk_full", "the host's disk is full: free some space and deploy again")
        raise Fail("step_failed", what, log=lines[-LOG_TAIL:])


def cmd_deploy(req, io) -> dict:
    """Extract an uploaded build as a new release and switch the env to it.

    The current release keeps serving until the new one passes its health
    check; on any failure the new release is removed and nothing else changes.
    """
    env = Env(req["base"], req["env"])
    if io.locked_env != env.name:
        raise Fail("bad_request", "deploy runs only in a session holding env %s's lock" % env.name)
    env.ensure()
    sha = req["sha256"]
    if not SHA256.match(sha):
        raise Fail("bad_request", "not a sha256: %r" % sha)
    started = time.monotonic()
    current = env.current()
    settings = env_settings(env, req.get("port"))
    if current and env.release_info(current).get("sha256") == sha and supervisor_ping(env):
        state = read_json(env.path("state.json"), {}) or {}
        if state.get("state") == "running" and state.get("port") == settings["port"]:
            return {"release": current, "port": settings["port"], "unchanged": True,
                    "changed": False}
    build = take_build(env.builds, sha)
    release = new_release_id(env)
    rdir = env.release_dir(release)
    tmp = env.path("releases", "." + release + ".tmp")
    try:
        io.emit({"progress": "extracting"})
        shutil.rmtree(tmp, ignore_errors=True)
        extract(build, tmp, int(req.get("max_bytes") or DEFAULT_MAX_BYTES))
        io.check()
        key, python, created = prepare_venv(env, tmp, io)
        io.check()
        info = {
            "release": release,
            "sha256": sha,
            "file": req.get("file"),
            "entry": req["entry"],
            "health": req.get("health") or "/",
            "venv": key,
            "deployed_at": iso(now()),
            "deployed_by": req.get("by"),
        }
        write_json(os.path.join(tmp, "release.json"), info)
        os.rename(tmp, rdir)
        io.check()
        io.emit({"progress": "starting"})
        ensure_supervisor(env, settings["port"])
        result = supervisor_call(env, {"cmd": "switch", "release": release,
                                       "timeout": float(req.get("start_timeout") or START_TIMEOUT)},
                                 timeout=float(req.get("start_timeout") or START_TIMEOUT) + STOP_TIMEOUT + 10)
        if not result.get("ok"):
            err = result.get("error", {})
            raise Fail(err.get("code", "start_failed"), err.get("message", "the app did not start"),
                       log=err.get("log", []))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(rdir, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(env.base)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(rdir, ignore_errors=True)
        raise
    pruned = prune(env, int(req.get("keep") or 5))
    return {
        "release": release,
        "previous": current,
        "port": settings["port"],
        "venv_created": created,
        "pruned": pruned,
        "seconds": round(time.monotonic() - started, 2),
        "changed": True,
    }


def env_settings(env: Env, port) -> dict:
    """The env's port: as asked, else as recorded on the host, else 8080."""
    settings = read_json(env.path("env.json"), {}) or {}
    if port:
        settings["port"] = int(port)
    settings.setdefault("port", 8080)
    makedirs(env.dir)
    write_json(env.path("env.json"), settings)
    return settings


def prune(env: Env, keep: int) -> list:
    """Delete releases beyond the newest ``keep``, never the current one,
    then the virtualenvs and builds no kept release uses."""
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
    used = set()
    for name in all_envs(env.base):
        other = Env(env.base, name)
        used.update(other.release_info(r).get("sha256") for r in other.releases())
    for name in os.listdir(env.builds):
        if not name.endswith(".part") and name not in used:
            os.unlink(os.path.join(env.builds, name))
    return old


def cmd_status(req, io) -> dict:
    """Every env on this host (or the one asked): release, state, health."""
    base = req["base"]
    names = [req["env"]] if req.get("env") else all_envs(base)
    return {"envs": [env_status(Env(base, name)) for name in names]}


def env_status(env: Env) -> dict:
    state = read_json(env.path("state.json"), {}) or {}
    current = env.current()
    info = env.release_info(current) if current else {}
    port = (read_json(env.path("env.json"), {}) or {}).get("port", 8080)
    supervised = supervisor_ping(env)
    pid = state.get("pid")
    if not supervised:
        status = "crashed" if state.get("state") == "crashed" else "stopped"
        pid = pid if pid_alive(pid) else None
    else:
        status = state.get("state", "stopped")
    started = state.get("started_at")
    result = {
        "env": env.name,
        "release": current,
        "sha256": info.get("sha256"),
        "file": info.get("file"),
        "deployed_at": info.get("deployed_at"),
        "deployed_by": info.get("deployed_by"),
        "state": status,
        "pid": pid if status in ("running", "starting") else None,
        "uptime": round(now() - started, 1) if started and status == "running" else None,
        "restarts": state.get("restarts", 0),
        "last_exit": state.get("last_exit"),
        "port": port,
        "supervisor_pid": state.get("supervisor_pid") if supervised else None,
        "health": http_probe(port, info.get("health", "/")) if current else None,
    }
    return result


COMMANDS = {
    "hello": cmd_hello,
    "session": cmd_session,
    "upload-state": cmd_upload_state,
    "deploy": cmd_deploy,
    "status": cmd_status,
}


# ---------------------------------------------------------------- supervisor


def supervisor_call(env: Env, request: dict, timeout: float = 5.0) -> dict:
    """Send one request to the env's supervisor and wait for its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(env.path("ctl.sock"))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return json.loads(data.decode())


def supervisor_ping(env: Env):
    """The supervisor's answer to ping, or None if none is running."""
    try:
        return supervisor_call(env, {"cmd": "ping"}, timeout=2.0)
    except (OSError, ValueError):
        return None


def ensure_supervisor(env: Env, port: int) -> None:
    """Start the env's supervisor unless one already serves this port.

    The listening socket is bound here, so that a port in use is reported to
    the deploy at once; the supervisor inherits it and keeps it for good.
    """
    pong = supervisor_ping(env)
    if pong and pong.get("port") == port:
        return
    if pong:
        supervisor_call(env, {"cmd": "shutdown"}, timeout=STOP_TIMEOUT + 5)
        wait_for(lambda: supervisor_ping(env) is None, 5.0)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as e:
        listener.close()
        if e.errno == errno.EADDRINUSE:
            raise Fail("port_in_use", "port %d is already in use on the host's loopback:"
                       " stop what listens there, or deploy with --port N" % port)
        raise
    listener.listen(128)
    log = os.open(env.path("logs", "supervisor.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "supervise", env.base, env.name,
         str(listener.fileno())],
        pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        start_new_session=True, close_fds=True,
    )
    os.close(log)
    listener.close()
    if not wait_for(lambda: supervisor_ping(env) is not None, 10.0):
        raise Fail("supervisor", "the supervisor did not start on the host; see %s"
                   % env.path("logs", "supervisor.log"), log=tail(env.path("logs", "supervisor.log")))


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class AppProcess:
    """One running app process: a release served by ``agent.py serve``."""

    def __init__(self, env: Env, release: str, listen_fd: int, live: bool):
        self.env = env
        self.release = release
        info = env.release_info(release)
        self.health = info.get("health", "/")
        self.probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.probe.bind(("127.0.0.1", 0))
        self.probe.listen(64)
        self.probe_port = self.probe.getsockname()[1]
        self.log_path = env.path("logs", release + ".log")
        spec = {
            "release_dir": env.release_dir(release),
            "entry": info["entry"],
            "listen_fd": listen_fd,
            "probe_fd": self.probe.fileno(),
            "live": live,
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
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                [python, os.path.abspath(__file__), "serve", json.dumps(spec)],
                cwd=spec["release_dir"], env=child_env, pass_fds=[listen_fd, self.probe.fileno()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            os.close(log)
        self.started_at = now()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def healthy(self, timeout: float = 2.0) -> dict:
        return http_probe(self.probe_port, self.health, timeout)

    def wait_healthy(self, timeout: float) -> dict:
        """Probe until the app answers < 500, exits, or the time is up."""
        deadline = time.monotonic() + timeout
        result = {"code": None, "error": "no answer"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return {"code": None, "error": "exited with code %s" % self.proc.returncode}
            result = self.healthy(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if result.get("code") is not None and result["code"] < 500:
                return result
            time.sleep(0.1)
        return result

    def go_live(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    def stop(self, timeout: float = STOP_TIMEOUT):
        """SIGTERM the app's process group, give it time to drain, then SIGKILL."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.probe.close()
        return self.proc.returncode


class Supervisor:
    """Keeps one env's app running, and switches releases without a gap.

    It owns the env's listening socket for its whole life and hands it to each
    app process, so connections queue in the kernel and are never refused
    while one process replaces another.
    """

    def __init__(self, env: Env, listen_fd: int):
        self.env = env
        self.listen_fd = listen_fd
        self.port = socket.socket(fileno=os.dup(listen_fd)).getsockname()[1]
        self.app = None
        self.state = "stopped"
        self.restarts = 0
        self.last_exit = None
        self.backoff = 0.5
        self.restart_at = None

    def log(self, message: str) -> None:
        print("%s %s" % (iso(now()), message), flush=True)

    def save(self) -> None:
        app = self.app
        write_json(self.env.path("state.json"), {
            "state": self.state,
            "pid": app.pid if app else None,
            "release": app.release if app else None,
            "started_at": app.started_at if app else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "port": self.port,
            "supervisor_pid": os.getpid(),
            "updated_at": now(),
        })

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
        signal.signal(signal.SIGTERM, lambda *_: self.shutdown_and_exit())
        self.log("supervisor started, port %d" % self.port)
        current = self.env.current()
        if current:
            self.start(current)
        self.save()
        while True:
            ready, _, _ = select.select([ctl], [], [], 0.2)
            if ready:
                conn, _ = ctl.accept()
                self.handle(conn)
            self.tick()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                request = json.loads(data.decode())
                reply = self.dispatch(request)
            except Fail as e:
                reply = {"ok": False, "error": dict(code=e.code, message=e.message, **e.data)}
            except (OSError, ValueError) as e:
                reply = {"ok": False, "error": {"code": "supervisor", "message": str(e)}}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
            if request.get("cmd") == "shutdown":
                sys.exit(0)

    def dispatch(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "port": self.port, "state": self.state, "pid": os.getpid()}
        if cmd == "switch":
            return self.switch(request["release"], float(request.get("timeout", START_TIMEOUT)))
        if cmd == "shutdown":
            self.stop_app()
            return {"ok": True}
        raise Fail("bad_request", "unknown supervisor command %r" % cmd)

    def start(self, release: str) -> None:
        """Start a release straight onto the listening socket (no old one to keep)."""
        try:
            self.app = AppProcess(self.env, release, self.listen_fd, live=True)
            self.state = "starting"
        except (OSError, KeyError) as e:
            self.log("cannot start %s: %s" % (release, e))
            self.app = None
            self.state = "crashed"
        self.save()

    def switch(self, release: str, timeout: float) -> dict:
        """Start ``release`` beside the old one; only a healthy one goes live."""
        new = AppProcess(self.env, release, self.listen_fd, live=False)
        self.log("starting %s (pid %d)" % (release, new.pid))
        result = new.wait_healthy(timeout)
        if result.get("code") is None or result["code"] >= 500:
            code = new.stop(timeout=2)
            reason = result.get("error") or "health check answered HTTP %s" % result.get("code")
            self.log("release %s failed to start: %s" % (release, reason))
            exited = new.proc.returncode is not None and "exited" in reason
            return {"ok": False, "error": {
                "code": "app_exited" if exited else "unhealthy",
                "message": "the new release %s did not pass its health check (%s): the previous "
                           "release keeps serving; fix the app and deploy again" % (release, reason),
                "exit": code,
                "log": tail(new.log_path),
            }}
        new.go_live()
        old, self.app = self.app, new
        self.state, self.restarts, self.last_exit, self.backoff = "running", 0, None, 0.5
        link = self.env.path(".current.tmp")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(os.path.join("releases", release), link)
        os.replace(link, self.env.path("current"))
        self.save()
        self.log("release %s is live (pid %d)" % (release, new.pid))
        if old:
            old.stop()
            self.log("stopped %s (pid %d)" % (old.release, old.pid))
        return {"ok": True, "pid": new.pid, "health": result}

    def tick(self) -> None:
        """Notice a started app becoming healthy, or dying (then restart it)."""
        app = self.app
        if app is None:
            if self.restart_at and time.monotonic() >= self.restart_at:
                self.restart_at = None
                current = self.env.current()
                if current:
                    self.start(current)
            return
        code = app.proc.poll()
        if code is None:
            if self.state == "starting" and (app.healthy(timeout=0.5).get("code") or 500) < 500:
                self.state = "running"
                self.save()
            return
        app.probe.close()
        self.log("app %s (pid %d) exited with code %s" % (app.release, app.pid, code))
        self.app, self.last_exit = None, code
        self.restarts += 1
        self.state = "starting"
        self.restart_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, 30.0)
        self.save()

    def stop_app(self) -> None:
        if self.app:
            self.app.stop()
            self.app = None
        self.state = "stopped"
        self.save()

    def shutdown_and_exit(self) -> None:
        self.stop_app()
        sys.exit(0)


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
    accepting, lets in-flight requests finish, and exits.
    """
    import threading

    go_live = threading.Event()
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: go_live.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.path.insert(0, spec["release_dir"])
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):
            pass  # the supervisor's health probes are not testers' requests

    app = load_app(spec["entry"])
    servers = []

    def start(fd: int, handler) -> None:
        server = ThreadedWSGIServer("127.0.0.1", 0, app, handler=handler, fd=fd)
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

    start(spec["probe_fd"], QuietHandler)
    if spec.get("live"):
        go_live.set()
    live = False
    while not stop.is_set():
        if go_live.is_set() and not live:
            start(spec["listen_fd"], None)
            live = True
        stop.wait(0.05)
    for server in servers:
        server.shutdown()
    deadline = time.monotonic() + STOP_TIMEOUT - 1
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0)


# ---------------------------------------------------------------- entry point


class Stream:
    """The agent's side of one SSH channel: requests in, JSON lines out.

    A reader thread owns stdin, so that the agent notices qabox going away
    (EOF, or no line at all for SESSION_IDLE seconds: qabox sends heartbeats)
    even in the middle of a long step, which then stops at its next check().
    """

    def __init__(self, stdout, stdin=None):
        import queue
        import threading

        self.stdout = stdout
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
                        self.inbox.put(line.decode("utf-8", "replace"))
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
        Supervisor(Env(argv[2], argv[3]), int(argv[4])).run()
        return 0
    if len(argv) > 1 and argv[1] == "serve":
        serve(json.loads(argv[2]))
        return 0
    io = Stream(sys.stdout, sys.stdin)
    line = io.next_request()
    return 1 if line is None else handle(line, io)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
