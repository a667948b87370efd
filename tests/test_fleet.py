"""Many hosts: hosts list/check, groups, parallel deploys with a row per host."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import LAB, LAB_ADDR, LAB_USER, http_get, json_data, qabox, remove_env

pytestmark = pytest.mark.usefixtures("lab")


@pytest.fixture(scope="module")
def four_hosts():
    subprocess.run([sys.executable, str(LAB), "up", "--hosts", "4"], check=True, capture_output=True)
    return ["lab1", "lab2", "lab3", "lab4"]


def test_hosts_list_shows_lab_hosts():
    rows = {r["host"]: r for r in json_data(qabox("hosts", "list", "--json").stdout)["hosts"]}
    assert rows["lab1"]["address"] == LAB_ADDR and rows["lab1"]["user"] == LAB_USER
    assert "example" not in rows


def test_hosts_check_passes_on_a_lab_host():
    result = qabox("hosts", "check", "lab1", "--json")
    data = json_data(result.stdout)
    assert result.code == 0 and data["ok"]
    names = [c["name"] for c in data["checks"]]
    assert names == ["host key known", "login works", "sshd fits tester keys", "unix-socket forwards",
                     "python 3.6+", "venv available", "disk free", "app port free",
                     "cores and memory fit the app servers", "clock skew", "agent version"]
    servers = data["checks"][8]  # the lab host's envs run on whatever their releases name
    assert servers["ok"] and " cores, " in servers["detail"] and "main on " in servers["detail"]
    forwards = data["checks"][3]  # the lab's sshd allows them: a warning with the admin's fix
    assert forwards["ok"] and forwards["warning"] and "AllowStreamLocalForwarding no" in forwards["fix"]


def test_hosts_check_fails_with_the_fix(tmp_path, monkeypatch):
    from conftest import LAB_DIR

    config = tmp_path / "ssh_config"
    config.write_text((LAB_DIR / "ssh_config").read_text().replace(str(LAB_DIR / "known_hosts"), str(tmp_path / "kh")))
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    result = qabox("hosts", "check", "lab1")
    assert result.code == 1 and "FAIL  host key known" in result.stdout and "qabox hosts trust lab1" in result.stdout


def test_deploy_to_a_group_in_parallel(four_hosts, tmp_path, monkeypatch, notes_build, env_name):
    hosts_dir = tmp_path / "hosts"
    hosts_dir.mkdir()
    (hosts_dir / "groups.toml").write_text('qa = ["lab1", "lab2", "lab3", "lab4"]\n')
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts_dir))
    try:
        result = qabox("deploy", notes_build, "--host", "qa", "--env", env_name, "--port", "9650", "--json")
        rows = json_data(result.stdout)["hosts"]
        assert result.code == 0, result
        assert [r["host"] for r in rows] == four_hosts and all(r["result"] == "deployed" for r in rows)
        status = json_data(qabox("status", "--host", "qa", "--env", env_name, "--json").stdout)["hosts"]
        assert all(h["envs"][0]["release"] == r["release"] for h, r in zip(status, rows)), status
        for host in ("lab1", "lab2"):  # a request each, for the logs below (health probes are not logged)
            assert http_get(host, 9650)[0] == 200
        restarted = qabox("restart", "--host", "qa", "--env", env_name)
        assert restarted.code == 0 and restarted.stdout.count("restarted") == 4
        logs = qabox("logs", "--host", "lab1", "--host", "lab2", "--env", env_name, "-n", "5")
        assert logs.code == 0 and {line.split(" | ")[0] for line in logs.stdout.splitlines()} <= {"lab1", "lab2"}
        logs = qabox("logs", "--host", "lab1", "--host", "lab2", "--env", env_name, "-n", "5", "--json")
        lines = [json_data(line) for line in logs.stdout.splitlines()]  # an envelope per line
        assert logs.code == 0 and lines and {line["host"] for line in lines} <= {"lab1", "lab2"}, logs
        # one host failing does not stop the others; the exit code says so
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "lab2.toml").write_text(f"[envs.{env_name}p]\nport = 1\n")  # no user may bind it
        (broken / "groups.toml").write_text('qa = ["lab1", "lab2"]\n')
        monkeypatch.setenv("QABOX_HOSTS_DIR", str(broken))
        result = qabox("deploy", notes_build, "--host", "qa", "--env", env_name + "p", "--json")
        rows = {r["host"]: r for r in json_data(result.stdout)["hosts"]}
        assert result.code == 1 and rows["lab1"]["ok"] and not rows["lab2"]["ok"]
    finally:
        for host in four_hosts:  # the lab knows labN's account in this lab's slot
            remove_env(host, env_name)
            remove_env(host, env_name + "p")


def test_each_host_keeps_the_order_the_bound_and_fail_fast():
    import threading
    import time

    from qabox.errors import QaboxError
    from qabox.fleet import each_host

    running, most, lock = [0], [0], threading.Lock()

    def run(host: str) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        if host == "b":
            raise QaboxError("b is down")
        return host.upper()

    outcomes = each_host(["a", "b", "c", "d"], run, parallel=2)
    assert [(o.host, o.result, o.error and o.error.message) for o in outcomes] == [
        ("a", "A", None), ("b", None, "b is down"), ("c", "C", None), ("d", "D", None)]
    assert most[0] == 2
    serial = each_host(["a", "b", "c"], run, parallel=1, fail_fast=True)
    assert [(o.host, o.ok, o.skipped) for o in serial] == [("a", True, False), ("b", False, False),
                                                           ("c", False, True)]
    with pytest.raises(ZeroDivisionError):  # a bug is raised, not taken for a host's failure
        each_host(["a"], lambda host: 1 / 0)
