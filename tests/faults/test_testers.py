"""A hostile tester with a restricted key and real OpenSSH, on the lab's sshd.

Each test is an attack that worked before it was fixed: listening on the host,
answering as the supervisor through a unix-socket forward, keeping access after
removal, floods, and tester lists that drop other testers' keys.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import (LAB_HOME, LAB_USER, add_tester, free_port, http_get, in_host, json_data, new_key, qabox,
                      remove_env,
                      ssh_as_tester, wait_until)
from qabox.agent import protocol, rules, serve, testers

pytestmark = pytest.mark.usefixtures("lab")
HOME = LAB_HOME


def status(env: str) -> dict:
    result = qabox("status", "--host", "lab1", "--env", env, "--json")
    return json_data(result.stdout)["hosts"][0]["envs"][0]


def authorized_keys() -> str:
    return in_host("lab1", "cat", f"{HOME}/.ssh/authorized_keys").stdout


def forward(ssh: list, *spec: str) -> subprocess.Popen:
    """`ssh -N` with forwards; it exits at once if sshd refuses one."""
    return subprocess.Popen(ssh + ["-N", "-o", "ExitOnForwardFailure=yes", *spec, "lab1"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def refused(proc: subprocess.Popen, seconds: float = 10) -> str:
    """The stderr of an ssh that sshd turned away; fails if it kept running."""
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("sshd accepted the forward: " + proc.communicate()[1])
    return err


class FakeSupervisor:
    """What an attacker serves behind a forwarded control socket: "all is well"."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.asked = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self.asked.append(conn.recv(65536))
                conn.sendall(json.dumps({"ok": True, "port": 1, "state": "running", "pid": 1,
                                         "agent": "agent-x.py"}).encode() + b"\n")


def test_tester_key_cannot_listen_on_the_host(tester, tmp_path):
    ssh = ssh_as_tester(tester, tmp_path)
    victim = tester["ports"][tester["env"]]
    for spec in ([f"127.0.0.1:{victim + 1000}:127.0.0.1:9"], ["0"]):  # a free port, and "any port"
        err = refused(forward(ssh, "-R", *spec))
        assert "remote port forwarding failed" in err, err
    line = next(line for line in authorized_keys().splitlines() if line.endswith(":" + tester["name"]))
    assert 'permitlisten="127.0.0.1:1"' in line


def test_unix_socket_local_forward_to_the_control_socket_is_refused(tester, tmp_path):
    local = tmp_path / "ctl.sock"
    proc = forward(ssh_as_tester(tester, tmp_path), "-L",
                   f"{local}:{HOME}/.qabox/envs/{tester['env']}/ctl.sock")
    try:
        deadline = time.monotonic() + 10
        while not local.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        answer = b""
        if local.exists():
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(local))
                try:
                    sock.sendall(b'{"cmd": "ping"}\n')
                    answer = sock.recv(4096)
                except ConnectionResetError:
                    pass  # sshd refused the channel
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert answer == b"" and "open failed" in err, (answer, err)  # sshd: "the request was denied"


def test_a_forwarded_control_socket_cannot_pose_as_the_supervisor(tester, tmp_path, make_build, port):
    """The attacker's sshd listens at a new env's ctl.sock path before its first
    deploy; the deploy must start the real app, not believe the fake."""
    env = tester["env"] + "n"
    env_dir = f"{HOME}/.qabox/envs/{env}"
    in_host("lab1", "su", LAB_USER, "-c", f"mkdir -p {env_dir}")
    fake = FakeSupervisor()
    proc = forward(ssh_as_tester(tester, tmp_path), "-R", f"{env_dir}/ctl.sock:127.0.0.1:{fake.port}")
    try:
        deadline = time.monotonic() + 10
        while in_host("lab1", "test", "-S", f"{env_dir}/ctl.sock").returncode and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        build = make_build({"wsgi.py": "from flask import Flask\napp = Flask(__name__)\n"
                                       "@app.get('/')\ndef index():\n    return 'real'\n"})
        result = qabox("deploy", build, "--host", "lab1", "--env", env, "--port", port + 1000)
        assert result.code == 0, result
        assert http_get("lab1", port + 1000, "/") == (200, "real")  # really started, really live
        assert status(env)["state"] == "running"
    finally:
        proc.kill()
        proc.communicate()
        from conftest import remove_env
        remove_env("lab1", env)


def test_removed_tester_keeps_no_access_through_an_ssh_n_tunnel(tester, tmp_path):
    ssh = ssh_as_tester(tester, tmp_path)
    own = tester["ports"][tester["env"]]
    local = free_port()
    proc = forward(ssh, "-L", f"{local}:127.0.0.1:{own}")
    try:
        idle = None
        for _ in range(50):
            try:
                idle = socket.create_connection(("127.0.0.1", local), timeout=5)  # held open, no request
                break
            except OSError:
                time.sleep(0.1)
        assert idle is not None

        def connected() -> list:
            return [t["name"] for t in status(tester["env"])["testers"]]

        assert wait_until(lambda: tester["name"] in connected(), 10), connected()  # with no session at all
        assert qabox("testers", "remove", tester["name"], "--host", "lab1").code == 0
        idle.settimeout(5)
        idle.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert idle.recv(4096) == b""  # the connection opened before the removal was closed
        added = add_tester(tester["name"] + "new", tmp_path / "newcomer")
        try:
            assert own not in added["ports"].values()  # ports are never given again
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{local}/health", timeout=5)
                pytest.fail("the removed tester's tunnel still reaches an app")
            except OSError:
                pass
        finally:
            qabox("testers", "remove", tester["name"] + "new", "--host", "lab1")
    finally:
        proc.kill()
        proc.communicate()


def test_tester_added_while_the_supervisor_is_down_gets_a_listener(tester, tmp_path):
    supervisor = status(tester["env"])["supervisor_pid"]
    in_host("lab1", "kill", "-9", str(supervisor))
    name = tester["name"] + "late"
    added = add_tester(name, tmp_path / "late")
    try:
        assert status(tester["env"])["supervisor_revived"]  # adopts the app, binds the new port
        late = added["ports"][tester["env"]]
        assert http_get("lab1", late, "/health") == (200, "ok")
    finally:
        qabox("testers", "remove", name, "--host", "lab1")


def test_a_port_held_by_another_process_is_never_healthy(tester):
    """Defence in depth: should anything but the supervisor listen on a tester's
    port (here a plain program), status says so and start refuses, naming it."""
    env = tester["env"]
    own = tester["ports"][env]
    assert qabox("stop", "--host", "lab1", "--env", env).code == 0
    squatter = subprocess.Popen(["python3", "scripts/lab", "exec", "lab1", "--", "su", LAB_USER, "-c",
                                 f"exec python3 -c 'import socket,time; s=socket.socket(); "
                                 f"s.bind((\"127.0.0.1\", {own})); s.listen(); time.sleep(60)'"])
    try:
        deadline = time.monotonic() + 10
        while f":{own} " not in in_host("lab1", "ss", "-ltnH", f"sport = :{own}").stdout:  # it listens
            assert time.monotonic() < deadline
            time.sleep(0.1)
        started = qabox("start", "--host", "lab1", "--env", env)
        assert started.code != 0 and f"tester {tester['name']}'s port {own} is held by pid" in started.stderr, started
        assert "nothing was changed" in started.stderr
    finally:
        squatter.kill()
        in_host("lab1", "pkill", "-f", f"s.bind..\"127.0.0.1\", {own}")
    assert qabox("start", "--host", "lab1", "--env", env).code == 0


def test_session_stdin_flood_ends_the_session(tester, tmp_path):
    ssh = ssh_as_tester(tester, tmp_path)
    flood = subprocess.Popen(ssh + ["lab1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    sent = 0
    try:
        chunk = b"x" * (1 << 20)
        while sent < 64 << 20 and flood.poll() is None:
            try:
                flood.stdin.write(chunk)
                sent += len(chunk)
            except BrokenPipeError:
                break
        flood.wait(timeout=30)
    finally:
        flood.kill()
    assert sent < 16 << 20, sent  # it stopped reading after the first MiB or so


def test_sessions_per_tester_are_capped(tester, tmp_path):
    ssh = ssh_as_tester(tester, tmp_path)
    request = json.dumps({"protocol": protocol.PROTOCOL, "cmd": "tester-session", "args": {}}) + "\n"
    sessions = []
    try:
        for _ in range(testers.MAX_SESSIONS):
            proc = subprocess.Popen(ssh + ["lab1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc.stdin.write(request)
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline())["ok"] is True
            sessions.append(proc)
        extra = subprocess.run(ssh + ["lab1"], input=request, capture_output=True, text=True, timeout=30)
        assert json.loads(extra.stdout.splitlines()[0])["error"]["code"] == "too_many_sessions"
    finally:
        for proc in sessions:
            proc.kill()


def test_another_base_keeps_its_testers_and_a_bad_list_changes_nothing(tester, tmp_path, monkeypatch):
    hosts = tmp_path / "other-hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text('dir = ".qabox-other"\n')
    key = tmp_path / "elsewhere"
    new_key(key)
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    try:
        assert qabox("testers", "add", "elsewhere", "--key", f"{key}.pub", "--host", "lab1").code == 0
        keys = authorized_keys()
        assert keys.count(":" + tester["name"] + "\n") == 1 and keys.count(":elsewhere\n") == 1
        in_host("lab1", "sh", "-c", f"echo garbage > {HOME}/.qabox-other/testers.json")
        result = qabox("testers", "add", "second", "--key", f"{key}.pub", "--host", "lab1")
        assert result.code != 0 and "is not a readable tester list" in result.stderr, result
        assert authorized_keys() == keys
    finally:
        in_host("lab1", "sh", "-c", f"rm -rf {HOME}/.qabox-other; "
                f"sed -i '/qabox-other/d' {HOME}/.ssh/authorized_keys")


@pytest.mark.parametrize("name", ["sec9\n", "a\nb", "x\r"])
def test_names_with_line_breaks_are_refused(name, tmp_path):
    key = tmp_path / "k"
    new_key(key)
    assert qabox("status", "--host", "lab1", "--env", name).code == 2
    assert qabox("testers", "add", name, "--key", f"{key}.pub", "--host", "lab1").code == 2
    assert rules.ENV_NAME.fullmatch(name) is None


@pytest.mark.parametrize("banner, ok", [
    ("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6", True), ("SSH-2.0-OpenSSH_7.8", True),
    ("SSH-2.0-OpenSSH_7.4", False), ("SSH-2.0-OpenSSH_7.6p1 Ubuntu-4", False), ("SSH-2.0-dropbear_2022.83", False)])
def test_tester_keys_need_openssh_7_8(banner, ok):
    if ok:
        rules.check_sshd(banner)
        return
    with pytest.raises(protocol.Fail) as failed:
        rules.check_sshd(banner)
    assert "7.8" in failed.value.message and "no tester key was added" in failed.value.message or \
        "not OpenSSH" in failed.value.message


SLOWLORIS = """
import json, socket, sys, time, urllib.request
own, other, main = map(int, sys.argv[1:4])
held = []
for _ in range(300):  # idle connections to the tester's own port, never a request
    try:
        held.append(socket.create_connection(("127.0.0.1", own), timeout=2))
    except OSError:
        break
time.sleep(1)
def get(port):
    try:
        return urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5).status
    except Exception as e:
        return repr(e)
answers = {"other": get(other), "main": get(main)}
for s in held:
    s.close()
time.sleep(1)
answers["after"] = get(main)
print(json.dumps(answers))
"""


def test_one_tester_cannot_starve_the_others(tester, tmp_path, port):
    name = tester["name"] + "o"
    added = add_tester(name, tmp_path / "other")
    try:
        hangs = status(tester["env"])["hangs"]
        own, other = tester["ports"][tester["env"]], added["ports"][tester["env"]]
        proc = in_host("lab1", "/usr/bin/python3", "-c", SLOWLORIS, str(own), str(other), str(port), timeout=120)
        answers = json.loads(proc.stdout)
        assert answers == {"other": 200, "main": 200, "after": 200}, (answers, proc.stderr)
        logs = qabox("logs", "--host", "lab1", "--env", tester["env"], "-n", "200").stdout
        assert f"connection cap reached ({tester['name']} has {serve.MAX_CONNECTIONS_PER_PORT} open" in logs
        assert status(tester["env"])["hangs"] == hangs  # the health probe got through all along
    finally:
        qabox("testers", "remove", name, "--host", "lab1")


def test_a_scoped_expiring_tester_reaches_their_env_only_until_expiry(tester, tmp_path, notes_build, port):
    ssh = ssh_as_tester(tester, tmp_path)
    env, other, name = tester["env"], tester["env"] + "b", tester["name"]

    def reach(target_port: int) -> subprocess.CompletedProcess:
        return subprocess.run(ssh + ["-W", f"127.0.0.1:{target_port}", "lab1"], capture_output=True, text=True,
                              input="GET /health HTTP/1.0\r\n\r\n", timeout=30)

    def listed() -> dict:
        result = qabox("testers", "list", "--host", "lab1", "--json")
        return next(t for t in json_data(result.stdout)["testers"] if t["name"] == name)

    assert qabox("testers", "add", name, "--key", tester["key"] + ".pub", "--host", "lab1", "--env", env).code == 0
    try:
        assert qabox("deploy", notes_build, "--host", "lab1", "--env", other, "--port", port + 1).code == 0
        unscoped = add_tester(name + "all", tmp_path / "all")  # an unscoped tester gets the env deployed later
        row = listed()
        assert row["envs"] == [env] and list(row["ports"]) == [env] and row["expires"] is None  # not the new env
        assert " 200 OK" in reach(row["ports"][env]).stdout
        denied = reach(unscoped["ports"][other])
        assert "administratively prohibited" in denied.stderr or "open failed" in denied.stderr, denied

        local = free_port()
        tunnel = forward(ssh, "-L", f"{local}:127.0.0.1:{row['ports'][env]}")  # ssh -N: no session
        request = json.dumps({"protocol": protocol.PROTOCOL, "cmd": "tester-session", "args": {}}) + "\n"
        session = subprocess.Popen(ssh + ["lab1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            session.stdin.write(request)
            session.stdin.flush()
            assert list(json.loads(session.stdout.readline())["data"]["envs"]) == [env]  # their envs only
            idle = wait_until(lambda: _connect(local), 10)
            assert idle is not None
            added = qabox("testers", "add", name, "--key", tester["key"] + ".pub", "--host", "lab1",
                          "--env", env, "--expires", "3s", "--json")
            assert added.code == 0 and json_data(added.stdout)["expires"], added
            assert 'expiry-time="' in next(line for line in authorized_keys().splitlines()
                                            if line.endswith(":" + name))
            session.wait(timeout=30)  # the session ended its own SSH connection at expiry
            idle.settimeout(10)
            assert idle.recv(4096) == b""  # the supervisor closed what the ssh -N tunnel had open
            assert listed()["expired"] is True
            # sshd refuses from the second after expiry-time on
            refused_login = wait_until(lambda: "Permission denied" in reach(row["ports"][env]).stderr, 10)
            assert refused_login, reach(row["ports"][env])
            extended = qabox("testers", "extend", name, "--expires", "1h", "--host", "lab1")
            assert extended.code == 0 and "expires 20" in extended.stdout, extended
            assert wait_until(lambda: " 200 OK" in reach(row["ports"][env]).stdout, 10)  # back again
            assert listed()["expired"] is False
        finally:
            session.kill()
            tunnel.kill()
            tunnel.communicate()
    finally:
        qabox("testers", "remove", name + "all", "--host", "lab1")
        remove_env("lab1", other)


def _connect(local: int):
    try:
        return socket.create_connection(("127.0.0.1", local), timeout=5)
    except OSError:
        return None
