"""The tunnel's data path (forward.py) on a real lab host: every byte arrives, in
order, on the right connection, however the client reads, writes or leaves."""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import LAB_DIR, REPO, json_data, qabox, remove_env, wait_until
from qabox.pack import pack

pytestmark = pytest.mark.usefixtures("lab")

# /sha answers the length and sha256 of what was posted; /bytes?n=N sends N
# bytes that the test can make again (random.Random(N)), so nothing is compared
# against itself.
APP = """
import hashlib, random
from flask import Flask, Response, request
app = Flask(__name__)

@app.post("/sha")
def sha():
    body = request.get_data()
    return f"{len(body)} {hashlib.sha256(body).hexdigest()}"

@app.get("/bytes")
def data():
    n = int(request.args["n"])
    return Response(random.Random(n).randbytes(n), mimetype="application/octet-stream")

@app.get("/")
@app.get("/health")
def health():
    return "ok"
"""
MB = 1024 * 1024


def expected(n: int) -> bytes:
    return random.Random(n).randbytes(n)


@pytest.fixture(scope="module")
def tunnel(tmp_path_factory, wheels):
    """One env with APP, a tester, and the tester's `qabox tunnel`: its port."""
    tmp = tmp_path_factory.mktemp("forward")
    env = f"f{os.getpid() % 1000}"
    app_port = 7000 + os.getpid() % 1000  # like the env, this run's own on the shared lab host
    variables = {"HOME": str(tmp), "QABOX_STATE_DIR": str(tmp / "state"),
                 "QABOX_HOSTS_DIR": str(REPO / "hosts"), "QABOX_SSH_CONFIG": str(LAB_DIR / "ssh_config")}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in variables.items():
            mp.setenv(name, value)
        mp.delenv("SSH_AUTH_SOCK", raising=False)
        src = tmp / "src"
        src.mkdir()
        (src / "wsgi.py").write_text(APP)
        (src / "requirements.txt").write_text("flask>=3.0\n")
        build = pack(src, tmp / "build.tar.gz", wheels=wheels)
        deployed = qabox("deploy", build, "--host", "lab1", "--env", env, "--port", app_port)
        assert deployed.code == 0, deployed
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "key")], check=True)
        added = qabox("testers", "add", f"fw{env}", "--key", tmp / "key.pub", "--host", "lab1", "--json")
        assert added.code == 0, added
        proc = subprocess.Popen(
            [sys.executable, "-m", "qabox", "tunnel", "--user", f"fw{env}", "--host", "lab1", "--env", env,
             "-i", str(tmp / "key")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ))
        try:
            line = proc.stdout.readline()
            url = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            assert url, line + (proc.stderr.read() if proc.poll() is not None else "")
            yield {"port": int(url.group(1)), "proc": proc, "state": variables["QABOX_STATE_DIR"],
                   "env": env, "user": f"fw{env}", "key": str(tmp / "key")}
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=10)
            qabox("testers", "remove", f"fw{env}", "--host", "lab1")
            remove_env("lab1", env)
    assert "Traceback" not in err, err


def request(port: int, method: str, path: str, body: bytes | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        assert response.status == 200, response.status
        return response.read()
    finally:
        conn.close()


def test_an_upload_larger_than_the_ssh_window_arrives_whole(tunnel):
    body = random.Random(1).randbytes(9 * MB)  # the host's window is 2 MiB
    answer = request(tunnel["port"], "POST", "/sha", body).decode()
    assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}"


def test_a_slow_reader_gets_every_byte(tunnel):
    n = 12 * MB + 7
    sock = socket.create_connection(("127.0.0.1", tunnel["port"]), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.sendall(f"GET /bytes?n={n} HTTP/1.0\r\n\r\n".encode())
    received = bytearray()
    started = time.monotonic()
    while chunk := sock.recv(64 * 1024):
        received += chunk
        if len(received) < 4 * MB:
            time.sleep(0.002)  # slower than the host sends: the tunnel must hold back
    sock.close()
    body = bytes(received).partition(b"\r\n\r\n")[2]
    assert len(body) == n and body == expected(n), time.monotonic() - started


def test_a_client_that_half_closes_still_gets_its_answer(tunnel):
    sock = socket.create_connection(("127.0.0.1", tunnel["port"]), timeout=30)
    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")


def test_clients_that_leave_mid_answer_do_not_hurt_the_tunnel(tunnel):
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", tunnel["port"]), timeout=30)
        sock.sendall(f"GET /bytes?n={32 * MB} HTTP/1.0\r\n\r\n".encode())
        sock.recv(100_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()  # a reset, as a browser's cancelled download
    assert request(tunnel["port"], "GET", "/health") == b"ok"
    assert tunnel["proc"].poll() is None


def test_concurrent_connections_each_get_their_own_bytes(tunnel):
    sizes = [1 + i * 37_501 for i in range(48)]  # all different, 1 B to 1.7 MB
    results: dict[int, bool] = {}

    def fetch(n: int) -> None:
        results[n] = request(tunnel["port"], "GET", f"/bytes?n={n}") == expected(n)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {n: True for n in sizes}


def test_transfers_survive_key_exchanges(tunnel):
    """SSH re-keys a long-lived link (every GB or hour): the transport's thread
    then must not wait on itself, and no byte may be lost or reordered."""
    from qabox.context import Context
    from qabox.tunnel import Tunnel

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with Tunnel(Context.create(), "lab1", tunnel["env"], tunnel["user"], port, tunnel["key"]) as t:
        done = threading.Event()
        rekeys = []

        def rekey() -> None:
            while not done.is_set():
                t.link.transport.renegotiate_keys()
                rekeys.append(time.monotonic())
                time.sleep(0.05)

        threading.Thread(target=rekey, daemon=True).start()
        try:
            sizes = [3 * MB + i for i in range(8)]
            for n in sizes:
                assert request(port, "GET", f"/bytes?n={n}") == expected(n)
            body = random.Random(2).randbytes(5 * MB)
            answer = request(port, "POST", "/sha", body).decode()
            assert answer == f"{len(body)} {hashlib.sha256(body).hexdigest()}"
        finally:
            done.set()
        t.refresh()  # no background thread died
    assert len(rekeys) >= 3


def test_tunnels_counts_the_connections_served(tunnel, monkeypatch):
    monkeypatch.setenv("QABOX_STATE_DIR", tunnel["state"])
    before = status_requests(tunnel)
    for _ in range(3):
        request(tunnel["port"], "GET", "/health")
    # the record is written at most once a second
    assert wait_until(lambda: status_requests(tunnel) >= before + 3, 5), (before, status_requests(tunnel))


def status_requests(tunnel) -> int:
    listing = json_data(qabox("tunnels", "--json").stdout)["tunnels"]
    return next(t["requests"] for t in listing if t["port"] == tunnel["port"])


def test_a_refused_channel_closes_only_its_connection():
    """The host refuses the channel (nothing listens there): that client is told at
    once, and the forward goes on serving."""
    from qabox import ssh
    from qabox.context import Context
    from qabox.forward import Forward

    client = ssh.connect(Context.create().target("lab1"))
    listener = socket.create_server(("127.0.0.1", 0))
    forward = Forward(listener, remote_port=1)  # nothing listens on the host's port 1
    forward.use(client.get_transport())
    forward.start()
    try:
        for _ in range(3):
            sock = socket.create_connection(listener.getsockname(), timeout=5)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
            sock.close()
        assert forward.thread.is_alive()
    finally:
        forward.stop()
        client.close()
