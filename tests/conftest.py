"""Shared fixtures: the lab's real sshd hosts, real builds, and an isolated user.

Every test runs with its own HOME (so the developer's ~/.ssh and ssh-agent are
never used), its own qabox state dir, and the lab's ssh_config. Tests that
deploy use an env name and port of their own on the shared lab host.
"""

from __future__ import annotations

import io
import json
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qabox.cli import app
from qabox.pack import pack

REPO = Path(__file__).resolve().parents[1]
LAB_DIR = Path(os.environ.get("QABOX_LAB_DIR") or REPO / ".lab")
LAB = REPO / "scripts" / "lab"
# lab1's account and address in the lab's slot (scripts/lab: host n = 8 * slot + 1)
LAB_N = 8 * int(os.environ.get("QABOX_LAB_SLOT") or 0) + 1
LAB_USER, LAB_ADDR, LAB_HOME = f"qalab{LAB_N}", f"198.18.{LAB_N}.2", f"/home/qalab{LAB_N}"
_envs = itertools.count(1)
_ports = itertools.count(9100 + (os.getpid() % 50) * 20)


@pytest.fixture(scope="session")
def lab() -> Path:
    """The lab is up (started once per session, left up for the next run)."""
    subprocess.run([sys.executable, str(LAB), "up"], check=True, stdout=subprocess.DEVNULL)
    return LAB_DIR


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Hide the developer's SSH setup and qabox state from every test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("QABOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(REPO / "hosts"))
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(LAB_DIR / "ssh_config"))
    monkeypatch.setenv("COLUMNS", "200")
    return home


@pytest.fixture
def env_name():
    """An env of this test's own on the shared lab host, removed after the test."""
    name = f"t{os.getpid() % 1000}x{next(_envs)}"
    yield name
    remove_env("lab1", name)


def remove_env(host: str, env: str, user: str = LAB_USER) -> None:
    """Stop an env's supervisor and app on a lab host and delete its files."""
    # [s] keeps pkill from matching this very shell's command line
    script = (f"pkill -KILL -f 'supervi[s]e [^ ]+ {env} '; pkill -KILL -f '/env[s]/{env}/'; "
              f"rm -rf /home/{user}/.qabox/envs/{env}")
    in_host(host, "sh", "-c", script)


@pytest.fixture
def port() -> int:
    return next(_ports)


@pytest.fixture
def tester(tmp_path, env_name, port, notes_build):
    """An env with the notes app, and a tester whose key may reach it."""
    assert qabox("deploy", notes_build, "--host", "lab1", "--env", env_name, "--port", port).code == 0
    key = tmp_path / "tester"
    name = "t" + env_name.replace("x", "")
    yield {"name": name, "key": str(key), "env": env_name, "ports": add_tester(name, key)["ports"]}
    qabox("tunnel", "--stop", "--user", name)
    qabox("testers", "remove", name, "--host", "lab1")


def add_tester(name: str, key: Path) -> dict:
    """`qabox testers add NAME` on lab1 with a fresh key at ``key``: its JSON result."""
    new_key(key)
    result = qabox("testers", "add", name, "--key", f"{key}.pub", "--host", "lab1", "--json")
    assert result.code == 0, result
    return json_data(result.stdout)


def json_data(stdout: str):
    """The ``data`` of a ``--json`` output's envelope (also of a failed command's, if it has any)."""
    shape = json.loads(stdout)
    assert shape["qabox_json"] == 1 and isinstance(shape["ok"], bool) and shape["command"], shape
    return shape.get("data")


def new_key(path: Path) -> Path:
    """A fresh ed25519 key pair: ``path`` and ``path.pub``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """The predicate's first true value within timeout, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def ssh_as_tester(tester: dict, tmp_path: Path) -> list[str]:
    """Plain OpenSSH `ssh` as the tester would run it, with their key only."""
    config = tmp_path / "tester_ssh_config"
    config.write_text(f"Host lab1\n  HostName {LAB_ADDR}\n  User {LAB_USER}\n  IdentityFile {tester['key']}\n"
                      f"  IdentitiesOnly yes\n  UserKnownHostsFile {LAB_DIR / 'known_hosts'}\n")
    return ["ssh", "-F", str(config), "-o", "BatchMode=yes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Result:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"Result(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def qabox(*args: str, input: str | None = None) -> Result:
    """Run the CLI in-process, as a user would type it."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def in_host(host: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command inside a lab host's network namespace (its own loopback)."""
    return subprocess.run([sys.executable, str(LAB), "exec", host, "--", *cmd],
                          capture_output=True, text=True, timeout=timeout)


def http_get(host: str, port: int, path: str = "/") -> tuple[int, str]:
    """GET a URL on the lab host's loopback, from inside the host."""
    code = ("import sys,urllib.request,urllib.error\n"
            "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=10); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode()[:2000])\n"
            "except OSError as e:\n print(0); print(e)\n")
    proc = in_host(host, "/usr/bin/python3", "-c", code, f"http://127.0.0.1:{port}{path}")
    status, _, body = proc.stdout.partition("\n")
    return int(status or 0), body.strip()


@pytest.fixture(scope="session")
def notes_build(tmp_path_factory) -> Path:
    """The example app, packed with its wheels by scripts/example-build."""
    out = tmp_path_factory.mktemp("builds") / "notes.tar.gz"
    subprocess.run([sys.executable, str(REPO / "scripts" / "example-build"), "-o", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def wheels(notes_build, tmp_path_factory) -> list[Path]:
    """The example app's wheels, to pack into builds a test makes."""
    dest = tmp_path_factory.mktemp("wheels")
    with tarfile.open(notes_build) as tar:
        for member in tar.getmembers():
            if member.name.startswith("wheels/") and member.isfile():
                (dest / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return sorted(dest.iterdir())


@pytest.fixture
def make_build(tmp_path, wheels):
    """make_build({"wsgi.py": "..."}, name=...) -> a build tar with Flask's wheels."""
    counter = itertools.count()

    def make(files: dict[str, str], name: str | None = None, with_wheels: bool = True) -> Path:
        src = tmp_path / f"src{next(counter)}"
        src.mkdir()
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        if with_wheels and "requirements.txt" not in files:
            (src / "requirements.txt").write_text("flask>=3.0\n")
        out = tmp_path / (name or f"{src.name}.tar.gz")
        return pack(src, out, wheels=wheels if with_wheels else [])

    return make


def raw_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar with exactly these members, hostile ones included."""
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def copy_notes(tmp_path: Path) -> Path:
    dest = tmp_path / "notes-src"
    shutil.copytree(REPO / "examples" / "notes", dest)
    return dest
