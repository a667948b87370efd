"""Release hooks and one-off commands (``run``), with the agent run here as qabox
runs it: a real deploy of a bare WSGI app, real hook processes, no SSH."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Host, free_port, local_get, wait_until, wsgi_build
from qabox.agent.procs import pid_alive

pytestmark = pytest.mark.network  # the app server's wheels, downloaded once into .cache/wheels
ENV = "main"
MIGRATE = ("python -c \"import os, sys; print('migrating', sys.executable); "
           "open(os.path.join(os.environ['QABOX_DATA_DIR'], 'migrated'), 'a').write(os.environ['QABOX_RELEASE'] "
           "+ ' ' + os.getcwd() + '\\n')\"")


PYTHON36 = "/root/.pyenv/versions/3.6.15/bin/python"  # the oldest python a host may have


@pytest.fixture(scope="module", params=[None, PYTHON36], ids=["python", "python3.6"])
def box(agent_cmd, tmp_path_factory, request):
    """One host for the module's tests, its agent on this python or on 3.6: v1 deployed
    with a migration-like hook, builds of v2 and v3."""
    if request.param and not os.path.exists(request.param):
        pytest.skip(f"no {request.param} on this machine")
    top = tmp_path_factory.mktemp("box")
    (top / "home").mkdir()
    local = Host(agent_cmd(request.param or sys.executable), top / "home")
    target = "3.6" if request.param else None
    builds = {v: wsgi_build(top / f"{v}.tar.gz", v, python=target) for v in ("v1", "v2", "v3")}
    port = free_port()
    first = local.deploy(builds["v1"], ENV, port, release_hooks=[MIGRATE, "python -c 'print(1 + 1)'"])
    yield {"host": local, "builds": builds, "port": port, "first": first}
    local.kill_all()


def env_dir(local: Host, *parts: str) -> Path:
    return Path(local.base, "envs", ENV, *parts)


def run(local: Host, argv: list, stdin: bytes = b"", env: str = ENV, tty: dict | None = None) -> tuple:
    """``run`` as qabox sends it: the request, the command's stdin as messages, its end;
    (stdout, stderr, result)."""
    proc = subprocess.Popen(local.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=local.environ)
    proc.stdin.write((local.request("run", env=env, argv=argv, tty=tty) + "\n").encode())
    if stdin:
        proc.stdin.write((json.dumps({"in": base64.b64encode(stdin).decode()}) + "\n").encode())
    proc.stdin.write(b'{"eof": 1}\n')
    proc.stdin.flush()
    out, err, result = b"", b"", None
    for line in proc.stdout:
        message = json.loads(line)
        out += base64.b64decode(message.get("out", ""))
        err += base64.b64decode(message.get("err", ""))
        if "ok" in message:
            result = message
            break
    proc.stdin.close()
    proc.wait(30)
    return out, err, result


def test_a_hook_runs_in_the_new_release_with_its_venv_and_data_dir_before_it_starts(box):
    local, first = box["host"], box["first"]
    assert first["ok"], first
    release = first["data"]["release"]
    assert local_get(box["port"]) == (200, "v1")
    assert (env_dir(local, "data", "migrated").read_text()
            == f"{release} {env_dir(local, 'releases', release)}\n")
    info = json.loads(env_dir(local, "releases", release, "release.json").read_text())
    assert info["release_hooks"] == [MIGRATE, "python -c 'print(1 + 1)'"] and info["release_timeout"] == 300
    log = env_dir(local, "logs", release + ".log").read_text()
    venv_python = env_dir(local, "venvs", info["venv"], "bin", "python")
    assert f"--- release hook: {MIGRATE} ---\nmigrating {venv_python}\n" in log and "\n2\n" in log


def test_a_failing_hook_fails_the_deploy_with_its_last_lines_and_the_old_release_keeps_serving(box):
    local = box["host"]
    failing = "python -c \"import sys; [print('line', n) for n in range(40)]; sys.exit('no such table: post')\""
    result = local.deploy(box["builds"]["v2"], ENV, box["port"], release_hooks=[MIGRATE, failing])
    assert not result["ok"] and result["error"]["code"] == "hook_failed", result
    assert result["error"]["message"] == (
        f"release hook `{failing}` failed (exit status 1): the new release was removed and release "
        f"{box['first']['data']['release']} keeps serving, on the env's data as the release hooks left it; "
        f"fix it and deploy again")  # not "nothing else changed": the first hook migrated (below)
    assert result["error"]["log"][-3:] == ["line 38", "line 39", "no such table: post"]
    assert len(result["error"]["log"]) == 30
    assert local_get(box["port"]) == (200, "v1")
    assert [r["release"] for r in local.data("releases", env=ENV)["releases"]] == [box["first"]["data"]["release"]]
    assert len(env_dir(local, "data", "migrated").read_text().splitlines()) == 2  # the first hook did run


def test_a_hook_that_outlasts_release_timeout_is_killed_with_its_group_and_fails_the_deploy(box, tmp_path):
    local = box["host"]
    pids = tmp_path / "pids"
    # it closes its output, so only the timeout can end it; its child is ended with it
    hanging = ("python -c \"import os, subprocess, sys, time; print('waiting for the lock', flush=True); "
               "child = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL); "
               "open(sys.argv[1], 'w').write('%d %d' % (os.getpid(), child.pid)); os.close(1); os.close(2); "
               f"time.sleep(60)\" {shlex.quote(str(pids))}")
    started = time.monotonic()
    result = local.deploy(box["builds"]["v3"], ENV, box["port"], release_hooks=[hanging], release_timeout=2)
    assert time.monotonic() - started < 15
    assert not result["ok"] and result["error"]["code"] == "hook_timeout", result
    assert result["error"]["message"].startswith(f"release hook `{hanging}` did not finish within "
                                                 f"release_timeout (2 s) and was stopped: the new release was removed")
    assert result["error"]["log"] == ["waiting for the lock"]
    for pid in map(int, pids.read_text().split()):
        assert not pid_alive(pid)
    assert local_get(box["port"]) == (200, "v1")
    assert len(local.data("releases", env=ENV)["releases"]) == 1


def test_run_gets_the_release_dir_venv_and_data_dir_streams_and_exits_with_the_commands_code(box):
    local = box["host"]
    release = box["first"]["data"]["release"]
    code = ("import os, sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data[::-1]); "
            "print(os.getcwd(), os.environ['QABOX_DATA_DIR'], sys.executable, sys.argv[1:], file=sys.stderr); "
            "sys.exit(7)")
    out, err, result = run(local, ["python", "-c", code, "a b", "$HOME;", "'q'"], stdin=b"\x00\xffbinary")
    assert result == {"ok": True, "changed": False, "data": {"exit": 7, "release": release}}
    assert out == b"yranib\xff\x00"
    info = local.data("releases", env=ENV)["releases"][0]
    assert err.decode() == "%s %s %s %s\n" % (env_dir(local, "releases", release), env_dir(local, "data"),
                                            env_dir(local, "venvs", info["venv"], "bin", "python"),
                                            ["a b", "$HOME;", "'q'"])


def test_run_with_a_tty_gives_the_command_a_terminal(box):
    code = "import os, sys; print(sys.stdin.isatty(), os.get_terminal_size(), os.environ['TERM']); print(input('name? '))"
    out, err, result = run(box["host"], ["python", "-c", code], stdin=b"alice\n",
                           tty={"rows": 30, "cols": 100, "term": "xterm-256color"})
    assert result["ok"] and result["data"]["exit"] == 0, result
    text = out.decode()  # the terminal echoes the typed line, whenever it arrives: \n becomes \r\n
    assert "True os.terminal_size(columns=100, lines=30) xterm-256color\r\n" in text and err == b""
    assert text.endswith("alice\r\n") and text.count("alice\r\n") == 2 and "name? " in text, text  # echo before or after the prompt


def test_run_refuses_a_command_it_cannot_find_and_an_env_with_nothing_deployed(box):
    local = box["host"]
    _, _, result = run(local, ["no-such-command", "x"])
    assert result["error"]["code"] == "no_command" and "cannot run no-such-command (not found)" in result["error"]["message"]
    first = local.deploy(box["builds"]["v2"], "fresh", free_port(), release_hooks=["no-such-tool migrate"])
    assert first["error"]["code"] == "no_command", first
    assert first["error"]["message"].startswith("release hook `no-such-tool migrate`: cannot run no-such-tool "
                                                "(not found) in release ")
    _, _, result = run(local, ["true"], env="fresh")
    assert result["error"] == {"code": "no_release", "message": "nothing is deployed to env fresh: deploy a "
                                                                "build first, then run commands in it"}


def test_a_hook_whose_client_went_away_is_ended_with_its_group_and_its_release_removed(box, tmp_path):
    local = box["host"]
    pids = tmp_path / "pids"
    hanging = ("python -c \"import os, subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
               f"open(sys.argv[1], 'w').write('%d %d' % (os.getpid(), child.pid)); time.sleep(60)\" {pids}")
    build = box["builds"]["v3"]
    agent, _ = local.start_deploy(build, ENV, box["port"], release_hooks=[hanging])
    assert wait_until(pids.exists, 60)
    agent.stdin.close()  # qabox went away
    assert agent.wait(30) == 0
    for pid in map(int, pids.read_text().split()):
        assert wait_until(lambda: not pid_alive(pid), 10), pid
    assert len(local.data("releases", env=ENV)["releases"]) == 1 and local_get(box["port"]) == (200, "v1")
    assert [p.name for p in env_dir(local, "releases").iterdir()] == [box["first"]["data"]["release"]]
