"""The host agent on its own: stdlib only, its JSON protocol, its build rules."""

from __future__ import annotations

import ast
import glob
import io
import os
import json
import subprocess
import sys
import tarfile

import pytest
from hypothesis import given, strategies as st

from qabox import agent

AGENT = agent.__file__


def run_agent(request: dict | str) -> tuple[int, list[dict]]:
    line = request if isinstance(request, str) else json.dumps(request)
    proc = subprocess.run([sys.executable, AGENT], input=line + "\n", capture_output=True,
                          text=True, timeout=30)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()]


def test_agent_loads_only_the_standard_library():
    code = ("import sys, runpy; before = set(sys.modules); runpy.run_path(sys.argv[1]); "
            "extra = {m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names); "
            "print(sorted(extra))")
    proc = subprocess.run([sys.executable, "-I", "-c", code, AGENT], capture_output=True, text=True,
                          input="", timeout=30)
    assert proc.stdout.strip().endswith("[]"), proc.stdout + proc.stderr


def test_agent_is_python36_syntax():
    ast.parse(open(AGENT).read(), feature_version=(3, 6))


@pytest.mark.parametrize("python", sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python")) + ["/usr/bin/python3"])
def test_agent_runs_on_every_python_a_host_may_have(python, tmp_path):
    """Old spare boxes ship python 3.6 (CentOS 7, Ubuntu 18.04): the agent runs there."""
    if not os.path.exists(python):
        pytest.skip(f"no {python} on this machine")
    request = {"protocol": agent.PROTOCOL, "cmd": "hello", "args": {"base": str(tmp_path)}}
    proc = subprocess.run([python, "-I", AGENT], input=json.dumps(request) + "\n",
                          capture_output=True, text=True, timeout=30)
    answer = json.loads(proc.stdout.splitlines()[-1])
    assert answer["ok"] and answer["data"]["protocol"] == agent.PROTOCOL, proc.stdout + proc.stderr


def test_hello_answers_with_the_protocol_version(tmp_path):
    code, lines = run_agent({"protocol": agent.PROTOCOL, "cmd": "hello", "args": {"base": str(tmp_path)}})
    assert code == 0
    assert lines[-1]["ok"] and lines[-1]["data"]["protocol"] == agent.PROTOCOL


def test_wrong_protocol_is_refused(tmp_path):
    code, lines = run_agent({"protocol": 999, "cmd": "hello", "args": {}})
    assert code == 1 and lines[-1]["error"]["code"] == "protocol"


def test_malformed_requests_get_an_error_not_a_traceback():
    for bad in ("not json", "[]", json.dumps({"protocol": 1, "cmd": "rm -rf"}),
                json.dumps({"protocol": 1, "cmd": "status", "args": {"base": "/tmp", "env": "../x"}})):
        code, lines = run_agent(bad)
        assert code == 1 and lines[-1]["ok"] is False, bad
        assert lines[-1]["error"]["code"] in ("bad_request", "bad_env")


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=8)),
                       max_size=4))
def test_any_json_object_gets_exactly_one_result_line(request):
    out = io.StringIO()
    agent.handle(json.dumps(request), agent.Stream(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ok"] is False


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
        assert agent.member_problem(info), what
    # where a link leads depends on the other members: check_members judges it
    assert agent.check_members([member("a/l", tarfile.SYMTYPE, "../../etc")])
    assert agent.check_members([member("h", tarfile.LNKTYPE, "../outside")])
    good = [member("./app.py"), member("a/b/c.txt"), member("static", tarfile.DIRTYPE),
            member("a/l", tarfile.SYMTYPE, "../b"), member("h", tarfile.LNKTYPE, "a/b/c.txt")]
    assert agent.check_members(good) == []


segment = st.text(alphabet="abc./-_", min_size=1, max_size=6)


@given(st.lists(segment, min_size=1, max_size=5))
def test_no_accepted_member_path_leaves_the_build(parts):
    name = "/".join(parts)
    if agent.member_problem(member(name)) is None:
        depth = 0
        for part in name.split("/"):
            depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
            assert depth >= 0
        assert not name.startswith("/")


@given(st.lists(segment, min_size=1, max_size=3), st.lists(segment, min_size=1, max_size=4))
def test_no_accepted_symlink_points_outside(where, target):
    name, link = "/".join(where), "/".join(target)
    if not agent.check_members([member(name, tarfile.SYMTYPE, link)]):
        depth = len([p for p in name.split("/") if p not in ("", ".")]) - 1
        for part in link.split("/"):
            depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
            assert depth >= 0


def test_size_limit():
    big = member("big")
    big.size = 3 * 2**20
    assert agent.check_members([big], max_bytes=2 * 2**20)
    assert not agent.check_members([big], max_bytes=4 * 2**20)
