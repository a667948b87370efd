"""Invites: the format checked field by field, the store of joined invites, and,
on a real lab host, an invite serving a tester whose machine has nothing set up."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from qabox import invites, joined
from qabox.context import Context
from qabox.errors import ConfigError
from qabox.invites import Invite, InviteError
from qabox.paramiko_compat import paramiko

from conftest import LAB_ADDR, LAB_USER, free_port, new_key, qabox, wait_until
from conftest import url_get as get

PRIVATE, PUBLIC = invites.generate_key("tester2@oldbox")
HOST_KEY = " ".join(invites.generate_key("host")[1].split()[:2])
INVITE = Invite(host="oldbox", address="192.0.2.7", port=2222, account="deploy", host_keys=(HOST_KEY,),
                tester="tester2", ports={"main": 18080, "b": 18081}, envs=("b", "main"),
                expires="2026-12-09T12:00:00Z", key=PRIVATE)


def payload(invite_line: str) -> dict:
    body = invite_line.split(":", 2)[2]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def encoded(data: dict) -> str:
    return "qabox-invite:1:" + base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_an_invite_is_one_line_that_decodes_to_itself_also_wrapped_by_a_chat():
    line = INVITE.encode()
    assert line.startswith("qabox-invite:1:") and "\n" not in line and "=" not in line
    assert invites.decode(line) == INVITE
    assert invites.decode("  " + "\n".join(line[i:i + 70] for i in range(0, len(line), 70)) + "\n") == INVITE
    public = replace(INVITE, key=None, envs=None, expires=None)
    assert "key" not in payload(public.encode()) and invites.decode(public.encode()) == public


def test_a_made_key_is_an_ed25519_pair_paramiko_reads():
    key = paramiko.Ed25519Key.from_private_key(__import__("io").StringIO(PRIVATE))
    assert PUBLIC.split()[:2] == [key.get_name(), key.get_base64()] and PUBLIC.endswith(" tester2@oldbox")


def test_the_plain_ssh_command_trusts_the_pinned_key_only():
    assert INVITE.known_hosts_lines() == [f"[192.0.2.7]:2222 {HOST_KEY}"]
    assert replace(INVITE, port=22).known_hosts_lines() == [f"192.0.2.7 {HOST_KEY}"]
    command = INVITE.ssh_command("my key", "oldbox.known_hosts")
    assert command == ("ssh -N -L 8080:127.0.0.1:18081 -L 8081:127.0.0.1:18080 -i 'my key' -o IdentitiesOnly=yes "
                       "-o UserKnownHostsFile=oldbox.known_hosts -o StrictHostKeyChecking=yes "
                       "-o ExitOnForwardFailure=yes -o ServerAliveInterval=15 -p 2222 deploy@192.0.2.7")
    assert INVITE.local_urls() == ["b: http://127.0.0.1:8080", "main: http://127.0.0.1:8081"]
    assert replace(INVITE, ports={}).ssh_command("k", "f") is None


def damaged(**changes) -> str:
    data = payload(INVITE.encode())
    for name, value in changes.items():
        if value is None:
            data.pop(name)
        else:
            data[name] = value
    return encoded(data)


RSA_WITH_ED25519_BLOB = "ssh-rsa " + HOST_KEY.split()[1]


@pytest.mark.parametrize("text, says", [
    ("hello", "not a qabox invite"),
    ("qabox-invite:2:e30", "version '2'"),
    ("qabox-invite:1:not base64!", "damaged (not base64url)"),
    ("qabox-invite:1:" + base64.urlsafe_b64encode(b"{nope").decode().rstrip("="), "not JSON inside"),
    (encoded([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
    (damaged(address=None), "address is missing"),
    (damaged(address="-oProxyCommand=x"), "address is missing or not valid"),
    (damaged(address="a b"), "address"),
    (damaged(port=0), "port"),
    (damaged(port=True), "port"),
    (damaged(account="root;id"), "account"),
    (damaged(tester="Bad Name"), "tester"),
    (damaged(host="-x"), "host "),
    (damaged(ports={"main": "18080"}), "ports"),
    (damaged(envs="main"), "envs"),
    (damaged(expires="tomorrow"), "expires"),
    (damaged(host_keys=[]), "host_keys"),
    (damaged(host_keys="ssh-ed25519 AAAA"), "host_keys"),
    (damaged(host_keys=["ssh-dss AAAAB3NzaC1kc3M="]), "type 'ssh-dss'"),
    (damaged(host_keys=["ssh-ed25519 !!!"]), "ssh-ed25519 host key is damaged"),
    (damaged(host_keys=[RSA_WITH_ED25519_BLOB]), "ssh-rsa host key is damaged"),
    (damaged(key="-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"),
     "private key is damaged"),
])
def test_a_malformed_invite_is_refused_in_one_line(text, says):
    with pytest.raises(InviteError) as refused:
        invites.decode(text)
    assert says in refused.value.message and "\n" not in refused.value.message, refused.value.message


def test_fields_of_a_newer_qabox_are_ignored():
    assert invites.decode(encoded(dict(payload(INVITE.encode()), color="blue"))) == INVITE


@pytest.mark.parametrize("text, default, wanted", [
    ("box.example.org", 22, ("box.example.org", 22)), ("192.0.2.1:2200", 22, ("192.0.2.1", 2200)),
    ("[2001:db8::1]:2200", 22, ("2001:db8::1", 2200)), ("[2001:db8::1]", 2201, ("2001:db8::1", 2201)),
    ("2001:db8::1", 22, ("2001:db8::1", 22))])
def test_address_option(text, default, wanted):
    assert invites.address_option(text, default) == wanted


@pytest.mark.parametrize("text", ["box:port", "box:0", "box:70000", "-box", "a b", ""])
def test_a_bad_address_option_is_refused(text):
    with pytest.raises(ConfigError, match="is not HOST"):
        invites.address_option(text, 22)


@pytest.fixture
def ctx(tmp_path) -> Context:
    return Context(ssh_config=None, hosts_dir=tmp_path / "hosts", state_dir=tmp_path / "state", cache_dir=tmp_path)


def test_join_stores_the_key_and_pinned_keys_privately_and_is_idempotent(ctx):
    place, how = joined.join(ctx, INVITE)
    assert how == "joined" and joined.join(ctx, INVITE)[1] == "unchanged"
    assert (place.folder.stat().st_mode & 0o777) == 0o700
    for name in ("key", "known_hosts", "invite.json"):
        assert ((place.folder / name).stat().st_mode & 0o777) == 0o600, name
    assert (place.folder / "key").read_text() == PRIVATE
    assert place.known_hosts.read_text() == f"[192.0.2.7]:2222 {HOST_KEY}\n"
    target = place.target()
    assert (target.hostname, target.port, target.user, target.known_hosts) == (
        "192.0.2.7", 2222, "deploy", (str(place.known_hosts),))
    assert target.identity_files == (str(place.folder / "key"),) and target.identities_only and target.pinned_by
    assert joined.joined(ctx) == [place]


def test_another_invite_for_the_same_tester_and_host_replaces_it(ctx, tmp_path):
    joined.join(ctx, INVITE)
    mine = new_key(tmp_path / "mine")
    place, how = joined.join(ctx, replace(INVITE, key=None, address="192.0.2.8"), identity=mine)
    assert how == "replaced" and not (place.folder / "key").exists()
    assert [j.invite.address for j in joined.joined(ctx)] == ["192.0.2.8"]
    assert place.target().identity_files == (str(mine),) and place.ssh_command().count(f"-i {mine} ") == 1
    with pytest.raises(ConfigError, match="holds a private key of its own"):
        joined.join(ctx, INVITE, identity=mine)
    with pytest.raises(ConfigError, match="does not exist"):
        joined.join(ctx, replace(INVITE, key=None), identity=tmp_path / "nothing")


def test_the_tunnel_takes_the_one_invite_and_the_options_pick_among_several(ctx):
    assert joined.choose(ctx, None, None) is None
    joined.join(ctx, INVITE)
    assert joined.choose(ctx, None, None).invite == INVITE
    assert joined.choose(ctx, "someone-else", None) is None
    other = replace(INVITE, host="spare")
    joined.join(ctx, other)
    with pytest.raises(ConfigError, match=r"several invites are joined here \(tester2@oldbox, tester2@spare\)"):
        joined.choose(ctx, "tester2", None)
    assert joined.choose(ctx, None, "spare").invite == other
    (ctx.state_dir / "invites" / "tester2@spare" / "invite.json").write_text("[]")  # damaged: skipped
    assert [j.invite for j in joined.joined(ctx)] == [INVITE]


# ---------------------------------------------------------------- on the lab, with real OpenSSH


def machine_of_a_tester(tmp_path: Path) -> tuple[dict, Path]:
    """A tester's machine: an empty home (no ssh_config, no known_hosts, no
    ssh-agent), no qabox settings or state, and an empty working directory."""
    home, cwd = tmp_path / "tester-home", tmp_path / "tester-cwd"
    home.mkdir()
    cwd.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("QABOX_", "XDG_", "SSH_"))}
    return dict(environ, HOME=str(home)), cwd


def plain_ssh(command: str, environ: dict, cwd: Path, **replacements: str) -> subprocess.Popen:
    """The printed command, its placeholders filled in, run as the tester would (in their cwd)."""
    for placeholder, value in replacements.items():
        command = command.replace(placeholder, value)
    return subprocess.Popen(shlex.split(command) + ["-o", "BatchMode=yes"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ, cwd=cwd)


@pytest.mark.usefixtures("lab")
def test_an_invite_serves_a_tester_whose_machine_has_nothing_set_up(tmp_path, env_name, port, notes_build):
    assert qabox("deploy", notes_build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    made, theirs = f"i{env_name.replace('x', '')}", f"k{env_name.replace('x', '')}"
    environ, cwd = machine_of_a_tester(tmp_path)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qabox", *args], input=stdin, capture_output=True, text=True,
                              env=environ, cwd=cwd, timeout=60)

    try:
        # a key made for them: the invite is a secret; qabox join + qabox tunnel with no options
        result = qabox("testers", "invite", made, "--host", "lab1", "--env", env_name, "--expires", "1d",
                       "-o", tmp_path / "made.qabox-invite")
        assert result.code == 0, result
        line = (tmp_path / "made.qabox-invite").read_text().strip()
        assert line in result.stdout.splitlines() and "SECRET" in result.stdout
        assert (tmp_path / "made.qabox-invite").stat().st_mode & 0o777 == 0o600
        first = run("join", "-", stdin=line)
        assert first.returncode == 0 and first.stdout.startswith(f"joined {made} on lab1 "), first
        assert run("join", str(tmp_path / "made.qabox-invite")).stdout.startswith("already joined")
        tunnel = subprocess.Popen([sys.executable, "-m", "qabox", "tunnel", "--env", env_name], env=environ, cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            header = tunnel.stdout.readline()
            url = re.match(rf"{made}'s tunnel to lab1/{env_name}: (http://127\.0\.0\.1:\d+) ", header)
            assert url, header + (tunnel.stderr.read() if tunnel.poll() is not None else "")
            assert get(url.group(1) + "/health") == (200, "ok")
        finally:
            tunnel.send_signal(signal.SIGINT)
            assert tunnel.wait(10) == 0
        detached = run("tunnel", "--env", env_name, "--detach")
        assert detached.returncode == 0 and "runs in the background" in detached.stdout, detached
        assert f"stopped {made}'s tunnel to lab1/{env_name}" in run("tunnel", "--stop").stdout

        # the tester's own key: nothing secret; the plain ssh command the invite prints
        key = new_key(tmp_path / "theirs")
        result = qabox("testers", "invite", theirs, "--host", "lab1", "--env", env_name, "--key", f"{key}.pub",
                       "-o", tmp_path / "theirs.qabox-invite")
        assert result.code == 0 and "SECRET" not in result.stdout, result
        assert "key" not in payload((tmp_path / "theirs.qabox-invite").read_text().strip())
        shown = result.stdout.splitlines()
        known = shown[shown.index("  without qabox (the ssh of Windows 10+, macOS, Linux): put this line in a "
                                  "file lab1.known_hosts") + 1].strip()
        (cwd / "lab1.known_hosts").write_text(known + "\n")
        command = next(s.strip() for s in shown if s.strip().startswith("ssh -N "))
        assert command.endswith(f"-p 22 {LAB_USER}@{LAB_ADDR}") and known.startswith(f"{LAB_ADDR} ssh-ed25519 ")
        local = free_port()
        ssh = plain_ssh(command, environ, cwd, THEIR_PRIVATE_KEY=str(key), **{"8080:": f"{local}:"})
        try:
            assert wait_until(lambda: get(f"http://127.0.0.1:{local}/health", timeout=5) == (200, "ok"), 15)
        finally:
            ssh.kill()
            ssh.wait(10)

        # a swapped host key is refused, by qabox and by ssh alike
        swapped = replace(invites.decode(line), host_keys=(HOST_KEY,)).encode()
        assert "replaces the earlier invite" in run("join", swapped).stdout
        refused = run("tunnel", "--env", env_name)
        assert refused.returncode == 4 and refused.stdout == "", refused
        assert refused.stderr.startswith("qabox: error: host lab1 (") and refused.stderr.count("\n") == 1
        assert "not a key your invite" in refused.stderr and "Traceback" not in refused.stderr
        (cwd / "lab1.known_hosts").write_text(f"{LAB_ADDR} {HOST_KEY}\n")
        ssh = plain_ssh(command, environ, cwd, THEIR_PRIVATE_KEY=str(key), **{"8080:": f"{free_port()}:"})
        assert ssh.wait(15) == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in ssh.stderr.read()
    finally:
        for name in (made, theirs):
            qabox("testers", "remove", name, "--host", "lab1")


def test_an_invite_is_refused_before_anything_changes_without_an_address_or_a_known_key(tmp_path, monkeypatch):
    config = tmp_path / "ssh_config"
    config.write_text(f"Host jumped\n  HostName 10.0.0.5\n  ProxyJump bastion\n  UserKnownHostsFile {tmp_path}/kh\n"
                      f"Host unknown\n  HostName 192.0.2.9\n  UserKnownHostsFile {tmp_path}/kh\n")
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)
    jumped = qabox("testers", "invite", "t1", "--host", "jumped")
    assert jumped.code == 2 and "reached through ProxyJump: say where testers reach it with --address" in jumped.stderr
    unknown = qabox("testers", "invite", "t1", "--host", "jumped", "--address", "qa.example.org:2222")
    assert unknown.code == 2 and "known_hosts has no key for jumped (10.0.0.5)" in unknown.stderr, unknown
    assert "qabox hosts trust jumped" in unknown.stderr and not list(tmp_path.glob("*.qabox-invite"))
    nowhere = qabox("testers", "invite", "t1", "--host", "unknown", "-o", tmp_path / "no" / "such.invite")
    assert nowhere.code == 2 and "cannot write the invite to" in nowhere.stderr
