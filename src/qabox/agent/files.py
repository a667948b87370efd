"""Files on the host: atomic JSON writes, the env's records, logs, checksums."""

import errno
import hashlib
import json
import os
import shutil
import time

from .protocol import Fail
from .rules import RELEASE_FILE, SERVERS, environment_problems, health_codes, static_problems


LOG_TAIL = 30


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
    """Write JSON atomically, readable by the owner only (see write_text)."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def write_text(path: str, text, mode: int = 0o600) -> None:
    """Write text (UTF-8) or bytes atomically, created with its mode (0600:
    readable by the owner only, a key not even for a moment); a failed write
    (a full disk) leaves the old file and no temporary one."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
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


def is_environment(value) -> bool:
    return not environment_problems(value)


def is_health_status(value) -> bool:
    try:
        return bool(health_codes(value))
    except ValueError:
        return False


# What an env's own files may hold (each a JSON object; any key may be null),
# and what to do about one that is damaged.
RECORDS = {
    "env.json": ({"port": is_port, "stopped": lambda v: isinstance(v, bool), "health_interval": is_number,
                  "log_max_bytes": is_int, "start_timeout": is_number, "spare_app": lambda v: isinstance(v, bool)},
                 "delete it, and the next deploy records the env's settings anew"),
    "state.json": ({"state": is_text, "pid": is_int, "release": is_text, "probe_port": is_port, "port": is_port,
                    "started_at": is_number, "restarts": is_int, "hangs": is_int, "last_exit": is_int,
                    "last_log": lambda v: isinstance(v, list), "supervisor_pid": is_int,
                    "updated_at": is_number},
                   "delete it, and the env's supervisor writes it anew"),
    RELEASE_FILE: ({"release": is_text, "sha256": is_text, "file": is_text, "entry": is_text,
                    "health": is_text, "health_status": is_health_status,
                    "static": lambda v: not static_problems(v), "venv": is_text, "deployed_at": is_text, "deployed_by": is_text,
                    "environment": is_environment,
                    "release_hooks": lambda v: isinstance(v, list) and all(map(is_text, v)),
                    "release_timeout": is_number,
                    "persist": lambda v: isinstance(v, list) and all(is_text(p) for p in v),
                    "server": lambda v: v in SERVERS, "server_options": lambda v: isinstance(v, dict)},
                   "deploy again, or roll back to another release"),
    "config.json": ({"values": is_environment, "hosts_file": is_environment},
                    "delete it, then set the env's configuration again with `qabox config set`"),
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
    """The last lines of a log file (reads only its end); none for 0."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def digest(f, out=None) -> tuple:
    """The sha256 and length of the rest of the file ``f``, copied into ``out`` if given."""
    h, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
        size += len(block)
        if out is not None:
            out.write(block)
    return h.hexdigest(), size


def copy_file(source: int, target: int, size: int) -> None:
    """Copy ``size`` bytes between file descriptors from their current offsets,
    in the kernel where it can (copy_file_range from python 3.8, else sendfile;
    an old kernel or another filesystem may refuse either)."""
    def through_python(n: int) -> int:
        block = os.read(source, min(n, 1 << 20))
        view = memoryview(block)
        while view:
            view = view[os.write(target, view):]
        return len(block)

    ways = [lambda n: os.sendfile(target, source, None, n), through_python]
    if hasattr(os, "copy_file_range"):
        ways.insert(0, lambda n: os.copy_file_range(source, target, n))
    left = size
    while left:
        try:
            done = ways[0](left)
        except OSError as e:
            if len(ways) == 1 or e.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            ways.pop(0)
            continue
        if not done:
            raise OSError(errno.EIO, "the file ended before its %d bytes" % size)
        left -= done


def disk_full(path: str) -> Fail:
    return Fail(
        "disk_full",
        "the host's disk is full at %s: free some space there and deploy again" % path,
    )


def remove(path: str) -> None:
    """Delete a file, a symlink (not what it points to) or a tree."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def read_text_in(root: str, name: str):
    """A file's text inside ``root`` (None if there is none), never through a
    link that leads outside it."""
    path = os.path.realpath(os.path.join(root, name))
    if not path.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


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
