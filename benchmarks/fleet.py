"""The fleet section: a changed build deployed to 4 lab hosts at once, against
deploying it to one."""
from __future__ import annotations

import os
import shutil
import statistics
import sys
from pathlib import Path

from lab.hosts import remove_env

from .harness import Bench, Row, compared, run, target_note, timed
from .target import QABOX, REPO, STAMP, lab_up

FLEET = ("lab1", "lab2", "lab3", "lab4")


def fleet_build(bench: Bench, src: Path, stamp: str) -> Path:
    """examples/notes with a stamp file, so each build is new to every host."""
    (src / STAMP).write_text(stamp + "\n")
    out = bench.tmp / f"fleet-{stamp}.tar.gz"
    run(sys.executable, REPO / "scripts" / "example-build", src, "-o", out, timeout=300)
    return out


def section(bench: Bench) -> list[Row]:
    """A changed build deployed to 4 lab hosts at once, against deploying it to one."""
    lab_up(len(FLEET))
    env = f"bench{os.getpid()}f"
    src = bench.tmp / env
    shutil.copytree(REPO / "examples" / "notes", src, ignore=shutil.ignore_patterns("__pycache__"))
    hosts = [arg for host in FLEET for arg in ("--host", host)]
    one, four = [], []
    try:
        # warm up: each host gets the env and its virtualenv, as in daily use
        run(QABOX, "deploy", fleet_build(bench, src, "warm"), *hosts, "--env", env, "--json", timeout=900)
        for n in range(bench.repeats):
            build = fleet_build(bench, src, f"one{n}")
            one.append(timed(lambda: run(QABOX, "deploy", build, "--host", FLEET[0], "--env", env,
                                         "--json", timeout=900)))
            build = fleet_build(bench, src, f"four{n}")
            four.append(timed(lambda: run(QABOX, "deploy", build, *hosts, "--env", env, "--json",
                                          timeout=900)))
    finally:
        for host in FLEET:
            remove_env(host, env)
    ratio = statistics.median(four) / statistics.median(one)
    return [
        Row("changed build to 1 host, wall", statistics.median(one), "s", note="venv reused"),
        compared("changed build to 4 hosts, wall", statistics.median(four), "s", statistics.median(one),
                 target_note(ratio <= 1.5, "<= 1.5x one host") + f"; median of {bench.repeats}"),
    ]

