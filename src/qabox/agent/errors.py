"""Captured errors: what the app raised while serving a request, one JSON file
each in the env's ``errors/`` (0600), named ``<ms>-<id>-<release>.json`` so
that the oldest sort first and a release's count needs no file opened; and
the ``errors-list``/``error-show`` commands that read them.

The app process writes them (see wsgi); the agent only reads. Old ones are
pruned by count and total size, so a page that fails on every request cannot
fill the disk.
"""

import os
import random
import re
import threading
import time
import traceback

from .envs import Env, all_envs, existing_env
from .files import LOG_TAIL, iso, makedirs, now, read_json, write_json
from .protocol import Fail


KEEP = 1000  # errors per env
MAX_BYTES = 20 * 1024 * 1024  # of them all, per env
TRACEBACK_MAX = 64 * 1024
VALUE_MAX = 1000
ERROR_ID = re.compile(r"[0-9a-f]{12}")
FILE_NAME = re.compile(r"(\d{13})-([0-9a-f]{12})-([0-9-]+)\.json")
MASKED = ("HTTP_AUTHORIZATION", "HTTP_PROXY_AUTHORIZATION", "HTTP_COOKIE", "HTTP_SET_COOKIE")
POLL = 0.5


def errors_dir(env: Env) -> str:
    return env.path("errors")


def new_id() -> str:
    return "%012x" % random.SystemRandom().getrandbits(48)


def masked(key: str, value: str) -> str:
    """A header's value as recorded: a cookie's names without their values, an
    authorization's scheme without its credentials."""
    if key not in MASKED:
        return value[:VALUE_MAX]
    if key in ("HTTP_COOKIE", "HTTP_SET_COOKIE"):
        return "; ".join(part.split("=", 1)[0].strip() + "=***" for part in value.split(";") if part.strip())
    scheme = value.split(None, 1)
    return scheme[0] + " ***" if len(scheme) == 2 else "***"


def request_headers(environ: dict) -> dict:
    """The request's headers by their HTTP names, secrets masked."""
    headers = {}
    for key, value in environ.items():
        if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = "-".join(p.capitalize() for p in key[5 if key.startswith("HTTP_") else 0:].split("_"))
            headers[name] = masked(key, str(value))
    return headers


def raised_where(tb, root: str) -> str:
    """``file:line in function`` of the innermost frame in the app's own code
    (under ``root``, the release), else the innermost of all."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?"
    root = os.path.realpath(root) + os.sep
    own = [f for f in frames if os.path.realpath(f.filename).startswith(root)]
    frame = (own or frames)[-1]
    path = os.path.realpath(frame.filename)
    name = path[len(root):] if path.startswith(root) else frame.filename
    return "%s:%s in %s" % (name, frame.lineno, frame.name)


class ErrorStore:
    """The env's captured errors, as the app process writes them."""

    def __init__(self, directory: str, release: str, release_dir: str):
        self.dir = directory
        self.release = release
        self.release_dir = release_dir
        self.lock = threading.Lock()

    def capture(self, environ: dict, error: BaseException) -> str:
        """Record an exception raised while serving ``environ``; its id. A
        failure to record (a full disk) is printed, never raised into the app."""
        error_id = new_id()
        at = now()
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        record = {
            "id": error_id,
            "time": at,
            "at": iso(at),
            "type": type(error).__module__ + "." + type(error).__qualname__
            if type(error).__module__ not in ("builtins", "__main__") else type(error).__qualname__,
            "message": str(error)[:VALUE_MAX],
            "traceback": text[-TRACEBACK_MAX:],
            "where": raised_where(error.__traceback__, self.release_dir),
            "method": environ.get("REQUEST_METHOD", ""),
            "path": environ.get("PATH_INFO", ""),
            "query": environ.get("QUERY_STRING", "")[:VALUE_MAX],
            "headers": request_headers(environ),
            "tester": environ.get("HTTP_X_QABOX_TESTER") or None,
            "release": self.release,
            "request_id": environ.get("HTTP_X_REQUEST_ID"),
        }
        name = "%013d-%s-%s.json" % (int(at * 1000), error_id, self.release)
        try:
            with self.lock:
                write_json(os.path.join(makedirs(self.dir), name), record)
                prune(self.dir)
        except OSError as e:
            print("qabox: could not record error %s: %s" % (error_id, e), flush=True)
        print("qabox: error %s: %s: %s at %s" % (error_id, record["type"], record["message"][:200],
                                                  record["where"]), flush=True)
        return error_id


CAPTURED = re.compile(r"qabox: error ([0-9a-f]{12}): ")  # the line capture() prints


def with_traceback(env: Env, lines: list) -> list:
    """A failed start's log tail, its captured errors' lines (one a probe, naming
    the error's id only) folded into the last one, followed by its traceback: what
    the deploy shows of an app answering 500 to every probe."""
    captured = [line for line in lines if CAPTURED.match(line)]
    if not captured:
        return lines
    last = CAPTURED.match(captured[-1]).group(1)
    names = [name for name, _, found, _ in error_files(errors_dir(env)) if found == last]
    record = read_json(os.path.join(errors_dir(env), names[-1])) if names else None
    shown = [line for line in lines if not CAPTURED.match(line)] + [
        captured[-1] + (" (the last of %d captured)" % len(captured) if len(captured) > 1 else "")]
    if isinstance(record, dict) and isinstance(record.get("traceback"), str):
        shown += record["traceback"].rstrip("\n").splitlines()[-LOG_TAIL:]
    return shown


def error_files(directory: str) -> list:
    """The (name, time, id, release) of every error there, oldest first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        match = FILE_NAME.fullmatch(name)
        if match:
            found.append((name, int(match.group(1)) / 1000.0, match.group(2), match.group(3)))
    return found


def prune(directory: str, keep: int = KEEP, max_bytes: int = MAX_BYTES) -> None:
    """Delete the oldest errors beyond ``keep`` or ``max_bytes`` in all."""
    files = error_files(directory)
    sizes = []
    for name, _, _, _ in files:
        try:
            sizes.append(os.path.getsize(os.path.join(directory, name)))
        except OSError:
            sizes.append(0)
    total = sum(sizes)
    for n, (name, _, _, _) in enumerate(files):
        if len(files) - n <= keep and total <= max_bytes:
            break
        total -= sizes[n]
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def release_count(env: Env, release: str) -> int:
    """How many errors the release has captured (kept ones)."""
    return sum(1 for f in error_files(errors_dir(env)) if f[3] == release)


def summary(env: Env, record: dict) -> dict:
    keys = ("id", "at", "time", "type", "message", "where", "tester", "release", "request_id", "method", "path")
    return dict({key: record.get(key) for key in keys}, env=env.name)


def records(env: Env, since: float = 0.0, tester: "str | None" = None, seen: "set | None" = None):
    """The env's errors since a time (oldest first), of one tester if named;
    ``seen`` (names) are skipped, and the new ones added to it."""
    directory = errors_dir(env)
    for name, at, _, _ in error_files(directory):
        if at < since or (seen is not None and name in seen):
            continue
        if seen is not None:
            seen.add(name)
        record = read_json(os.path.join(directory, name))
        if isinstance(record, dict) and (tester is None or record.get("tester") == tester):
            yield summary(env, record)


def groups(errors: list) -> list:
    """Errors grouped by where they were raised (and their type), newest first."""
    by = {}
    for e in errors:
        group = by.setdefault((e["env"], e["where"], e["type"]), {
            "env": e["env"], "where": e["where"], "type": e["type"], "count": 0, "first": e["at"],
            "first_time": e["time"], "releases": [], "testers": []})
        group.update(count=group["count"] + 1, last=e["at"], last_time=e["time"], message=e["message"],
                     last_id=e["id"])
        for key, value in (("releases", e["release"]), ("testers", e["tester"])):
            if value and value not in group[key]:
                group[key].append(value)
    return sorted(by.values(), key=lambda g: g["last_time"], reverse=True)


def envs_asked(req) -> list:
    base = req["base"]
    if req.get("env"):
        return [existing_env(base, req["env"])]
    return [Env(base, name) for name in all_envs(base)]


def cmd_errors_list(req, io):
    """The errors, grouped; with follow, then each new one as it is captured."""
    envs = envs_asked(req)
    since = now() - float(req["since"]) if req.get("since") else 0.0
    tester = req.get("tester")
    seen = {env.name: set() for env in envs}
    found = [e for env in envs for e in records(env, since, tester, seen[env.name])]
    data = {"groups": groups(found), "count": len(found)}
    if not req.get("follow"):
        return data
    io.emit(data)
    heartbeat = time.monotonic()
    while not io.gone.wait(POLL):
        if time.monotonic() - heartbeat > 5:
            heartbeat = time.monotonic()
            io.emit({"hb": 1})
        for env in envs:
            for e in records(env, since, tester, seen[env.name]):
                io.emit({"error": e})
        for names in seen.values():
            if len(names) > 4 * KEEP:  # pruned ones: forget them, keep what is still there
                names.intersection_update(f[0] for env in envs for f in error_files(errors_dir(env)))
    return None


def cmd_error_show(req, io) -> dict:
    """One error, whole."""
    error_id = req["id"]
    if not ERROR_ID.fullmatch(error_id or ""):
        raise Fail("no_error", "%r is not an error id (12 hex digits, as `qabox errors list` shows)" % error_id)
    for env in envs_asked(req):
        for name, _, found, _ in error_files(errors_dir(env)):
            if found == error_id:
                record = read_json(os.path.join(errors_dir(env), name))
                if isinstance(record, dict):
                    return {"error": dict(record, env=env.name)}
    raise Fail("no_error", "no error %s on this host%s (pruned, or never captured): see `qabox errors list`"
               % (error_id, " in env %s" % req["env"] if req.get("env") else ""))
