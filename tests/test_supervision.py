"""Keeping the app up on a real lab host: restarts, hangs, crash loops, adoption,
graceful stops, zero-failure redeploys, logs, releases and rollback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import LAB, LAB_HOME, LAB_USER, Lines, app_pids, http_get, in_host, json_data, qabox, wait_until

pytestmark = pytest.mark.usefixtures("lab")

APP = """
import os, threading, time
from flask import Flask, request
DATA = os.environ["QABOX_DATA_DIR"]
POISON = os.path.join(DATA, "poison")
if os.path.exists(POISON):  # fail at import while the poison count lasts
    left = int(open(POISON).read())
    if left > 0:
        open(POISON, "w").write(str(left - 1))
        raise SystemExit("poisoned start, %d left" % left)
app = Flask(__name__)
hung = threading.Event()

@app.get("/")
def index():
    return "VERSION"

@app.get("/health")
def health():
    if hung.is_set():
        time.sleep(3600)
    return "ok"

@app.get("/pid")
def pid():
    return str(os.getpid())

@app.get("/slow")
def slow():
    open(os.path.join(DATA, "slow"), "w").close()  # tests wait for this: the request is in flight
    time.sleep(float(request.args.get("s", "0.3")))
    return "slept"

@app.get("/hang")
def hang():
    hung.set()
    return "hanging"

@app.get("/crash")
def crash():
    os._exit(3)

@app.get("/poison")
def poison():
    open(POISON, "w").write(request.args.get("n", "4"))
    os._exit(4)
"""


@pytest.fixture
def app_build(make_build):
    return lambda version="v1": make_build({"wsgi.py": APP.replace("VERSION", version),
                                            "qabox.toml": '[app]\nhealth = "/health"\n'})


@pytest.fixture
def fast_probes(tmp_path, monkeypatch):
    """Health probes every 0.5 s on lab1 (the default 10 s would make tests slow)."""
    hosts = tmp_path / "fast-hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("health_interval = 0.5\nlog_max_mb = 0.002\n")
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))


def deploy(build, env, port, *extra):
    result = qabox("deploy", build, "--host", "lab1", "--env", env, "--port", port, *extra)
    assert result.code == 0, result
    return result


def status(env):
    result = qabox("status", "--host", "lab1", "--env", env, "--json")
    return json_data(result.stdout)["hosts"][0]["envs"][0]


def get(port, path="/"):
    return http_get("lab1", port, path)



def test_killed_app_serves_again_within_3_s(app_build, env_name, port):
    deploy(app_build(), env_name, port)
    pid = int(get(port, "/pid")[1])
    in_host("lab1", "kill", "-9", str(pid))
    killed = time.monotonic()
    new_pid = wait_until(lambda: (lambda r: r[0] == 200 and r[1] != str(pid) and r[1])(get(port, "/pid")), 10, 0.05)
    assert new_pid and time.monotonic() - killed < 3
    env = wait_until(lambda: (lambda e: e["state"] == "running" and e)(status(env_name)), 5)
    assert env["restarts"] == 1 and env["pid"] == int(new_pid) and env["last_exit"] == -9


def test_app_that_exits_itself_is_restarted(app_build, env_name, port):
    deploy(app_build(), env_name, port)
    get(port, "/crash")
    assert wait_until(lambda: get(port, "/")[0] == 200, 5)
    assert wait_until(lambda: status(env_name)["restarts"] == 1, 5)


def test_crash_loop_stops_restarting_and_start_clears_it(app_build, env_name, port):
    deploy(app_build(), env_name, port)
    get(port, "/poison?n=4")  # this exit, then 4 failed starts: 5 quick exits
    env = wait_until(lambda: (lambda e: e["state"] == "crashed" and e)(status(env_name)), 30, 0.5)
    assert env, status(env_name)
    assert env["last_exit"] == 1 and any("poisoned start" in line for line in env["last_log"])
    result = qabox("status", "--host", "lab1", "--env", env_name)
    assert "crashed" in result.stdout
    started = qabox("start", "--host", "lab1", "--env", env_name)
    assert started.code == 0 and "is running" in started.stdout
    assert get(port, "/")[0] == 200 and status(env_name)["state"] == "running"


def test_hung_app_is_restarted_and_counted_as_a_hang(app_build, env_name, port, fast_probes):
    deploy(app_build(), env_name, port)
    pid = get(port, "/pid")[1]
    get(port, "/hang")
    assert wait_until(lambda: get(port, "/pid")[1] not in ("", pid), 20, 0.5)
    env = wait_until(lambda: (lambda e: e["hangs"] == 1 and e)(status(env_name)), 5)
    assert env and env["state"] == "running"


def test_stop_is_graceful_and_leaves_no_process(app_build, env_name, port):
    deploy(app_build(), env_name, port)
    slow = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "curl", "-s",
                             f"http://127.0.0.1:{port}/slow?s=2"], stdout=subprocess.PIPE, text=True)
    in_flight = f"{LAB_HOME}/.qabox/envs/{env_name}/data/slow"
    assert wait_until(lambda: in_host("lab1", "test", "-e", in_flight).returncode == 0, 10)
    result = qabox("stop", "--host", "lab1", "--env", env_name)
    assert result.code == 0 and "stopped" in result.stdout
    assert slow.communicate(timeout=15)[0] == "slept"  # the in-flight request finished
    assert in_host("lab1", "pgrep", "-f", f"/envs/{env_name}/").stdout == ""
    assert status(env_name)["state"] == "stopped"
    assert qabox("stop", "--host", "lab1", "--env", env_name).stdout.strip().endswith("already stopped")
    assert qabox("start", "--host", "lab1", "--env", env_name).code == 0
    assert get(port, "/")[0] == 200


def test_killed_supervisor_is_revived_and_adopts_the_app(app_build, env_name, port):
    deploy(app_build(), env_name, port)
    app_pid = get(port, "/pid")[1]
    supervisor = status(env_name)["supervisor_pid"]
    in_host("lab1", "kill", "-9", str(supervisor))
    assert get(port, "/")[0] == 200  # the app keeps serving meanwhile
    env = status(env_name)  # the next qabox command notices
    assert env["supervisor_revived"] and env["supervisor_pid"] not in (None, supervisor)
    assert env["state"] == "running" and str(env["pid"]) == app_pid  # adopted, not duplicated
    assert app_pids(env_name) == [int(app_pid)]
    in_host("lab1", "kill", "-9", app_pid)  # the new supervisor restarts it on the same socket
    assert wait_until(lambda: (lambda r: r[0] == 200 and r[1] != app_pid)(get(port, "/pid")), 10)


def test_redeploy_under_load_fails_no_request(app_build, env_name, port):
    deploy(app_build("v1"), env_name, port)
    load = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "/usr/bin/python3", "-c",
                             LOAD, str(port), "15"], stdout=subprocess.PIPE, text=True)
    assert load.stdout.readline() == "serving\n"
    deploy(app_build("v2"), env_name, port)
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
    assert qabox("rollback", "--host", "lab1", "--env", env_name).code == 0
    out, _ = load.communicate(timeout=60)
    stats = json.loads(out)
    assert stats["failed"] == 0, stats
    assert stats["ok"] >= 200 and {"v1", "v2"} <= set(stats["bodies"])



def test_agent_upgrade_under_load_fails_no_request(app_build, env_name, port, monkeypatch):
    """A supervisor of another agent build hands over to the new one (which adopts
    the running app) instead of stopping the app: both ways, no request fails."""
    from qabox import remote
    from qabox.agent_zip import hash_of

    original = (remote.AGENT_PYZ, remote.AGENT_HASH)
    other = b"#!/usr/bin/env python3\n" + remote.AGENT_PYZ  # another build of the agent: a zipapp may start so
    builds = [(other, hash_of(other)), original]
    deploy(app_build("v1"), env_name, port)
    load = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "/usr/bin/python3", "-c",
                             LOAD, str(port), "8"], stdout=subprocess.PIPE, text=True)
    assert load.stdout.readline() == "serving\n"
    supervisors = [status(env_name)["supervisor_pid"]]
    for source, digest in builds:
        monkeypatch.setattr(remote, "AGENT_PYZ", source)
        monkeypatch.setattr(remote, "AGENT_HASH", digest)
        assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
        supervisors.append(status(env_name)["supervisor_pid"])
    out, _ = load.communicate(timeout=60)
    stats = json.loads(out)
    assert stats["failed"] == 0, stats
    assert stats["ok"] >= 100
    assert len(set(supervisors)) == 3  # each agent build ran a supervisor of its own


# 4 clients send requests for N seconds at up to 50/s each; counts failures. Prints "serving"
# once the app has answered one (or "no answer" after 10 s), then the counts as JSON.
LOAD = """
import json, sys, threading, time, urllib.request
port, seconds = int(sys.argv[1]), float(sys.argv[2])
stats = {"ok": 0, "failed": 0, "bodies": set(), "errors": []}
lock = threading.Lock()
answered = threading.Event()
def client():
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            body = urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=10).read().decode()
            with lock:
                stats["ok"] += 1; stats["bodies"].add(body)
            answered.set()
        except Exception as e:
            with lock:
                stats["failed"] += 1; stats["errors"].append(repr(e))
        time.sleep(0.02)
threads = [threading.Thread(target=client) for _ in range(4)]
[t.start() for t in threads]
print("serving" if answered.wait(10) else "no answer", flush=True)
[t.join() for t in threads]
stats["bodies"] = sorted(stats["bodies"]); stats["errors"] = stats["errors"][:5]
print(json.dumps(stats))
"""


def test_logs_show_requests_and_follow_ends_cleanly(app_build, env_name, port, fast_probes):
    deploy(app_build(), env_name, port)
    get(port, "/pid")
    result = qabox("logs", "--host", "lab1", "--env", env_name, "-n", "20")
    assert result.code == 0 and '"GET /pid HTTP/1.1" 200' in result.stdout
    assert "/health" not in result.stdout  # the supervisor's probes are not logged
    follow = subprocess.Popen([sys.executable, "-m", "qabox", "logs", "--host", "lab1", "--env", env_name,
                               "-n", "0", "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ.copy())
    out = Lines(follow.stdout)
    # it follows once it prints a request sent while it starts; one sent after that, it must follow
    assert wait_until(lambda: get(port, "/slow?s=0") and out.saying("GET /slow?s=0"), 20, 0.5), out.lines
    get(port, "/slow?s=0&after=1")
    assert wait_until(lambda: out.saying("GET /slow?s=0&after=1"), 10), out.lines
    follow.send_signal(signal.SIGINT)
    started = time.monotonic()
    follow.wait(timeout=10)
    assert time.monotonic() - started < 2
    err = follow.stderr.read()
    assert follow.returncode == 0 and "GET /slow?s=0" in out.text() and "Traceback" not in err


def test_logs_rotate_by_size(app_build, env_name, port, fast_probes):
    deploy(app_build(), env_name, port)
    in_host("lab1", "sh", "-c", f"for i in $(seq 150); do curl -s 127.0.0.1:{port}/slow?s=0 >/dev/null; done")

    def logs():
        return in_host("lab1", "ls", f"{LAB_HOME}/.qabox/envs/{env_name}/logs").stdout.split()

    assert wait_until(lambda: any(name.endswith(".log.1") for name in logs()), 10), logs()


def test_releases_and_rollback_keep_data(app_build, env_name, port):
    deploy(app_build("v1"), env_name, port)
    deploy(app_build("v2"), env_name, port)
    in_host("lab1", "sh", "-c", f"echo kept > {LAB_HOME}/.qabox/envs/{env_name}/data/note")
    listing = json_data(qabox("releases", "--host", "lab1", "--env", env_name, "--json").stdout)
    first, second = [r["release"] for r in listing["releases"]]
    assert listing["current"] == second and listing["releases"][1]["current"]
    assert qabox("releases", "--host", "lab1", "--env", env_name).stdout.count("\n") == 3
    result = qabox("rollback", "--host", "lab1", "--env", env_name)
    assert result.code == 0 and f"rolled back to release {first}" in result.stdout
    assert get(port, "/")[1] == "v1"
    assert qabox("rollback", "--host", "lab1", "--env", env_name, "--to", second).code == 0
    assert get(port, "/")[1] == "v2"
    missing = qabox("rollback", "--host", "lab1", "--env", env_name, "--to", "20000101-000000")
    assert missing.code == 6 and "is not kept on this host" in missing.stderr
    bad = qabox("rollback", "--host", "lab1", "--env", env_name, "--to", "../../etc")
    assert bad.code == 2 and "is not a release id" in bad.stderr
    assert in_host("lab1", "cat", f"{LAB_HOME}/.qabox/envs/{env_name}/data/note").stdout == "kept\n"


def test_envs_side_by_side_get_their_own_ports(app_build, env_name):
    other = env_name + "b"
    try:
        first = json_data(qabox("deploy", app_build("a"), "--host", "lab1", "--env", env_name, "--json").stdout)
        second = json_data(qabox("deploy", app_build("b"), "--host", "lab1", "--env", other, "--json").stdout)
        assert first["port"] != second["port"]
        assert get(first["port"])[1] == "a" and get(second["port"])[1] == "b"
        clash = qabox("deploy", app_build("c"), "--host", "lab1", "--env", other, "--port", first["port"])
        assert clash.code == 6 and f"is already the port of env {env_name}" in clash.stderr
        names = {e["env"] for e in json_data(qabox("status", "--host", "lab1", "--json").stdout)["hosts"][0]["envs"]}
        assert {env_name, other} <= names
    finally:
        from conftest import remove_env
        remove_env("lab1", other)


def test_on_boot_brings_envs_back_after_a_reboot(app_build, env_name, port):
    deploy(app_build(), env_name, port, "--on-boot")
    crontab = in_host("lab1", "crontab", "-u", LAB_USER, "-l").stdout
    boot_line = next(line for line in crontab.splitlines() if line.startswith("@reboot"))
    deploy(app_build(), env_name, port, "--on-boot")  # idempotent: one entry
    assert in_host("lab1", "crontab", "-u", LAB_USER, "-l").stdout.count("@reboot") == 1
    # a "reboot": every process of the env gone, then cron's @reboot command
    in_host("lab1", "sh", "-c", f"pkill -KILL -f 'supervi[s]e [^ ]+ {env_name} '; pkill -KILL -f '/env[s]/{env_name}/'")
    assert get(port, "/")[0] == 0
    in_host("lab1", "su", LAB_USER, "-c", boot_line.split(" ", 1)[1])
    assert wait_until(lambda: get(port, "/")[0] == 200, 10)
