"""Data that follows the env (``[app] persist``), through the agent run here (no SSH): the
persisted paths become links into the data dir, seeded from the build only where it has
nothing; hostile paths are refused; each deploy snapshots the data, ``rollback --with-data``
puts it back, bounded by ``snapshot_max_bytes`` and pruned with the releases; on the
pythons the host may have (3.6's sqlite3 has no backup API: a copy under BEGIN IMMEDIATE)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import Host, free_port, link, local_get, raw_tar, wsgi_build

pytestmark = pytest.mark.network  # the app server's wheels, downloaded once into .cache/wheels
ENV = "main"
PERSIST = ["instance", "media", "db.sqlite3"]
PY36 = "/root/.pyenv/versions/3.6.15/bin/python"

# An app that reads its instance folder, found as Flask finds it: beside the module, in the release.
READER = """
import os

HERE = os.path.dirname(os.path.abspath(__file__))

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    path = os.path.join(HERE, "instance", "seed.txt")
    return [open(path).read().encode() if os.path.exists(path) else b"none"]
"""


def data_dir(local: Host) -> Path:
    return Path(local.base) / "envs" / ENV / "data"


def release_dir(local: Host, release: str) -> Path:
    return Path(local.base) / "envs" / ENV / "releases" / release


def build(tmp_path: Path, name: str, files: dict, python: str | None = None) -> Path:
    return wsgi_build(tmp_path / f"{name}.tar.gz", name, python, files)


def test_persisted_paths_are_links_into_the_data_dir_seeded_only_where_it_has_nothing(host, tmp_path):
    port = free_port()
    v1 = build(tmp_path, "v1", {"wsgi.py": READER, "instance/seed.txt": "seed of v1"})
    first = host.deploy(v1, ENV, port, persist=PERSIST)
    assert first["ok"], (first, host.stderr)
    release = first["data"]["release"]
    data, rdir = data_dir(host), release_dir(host, release)
    for name in PERSIST:
        assert os.path.islink(rdir / name) and os.path.realpath(rdir / name) == str(data / name)
    assert (data / "instance" / "seed.txt").read_text() == "seed of v1"  # the build's seed, moved in
    assert (data / "media").is_dir() and not os.path.lexists(data / "db.sqlite3")  # the app makes that file
    assert local_get(port) == (200, "seed of v1")
    assert host.data("releases", env=ENV)["releases"][0]["persist"] == PERSIST
    (data / "instance" / "seed.txt").write_text("written by the app")
    v2 = build(tmp_path, "v2", {"wsgi.py": READER, "instance/seed.txt": "seed of v2", "media/logo": "v2"})
    second = host.deploy(v2, ENV, port, persist=PERSIST)
    assert second["ok"], (second, host.stderr)
    assert local_get(port) == (200, "written by the app")  # never overwritten by a seed
    assert os.listdir(data / "media") == []  # media existed (empty): the data wins over v2's
    with host.session(ENV) as call:
        back = call("rollback", env=ENV)
    assert back["ok"] and back["data"]["release"] == release, back
    assert local_get(port) == (200, "written by the app")  # a rollback keeps the env's data


def hostile(tmp_path: Path, name: str, members: list) -> Path:
    return raw_tar(tmp_path / f"{name}.tar", [(tarfile.TarInfo("wsgi.py"), b"app = None\n")] + members)


@pytest.mark.parametrize("paths, members, says", [
    (["../x"], [], "'../x': a path with '..'"),
    (["/etc"], [], "'/etc': an absolute path"),
    (["release.json"], [], "qabox's own (release.json)"),
    (["instance", "instance/db"], [], "'instance/db': inside 'instance'"),
    (["lnk/instance"], [(link("lnk", "."), None)], "lnk/instance goes through a link or a file in the build"),
    (["instance"], [(link("instance", "static"), None), (tarfile.TarInfo("static/x"), b"x")],
     "instance is a link in the build"),
])
def test_a_hostile_persist_path_is_refused_on_the_host_and_changes_nothing(host, tmp_path, paths, members, says):
    port = free_port()
    ok = host.deploy(build(tmp_path, "v1", {"instance/seed.txt": "seed"}), ENV, port)
    assert ok["ok"], (ok, host.stderr)
    outside = tmp_path / "outside"
    outside.mkdir()
    def tree() -> list:  # all but the uploaded builds (their manifests and blobs)
        return sorted(str(p.relative_to(host.home)) for p in host.home.rglob("*")
                      if not {"manifests", "blobs", "uploads"} & set(p.parts))

    before = tree()
    refused = host.deploy(hostile(tmp_path, "bad", members), ENV, port, persist=paths)
    assert not refused["ok"] and refused["error"]["code"] == "bad_build", refused
    assert says in refused["error"]["message"], refused
    assert tree() == before
    assert local_get(port) == (200, "v1") and list(outside.iterdir()) == []


def write_db(path: Path, value: str) -> None:
    with sqlite3.connect(str(path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
        db.execute("DELETE FROM t")
        db.execute("INSERT INTO t VALUES (?)", (value,))


def read_db(path: Path) -> str:
    with sqlite3.connect(str(path)) as db:
        return db.execute("SELECT v FROM t").fetchone()[0]


@pytest.fixture(params=[sys.executable, PY36], ids=["this-python", "3.6"])
def on_python(request, agent_cmd, tmp_path):
    """An empty host run by this python, then by 3.6 (whose sqlite3 has no backup API):
    yields (the host, the python version its builds are for, None for this one)."""
    if not os.path.exists(request.param):
        pytest.skip(f"no {request.param} on this machine")
    (tmp_path / "host").mkdir()
    local = Host(agent_cmd(request.param), tmp_path / "host")
    yield local, "3.6" if request.param == PY36 else None
    local.kill_all()


def test_rollback_with_data_restores_the_snapshot_taken_before_the_release_it_leaves(on_python, tmp_path):
    local, version = on_python
    port = free_port()
    data = data_dir(local)
    a = local.deploy(build(tmp_path, "va", {}, version), ENV, port, persist=PERSIST)
    assert a["ok"], (a, local.stderr)
    write_db(data / "db.sqlite3", "data of A")
    (data / "instance" / "notes").write_text("notes of A")
    b = local.deploy(build(tmp_path, "vb", {}, version), ENV, port, persist=PERSIST)
    assert b["ok"] and b["data"]["snapshot_skipped"] is None, (b, local.stderr)
    write_db(data / "db.sqlite3", "data of B")  # B migrates and writes
    (data / "instance" / "notes").write_text("notes of B")
    (data / "media" / "upload").write_text("B's upload")
    snap = Path(local.base) / "envs" / ENV / "snapshots" / b["data"]["release"] / "data"
    assert read_db(snap / "db.sqlite3") == "data of A"
    with local.session(ENV) as call:
        back = call("rollback", env=ENV, with_data=True)
        assert back["ok"] and back["data"]["release"] == a["data"]["release"], back
        assert back["data"]["data_from"] == b["data"]["release"]
        assert local_get(port) == (200, "va")
        assert read_db(data / "db.sqlite3") == "data of A"
        assert (data / "instance" / "notes").read_text() == "notes of A"
        assert os.listdir(data / "media") == []  # what B added is gone with B's data
        assert sorted(os.listdir(data)) == ["db.sqlite3", "instance", "media"]  # no restore left over
        forward = call("rollback", env=ENV, to=b["data"]["release"], with_data=True)
        assert not forward["ok"] and forward["error"]["code"] == "no_snapshot", forward


def test_a_snapshot_above_its_bound_is_skipped_with_a_warning_and_with_data_refused(host, tmp_path):
    port = free_port()
    data = data_dir(host)
    assert host.deploy(build(tmp_path, "va", {}), ENV, port)["ok"]
    (data / "instance" / "big").write_bytes(os.urandom(3 * 2**19))
    b = host.deploy(build(tmp_path, "vb", {}), ENV, port, snapshot_max_bytes=2**20)
    assert b["ok"], b
    assert re.search(r"data is 1\.[56] MB, more than snapshot_max_mb \(1\)", b["data"]["snapshot_skipped"]), b
    with host.session(ENV) as call:
        refused = call("rollback", env=ENV, with_data=True)
    assert not refused["ok"] and refused["error"]["code"] == "no_snapshot", refused
    assert "has no data snapshot" in refused["error"]["message"]
    assert local_get(port) == (200, "vb") and (data / "instance" / "big").stat().st_size == 3 * 2**19


def test_snapshots_are_kept_for_the_kept_releases_only(host, tmp_path):
    port = free_port()
    releases = []
    for n in range(3):
        done = host.deploy(build(tmp_path, f"v{n}", {}), ENV, port, keep=2)
        assert done["ok"], done
        releases.append(done["data"]["release"])
    assert [r["release"] for r in host.data("releases", env=ENV)["releases"]] == releases[1:]
    assert sorted(os.listdir(Path(host.base) / "envs" / ENV / "snapshots")) == releases[1:]


def fill_db(path: Path, megabytes: int) -> None:
    with sqlite3.connect(str(path)) as db:
        db.execute("CREATE TABLE blob (b BLOB)")
        db.executemany("INSERT INTO blob VALUES (?)", ((os.urandom(4096),) for _ in range(megabytes * 256)))


def test_a_50_mb_sqlite_database_is_snapshotted_whole_in_seconds(on_python, tmp_path):
    """The figure for the snapshot's cost: its seconds, as the deploy records them."""
    local, version = on_python
    port = free_port()
    assert local.deploy(build(tmp_path, "va", {}, version), ENV, port, persist=["db.sqlite3"])["ok"]
    fill_db(data_dir(local) / "db.sqlite3", 50)
    b = local.deploy(build(tmp_path, "vb", {}, version), ENV, port, persist=["db.sqlite3"])
    assert b["ok"] and b["data"]["snapshot_skipped"] is None, b
    top = Path(local.base) / "envs" / ENV / "snapshots" / b["data"]["release"]
    manifest = json.loads((top / "snapshot.json").read_text())
    with sqlite3.connect(str(top / "data" / "db.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM blob").fetchone()[0] == 50 * 256
    print(f"\nsnapshot of a {manifest['bytes'] / 2**20:.0f} MB SQLite database on python "
          f"{version or sys.version.split()[0]}: {manifest['seconds']:.2f} s")
    assert manifest["bytes"] > 50 * 2**20 and manifest["seconds"] < 30


def test_a_rollback_with_data_killed_at_any_moment_leaves_the_old_or_the_restored_data_whole(host, tmp_path):
    port = free_port()
    data = data_dir(host)
    persist = ["instance", "media", "db.sqlite3"]
    assert host.deploy(build(tmp_path, "va", {}), ENV, port, persist=persist)["ok"]

    def fill(which: str) -> dict:
        for n in range(300):
            (data / "instance" / f"f{n}").write_text(which)
        (data / "media" / "m").write_text(which)
        write_db(data / "db.sqlite3", which)
        return state()

    def state() -> dict:
        files = {str(p.relative_to(data)): p.read_text() for p in sorted(data.rglob("*"))
                 if p.is_file() and p.name != "db.sqlite3"}
        return {"files": files, "db": read_db(data / "db.sqlite3") if (data / "db.sqlite3").exists() else None}

    before_b = fill("A")
    assert host.deploy(build(tmp_path, "vb", {}), ENV, port, persist=persist)["ok"]
    kills, outcomes = 0, set()
    for delay in [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 0.8]:
        if host.data("releases", env=ENV)["current"] != sorted(os.listdir(data.parent / "releases"))[-1]:
            break  # the rollback went through: nothing left to cut short
        of_b = fill("B")
        proc = subprocess.Popen(host.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=host.environ)
        proc.stdin.write(host.request("session", env=ENV, timeout=10, by="tests") + "\n")
        proc.stdin.flush()
        assert '"locked": true' in proc.stdout.readline()
        proc.stdin.write(host.request("rollback", env=ENV, with_data=True) + "\n")
        proc.stdin.flush()
        time.sleep(delay)
        proc.kill()
        proc.wait()
        kills += 1
        with host.session(ENV):  # the next lock holder settles what the kill cut short
            now = state()
        assert now in (of_b, before_b), (delay, now)
        outcomes.add("restored" if now == before_b else "old")
        assert sorted(os.listdir(data)) == ["db.sqlite3", "instance", "media"]
    assert kills >= 2 and outcomes, outcomes


def test_a_snapshot_taken_while_the_app_writes_is_consistent(on_python, tmp_path):
    local, version = on_python
    port = free_port()
    db_path = data_dir(local) / "db.sqlite3"
    assert local.deploy(build(tmp_path, "va", {}, version), ENV, port, persist=["db.sqlite3"])["ok"]
    fill_db(db_path, 20)  # so that a snapshot takes a while
    with sqlite3.connect(str(db_path)) as db:
        db.execute("CREATE TABLE seq (n INTEGER, pad BLOB)")
    stop, written = threading.Event(), []

    def writer():  # many small transactions, each of two rows that belong together
        db = sqlite3.connect(str(db_path), timeout=60)
        while not stop.is_set():
            n = len(written)
            with db:
                db.execute("INSERT INTO seq VALUES (?, ?)", (2 * n, os.urandom(2048)))
                db.execute("INSERT INTO seq VALUES (?, ?)", (2 * n + 1, os.urandom(2048)))
            written.append(n)
        db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        b = local.deploy(build(tmp_path, "vb", {}, version), ENV, port, persist=["db.sqlite3"])
    finally:
        stop.set()
        thread.join()
    assert b["ok"], b
    snap = Path(local.base) / "envs" / ENV / "snapshots" / b["data"]["release"] / "data" / "db.sqlite3"
    with sqlite3.connect(str(snap)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = [n for (n,) in db.execute("SELECT n FROM seq ORDER BY n")]
    assert rows == list(range(len(rows))) and len(rows) % 2 == 0 and 0 < len(rows) < 2 * len(written), \
        (len(rows), len(written))


# The agent's own snapshot copy, run from its archive by a python with no sqlite3 module (as one
# built without it): argv is the archive, the database, the copy.
NO_SQLITE = ("import sys\nsys.modules['sqlite3'] = None\nsys.path.insert(0, sys.argv[1])\n"
             "from qabox_agent.persist import copy_data\ncopy_data(sys.argv[2], sys.argv[3])\n")


@pytest.mark.parametrize("python", [sys.executable, PY36], ids=["this-python", "3.6"])
def test_a_host_python_without_sqlite3_copies_the_database_and_its_wal(agent_cmd, tmp_path, python):
    if not os.path.exists(python):
        pytest.skip(f"no {python} on this machine")
    db_path = tmp_path / "db.sqlite3"
    write_db(db_path, "kept")
    keep_open = sqlite3.connect(str(db_path))
    keep_open.execute("PRAGMA journal_mode=WAL")
    with keep_open:
        keep_open.execute("UPDATE t SET v = 'in the WAL'")  # committed, not yet checkpointed
    try:
        copied = tmp_path / "copy" / "db.sqlite3"
        run = subprocess.run([python, "-I", "-c", NO_SQLITE, agent_cmd()[-1], str(db_path), str(copied)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert os.path.exists(str(copied) + "-wal") and read_db(copied) == "in the WAL"
    finally:
        keep_open.close()
