"""Each app server under the same supervisor on a real lab host: no request
fails through deploy, restart, rollback and `testers add` under load; a killed
app is restarted, a killed supervisor revived (adopting the app), a hung app
restarted; status names the server. (Werkzeug's are tests/test_supervision.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import LAB, SERVERS, add_tester, app_pids, http_get, in_host, json_data, qabox, wait_until, wsgi_build
from test_supervision import LOAD

pytestmark = pytest.mark.usefixtures("lab")

APP = """
import os, threading, time
hung = threading.Event()
def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/hang":
        hung.set()
    if path == "/health" and hung.is_set():
        time.sleep(3600)
    if path == "/crash":
        os._exit(3)
    start_response("200 OK", [("Content-Type", "text/plain")])
    body = {"/pid": str(os.getpid()), "/tester": environ.get("HTTP_X_QABOX_TESTER", "")}.get(path, "VERSION")
    return [body.encode()]
"""


def status(env):
    return json_data(qabox("status", "--host", "lab1", "--env", env, "--json").stdout)["hosts"][0]["envs"][0]


@pytest.mark.parametrize("server", [s for s in SERVERS if s != "werkzeug"])
def test_each_server_under_the_supervisor(server, tmp_path, env_name, port, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("health_interval = 0.5\n")  # hang detection within seconds
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    toml = f'[app]\nserver = "{server}"\nhealth = "/health"\n[server]\nthreads = 4\n'
    if server == "gunicorn":
        toml += "workers = 1\n"  # the hang below is one worker's: with more, the probe may reach another

    def build(version):
        return wsgi_build(tmp_path / f"{version}.tar.gz", server=server,
                          files={"wsgi.py": APP.replace("VERSION", version), "qabox.toml": toml})

    def deploy(version):
        result = qabox("deploy", build(version), "--host", "lab1", "--env", env_name, "--port", port)
        assert result.code == 0, result

    deploy("v1")
    assert status(env_name)["server"] == server
    load = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "/usr/bin/python3", "-c",
                             LOAD, str(port), "12"], stdout=subprocess.PIPE, text=True)
    assert load.stdout.readline() == "serving\n"
    deploy("v2")
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
    assert qabox("rollback", "--host", "lab1", "--env", env_name).code == 0
    name = "s" + env_name.replace("x", "")
    tester_port = add_tester(name, tmp_path / "key")["ports"][env_name]
    stats = json.loads(load.communicate(timeout=60)[0])
    assert stats["failed"] == 0, stats
    assert stats["ok"] >= 150 and {"v1", "v2"} <= set(stats["bodies"])
    try:
        assert http_get("lab1", tester_port, "/tester") == (200, name)

        before = status(env_name)
        app_pid = str(before["pid"])  # gunicorn's master: /pid answers a worker's
        in_host("lab1", "kill", "-9", str(before["supervisor_pid"]))
        assert http_get("lab1", port)[0] == 200  # the app keeps serving meanwhile
        env = status(env_name)  # revived: the new supervisor adopts the app
        assert env["supervisor_revived"] and str(env["pid"]) == app_pid
        assert len(app_pids(env_name)) == (2 if server == "gunicorn" else 1)  # adopted, not duplicated (gunicorn: and its worker)
        served = http_get("lab1", port, "/pid")[1]
        in_host("lab1", "kill", "-9", app_pid)
        assert wait_until(lambda: (lambda r: r[0] == 200 and r[1] != served)(http_get("lab1", port, "/pid")), 10)

        pid = http_get("lab1", port, "/pid")[1]
        http_get("lab1", port, "/hang")
        assert wait_until(lambda: http_get("lab1", port, "/pid")[1] not in ("", pid), 20, 0.5)
        assert wait_until(lambda: status(env_name)["hangs"] == 1, 5)
        log = qabox("logs", "--host", "lab1", "--env", env_name, "-n", "200").stdout
        assert any(line.startswith(f"{name} - - [") and "GET /tester" in line for line in log.splitlines()), log
    finally:
        qabox("testers", "remove", name, "--host", "lab1")
    assert qabox("stop", "--host", "lab1", "--env", env_name).code == 0
    assert in_host("lab1", "pgrep", "-f", f"/envs/{env_name}/").stdout == ""
