"""scripts/bench runs end to end on the lab, reports every figure, and leaves
nothing behind on lab1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
