"""Deltas on a host in a directory: only what the host lacks is sent, a cut
upload resumes, a pruned base is sent again, a damaged blob is never served,
a hostile manifest is refused, and an agent killed midway leaves nothing half-done."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import build_manifest, delta_of, free_port, local_get, wait_until, wsgi_build
from qabox.agent import manifest

pytestmark = pytest.mark.network  # the app server's wheels, downloaded once into .cache/wheels
ENV = "main"
BIG = "x" * 300_000


def build(tmp_path, name: str, version: str = "v1", **files) -> Path:
    return wsgi_build(tmp_path / f"{name}.tar.gz", version, files={"static/big.txt": BIG, **files})


def test_a_one_file_change_sends_only_that_file(host, tmp_path):
    port = free_port()
    assert host.deploy(build(tmp_path, "a"), ENV, port)["ok"]
    changed = build(tmp_path, "b", note="one changed file\n")
    with host.session(ENV) as call:
        state, args = host.upload(call, changed, ENV, port)
        assert state["data"]["blobs"] == 1 and state["data"]["size"] == len("one changed file\n"), state
        assert state["data"]["python"] == call("python-info")["data"], state  # qabox checks the build by it
        result = call("deploy", **args)
    assert result["ok"] and result["changed"], result
    assert local_get(port) == (200, "v1")
    again = host.deploy(changed, ENV, port)
    assert again["ok"] and again["data"]["unchanged"], again  # one answer, nothing sent
    assert "python" not in again["data"]  # nothing to check: not looked up


def test_a_cut_delta_upload_resumes_with_the_rest(host, tmp_path):
    port = free_port()
    assert host.deploy(wsgi_build(tmp_path / "a.tar.gz"), ENV, port)["ok"]
    new = build(tmp_path, "b", "v2")
    listed, _ = build_manifest(new)
    with host.session(ENV) as call:
        state, args = host.upload(call, new, ENV, port, sent=b"")
        hashes, half = state["data"]["hashes"], state["data"]["size"] // 2
        Path(state["data"]["part_path"]).write_bytes(delta_of(new, listed, hashes)[:half])
    with host.session(ENV) as call:  # a new connection, as after a cut link
        again = call("upload-state", **args)["data"]
        assert (again["delta"], again["part"]) == (state["data"]["delta"], half), again
        with open(again["part_path"], "ab") as f:
            f.write(delta_of(new, listed, hashes, offset=half))
        result = call("deploy", **args)
    assert result["ok"] and local_get(port) == (200, "v2"), result
    assert os.listdir(Path(host.base, "uploads")) == []


def age(host, days: int = 1) -> None:
    """Make every manifest and blob older than the store's grace."""
    past = time.time() - days * 86400
    for sub in ("manifests", "blobs"):
        for name in os.listdir(Path(host.base, sub)):
            os.utime(Path(host.base, sub, name), (past, past))


def test_a_delta_whose_base_release_was_pruned_sends_what_it_lacks(host, tmp_path):
    port = free_port()
    first = build(tmp_path, "a", big_v1=BIG.replace("x", "1"))
    assert host.deploy(first, ENV, port, keep=1)["ok"]
    age(host)
    assert host.deploy(build(tmp_path, "b", "v2"), ENV, port, keep=1)["ok"]
    gone = Path(host.base, "blobs", next(item[5] for item in build_manifest(first)[0]["members"]
                                         if item[0].endswith("big_v1")))
    assert not gone.exists()  # the first release was pruned, and the blobs only it used
    based = build(tmp_path, "c", "v3", big_v1=BIG.replace("x", "1"))  # the first build, one file changed
    with host.session(ENV) as call:
        state, args = host.upload(call, based, ENV, port)
        assert gone.name in state["data"]["hashes"], state
        result = call("deploy", **args)
    assert result["ok"] and local_get(port) == (200, "v3"), result


@pytest.mark.parametrize("hide", [False, True])
def test_a_damaged_blob_is_refused_never_served_and_sent_again(host, tmp_path, hide):
    """Every deploy that found it sound remembers its file's signature (inode, size, mtime, ctime)
    and skips hashing it only while that holds: a write, even one that puts the mtime back, shows."""
    port = free_port()
    assert host.deploy(build(tmp_path, "a"), ENV, port)["ok"]
    served = local_get(port, "/release")
    sha = next(item[5] for item in build_manifest(tmp_path / "a.tar.gz")[0]["members"]
               if item[0].endswith("static/big.txt"))
    blob = Path(host.base, "blobs", sha)
    assert sha in json.loads(Path(host.base, "verified.json").read_text())
    was = blob.stat()
    blob.write_text("y" + BIG[1:])  # same size, another content
    if hide:
        os.utime(blob, ns=(was.st_atime_ns, was.st_mtime_ns))
    changed = build(tmp_path, "b", "v2")
    refused = host.deploy(changed, ENV, port)
    assert not refused["ok"] and refused["error"]["code"] == "checksum", refused
    assert "was damaged on the host and was removed: deploy again" in refused["error"]["message"]
    assert local_get(port, "/release") == served and not blob.exists()
    assert [n for n in os.listdir(Path(host.base, "envs", ENV, "releases")) if n.startswith(".")] == []
    with host.session(ENV) as call:
        state, args = host.upload(call, changed, ENV, port)
        assert sha in state["data"]["hashes"], state  # sent again
        assert call("deploy", **args)["ok"]
    assert local_get(port) == (200, "v2") and blob.read_text() == BIG


def hostile(listed: dict, **change) -> dict:
    out = json.loads(json.dumps(listed))
    for index, fields in change.items():
        out["members"][int(index[1:])] = fields
    return out


@pytest.mark.parametrize("kind, says", [
    ("not canonical", "not a version 1 manifest in canonical form"),
    ("another id", "does not match its sha256"),
    ("a wrong field", "has a field of the wrong type"),
    ("a file without its hash", "has no content sha256"),
    ("'..'", "path with '..'"),
    ("an absolute name", "absolute path"),
    ("a device", "device or fifo"),
    ("a hardlink outside", "hardlink to ../../x, which is not a file"),
    ("a link chain", "written through the link a made by an earlier member"),
    ("too many members", "more than 3 members"),
    ("too big", "exceeds the limit of 1 MB"),
])
def test_a_hostile_manifest_is_refused_by_the_host_and_changes_nothing(host, tmp_path, kind, says):
    port = free_port()
    assert host.deploy(wsgi_build(tmp_path / "a.tar.gz"), ENV, port)["ok"]
    before = sorted(os.listdir(Path(host.base, "manifests"))), sorted(os.listdir(Path(host.base, "blobs")))
    sha = "0" * 64
    listed = {"version": 1, "members": [["wsgi.py", "0", 0o644, 0, 10, sha, ""]]}
    raw, limits = None, {}
    if kind == "not canonical":
        raw = json.dumps(listed).encode()
    elif kind == "a wrong field":
        listed = hostile(listed, m0=["wsgi.py", "0", "644", 0, 10, sha, ""])
    elif kind == "a file without its hash":
        listed = hostile(listed, m0=["wsgi.py", "0", 0o644, 0, 10, "", ""])
    elif kind == "'..'":
        listed = hostile(listed, m0=["../wsgi.py", "0", 0o644, 0, 10, sha, ""])
    elif kind == "an absolute name":
        listed = hostile(listed, m0=["/wsgi.py", "0", 0o644, 0, 10, sha, ""])
    elif kind == "a device":
        listed = hostile(listed, m0=["dev", "3", 0o644, 0, 0, "", ""])
    elif kind == "a hardlink outside":
        listed = hostile(listed, m0=["h", "1", 0o644, 0, 0, "", "../../x"])
    elif kind == "a link chain":
        listed["members"] = [["a", "2", 0o777, 0, 0, "", ".."], ["a/f", "0", 0o644, 0, 1, sha, ""]]
    elif kind == "too many members":
        listed["members"] = [["f%d" % i, "0", 0o644, 0, 1, sha, ""] for i in range(4)]
        limits = {"max_members": 3}
    elif kind == "too big":
        listed = hostile(listed, m0=["wsgi.py", "0", 0o644, 0, 2**21, sha, ""])
        limits = {"max_bytes": 2**20}
    raw = raw or manifest.canonical(listed)
    mid = "1" * 64 if kind == "another id" else manifest.hashlib.sha256(raw).hexdigest()
    with host.session(ENV) as call:
        asked = call("upload-state", env=ENV, manifest=mid, port=port)
        Path(asked["data"]["manifest_path"]).write_bytes(raw)
        refused = call("upload-state", env=ENV, manifest=mid, port=port, uploaded=True, **limits)
        assert not refused["ok"] and says in refused["error"]["message"], refused
        assert "\n" not in refused["error"]["message"]
        # deploy itself never takes a manifest the host did not store
        assert call("deploy", env=ENV, manifest=mid, port=port, entry="wsgi:app")["error"]["code"] == "no_build"
    after = sorted(os.listdir(Path(host.base, "manifests"))), sorted(os.listdir(Path(host.base, "blobs")))
    assert after == before and os.listdir(Path(host.base, "uploads")) == []


@pytest.mark.parametrize("moment", ["taking in the delta", "assembling"])
def test_an_agent_killed_midway_leaves_nothing_half_done(host, tmp_path, moment):
    port = free_port()
    assert host.deploy(wsgi_build(tmp_path / "a.tar.gz"), ENV, port)["ok"]
    served = local_get(port, "/release")
    many = {f"static/{i}.txt": f"{i}" * 2000 for i in range(3000)}
    new = wsgi_build(tmp_path / "b.tar.gz", "v2", files=many)
    releases = Path(host.base, "envs", ENV, "releases")
    agent, state = host.start_deploy(new, ENV, port)
    part = Path(state["data"]["part_path"])
    if moment == "taking in the delta":
        started = wait_until(lambda: part.exists() and part.stat().st_size < state["data"]["size"], 30, 0.001)
    else:
        started = wait_until(lambda: any(releases.glob(".*.tmp/static/*")), 30, 0.01)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    assert started, f"the agent was not caught {moment}"
    assert local_get(port, "/release") == served
    blobs = Path(host.base, "blobs")
    assert all(len(name) == 64 or name.endswith(".tmp") for name in os.listdir(blobs))
    for name in os.listdir(blobs):  # a blob under its own name is whole
        if len(name) == 64:
            assert manifest.hashlib.sha256((blobs / name).read_bytes()).hexdigest() == name
    result = host.deploy(new, ENV, port)  # the next deploy sends what is missing and cleans up
    assert result["ok"], result
    assert local_get(port) == (200, "v2")
    assert [n for n in os.listdir(releases) if n.startswith(".")] == []


def test_a_manifest_lying_about_the_size_of_a_blob_the_host_has_is_refused(host, tmp_path):
    """Sizes are what the member limits count: a known blob cannot be claimed small."""
    port = free_port()
    first = wsgi_build(tmp_path / "a.tar.gz")
    assert host.deploy(first, ENV, port)["ok"]
    served = local_get(port, "/release")
    listed, _ = build_manifest(first)
    for item in listed["members"]:
        if item[0].endswith("wsgi.py"):
            item[4] = 1
    raw = manifest.canonical(listed)
    mid = manifest.identity(listed)
    with host.session(ENV) as call:
        asked = call("upload-state", env=ENV, manifest=mid, port=port)
        Path(asked["data"]["manifest_path"]).write_bytes(raw)
        assert call("upload-state", env=ENV, manifest=mid, port=port, uploaded=True)["data"]["blobs"] == 0
        refused = call("deploy", env=ENV, manifest=mid, port=port, entry="wsgi:app")
    assert not refused["ok"] and "wsgi.py: the manifest says 1 bytes" in refused["error"]["message"], refused
    assert local_get(port, "/release") == served and local_get(port) == (200, "v1")


def test_a_blob_another_env_took_in_meanwhile_leaves_the_delta_whole(host, tmp_path):
    """Blobs are shared: env b may take in a blob of env a's delta between a's upload and its deploy."""
    shared = build(tmp_path, "s", "v2", shared=BIG.replace("x", "s"))
    port, other = free_port(), free_port()
    with host.session("a") as call:
        state, args = host.upload(call, shared, "a", port)
        assert state["data"]["blobs"] >= 2, state
        assert host.deploy(shared, "b", other)["ok"]  # b takes in every blob of a's delta
        result = call("deploy", **args)
    assert result["ok"], result
    assert local_get(port) == (200, "v2") and local_get(other) == (200, "v2")


@pytest.mark.parametrize("garbage", ["not json", "[1, 2]", '{"x": [1, 2, 3, 4]}', "SHA"])
def test_garbage_in_the_record_of_sound_blobs_only_costs_hashing_them_again(host, tmp_path, garbage):
    port = free_port()
    assert host.deploy(build(tmp_path, "a"), ENV, port)["ok"]
    record = Path(host.base, "verified.json")
    sha = next(iter(json.loads(record.read_text())))
    record.write_text(garbage.replace("SHA", json.dumps({sha: ["1", None, 3, 4]})))
    assert host.deploy(build(tmp_path, "b", "v2"), ENV, port)["ok"]
    assert local_get(port) == (200, "v2") and sha in json.loads(record.read_text())
