"""`qabox debug` on a real lab host: Werkzeug's debugger for the deploy account alone,
on a port of its own, gone when the command ends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import LAB1, Lines, add_tester, forwarding, free_port, http_get, qabox, ssh_as_tester, wait_until
from lab.hosts import env_pids
from test_real_apps import django, startproject  # noqa: F401 - django is a fixture

pytestmark = pytest.mark.usefixtures("lab")

APP = '''
from flask import Flask

app = Flask(__name__)


@app.route("/health")
def health():
    return "ok"


@app.route("/boom")
def boom():
    secret_word = "frame-local"
    raise RuntimeError("boom-" + "marker")
'''
DEBUGGER = ("Werkzeug Debugger", "__debugger__")  # the debugger's page, in any Werkzeug since 2.0


@pytest.fixture
def deployed(make_build, env_name, port, tmp_path):
    """A Flask app whose /boom raises, deployed to an env of this test, and a tester of it."""
    build = make_build({"app.py": APP, "qabox.toml": '[app]\nentry = "app:app"\nhealth = "/health"\n'})
    result = qabox("deploy", build, "--host", "lab1", "--env", env_name, "--port", port)
    assert result.code == 0, result
    name = "d" + env_name.replace("x", "")
    tester = {"name": name, "key": str(tmp_path / "tester"), "env": env_name}
    tester["port"] = add_tester(name, tmp_path / "tester")["ports"][env_name]
    yield {"env": env_name, "port": port, "tester": tester, "tmp": tmp_path}
    qabox("testers", "remove", name, "--host", "lab1")


def get(url: str) -> tuple[int, str, str]:
    """GET from here: status, body and the Set-Cookie header (an error's too)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode(), r.headers.get("Set-Cookie", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), ""


def start_debug(env: str) -> tuple[subprocess.Popen, str, str, Lines]:
    """`qabox debug` as the developer runs it: the process, its URL and PIN, its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "qabox", "debug", "--host", "lab1", "--env", env],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    header = "".join(proc.stdout.readline() for _ in range(3))
    url = re.search(r"http://127\.0\.0\.1:\d+", header)
    pin = re.search(r"PIN: (\d{3}-\d{3}-\d{3})\n", header)
    assert url and pin, header + (proc.stderr.read() if proc.poll() is not None else "")
    assert "a shell on lab1" in header and "whoever has this PIN" in header, header
    return proc, url.group(0), pin.group(1), Lines(proc.stderr)


def debug_pids(env: str) -> list[int]:
    """The env's debug processes on the host (never the supervisor's app)."""
    return [pid for pid in env_pids(LAB1, env) if b"debug-serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def listens(port: int) -> bool:
    """Whether anything listens on the lab host's loopback port (from inside the host)."""
    return http_get("lab1", port, "/health")[0] != 0


def test_the_debugger_is_the_developers_alone_and_ends_with_its_command(deployed):
    env, tester = deployed["env"], deployed["tester"]
    proc, url, pin, err = start_debug(env)
    try:
        assert get(url + "/health")[:2] == (200, "ok")
        code, page, _ = get(url + "/boom")
        assert code == 500 and all(marker in page for marker in DEBUGGER) and "boom-marker" in page, page[:500]
        # the PIN shown is the debugger's, and it opens the console: a shell on the host
        secret = re.search(r'SECRET = "([^"]+)"', page).group(1)
        frame = re.findall(r'id="frame-(\d+)"', page)[-1]  # the view's, where it raised
        code, answer, cookie = get(f"{url}/?__debugger__=yes&cmd=pinauth&pin={pin}&s={secret}")
        assert code == 200 and json.loads(answer)["auth"] is True, answer
        request = urllib.request.Request(f"{url}/?__debugger__=yes&frm={frame}&s={secret}&cmd="
                                         + urllib.parse.quote("secret_word.upper()"),
                                         headers={"Cookie": cookie.split(";", 1)[0]})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert "FRAME-LOCAL" in r.read().decode()
        assert wait_until(lambda: err.saying("RuntimeError: boom-marker"), 5), err.lines  # its log: here only
        assert err.saying("GET /boom HTTP/1.1") and not err.saying("__debugger__")
        assert not err.saying(pin)

        # the same request on the app's port and the tester's port: the app's own 500, no debugger
        pids = debug_pids(env)
        assert len(pids) == 1, pids
        for port in (deployed["port"], tester["port"]):
            code, body = http_get("lab1", port, "/boom")
            assert code == 500 and not any(marker in body for marker in DEBUGGER), (port, body)
        # the debug port: a second loopback port, not the app's, not the tester's; not in status
        debug_port = debug_port_of(pids[0])
        assert debug_port not in (deployed["port"], tester["port"])
        status = qabox("status", "--host", "lab1", "--env", env, "--json").stdout
        assert f'"pid": {pids[0]}' not in status and '"state": "running"' in status, status

        # a tester's key, with real ssh -L, cannot reach it
        local = free_port()
        fwd = subprocess.Popen(ssh_as_tester(tester, deployed["tmp"]) + [
            "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:{debug_port}", "lab1"],
            stderr=subprocess.PIPE, text=True)
        try:
            assert forwarding(fwd, local), "ssh -L never listened"
            code, _, _ = get_or_zero(f"http://127.0.0.1:{local}/boom")
        finally:
            fwd.kill()
            denied = fwd.communicate(timeout=10)[1]
        assert code == 0 and "administratively prohibited" in denied, denied
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and f"stopped the debugger of lab1/{env}" in out, (out, err.text())
    assert err.text().count("Traceback") == 1  # the app's, none of qabox's
    assert debug_pids(env) == [] and not listens(debug_port)
    assert get_or_zero(url + "/health")[0] == 0  # the local listener is closed too


def test_the_debugger_ends_when_its_agent_is_killed(deployed):
    env = deployed["env"]
    proc, url, _, err = start_debug(env)
    try:
        pid = debug_pids(env)[0]
        debug_port = debug_port_of(pid)
        agent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        os.kill(agent, signal.SIGKILL)
        assert wait_until(lambda: not debug_pids(env), 10), debug_pids(env)
        assert not listens(debug_port)
        assert proc.wait(timeout=20) != 0  # the developer is told it ended
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err.text().endswith(f"qabox: error: the debugger of lab1/{env} ended with its agent on the host "
                               f"(exit status -1), and so did its process: run qabox debug again\n"), err.text()


def test_a_django_view_that_raises_reaches_the_debugger_in_qabox_debug_only(django, env_name, port, tmp_path):  # noqa: F811
    src = startproject(django, tmp_path / "site", 'DEBUG = False\nALLOWED_HOSTS = ["127.0.0.1", "localhost"]\n')
    with open(src / "mysite" / "urls.py", "a") as f:
        f.write("\n\ndef boom(request):\n    raise RuntimeError('boom-' + 'marker')\n\n\n"
                "urlpatterns.append(path('boom/', boom))\n")
    assert qabox("build", src, "-o", tmp_path / "site.tar.gz").code == 0
    assert qabox("deploy", tmp_path / "site.tar.gz", "--host", "lab1", "--env", env_name, "--port", port).code == 0
    code, body = http_get("lab1", port, "/boom/")
    assert code == 500 and "boom-marker" not in body and not any(marker in body for marker in DEBUGGER), body
    proc, url, _, _ = start_debug(env_name)
    try:
        code, page, _ = get(url + "/boom/")
        assert code == 500 and all(marker in page for marker in DEBUGGER) and "boom-marker" in page, page[:500]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_debug_refuses_an_env_with_nothing_deployed():
    result = qabox("debug", "--host", "lab1", "--env", "nothing-here")
    assert result.code == 6 and result.stdout == "", result
    assert result.stderr.startswith("qabox: error: lab1: there is no env nothing-here on this host"), result
    assert len(result.stderr.splitlines()) == 1, result


def get_or_zero(url: str) -> tuple[int, str, str]:
    """get(), or status 0 when nothing answers."""
    try:
        return get(url)
    except OSError as e:
        return 0, str(e), ""


def debug_port_of(pid: int) -> int:
    """The loopback port the debug process listens on (its socket's inode in /proc/net/tcp)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    with open(f"/proc/{pid}/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:
                return int(fields[1].rsplit(":", 1)[1], 16)
    raise AssertionError(f"process {pid} listens on no TCP port")
