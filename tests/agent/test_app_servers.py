"""Each app server ([app] server) through a local host's agent: the same
identity headers, tester ports, access logs naming the tester, captured
errors, testers added and removed while it runs, a zero-gap switch and a
graceful stop."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import pytest

from conftest import SERVERS, free_port, local_answer as get, new_key, wait_until, wsgi_build

APP = """
import json, os, time
def app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("the notes table is gone")
    if environ["PATH_INFO"] == "/slow":
        open("IN_FLIGHT", "w").close()  # the test waits for this: the request is in flight
        time.sleep(1.0)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"tester": environ.get("HTTP_X_QABOX_TESTER"), "pid": os.getpid(),
                        "version": "VERSION"}).encode()]
"""


@pytest.mark.network
@pytest.mark.parametrize("server", [s for s in SERVERS if s != "werkzeug"])
def test_each_server_keeps_every_guarantee_through_the_agent(host, tmp_path, server):
    port = free_port()
    in_flight = tmp_path / "in-flight"
    build = lambda v: wsgi_build(tmp_path / f"{v}.tar.gz", server=server,  # noqa: E731
                                 files={"wsgi.py": APP.replace("VERSION", v).replace("IN_FLIGHT", str(in_flight))})
    deployed = host.deploy(build("v1"), "main", port, server=server)
    assert deployed["ok"], deployed
    release = deployed["data"]["release"]
    status = host.data("status", env="main")["envs"][0]
    assert status["server"] == server
    code, headers, body = get(port, "/", **{"X-Qabox-Tester": "boss", "X-Request-ID": "r-1"})
    assert code == 200 and json.loads(body)["tester"] is None
    assert headers["X-Qabox-Release"] == release and headers["X-Request-ID"] == "r-1"

    key = new_key(tmp_path / "ann")
    added = host.data("tester-add", name="ann", key=key.with_suffix(".pub").read_text(),
                      sshd="SSH-2.0-OpenSSH_9.2p1", by="tests")
    tester_port = added["ports"]["main"]
    code, _, body = get(tester_port, "/", **{"X-Qabox-Tester": "boss"})
    assert code == 200 and json.loads(body)["tester"] == "ann"
    code, headers, body = get(tester_port, "/boom", **{"X-Request-ID": "req-42"})
    error_id = headers["X-Qabox-Error"]
    assert code == 500 and error_id in body and "RuntimeError" not in body
    (group,) = host.data("errors-list", env="main")["groups"]
    assert group["testers"] == ["ann"] and group["where"] == "wsgi.py:5 in app"
    log = (Path(host.base) / "envs" / "main" / "logs" / f"{release}.log").read_text()
    (line,) = [line for line in log.splitlines() if "GET /boom" in line]
    assert line.startswith("ann - - [") and "500" in line and line.endswith("rid=req-42"), line

    # keep-alive: a connection left idle is closed cleanly by a switch; in-flight ones finish
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle.request("GET", "/")
    first = idle.getresponse()
    assert first.status == 200 and first.read() and first.getheader("Connection") != "close"
    slow = {}
    slow_thread = threading.Thread(target=lambda: slow.update(answer=get(port, "/slow")))
    slow_thread.start()
    assert wait_until(in_flight.exists, 10)
    in_flight.unlink()
    switched = host.deploy(build("v2"), "main", port, server=server)
    assert switched["ok"], switched
    slow_thread.join(10)
    assert slow["answer"][0] == 200 and json.loads(slow["answer"][2])["version"] == "v1"
    assert json.loads(get(port)[2])["version"] == "v2"
    assert json.loads(get(tester_port)[2])["tester"] == "ann"
    idle.sock.settimeout(10)
    assert idle.sock.recv(1) == b""  # closed by the old app as it drained, not cut mid-answer
    idle.close()

    removed = host.call("tester-remove", name="ann")
    assert removed["ok"], removed
    assert wait_until(lambda: not reachable(tester_port), 5)
    assert get(port)[0] == 200
    slow_thread = threading.Thread(target=lambda: slow.update(answer=get(port, "/slow")))
    slow_thread.start()
    assert wait_until(in_flight.exists, 10)
    in_flight.unlink()
    with host.session("main") as call:
        stopped = call("stop", env="main")
    assert stopped["ok"], stopped
    slow_thread.join(10)
    assert slow["answer"][0] == 200  # stopped gracefully: the request in flight was answered
    assert not reachable(port) and not host.processes()


def reachable(port: int) -> bool:
    try:
        return get(port)[0] == 200
    except OSError:
        return False
