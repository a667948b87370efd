"""The supervision section: failed requests through a redeploy and through
an upgrade of the host agent, kill -9 to serving again, and concurrent testers on a slow page against the same app on
Werkzeug's single-threaded server, with the testers' clients inside lab1."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .harness import Bench, BenchError, Row, compared, percentile, run, target_note, timed
from .target import HOST, PROGRAMS, REPO, DeployTarget, host_program, in_lab_host

LOAD_CLIENTS, LOAD_RATE = 4, 15  # 4 testers at ~15 requests/s each: 60 req/s
LOAD_SECONDS = 12  # at least; the load also outlasts the redeploy by a second
SLOW = 0.3  # seconds one /slow request takes: a slow page
TESTERS = 10


class LabHost:
    """Runs programs/host_client.py and programs/single_threaded.py inside lab1's
    network namespace, which shares this machine's files."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def client_command(self, mode: str, **kwargs) -> list[str]:
        return host_program("host_client.py", mode, json.dumps(kwargs))

    def run_client(self, mode: str, timeout: float, **kwargs) -> dict:
        """Run one host_client.py mode to its end and return its JSON."""
        return json.loads(run(*self.client_command(mode, **kwargs), timeout=timeout).stdout)

    def load(self, port: int) -> "HostLoad":
        """Testers sending requests to the port until HostLoad.stop() (120 s at most)."""
        return HostLoad(self.client_command("load", port=port, clients=LOAD_CLIENTS,
                                            rate=LOAD_RATE, max_seconds=120))

    @contextmanager
    def single_threaded_server(self, python: str, app_dir: Path) -> Iterator[int]:
        """The app on Werkzeug's single-threaded server, as root: yields its port.

        It runs with the python of the env's venv (the same Flask and Werkzeug
        as qabox's app) and writes no bytecode, so that it leaves no root-owned
        files in the deploy account's venv.
        """
        log = self.tmp / "single_threaded.log"
        with open(log, "w") as stderr:
            proc = subprocess.Popen(
                in_lab_host("env", "PYTHONDONTWRITEBYTECODE=1", python, PROGRAMS / "single_threaded.py",
                            app_dir),
                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            line = proc.stdout.readline() if ready else ""
            if not line.strip().isdigit():
                last = (log.read_text().strip().splitlines() or ["no answer within 30 s"])[-1]
                raise BenchError(f"the single-threaded baseline server did not start: {last}")
            yield int(line)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class HostLoad:
    """host_client.py's load mode in the background, until stop() or the `with` ends.

    It runs until its stdin closes, so that it surely spans whatever the bench
    does meanwhile.
    """

    def __init__(self, command: list[str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "HostLoad":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # the bench failed before stop()
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> dict:
        """Let the requests in flight finish and return the load's counts."""
        try:
            out, err = self.proc.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            raise BenchError("the load generator did not stop within 30 s") from None
        if self.proc.returncode:
            raise BenchError(f"the load generator failed: {(err.strip().splitlines() or ['?'])[-1]}")
        return json.loads(out)


def redeploy_under_load(lab: LabHost, target: DeployTarget, build: Path) -> dict:
    """Deploy a changed build, then restart, while testers keep sending requests."""
    with lab.load(target.port) as load:
        time.sleep(1)  # the old build answers first
        deploy = target.deploy_cli(build)[0]
        restart = timed(lambda: target.cli("restart"))
        time.sleep(max(1.0, LOAD_SECONDS - (time.monotonic() - load.started)))
        stats = load.stop()
    return dict(stats, deploy=deploy, restart=restart)


def upgrade_under_load(lab: LabHost, target: DeployTarget) -> dict:
    """Restart with another build of the agent, then with qabox's own, while
    testers keep sending requests: each time the env's supervisor hands over to
    the new agent's, which adopts the running app."""
    other = [sys.executable, PROGRAMS / "other_agent.py", "restart", "--host", HOST, "--env", target.env]
    with lab.load(target.port) as load:
        time.sleep(1)
        upgrades = [timed(lambda: run(*other)), timed(lambda: target.cli("restart"))]
        time.sleep(max(1.0, LOAD_SECONDS - (time.monotonic() - load.started)))
        stats = load.stop()
    return dict(stats, upgrades=upgrades)


def kill_to_serving(lab: LabHost, target: DeployTarget) -> float:
    """Seconds from kill -9 of the app to a new process answering.

    A `qabox restart` first resets the supervisor's crash backoff, which
    kills in a row would double each time: every sample is a first kill.
    """
    target.cli("restart")
    return lab.run_client("kill", timeout=60, port=target.port, within=15)["seconds"]


def testers_latency(bench: Bench, lab: LabHost, port: int) -> dict[str, list[float]]:
    """/slow latencies: 1 tester's requests one by one, then TESTERS testers at once."""
    each = 2 if bench.quick else 5
    return lab.run_client("latency", timeout=300, port=port, seconds=SLOW,
                          sequential=2 * each, clients=TESTERS, each=each)


def section(bench: Bench) -> list[Row]:
    """Failed requests through a redeploy, kill -9 to serving again, and
    concurrent testers on a slow page against a single-threaded server."""
    app_dir = bench.tmp / "supervised-app"
    app_dir.mkdir()
    shutil.copy(PROGRAMS / "supervised_app.py", app_dir / "wsgi.py")
    # the same requirements file as examples/notes: example-build's cached wheels fit
    shutil.copy(REPO / "examples" / "notes" / "requirements.txt", app_dir)
    target = DeployTarget(bench, app_dir, suffix="s")
    lab = LabHost(bench.tmp)
    first, changed = target.make_build("v1"), target.make_build("v2")
    try:
        target.deploy_cli(first)
        load = redeploy_under_load(lab, target, changed)
        upgrade = upgrade_under_load(lab, target)
        kills = [kill_to_serving(lab, target) for _ in range(bench.repeats)]
        qabox = testers_latency(bench, lab, target.port)
        with lab.single_threaded_server(target.venv_python(), target.src) as port:
            single = testers_latency(bench, lab, port)
    finally:
        target.reset()
    return load_rows(load) + upgrade_rows(upgrade) + [kill_row(kills)] + latency_rows(qabox, single)


def sent_and_failed(name: str, failed_name: str, load: dict, note: str) -> list[Row]:
    """The requests testers sent while qabox changed the env under them, and how many failed."""
    first = f"; first error: {load['errors'][0]}" if load["errors"] else ""
    return [
        Row(name, load["sent"], "req", note=f"{LOAD_CLIENTS} clients in lab1 for {load['seconds']:.1f} s{note}"),
        Row(failed_name, load["failed"], "req",
            note=target_note(load["failed"] == 0 and load["sent"] >= 500, "0 of >= 500") + first),
    ]


def load_rows(load: dict) -> list[Row]:
    """What the testers saw while qabox deployed and restarted under them."""
    rate = load["sent"] / load["seconds"]
    return sent_and_failed("redeploy under load: requests", "  failed requests", load,
                           f", answers {' then '.join(load['answers'])}") + [
        Row("  request rate", rate, "req/s", note=target_note(rate >= 50, ">= 50")),
        Row("  slowest request", load["slowest"], "s"),
        Row("  deploy meanwhile, wall", load["deploy"], "s", note="changed build, same requirements"),
        Row("  restart meanwhile, wall", load["restart"], "s"),
    ]


def upgrade_rows(load: dict) -> list[Row]:
    """What the testers saw while two agent builds took over the env in turn."""
    first, then = load["upgrades"]
    return sent_and_failed("agent upgrade under load: requests", "  failed during the upgrades", load,
                           f"; restart with another agent build ({first:.1f} s), then with this one ({then:.1f} s)")


def kill_row(kills: list[float]) -> Row:
    """Median seconds from kill -9 of the app until a new process answers."""
    median = statistics.median(kills)
    return Row("kill -9 to serving again", median, "s",
               note=f"{target_note(median < 3, '< 3 s')}; median of {len(kills)}, polled every 20 ms")


def latency_rows(qabox: dict[str, list[float]], single: dict[str, list[float]]) -> list[Row]:
    """p50/p95 of /slow for 1 and TESTERS testers, against the single-threaded server."""
    def row(key: str, who: str, pct: int, note: str = "") -> Row:
        return compared(f"{who}, /slow p{pct}", percentile(qabox[key], pct), "s",
                        percentile(single[key], pct), note)

    rows = [
        row("one", "1 tester", 50, f"{len(qabox['one'])} requests of a {SLOW} s page, one by one; "
                                   "baseline: the app on single-threaded Werkzeug"),
        row("one", "1 tester", 95),
        row("many", f"{TESTERS} testers", 50, f"{len(qabox['many'])} requests, {TESTERS} at a time"),
        row("many", f"{TESTERS} testers", 95),
    ]
    slowdown, single_slowdown = (percentile(r["many"], 95) / percentile(r["one"], 95)
                                 for r in (qabox, single))
    rows.append(compared(f"p95 {TESTERS} testers / 1 tester", slowdown, "x", single_slowdown,
                         note=target_note(slowdown <= 1.3, "<= 1.3x")))
    return rows

