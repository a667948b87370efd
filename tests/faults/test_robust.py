"""Faults of the host's own state, injected on the lab's real hosts: refused
ports, a supervisor killed mid-switch, a full disk, lost or damaged state
files, a deleted ``current`` link, and input that used to give cryptic errors.
Each ends with the current release serving and one line saying what to do."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import LAB, LAB_USER, _ports, app_pids, http_get, in_host, json_data, qabox, remove_env, wait_until
from test_deploy import in_host_background
from test_faults import HOME, example_build, small_disk  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("lab")
BASE = f"{HOME}/.qabox-robust"  # a base of our own on the shared lab host, with no testers

APP = """
import os
from flask import Flask
app = Flask(__name__)

@app.get("/release")
def release():
    return os.environ["QABOX_RELEASE"]

@app.get("/pid")
def pid():
    return str(os.getpid())

@app.get("/")
@app.get("/health")
def health():
    return "ok"
# VERSION
"""


@pytest.fixture(autouse=True)
def own_base(tmp_path, monkeypatch, env_name):
    """lab1's deploy directory is BASE in these tests; the env is removed after."""
    hosts = tmp_path / "robust-hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text('port = 8080\ndir = ".qabox-robust"\n')
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    yield
    remove_env("lab1", env_name)
    in_host("lab1", "rm", "-rf", f"{BASE}/envs/{env_name}")


@pytest.fixture
def app_build(make_build):
    """A small app that says its release; each version is a build of its own."""
    return lambda version="v1", health="/health": make_build({
        "wsgi.py": APP.replace("VERSION", version),
        "qabox.toml": '[app]\nhealth = "%s"\n' % health})


def deploy(build, env, port, *extra):
    return qabox("deploy", build, "--host", "lab1", "--env", env, "--port", port, *extra)


def status(env):
    result = qabox("status", "--host", "lab1", "--env", env, "--json")
    return json_data(result.stdout)["hosts"][0]["envs"][0]


def served(port, path="/release"):
    return http_get("lab1", port, path)[1]



def releases(env):
    return in_host("lab1", "ls", "-A", f"{BASE}/envs/{env}/releases").stdout.split()


def one_line_error(result):
    """A failure a user caused: one line on stderr (the app's log lines aside), no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("  |")]
    assert len(lines) == 1 and lines[0].startswith("qabox: error: "), result
    assert "Traceback" not in result.stderr and "Errno" not in lines[0], result
    return lines[0]


def assert_still_serving(env, port, release):
    """The env serves release from its one app process, and status agrees."""
    assert {served(port) for _ in range(5)} == {release}
    now = status(env)
    assert (now["state"], now["release"], now["port"]) == ("running", release, port), now
    assert app_pids(env) == [now["pid"]], (app_pids(env), now)


# ---------------------------------------------------------------- item 4: ports


@pytest.mark.parametrize("kind", ["taken", "privileged"])
def test_a_refused_port_changes_nothing(app_build, env_name, port, kind):
    assert deploy(app_build("v1"), env_name, port).code == 0
    before = served(port)
    new_port = next(_ports) if kind == "taken" else 22
    holder = in_host_background("lab1", new_port) if kind == "taken" else None
    try:
        result = deploy(app_build("v2"), env_name, new_port)
    finally:
        if holder:
            holder.set()
    assert result.code == 6, result
    line = one_line_error(result)
    if kind == "taken":
        assert f"port {new_port} is already in use on the host's loopback by another program" in line
    else:
        assert "port 22 is privileged" in line and "1024" in line
    assert_still_serving(env_name, port, before)
    assert releases(env_name) == [before]
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0  # the env still works
    assert_still_serving(env_name, port, before)


def test_a_port_change_moves_the_env_only_when_the_new_release_is_healthy(app_build, make_build,
                                                                          env_name, port):
    assert deploy(app_build("v1"), env_name, port).code == 0
    before = served(port)
    new_port = next(_ports)
    broken = make_build({"wsgi.py": "raise SystemExit('broken at import')\n"})
    result = deploy(broken, env_name, new_port)
    assert result.code == 6 and "previous release keeps serving" in result.stderr, result
    assert_still_serving(env_name, port, before)  # on its old port
    assert http_get("lab1", new_port, "/release")[0] == 0
    assert deploy(app_build("v2"), env_name, new_port).code == 0
    after = served(new_port)
    assert after != before and http_get("lab1", port, "/release")[0] == 0
    assert_still_serving(env_name, new_port, after)
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
    assert_still_serving(env_name, new_port, after)


# ---------------------------------------------------------------- item 5: supervisor killed mid-switch

# Inside lab1: follow a log and kill -9 a process the moment a line with TEXT appears.
KILL_ON = """
import os, sys, time
path, pid, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path) as f:
    f.seek(0, 2)
    print("ready", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = f.readline()
        if text in line:
            os.kill(pid, 9)
            print(line.strip(), flush=True)
            break
        if not line:
            time.sleep(0.001)
"""


@pytest.mark.parametrize("moment", ["starting ", " is live"])
def test_supervisor_killed_during_a_switch(app_build, env_name, port, moment):
    assert deploy(app_build("v1"), env_name, port).code == 0
    before = served(port)
    supervisor = status(env_name)["supervisor_pid"]
    log = f"{BASE}/envs/{env_name}/logs/supervisor.log"
    killer = subprocess.Popen([sys.executable, str(LAB), "exec", "lab1", "--", "/usr/bin/python3", "-c",
                               KILL_ON, log, str(supervisor), moment], stdout=subprocess.PIPE, text=True)
    assert killer.stdout.readline().strip() == "ready"
    result = deploy(app_build("v2"), env_name, port, "--json")
    assert moment in killer.communicate(timeout=30)[0], "the supervisor was not killed"
    if moment == " is live":  # the switch happened: the deploy says so, and it is kept
        assert result.code == 0, result
        live = json_data(result.stdout)["release"]
        assert live != before
    else:  # it did not: the old release serves, and the new one is gone
        assert result.code == 6, result
        assert "keeps serving" in one_line_error(result)
        live = before
    assert_still_serving(env_name, port, live)
    assert status(env_name)["supervisor_pid"] != supervisor
    assert sorted(releases(env_name)) == sorted({before, live})
    assert qabox("restart", "--host", "lab1", "--env", env_name).code == 0
    assert_still_serving(env_name, port, live)


# ---------------------------------------------------------------- item 6: unmanaged apps


def test_a_lost_state_file_leaves_no_unmanaged_app(app_build, env_name, port):
    assert deploy(app_build("v1"), env_name, port).code == 0
    release, pid = served(port), int(served(port, "/pid"))
    in_host("lab1", "kill", "-9", str(status(env_name)["supervisor_pid"]))
    in_host("lab1", "rm", f"{BASE}/envs/{env_name}/state.json")
    now = status(env_name)  # revives the supervisor, which adopts the app it finds
    assert now["supervisor_revived"] and now["pid"] == pid, now
    assert_still_serving(env_name, port, release)
    stopped = qabox("stop", "--host", "lab1", "--env", env_name)
    assert stopped.code == 0 and stopped.stdout.strip().endswith(": stopped"), stopped
    assert app_pids(env_name) == [] and http_get("lab1", port)[0] == 0
    assert qabox("start", "--host", "lab1", "--env", env_name).code == 0
    assert_still_serving(env_name, port, release)


def fill(mount, in_sshd):
    """Fill the small disk up to its last byte."""
    subprocess.run(in_sshd + ["sh", "-c", f"dd if=/dev/zero of={mount}/filler bs=1M 2>/dev/null; "
                                          f"dd if=/dev/zero of={mount}/filler2 bs=4k 2>/dev/null; true"])


def test_a_full_disk_kills_no_supervisor_and_leaves_no_unmanaged_app(app_build, env_name, port, small_disk):
    mount, in_sshd = small_disk
    assert qabox("deploy", app_build(), "--host", "lab1", "--env", env_name, "--port", port).code == 0
    release = served(port)
    fill(mount, in_sshd)
    try:
        first = int(served(port, "/pid"))
        in_host("lab1", "kill", "-9", str(first))  # the supervisor restarts it, and cannot save its state
        second = wait_until(lambda: (lambda p: p.isdigit() and int(p) != first and int(p))(served(port, "/pid")), 10)
        assert second, "the app was not restarted on a full disk"
        supervisor = status(env_name)["supervisor_pid"]
        time.sleep(2.5)  # its retries to save its state fail too
        now = status(env_name)
        assert (now["state"], now["pid"], now["supervisor_pid"]) == ("running", second, supervisor), now
        in_host("lab1", "kill", "-9", str(supervisor))  # the revived one adopts the app, disk full or not
        now = status(env_name)
        assert now["supervisor_revived"] and (now["state"], now["pid"]) == ("running", second), now
    finally:
        subprocess.run(in_sshd + ["rm", "-f", f"{mount}/filler", f"{mount}/filler2"])
    stopped = qabox("stop", "--host", "lab1", "--env", env_name)
    assert stopped.code == 0 and stopped.stdout.strip().endswith(": stopped"), stopped
    assert app_pids(env_name) == [] and http_get("lab1", port)[0] == 0
    assert qabox("start", "--host", "lab1", "--env", env_name).code == 0
    assert served(port) == release and status(env_name)["state"] == "running"


# ---------------------------------------------------------------- item 11: damaged state files

GARBAGE = {
    "not json": {"env.json": "{port: 80", "state.json": "\x00\x01garbage", "release.json": ""},
    "not an object": {"env.json": "[8080]", "state.json": '"running"', "release.json": "42"},
    "wrong types": {"env.json": '{"port": "8080", "stopped": "no"}',
                    "state.json": '{"pid": "1", "port": 99999, "started_at": "today", "restarts": null}',
                    "release.json": '{"entry": 5, "venv": ["x"], "health": {}}'},
}


def put(path, text):
    """Write a file on lab1 as the deploy account."""
    in_host("lab1", "/usr/bin/python3", "-c", "import sys; open(sys.argv[1], 'w').write("
            "sys.argv[2].encode().decode('unicode_escape'))", path, text.encode("unicode_escape").decode())
    in_host("lab1", "chown", f"{LAB_USER}:{LAB_USER}", path)


@pytest.mark.parametrize("kind", GARBAGE)
def test_a_damaged_state_file_affects_only_its_env(app_build, env_name, port, kind):
    other, other_port = env_name + "b", next(_ports)
    try:
        assert deploy(app_build("a1"), env_name, port).code == 0
        assert deploy(app_build("b1"), other, other_port).code == 0
        release = served(port)
        where = f"{BASE}/envs/{env_name}"
        files = {"env.json": f"{where}/env.json", "state.json": f"{where}/state.json",
                 "release.json": f"{where}/releases/{release}/release.json"}
        for name, path in files.items():
            put(path, GARBAGE[kind][name])
        result = qabox("status", "--host", "lab1", "--json")
        hosts = json_data(result.stdout)["hosts"]
        assert hosts[0]["reachable"], hosts
        envs = {e["env"]: e for e in hosts[0]["envs"]}
        assert envs[other]["state"] == "running" and not envs[other].get("problems"), envs[other]
        problems = " ".join(envs[env_name]["problems"])
        assert all(path in problems for path in files.values()), envs[env_name]
        assert result.code == 1  # something on the host needs fixing
        text = qabox("status", "--host", "lab1", "--env", env_name)
        assert files["env.json"] in text.stdout + text.stderr, text
        # the other env deploys, and this one keeps serving
        assert deploy(app_build("b2"), other, other_port).code == 0
        assert served(port) == release
        # this env refuses what needs the damaged file, naming it
        refused = deploy(app_build("a2"), env_name, port)
        assert refused.code == 6 and files["env.json"] in one_line_error(refused), refused
        assert served(port) == release and releases(env_name) == [release]
        in_host("lab1", "rm", files["env.json"])  # as the error says
        assert deploy(app_build("a2"), env_name, port).code == 0
        now = status(env_name)
        assert now["state"] == "running" and served(port) == now["release"] != release
        assert not now.get("problems"), now  # state.json was written anew
        back = qabox("rollback", "--host", "lab1", "--env", env_name)
        assert back.code == 6 and files["release.json"] in one_line_error(back), back
        assert served(port) == now["release"]
    finally:
        remove_env("lab1", other)
        in_host("lab1", "rm", "-rf", f"{BASE}/envs/{other}")


# ---------------------------------------------------------------- item 14: a deleted current, clear errors


def test_a_deleted_current_link_is_repaired(app_build, env_name, port):
    assert deploy(app_build("v1"), env_name, port).code == 0
    release, pid = served(port), served(port, "/pid")
    link = f"{BASE}/envs/{env_name}/current"
    in_host("lab1", "rm", link)
    assert status(env_name)["release"] == release
    in_host("lab1", "kill", "-9", pid)  # the supervisor restarts it, current or not
    assert wait_until(lambda: served(port, "/pid") not in ("", pid), 10)
    assert_still_serving(env_name, port, release)
    assert in_host("lab1", "readlink", link).stdout.strip() == f"releases/{release}"


def test_a_hosts_file_dir_is_never_pasted_into_a_command(tmp_path, monkeypatch, app_build, port):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text('port = 8080\ndir = "qabox-evil$(touch ~/pwned)"\n')
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    try:
        result = qabox("deploy", app_build(), "--host", "lab1", "--env", "evil", "--port", port, "--on-boot")
        cron = in_host("lab1", "crontab", "-u", LAB_USER, "-l").stdout
        if "qabox-evil" in cron:  # what cron would run at the next reboot
            line = next(x for x in cron.splitlines() if "qabox-evil" in x)
            in_host("lab1", "su", LAB_USER, "-c", "cd && " + line.split(" ", 1)[1])
        pwned = in_host("lab1", "test", "-e", f"{HOME}/pwned").returncode == 0
    finally:
        # [l]: neither grep nor pkill may match this very shell's command line
        in_host("lab1", "sh", "-c", f"crontab -u {LAB_USER} -l | grep -v 'qabox-evi[l]' | crontab -u {LAB_USER} -; "
                                    f"pkill -KILL -f 'qabox-evi[l]'; rm -rf {HOME}/qabox-evi[l]* {HOME}/pwned")
    assert not pwned
    assert result.code == 2, result
    assert f"{hosts / 'lab1.toml'}:2: dir = " in one_line_error(result)


def test_a_build_with_its_own_release_json_is_refused_clearly(make_build, env_name, port):
    build = make_build({"wsgi.py": APP, "release.json/x": "mine"})
    result = deploy(build, env_name, port)
    assert result.code == 5, result
    assert "release.json" in one_line_error(result)


def test_a_health_path_with_control_characters_is_refused_at_once(make_build, env_name, port):
    build = make_build({"wsgi.py": APP, "qabox.toml": '[app]\nhealth = "/health\\r\\n"\n'})
    started = time.monotonic()
    result = deploy(build, env_name, port)
    assert result.code == 5 and time.monotonic() - started < 10, result
    assert "health" in one_line_error(result) and "no answer" not in result.stderr


def test_a_nearly_full_disk_says_how_much_is_missing(tmp_path, make_build, env_name, port, small_disk):
    mount, in_sshd = small_disk
    assert qabox("deploy", example_build(tmp_path, "n.tar.gz"), "--host", "lab1", "--env", env_name,
                 "--port", port).code == 0
    release = served(port)
    fill(mount, in_sshd)
    try:
        tiny = make_build({"wsgi.py": APP, "requirements.txt": "werkzeug\n"}, with_wheels=False)  # a few KB
        result = qabox("deploy", tiny, "--host", "lab1", "--env", env_name, "--port", port)
    finally:
        subprocess.run(in_sshd + ["rm", "-f", f"{mount}/filler", f"{mount}/filler2"])
    assert result.code == 6, result
    line = one_line_error(result)
    assert "disk is full" in line and " 0 MB" not in line and " bytes still to send" in line, line
    assert served(port) == release
