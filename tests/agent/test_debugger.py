"""The agent's `debug` command, without SSH: what it refuses, and its debugger on python 3.6."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import WSGI_APP, Host, free_port, local_get, wait_until, wsgi_build


def test_debug_refuses_an_env_with_nothing_deployed(host):
    assert host.call("debug", env="fresh")["error"]["code"] == "no_env"
    with host.session("fresh"):
        pass  # the env exists now, with no release
    result = host.call("debug", env="fresh")
    assert result["error"] == {"code": "no_release", "message": "nothing is deployed to env fresh: deploy a build "
                                                                "first, then debug it"}, result
    assert host.processes() == []


BOOM = WSGI_APP.replace('    start_response("200 OK"', '    if environ["PATH_INFO"] == "/boom":\n'
                        '        raise RuntimeError("boom-" + "marker")\n    start_response("200 OK"')


@pytest.mark.network  # the app server's wheels for python 3.6
def test_the_debugger_on_the_oldest_python_and_werkzeug(agent_cmd, tmp_path):
    """Python 3.6 gets Werkzeug 2.0: its debugger takes the agent's PIN, and stops on stop."""
    python = "/root/.pyenv/versions/3.6.15/bin/python"
    if not os.path.exists(python):
        pytest.skip(f"no {python} on this machine")
    home = tmp_path / "host"
    home.mkdir()
    local = Host(agent_cmd(python), home)
    try:
        build = wsgi_build(tmp_path / "app.tar.gz", python="3.6", files={"wsgi.py": BOOM.replace("VERSION", "v1")})
        deployed = local.deploy(build, "main", free_port())
        assert deployed["ok"], (deployed, local.stderr)
        agent = subprocess.Popen(local.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=local.environ)
        agent.stdin.write(local.request("debug", env="main") + "\n")
        agent.stdin.flush()
        while "debugging" not in (message := json.loads(agent.stdout.readline())):
            assert "ok" not in message, message
        started = message["debugging"]
        url = f"http://127.0.0.1:{started['port']}"
        assert local_get(started["port"], "/") == (200, "v1")
        page = ""
        try:
            urllib.request.urlopen(url + "/boom", timeout=10)
        except urllib.error.HTTPError as e:
            page = e.read().decode()
        assert "Werkzeug Debugger" in page and "boom-marker" in page, page[:300]
        secret = re.search(r'SECRET = "([^"]+)"', page).group(1)
        with urllib.request.urlopen(f"{url}/?__debugger__=yes&cmd=pinauth&pin={started['pin']}&s={secret}",
                                    timeout=10) as r:
            assert json.loads(r.read().decode())["auth"] is True
        agent.stdin.write('{"stop": 1}\n')
        agent.stdin.flush()
        while "ok" not in (message := json.loads(agent.stdout.readline())):
            pass
        assert message["ok"] and message["data"]["stopped"], message
        assert agent.wait(10) == 0 and local_get(started["port"])[0] == 0
        assert wait_until(lambda: [p for p in local.processes()
                                   if b"debug-serve" in open(f"/proc/{p}/cmdline", "rb").read()] == [], 10)
    finally:
        local.kill_all()
