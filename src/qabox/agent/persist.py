"""Data that follows the env, not the release: a build's persisted paths
(``[app] persist``) as links into the env's data dir, seeded from the build
only where the data dir has nothing yet, and a snapshot of them taken before
each deploy, which ``rollback --with-data`` restores.

    envs/<env>/data/<path>                  the persisted path's data (QABOX_DATA_DIR)
    envs/<env>/releases/<id>/<path>         a link to it
    envs/<env>/snapshots/<id>/snapshot.json what was there before release <id> was deployed
    envs/<env>/snapshots/<id>/data/<path>   a copy of it
    envs/<env>/data/.restore*               a restore under way (see restore)

Nothing here follows a link: a release's or the data dir's levels are opened
with ``O_NOFOLLOW`` one at a time, so a build's link cannot lead a persisted
path, a seed or a snapshot outside the env.
"""

import errno
import os
import shutil
import stat
import time

from .builds import open_dir
from .envs import Env
from .files import read_json, remove, write_json
from .protocol import Fail
from .rules import name_parts, persist_problems

SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_SIDE = ("-wal", "-shm", "-journal")  # a database's companions: taken with it, not on their own
DEFAULT_SNAPSHOT_MAX_MB = 500
MANIFEST = "snapshot.json"


def checked_paths(paths) -> list:
    """The persisted paths of a deploy request as lists of names; a Fail naming the bad ones."""
    problems = persist_problems(paths)
    if problems:
        raise Fail("bad_build", "[app] persist in qabox.toml: %s" % "; ".join(problems))
    return [name_parts(p) for p in paths]


def link_persisted(env: Env, release_dir: str, paths: list) -> list:
    """Make each persisted path of an extracted release a link into the data dir.

    What the build ships there moves to the data dir when the data dir has
    nothing at that path (a seed); otherwise the data wins and the build's copy
    is dropped. A path with nothing on either side becomes a directory in the
    data dir, unless its name has a suffix (``db.sqlite3``): the app creates
    that file through the link. Returns the seeded paths (so that a failed
    deploy can take them back: see unseed)."""
    seeded = []
    for parts in paths:
        where = "/".join(parts)
        rel, data = open_levels(release_dir, parts, "the build"), None
        try:
            data = open_levels(env.path("data"), parts, "the data dir")
            name = parts[-1]
            shipped = lstat_at(rel, name)
            if shipped is not None and stat.S_ISLNK(shipped.st_mode):
                raise Fail("bad_build", "%s is a link in the build, and [app] persist names it: "
                           "ship a file or directory there, or nothing" % where)
            if lstat_at(data, name) is None:
                if shipped is not None:
                    os.rename(name, name, src_dir_fd=rel, dst_dir_fd=data)
                    seeded.append(parts)
                elif "." not in name.lstrip("."):
                    os.mkdir(name, 0o700, dir_fd=data)
            elif shipped is not None:
                remove_at(rel, name)
            depth = len(parts) - 1 + 2  # up to the env: releases/<id>/<parents...>
            os.symlink("../" * depth + "data/" + where, name, dir_fd=rel)
        finally:
            os.close(rel)
            if data is not None:
                os.close(data)
    return seeded


def persist_release(env: Env, release: str, release_dir: str, paths: list, max_bytes: int) -> tuple:
    """Before a new release's venv, hooks and app: snapshot the data as it is,
    then link the release's persisted paths. Returns (the snapshot's manifest,
    the seeded paths)."""
    manifest = take_snapshot(env, release, paths, max_bytes)
    return manifest, link_persisted(env, release_dir, paths)


def unseed(env: Env, seeded: list) -> None:
    """Take back what a failed deploy's build seeded into the data dir."""
    for parts in seeded:
        try:
            fd = open_levels(env.path("data"), parts, "the data dir")
        except Fail:
            continue
        try:
            remove_at(fd, parts[-1])
        finally:
            os.close(fd)


def open_levels(top: str, parts: list, what: str) -> int:
    """The directory below ``top`` that holds persisted path ``parts``, made if
    missing, never through a link."""
    root = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return open_dir(root, parts[:-1])
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
            raise Fail("bad_build", "[app] persist path %s goes through a link or a file in %s: "
                       "qabox does not follow it" % ("/".join(parts), what))
        raise
    finally:
        os.close(root)


def lstat_at(fd: int, name: str):
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(fd: int, name: str) -> None:
    st = lstat_at(fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree_at(fd, name)
    else:
        os.unlink(name, dir_fd=fd)


def remove_tree_at(fd: int, name: str) -> None:
    """rmtree below a directory descriptor, never through a link (rmtree takes
    a dir_fd only from python 3.11)."""
    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    try:
        for entry in os.listdir(child):
            remove_at(child, entry)
    finally:
        os.close(child)
    os.rmdir(name, dir_fd=fd)


# ------------------------------------------------------------------ snapshots


def snapshot_dir(env: Env, release: str) -> str:
    return env.path("snapshots", release)


def take_snapshot(env: Env, release: str, paths: list, max_bytes: int) -> dict:
    """Copy the data of the persisted paths before ``release`` is deployed:
    SQLite databases consistently (the backup API, else a copy under
    ``BEGIN IMMEDIATE``), other files as they are. Above ``max_bytes`` nothing
    is copied and the manifest says why. Returns the manifest."""
    started = time.monotonic()
    top = snapshot_dir(env, release)
    remove(top)
    os.makedirs(os.path.join(top, "data"), 0o700)
    data = env.path("data")
    present = [p for p in paths if os.path.lexists(os.path.join(data, *p)) and inside(data, p)]
    size = sum(tree_bytes(os.path.join(data, *p)) for p in present)
    manifest = {"paths": ["/".join(p) for p in paths], "present": ["/".join(p) for p in present],
                "bytes": size, "skipped": None}
    if size > max_bytes:
        manifest["skipped"] = ("the persisted data is %.1f MB, more than snapshot_max_mb (%g): no snapshot "
                               "was taken, so rollback --with-data cannot go back before this release"
                               % (-(-size * 10 // 2**20) / 10, max_bytes / 2**20))  # rounded up: 1.0 never "more than 1"
    else:
        for p in present:
            copy_data(os.path.join(data, *p), os.path.join(top, "data", *p))
    manifest["seconds"] = round(time.monotonic() - started, 3)
    write_json(os.path.join(top, MANIFEST), manifest)
    return manifest


def inside(top: str, parts: list) -> bool:
    """Whether ``top/parts`` is reached without going through a link."""
    path = top
    for part in parts[:-1]:
        path = os.path.join(path, part)
        if os.path.islink(path) or not os.path.isdir(path):
            return False
    return True


def tree_bytes(path: str) -> int:
    if os.path.islink(path) or not os.path.isdir(path):
        return os.lstat(path).st_size
    total = 0
    for top, dirs, files in os.walk(path):
        total += sum(os.lstat(os.path.join(top, f)).st_size for f in files)
    return total


def copy_data(src: str, dest: str) -> None:
    """Copy a file or a tree (links as links), each SQLite database consistently."""
    os.makedirs(os.path.dirname(dest), 0o700, exist_ok=True)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dest)
    elif os.path.isdir(src):
        os.mkdir(dest, 0o700)
        for name in sorted(os.listdir(src)):
            if not (name.endswith(SQLITE_SIDE) and is_sqlite(os.path.join(src, name.rsplit("-", 1)[0]))):
                copy_data(os.path.join(src, name), os.path.join(dest, name))
    elif is_sqlite(src):
        copy_sqlite(src, dest)
    else:
        shutil.copy2(src, dest)


def is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return not os.path.islink(path) and f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def copy_sqlite(src: str, dest: str) -> None:
    """A consistent copy of a live SQLite database: its backup API (3.7+), else
    the file and its WAL copied while a lock holds off writers,
    else (a python without sqlite3) the files as they are."""
    try:
        import sqlite3
    except ImportError:
        sqlite3 = None
    if sqlite3 is None:
        copy_with_side(src, dest)
        return
    source = sqlite3.connect(src, timeout=60, isolation_level=None)
    try:
        if hasattr(source, "backup"):
            target = sqlite3.connect(dest)
            try:
                source.backup(target)
            finally:
                target.close()
        else:
            # A rollback-journal database's file stays still while a read lock is
            # held (a writer needs it to commit), and a read lock, unlike the write
            # lock BEGIN IMMEDIATE waits for, is not starved by an app that writes
            # without pause; a WAL database needs the write lock to keep its WAL still.
            wal = source.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
            source.execute("BEGIN IMMEDIATE" if wal else "BEGIN")
            source.execute("SELECT count(*) FROM sqlite_master").fetchone()
            try:
                copy_with_side(src, dest)
            finally:
                source.execute("ROLLBACK")
    finally:
        source.close()
    os.chmod(dest, 0o600)


def copy_with_side(src: str, dest: str) -> None:
    shutil.copy2(src, dest)
    if os.path.isfile(src + "-wal"):
        shutil.copy2(src + "-wal", dest + "-wal")


def prune_snapshots(env: Env, kept: list) -> None:
    """Snapshots are kept for the kept releases only."""
    try:
        names = os.listdir(env.path("snapshots"))
    except FileNotFoundError:
        return
    for name in names:
        if name not in kept:
            shutil.rmtree(env.path("snapshots", name), ignore_errors=True)


# ------------------------------------------------------------------ restoring


def restore(env: Env, release: str) -> dict:
    """Put the data back as it was before ``release`` was deployed.

    Rename-based, with a plan written once the copies are staged: killed
    before the plan, the data is untouched (the staging is dropped next
    time); killed after it, the next session to take the env's lock
    (settle_restore) completes it. Returns the manifest restored. What it
    replaced waits in ``data/.restore-old`` until drop_replaced or undo_restore."""
    top = snapshot_dir(env, release)
    manifest = read_json(os.path.join(top, MANIFEST))
    if not isinstance(manifest, dict):
        raise Fail("no_snapshot", "there is no snapshot of the data from before release %s: roll back "
                   "without --with-data to keep the env's data as it is" % release)
    if manifest.get("skipped"):
        raise Fail("no_snapshot", "release %s has no data snapshot: %s" % (release, manifest["skipped"]))
    data = env.path("data")
    staged, old = os.path.join(data, ".restore"), os.path.join(data, ".restore-old")
    remove(staged)
    remove(old)
    os.mkdir(staged, 0o700)
    os.mkdir(old, 0o700)
    for path in manifest["present"]:
        copy_data(os.path.join(top, "data", *path.split("/")), os.path.join(staged, *path.split("/")))
    write_json(os.path.join(data, ".restore.json"), {"paths": manifest["paths"],  # the commit point
                                                      "present": manifest["present"]})
    apply_plan(env)
    return manifest


def settle_restore(env: Env) -> None:
    """Once a session holds the env's lock: complete a restore a kill cut short
    after its plan was written, or drop one cut short before, and what it replaced."""
    apply_plan(env)
    drop_replaced(env)


def apply_plan(env: Env) -> None:
    """Carry out a written restore plan (idempotent: again after a kill, it finishes it)."""
    data = env.path("data")
    plan = read_json(os.path.join(data, ".restore.json"))
    staged, old = os.path.join(data, ".restore"), os.path.join(data, ".restore-old")
    if isinstance(plan, dict):
        for path in plan["paths"]:
            live, new, aside = (os.path.join(d, *path.split("/")) for d in (data, staged, old))
            if os.path.lexists(new) or path not in plan["present"]:  # not swapped yet (or to go)
                if os.path.lexists(live):
                    if os.path.lexists(aside):
                        remove(live)
                    else:
                        os.makedirs(os.path.dirname(aside), 0o700, exist_ok=True)
                        os.rename(live, aside)
                if os.path.lexists(new):
                    os.makedirs(os.path.dirname(live), 0o700, exist_ok=True)
                    os.rename(new, live)
        os.unlink(os.path.join(data, ".restore.json"))
    remove(staged)


def undo_restore(env: Env, paths: list) -> None:
    """Put back what a restore replaced (its switch failed): the data as it was."""
    data, old = env.path("data"), env.path("data", ".restore-old")
    for path in paths:
        live, aside = os.path.join(data, *path.split("/")), os.path.join(old, *path.split("/"))
        remove(live)
        if os.path.lexists(aside):
            os.rename(aside, live)
    remove(old)


def drop_replaced(env: Env) -> None:
    remove(env.path("data", ".restore-old"))
