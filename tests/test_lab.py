"""Tests for scripts/lab, the OpenSSH test hosts the rest of the suite deploys to.

The suite shares one lab (the default lab dir), so these tests bring it up but
never take it down.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAB_SCRIPT = REPO / "scripts" / "lab"
LAB_DIR = Path(os.environ.get("QABOX_LAB_DIR") or REPO / ".lab")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the namespace lab needs root")


def lab(*args, timeout=120):
    """Run scripts/lab and capture its output."""
    return subprocess.run([str(LAB_SCRIPT), *args], capture_output=True, text=True,
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
    assert "Host lab1\n  HostName 198.18.1.2\n" in lab_up.stdout
    assert f"IdentityFile {LAB_DIR.absolute()}/keys/deploy" in lab_up.stdout
    assert (LAB_DIR / "ssh_config").read_text() == lab_up.stdout


@needs_root
def test_status_json_reports_lab1_up(lab_up):
    lab1 = next(row for row in status() if row["name"] == "lab1")
    assert lab1["up"] and lab1["netns"] and lab1["reachable"]
    assert lab1["address"] == "198.18.1.2" and lab1["user"] == "qalab1"
    assert lab1["sshd_pid"] > 0


@needs_root
def test_ssh_login_with_strict_host_key_checking(lab_up):
    result = subprocess.run(
        ["ssh", "-F", str(LAB_DIR / "ssh_config"), "-o", "BatchMode=yes", "lab1",
         "id -un; python3 -c 'print(6 * 7)'"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["qalab1", "42"]


@needs_root
def test_exec_runs_in_the_host_namespace(lab_up):
    result = lab("exec", "lab1", "--", "ip", "-brief", "addr", "show", "eth0")
    assert result.returncode == 0, result.stderr
    assert "198.18.1.2/24" in result.stdout


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
def test_unknown_host_is_a_clean_error(lab_up):
    result = lab("exec", "lab99", "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("lab: ") and "Traceback" not in result.stderr
