"""scripts/bench runs end to end on the lab, reports every figure, and leaves
nothing behind on lab1."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import LAB_HOME, REPO
LAB_ENVS = Path(f"{LAB_HOME}/.qabox/envs")
DEPLOY_FIGURES = {
    "build size", "first deploy, wall", "first deploy, reported", "second env's first deploy (same requirements), wall",
    "second env's first deploy (same requirements), reported", "unchanged redeploy, wall",
    "unchanged redeploy, reported", "changed redeploy, wall", "changed redeploy, reported",
    "changed redeploy, bytes sent",
    "scp + untar (baseline)", "upload throughput",
}
SUPERVISION_FIGURES = {
    "redeploy under load: requests", "failed requests", "request rate", "slowest request",
    "deploy meanwhile, wall", "restart meanwhile, wall", "kill -9 to serving again",
    "1 tester, /slow p50", "1 tester, /slow p95", "10 testers, /slow p50", "10 testers, /slow p95",
    "p95 10 testers / 1 tester", "agent upgrade under load: requests", "failed during the upgrades",
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the bench needs the lab's namespace hosts (root)")


def run_quick_bench(section: str) -> tuple[dict[str, dict], str]:
    """Run one section with --quick --json: (its rows by stripped name, the bench's env)."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "bench"), "--only", section, "--quick", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err
    rows = {row["name"].strip(): row for row in json.loads(out)["sections"][section]}
    return rows, f"bench{proc.pid}"  # the bench names its envs after its pid


def assert_gone(env: str) -> None:
    """Nothing of the env is left on lab1: no files, no supervisor, no app."""
    assert not (LAB_ENVS / env).exists()
    for pattern in (f"supervise \\S+ {env} ", f"/envs/{env}/"):
        assert subprocess.run(["pgrep", "-f", pattern]).returncode == 1, pattern


def assert_positive(rows: dict[str, dict], names: set[str]) -> None:
    """Every named figure is there, with a positive value and baseline (if any)."""
    assert names <= rows.keys()
    for name in names:
        assert rows[name]["value"] > 0, rows[name]
        assert rows[name]["baseline"] is None or rows[name]["baseline"] > 0, rows[name]


def test_quick_deploy_bench_reports_positive_figures():
    rows, env = run_quick_bench("deploy")
    assert_positive(rows, DEPLOY_FIGURES)
    assert rows["unchanged redeploy, reported"]["value"] < rows["first deploy, reported"]["value"]
    assert "wheels installed 0, linked 7" in rows["second env's first deploy (same requirements), wall"]["note"]
    assert_gone(env)
    assert_gone(env + "b")


def test_quick_supervision_bench_reports_load_restarts_and_latency():
    """The figures are measured as meant (qabox's own guarantees are test_supervision's)."""
    rows, env = run_quick_bench("supervision")
    assert_positive(rows, SUPERVISION_FIGURES - {"failed requests", "failed during the upgrades"})
    assert isinstance(rows["failed requests"]["value"], int)
    assert isinstance(rows["failed during the upgrades"]["value"], int)
    assert rows["agent upgrade under load: requests"]["value"] >= 300
    assert rows["redeploy under load: requests"]["value"] >= 300
    assert "v1 then v2" in rows["redeploy under load: requests"]["note"]  # the redeploy was under load
    # the baseline really serves one request at a time: 10 testers wait for each other
    assert rows["p95 10 testers / 1 tester"]["baseline"] > 5
    assert_gone(env + "s")
    assert subprocess.run(["pgrep", "-f", f"{REPO}/benchmarks/programs/single_threaded.py"]).returncode == 1


TUNNEL_WAYS = ("qabox tunnel", "sshtunnel", "ssh -L")
TUNNEL_FIGURES = {f"{figure}, {way}" for way in TUNNEL_WAYS for figure in (
    "1 client, GET / p50", "1 client, GET / p95", "8 connections", "CPU per 1000 requests",
    "1 MiB responses", "link down 5 s: link up to served")} | {"8 connections, app alone in lab1"}


def test_quick_tunnel_bench_compares_three_forwards_and_cleans_up():
    """All three ways served, the link cut was survived, and the tester and env are gone."""
    rows, env = run_quick_bench("tunnel")
    assert_positive(rows, TUNNEL_FIGURES)
    assert "failed requests, all three: 0" in rows["8 connections, sshtunnel"]["note"]
    for way in TUNNEL_WAYS:  # each answered again well within the bench's 30 s wait
        assert rows[f"link down 5 s: link up to served, {way}"]["value"] < 30
    assert "EXITED" not in rows["link down 5 s: link up to served, qabox tunnel"]["note"]
    assert_gone(env + "t")
    testers = json.loads((LAB_ENVS.parent / "testers.json").read_text())
    assert env + "t" not in testers
    # no forward outlives the bench: all three name the tester's key file in their command line,
    # in the bench's temp dir (named after its pid, so that other benches here do not count)
    assert subprocess.run(["pgrep", "-f", f"qabox-{env}-[^ ]*/tester"]).returncode == 1


CLI_FIGURES = {"qabox --help, wall", "qabox status --host lab1, wall",
               "qabox status --host lab1, wall, before the .pyz",
               "agent status call, before the .pyz", "agent status call, now"}


def test_quick_cli_bench_times_help_status_and_the_agent_before_and_after_the_pyz():
    """--help; status against ssh true, now and with the client of before the .pyz; the
    agent call on the host before and after; the base dirs they used on lab1 are gone."""
    rows, env = run_quick_bench("cli")
    assert_positive(rows, CLI_FIGURES)
    assert "ssh lab1 true" in rows["qabox status --host lab1, wall"]["note"]
    assert "the wall before the .pyz" in rows["qabox status --host lab1, wall"]["note"]
    assert "agent.py of f0cf96f" in rows["agent status call, before the .pyz"]["note"]
    assert ".pyz" in rows["agent status call, now"]["note"]
    assert rows["agent status call, now"]["ratio"] > 0
    for base in "bc":
        assert not Path(f"{LAB_HOME}/.qabox-{env}{base}").exists()


SERVERS = ("werkzeug", "waitress", "gunicorn")
SERVER_WAYS = [f"{way}, {n} connection{'s' if n > 1 else ''}" for way in ("direct", "tunnel") for n in (1, 8)]


def test_quick_servers_bench_measures_each_server_or_says_why_not():
    """Werkzeug is always measured; another server either has every figure or a row
    saying why it was skipped; the envs and the tester are gone afterwards."""
    rows, env = run_quick_bench("servers")
    for server in SERVERS:
        if f"{server}: skipped" in rows:
            assert server != "werkzeug"
            assert rows[f"{server}: skipped"]["value"] is None and rows[f"{server}: skipped"]["note"]
            assert f"deploy under load, {server}: skipped" in rows
            continue
        names = {f"{way}, {server}{p95}" for way in SERVER_WAYS for p95 in ("", ", p95")}
        assert_positive(rows, names)
        if server != "werkzeug":
            assert all(rows[name]["ratio"] > 0 for name in names)
        load = rows[f"deploy under load, {server}: failed requests"]
        assert isinstance(load["value"], int)
        assert " then " in load["note"], load  # the old release answered, then the new one
        assert int(re.search(r"of (\d+) sent", load["note"]).group(1)) >= 500, load
        assert_gone(f"{env}-{server}")
    assert f"{env}servers" not in json.loads((LAB_ENVS.parent / "testers.json").read_text())


def keepalive_client():
    """benchmarks/programs/keepalive_client.py as a module (it runs on hosts as a file)."""
    spec = importlib.util.spec_from_file_location("keepalive_client",
                                                  REPO / "benchmarks" / "programs" / "keepalive_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def closing_server():
    """An HTTP/1.1 server that keeps a connection for 2 responses, then closes it
    unannounced (as a draining keep-alive server may), and answers /drop with nothing."""
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.served = getattr(self, "served", 0) + 1
            if self.path == "/drop":
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = self.served >= 2

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_keepalive_client_retries_once_only_what_a_browser_retries(closing_server):
    client = keepalive_client().Client(closing_server)
    assert [client.get("/") for _ in range(6)] == ["ok"] * 6
    assert (client.connections, client.retries) == (3, 2)  # every third request met a closed connection
    with pytest.raises(OSError):
        client.get("/drop")  # a reused connection: retried once, on a new one, which drops it again
    assert client.retries == 3
    with pytest.raises(OSError):
        keepalive_client().Client(closing_server).get("/drop")  # a new connection is not retried


def test_keep_alive_load_counts_retries_not_failures(closing_server):
    """host_client.py's load with keepalive (the servers section's deploy under load)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "programs" / "host_client.py"), "load",
                          json.dumps(dict(port=closing_server, path="/", clients=2, rate=50, requests=40,
                                          keepalive=True, max_seconds=20))],
                         input="", capture_output=True, text=True, timeout=30)
    load = json.loads(out.stdout)
    assert (load["failed"], load["answers"]) == (0, ["ok"]), load
    assert load["sent"] >= 40 and load["retries"] >= 10, load
    assert load["seconds"] > 0.35, load  # paced at 2 x 50 requests/s after stdin closed, too


def test_server_rows_compare_each_server_with_werkzeug_and_name_the_skipped():
    from benchmarks.servers import load_rows, server_rows

    def run(rate: float, latency: float, per_connection: int) -> dict:
        requests = int(rate)
        return {"requests": requests, "seconds": 1.0, "latencies": [latency] * requests, "failed": 0,
                "connections": requests // per_connection, "retries": 0, "errors": [], "cpu": 0.5}

    figures = {}
    for way in ("direct", "tunnel"):
        for n in (1, 8):
            figures[(way, n, "werkzeug")] = [run(1000, 0.002, 1)]
            figures[(way, n, "waitress")] = [run(4000, 0.001, 100)]
    rows = {row.name: row for row in server_rows(figures, {"gunicorn": "its deploy: no gunicorn"}, 1.0)}
    assert rows["direct, 8 connections, waitress"].ratio == 4
    assert rows["tunnel, 1 connection, waitress, p95"].ratio == 0.5
    assert "keep-alive, 100 requests per connection" in rows["direct, 1 connection, waitress"].note
    assert "a connection per request" in rows["direct, 1 connection, werkzeug"].note
    assert (rows["gunicorn: skipped"].value, rows["gunicorn: skipped"].note) == (None, "its deploy: no gunicorn")
    assert not any(name.startswith("direct") and "gunicorn" in name for name in rows)
    load = {"sent": 510, "failed": 1, "seconds": 8.5, "deploy": 3.0, "answers": ["r1", "r2"], "retries": 2,
            "errors": ["RemoteDisconnected()"]}
    (failed,) = load_rows({"waitress": load}, {})
    assert failed.value == 1 and failed.note.startswith("MISSED target 0 of >= 500 at 60 req/s")
    assert "answers r1 then r2; 2 retried once" in failed.note
