"""Tests for qabox.pack (build tarballs) and the examples/notes app.

Fast and offline, except the test marked `network`: it runs scripts/example-build,
which downloads Flask's wheels into <repo>/.cache/wheels the first time and
reuses them afterwards (deselect with -m "not network").
"""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qabox.pack import FIXED_MTIME, PackError, download_wheels, pack

REPO = Path(__file__).resolve().parent.parent
NOTES_DIR = REPO / "examples" / "notes"


# --- pack -------------------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A small app tree with the awkward cases: exec bits, odd modes, junk to skip."""
    src = tmp_path / "app"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "app.py").write_text("print('hi')\n")
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "sub" / "data.txt").write_text("data\n")
    (src / "pkg" / "sub" / "data.txt").chmod(0o600)
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o775)
    (src / "empty").mkdir()
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0junk")
    (src / "pkg" / "__pycache__").mkdir()
    (src / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0junk")
    (src / "stray.pyc").write_bytes(b"\0junk")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return src


@pytest.fixture
def wheels(tmp_path: Path) -> list[Path]:
    d = tmp_path / "dl"
    d.mkdir()
    paths = [d / "zeta-1.0-py3-none-any.whl", d / "alpha-2.0-py3-none-any.whl"]
    for p in paths:
        p.write_bytes(b"PK fake wheel " + p.name.encode())
    return paths


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def read_member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"])
def test_pack_is_byte_identical_across_runs(app_dir, wheels, tmp_path, suffix):
    first = pack(app_dir, tmp_path / "one" / f"build{suffix}", wheels, {"BUILD": b"x"})
    # Touch everything and write under another name: neither may leak into the bytes
    # (gzip would otherwise record both the time and the file name).
    for p in app_dir.rglob("*"):
        os.utime(p, (1_000_000_000, 1_000_000_000))
    second = pack(app_dir, tmp_path / "two" / f"other-name{suffix}", wheels, {"BUILD": b"x"})
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_size > 0


def test_members_sorted_relative_and_junk_skipped(app_dir, wheels, tmp_path):
    out = pack(app_dir, tmp_path / "b.tar.gz", wheels)
    names = [m.name for m in members(out)]
    assert names == sorted(names)
    assert names == [
        "app.py",
        "empty",
        "pkg",
        "pkg/__init__.py",
        "pkg/sub",
        "pkg/sub/data.txt",
        "run.sh",
        "wheels",
        "wheels/alpha-2.0-py3-none-any.whl",
        "wheels/zeta-1.0-py3-none-any.whl",
    ]
    assert not any(n.startswith(("./", "/")) for n in names)
    assert read_member(out, "wheels/zeta-1.0-py3-none-any.whl") == wheels[0].read_bytes()
    assert read_member(out, "run.sh") == (app_dir / "run.sh").read_bytes()


def test_metadata_is_normalised(app_dir, tmp_path):
    out = pack(app_dir, tmp_path / "b.tar", extra={"static/assets.bin": b"\x01" * 10})
    by_name = {m.name: m for m in members(out)}
    for m in by_name.values():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (FIXED_MTIME, 0, 0, "", "")
        assert m.isdir() or m.isfile()
    assert by_name["app.py"].mode == 0o644
    assert by_name["pkg/sub/data.txt"].mode == 0o644  # was 0600
    assert by_name["run.sh"].mode == 0o755  # was 0775
    assert by_name["static/assets.bin"].mode == 0o644
    assert by_name["pkg"].isdir() and by_name["pkg"].mode == 0o755
    assert by_name["static"].isdir() and by_name["static"].mode == 0o755


def test_gzip_header_has_fixed_mtime_and_no_name(app_dir, tmp_path):
    raw = pack(app_dir, tmp_path / "b.tar.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert int.from_bytes(raw[4:8], "little") == FIXED_MTIME
    assert raw[3] & 0x08 == 0  # FNAME flag unset: the output path is not recorded


def test_extra_entries_and_their_errors(app_dir, tmp_path):
    out = pack(app_dir, tmp_path / "b.tar", extra={"./static/a.bin": b"abc", "pkg/gen.txt": b"g"})
    assert read_member(out, "static/a.bin") == b"abc"
    assert read_member(out, "pkg/gen.txt") == b"g"
    for bad in ("/etc/passwd", "../up", "a/../../b", ""):
        with pytest.raises(PackError):
            pack(app_dir, tmp_path / "bad.tar", extra={bad: b""})
    with pytest.raises(PackError, match="duplicate"):
        pack(app_dir, tmp_path / "bad.tar", extra={"app.py": b"shadow"})
    with pytest.raises(PackError, match="both a file and a directory"):
        pack(app_dir, tmp_path / "bad.tar", extra={"app.py/x": b""})
    assert not (tmp_path / "bad.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_unknown_suffix_and_missing_src(app_dir, tmp_path):
    with pytest.raises(PackError, match="unknown archive type"):
        pack(app_dir, tmp_path / "b.zip")
    with pytest.raises(PackError, match="not a directory"):
        pack(tmp_path / "nope", tmp_path / "b.tar")


def test_output_inside_src_is_not_packed_into_itself(app_dir):
    out = app_dir / "build.tar"
    pack(app_dir, out)
    pack(app_dir, out)  # second run sees the first tarball in src
    assert "build.tar" not in [m.name for m in members(out)]


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..") and not s.endswith(".pyc")
)


@settings(max_examples=40, deadline=None)
@given(extra=st.dictionaries(st.lists(_segment, min_size=1, max_size=3).map("/".join), st.binary(max_size=300), max_size=6))
def test_extra_round_trips(tmp_path_factory, extra):
    # A name can't be both a file and another entry's parent directory.
    names = sorted(extra)
    if any(b.startswith(a + "/") for a in names for b in names):
        return
    base = tmp_path_factory.mktemp("rt")
    (base / "src").mkdir()
    buf = pack(base / "src", base / "out.tar.xz", extra=extra).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(buf)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert files == extra


# --- download_wheels --------------------------------------------------------


def test_download_wheels_reports_pip_errors(tmp_path):
    # An unparsable requirement makes pip fail before any network access.
    req = tmp_path / "requirements.txt"
    req.write_text("this is === not a requirement\n")
    with pytest.raises(PackError, match=r"pip download failed[\s\S]*(?i:invalid requirement)"):
        download_wheels(req, tmp_path / "dl")


@pytest.mark.network
def test_example_build_is_reproducible_and_cached(tmp_path):
    """The README demo build: second run reuses .cache/wheels (no pip) and gives the same bytes."""
    script = REPO / "scripts" / "example-build"
    outs = []
    for i in range(2):
        out = tmp_path / f"notes{i}.tar.gz"
        proc = subprocess.run(
            [sys.executable, str(script), "-o", str(out), "--assets-mb", "1"],
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{out} ") and proc.stdout.count("\n") == 1
        if i == 1:
            assert "downloading" not in proc.stderr  # served from the cache
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    names = [m.name for m in members(outs[0])]
    assert {"notes.py", "qabox.toml", "requirements.txt", "static/assets.bin"} <= set(names)
    assert any(n.startswith("wheels/flask-") and n.endswith(".whl") for n in names)


# --- examples/notes ---------------------------------------------------------


def load_notes_app():
    """Import examples/notes/notes.py afresh (as a new process would) and return its app."""
    name = f"notes_under_test_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, NOTES_DIR / "notes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.app.config["TESTING"] = True
    return module.app


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("QABOX_DATA_DIR", str(d))
    return d


@pytest.fixture
def client(data_dir):
    return load_notes_app().test_client()


def test_notes_health_and_release(client, monkeypatch):
    r = client.get("/health")
    assert (r.status_code, r.text) == (200, "ok")
    monkeypatch.delenv("QABOX_RELEASE", raising=False)
    assert client.get("/release").text == "unknown"
    monkeypatch.setenv("QABOX_RELEASE", "r42")
    assert client.get("/release").text == "r42"


def test_notes_post_and_persist(client, data_dir):
    assert client.get("/notes.json").get_json() == []
    r = client.post("/notes", data={"text": "from a form"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/")
    r = client.post("/notes", json={"text": "<b>from json</b>"})
    assert r.status_code == 201 and r.get_json()["id"] == 2

    texts = [n["text"] for n in client.get("/notes.json").get_json()]
    assert texts == ["from a form", "<b>from json</b>"]
    assert (data_dir / "notes.json").is_file()
    assert [p.name for p in data_dir.iterdir()] == ["notes.json"]  # no temp files left

    page = client.get("/").text
    assert "from a form" in page and "&lt;b&gt;from json&lt;/b&gt;" in page

    # A fresh process (new import) sees the same notes.
    again = load_notes_app().test_client()
    assert [n["text"] for n in again.get("/notes.json").get_json()] == texts


@pytest.mark.parametrize("body", [{"data": {"text": "  "}}, {"data": {}}, {"json": {"text": 3}}, {"json": ["x"]}])
def test_notes_rejects_missing_text(client, body):
    assert client.post("/notes", **body).status_code == 400
    assert client.get("/notes.json").get_json() == []


def test_notes_slow_and_big(client):
    r = client.get("/slow?s=0")
    assert (r.status_code, r.text) == (200, "slept")
    r = client.get("/big?mb=1")
    assert r.status_code == 200 and len(r.data) == 1024 * 1024
    assert r.headers["Content-Length"] == str(1024 * 1024)
    r = client.get("/big?mb=1000")  # capped at 64 MiB; check the header, don't read it all
    assert r.headers["Content-Length"] == str(64 * 1024 * 1024)
    r.close()


def test_notes_concurrent_posts_are_not_lost(client):
    from concurrent.futures import ThreadPoolExecutor

    def post(i):
        return client.post("/notes", json={"text": f"n{i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(post, range(40))) == {201}
    notes = client.get("/notes.json").get_json()
    assert sorted(n["text"] for n in notes) == sorted(f"n{i}" for i in range(40))
    assert sorted(n["id"] for n in notes) == list(range(1, 41))
