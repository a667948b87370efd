"""Faults injected on the lab's real hosts: the current release keeps serving,
nothing half-done is left, and every failure says what happened."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import (LAB, LAB_ADDR, LAB_DIR, LAB_HOME, LAB_USER, REPO, Lines, app_pids, build_manifest, forget, http_get,
                      in_host, json_data, link, qabox, raw_tar, wait_until)
from qabox import host_python
from qabox.agent import rules

pytestmark = pytest.mark.usefixtures("lab")
HOME = LAB_HOME


def deploy_cmd(build, env, port, *extra) -> list[str]:
    return [sys.executable, "-m", "qabox", "deploy", str(build), "--host", "lab1", "--env", env,
            "--port", str(port), *extra]


def served_release(port) -> str:
    return http_get("lab1", port, "/release")[1]


def status(env) -> dict:
    return json_data(qabox("status", "--host", "lab1", "--env", env, "--json").stdout)["hosts"][0]["envs"][0]


def example_build(tmp_path, name: str, assets_mb: int = 0) -> os.PathLike:
    out = tmp_path / name
    subprocess.run([sys.executable, str(REPO / "scripts" / "example-build"), "-o", str(out),
                    "--assets-mb", str(assets_mb)], check=True, stdout=subprocess.DEVNULL)
    return out


def test_two_deploys_at_once_end_in_one_complete_release(tmp_path, env_name, port, make_build):
    a = make_build({"notes.py": "from flask import Flask\nimport os\napp = Flask(__name__)\n"
                                "@app.get('/release')\ndef r():\n    return os.environ['QABOX_RELEASE']\n",
                    "qabox.toml": '[app]\nentry = "notes:app"\nhealth = "/release"\n'})
    b = example_build(tmp_path, "b.tar.gz")
    procs = [subprocess.Popen(deploy_cmd(build, env_name, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for build in (a, b)]
    results = [(p.wait(180), p.stderr.read()) for p in procs]
    assert all(code == 0 or (code == 7 and "holds the lock" in err) for code, err in results), results
    assert any(code == 0 for code, _ in results)
    env = status(env_name)
    assert env["state"] == "running" and env["release"] == served_release(port)
    releases = in_host("lab1", "ls", "-A", f"{HOME}/.qabox/envs/{env_name}/releases").stdout.split()
    assert not [r for r in releases if r.startswith(".")]  # no half release


def throttle(rate: str | None) -> None:
    """Slow lab1's link (so an upload is still running when we cut it), or stop slowing it."""
    subprocess.run(["tc", "qdisc", "del", "dev", "qlab1", "root"], capture_output=True)
    if rate:
        subprocess.run(["tc", "qdisc", "add", "dev", "qlab1", "root", "tbf", "rate", rate,
                        "burst", "64kb", "latency", "400ms"], check=True)


def wait_for_part(env: str, min_bytes: int, timeout: float = 60) -> int:
    """The size of the env's delta upload once it has at least ``min_bytes``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = in_host("lab1", "sh", "-c", f"stat -c %s {HOME}/.qabox/uploads/{env}.delta-*.part 2>/dev/null").stdout
        if out.strip() and int(out) >= min_bytes:
            return int(out)
        time.sleep(0.2)
    raise AssertionError("the upload never started")


def test_cut_link_during_upload_fails_clearly_and_the_retry_resumes(tmp_path, env_name, port):
    big = example_build(tmp_path, "big.tar.gz", assets_mb=100)
    size = big.stat().st_size
    forget(big)
    throttle("80mbit")
    try:
        proc = subprocess.Popen(deploy_cmd(big, env_name, port), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        wait_for_part(env_name, 20 * 2**20)
        subprocess.run([sys.executable, str(LAB), "link", "lab1", "down"], check=True)
        started = time.monotonic()
        try:
            _, err = proc.communicate(timeout=90)
        finally:
            subprocess.run([sys.executable, str(LAB), "link", "lab1", "up"], check=True)
        assert proc.returncode != 0 and time.monotonic() - started < 60, err
        assert "stalled" in err or "connection" in err, err
        assert "Traceback" not in err
    finally:
        throttle(None)
    retry = qabox("deploy", big, "--host", "lab1", "--env", env_name, "--port", port, "--json")
    assert retry.code == 0, retry
    sent = json_data(retry.stdout)["sent_bytes"]
    assert 0 < sent < 0.8 * size  # resumed, not started over
    assert status(env_name)["state"] == "running"


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """lab1's deploy directory on a 60 MB tmpfs, through a hosts file."""
    mount = f"{HOME}/qabox-small"
    # sshd runs in a mount namespace of its own (ip netns exec): mount in there
    in_sshd = ["nsenter", "-t", (LAB_DIR / "lab1" / "sshd.pid").read_text().strip(), "-m", "-r"]
    subprocess.run(["mkdir", "-p", mount], check=True)
    subprocess.run(in_sshd + ["mount", "-t", "tmpfs", "-o", "size=60m,mode=0700", "tmpfs", mount], check=True)
    subprocess.run(in_sshd + ["chown", f"{LAB_USER}:{LAB_USER}", mount], check=True)
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text('dir = "qabox-small"\n')
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    yield mount, in_sshd
    in_host("lab1", "sh", "-c", "pkill -KILL -f 'qabox-smal[l]'")
    assert wait_until(lambda: in_host("lab1", "pgrep", "-f", "qabox-smal[l]").returncode == 1, 10)
    subprocess.run(in_sshd + ["umount", "-l", mount])
    subprocess.run(["rmdir", mount])


def test_disk_full_fails_naming_the_disk_and_keeps_the_release(tmp_path, env_name, port, small_disk):
    mount, in_sshd = small_disk
    notes = example_build(tmp_path, "notes.tar.gz")
    assert qabox("deploy", notes, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    before = served_release(port)
    for assets in (70, 30):  # too big to upload at all; fits the upload, not the extraction
        result = qabox("deploy", example_build(tmp_path, f"a{assets}.tar.gz", assets), "--host", "lab1",
                       "--env", env_name, "--port", port)
        assert result.code == 6 and "disk is full" in result.stderr, result
        assert served_release(port) == before
        def ls(path: str) -> list:
            return subprocess.run(in_sshd + ["ls", "-A", path], capture_output=True, text=True).stdout.split()

        left, uploads = ls(f"{mount}/envs/{env_name}/releases"), ls(f"{mount}/uploads")
        kept = {item[5] for item in build_manifest(notes)[0]["members"] if item[5]}
        assert len(left) == 1 and set(ls(f"{mount}/blobs")) == kept, left  # the current release and its build
        assert not [name for name in left + uploads if name.startswith(".") or name.endswith(".part")], left


def test_app_hanging_at_start_keeps_the_old_release(tmp_path, env_name, port, make_build, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("start_timeout = 3\n")
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    assert qabox("deploy", example_build(tmp_path, "n.tar.gz"), "--host", "lab1", "--env", env_name,
                 "--port", port).code == 0
    before = served_release(port)
    hang = make_build({"wsgi.py": "import time\ntime.sleep(600)\n"})
    result = qabox("deploy", hang, "--host", "lab1", "--env", env_name, "--port", port)
    assert result.code == 6 and "no answer within 3 s" in result.stderr
    assert served_release(port) == before
    assert len(app_pids(env_name)) == 1


def test_planted_symlinks_are_never_followed(tmp_path, env_name, port):
    build = example_build(tmp_path, "n.tar.gz")
    listed, mid = build_manifest(build)
    forget(build)
    victim = f"{HOME}/victim.txt"
    planted = [f"{HOME}/.qabox/uploads/{env_name}.manifest-{mid}.part"] + [  # and a blob's name, for each blob
        f"{HOME}/.qabox/blobs/{item[5]}" for item in listed["members"] if item[5]]
    in_host("lab1", "sh", "-c", f"echo untouched > {victim}; mkdir -p {HOME}/.qabox/uploads {HOME}/.qabox/blobs; "
                                f"chown {LAB_USER} {victim}; for p in {' '.join(planted)}; do ln -sf {victim} $p; "
                                f"chown -h {LAB_USER} $p; done")
    try:
        assert qabox("deploy", build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
        assert in_host("lab1", "cat", victim).stdout == "untouched\n"
    finally:
        in_host("lab1", "rm", "-f", victim)


def test_a_build_writing_through_its_own_links_is_refused_by_the_host(tmp_path, env_name, port, monkeypatch):
    """Issue 11: a chain of links from a release up to the home directory, sent past the client's check.

    The release is extracted 5 levels below home: a/b/c/d lands in the env's directory and
    points 3 levels up, so a/b/c/d/FILE is ~/FILE, and e -> c/d is home, which the old chmod
    walk followed. (FILE is a file of the test's own, not authorized_keys: were the host to
    follow the chain, the shared lab's logins would survive it.)
    """
    assert qabox("deploy", example_build(tmp_path, "n.tar.gz"), "--host", "lab1", "--env", env_name,
                 "--port", port).code == 0
    before = served_release(port)
    victim = f"victim-{env_name}.txt"
    hostile = raw_tar(tmp_path / "chain.tar", [(tarfile.TarInfo("wsgi.py"), b"app = None\n")] + [
        (link(name, target), None) for name, target in
        (("a/b", ".."), ("a/b/c", "../.."), ("a/b/c/d", "../../.."), ("e", "c/d"))
    ] + [(tarfile.TarInfo(f"a/b/c/d/{victim}"), b"pwned\n")])
    in_host("lab1", "sh", "-c", f"echo untouched > {HOME}/{victim} && chown {LAB_USER} {HOME}/{victim}")
    # what this build could change (the shared lab's other tests edit authorized_keys, so not its content):
    # modes, the victim, and the link a/b/c/d would leave in the env's directory
    watch = (f"stat -c '%a %n' {HOME} {HOME}/.ssh {HOME}/.ssh/authorized_keys; cat {HOME}/{victim}; "
             f"ls -A {HOME}/.qabox/envs/{env_name}/d 2>&1; grep -c pwned {HOME}/.ssh/authorized_keys")
    home = in_host("lab1", "sh", "-c", watch).stdout
    assert "untouched" in home and "No such file" in home
    monkeypatch.setattr(rules, "check_members", lambda *a, **k: [])  # the client's checks: the host is on its own
    monkeypatch.setattr(host_python, "check_host_servers", lambda *a, **k: None)
    try:
        result = qabox("deploy", hostile, "--host", "lab1", "--env", env_name, "--port", port)
        assert in_host("lab1", "sh", "-c", watch).stdout == home
        assert result.code == 6, result
        assert "unsafe members: a/b/c: written through the link a/b made by an earlier member" in result.stderr
        assert served_release(port) == before
        left = in_host("lab1", "ls", "-A", f"{HOME}/.qabox/envs/{env_name}/releases").stdout.split()
        assert len(left) == 1 and not left[0].startswith("."), left
    finally:
        mode = home.split()[0]  # put home back even if the host followed the chain
        in_host("lab1", "sh", "-c", f"chmod {mode} {HOME}; rm -f {HOME}/{victim}")


def test_files_on_the_host_are_the_deploy_accounts_only(tmp_path, env_name, port):
    assert qabox("deploy", example_build(tmp_path, "n.tar.gz"), "--host", "lab1", "--env", env_name,
                 "--port", port).code == 0
    base = f"{HOME}/.qabox"
    listing = in_host("lab1", "sh", "-c", f"find {base} -maxdepth 1 -printf '%m %p\\n'; "
                                          f"find {base}/envs/{env_name} {base}/blobs {base}/manifests {base}/uploads {base}/agent "
                                          f"-maxdepth 2 -not -type l -printf '%m %p\\n'").stdout
    for line in listing.splitlines():
        mode, path = line.split(" ", 1)
        assert int(mode, 8) & 0o077 == 0, line


COMMANDS = [
    ["status", "--host", "lab1", "--json"], ["logs", "--host", "lab1"], ["releases", "--host", "lab1"],
    ["stop", "--host", "lab1", "--env", "nosuchenv"], ["start", "--host", "lab1"], ["restart", "--host", "lab1"],
    ["rollback", "--host", "lab1"], ["testers", "list", "--host", "lab1"],
    ["tunnel", "--user", "someone", "--host", "lab1"],
]


@pytest.mark.parametrize("known", ["empty", "changed"])
def test_unknown_and_changed_host_keys_are_refused_by_every_command(tmp_path, monkeypatch, known, notes_build):
    known_hosts = tmp_path / "known_hosts"
    if known == "changed":
        import paramiko

        other = paramiko.Ed25519Key.from_private_key_file(str(LAB_DIR / "keys" / "deploy"))
        known_hosts.write_text(f"{LAB_ADDR} ssh-ed25519 {other.get_base64()}\n")
    config = tmp_path / "ssh_config"
    config.write_text((LAB_DIR / "ssh_config").read_text().replace(str(LAB_DIR / "known_hosts"), str(known_hosts)))
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    expected = "unknown host key" if known == "empty" else "DIFFERENT host key"
    for command in COMMANDS + [["deploy", str(notes_build), "--host", "lab1"]]:
        result = qabox(*command)
        if command[0] == "status":  # status reports each host, an unreachable one too (exit 1)
            host = json_data(result.stdout)["hosts"][0]
            assert result.code == 1 and not host["reachable"] and expected in host["error"], result
        else:  # nothing was sent: the host-key error itself (exit 4)
            assert result.code == 4 and expected in result.stderr, (command, result)


def test_ten_thousand_files_deploy(make_build, env_name, port):
    files = {f"static/f{i // 100}/{i}.txt": str(i) for i in range(10_000)}
    files["wsgi.py"] = "from flask import Flask\napp = Flask(__name__)\n@app.get('/')\ndef i():\n    return 'many'\n"
    result = qabox("deploy", make_build(files), "--host", "lab1", "--env", env_name, "--port", port)
    assert result.code == 0, result
    assert http_get("lab1", port, "/")[1] == "many"


def test_extracted_size_limit(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.mkdir()
    (hosts / "lab1.toml").write_text("max_build_mb = 2\n")
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(hosts))
    result = qabox("deploy", example_build(tmp_path, "a.tar.gz", 3), "--host", "lab1", "--env", "never")
    assert result.code == 5 and "exceeds the limit of 2 MB" in result.stderr


def restart_sshd() -> None:
    """Kill lab1's sshd and every session it serves, then start it again."""
    pid = (LAB_DIR / "lab1" / "sshd.pid").read_text().strip()
    subprocess.run(["pkill", "-KILL", "-P", pid], check=False)
    subprocess.run(["kill", "-KILL", pid], check=False)
    subprocess.run(["pkill", "-KILL", "-f", f"sshd: {LAB_USER}"], check=False)
    subprocess.run([sys.executable, str(LAB), "up"], check=True, capture_output=True)


def test_sshd_restart_during_logs_follow_fails_clearly(tmp_path, env_name, port):
    assert qabox("deploy", example_build(tmp_path, "n.tar.gz"), "--host", "lab1", "--env", env_name,
                 "--port", port).code == 0
    assert http_get("lab1", port, "/health")[0] == 200  # a line in the app's log, for -f to print
    follow = subprocess.Popen([sys.executable, "-m", "qabox", "logs", "--host", "lab1", "--env", env_name, "-f"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    out = Lines(follow.stdout)
    assert wait_until(lambda: out.saying("GET /health"), 30), "logs -f never printed the log"
    restart_sshd()
    follow.wait(timeout=40)
    err = follow.stderr.read()
    assert follow.returncode != 0 and "qabox: error:" in err and "Traceback" not in err
    assert http_get("lab1", port, "/health")[0] == 200  # the app never noticed


@pytest.mark.parametrize("killed", ["client", "agent"])
def test_client_killed_mid_extract_leaves_nothing_half_done(tmp_path, env_name, port, make_build, killed):
    """Killed as the host assembles the release: qabox (the agent notices), or the agent itself (kill -9)."""
    import signal

    build = make_build({"wsgi.py": "from flask import Flask\napp = Flask(__name__)\n"
                                   "@app.get('/')\ndef i():\n    return 'ok'\n",  # a 404 is not up
                        **{f"static/{i}.txt": "x" * 1000 for i in range(3000)}})
    proc = subprocess.Popen(deploy_cmd(build, env_name, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    releases = f"{HOME}/.qabox/envs/{env_name}/releases"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the host is extracting or preparing the venv
        if in_host("lab1", "sh", "-c", f"ls -A {releases} 2>/dev/null | grep -q '^\\.'").returncode == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the deploy never reached extraction")
    if killed == "agent":  # the session's agent: the process holding the env's deploy lock
        holder = in_host("lab1", "sh", "-c", f"for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null | grep -q "
                                             f"'/{env_name}/deploy.lock$' && echo ${{p#/proc/}}; done").stdout.split()
        assert len(holder) == 1, holder
        in_host("lab1", "kill", "-KILL", holder[0])
        assert proc.wait(60) != 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the agent notices at its next step (or, killed, the next deploy does), removes the half release
    assert qabox("deploy", build, "--host", "lab1", "--env", env_name, "--port", port,
                 "--lock-timeout", "30").code == 0
    left = in_host("lab1", "ls", "-A", releases).stdout.split()
    assert len(left) == 1 and not left[0].startswith("."), left
