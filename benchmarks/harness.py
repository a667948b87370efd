"""What every section shares: rows of figures with their baselines and ratios,
how hard to try, running commands, and printing the table."""
from __future__ import annotations

import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

MB = 10**6


class BenchError(Exception):
    """A failure reported as one line on stderr, without a traceback."""


class Row(NamedTuple):
    """One figure: ratio is value / baseline when there is a baseline; value None:
    a figure not measured (its note says why)."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    note: str = ""


def compared(name: str, value: float, unit: str, baseline: float, note: str = "") -> Row:
    """A row with its baseline and the qabox/baseline ratio filled in."""
    return Row(name, value, unit, baseline, value / baseline, note)


def target_note(met: bool, target: str) -> str:
    """Name a figure's target, and flag it when missed."""
    return f"target {target}" if met else f"MISSED target {target}"


@dataclass
class Bench:
    """What every section needs: how hard to try, and where to put files."""

    quick: bool
    tmp: Path

    @property
    def repeats(self) -> int:
        return 1 if self.quick else 3



def run(*cmd, timeout: float = 120, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure raise its last stderr line as a BenchError."""
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(cmd)}: no answer within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise BenchError(f"command not found: {cmd[0]}") from None
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise BenchError(f"{shlex.join(cmd)}: {lines[-1]}")
    return proc


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds one call of fn takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def percentile(samples: list[float], pct: int) -> float:
    """The pct-th percentile, interpolated between the samples."""
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def number(value: float | None) -> str:
    """Three significant digits, never in exponent form."""
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def print_table(results: dict[str, list[Row]]) -> None:
    """One block per section; ratio = qabox / baseline."""
    for section, rows in results.items():
        width = max(len(row.name) for row in rows)
        print(f"== {section} ==")
        print(f"{'figure':<{width}} {'value':>8} {'unit':<5} {'baseline':>8} {'ratio':>7}  note")
        for row in rows:
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
            print(f"{row.name:<{width}} {number(row.value):>8} {row.unit:<5} "
                  f"{number(row.baseline):>8} {ratio:>7}  {row.note}".rstrip())
        print()

