"""Tester tunnels on a real lab host: tunnel-only keys, reconnects, notices."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from qabox.agent.protocol import SESSION_IDLE
from qabox.agent.sockets import port_is_free

from conftest import (LAB, LAB_ADDR, LAB_DIR, LAB_HOME, LAB_USER, Lines, add_tester, forwarding, free_port, http_get,
                      in_host, json_data, new_key, qabox, ssh_as_tester, wait_until)
from conftest import url_get as get

pytestmark = pytest.mark.usefixtures("lab")


def start_tunnel(tester, *extra) -> tuple[subprocess.Popen, str]:
    """`qabox tunnel` in the foreground, as a tester runs it; returns it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qabox", "tunnel", "--user", tester["name"], "--host", "lab1",
         "--env", tester["env"], "-i", tester["key"], *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    line = proc.stdout.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert url, line + proc.stderr.read() if proc.poll() is not None else line
    return proc, url.group(0)


def stop(proc: subprocess.Popen) -> tuple[float, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    return time.monotonic() - started, err


def test_tunnel_serves_the_app_and_names_the_tester(tester):
    proc, url = start_tunnel(tester)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert get(url + "/health") == (200, "ok")
        logs = qabox("logs", "--host", "lab1", "--env", tester["env"], "-n", "5").stdout
        assert f'{tester["name"]} - - [' in logs and '"GET /health' in logs
        env = json_data(qabox("status", "--host", "lab1", "--env", tester["env"], "--json").stdout)
        env = env["hosts"][0]["envs"][0]
        assert [t["name"] for t in env["testers"]] == [tester["name"]]
        assert env["requests"][tester["name"]] == 1
    finally:
        seconds, err = stop(proc)
    assert seconds < 2 and proc.returncode == 0 and "Traceback" not in err


def test_local_port_is_stable_per_tester(tester):
    proc, url = start_tunnel(tester)
    stop(proc)
    proc, again = start_tunnel(tester)
    stop(proc)
    assert url == again


def test_tester_key_reaches_its_port_and_nothing_else(tester, port, tmp_path):
    ssh = ssh_as_tester(tester, tmp_path)
    # a command is replaced by the tester session (which answers in JSON)
    out = subprocess.run(ssh + ["lab1", "cat /etc/passwd; id"], capture_output=True, text=True,
                         timeout=20, stdin=subprocess.DEVNULL).stdout
    assert "root:" not in out and "uid=" not in out and '"tester"' in out
    own = tester["ports"][tester["env"]]
    for target, allowed in ((own, True), (22, False), (port, False)):  # port: the env's main port
        local = free_port()
        fwd = subprocess.Popen(ssh + ["-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                      f"{local}:127.0.0.1:{target}", "lab1"], stderr=subprocess.PIPE, text=True)
        try:
            assert forwarding(fwd, local), "ssh -L never listened"
            code, _ = get(f"http://127.0.0.1:{local}/health", timeout=5)
        finally:
            fwd.kill()
            err = fwd.communicate(timeout=10)[1]
        assert (code == 200) == allowed, (target, err)
        if not allowed:
            assert "administratively prohibited" in err


def test_testers_come_and_go_without_restarting_the_app(tester, tmp_path):
    def app_pid() -> int:
        status = json_data(qabox("status", "--host", "lab1", "--env", tester["env"], "--json").stdout)
        return status["hosts"][0]["envs"][0]["pid"]

    pid = app_pid()
    name = tester["name"] + "b"
    added = add_tester(name, tmp_path / "second")
    try:
        port = added["ports"][tester["env"]]
        assert http_get("lab1", port, "/health") == (200, "ok")
        logs = qabox("logs", "--host", "lab1", "--env", tester["env"], "-n", "5").stdout
        assert f'{name} - - [' in logs
    finally:
        assert qabox("testers", "remove", name, "--host", "lab1").code == 0
    assert http_get("lab1", port, "/health")[0] == 0  # nothing listens there any more
    assert http_get("lab1", tester["ports"][tester["env"]], "/health") == (200, "ok")
    assert app_pid() == pid


def test_removing_a_tester_ends_their_open_tunnel(tester):
    proc, url = start_tunnel(tester)
    try:
        assert get(url + "/health") == (200, "ok")
        removed = qabox("testers", "remove", tester["name"], "--host", "lab1")
        assert removed.code == 0 and "1 open tunnel(s) ended" in removed.stdout, removed
        code = proc.wait(timeout=30)  # its reconnect is refused: it ends instead of retrying
    finally:
        if proc.poll() is None:
            stop(proc)
    err = proc.stderr.read()
    assert code == 3 and "tunnel to lab1/" in err and "no longer accepts" in err, err
    assert "Traceback" not in err


def test_a_dead_background_thread_is_raised_not_hidden(tester, monkeypatch):
    from qabox import tunnel
    from qabox.context import Context

    def broken(link, timeout):
        raise RuntimeError("boom")

    monkeypatch.setattr(tunnel.Link, "alive", broken)  # the watch thread's first keepalive
    port = free_port()
    with tunnel.Tunnel(Context.create(), "lab1", tester["env"], tester["name"], port,
                       tester["key"]) as t:
        assert get(t.url + "/health") == (200, "ok")
        assert wait_until(lambda: t.error is not None, tunnel.KEEPALIVE_INTERVAL + 10)
        with pytest.raises(tunnel.TunnelBroken, match="RuntimeError: boom"):
            t.refresh()
    assert port_is_free(port)  # the with block closed it


def test_detach_tunnels_and_stop(tester):
    result = qabox("tunnel", "--user", tester["name"], "--host", "lab1", "--env", tester["env"],
                   "-i", tester["key"], "--detach")
    assert result.code == 0, result
    url = re.search(r"http://127\.0\.0\.1:\d+", result.stdout).group(0)
    assert get(url + "/health")[0] == 200
    listing = json_data(qabox("tunnels", "--json").stdout)["tunnels"]
    assert [(t["user"], t["host"], t["env"], t["url"], t["state"]) for t in listing] == [
        (tester["name"], "lab1", tester["env"], url, "connected")]
    stopped = qabox("tunnel", "--stop", "--user", tester["name"])
    assert stopped.code == 0 and "stopped" in stopped.stdout
    assert json_data(qabox("tunnels", "--json").stdout)["tunnels"] == []
    assert get(url + "/health", timeout=3)[0] == 0


def test_deploy_notice_reaches_a_running_tunnel(tester, make_build):
    proc, url = start_tunnel(tester)
    shown = Lines(proc.stderr)
    try:
        build = make_build({"wsgi.py": "from flask import Flask\napp = Flask(__name__)\n"
                                       "@app.get('/')\ndef i():\n    return 'v2'\n"})
        result = qabox("deploy", build, "--host", "lab1", "--env", tester["env"], "--json")
        release = json_data(result.stdout)["release"]
        assert get(url + "/") == (200, "v2")
        notice = f"lab1/{tester['env']}: release {release} deployed by"
        assert wait_until(lambda: shown.saying(notice), 20), shown.lines
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def session_records(tester) -> list[dict]:
    """The tester's session records on lab1 (``connected/NAME-PID.json``), as its agent wrote them."""
    code = "import glob,json,sys; print(json.dumps([json.load(open(p)) for p in glob.glob(sys.argv[1])]))"
    pattern = f"{LAB_HOME}/.qabox/connected/{tester['name']}-*.json"
    return json.loads(in_host("lab1", "/usr/bin/python3", "-c", code, pattern).stdout)


def presence(tester) -> tuple[list, list]:
    """The tester's connections as `testers list --json` and `status --json` show them."""
    listed = json_data(qabox("testers", "list", "--host", "lab1", "--json").stdout)["testers"]
    envs = json_data(qabox("status", "--host", "lab1", "--env", tester["env"], "--json").stdout)["hosts"][0]["envs"]
    return ([c for t in listed if t["name"] == tester["name"] for c in t["connected"]],
            [c for c in envs[0]["testers"] if c["name"] == tester["name"]])


def test_presence_and_notices_outlast_a_killed_session(tester, make_build):
    """The tester session's process on the host is killed while the tunnel stays
    up: the tester stays connected (once) in `testers list` and `status`, the
    tunnel opens its session again, so a deploy's notice reaches it, and its
    traffic never stops."""
    proc, url = start_tunnel(tester)
    shown = Lines(proc.stderr)
    answers, done = [], threading.Event()

    def browse() -> None:
        while not done.wait(0.05):
            answers.append(get(url + "/health", timeout=10)[0])

    browser = threading.Thread(target=browse, daemon=True)
    try:
        first = wait_until(lambda: session_records(tester), 10)
        assert len(first) == 1 and first[0]["sshd"], first
        first = first[0]
        browser.start()
        in_host("lab1", "kill", "-9", str(first["pid"]))

        def back() -> dict | None:
            listed, in_status = presence(tester)
            assert len(listed) == len(in_status) == 1, (listed, in_status)  # never gone, never twice
            again = listed[0]
            return again if again["session"] and again["pid"] != first["pid"] else None

        again = wait_until(back, 30)
        assert again and again["since"] == first["since"], (first, again)  # the tunnel's, not the session's
        build = make_build({"wsgi.py": "from flask import Flask\napp = Flask(__name__)\n"
                                       "@app.get('/')\n@app.get('/health')\ndef i():\n    return 'ok'\n"})
        result = qabox("deploy", build, "--host", "lab1", "--env", tester["env"], "--json")
        assert result.code == 0, result
        release = json_data(result.stdout)["release"]
        assert wait_until(lambda: shown.saying(f"lab1/{tester['env']}: release {release} deployed by"), 30)
        done.set()
        # Idle for longer than the host waits for a word from a session: its heartbeats keep it open.
        time.sleep(SESSION_IDLE + 3)
        listed, in_status = presence(tester)
        assert listed == [again] and [{k: v for k, v in c.items() if k != "requests"} for c in in_status] == [again]
    finally:
        done.set()
        if browser.is_alive():
            browser.join(15)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    err = shown.text()
    assert answers and set(answers) == {200}, answers
    states = [line.rsplit(", ", 1)[0] for line in err.splitlines() if line.endswith("requests served")]
    assert states == ["connected", "connected (host session ended, opening it again: no deploy notices meanwhile)",
                      "connected", "stopped"], err
    assert "Traceback" not in err


def cut_link(seconds: float) -> None:
    subprocess.run([sys.executable, str(LAB), "link", "lab1", "down"], check=True)
    try:
        time.sleep(seconds)
    finally:
        subprocess.run([sys.executable, str(LAB), "link", "lab1", "up"], check=True)


def wait_served(url: str, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if get(url + "/health", timeout=3)[0] == 200:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def test_tunnel_survives_a_cut_link(tester):
    proc, url = start_tunnel(tester)
    try:
        cut_link(5)  # shorter than the keepalive's patience: the same link carries on
        assert wait_served(url, 30) is not None
    finally:
        _, err = stop(proc)
    assert "Traceback" not in err


def tunnel_sshd_sessions(tester) -> list[str]:
    """Pids of the sshd processes serving the tester's tunnel (its session's parent)."""
    out = in_host("lab1", "sh", "-c", f"pgrep -f 'tester-sessio[n] .* {tester['name']}$'").stdout.split()
    parents = [in_host("lab1", "ps", "-o", "ppid=", "-p", pid).stdout.strip() for pid in out]
    return [p for p in parents if p]


def test_tunnel_survives_its_sshd_session_killed(tester):
    proc, url = start_tunnel(tester)
    shown = Lines(proc.stderr)
    try:
        sessions = tunnel_sshd_sessions(tester)
        assert sessions
        in_host("lab1", "kill", "-9", *sessions)
        assert wait_until(lambda: shown.saying("reconnecting"), 30), shown.lines  # it noticed
        assert wait_served(url, 30) is not None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)


def test_tunnel_survives_a_frozen_session(tester):
    proc, url = start_tunnel(tester)
    sessions = tunnel_sshd_sessions(tester)
    try:
        in_host("lab1", "kill", "-STOP", *sessions)
        started = time.monotonic()
        served = wait_served(url, 40)
        assert served is not None and time.monotonic() - started < 30
    finally:
        in_host("lab1", "kill", "-KILL", *sessions)
        _, err = stop(proc)
    assert "no answer from the host" in err


def test_app_down_fails_the_request_but_not_the_tunnel(tester):
    proc, url = start_tunnel(tester)
    try:
        assert qabox("stop", "--host", "lab1", "--env", tester["env"]).code == 0
        assert get(url + "/health", timeout=5)[0] == 0
        assert qabox("start", "--host", "lab1", "--env", tester["env"]).code == 0
        assert get(url + "/health")[0] == 200
    finally:
        stop(proc)


def test_tunnel_without_host_takes_the_testers_earlier_one(tester):
    proc, url = start_tunnel(tester)
    stop(proc)
    proc = subprocess.Popen([sys.executable, "-m", "qabox", "tunnel", "--user", tester["name"],
                             "--env", tester["env"], "-i", tester["key"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"tunnel to lab1/{tester['env']}: {url}" in proc.stdout.readline()
    finally:
        stop(proc)


def test_tunnel_without_host_when_it_is_not_clear(tmp_path, monkeypatch):
    from qabox.context import Context
    from qabox.commands.tunnel import tester_host

    monkeypatch.setenv("QABOX_HOSTS_DIR", str(tmp_path))
    (tmp_path / "oldbox.toml").write_text("[testers.solo]\nport = 25000\n")
    assert tester_host(Context.create(), "solo") == "oldbox"  # the hosts file names the tester
    result = qabox("tunnel", "--user", "nobody")
    assert result.code == 2 and "name the host: qabox tunnel --user nobody --host HOST" in result.stderr
    Context.create().save_state("ports.json", {"nobody@a/main": 20001, "nobody@b/main": 20002})
    result = qabox("tunnel", "--user", "nobody")
    assert result.code == 2 and "tester nobody could tunnel to a, b: say which with --host" in result.stderr


def test_bad_tester_input():
    assert qabox("tunnel", "--user", "../x", "--host", "lab1").code == 2
    result = qabox("testers", "add", "a;b", "--key", "/etc/hostname", "--host", "lab1")
    assert result.code == 2 and "is not allowed" in result.stderr
    result = qabox("testers", "add", "ok", "--key", "/nonexistent.pub", "--host", "lab1")
    assert result.code == 2 and "cannot read the tester's public key" in result.stderr


def on_terminal(tester, *args, columns: int = 80) -> tuple[subprocess.Popen, int]:
    """`qabox tunnel` on a terminal of its own (a pty): stdout and stderr both go to it,
    as when a tester runs it."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qabox", "tunnel", "--user", tester["name"], "--host", "lab1",
         "--env", tester["env"], *args], stdin=slave, stdout=slave, stderr=slave,
        env=dict(os.environ, COLUMNS=str(columns), TERM="dumb", NO_COLOR="1"))
    os.close(slave)
    return proc, master


def screen(master: int, until: str | None = None, timeout: float = 30) -> str:
    """What the terminal showed, until `until` appears (or the program closes it);
    "\\r\\n" as "\\n", and a lone "\\r" kept (it rewrites the line)."""
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (until and until.encode() in seen):
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the program ended and closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode().replace("\r\n", "\n")


def test_on_a_terminal_the_header_comes_first_and_the_last_line_counts_every_request(tester):
    proc, master = on_terminal(tester, "-i", tester["key"])
    try:
        shown = screen(master, until="requests served")
        url = re.search(r"http://127\.0\.0\.1:\d+", shown).group(0)
        assert shown == (f"{tester['name']}'s tunnel to lab1/{tester['env']}: {url}  (Ctrl-C to stop)\n"
                         f"\rconnected, 0 requests served")
        for _ in range(3):
            assert get(url + "/health") == (200, "ok")
        proc.send_signal(signal.SIGINT)  # at once: before the status line could catch up
        assert proc.wait(timeout=10) == 0
        shown += screen(master)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert shown.endswith("\rstopped, 3 requests served  \n"), shown  # padded over "connected"


def test_off_a_terminal_a_line_per_state_and_the_true_count_last(tester):
    proc, url = start_tunnel(tester)
    for _ in range(2):
        assert get(url + "/health") == (200, "ok")
    _, err = stop(proc)
    assert err == "connected, 0 requests served\nstopped, 2 requests served\n"


def test_a_refused_key_prints_only_the_error(tester, tmp_path):
    stranger = tmp_path / "stranger"
    new_key(stranger)
    proc, master = on_terminal(tester, "-i", stranger)
    try:
        assert proc.wait(timeout=30) == 3
        shown = screen(master)
    finally:
        os.close(master)
    assert shown == (f"qabox: error: SSH login to {LAB_USER}@{LAB_ADDR}:22 (lab1) was refused: check the "
                     "user and key (User/IdentityFile in ssh_config, or `ssh-add`), and that "
                     f"`ssh -F {LAB_DIR / 'ssh_config'} lab1` works\n"), shown
