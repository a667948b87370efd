"""Deploying to a real lab host over real SSH, and what status says after."""

from __future__ import annotations

import dataclasses
import io
import re
import secrets
import shutil
import tarfile
import threading
import time

import paramiko
import pytest

from conftest import LAB_HOME, LAB_USER, _ports, build_manifest, http_get, in_host, json_data, qabox, raw_tar, \
    remove_env, wait_until
from qabox import ssh
from qabox.context import Context
from qabox.remote import Remote

pytestmark = pytest.mark.usefixtures("lab")

SLOW_APP = """
import time
from flask import Flask
app = Flask(__name__)
app.debug = True  # qabox must serve it without the debugger anyway

@app.get("/")
def index():
    return "v2"

@app.get("/slow")
def slow():
    time.sleep(0.3)
    return "slept"

@app.get("/boom")
def boom():
    raise RuntimeError("secret traceback")
"""


def deploy(build, env, port, *extra):
    return qabox("deploy", build, "--host", "lab1", "--env", env, "--port", port, *extra)


def status_json(env):
    result = qabox("status", "--host", "lab1", "--env", env, "--json")
    assert result.code == 0, result
    return json_data(result.stdout)["hosts"][0]["envs"][0]


def test_deploy_serves_the_app_and_status_says_so(notes_build, env_name, port):
    result = deploy(notes_build, env_name, port)
    assert result.code == 0, result
    assert "is live" in result.stdout and f"--env {env_name}" in result.stdout
    code, body = http_get("lab1", port, "/release")
    assert code == 200 and body.startswith("2")
    env = status_json(env_name)
    assert env["state"] == "running" and env["release"] == body
    assert env["port"] == port and env["pid"] and env["restarts"] == 0
    assert env["health"]["code"] == 200
    assert env["deployed_by"].count("@") == 1
    # bound to the host's loopback only
    lines = in_host("lab1", "ss", "-Hltn", f"sport = :{port}").stdout.splitlines()
    assert [line.split()[3] for line in lines] == [f"127.0.0.1:{port}"]


def test_unchanged_redeploy_sends_nothing(notes_build, env_name, port):
    assert deploy(notes_build, env_name, port).code == 0
    result = deploy(notes_build, env_name, port, "--json")
    data = json_data(result.stdout)
    assert result.code == 0 and data["changed"] is False and data["sent_bytes"] == 0


def test_a_second_env_with_the_same_requirements_links_the_first_ones_wheels(notes_build, env_name, port):
    assert deploy(notes_build, env_name, port).code == 0
    other, other_port = env_name + "b", next(_ports)
    try:
        result = deploy(notes_build, other, other_port, "--json")
        data = json_data(result.stdout)
        assert result.code == 0 and data["venv_created"], result
        assert (data["wheels_linked"], data["wheels_installed"]) == (7, 0), data  # no pip ran
        code, body = http_get("lab1", other_port, "/release")
        assert code == 200 and body == data["release"]
    finally:
        remove_env("lab1", other)


@pytest.fixture
def asked(monkeypatch) -> list[str]:
    """The agent requests a deploy makes, in order: each on a channel of its own, or in the locked session."""
    from qabox.remote import Session

    seen, run, call = [], Remote._open, Session.call
    monkeypatch.setattr(Remote, "_open", lambda self, cmd, *a, **k: seen.append(cmd) or run(self, cmd, *a, **k))
    monkeypatch.setattr(Session, "call", lambda self, cmd, *a, **k: seen.append(cmd) or call(self, cmd, *a, **k))
    return seen


def test_an_unchanged_redeploy_is_one_request_after_the_lock(notes_build, env_name, port, asked):
    assert deploy(notes_build, env_name, port).code == 0
    asked.clear()
    result = deploy(notes_build, env_name, port, "--json")
    assert result.code == 0 and json_data(result.stdout)["changed"] is False, result
    assert asked == ["session", "upload-state"], asked


def test_a_changed_redeploy_learns_the_hosts_python_from_upload_state(make_build, env_name, port, asked):
    """Its wheels are checked against the host's python before sending, with no python-info of its own."""
    assert deploy(make_build({"wsgi.py": SLOW_APP}), env_name, port).code == 0
    asked.clear()
    result = deploy(make_build({"wsgi.py": SLOW_APP + f"# {secrets.token_hex(8)}\n"}), env_name, port, "--json")
    assert result.code == 0 and json_data(result.stdout)["changed"] is True, result
    assert asked == ["session", "upload-state", "upload-state", "deploy"], asked  # new to the host: its manifest


def big_app(make_build, **files):
    """A Flask app with 3 MB of static content of its own (new to the host), and ``files``."""
    return make_build({"wsgi.py": "from flask import Flask\napp = Flask(__name__)\n"
                                  "@app.get('/')\ndef i():\n    return open('note.txt').read()\n",
                       "note.txt": "v1", "static/big.txt": secrets.token_hex(1_500_000), **files})


def content_size(build) -> int:
    return sum(item[4] for item in build_manifest(build)[0]["members"])


def test_a_one_file_change_sends_only_that_file(make_build, env_name, port):
    first = big_app(make_build)
    assert deploy(first, env_name, port).code == 0
    changed = make_build(dict(files_of(first), **{"note.txt": "v2, one file changed"}))
    result = deploy(changed, env_name, port, "--json")
    assert result.code == 0, result
    sent = json_data(result.stdout)["sent_bytes"]
    assert len("v2, one file changed") <= sent < 0.01 * content_size(changed), sent  # its content, the manifest
    assert http_get("lab1", port, "/") == (200, "v2, one file changed")


def files_of(build) -> dict:
    """A build's own files (not its wheels or requirements), to make another from."""
    with tarfile.open(build) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()
                if m.isfile() and not m.name.startswith(("wheels/", "requirements"))}


def test_a_delta_whose_base_release_was_pruned_sends_what_the_host_lacks(make_build, env_name, port, tmp_path,
                                                                        monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("keep = 1\n")
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    first = big_app(make_build)
    assert deploy(first, env_name, port).code == 0
    # older than the store's grace: what no kept release uses is garbage at the next prune
    in_host("lab1", "sh", "-c", f"touch -d '2 days ago' {LAB_HOME}/.qabox/blobs/* {LAB_HOME}/.qabox/manifests/*")
    assert deploy(big_app(make_build), env_name, port).code == 0  # another big file: the first release is pruned
    based = make_build(dict(files_of(first), **{"note.txt": "based on a pruned release"}))
    result = deploy(based, env_name, port, "--json")
    assert result.code == 0, result
    assert json_data(result.stdout)["sent_bytes"] > 3_000_000  # its big file again
    assert http_get("lab1", port, "/") == (200, "based on a pruned release")


def test_a_blob_damaged_on_the_host_is_refused_never_served_and_sent_again(make_build, env_name, port):
    first = big_app(make_build)
    assert deploy(first, env_name, port).code == 0
    sha = next(item[5] for item in build_manifest(first)[0]["members"] if item[0].endswith("static/big.txt"))
    blob = f"{LAB_HOME}/.qabox/blobs/{sha}"
    in_host("lab1", "sh", "-c", f"printf x | dd of={blob} conv=notrunc status=none")  # one byte changed (not hex)
    changed = make_build(dict(files_of(first), **{"note.txt": "v2"}))
    refused = deploy(changed, env_name, port)
    assert refused.code == 6 and "was damaged on the host and was removed: deploy again" in refused.stderr, refused
    assert http_get("lab1", port, "/") == (200, "v1")
    result = deploy(changed, env_name, port, "--json")
    assert result.code == 0 and json_data(result.stdout)["sent_bytes"] >= 3_000_000, result  # the big file again
    assert http_get("lab1", port, "/") == (200, "v2")
    assert in_host("lab1", "sha256sum", blob).stdout.split()[0] == sha


def test_redeploy_switches_release_and_keeps_data(notes_build, make_build, env_name, port):
    assert deploy(notes_build, env_name, port).code == 0
    in_host("lab1", "curl", "-s", "-d", "text=kept", f"http://127.0.0.1:{port}/notes")
    first = status_json(env_name)["release"]
    new = make_build({"notes.py": open_notes_source() + "\n# v2\n",
                      "qabox.toml": '[app]\nentry = "notes:app"\nhealth = "/health"\n'})
    result = deploy(new, env_name, port, "--json")
    data = json_data(result.stdout)
    assert data["changed"] and data["previous"] == first and data["venv_created"] is False
    code, body = http_get("lab1", port, "/notes.json")
    assert code == 200 and "kept" in body


def open_notes_source() -> str:
    from conftest import REPO

    return (REPO / "examples" / "notes" / "notes.py").read_text()


def test_threaded_server_serves_ten_slow_requests_at_once(make_build, env_name, port):
    build = make_build({"wsgi.py": SLOW_APP})
    assert deploy(build, env_name, port).code == 0
    code = ("import time,urllib.request,concurrent.futures as f\n"
            "t=time.monotonic()\n"
            "with f.ThreadPoolExecutor(10) as p:\n"
            f" r=list(p.map(lambda _: urllib.request.urlopen('http://127.0.0.1:{port}/slow').read(), range(10)))\n"
            "print(len(r), time.monotonic()-t)\n")
    count, seconds = in_host("lab1", "/usr/bin/python3", "-c", code).stdout.split()
    assert count == "10" and float(seconds) < 1.0


def test_debugger_is_never_on(make_build, env_name, port):
    build = make_build({"wsgi.py": SLOW_APP})
    assert deploy(build, env_name, port).code == 0
    code, body = http_get("lab1", port, "/boom")
    assert code == 500 and "secret traceback" not in body and "Werkzeug Debugger" not in body


def test_app_that_fails_at_import_keeps_the_old_release(notes_build, make_build, env_name, port):
    assert deploy(notes_build, env_name, port).code == 0
    before = status_json(env_name)["release"]
    broken = make_build({"wsgi.py": "raise RuntimeError('missing setting DATABASE_URL')\n"})
    result = deploy(broken, env_name, port)
    assert result.code == 6
    assert "did not pass its health check" in result.stderr and "previous release keeps serving" in result.stderr
    assert "missing setting DATABASE_URL" in result.stderr  # the app's own log lines
    assert status_json(env_name)["release"] == before
    assert http_get("lab1", port, "/health")[0] == 200


def test_first_deploy_that_fails_leaves_nothing_current(make_build, env_name, port):
    broken = make_build({"wsgi.py": "import nonexistent_module\n"})
    result = deploy(broken, env_name, port)
    assert result.code == 6 and "No module named 'nonexistent_module'" in result.stderr
    env = status_json(env_name)
    assert env["release"] is None


def test_a_hand_made_tar_with_no_requirements_on_a_host_python_without_werkzeug_is_refused_before_sending(
        make_build, env_name, port, asked):
    """It would run on the host python's own packages: the lab's /usr/bin/python3 has no Werkzeug."""
    assert in_host("lab1", "/usr/bin/python3", "-c", "import werkzeug").returncode != 0
    build = make_build({"wsgi.py": "def app(environ, start_response):\n    pass\n"}, with_wheels=False)
    result = deploy(build, env_name, port)
    assert result.code == 5 and result.stderr == (
        f"qabox: error: {build.name} has no requirements.txt, so it runs on lab1's python's own packages, which "
        f"lack Werkzeug (its app server): add a requirements.txt with `werkzeug`, or make the build with "
        f"`qabox build`, which adds it\n"), result
    assert asked == ["session", "session", "upload-state"], asked  # a new env: made on the second; no python-info
    assert "Traceback" not in result.stderr and status_json(env_name)["release"] is None


def test_missing_entry_is_refused_and_leaves_no_env_on_the_host(make_build, env_name, port):
    """The build is checked while qabox connects: a new env is made only once it passed."""
    build = make_build({"main.py": "x = 1\n"})
    result = deploy(build, env_name, port)
    assert result.code == 5
    assert result.stderr.strip().endswith(
        "add `[app] entry = \"module:app\"` to its qabox.toml, pass --app module:callable (or "
        "module:create_app() for a factory), or ship a wsgi.py or app.py defining `app`")
    assert in_host("lab1", "test", "-e", f"{LAB_HOME}/.qabox/envs/{env_name}").returncode == 1


def test_a_bad_build_is_reported_before_an_unreachable_host(make_build, env_name, port, tmp_path, monkeypatch):
    config = tmp_path / "ssh_config"
    config.write_text("Host nowhere\n  HostName 127.0.0.1\n  Port 9\n")
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    result = qabox("deploy", make_build({"main.py": "x = 1\n"}), "--host", "nowhere", "--env", env_name)
    assert result.code == 5 and "add `[app] entry" in result.stderr, result


def test_hostile_build_is_refused_naming_members(tmp_path, env_name, port):
    evil = tarfile.TarInfo("static/passwd")
    evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
    build = raw_tar(tmp_path / "evil.tar", [(tarfile.TarInfo("app.py"), b"app = None\n"),
                                            (tarfile.TarInfo("../../.bashrc"), b"echo pwned\n"),
                                            (evil, None)])
    result = deploy(build, env_name, port)
    assert result.code == 5
    assert "../../.bashrc: path with '..'" in result.stderr
    assert "static/passwd: link to an absolute path" in result.stderr


def test_port_taken_on_the_host(notes_build, env_name, port):
    blocker = in_host_background("lab1", port)
    try:
        result = deploy(notes_build, env_name, port)
    finally:
        blocker.set()
    assert result.code == 6
    assert f"port {port} is already in use on the host's loopback" in result.stderr


def in_host_background(host: str, port: int) -> threading.Event:
    """Occupy a port on the lab host's loopback until the returned event is set."""
    done = threading.Event()
    code = (f"import socket,sys;s=socket.socket();s.bind(('127.0.0.1',{port}));s.listen();"
            "print('ready',flush=True);sys.stdin.read()")
    import subprocess
    import sys

    from conftest import LAB

    proc = subprocess.Popen([sys.executable, str(LAB), "exec", host, "--", "/usr/bin/python3", "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"

    def wait():
        done.wait(60)
        proc.stdin.close()
        proc.wait(10)

    threading.Thread(target=wait, daemon=True).start()
    return done


def test_lock_held_names_the_holder(notes_build, env_name, port):
    ctx = Context.create()
    holding, release = threading.Event(), threading.Event()

    def hold():
        with ctx.remote("lab1") as remote, remote.session(env_name, 5, "alice@laptop", create=True):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        started = time.monotonic()
        result = deploy(notes_build, env_name, port, "--lock-timeout", "1")
        assert time.monotonic() - started < 15
    finally:
        release.set()
        thread.join(30)
    assert result.code == 7
    assert "another deploy to env" in result.stderr and "alice@laptop since" in result.stderr
    # the holder's channel closed: the lock is free again at once
    assert deploy(notes_build, env_name, port, "--lock-timeout", "5").code == 0


def test_status_reports_an_unreachable_host_and_still_prints_the_others(notes_build, env_name, port, tmp_path, monkeypatch):
    from conftest import LAB_DIR

    config = tmp_path / "ssh_config"
    config.write_text((LAB_DIR / "ssh_config").read_text()
                      + "\nHost ghost\n  HostName 198.18.99.2\n  ConnectTimeout 2\n")
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    assert deploy(notes_build, env_name, port).code == 0
    result = qabox("status", "--host", "lab1", "--host", "ghost", "--json")
    hosts = {h["host"]: h for h in json_data(result.stdout)["hosts"]}
    assert result.code == 1
    assert hosts["ghost"]["reachable"] is False and "cannot connect" in hosts["ghost"]["error"]
    assert any(e["env"] == env_name and e["state"] == "running" for e in hosts["lab1"]["envs"])


def test_bad_env_names_are_refused(notes_build):
    for bad in ("../x", "a;rm -rf ~", "A B", "ü"):
        result = qabox("deploy", notes_build, "--host", "lab1", "--env", bad)
        assert result.code == 2 and "is not allowed" in result.stderr


def test_no_such_host(notes_build):
    result = qabox("deploy", notes_build, "--host", "no-such-host-xyz.invalid")
    assert result.code == 3 and "does not resolve" in result.stderr


def test_app_survives_the_ssh_session_and_the_command_returns(notes_build, env_name, port):
    started = time.monotonic()
    assert deploy(notes_build, env_name, port).code == 0
    assert time.monotonic() - started < 60

    def left():
        """The deploy account's live processes other than env supervisors and apps (sshd, session agents)."""
        ps = in_host("lab1", "ps", "-u", LAB_USER, "-o", "stat=,args=").stdout.splitlines()
        return [line for line in ps if not line.startswith("Z") and not re.search(r" (supervise|serve) ", line)]

    # no SSH session of ours is left, yet the app serves
    assert wait_until(lambda: not left(), 10), left()
    assert http_get("lab1", port, "/health")[0] == 200


def test_killed_client_leaves_no_stale_lock_and_no_half_release(tmp_path, env_name, port, notes_build):
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, forget

    big = tmp_path / "big.tar.gz"
    subprocess.run([sys.executable, str(REPO / "scripts" / "example-build"), "-o", str(big),
                    "--assets-mb", "60"], check=True, stdout=subprocess.DEVNULL)
    forget(big)  # its blobs may be on the host from an earlier run: then nothing would be uploaded
    proc = subprocess.Popen([sys.executable, "-m", "qabox", "deploy", str(big), "--host", "lab1",
                             "--env", env_name, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    uploading = wait_until(lambda: in_host("lab1", "sh", "-c", f"ls {LAB_HOME}/.qabox/uploads/ | grep -q delta")
                           .returncode == 0, 30)
    proc.send_signal(signal.SIGKILL)
    assert uploading, "the upload never started"
    proc.wait()
    started = time.monotonic()
    result = deploy(notes_build, env_name, port, "--lock-timeout", "10")
    assert result.code == 0, result
    assert time.monotonic() - started < 15
    releases = in_host("lab1", "ls", f"{LAB_HOME}/.qabox/envs/{env_name}/releases").stdout.split()
    assert len(releases) == 1


def test_old_releases_are_pruned(make_build, env_name, port, tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("keep = 2\n")
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    for n in range(3):
        assert deploy(make_build({"wsgi.py": SLOW_APP + f"\n# {n}\n"}), env_name, port).code == 0
    current = status_json(env_name)["release"]
    releases = in_host("lab1", "ls", f"{LAB_HOME}/.qabox/envs/{env_name}/releases").stdout.split()
    assert len(releases) == 2 and current in releases


def test_a_missing_agent_is_pushed_even_if_its_command_ended_first(monkeypatch):
    """Without the agent the host's command exits at once (97), and can close the
    channel before the request is sent: that must lead to a push, not an error."""
    ctx = Context.create()
    settings = dataclasses.replace(ctx.settings("lab1"), dir=".qabox-agent-race")  # no agent there yet
    exec_command = paramiko.Channel.exec_command
    ended = []

    def late_exec(channel, command):
        exec_command(channel, command)
        if not ended:  # the first, with no agent there: the request goes out once the command has ended
            ended.append(wait_until(channel.exit_status_ready, 10))

    monkeypatch.setattr(paramiko.Channel, "exec_command", late_exec)
    client = ssh.connect(ctx.target("lab1"))
    try:
        assert Remote("lab1", client, settings).call("hello")["protocol"]
        assert ended == [True]
    finally:
        client.close()
        in_host("lab1", "rm", "-rf", f"{LAB_HOME}/.qabox-agent-race")


def test_deploy_summary_counts_bytes_in_decimal_units_like_the_progress_bar(make_build, env_name, port):
    from rich.filesize import decimal

    build = make_build({"wsgi.py": f"from flask import Flask\napp = Flask(__name__)  # {env_name}\n"
                                   "@app.get('/')\ndef i():\n    return 'ok'\n"})  # a 404 is not up
    from conftest import forget
    from qabox.agent import manifest

    forget(build)  # all of it is sent: its manifest and each content once
    listed = build_manifest(build)[0]
    size = len(manifest.canonical(listed)) + sum({item[5]: item[4] for item in listed["members"]}.values())
    result = deploy(build, env_name, port)
    assert result.code == 0, result
    first = result.stdout.splitlines()[0]
    assert re.fullmatch(rf"✓ lab1/{env_name}: release \d{{8}}-\d{{6}} is live \({build.name}, "
                        rf"\d+\.\d s, sent {re.escape(decimal(size))}\)", first), first
    assert decimal(size).endswith((" kB", " MB"))


def test_status_on_an_80_column_terminal(notes_build, env_name, port, tmp_path, monkeypatch):
    """Nothing that names a row is cut; the other columns follow each row; the reason
    a host is unreachable comes after the table, wrapped at words."""
    import textwrap

    from rich.console import Console

    from conftest import LAB_DIR
    from qabox.cli import output

    config = tmp_path / "ssh_config"
    config.write_text((LAB_DIR / "ssh_config").read_text()
                      + "\nHost ghost\n  HostName 198.18.99.2\n  ConnectTimeout 2\n")
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    assert deploy(notes_build, env_name, port).code == 0
    assert qabox("stop", "--host", "lab1", "--env", env_name).code == 0
    hosts = json_data(qabox("status", "--host", "lab1", "--host", "ghost", "--env", env_name, "--json").stdout)
    env, ghost = hosts["hosts"][0]["envs"][0], hosts["hosts"][1]
    assert f"`ssh -F {config} ghost` works" in ghost["error"]

    screen = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=screen, width=80, force_terminal=True,
                                            color_system=None, soft_wrap=True))
    result = qabox("status", "--host", "lab1", "--host", "ghost", "--env", env_name)
    assert result.code == 1
    w = max(len(env_name), 3)
    details = [""]  # the row's other columns, "name: value", as many to a line as fit
    for item in (f"server: {env['server']}", f"restarts: {env['restarts']}",
                 f"deployed: {env['deployed_at']} by {env['deployed_by']}", f"errors: {env['errors']}"):
        if details[-1] and len(details[-1]) + 4 + len(item) > 80:
            details.append("")
        details[-1] += ("  " if details[-1] else "") + item
    assert screen.getvalue() == (
        f"HOST   {'ENV'.ljust(w)}  RELEASE          STATE        PORT\n"
        f"lab1   {env_name.ljust(w)}  {env['release']}  stopped      {port}\n"
        + "".join(f"  {line}\n" for line in details)
        + f"ghost  {'-'.ljust(w)}  -                unreachable\n"
        + "".join(line + "\n" for line in textwrap.wrap(f"ghost: {ghost['error']}", 80,
                                                        subsequent_indent="  ", break_on_hyphens=False))
    )


@pytest.mark.network
def test_deploy_dir_builds_for_the_host_and_an_unchanged_project_reuses_its_build(tmp_path, env_name, port):
    from conftest import REPO

    project = tmp_path / "notes"
    shutil.copytree(REPO / "examples" / "notes", project)
    first = deploy(project, env_name, port)
    assert first.code == 0, first
    assert first.stdout.startswith(f"{project}: built for lab1\n") and "is live" in first.stdout
    assert http_get("lab1", port, "/")[0] == 200

    started = time.monotonic()
    again = deploy(project, env_name, port)
    assert again.code == 0, again
    assert again.stdout.startswith(f"{project}: unchanged: its cached build reused\n")
    assert "nothing changed" in again.stdout
    assert time.monotonic() - started < 20  # no resolving: pip alone takes longer than that offline

    (project / "notes.py").write_text((project / "notes.py").read_text() + "\n# changed\n")
    changed = qabox("deploy", project, "--host", "lab1", "--env", env_name, "--port", port, "--json")
    assert changed.code == 0, changed
    data = json_data(changed.stdout)
    assert data["built"] == "built" and data["changed"] and data["file"] == "notes"
    assert in_host("lab1", "grep", "-c", "# changed", f"{LAB_HOME}/.qabox/envs/{env_name}/current/notes.py").stdout == "1\n"


def test_a_project_directory_with_a_broken_qabox_toml_is_refused_in_one_line(tmp_path, env_name, port):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "qabox.toml").write_text("[build\n")
    result = deploy(project, env_name, port)
    assert result.code != 0 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"qabox: error: {project / 'qabox.toml'}:") and result.stderr.count("\n") == 1


def test_status_and_logs_of_an_env_the_host_does_not_have(notes_build, env_name, port):
    assert deploy(notes_build, env_name, port).code == 0
    missing = env_name + "typo"
    for command in ("status", "logs", "releases"):
        result = qabox(command, "--host", "lab1", "--env", missing)
        found = re.fullmatch(rf"qabox: error: lab1: there is no env {missing} on this host "
                             rf"\(its envs: ([a-z0-9_, -]+)\)\n", result.stderr)
        assert result.code == 6 and result.stdout == "" and found, (command, result)
        assert env_name in found.group(1).split(", ")


def test_status_of_a_missing_env_on_several_hosts_is_a_row_each(tmp_path, monkeypatch):
    from conftest import LAB_DIR

    config = tmp_path / "ssh_config"
    config.write_text((LAB_DIR / "ssh_config").read_text().replace("Host lab1\n", "Host lab1 lab1b\n", 1))
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    result = qabox("status", "--host", "lab1", "--host", "lab1b", "--env", "nosuchenv")
    assert result.code == 1
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "HOST   ENV        RELEASE  SERVER  STATE        PID  UPTIME  RESTARTS  PORT  HEALTH  DEPLOYED  TESTERS  ERRORS",
        "lab1   nosuchenv  -                no such env",
        "lab1b  nosuchenv  -                no such env"]
    for host, line in zip(("lab1", "lab1b"), lines[3:]):
        assert re.fullmatch(rf"{host}: there is no env nosuchenv on this host "
                            rf"\((its envs: [a-z0-9_, -]+|nothing is deployed there yet)\)", line)
