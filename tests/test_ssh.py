"""Naming and reaching hosts as `ssh NAME` does, with host keys always verified."""

from __future__ import annotations

import subprocess

import paramiko
import pytest

from conftest import LAB_ADDR, LAB_DIR, LAB_USER, json_data, new_key, qabox
from qabox import ssh

pytestmark = pytest.mark.usefixtures("lab")


def lab_block(**overrides) -> str:
    """lab1's ssh_config block, with some settings replaced."""
    settings = {
        "HostName": LAB_ADDR, "User": LAB_USER, "IdentityFile": str(LAB_DIR / "keys" / "deploy"),
        "IdentitiesOnly": "yes", "UserKnownHostsFile": str(LAB_DIR / "known_hosts"),
    }
    settings.update(overrides)
    return "".join(f"  {k} {v}\n" for k, v in settings.items() if v is not None)


@pytest.fixture
def config(tmp_path, monkeypatch):
    """Write an ssh_config for this test: config("Host lab1\\n" + lab_block(...))."""
    path = tmp_path / "ssh_config"

    def write(text: str):
        path.write_text(text)
        monkeypatch.setenv("QABOX_SSH_CONFIG", str(path))
        return path

    return write


def lab_host_key() -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key_file(str(LAB_DIR / "lab1" / "ssh_host_ed25519_key"))


def test_unknown_host_key_is_refused_with_fingerprint_and_fix(config, tmp_path):
    config("Host lab1\n" + lab_block(UserKnownHostsFile=tmp_path / "empty_known_hosts"))
    result = qabox("status", "--host", "lab1", "--json")
    error = result.stdout and json_data(result.stdout)["hosts"][0]["error"]
    assert result.code == 1
    assert ssh.fingerprint(lab_host_key()) in error
    assert "qabox hosts trust lab1" in error and "--accept-new-host-key" in error
    assert not (tmp_path / "empty_known_hosts").exists()


def test_unknown_key_refused_by_deploy_before_anything_is_sent(config, tmp_path, notes_build):
    config("Host lab1\n" + lab_block(UserKnownHostsFile=tmp_path / "kh"))
    result = qabox("deploy", notes_build, "--host", "lab1", "--env", "neverdeployed")
    assert result.code == 4 and "unknown host key ssh-ed25519 SHA256:" in result.stderr


def test_accept_new_host_key_records_it(config, tmp_path, notes_build):
    known = tmp_path / "kh"
    config("Host lab1\n" + lab_block(UserKnownHostsFile=known))
    client = ssh.connect(ssh.resolve("lab1", tmp_path / "ssh_config"), accept_new_host_key=True)
    client.close()
    assert known.read_text().startswith(f"{LAB_ADDR} ssh-ed25519 ")
    ssh.connect(ssh.resolve("lab1", tmp_path / "ssh_config")).close()  # now known


def test_changed_host_key_is_always_refused(config, tmp_path):
    other = paramiko.Ed25519Key.from_private_key_file(str(LAB_DIR / "keys" / "deploy"))
    known = tmp_path / "kh"
    known.write_text(f"{LAB_ADDR} ssh-ed25519 {other.get_base64()}\n")
    config("Host lab1\n" + lab_block(UserKnownHostsFile=known))
    for accept in (False, True):
        with pytest.raises(Exception) as e:
            ssh.connect(ssh.resolve("lab1", tmp_path / "ssh_config"), accept_new_host_key=accept)
        assert "DIFFERENT host key" in str(e.value) and "ssh-keygen -R" in str(e.value)
    result = qabox("hosts", "trust", "lab1", "--yes")
    assert result.code == 1 and "DIFFERENT" in result.stderr


def test_hosts_trust_asks_then_writes(config, tmp_path):
    known = tmp_path / "kh"
    config("Host lab1\n" + lab_block(UserKnownHostsFile=known))
    refused = qabox("hosts", "trust", "lab1", input="n\n")
    assert refused.code == 1 and not known.exists()
    assert ssh.fingerprint(lab_host_key()) in refused.stdout
    accepted = qabox("hosts", "trust", "lab1", input="y\n")
    assert accepted.code == 0 and known.read_text().startswith(f"{LAB_ADDR} ssh-ed25519 ")
    again = qabox("hosts", "trust", "lab1", "--yes")
    assert again.code == 0 and "already trusted" in again.stdout


def test_hashed_known_hosts_entries_work(config, tmp_path):
    known = tmp_path / "kh"
    known.write_text((LAB_DIR / "known_hosts").read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert LAB_ADDR not in known.read_text()
    config("Host lab1\n" + lab_block(UserKnownHostsFile=known))
    ssh.connect(ssh.resolve("lab1", tmp_path / "ssh_config")).close()


def test_aes_gcm_is_preferred_when_sshd_offers_it(config, tmp_path):
    config("Host lab1\n" + lab_block(UserKnownHostsFile=LAB_DIR / "known_hosts"))
    client = ssh.connect(ssh.resolve("lab1", tmp_path / "ssh_config"))
    try:
        assert client.get_transport().remote_cipher == "aes128-gcm@openssh.com"
    finally:
        client.close()


def test_login_refused_says_what_to_check(config, tmp_path):
    key = tmp_path / "stranger"
    new_key(key)
    config("Host lab1\n" + lab_block(IdentityFile=key))
    result = qabox("status", "--host", "lab1", "--json")
    error = json_data(result.stdout)["hosts"][0]["error"]
    assert f"SSH login to {LAB_USER}@{LAB_ADDR}:22 (lab1) was refused" in error


def test_alias_with_user_port_and_proxyjump(config, tmp_path):
    # lab1 reached through a jump to lab1 itself: from inside its namespace,
    # 198.18.1.2:22 is its own sshd.
    config("Host jump\n" + lab_block() + "Host inner\n" + lab_block(ProxyJump="jump", Port=22))
    client = ssh.connect(ssh.resolve("inner", tmp_path / "ssh_config"))
    _, stdout, _ = client.exec_command("echo $SSH_CONNECTION")
    assert stdout.read().decode().split()[0] == LAB_ADDR  # came from the jump host
    client.close()


def test_ssh_config_port_out_of_range(config, tmp_path):
    config("Host lab1\n" + lab_block(Port=70000))
    result = qabox("status", "--host", "lab1")
    assert result.code == 2 and "port 70000 for host lab1 is out of range" in result.stderr


def test_missing_ssh_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(tmp_path / "nope"))
    result = qabox("status", "--host", "lab1")
    assert result.code == 2 and "does not exist" in result.stderr


def test_advice_names_the_ssh_config_qabox_uses(config, tmp_path, isolated, monkeypatch):
    key = tmp_path / "stranger"
    new_key(key)
    path = config("Host lab1\n" + lab_block(IdentityFile=key))
    refused = (f"SSH login to {LAB_USER}@{LAB_ADDR}:22 (lab1) was refused: check the user and key "
               "(User/IdentityFile in ssh_config, or `ssh-add`), and that `{}` works")
    result = qabox("hosts", "check", "lab1", "--json")
    checks = json_data(result.stdout)["checks"]
    assert checks[1]["detail"] == refused.format(f"ssh -F {path} lab1")
    # ssh's own ~/.ssh/config needs no -F
    (isolated / ".ssh").mkdir()
    (isolated / ".ssh" / "config").write_text(path.read_text())
    monkeypatch.delenv("QABOX_SSH_CONFIG")
    checks = json_data(qabox("hosts", "check", "lab1", "--json").stdout)["checks"]
    assert checks[1]["detail"] == refused.format("ssh lab1")


def test_a_relative_ssh_config_and_its_relative_paths_work_as_with_openssh(tmp_path, monkeypatch):
    """OpenSSH takes a relative IdentityFile or UserKnownHostsFile from the current
    directory, not from the config's; qabox makes them absolute once, at start."""
    from qabox.context import Context

    (tmp_path / "conf").mkdir()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "deploy").write_bytes((LAB_DIR / "keys" / "deploy").read_bytes())
    (tmp_path / "keys" / "deploy").chmod(0o600)
    (tmp_path / "kh").write_text((LAB_DIR / "known_hosts").read_text())
    (tmp_path / "conf" / "ssh_config").write_text(
        "Host lab1\n" + lab_block(IdentityFile="keys/deploy", UserKnownHostsFile="kh"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QABOX_SSH_CONFIG", "conf/ssh_config")
    target = Context.create().target("lab1")
    assert target.config_file == str(tmp_path / "conf" / "ssh_config")
    assert target.identity_files == (str(tmp_path / "keys" / "deploy"),)
    assert target.known_hosts == (str(tmp_path / "kh"),)
    result = qabox("status", "--host", "lab1", "--json")
    assert result.code == 0 and json_data(result.stdout)["hosts"][0]["reachable"], result
    # what ssh itself does with the same file, from the same directory
    ssh_run = subprocess.run(["ssh", "-F", "conf/ssh_config", "-o", "BatchMode=yes", "lab1", "true"],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert ssh_run.returncode == 0, ssh_run.stderr
