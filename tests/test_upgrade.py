"""Agent upgrades on the lab: keys and cron name the stable entry, old agents go
once nothing runs them, and a tester's key works before and after."""

from __future__ import annotations

import json
import subprocess

from conftest import LAB_HOME, LAB_USER, in_host, qabox, ssh_as_tester, wait_until
from qabox import remote
from qabox.agent import protocol
from qabox.agent_zip import hash_of

AGENTS = f"{LAB_HOME}/.qabox/agent"
OLD = "agent-0123456789abcdef.py"  # what an older qabox pushed: one .py file


def agent_files() -> tuple[list[str], str]:
    """The agent directory's versions (a compiled copy stands for its archive: it goes with it), and current."""
    listing = in_host("lab1", "ls", AGENTS).stdout.split()
    versions = {n.split(".")[0] + ".pyz" if n.endswith(".zip") else n for n in listing}
    return sorted(versions), in_host("lab1", "readlink", f"{AGENTS}/current").stdout.strip()


def session_works(tester: dict, tmp_path) -> bool:
    request = json.dumps({"protocol": protocol.PROTOCOL, "cmd": "tester-session", "args": {}}) + "\n"
    proc = subprocess.Popen(ssh_as_tester(tester, tmp_path) + ["lab1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(request)
        proc.stdin.flush()
        return json.loads(proc.stdout.readline()).get("ok") is True
    finally:
        proc.kill()


def use_agent(monkeypatch, pyz: bytes) -> str:
    name = f"agent-{hash_of(pyz)}.pyz"
    monkeypatch.setattr(remote, "AGENT_PYZ", pyz)
    monkeypatch.setattr(remote, "AGENT_HASH", name[6:22])
    return name


def test_upgrades_keep_keys_and_cron_on_current_and_remove_unused_agents(tester, notes_build, tmp_path,
                                                                         monkeypatch):
    env = tester["env"]
    assert qabox("deploy", notes_build, "--host", "lab1", "--env", env, "--on-boot").code == 0
    original_pyz = remote.AGENT_PYZ
    original = f"agent-{remote.AGENT_HASH}.pyz"
    # Keys and cron as an older qabox left them: naming its own agent file.
    in_host("lab1", "sh", "-c", f"cp {AGENTS}/{original} {AGENTS}/{OLD} && chown {LAB_USER} {AGENTS}/{OLD} && "
            f"sed -i 's#{AGENTS}/current #{AGENTS}/{OLD} #' {LAB_HOME}/.ssh/authorized_keys")
    assert f"{AGENTS}/{OLD} " in in_host("lab1", "cat", f"{LAB_HOME}/.ssh/authorized_keys").stdout
    assert session_works(tester, tmp_path)

    other = use_agent(monkeypatch, b"#!/usr/bin/env python3\n" + remote.AGENT_PYZ)  # another build
    assert qabox("restart", "--host", "lab1", "--env", env).code == 0
    keys = in_host("lab1", "cat", f"{LAB_HOME}/.ssh/authorized_keys").stdout
    tester_lines = [line for line in keys.splitlines() if f" tester-session {LAB_HOME}/.qabox " in line]
    assert tester_lines and all(f" {AGENTS}/current tester-session " in line for line in tester_lines)
    cron = in_host("lab1", "crontab", "-u", LAB_USER, "-l").stdout
    assert f"{AGENTS}/current boot " in cron and OLD not in cron
    # The restart retired everything the older builds ran (the old app in the background): only the new one is left.
    assert wait_until(lambda: agent_files() == (sorted(["current", other]), other), 15)
    assert session_works(tester, tmp_path)

    assert use_agent(monkeypatch, original_pyz) == original
    assert qabox("restart", "--host", "lab1", "--env", env).code == 0
    assert wait_until(lambda: agent_files() == (sorted(["current", original]), original), 15)
    assert session_works(tester, tmp_path)
