"""The build rules the host applies to each member (the client checks with the same code)."""

from __future__ import annotations

import tarfile

from hypothesis import given, strategies as st

from qabox.agent import rules


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_member_rules():
    bad = {
        "/etc/passwd": member("/etc/passwd"),
        "../x": member("../x"),
        "a/../../x": member("a/../../x"),
        "dev": member("dev", tarfile.CHRTYPE),
        "fifo": member("fifo", tarfile.FIFOTYPE),
        "abs link": member("l", tarfile.SYMTYPE, "/etc"),
    }
    for what, info in bad.items():
        assert rules.member_problem(info), what
    # where a link leads depends on the other members: check_members judges it
    assert rules.check_members([member("a/l", tarfile.SYMTYPE, "../../etc")])
    assert rules.check_members([member("h", tarfile.LNKTYPE, "../outside")])
    good = [member("./app.py"), member("a/b/c.txt"), member("static", tarfile.DIRTYPE),
            member("a/l", tarfile.SYMTYPE, "../b"), member("h", tarfile.LNKTYPE, "a/b/c.txt")]
    assert rules.check_members(good) == []


segment = st.text(alphabet="abc./-_", min_size=1, max_size=6)


@given(st.lists(segment, min_size=1, max_size=5))
def test_no_accepted_member_path_leaves_the_build(parts):
    name = "/".join(parts)
    if rules.member_problem(member(name)) is None:
        depth = 0
        for part in name.split("/"):
            depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
            assert depth >= 0
        assert not name.startswith("/")


@given(st.lists(segment, min_size=1, max_size=3), st.lists(segment, min_size=1, max_size=4))
def test_no_accepted_symlink_points_outside(where, target):
    name, link = "/".join(where), "/".join(target)
    if not rules.check_members([member(name, tarfile.SYMTYPE, link)]):
        depth = len([p for p in name.split("/") if p not in ("", ".")]) - 1
        for part in link.split("/"):
            depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
            assert depth >= 0


def test_size_limit():
    big = member("big")
    big.size = 3 * 2**20
    assert rules.check_members([big], max_bytes=2 * 2**20)
    assert not rules.check_members([big], max_bytes=4 * 2**20)
