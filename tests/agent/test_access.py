"""A tester's scope and expiry, and the key line built from them (no SSH)."""

from __future__ import annotations

import calendar
import json
import time
from datetime import datetime, timezone

import pytest

from qabox.agent import access, testers
from qabox.agent.protocol import Fail
from qabox.errors import ConfigError
from qabox.expiry import iso_utc, parse_expiry

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, expected", [
    ("30m", "2026-12-02T12:30:00Z"), ("12h", "2026-12-03T00:00:00Z"), ("7d", "2026-12-09T12:00:00Z"),
    ("2w", "2026-12-16T12:00:00Z"), ("5s", "2026-12-02T12:00:05Z"), ("2026-12-09", "2026-12-09T00:00:00Z"),
    ("2026-12-09T12:00", "2026-12-09T12:00:00Z"), ("2026-12-09T12:00:00Z", "2026-12-09T12:00:00Z"),
    ("2026-12-09T13:00+01:00", "2026-12-09T12:00:00Z"), ("never", None)])
def test_expiry_parses_durations_and_utc_times(text, expected):
    assert iso_utc(parse_expiry(text, NOW)) == expected


@pytest.mark.parametrize("text, says", [("0d", "in the past"), ("2026-12-01", "in the past"),
                                        ("7 days", "neither a duration"), ("7y", "neither a duration")])
def test_expiry_refuses_the_past_and_nonsense(text, says):
    with pytest.raises(ConfigError, match=says):
        parse_expiry(text, NOW)


def test_agent_checks_expiry_and_envs():
    at = calendar.timegm((2026, 12, 2, 12, 0, 0))
    assert access.parse_expires("2026-12-09T12:00:00Z", at) == at + 7 * 86400
    assert access.parse_expires(None, at) is None
    with pytest.raises(Fail, match="in the past"):
        access.parse_expires("2026-12-01T12:00:00Z", at)
    with pytest.raises(Fail, match="UTC time"):
        access.parse_expires("7d", at)
    assert access.check_envs(["b", "a", "a"], ["a", "b", "c"]) == ["a", "b"]
    assert access.check_envs(None, []) is None
    with pytest.raises(Fail, match="no env nope"):
        access.check_envs(["nope"], ["a"])
    with pytest.raises(Fail, match="not allowed"):
        access.check_envs(["A/../b"], ["a"])
    assert access.in_scope({"envs": ["a", "gone"]}, ["a", "b"]) == {"a"}
    assert access.in_scope({"envs": None}, ["a", "b"]) == {"a", "b"}


def test_expiry_time_is_utc_from_openssh_8_7_and_local_before():
    when = calendar.timegm((2026, 12, 9, 12, 0, 5))
    assert access.expiry_time(when, "SSH-2.0-OpenSSH_9.2p1 Debian") == "20261209120005Z"
    assert access.expiry_time(when, "SSH-2.0-OpenSSH_8.4p1") == time.strftime("%Y%m%d%H%M%S", time.localtime(when))


def test_key_line_has_the_expiry_and_only_the_scoped_ports(tmp_path, monkeypatch):
    monkeypatch.setattr(testers.agents, "entry", lambda: "/srv/agent/entry.pyz")
    tester = {"key": "ssh-ed25519 AAAA", "ports": {"a": 18080}, "envs": ["a"], "expiry_time": "20261209120000Z"}
    line = testers.authorized_line(str(tmp_path), "t1", tester)
    assert 'expiry-time="20261209120000Z"' in line and 'permitopen="127.0.0.1:18080"' in line
    assert line.count("permitopen") == 1 and line.startswith("restrict,")
    with pytest.raises(Fail, match="not a time"):
        testers.authorized_line(str(tmp_path), "t1", dict(tester, expiry_time='1",command="sh'))


@pytest.mark.parametrize("damage", [{"expires": "next tuesday"}, {"expires": 7}, {"envs": "main"},
                                    {"envs": [1]}, {"expiry_time": "202612091200; rm -rf ~"}])
def test_a_tester_list_with_a_damaged_scope_or_expiry_is_refused_whole(tmp_path, damage):
    (tmp_path / "testers.json").write_text(json.dumps({"tester2": {"key": "ssh-ed25519 AAAA", **damage}}))
    with pytest.raises(Fail, match="is not a readable tester list"):
        testers.read_testers(str(tmp_path))
    assert access.well_formed({"key": "ssh-ed25519 AAAA", "envs": ["main"], "expires": "2026-12-09T12:00:00Z",
                               "expiry_time": "20261209120000Z"})
