"""A build is checked and extracted as the tree its members make, in order:
no member lands outside its release, whatever links earlier members made.
Builds reach the host as qabox sends them (a manifest, then a delta of blobs),
made from any tar, hostile ones too, by qabox's own code, and the host's
checks and assembly do the rest.

The oracle of the property tests is the filesystem: builds are extracted in a
deep sandbox, and nothing outside the release may change.
"""

from __future__ import annotations

import glob
import os
import stat
import subprocess
import tarfile
import tempfile
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

from conftest import build_manifest, delta_of, raw_tar
from qabox import build_check
from qabox.agent import builds as extraction, manifest, rules
from qabox.agent.protocol import Fail
from qabox.agent_zip import AGENT_PYZ
from qabox.errors import BuildError

KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}
# a/b -> .., then a/b/c -> ../.. (from the release: a/b/c is c, two levels up), then a file through both
CHAIN = [("link", "a/b", ".."), ("link", "a/b/c", "../.."), ("file", "a/b/c/f", "")]
# Deeper: a/b/c/d lands in the env's directory, pointing three more levels up: the home directory,
# since a release is extracted 5 levels below it (~/.qabox/envs/ENV/releases/.ID.tmp).
TO_HOME = [("file", "wsgi.py", ""), ("link", "a/b", ".."), ("link", "a/b/c", "../.."),
           ("link", "a/b/c/d", "../../.."), ("file", "a/b/c/d/.ssh/authorized_keys", ""),
           ("link", "e", "c/d")]  # e is home too: the old chmod walk followed it


def infos(specs) -> list:
    """(TarInfo, data) pairs from ``(kind, name, target)`` specs; a file holds its own name."""
    out = []
    for kind, name, target in specs:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = KINDS[kind], target, 0o755 if kind == "dir" else 0o644
        out.append((info, name.encode() if kind == "file" else None))
    return out


def tar_of(path, specs) -> str:
    return str(raw_tar(path, infos(specs)))


@contextmanager
def sent(tar_path, checked: bool = True, max_bytes: int = 2**30, **limits):
    """A host's store holding a tar as qabox sends it (manifest, then delta): the
    store and the members, as the host checks them (``checked``) or not."""
    base = tempfile.mkdtemp()
    try:
        listed, mid = build_manifest(Path(tar_path))
        store = extraction.Store(base, "e")
        Path(store.upload("manifest-" + mid)).write_bytes(manifest.canonical(listed))
        if checked:
            members = store.members(mid, max_bytes, uploaded=True, **limits)
        else:
            members = manifest.parse(manifest.canonical(listed), mid, 10**9)
        delta = store.delta(members)
        Path(delta["part_path"]).write_bytes(delta_of(Path(tar_path), listed, delta["hashes"]))
        store.take_delta(members)
        yield store, members
    finally:
        shutil.rmtree(base)


def extract(tar_path, dest: str, max_bytes: int) -> None:
    """What the host does with a build from its manifest on: check it, take in the delta, assemble."""
    with sent(tar_path, max_bytes=max_bytes) as (store, members):
        extraction.assemble(store, members, dest)


def extract_unchecked(tar_path: str, dest: str) -> list:
    """Every member through builds.write_member, skipping the check: the errors it raised."""
    os.mkdir(dest, 0o700)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    errors = []
    try:
        with sent(tar_path, checked=False) as (store, members):
            for member in members:
                try:
                    extraction.write_member(member, root, store.copy_blob)
                except OSError as e:
                    errors.append((member.name, e))
    finally:
        os.close(root)
    return errors


def extract_naively(tar_path: str, dest: str) -> None:
    """What qabox did on pythons without tarfile's data filter (Debian 12's 3.11.2): follow every link."""
    os.mkdir(dest, 0o700)
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, **trusted)


def snapshot(top: str, skip: str) -> dict:
    """Everything under ``top`` except the tree at ``skip``: kinds, modes, contents, link targets."""
    seen = {top: os.lstat(top).st_mode}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            if path == skip:
                dirs.remove(name)
                continue
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                seen[path] = ("link", os.readlink(path))
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    seen[path] = (st_.st_mode, f.read())
            else:
                seen[path] = st_.st_mode
    return seen


def listing(top: str) -> dict:
    """The tree under ``top`` as kinds, contents and link targets (no modes)."""
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, top)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir",)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def inside(path: str, release: str) -> bool:
    real = os.path.realpath(path)
    return real == release or real.startswith(release + "/")


# Links in generated builds climb at most 2 levels per hop, and a lookup follows at most 40 links:
# a release this deep in the sandbox keeps even a naive extraction of a hostile build inside it.
DEPTH = 100


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A deep sandbox (made once: mkdir is slow here), with files beside the release to be overwritten."""
    top = os.path.realpath(tmp_path_factory.mktemp("box"))
    deep = os.path.join(top, *["d"] * DEPTH)
    os.makedirs(deep)
    for name in ("a", "c"):  # names the generated members use too
        with open(os.path.join(deep, name), "w") as f:
            f.write("untouched\n")
    return top, os.path.join(deep, "release")


@contextmanager
def sandbox(box):
    """The box for one example: its releases removed after (a failed example stops the test anyway)."""
    top, release = box
    try:
        yield top, release
    finally:
        for path in (release, release + "2"):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- the finding, concretely


def test_the_chain_is_refused_by_the_client_and_the_host(tmp_path, box):
    path = tar_of(tmp_path / "chain.tar", [("file", "wsgi.py", "")] + CHAIN)
    with pytest.raises(BuildError) as e:
        build_check.inspect(tmp_path / "chain.tar")
    assert "a/b/c: written through the link a/b" in e.value.message
    assert "a/b/c/f: written through the link a/b" in e.value.message
    with sandbox(box) as (top, release):
        before = snapshot(top, release)
        with pytest.raises(Fail, match="unsafe members: a/b/c: written through the link a/b"):
            extract(path, release, 2**30)
        assert snapshot(top, release) == before


@pytest.fixture
def home(tmp_path):
    """A home directory with an authorized_keys, and where a release is extracted below it."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA owner\n")
    (home / ".qabox" / "envs" / "e" / "releases").mkdir(parents=True)
    home.chmod(0o755)
    return home


def test_a_chain_to_home_is_what_the_old_extraction_followed(home, tmp_path):
    """The test's own premise: this build, extracted as before, replaces authorized_keys."""
    extract_naively(tar_of(tmp_path / "home.tar", TO_HOME), str(home / ".qabox/envs/e/releases/.r.tmp"))
    assert (home / ".ssh" / "authorized_keys").read_text() == "a/b/c/d/.ssh/authorized_keys"


def test_a_chain_to_home_changes_nothing_outside_the_release(home, tmp_path):
    path = tar_of(tmp_path / "home.tar", TO_HOME)
    releases = str(home / ".qabox/envs/e/releases")
    before = snapshot(str(home), releases)
    problems = rules.check_members(tarfile.open(path).getmembers())
    assert [p.split(":")[0] for p in problems] == ["a/b/c", "a/b/c/d", "a/b/c/d/.ssh/authorized_keys"]
    with pytest.raises(Fail, match="unsafe members"):
        extract(path, releases + "/.r.tmp", 2**30)
    # the extractor alone, given the same members unchecked, writes nothing through a link either
    errors = extract_unchecked(path, releases + "/.u.tmp")
    assert [name for name, _ in errors] == ["a/b/c", "a/b/c/d", "a/b/c/d/.ssh/authorized_keys"]
    assert snapshot(str(home), releases) == before  # authorized_keys, and home's mode 0755 included
    assert stat.S_IMODE(home.stat().st_mode) == 0o755


def test_modes_are_the_accounts_only_and_set_without_following_links(tmp_path):
    specs = [("dir", "static", ""), ("file", "static/app.js", ""), ("file", "run.sh", ""),
             ("link", "static/current", "app.js"), ("hard", "again.sh", "run.sh"),
             ("link", "up", "static"), ("dir", "static", "")]
    members = infos(specs)
    members[2][0].mode = members[4][0].mode = 0o4755  # setuid (a hardlink has its file's mode): user bits kept
    members[0][0].mode = 0o777
    members[1][0].mtime = 1_000_000_000
    path = str(raw_tar(tmp_path / "good.tar", members))
    dest = tmp_path / "release"
    extract(path, str(dest), 2**30)
    modes = {p: stat.S_IMODE(os.lstat(dest / p).st_mode) for p in ("", "static", "static/app.js", "run.sh")}
    assert modes == {"": 0o700, "static": 0o700, "static/app.js": 0o600, "run.sh": 0o700}
    assert os.readlink(dest / "static/current") == "app.js" and os.readlink(dest / "up") == "static"
    assert os.stat(dest / "again.sh").st_ino == os.stat(dest / "run.sh").st_ino
    assert os.stat(dest / "static/app.js").st_mtime == 1_000_000_000


# ---------------------------------------------------------------- the rules, one by one


def problems_of(specs, **limits) -> dict:
    found = rules.check_members([info for info, _ in infos(specs)], **limits)
    return dict(p.split(": ", 1) for p in found)


@pytest.mark.parametrize("specs, name, reason", [
    ([("file", "f", ""), ("link", "l", "f"), ("hard", "h", "l")], "h", "hardlink to l, which is not a file"),
    ([("dir", "d", ""), ("hard", "h", "d")], "h", "hardlink to d, which is not a file"),
    ([("hard", "h", "f"), ("file", "f", "")], "h", "hardlink to f, which is not a file earlier"),
    ([("hard", "h", "../outside")], "h", "hardlink to ../outside, which is not a file"),
    ([("file", "a/f", ""), ("link", "a", ".")], "a", "an earlier member has the same path"),
    ([("file", "f", ""), ("file", "f", "")], "f", "an earlier member has the same path"),
    ([("link", "l", "."), ("link", "l", "..")], "l", "an earlier member has the same path"),
    ([("file", "f", ""), ("file", "f/g", "")], "f/g", "inside f, which is a file of the build"),
    ([("link", "l", "x/y"), ("link", "x", "..")], "l", "link to x/y leads outside the build"),
    ([("link", "a", "b"), ("link", "b", "c/.."), ("link", "c", "..")], "a", "link to b leads outside"),
    ([("link", "a", "b"), ("link", "b", "a")], "a", "goes through more than 40 links"),
    ([("link", "d/l", "../../etc")], "d/l", "link to ../../etc leads outside the build"),
    ([("dir", "release.json", "")], "release.json", "qabox writes each release's own release.json"),
    ([("file", "a/" + "x" * 256, "")], "a/" + "x" * 256, "path a name in it is longer than 255"),
    ([("link", "l", "a/" * 1600)], "l", "link target longer than 3072 bytes"),
])
def test_refused(specs, name, reason):
    found = problems_of(specs)
    assert reason in found.get(rules.shown(name), ""), found


@pytest.mark.parametrize("specs", [
    [("dir", "d", ""), ("file", "d/f", ""), ("dir", "d", ""), ("dir", ".", "")],  # a directory named again
    [("file", "f", ""), ("hard", "h", "f"), ("hard", "h2", "h")],  # a hardlink to a hardlink is a file
    [("link", "a", "b"), ("link", "b", "c/d/.."), ("dir", "c/d", "")],  # links to links, inside
    [("link", "d/up", ".."), ("link", "d/l", "up/d/up/d/f"), ("file", "d/f", "")],  # through a link to the root
    [("link", "dangling", "not/there"), ("file", "a/f", ""), ("link", "a/g", "../a/f")],
])
def test_accepted(specs):
    assert problems_of(specs) == {}


def test_member_count_and_headers_are_capped(tmp_path):
    many = [("file", "f%d" % i, "") for i in range(1001)]
    assert problems_of(many[:1000], max_members=1000) == {}
    assert any("more than 1000 members" in p for p in rules.check_members(
        [i for i, _ in infos(many)], max_members=1000))
    # empty members are not free: 4,500 headers of 512 bytes exceed 2 MB
    assert any("exceeds the limit of 2 MB" in p for p in rules.check_members(
        [i for i, _ in infos(many * 5)[:4500]], max_bytes=2 * 2**20))
    # and a tar of many members is read only one past the limit
    path = tar_of(tmp_path / "many.tar", many * 3)
    with tarfile.open(path, "r|") as tar:
        assert len(manifest.scan(tar, 1000)[0]) == 1001


def test_an_extraction_failure_names_the_member_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(extraction, "check_members", lambda *a: [])  # as if the check had missed it
    for specs, bad, why in (
        (CHAIN, "a/b/c", "Not a directory"),
        ([("file", "x" * 300, "")], "x" * 300, "File name too long"),
    ):
        with pytest.raises(Fail) as e:
            extract(tar_of(tmp_path / "x.tar", specs), str(tmp_path / why[:4]), 2**30)
        assert e.value.message.startswith("%s could not be extracted: %s: change or remove it"
                                          % (rules.shown(bad), why))
        assert "\n" not in e.value.message


# ---------------------------------------------------------------- properties

PART = st.sampled_from("abc")
NAME = st.lists(PART, min_size=1, max_size=3).map("/".join)
TARGET = (st.lists(st.sampled_from(["a", "b", "c", "..", ".", "a", "b"]), min_size=1, max_size=4)
          .filter(lambda parts: parts.count("..") <= 2).map("/".join))


@st.composite
def builds(draw, name=NAME, distinct=True):
    """Up to 8 members: files, directories, links (chains, links to links) and hardlinks
    (mostly to an earlier file). Unless told, no member takes an earlier one's path (nor a
    directory it implies): the rules on duplicates have tests of their own."""
    specs = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["file", "dir", "link", "link", "hard"]))
        taken = {"/".join(n.split("/")[:i]) for _, n, _ in specs for i in range(1, n.count("/") + 2)}
        if not distinct and specs and not draw(st.integers(0, 2)):
            path = draw(st.sampled_from([n for _, n, _ in specs]))  # tar allows a path twice
        else:
            path = draw(name.filter(lambda n: not distinct or n not in taken))
        if kind == "link":
            target = draw(TARGET)
        elif kind == "hard":
            files = [n for k, n, _ in specs if k == "file"]
            target = draw(st.sampled_from(files) if files and draw(st.integers(0, 3)) else
                          st.sampled_from([n for _, n, _ in specs]) if specs and draw(st.booleans()) else NAME)
        else:
            target = ""
        specs.append((kind, path, target))
    return specs


BUILD = builds()
PROPERTY = settings(max_examples=300, deadline=None)


@PROPERTY
@given(BUILD)
@example(CHAIN)
@example([("link", "a", "b"), ("link", "b", ".."), ("file", "a/c", "")])  # a link to a link
@example([("link", "a/b", "../c"), ("file", "c", ""), ("hard", "b", "a/b")])  # a hardlink to a link
@example([("link", "c", "."), ("dir", "a", ""), ("link", "a/b", "../c/c/c/..")])  # a chain that stays inside
def test_an_accepted_build_stays_inside_even_extracted_naively(box, specs):
    """What the check accepts is safe for any extractor, even one that follows
    links (tarfile without its data filter): nothing outside changes, and every
    path in the release resolves inside it. The real extractor makes the same tree."""
    members = infos(specs)
    if rules.check_members([info for info, _ in members]):
        return
    with sandbox(box) as (top, release):
        path = str(raw_tar(os.path.join(top, "b.tar"), members))
        before = snapshot(top, release)
        extract_naively(path, release)
        assert snapshot(top, release) == before
        assert all(inside(os.path.join(release, p), release) for p in listing(release))
        extract(path, release + "2", 2**30)
        assert listing(release + "2") == listing(release)


@PROPERTY
@given(BUILD)
@example([("link", "a", "b"), ("link", "b", "c/.."), ("link", "c", "..")])
def test_a_link_is_refused_exactly_when_it_leads_outside(box, specs):
    """When every member could be placed, each link's verdict matches where it
    really resolves once the build is on disk (os.path.realpath, like the kernel)."""
    members = infos(specs)
    problems = rules.check_members([info for info, _ in members])
    if any("leads outside" not in p and "more than 40 links" not in p for p in problems):
        return
    refused = {p.split(":")[0] for p in problems if "leads outside" in p}
    loops = {p.split(":")[0] for p in problems if "more than 40 links" in p}
    with sandbox(box) as (top, release):
        path = str(raw_tar(os.path.join(top, "b.tar"), members))
        assert extract_unchecked(path, release) == []
        for info, _ in members:
            if info.issym() and info.name not in loops:
                assert (info.name in refused) == (not inside(os.path.join(release, info.name), release)), info.name


HOSTILE_NAME = st.one_of(NAME, NAME.map(lambda n: "../" + n), NAME.map(lambda n: n + "/../.."),
                         NAME.map(lambda n: "/" + n), st.just("."), st.just(".."))
HOSTILE = builds(HOSTILE_NAME, distinct=False)


@PROPERTY
@given(HOSTILE)
@example(CHAIN)
@example([("link", "a/b", ".."), ("link", "a/b/c", "../.."), ("dir", "a/b/c/d", "")])
@example([("link", "a", ".."), ("hard", "b", "a"), ("file", "b/c", "")])
@example([("link", "a", "../c"), ("file", "a", "")])  # a file over a link to the file beside the release
@example([("dir", "a", ""), ("link", "a", ".."), ("dir", "a/b", "")])  # a link replacing a directory
def test_the_extractor_never_writes_outside_even_given_unchecked_members(box, specs):
    """Defence in depth: members the check would refuse only fail, they never land outside."""
    with sandbox(box) as (top, release):
        path = str(raw_tar(os.path.join(top, "b.tar"), infos(specs)))
        before = snapshot(top, release)
        extract_unchecked(path, release)
        assert snapshot(top, release) == before


# ---------------------------------------------------------------- every python the host may have

PYTHONS = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python")) + ["/usr/bin/python3"]

CROSS_CHECK = r'''
import os, stat, sys, tarfile, tempfile
sys.path.insert(0, sys.argv[1])  # the archive as the host runs it, under this python
from qabox_agent import builds, manifest, rules
from qabox_agent.protocol import Fail
KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "link": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}

def tar_of(path, specs):
    with tarfile.open(path, "w") as tar:
        for kind, name, target, mode in specs:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = KINDS[kind], target, mode
            tar.addfile(info)
    return path

def sent(path, base, checked=True):
    """The store of a host at base holding a tar as qabox sends it, and its members (checked or not)."""
    with tarfile.open(path, "r|*") as tar:
        listed = manifest.scan(tar, 10**9)[1]
    mid = manifest.identity(listed)
    store = builds.Store(base, "e")
    with open(store.upload("manifest-" + mid), "wb") as f:
        f.write(manifest.canonical(listed))
    if checked:
        members = store.members(mid, 2**30, uploaded=True)
    else:
        members = manifest.parse(manifest.canonical(listed), mid, 10**9)
    delta = store.delta(members)
    with tarfile.open(path, "r|*") as tar, open(delta["part_path"], "wb") as f:
        for block in manifest.delta_blocks(tar, listed, delta["hashes"]):
            f.write(block)
    store.take_delta(members)
    return store, members

failures = []
with tempfile.TemporaryDirectory() as top:
    home = os.path.join(top, "home")
    releases = os.path.join(home, ".qabox", "envs", "e", "releases")
    os.makedirs(releases)
    os.makedirs(os.path.join(home, ".ssh"))
    os.chmod(home, 0o755)
    keys = os.path.join(home, ".ssh", "authorized_keys")
    with open(keys, "w") as f:
        f.write("owner\n")
    evil = tar_of(os.path.join(top, "evil.tar"), [(k, n, t, 0o644) for k, n, t in %(to_home)r])
    base = os.path.join(home, ".qabox")
    try:
        sent(evil, base)
        failures.append("the host accepted the chain to home")
    except Fail:
        pass
    if not rules.check_members(tarfile.open(evil).getmembers()):
        failures.append("check_members accepted the chain to home")
    os.mkdir(os.path.join(releases, ".u.tmp"))
    root = os.open(os.path.join(releases, ".u.tmp"), os.O_RDONLY)
    store, members = sent(evil, base, checked=False)
    for member in members:
        try:
            builds.write_member(member, root, store.copy_blob)
        except OSError:
            pass
    if open(keys).read() != "owner\n":
        failures.append("authorized_keys was written")
    if stat.S_IMODE(os.stat(home).st_mode) != 0o755:
        failures.append("home's mode changed to %%o" %% stat.S_IMODE(os.stat(home).st_mode))
    if sorted(os.listdir(home)) != [".qabox", ".ssh"] or os.listdir(os.path.join(home, ".ssh")) != ["authorized_keys"]:
        failures.append("files appeared in home: %%s" %% sorted(os.listdir(home)))
    good = tar_of(os.path.join(top, "good.tar"), [
        ("dir", "static", "", 0o777), ("file", "static/app.js", "", 0o644), ("file", "run.sh", "", 0o755),
        ("link", "static/current", "app.js", 0o777), ("hard", "again.sh", "run.sh", 0o755)])
    dest = os.path.join(releases, "1")
    builds.assemble(*sent(good, base) + (dest,))
    modes = [stat.S_IMODE(os.lstat(os.path.join(dest, p)).st_mode) for p in ("static", "static/app.js", "run.sh")]
    if modes != [0o700, 0o600, 0o700] or os.readlink(os.path.join(dest, "static/current")) != "app.js":
        failures.append("good build extracted with modes %%s" %% [oct(m) for m in modes])
print("; ".join(failures) or "ok")
'''


@pytest.mark.parametrize("python", [p for p in PYTHONS if os.path.exists(p)])
def test_the_extractor_on_every_python(python, tmp_path):
    script = CROSS_CHECK % {"to_home": TO_HOME}
    archive = tmp_path / "agent.pyz"
    archive.write_bytes(AGENT_PYZ)
    proc = subprocess.run([python, "-c", script, str(archive)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr
