"""Load through real tunnels: many testers at once, and many connections in a row,
with no failed request and a tunnel process that does not grow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import new_key, qabox

pytestmark = pytest.mark.usefixtures("lab")

APP = """
import time
from flask import Flask, request
app = Flask(__name__)

@app.get("/")
def index():
    time.sleep(float(request.args.get("s", "0")))
    return "ok"
"""


@pytest.fixture
def testers(tmp_path, env_name, port, make_build):
    """An env, and n testers with keys and running tunnels: testers(n) -> [(name, url, proc)]."""
    assert qabox("deploy", make_build({"wsgi.py": APP}), "--host", "lab1", "--env", env_name,
                 "--port", port).code == 0
    made = []

    def make(n: int):
        for i in range(n):
            name = f"l{env_name.replace('x', '')}n{i}"
            key = tmp_path / name
            new_key(key)
            assert qabox("testers", "add", name, "--key", f"{key}.pub", "--host", "lab1").code == 0
            proc = subprocess.Popen([sys.executable, "-m", "qabox", "tunnel", "--user", name, "--host", "lab1",
                                     "--env", env_name, "-i", str(key)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
            made.append((name, proc))
        return [(name, re.search(r"http://\S+", proc.stdout.readline()).group(0), proc) for name, proc in made]

    yield make
    for name, proc in made:
        proc.terminate()
        proc.wait(10)
        qabox("testers", "remove", name, "--host", "lab1")


def hammer(url: str, seconds: float, pause: float = 0.0) -> tuple[int, list[str]]:
    """Requests in a loop for a while (bounded); returns (successes, failures)."""
    ok, failed = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.read() == b"ok"
            ok += 1
        except Exception as e:  # any failure counts, and is shown
            failed.append(repr(e))
        time.sleep(pause)
    return ok, failed


def footprint(pid: int) -> tuple[int, int]:
    """Resident memory in kB and thread count of a process."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    return int(status["VmRSS"].split()[0]), int(status["Threads"])


def test_twenty_testers_at_once_fail_no_request(testers):
    tunnels = testers(20)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda t: hammer(t[1] + "/?s=0.05", 20), tunnels))
    ok = sum(r[0] for r in results)
    failed = [f for r in results for f in r[1]]
    assert not failed, failed[:5]
    assert ok > 20 * 20 * 5  # each tester got a steady stream through


def test_ten_thousand_connections_do_not_grow_the_tunnel(testers):
    (name, url, proc), = testers(1)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: urllib.request.urlopen(url, timeout=10).read(), range(1000)))
    time.sleep(1)
    rss0, threads0 = footprint(proc.pid)
    failures = []

    def one(_):
        try:
            urllib.request.urlopen(url, timeout=10).read()
        except Exception as e:
            failures.append(repr(e))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(9000)))
    time.sleep(1)
    rss1, threads1 = footprint(proc.pid)
    assert not failures, failures[:5]
    assert rss1 - rss0 < 10 * 1024, (rss0, rss1)  # kB
    assert threads1 <= threads0 + 2, (threads0, threads1)
