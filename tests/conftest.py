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
import signal
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lab.control import up as lab_up
from lab.hosts import LAB as LAB_DIR, Host, env_slot, exec_command, remove_env
from qabox.agent import manifest, rules
from qabox.cli import app
from qabox.pack import pack

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "scripts" / "lab"
LAB1 = Host(1, slot=env_slot() or 0)  # lab1 in the slot $QABOX_LAB_SLOT asks for
LAB_USER, LAB_ADDR, LAB_HOME = LAB1.user, LAB1.address, LAB1.home
_envs = itertools.count(1)
_ports = itertools.count(9100 + (os.getpid() % 50) * 20)


@pytest.fixture(scope="session")
def lab() -> Path:
    """The lab is up (started once per session, left up for the next run)."""
    lab_up()
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


class Lines:
    """A process's text pipe, read in a thread as it comes, so a test can wait for what it says."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def saying(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def text(self, timeout: float = 10) -> str:
        """All of it, once the pipe has ended (its process exited)."""
        self.thread.join(timeout)
        return "".join(self.lines)


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


def forwarding(proc: subprocess.Popen, port: int, timeout: float = 15) -> bool:
    """Wait until ``ssh -L port:...`` (``proc``) listens on its local port; False if it exits first."""
    def up():
        if proc.poll() is not None:
            return "exited"
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0
    return wait_until(up, timeout) is True


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
    return subprocess.run(exec_command(host, cmd), capture_output=True, text=True, timeout=timeout)


def app_pids(env: str) -> list[int]:
    """The env's app processes on lab1 (gunicorn's workers too), whatever its base: a
    spare app (agent/spare.py) counts once it was handed a release, as the agent counts it."""
    pids = []
    for line in in_host("lab1", "pgrep", "-fa", f"serve .*/envs/{env}/").stdout.splitlines():
        pid, _, args = line.partition(" ")
        spec = json.loads(args.partition(" serve ")[2] or "{}")
        if not spec.get("spare") or os.path.exists(os.path.join(spec["ctl_dir"], f"app-{pid}.json")):
            pids.append(int(pid))
    return sorted(pids)


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


def link(name: str, target: str) -> tarfile.TarInfo:
    """A tar member: a symlink ``name`` to ``target``."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def copy_notes(tmp_path: Path) -> Path:
    dest = tmp_path / "notes-src"
    shutil.copytree(REPO / "examples" / "notes", dest)
    return dest


# ---------------------------------------------------------------- the host agent, run here (no SSH, no root)


@pytest.fixture(scope="session")
def agent_cmd(tmp_path_factory):
    """agent_cmd(python) -> the argv that runs the host agent as qabox ships it, its .pyz."""
    from qabox.agent_zip import AGENT_HASH, AGENT_PYZ

    path = tmp_path_factory.mktemp("agent") / f"agent-{AGENT_HASH}.pyz"
    path.write_bytes(AGENT_PYZ)
    return lambda python=sys.executable: [python, "-I", str(path)]


class Host:
    """A host in a directory: the agent run as qabox runs it over SSH, one
    process per call, a JSON request line in and JSON lines out."""

    def __init__(self, argv: list[str], home: Path):
        self.argv, self.home, self.base = argv, home, str(home / ".qabox")
        self.environ = {"HOME": str(home), "PATH": os.environ["PATH"], "USER": "qabox-test"}
        self.stderr = ""  # the last call's

    def request(self, cmd: str, **args) -> str:
        from qabox.agent.protocol import PROTOCOL

        return json.dumps({"protocol": PROTOCOL, "cmd": cmd, "args": {"base": self.base, **args}})

    def send(self, line: str) -> tuple[int, dict]:
        """One call on its own, of any request line: its exit code and result."""
        proc = subprocess.run(self.argv, input=line + "\n", capture_output=True, text=True, timeout=120,
                              env=self.environ)
        self.stderr = proc.stderr
        return proc.returncode, result_of([json.loads(out) for out in proc.stdout.splitlines()], proc)

    def call(self, cmd: str, **args) -> dict:
        """One call on its own: its result line (``ok``, ``changed``, ``data`` or ``error``)."""
        return self.send(self.request(cmd, **args))[1]

    def data(self, cmd: str, **args) -> dict:
        result = self.call(cmd, **args)
        assert result["ok"], (result, self.stderr)
        return result["data"]

    @contextmanager
    def session(self, env: str, create: bool = True):
        """The env's deploy lock held, as by ``qabox deploy``: yields a call(cmd, **args)."""
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.environ)
        writing, done = threading.Lock(), threading.Event()

        def write(line: str) -> None:
            with writing:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()

        def heartbeat() -> None:  # as qabox's client does, so a long step on a busy machine is not cut
            while not done.wait(5):
                try:
                    write("{}")
                except (OSError, ValueError):
                    return

        def call(cmd: str, **args) -> dict:
            write(self.request(cmd, **args))
            messages = []
            while not messages or "ok" not in messages[-1]:
                line = proc.stdout.readline()
                if not line:
                    break
                messages.append(json.loads(line))
            return result_of(messages, proc)

        try:
            locked = call("session", env=env, timeout=10, by="tests", create=create)
            assert locked["ok"] and locked["data"] == {"locked": True}, locked
            threading.Thread(target=heartbeat, daemon=True).start()
            yield call
        finally:
            done.set()
            with writing:
                proc.stdin.close()
            proc.wait(30)
            self.stderr = proc.stderr.read()
            proc.stderr.close()
            proc.stdout.close()

    def deploy(self, build: Path, env: str, port: int, sent: bytes | None = None, **request) -> dict:
        """qabox deploy's steps, with no check on this side: lock, then upload and deploy
        (``request`` overriding its arguments). Its result: deploy's, or upload-state's when
        that refused the build or found it served already."""
        with self.session(env) as call:
            state, args = self.upload(call, build, env, port, sent, **request)
            if not state["ok"] or state["data"].get("unchanged"):
                return state
            return call("deploy", **args)

    def upload(self, call, build: Path, env: str, port: int, sent: bytes | None = None, **request):
        """What qabox sends of a build, in a session's ``call``: upload-state, the manifest and
        the delta (as qabox makes them from any tar, or ``sent``) written to their .part files
        as SFTP writes them. Upload-state's last answer, and the arguments it was asked with
        (deploy's too)."""
        listed, mid = build_manifest(build)
        args = {"env": env, "manifest": mid, "port": port, "start_timeout": 20, "file": build.name,
                "entry": "wsgi:app", "health": "/", "by": "tests", **request}
        state = call("upload-state", **args)
        assert state["ok"], state
        if "manifest_path" in state["data"]:
            Path(state["data"]["manifest_path"]).write_bytes(manifest.canonical(listed))
            state = call("upload-state", uploaded=True, **args)
        if state["ok"] and state["data"].get("blobs"):
            Path(state["data"]["part_path"]).write_bytes(
                delta_of(build, listed, state["data"]["hashes"]) if sent is None else sent)
        return state, args

    def start_deploy(self, build: Path, env: str, port: int, **request):
        """A deploy left running, as by a qabox that may go away at any moment: the agent
        (holding the env's lock, its deploy request sent) and upload-state's last answer."""
        agent = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.environ)

        def call(cmd: str, **args) -> dict:
            agent.stdin.write((self.request(cmd, **args) + "\n").encode())
            agent.stdin.flush()
            while "ok" not in (message := json.loads(agent.stdout.readline())):
                pass  # progress
            return message

        assert call("session", env=env, timeout=10, by="tests", create=True)["ok"]
        state, args = self.upload(call, build, env, port)
        assert state["ok"], state
        agent.stdin.write((self.request("deploy", **args, **request) + "\n").encode())
        agent.stdin.flush()
        return agent, state

    def processes(self) -> list[int]:
        """Pids of processes running for this host's base (supervisors, apps)."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and self.base.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    def kill_all(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def build_manifest(build: Path) -> tuple[dict, str]:
    """Any tar (a hostile one too) as qabox lists it: its manifest, and its id. Nothing is checked."""
    with tarfile.open(build, "r|*") as tar:
        listed = manifest.scan(tar, 10**9)[1]
    return listed, manifest.identity(listed)


def delta_of(build: Path, listed: dict, hashes: list, offset: int = 0) -> bytes:
    """The delta of ``hashes`` from a tar, as qabox sends it."""
    with tarfile.open(build, "r|*") as tar:
        return b"".join(manifest.delta_blocks(tar, listed, hashes, offset))


def forget(build: Path, host: str = "lab1") -> list[str]:
    """Delete a build's manifest and blobs from a lab host (its next deploy sends all of it):
    the names, relative to ~/.qabox. Another env's release needing them has them sent again."""
    listed, mid = build_manifest(build)
    names = [f"manifests/{mid}.json"] + sorted({f"blobs/{item[5]}" for item in listed["members"] if item[5]})
    in_host(host, "sh", "-c", f"cd {LAB_HOME}/.qabox 2>/dev/null && rm -f " + " ".join(names))
    return names


def result_of(messages: list[dict], proc) -> dict:
    """The one result an agent call ends with (after its progress lines)."""
    results = [m for m in messages if "ok" in m]
    assert len(results) == 1 and results[0] is messages[-1], (messages, proc)
    return results[0]


WSGI_APP = """
import os

def app(environ, start_response):
    answers = {"/pid": str(os.getpid()), "/release": os.environ["QABOX_RELEASE"],
               "/env": repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("CFG_")))}
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [answers.get(environ["PATH_INFO"], "VERSION").encode()]
"""


SERVERS = rules.SERVERS  # every app server qabox runs: tests parametrize over them
SERVER_PACKAGES = rules.SERVER_PACKAGES


def wsgi_build(out: Path, version: str = "v1", python: str | None = None, files: dict | None = None,
               server: str = "werkzeug") -> Path:
    """A bare WSGI app (wsgi.py, no framework) answering ``version``, packed by scripts/example-build
    with the wheels of the app server the agent runs it on (werkzeug, and ``server``'s package when
    its qabox.toml names another) for python X.Y (default: this), with ``files`` (path: text) beside
    it or in its place."""
    src = out.parent / (out.name + ".src")
    src.mkdir()
    for rel, text in {"wsgi.py": WSGI_APP.replace("VERSION", version), **(files or {})}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    # pip download --python-version judges markers by the python running it, not the target: name
    # what werkzeug needs on 3.6 only (`dataclasses; python_version < "3.7"`) for 3.6 by hand
    (src / "requirements.txt").write_text("werkzeug\n" + ("dataclasses\n" if python == "3.6" else "")
                                          + ("" if server == "werkzeug" else SERVER_PACKAGES[server] + "\n"))
    if server != "werkzeug" and "qabox.toml" not in (files or {}):
        (src / "qabox.toml").write_text(f'[app]\nserver = "{server}"\n')
    target = ["--python-version", python] if python else []
    subprocess.run([sys.executable, str(REPO / "scripts" / "example-build"), str(src), "-o", str(out), *target],
                   check=True, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture
def host(agent_cmd, tmp_path):
    """An empty host in tmp_path, run by the test's python; whatever it started is killed after."""
    home = tmp_path / "host"
    home.mkdir()
    local = Host(agent_cmd(), home)
    yield local
    local.kill_all()


@pytest.fixture(scope="module")
def module_host(agent_cmd, tmp_path_factory):
    """An empty host for a module's tests, which use it in order; what it started is killed after."""
    local = Host(agent_cmd(), tmp_path_factory.mktemp("host"))
    yield local
    local.kill_all()


def url_get(url: str, timeout: float = 10) -> tuple[int, str]:
    """GET a URL from here: (status, body), or (0, the error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except OSError as e:
        return 0, str(e)


def local_answer(port: int, path: str = "/", **headers) -> tuple:
    """GET a path of a port on this machine's loopback with these headers:
    (status, response headers, body), an HTTP error's too."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def local_get(port: int, path: str = "/") -> tuple[int, str]:
    """GET a path of a port on this machine's loopback."""
    return url_get(f"http://127.0.0.1:{port}{path}", timeout=5)
