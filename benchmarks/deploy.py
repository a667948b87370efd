"""The deploy section: first, second env's first, unchanged and changed deploys of
examples/notes against scp + untar of the same build with OpenSSH."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qabox.context import Context
from qabox.commands.deploy import Hooks, deploy
from qabox.remote import Remote, Session

from .harness import MB, Bench, BenchError, Row, compared, run, target_note, timed
from .target import HOST, REPO, SSH_CONFIG, DeployTarget, ssh

# Seconds a changed redeploy waits for the one before it to settle, as a
# developer's next build takes longer than that: the host starts the spare app
# a new release is handed (agent/spare.py) once a deploy is done.
SETTLE = 1.5


class StepClock:
    """Times between a deploy's progress hooks: each phase runs until the next mark."""

    UPLOADING, UPLOADED = "uploading", "after upload (acks, blobs verified, release assembled)"

    def __init__(self):
        self.started = time.perf_counter()
        self.marks: list[tuple[float, str]] = []
        self.requests: list[str] = []  # the agent requests the deploy made: each a round trip

    def mark(self, label: str) -> None:
        self.marks.append((time.perf_counter() - self.started, label))

    def upload(self, sent: int, total: int) -> None:
        """Mark the first block handed to SSH, and the last one."""
        if not any(label == self.UPLOADING for _, label in self.marks):
            self.mark(self.UPLOADING)
        if sent == total:
            self.mark(self.UPLOADED)

    def phases(self) -> dict[str, float]:
        """Seconds per phase, named by the mark that starts it, in order."""
        pairs = zip(self.marks, self.marks[1:])
        return {label: end - start for (start, label), (end, _) in pairs}



def deploy_with_clock(target: DeployTarget, build: Path) -> StepClock:
    """Deploy in-process, timestamping the progress hooks to see where time goes."""
    clock = StepClock()
    with counted_requests(clock.requests):
        deploy(Context.create(), HOST, build, env=target.env, port=target.port,
               hooks=Hooks(step=clock.mark, upload=clock.upload))
    clock.mark("done")
    return clock


@contextmanager
def counted_requests(seen: list[str]) -> Iterator[None]:
    """Note each agent request: on a channel of its own (Remote._open) or in the locked session."""
    open_channel, call = Remote._open, Session.call
    Remote._open = lambda self, cmd, *a, **k: seen.append(cmd) or open_channel(self, cmd, *a, **k)
    Session.call = lambda self, cmd, *a, **k: seen.append(cmd) or call(self, cmd, *a, **k)
    try:
        yield
    finally:
        Remote._open, Session.call = open_channel, call


def baseline_copy(build: Path) -> tuple[float, float]:
    """scp the build, then untar it over ssh: (scp seconds, scp + untar seconds)."""
    name = f"/tmp/bench{os.getpid()}"
    started = time.perf_counter()
    run("scp", "-q", "-F", SSH_CONFIG, build, f"{HOST}:{name}.tar.gz", timeout=600)
    copied = time.perf_counter()
    ssh(f"rm -rf {name}.d && mkdir {name}.d && tar -xzf {name}.tar.gz -C {name}.d")
    return copied - started, time.perf_counter() - started


def remove_baseline_files() -> None:
    """Delete what baseline_copy left on the host."""
    ssh(f"rm -rf /tmp/bench{os.getpid()}.tar.gz /tmp/bench{os.getpid()}.d")


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    """Per-key medians of several runs' phase timings, in the first run's order."""
    return {key: statistics.median(s[key] for s in samples if key in s) for key in samples[0]}


def section(bench: Bench) -> list[Row]:
    """First, second env's first, unchanged and changed deploys of examples/notes against scp + untar.

    A first deploy starts with an empty wheel cache; the second env's gets another build
    with the same requirements while the first env's release (its venv) is kept."""
    assets = 4 if bench.quick else 40
    target = DeployTarget(bench, REPO / "examples" / "notes", assets_mb=assets)
    other = DeployTarget(bench, REPO / "examples" / "notes", suffix="b", assets_mb=assets,
                         first_port=target.port + 1)  # not bound yet: free_port would pick it again
    build = target.make_build("first")
    other_build = other.make_build("first")  # another build (its own stamp file), the same requirements
    changes = [target.make_build(f"change{i}") for i in range(bench.repeats)]
    rushed = [target.make_build(f"rushed{i}") for i in range(bench.repeats)]
    timed_changes = [target.make_build(f"timed{i}") for i in range(bench.repeats)]
    size = build.stat().st_size
    try:
        copies = [baseline_copy(build) for _ in range(bench.repeats)]
        ssh_noop = statistics.median(timed(lambda: ssh("true")) for _ in range(bench.repeats))

        firsts, clocks, seconds, same_builds, other_clocks = [], [], [], [], []
        for _ in range(bench.repeats):
            target.reset()
            target.forget_wheels()
            firsts.append(target.deploy_cli(build))
        for _ in range(bench.repeats):  # target's release is kept: its wheels and files are on the host
            other.reset(keep=target)
            seconds.append(other.deploy_cli(other_build))  # sends what it does not share with target's
            other.reset(keep=target)
            same_builds.append(other.deploy_cli(build))  # on the host already: nothing to send
        for _ in range(bench.repeats):
            target.reset()
            target.forget_wheels()
            clocks.append(deploy_with_clock(target, build))
            other.reset(keep=target)
            other_clocks.append(deploy_with_clock(other, other_build))
        unchanged = [target.deploy_cli(build) for _ in range(bench.repeats)]
        back_to_back = [target.deploy_cli(b) for b in rushed]
        changed = [settled(lambda: target.deploy_cli(b)) for b in changes]
        changed_clocks = [settled(lambda: deploy_with_clock(target, b)) for b in timed_changes]
    finally:
        target.reset()
        other.reset()
        remove_baseline_files()

    scp = statistics.median(c[0] for c in copies)
    copy = statistics.median(c[1] for c in copies)
    phases = medians([c.phases() for c in clocks])
    if StepClock.UPLOADING not in phases:
        raise BenchError("the first deploy uploaded nothing: was the build on the host already?")
    upload = phases[StepClock.UPLOADING]
    rows = [Row("build size", size / MB, "MB", note="changed builds add one small file")]
    rows += deploy_rows("first deploy", firsts, copy)
    rows += deploy_rows("second env's first deploy (same requirements)", seconds, copy)
    rows += deploy_rows("second env's first deploy (the same build)", same_builds, copy)
    rows += deploy_rows("unchanged redeploy", unchanged, copy)
    rows += deploy_rows("changed redeploy", changed, copy)
    rows += deploy_rows("changed redeploy, back to back (no spare app ready)", back_to_back, copy)
    sent = statistics.median(r[1]["sent_bytes"] for r in changed)
    rows.append(compared("changed redeploy, bytes sent", sent / MB, "MB", size / MB,
                         note=f"{sent:.0f} B, manifest included, of the {size / MB:.1f} MB build; "
                              + target_note(sent < 0.01 * size, "< 1%")))
    rows += [
        Row("scp + untar (baseline)", copy, "s", note=f"scp alone {scp:.2f} s"),
        Row("ssh lab1 true (floor)", ssh_noop, "s", note="one OpenSSH login and command"),
        compared("upload throughput", size / MB / upload, "MB/s", size / MB / scp,
                 note=scp_note(size, scp, ssh_noop)),
    ]
    rows += phase_rows("first deploy", phases)
    rows += phase_rows("second env", medians([c.phases() for c in other_clocks]))
    rows += phase_rows("changed redeploy", medians([c.phases() for c in changed_clocks]))
    requests = changed_clocks[0].requests
    rows.append(Row("  changed redeploy: agent requests", len(requests), "", note=", ".join(requests)))
    return rows


def settled(deploy_once):
    """``deploy_once()`` once the deploy before it has settled (SETTLE)."""
    time.sleep(SETTLE)
    return deploy_once()


def phase_rows(name: str, phases: dict[str, float]) -> list[Row]:
    total = sum(phases.values())
    return [Row(f"  {name}: {label}", seconds, "s", note=f"{seconds / total:.0%}")
            for label, seconds in phases.items()]


def scp_note(size: int, scp: float, login: float) -> str:
    """qabox's upload phase excludes its login, scp's time does not: say what that is worth."""
    note = "first deploy's upload vs scp, whose time includes its login"
    if scp > 2 * login:  # else the difference is mostly noise
        note += f" ({size / MB / (scp - login):.0f} MB/s without)"
    return note


def deploy_rows(name: str, results: list[tuple[float, dict]], baseline: float) -> list[Row]:
    """Wall time (what users wait, start-up included) and qabox's own `seconds`."""
    wall = statistics.median(r[0] for r in results)
    reported = statistics.median(r[1]["seconds"] for r in results)
    sent = statistics.median(r[1]["sent_bytes"] for r in results)
    venvs = sum(r[1]["venv_created"] for r in results)
    installed = statistics.median(r[1]["wheels_installed"] for r in results)
    linked = statistics.median(r[1]["wheels_linked"] for r in results)
    facts = (f"sent {f'{sent / MB:.1f} MB' if sent >= MB / 10 else f'{sent:.0f} B'}, new venv {venvs}/{len(results)}, "
             f"wheels installed {installed:g}, linked {linked:g}")
    return [compared(f"{name}, wall", wall, "s", baseline, note=facts),
            compared(f"{name}, reported", reported, "s", baseline, note="JSON `seconds`")]

