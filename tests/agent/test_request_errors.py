"""Who sent a request, which release answered, and what the app raised: the
middleware every server shares and the env's error store, here in this process
(a Flask app factory's view included), then through a local host's agent."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, local_answer, new_key, wsgi_build
from qabox.agent.errors import ErrorStore, error_files, errors_dir, groups, prune, records
from qabox.agent.envs import Env
from qabox.agent.wsgi import Requests, hook_frameworks


def environ(path="/", port=8080, **headers) -> dict:
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "a=1", "SERVER_PORT": str(port),
           "wsgi.url_scheme": "http"}
    env.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    return env


def call(app, env: dict) -> tuple[str, dict, bytes]:
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer.update(status=status, headers=dict(headers))

    body = b"".join(app(env, start_response))
    return answer["status"], answer["headers"], body


def seen_by_app(env, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Request-ID", "the app's")])
    return [json.dumps({k: env.get(k) for k in ("HTTP_X_QABOX_TESTER", "HTTP_X_REQUEST_ID")}).encode()]


def boom(env, start_response):
    raise KeyError("no such note")


@pytest.fixture
def store(tmp_path):
    release_dir = tmp_path / "releases" / "20261202-174500"
    release_dir.mkdir(parents=True)
    return ErrorStore(errors_dir(Env(str(tmp_path), "x")), "20261202-174500", str(release_dir))


def test_a_forged_tester_is_dropped_and_the_port_names_the_tester(store):
    app = Requests(seen_by_app, "20261202-174500", {9001: "ann"}, store)
    status, headers, body = call(app, environ(port=8080, x_qabox_tester="boss", x_request_id="abc-1.2:3"))
    assert status == "200 OK" and json.loads(body) == {"HTTP_X_QABOX_TESTER": None, "HTTP_X_REQUEST_ID": "abc-1.2:3"}
    assert headers["X-Qabox-Release"] == "20261202-174500" and headers["X-Request-ID"] == "abc-1.2:3"
    _, headers, body = call(app, environ(port=9001, x_qabox_tester="boss", x_request_id="bad id\n"))
    seen = json.loads(body)
    assert seen["HTTP_X_QABOX_TESTER"] == "ann" and len(seen["HTTP_X_REQUEST_ID"]) == 32
    assert headers["X-Request-ID"] == seen["HTTP_X_REQUEST_ID"] and "X-Qabox-Error" not in headers


def test_a_bare_apps_exception_is_captured_and_its_page_names_only_the_id(store, tmp_path):
    app = Requests(boom, "20261202-174500", {9001: "ann"}, store)
    status, headers, body = call(app, environ("/notes/7", port=9001, cookie="session=s3cret; theme=dark",
                                              authorization="Bearer tok3n", x_request_id="r1"))
    error_id = headers["X-Qabox-Error"]
    assert status.startswith("500") and error_id.encode() in body and b"KeyError" not in body
    (name, _, found, release), = error_files(store.dir)
    assert found == error_id and release == "20261202-174500"
    path = Path(store.dir) / name
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(path.read_text())
    assert record["type"] == "KeyError" and record["message"] == "'no such note'"
    assert record["where"].startswith(__file__ + ":") and record["where"].endswith(" in boom")
    assert record["tester"] == "ann" and record["request_id"] == "r1" and record["release"] == release
    assert (record["method"], record["path"], record["query"]) == ("GET", "/notes/7", "a=1")
    assert record["headers"]["Cookie"] == "session=***; theme=***"
    assert record["headers"]["Authorization"] == "Bearer ***" and "s3cret" not in path.read_text()
    assert "raise KeyError" in record["traceback"]


def test_a_flask_factorys_view_error_is_captured_once_behind_flasks_own_page(store):
    import flask

    def create_app():
        app = flask.Flask("notes")

        @app.route("/notes/<int:n>")
        def note(n):
            return {"n": 1 // (n - n)}

        return app

    requests = Requests(create_app(), "20261202-174500", {9001: "bob"}, store)
    assert "flask" in hook_frameworks()
    status, headers, body = call(requests, environ("/notes/3", port=9001))
    assert status.startswith("500") and b"Traceback" not in body and b"ZeroDivisionError" not in body
    assert headers["X-Qabox-Error"].encode() in body  # qabox's page in place of Flask's stock one
    (error,) = list(records_of(store))
    assert error["id"] == headers["X-Qabox-Error"] and error["tester"] == "bob"
    assert error["type"] == "ZeroDivisionError" and error["where"].endswith(" in note")


def test_an_apps_own_500_page_is_kept(store):
    import flask

    app = flask.Flask("notes")

    @app.route("/")
    def fails():
        raise RuntimeError("x")

    @app.errorhandler(500)
    def own_page(e):
        return "our own sorry page", 500

    requests = Requests(app, "20261202-174500", {}, store)
    hook_frameworks()
    status, headers, body = call(requests, environ("/"))
    assert status.startswith("500") and body == b"our own sorry page" and headers["X-Qabox-Error"]


@pytest.mark.parametrize("body, replaced", [
    (b"<!doctype html><title>Server Error (500)</title><h1>Server Error (500)</h1>", True),  # Django, DEBUG off
    (b"<html>" + b"<td>frame locals</td>" * 2000 + b"You're seeing this error because you have <code>DEBUG = True"
     b"</code> in your Django settings file.</html>", True),  # Django's technical page: long, and replaced
    (b"our own sorry page, Server Error (500) " * 200, False),
])
def test_a_frameworks_stock_and_debug_500_pages_are_replaced_an_apps_own_kept(body, replaced):
    from qabox.agent.wsgi import stock_page

    assert stock_page(body) is replaced


def records_of(store: ErrorStore):
    return records(Env(str(Path(store.dir).parents[2]), "x"))


def test_errors_are_grouped_by_where_and_the_oldest_pruned_by_count_and_size(store):
    app = Requests(boom, "20261202-174500", {9001: "ann", 9002: "bob"}, store)
    for port in (9001, 9002, 9001):
        call(app, environ(port=port))
    (group,) = groups(list(records_of(store)))
    assert group["count"] == 3 and sorted(group["testers"]) == ["ann", "bob"]
    assert group["releases"] == ["20261202-174500"] and group["type"] == "KeyError"
    names = [f[0] for f in error_files(store.dir)]
    prune(store.dir, keep=2)
    assert [f[0] for f in error_files(store.dir)] == names[1:]
    prune(store.dir, max_bytes=os.path.getsize(os.path.join(store.dir, names[2])))
    assert [f[0] for f in error_files(store.dir)] == names[2:]


FAILING_APP = """
import json, os

def app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("the notes table is gone")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"tester": environ.get("HTTP_X_QABOX_TESTER")}).encode()]
"""


@pytest.mark.network
def test_through_the_agent_a_tester_port_names_the_tester_and_errors_are_listed(host, tmp_path):
    port = free_port()
    build = wsgi_build(tmp_path / "b.tar.gz", files={"wsgi.py": FAILING_APP})
    release = host.deploy(build, "main", port)["data"]["release"]
    key = new_key(tmp_path / "ann")
    added = host.data("tester-add", name="ann", key=key.with_suffix(".pub").read_text(),
                      sshd="SSH-2.0-OpenSSH_9.2p1", by="tests")
    tester_port = added["ports"]["main"]

    get = local_answer
    code, headers, body = get(tester_port, "/", **{"X-Qabox-Tester": "boss"})
    assert code == 200 and json.loads(body) == {"tester": "ann"} and headers["X-Qabox-Release"] == release
    assert json.loads(get(port, "/", **{"X-Qabox-Tester": "boss"})[2]) == {"tester": None}
    code, headers, body = get(tester_port, "/boom", **{"X-Request-ID": "req-42"})
    error_id = headers["X-Qabox-Error"]
    assert code == 500 and error_id in body and "RuntimeError" not in body and headers["X-Request-ID"] == "req-42"
    listed = host.data("errors-list", env="main")
    (group,) = listed["groups"]
    assert group["count"] == 1 and group["testers"] == ["ann"] and group["where"] == "wsgi.py:6 in app"
    assert host.data("errors-list", tester="bob")["groups"] == []
    shown = host.data("error-show", id=error_id)["error"]
    assert shown["tester"] == "ann" and shown["request_id"] == "req-42" and shown["release"] == release
    assert "RuntimeError: the notes table is gone" in shown["traceback"] and shown["env"] == "main"
    missing = host.call("error-show", id="0" * 12)
    assert missing["error"]["code"] == "no_error" and "no error 000000000000 on this host" in missing["error"]["message"]
    assert host.data("status", env="main")["envs"][0]["errors"] == 1
    log = (Path(host.base) / "envs" / "main" / "logs" / f"{release}.log").read_text()
    (line,) = [line for line in log.splitlines() if "GET /boom" in line]
    assert line.startswith("ann - - [") and line.endswith(" 500 - rid=req-42"), line

    follow = subprocess.Popen(host.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=host.environ)
    try:
        follow.stdin.write(host.request("errors-list", env="main", follow=True) + "\n")
        follow.stdin.flush()
        assert json.loads(follow.stdout.readline())["count"] == 1  # the groups so far, then each new one
        new_id = get(port, "/boom")[1]["X-Qabox-Error"]
        message = json.loads(follow.stdout.readline())
        while "hb" in message:
            message = json.loads(follow.stdout.readline())
        assert message["error"]["id"] == new_id and message["error"]["tester"] is None, message
        follow.stdin.close()  # as qabox's end of the channel closing on Ctrl-C: the agent ends
        assert follow.wait(timeout=10) == 0
    finally:
        follow.kill()
