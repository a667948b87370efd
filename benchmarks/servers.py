"""The servers section: examples/notes on each app server qabox can run it on
(`[app] server` in the build's qabox.toml), side by side in one run: small-page
requests/s and p95 latency, straight to the app's port in lab1 and through a
tester's `qabox tunnel`, with 1 and 8 keep-alive connections, against Werkzeug's
threaded dev server (the default); and failed requests while a changed build is
deployed under a steady 60 requests/s.

A server the host does not run is skipped with a row saying why: its deploy's
one-line error, or the Server header of what answered instead (a qabox that
ignores the setting serves the build on Werkzeug).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .harness import Bench, BenchError, Row, compared, percentile, run, target_note
from .supervision import LOAD_CLIENTS, LOAD_RATE, HostLoad  # 60 requests/s in all
from .target import PROGRAMS, QABOX, REPO, DeployTarget, HOST, host_program
from .tunnel import add_tester, remove_tester, start_qabox_tunnel

SERVERS = ("werkzeug", "waitress", "gunicorn")  # the first is the default, every ratio's baseline
CONNECTIONS = (1, 8)
PAGE = "/"  # the notes app's index: a small page
LOAD_REQUESTS = 500  # at least, through the deploy
CLIENT = "keepalive_client.py"


def configured(target: DeployTarget, server: str) -> DeployTarget:
    """The target's copy of the app set to run on `server`, whose package its
    requirements then name (Werkzeug comes with Flask)."""
    toml = target.src / "qabox.toml"
    toml.write_text(toml.read_text().replace("[app]\n", f'[app]\nserver = "{server}"\n', 1))
    if server != "werkzeug":
        requirements = target.src / "requirements.txt"
        requirements.write_text(requirements.read_text() + f"{server}\n")
    return target


def deploy(target: DeployTarget, build: Path) -> tuple[float, str | None]:
    """`qabox deploy --json` of a build: (wall seconds, None), or (.., its one-line error)."""
    started = time.perf_counter()
    proc = subprocess.run([QABOX, "deploy", build, "--host", HOST, "--env", target.env,
                           "--port", str(target.port), "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode == 0:
        return wall, None
    try:
        return wall, json.loads(proc.stdout)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return wall, (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]


def client(mode: str, port: int, direct: bool, timeout: float = 60, **kwargs) -> dict:
    """Run one mode of programs/keepalive_client.py to its end: inside lab1 (direct)
    or here, against a tunnel's local port."""
    args = (mode, json.dumps(dict(kwargs, port=port, path=kwargs.get("path", PAGE))))
    command = host_program(CLIENT, *args) if direct else [sys.executable, PROGRAMS / CLIENT, *args]
    return json.loads(run(*command, timeout=timeout).stdout)


def served_by(target: DeployTarget, server: str) -> str | None:
    """None if `server` answers on the env's port, else why not (what answered instead)."""
    header = client("probe", target.port, direct=True)["server"]
    if server.lower() in header.lower():
        return None
    return (f"asked for [app] server = \"{server}\" but {header or 'a server without a Server header'} "
            f"answered: this qabox does not know the setting")


def burst(port: int, direct: bool, connections: int, seconds: float) -> dict:
    """GET PAGE on `connections` keep-alive connections for `seconds`."""
    return client("burst", port, direct, timeout=seconds + 60, clients=connections, seconds=seconds,
                  procs=min(connections, 2))  # 2 cores: more processes only share them


def deploy_under_load(target: DeployTarget, build: Path) -> dict:
    """Deploy a changed build while LOAD_CLIENTS keep-alive testers in lab1 send
    LOAD_RATE requests/s each: LOAD_REQUESTS at least, a quarter of them before it
    starts, and for a second at least after it ends (the old process drains)."""
    kwargs = dict(port=target.port, path="/release", clients=LOAD_CLIENTS, rate=LOAD_RATE,
                  requests=LOAD_REQUESTS, keepalive=True, max_seconds=300)
    with HostLoad(host_program("host_client.py", "load", json.dumps(kwargs))) as load:
        time.sleep(LOAD_REQUESTS / (LOAD_CLIENTS * LOAD_RATE) / 4)  # the old build answers first
        wall, error = deploy(target, build)
        if error:
            raise BenchError(f"the changed build's deploy failed: {error}")
        time.sleep(1)
        return dict(load.stop(), deploy=wall)


def section(bench: Bench) -> list[Row]:
    """Each server's requests/s and p95, direct and tunnelled, 1 and 8 connections, against
    Werkzeug's; and failed requests through a deploy under load."""
    seconds = 1.0 if bench.quick else 2.0
    targets: dict[str, DeployTarget] = {}
    port = 9900
    for server in SERVERS:  # one env each, at ports not bound yet: free_port would pick one again
        targets[server] = configured(
            DeployTarget(bench, REPO / "examples" / "notes", suffix=f"-{server}", first_port=port), server)
        port = targets[server].port + 1
    builds = {server: (t.make_build("v1"), t.make_build("v2")) for server, t in targets.items()}
    skipped: dict[str, str] = {}
    figures: dict[tuple, list[dict]] = {}
    loads: dict[str, dict] = {}
    tunnels, tester = {}, None
    try:
        for server, target in targets.items():
            error = deploy(target, builds[server][0])[1] or served_by(target, server)
            if error:
                skipped[server] = error
        live = [server for server in SERVERS if server not in skipped]
        if SERVERS[0] not in live:
            raise BenchError(f"the {SERVERS[0]} baseline did not serve: {skipped[SERVERS[0]]}")
        tester = add_tester(bench, targets[SERVERS[0]].env, name="servers")
        for server in live:
            tunnels[server] = start_qabox_tunnel(bench, dict(tester, env=targets[server].env))
        ways = {"direct": lambda server: (targets[server].port, True),
                "tunnel": lambda server: (tunnels[server].port, False)}
        for server in live:  # warm up: first connections, lazy imports, workers
            for way in ways.values():
                burst(*way(server), connections=2, seconds=0.3)
        for _ in range(bench.repeats):  # interleaved, so drifts hit every server alike
            for connections in CONNECTIONS:
                for way, reach in ways.items():
                    for server in live:
                        figures.setdefault((way, connections, server), []).append(
                            burst(*reach(server), connections=connections, seconds=seconds))
        for server in live:
            loads[server] = deploy_under_load(targets[server], builds[server][1])
    finally:
        try:
            for forward in tunnels.values():
                forward.stop()
        finally:
            try:
                if tester:
                    remove_tester(tester)
            finally:
                for target in targets.values():
                    target.reset()
    return server_rows(figures, skipped, seconds) + load_rows(loads, skipped)


def summary(runs: list[dict]) -> dict:
    """One way's figures over the repeats: median requests/s and p95, and what they add up to."""
    return {"rate": statistics.median(r["requests"] / r["seconds"] for r in runs),
            "p95": statistics.median(percentile(r["latencies"], 95) for r in runs) * 1000,
            "requests": sum(r["requests"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "connections": sum(r["connections"] for r in runs), "retries": sum(r["retries"] for r in runs),
            "errors": [e for r in runs for e in r["errors"]][:1], "repeats": len(runs),
            "client_cpu": max(r["cpu"] / r["seconds"] for r in runs)}


def server_rows(figures: dict[tuple, list[dict]], skipped: dict[str, str], seconds: float) -> list[Row]:
    """Per way and connections: each server's requests/s, then p95, against Werkzeug's."""
    rows = [Row(f"{server}: skipped", None, "", note=why) for server, why in skipped.items()]
    for way in ("direct", "tunnel"):
        for connections in CONNECTIONS:
            label = f"{way}, {connections} connection{'s' if connections > 1 else ''}"
            base = summary(figures[(way, connections, SERVERS[0])])
            for key, unit in (("rate", "req/s"), ("p95", "ms")):
                for server in SERVERS:
                    if (way, connections, server) not in figures:
                        continue
                    s = summary(figures[(way, connections, server)])
                    name = f"{label}, {server}" + (", p95" if key == "p95" else "")
                    note = run_note(s, way, connections, seconds) if key == "rate" else ""
                    if server == SERVERS[0]:
                        rows.append(Row(name, s[key], unit, note="; ".join(filter(None, [note, "the baseline"]))))
                    else:
                        rows.append(compared(name, s[key], unit, base[key], note=note))
    return rows


def run_note(s: dict, way: str, connections: int, seconds: float) -> str:
    """How the figure was made, and what the connections did (keep-alive or not)."""
    where = "to the app's port inside lab1" if way == "direct" else "through the tester's qabox tunnel"
    repeats = f"median of {s['repeats']}" if s["repeats"] > 1 else "1 run"
    per = s["requests"] / s["connections"]
    reuse = f"keep-alive, {per:.0f} requests per connection" if per >= 1.5 else "a connection per request"
    note = (f"GET {PAGE} for {seconds:g} s {where}, {repeats}; {reuse}; the clients used up to "
            f"{s['client_cpu']:.1f} CPU of {os.cpu_count()}; failed {s['failed']}")
    if s["retries"]:
        note += f", {s['retries']} retried once"
    if s["errors"]:
        note += f"; first error: {s['errors'][0]}"
    return note


def load_rows(loads: dict[str, dict], skipped: dict[str, str]) -> list[Row]:
    """Per server: failed of the requests sent through a deploy under load."""
    rows, steady = [], LOAD_CLIENTS * LOAD_RATE
    for server, load in loads.items():
        rate = load["sent"] / load["seconds"]
        met = load["failed"] == 0 and load["sent"] >= LOAD_REQUESTS and abs(rate - steady) <= 0.1 * steady
        answers = " then ".join(a.strip() for a in load["answers"])
        first = f"; first error: {load['errors'][0]}" if load["errors"] else ""
        rows.append(Row(
            f"deploy under load, {server}: failed requests", load["failed"], "req",
            note=f"{target_note(met, f'0 of >= {LOAD_REQUESTS} at {steady} req/s')}; of {load['sent']} sent by "
                 f"{LOAD_CLIENTS} keep-alive clients in lab1 at {rate:.0f} req/s over {load['seconds']:.1f} s, "
                 f"a changed build's deploy ({load['deploy']:.1f} s) in the middle; answers {answers}; "
                 f"{load['retries']} retried once on a new connection (their reused connection closed before "
                 f"any byte of a response, as browsers retry){first}"))
    return rows + [Row(f"deploy under load, {server}: skipped", None, "", note=why)
                   for server, why in skipped.items()]
