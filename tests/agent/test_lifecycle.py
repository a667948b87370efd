"""An env's whole life on a host, with no SSH and no root: the agent runs here,
in a temporary home, through the calls qabox makes (deploy's steps, start, stop,
restart, rollback, status, testers), and its supervisor keeps a bare WSGI app up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import Host, free_port, local_get, new_key, wait_until, wsgi_build
from qabox.agent.procs import pid_alive

pytestmark = pytest.mark.network  # the app server's wheels, downloaded once into .cache/wheels
ENV = "main"


@pytest.fixture(scope="module")
def box(module_host, tmp_path_factory):
    """One host for the module's tests, in order: a release of v1 serving, and a build of v2."""
    top = tmp_path_factory.mktemp("box")
    builds = {v: wsgi_build(top / f"{v}.tar.gz", v) for v in ("v1", "v2")}
    port = free_port()
    first = module_host.deploy(builds["v1"], ENV, port)
    return {"host": module_host, "builds": builds, "port": port, "first": first}


def status(local: Host) -> dict:
    (env,) = local.data("status", env=ENV)["envs"]
    return env


def test_deploy_steps_start_the_app_and_a_second_identical_deploy_changes_nothing(box):
    local, port, first = box["host"], box["port"], box["first"]
    assert first["ok"] and first["changed"], first
    data = first["data"]
    assert data["previous"] is None and data["port"] == port and data["venv_created"] and data["pruned"] == []
    assert local_get(port) == (200, "v1") and local_get(port, "/release") == (200, data["release"])
    sha = local.data("releases", env=ENV)["releases"][0]["sha256"]
    with local.session(ENV) as call:  # kept: the next deploy sends nothing, in one answer
        assert call("upload-state", env=ENV, manifest=sha, port=port)["data"]["unchanged"]
    again = local.deploy(box["builds"]["v1"], ENV, port)
    assert again["ok"] and not again["changed"] and again["data"]["release"] == data["release"], again


def test_status_says_running_and_healthy(box):
    env = status(box["host"])
    assert env["state"] == "running" and env["release"] == box["first"]["data"]["release"]
    assert env["port"] == box["port"] and env["pid"] == int(local_get(box["port"], "/pid")[1])
    assert env["health"]["code"] == 200 and env["problems"] == [] and not env["supervisor_revived"]


def test_commands_that_change_an_env_need_its_deploy_lock(box):
    for cmd in ("upload-state", "deploy", "start", "stop", "restart", "rollback"):
        refused = box["host"].call(cmd, env=ENV, manifest="0" * 64, entry="wsgi:app")
        assert not refused["ok"] and refused["error"]["code"] == "bad_request", refused
        assert "runs only in a session holding env main's lock" in refused["error"]["message"]


def test_a_killed_app_is_restarted_by_its_supervisor(box):
    local, port = box["host"], box["port"]
    before = status(local)
    os.kill(before["pid"], signal.SIGKILL)
    new_pid = wait_until(lambda: (lambda r: r[0] == 200 and r[1] != str(before["pid"]) and r[1])(
        local_get(port, "/pid")), 10, 0.05)
    assert new_pid
    env = wait_until(lambda: (lambda e: e["restarts"] == before["restarts"] + 1 and e)(status(local)), 5)
    assert env and env["state"] == "running" and env["pid"] == int(new_pid) and env["last_exit"] == -9
    assert env["supervisor_pid"] == before["supervisor_pid"]


def test_refused_control_connections_do_not_hold_up_the_supervisors_restarts(box):
    """This process is no qabox agent: each of its connections is refused, and a
    refusal used to skip the supervisor's tick, so a flood of them stopped restarts."""
    local, port = box["host"], box["port"]
    before = status(local)["pid"]
    ctl = os.path.join(local.base, "envs", ENV, "ctl.sock")
    done = threading.Event()

    def flood() -> None:
        while not done.is_set():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(ctl)

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    try:
        os.kill(before, signal.SIGKILL)
        assert wait_until(lambda: (lambda r: r[0] == 200 and r[1] != str(before))(local_get(port, "/pid")), 10)
    finally:
        done.set()
        flooding.join()


def test_restart_starts_a_fresh_process(box):
    local, port = box["host"], box["port"]
    old = status(local)["pid"]
    with local.session(ENV) as call:
        restarted = call("restart", env=ENV)
    assert restarted["ok"] and restarted["changed"] and restarted["data"]["pid"] not in (None, old), restarted
    assert local_get(port, "/pid") == (200, str(restarted["data"]["pid"]))
    assert wait_until(lambda: not pid_alive(old), 10)  # and the old one has ended


def test_a_new_tester_gets_a_port_the_running_app_serves_and_loses_it_when_removed(box, tmp_path):
    local, port = box["host"], box["port"]
    serving = status(local)["pid"]
    key = new_key(tmp_path / "ann")
    entry = Path(local.argv[-1]).with_name("current")
    if entry.is_symlink():
        entry.unlink()  # as if the push of this agent had been cut before its install
    added = local.call("tester-add", name="ann", key=key.with_suffix(".pub").read_text(),
                       sshd="SSH-2.0-OpenSSH_9.2p1", by="tests")
    assert added["ok"] and added["changed"], added
    tester_port = added["data"]["ports"][ENV]
    assert tester_port != port
    assert local_get(tester_port) == local_get(port)  # handed to the app as it runs: no restart
    assert status(local)["pid"] == serving
    keys = (local.home / ".ssh" / "authorized_keys").read_text()
    assert f'permitopen="127.0.0.1:{tester_port}"' in keys and "qabox-tester:ann" in keys
    assert f" {entry} tester-session " in keys and entry.resolve() == Path(local.argv[-1])  # the stable entry
    assert [t["name"] for t in local.data("tester-list")["testers"]] == ["ann"]
    assert local.data("status", env=ENV)["envs"][0]["requests"] == {"ann": 1}
    removed = local.call("tester-remove", name="ann")
    assert removed["ok"] and removed["changed"], removed
    assert wait_until(lambda: local_get(tester_port)[0] == 0, 5)  # the port is closed
    assert "qabox-tester:ann" not in (local.home / ".ssh" / "authorized_keys").read_text()
    assert local_get(port)[0] == 200 and local.data("tester-list")["testers"] == []


def test_a_second_release_and_rollback_to_the_first(box):
    local, port, first = box["host"], box["port"], box["first"]["data"]["release"]
    second = local.deploy(box["builds"]["v2"], ENV, port)
    assert second["ok"] and second["changed"] and second["data"]["previous"] == first, second
    assert not second["data"]["venv_created"]  # the same requirements and wheels: the same venv
    assert local_get(port) == (200, "v2")
    with local.session(ENV) as call:
        back = call("rollback", env=ENV)
    assert back["ok"] and back["data"] == {"release": first, "previous": second["data"]["release"]}, back
    assert local_get(port) == (200, "v1")
    releases = local.data("releases", env=ENV)
    assert releases["current"] == first
    assert [r["release"] for r in releases["releases"]] == [first, second["data"]["release"]]


def test_stop_ends_every_process_and_start_brings_the_app_back(box):
    local, port = box["host"], box["port"]
    with local.session(ENV) as call:
        stopped = call("stop", env=ENV)
    assert stopped["ok"] and stopped["changed"], stopped
    assert wait_until(lambda: not local.processes(), 10), local.processes()
    assert local_get(port)[0] == 0
    env = status(local)  # and status does not revive an env stopped on purpose
    assert env["state"] == "stopped" and env["pid"] is None and not env["supervisor_revived"]
    with local.session(ENV) as call:
        assert not call("stop", env=ENV)["changed"]
        started = call("start", env=ENV)
    assert started["ok"] and started["changed"], started
    assert local_get(port) == (200, "v1") and status(local)["state"] == "running"


def test_boot_gives_every_env_that_should_run_its_supervisor_again(box):
    """What cron's @reboot line runs (on-boot itself edits the user's real crontab: not here)."""
    local, port = box["host"], box["port"]
    local.kill_all()  # a reboot, as far as the env can tell
    assert wait_until(lambda: not local.processes(), 10) and local_get(port)[0] == 0
    archive = Path(local.argv[-1])
    entry = archive.with_name("current")  # what cron's line names: a symlink to the newest agent
    if not entry.is_symlink():
        entry.symlink_to(archive.name)  # as install makes it (not called here: the archive is shared)
    assert entry.resolve() == archive
    subprocess.run(local.argv[:-1] + [str(entry), "boot", local.base], env=local.environ, timeout=60, check=True)
    assert local_get(port) == (200, "v1")
    assert status(local)["state"] == "running"
    # started through current, every process runs from the hash-named archive, which never changes under it
    runs = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in local.processes()]
    assert runs and all(str(archive).encode() in argv and str(entry).encode() not in argv for argv in runs), runs
