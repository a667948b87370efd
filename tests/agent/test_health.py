"""Health that means healthy: which answers make a release go live, and how
fast a release that will never be up fails (with its traceback)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, strategies as st

from conftest import Host, free_port, local_get, wsgi_build
from qabox.agent.rules import DEFAULT_HEALTH_STATUS, health_codes, is_up


def test_health_codes_parse_ranges_and_single_codes():
    assert health_codes(DEFAULT_HEALTH_STATUS) == [(200, 399)]
    assert health_codes("200, 204,300-308") == [(200, 200), (204, 204), (300, 308)]
    assert not is_up(health_codes("200-399"), 400) and not is_up([(200, 399)], None)
    assert is_up(health_codes("200-399"), 302)


@pytest.mark.parametrize("text", ["", "200-", "99", "600", "399-200", "2xx", "200;300", None, 200])
def test_health_codes_refuse_what_is_not_codes(text):
    with pytest.raises(ValueError, match="is not HTTP codes from 100 to 599"):
        health_codes(text)


@given(st.integers(100, 599), st.integers(100, 599), st.integers(0, 700))
def test_a_range_holds_exactly_its_codes(low, high, code):
    low, high = min(low, high), max(low, high)
    assert is_up(health_codes("%d-%d" % (low, high)), code) == (low <= code <= high)


ANSWER = """
import time
STARTED = time.monotonic()

def app(environ, start_response):
    status = STATUS
    start_response(status, [("Content-Type", "text/plain")])
    return [status.encode()]
"""

CRASH = """
def app(environ, start_response):
    raise RuntimeError("no such table: post")
"""

EXIT = """
import os
SECRET_KEY = os.environ["SECRET_KEY_NOT_SET"]
"""


@pytest.fixture(scope="module")
def box(agent_cmd, tmp_path_factory):
    top = tmp_path_factory.mktemp("health")
    (top / "home").mkdir()
    local = Host(agent_cmd(), top / "home")
    n = [0]

    def build(wsgi: str, **files) -> object:
        n[0] += 1
        return wsgi_build(top / f"b{n[0]}.tar.gz", files={"wsgi.py": wsgi, **files})

    yield {"host": local, "build": build, "top": top}
    local.kill_all()


def timed_deploy(box, wsgi: str, env: str, **request):
    port = free_port()
    build = box["build"](wsgi)
    started = time.monotonic()
    result = box["host"].deploy(build, env, port, **request)
    return result, time.monotonic() - started, port


@pytest.mark.network
def test_a_400_on_every_probe_is_not_up_and_fails_a_first_deploy_in_seconds(box):
    result, seconds, _ = timed_deploy(box, ANSWER.replace("STATUS", '"400 Bad Request"'), "bad-host")
    assert not result["ok"] and result["error"]["code"] == "unhealthy", result
    message = result["error"]["message"]
    assert "answered HTTP 400 on every probe for 3 s (up is 200-399)" in message, message
    assert "nothing was deployed" in message and "previous release" not in message, message
    assert seconds < 12, seconds  # the start timeout is 20 s


@pytest.mark.network
def test_health_status_says_what_up_means(box):
    result, _, _ = timed_deploy(box, ANSWER.replace("STATUS", '"400 Bad Request"'), "any-answer",
                                   health_status="200-499")
    assert result["ok"], result
    (env,) = box["host"].data("status", env="any-answer")["envs"]
    assert env["state"] == "running" and env["health"]["code"] == 400, env


@pytest.mark.network
@pytest.mark.parametrize("env, wsgi, code, says, traceback, slowest", [
    ("crash", CRASH, "unhealthy", "answered HTTP 500 on every probe for 3 s", "RuntimeError: no such table: post", 12),
    ("exits", EXIT, "app_exited", "exited with code 1", "KeyError: 'SECRET_KEY_NOT_SET'", 10),
])
def test_a_release_that_fails_fails_fast_showing_the_traceback(box, env, wsgi, code, says, traceback, slowest):
    result, seconds, _ = timed_deploy(box, wsgi, env)
    assert not result["ok"] and result["error"]["code"] == code, result
    assert says in result["error"]["message"], result
    assert any(traceback in line for line in result["error"]["log"]), result
    assert seconds < slowest, seconds  # the start timeout is 20 s
    if code == "unhealthy":  # the error each probe captured: one line, then its traceback, not one line each
        log = result["error"]["log"]
        assert [line for line in log if line.startswith("qabox: error ")][0].endswith(" captured)"), log
        assert len([line for line in log if line.startswith("qabox: error ")]) == 1, log
        assert '    raise RuntimeError("no such table: post")' in log, log


@pytest.mark.network
def test_503_while_warming_up_is_waited_out(box):
    warming = ANSWER.replace("STATUS", '"200 OK" if time.monotonic() - STARTED > 5 else "503 Busy"')
    result, seconds, port = timed_deploy(box, warming, "warming")
    assert result["ok"], result
    assert seconds > 5 and local_get(port) == (200, "200 OK")


@pytest.mark.network
def test_a_failed_redeploy_says_the_previous_release_keeps_serving(box):
    result, _, port = timed_deploy(box, ANSWER.replace("STATUS", '"200 OK"'), "redeploy")
    assert result["ok"], result
    again = box["host"].deploy(box["build"](CRASH), "redeploy", port)
    assert not again["ok"] and "the previous release keeps serving" in again["error"]["message"], again
    assert local_get(port) == (200, "200 OK")


@pytest.mark.network
def test_status_probes_do_not_fill_the_access_log(box):
    result, _, port = timed_deploy(box, ANSWER.replace("STATUS", '"200 OK"'), "quiet")
    assert result["ok"], result
    for _ in range(3):
        (env,) = box["host"].data("status", env="quiet")["envs"]
        assert env["health"]["code"] == 200, env
    log = (box["top"] / "home" / ".qabox" / "envs" / "quiet" / "logs" / (result["data"]["release"] + ".log"))
    assert "qabox-health" not in log.read_text() and '"GET / HTTP' not in log.read_text()
    assert local_get(port)[0] == 200
    assert '"GET / HTTP' in log.read_text()  # a real request is logged
