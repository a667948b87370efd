"""The host agent's JSON protocol: one request line in, exactly one result line out."""

from __future__ import annotations

import io
import json

from hypothesis import given, strategies as st

from qabox.agent.main import handle
from qabox.agent.protocol import PROTOCOL, Stream


def test_hello_answers_with_the_protocol_version(host):
    code, result = host.send(host.request("hello"))
    assert code == 0
    assert result["ok"] and result["data"]["protocol"] == PROTOCOL


def test_wrong_protocol_is_refused(host):
    code, result = host.send(json.dumps({"protocol": 999, "cmd": "hello", "args": {}}))
    assert code == 1 and result["error"]["code"] == "protocol"


def test_malformed_requests_get_an_error_not_a_traceback(host):
    for bad in ("not json", "[]", json.dumps({"protocol": 1, "cmd": "rm -rf"}),
                json.dumps({"protocol": 1, "cmd": "status", "args": {"base": "/tmp", "env": "../x"}})):
        code, result = host.send(bad)
        assert code == 1 and result["ok"] is False, bad
        assert result["error"]["code"] in ("bad_request", "bad_env")
        assert "Traceback" not in host.stderr


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=8)),
                       max_size=4))
def test_any_json_object_gets_exactly_one_result_line(request):
    out = io.StringIO()
    handle(json.dumps(request), Stream(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["ok"] is False
