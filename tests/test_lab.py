"""Tests for scripts/lab (the lab package), the OpenSSH test hosts the rest of the suite deploys to.

The suite shares one lab (the default lab dir), so these tests bring it up but
never take it down.
"""
import json
import os
import shutil
import subprocess

import pytest

from conftest import LAB, LAB1, LAB_DIR, wait_until
from lab import hosts as lab_module

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the namespace lab needs root")


def lab(*args, timeout=120):
    """Run scripts/lab and capture its output."""
    return subprocess.run([str(LAB), *args], capture_output=True, text=True,
                          timeout=timeout)


def status():
    """Return the parsed `status --json` rows."""
    result = lab("status", "--json")
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def lab_up():
    """Make sure lab1 is up; leave it up for the rest of the suite."""
    result = lab("up")
    assert result.returncode == 0, result.stderr
    return result


def test_help_works_without_root():
    result = lab("--help")
    assert result.returncode == 0
    assert "ssh-config" in result.stdout


def test_too_many_hosts_is_a_clean_error():
    result = lab("up", "--hosts", "9")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


@needs_root
def test_up_prints_ssh_config(lab_up):
    assert f"Host lab1\n  HostName {LAB1.address}\n" in lab_up.stdout
    assert f"IdentityFile {LAB_DIR.absolute()}/keys/deploy" in lab_up.stdout
    assert (LAB_DIR / "ssh_config").read_text() == lab_up.stdout


@needs_root
def test_status_json_reports_lab1_up(lab_up):
    lab1 = next(row for row in status() if row["name"] == "lab1")
    assert lab1["up"] and lab1["netns"] and lab1["reachable"]
    assert lab1["address"] == LAB1.address and lab1["user"] == LAB1.user
    assert lab1["sshd_pid"] > 0


@needs_root
def test_ssh_login_with_strict_host_key_checking(lab_up):
    result = subprocess.run(
        ["ssh", "-F", str(LAB_DIR / "ssh_config"), "-o", "BatchMode=yes", "lab1",
         "id -un; python3 -c 'print(6 * 7)'"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [LAB1.user, "42"]


@needs_root
def test_exec_runs_in_the_host_namespace(lab_up):
    result = lab("exec", "lab1", "--", "ip", "-brief", "addr", "show", "eth0")
    assert result.returncode == 0, result.stderr
    assert f"{LAB1.address}/24" in result.stdout


@needs_root
def test_up_twice_is_idempotent(lab_up):
    before = {row["name"]: row["sshd_pid"] for row in status()}
    files = {name: (LAB_DIR / name).read_text() for name in ("ssh_config", "known_hosts")}
    again = lab("up")
    assert again.returncode == 0, again.stderr
    assert "lab1: already up" in again.stderr
    assert {row["name"]: row["sshd_pid"] for row in status()} == before
    assert {name: (LAB_DIR / name).read_text() for name in files} == files


@needs_root
def test_remove_env_kills_its_supervisor_and_apps_and_deletes_its_files(lab_up):
    env, base = "labtest", f".labtest{os.getpid()}"  # a base of its own, not the suite's .qabox
    app = f"{LAB1.home}/{base}/envs/{env}/venvs/v1/bin/python"  # what an app runs from
    assert subprocess.run(["su", LAB1.user, "-c", f"mkdir -p {os.path.dirname(app)} && cp /bin/sleep {app}"]
                          ).returncode == 0
    supervisor, apps, other = (subprocess.Popen(argv, user=LAB1.user, cwd="/") for argv in (
        ["/usr/bin/python3", "-c", "import time; time.sleep(60)", "supervise", base, env, "3"],
        [app, "60"], ["sleep", "60"]))
    try:
        host = lab_module.find_host("lab1")
        assert wait_until(lambda: len(lab_module.env_pids(host, env)) == 2, timeout=10)
        lab_module.remove_env("lab1", env, base)
        assert supervisor.wait(10) == apps.wait(10) == -9
        assert not os.path.exists(f"{LAB1.home}/{base}/envs/{env}")
        assert other.poll() is None  # the account's other processes live on
    finally:
        for proc in (supervisor, apps, other):
            proc.kill()
            proc.wait()
        shutil.rmtree(f"{LAB1.home}/{base}")


@needs_root
def test_unknown_host_is_a_clean_error(lab_up):
    result = lab("exec", "lab99", "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("lab: ") and "Traceback" not in result.stderr


LINKS = """1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN
2: eth0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc fq_codel state UP
5: qlab1@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP
7: qlab12@if2: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN
"""
ADDRESSES = """2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0
5: qlab1    inet 198.18.1.1/24 scope global qlab1
198.18.20.0/24 dev other proto kernel scope link src 198.18.20.1
"""


def test_used_numbers_come_from_links_addresses_and_routes():
    assert lab_module.used_numbers(LINKS, ADDRESSES) == {1, 12, 20}
    assert lab_module.used_numbers("", "") == set()


def test_a_slot_is_free_only_when_none_of_its_numbers_is_used():
    used = lab_module.used_numbers(LINKS, ADDRESSES)  # 1 (slot 0), 12 (slot 1), 20 (slot 2)
    assert [lab_module.slot_free(slot, used) for slot in range(4)] == [False, False, False, True]
    assert lab_module.slot_free(0, {9, 17})  # neighbours' numbers do not count


@pytest.mark.parametrize("slot, names", [
    (0, ("lab1", "qabox-lab1", "qlab1", "qalab1", "198.18.1.2")),  # what the tests hard-code
    (1, ("lab1", "qabox-lab9", "qlab9", "qalab9", "198.18.9.2")),
    (30, ("lab1", "qabox-lab241", "qlab241", "qalab241", "198.18.241.2")),
])
def test_slot_names_keep_slot_0_as_it_was(slot, names):
    host = lab_module.Host(1, slot=slot)
    assert (host.name, host.ns, host.veth, host.user, host.address) == names
    assert len(host.veth) <= 15  # a Linux interface name's limit


def test_pick_slot_keeps_the_recorded_slot_and_checks_the_asked_one(monkeypatch):
    monkeypatch.setattr(lab_module, "machine_used_numbers", lambda: {1, 2, 9})
    monkeypatch.setattr(lab_module, "port_open", lambda host, timeout: True)  # their sshds answer
    monkeypatch.delenv("QABOX_LAB_SLOT", raising=False)
    assert lab_module.pick_slot({"mode": "netns", "hosts": 1}) == 0  # before slots: slot 0
    assert lab_module.pick_slot({"mode": "netns", "hosts": 1, "slot": 3}) == 3
    assert lab_module.pick_slot(None) == 2  # slots 0 and 1 are taken
    monkeypatch.setenv("QABOX_LAB_SLOT", "0")
    with pytest.raises(lab_module.LabError, match="slot 0 is in use by another lab"):
        lab_module.pick_slot(None)
    with pytest.raises(lab_module.LabError, match="up in slot 3"):
        lab_module.pick_slot({"mode": "netns", "hosts": 1, "slot": 3})
    monkeypatch.setenv("QABOX_LAB_SLOT", "5")
    assert lab_module.pick_slot(None) == 5
    monkeypatch.setenv("QABOX_LAB_SLOT", "31")
    with pytest.raises(lab_module.LabError, match="from 0 to 30"):
        lab_module.pick_slot(None)


@needs_root
def test_a_second_lab_takes_a_free_slot_and_down_leaves_the_first_alone(lab_up, tmp_path):
    env = {**os.environ, "QABOX_LAB_DIR": str(tmp_path / "lab")}
    env.pop("QABOX_LAB_SLOT", None)

    def second(*args):
        return subprocess.run([str(LAB), *args], capture_output=True, text=True,
                              timeout=120, env=env)

    before, ours = status(), json.loads((LAB_DIR / "state.json").read_text())["slot"]
    up = second("up")
    try:
        assert up.returncode == 0, up.stderr
        slot = json.loads((tmp_path / "lab" / "state.json").read_text())["slot"]
        assert slot != ours  # the suite's lab holds its slot
        n = slot * 8 + 1
        assert f"lab1: started at qalab{n}@198.18.{n}.2:22" in up.stderr
        login = subprocess.run(
            ["ssh", "-F", str(tmp_path / "lab" / "ssh_config"), "-o", "BatchMode=yes", "lab1", "id -un"],
            capture_output=True, text=True, timeout=30)
        assert login.stdout.strip() == f"qalab{n}", login.stderr
    finally:
        down = second("down")
    assert down.returncode == 0, down.stderr
    assert subprocess.run(["ip", "link", "show", f"qlab{n}"], capture_output=True).returncode != 0
    assert [row for row in status() if row["name"] == "lab1"] == [
        row for row in before if row["name"] == "lab1"]  # the suite's lab1 is untouched
