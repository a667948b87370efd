"""scripts/bench runs end to end on the lab and reports every deploy figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = {
    "build size", "first deploy, wall", "first deploy, reported", "unchanged redeploy, wall",
    "unchanged redeploy, reported", "changed redeploy, wall", "changed redeploy, reported",
    "scp + untar (baseline)", "upload throughput",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="the bench needs the lab's namespace hosts (root)")
def test_quick_deploy_bench_reports_positive_figures():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench"), "--only", "deploy", "--quick", "--json"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)["sections"]["deploy"]}
    assert FIGURES <= rows.keys()
    for name in FIGURES:
        assert rows[name]["value"] > 0, rows[name]
        assert rows[name]["baseline"] is None or rows[name]["baseline"] > 0, rows[name]
    assert rows["unchanged redeploy, reported"]["value"] < rows["first deploy, reported"]["value"]
