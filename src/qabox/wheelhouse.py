"""A build's wheels, resolved for the python that will install them.

``pip download --python-version/--platform`` judges environment markers by
the python pip runs under, not the target (pip issue 11664), so uv resolves
the pins (``--python-version``/``--python-platform``: markers as the target
sees them), and pip fetches exactly those pins' files for the target's tags.
A pin with no wheel for them comes as its sdist and is built here: kept when
pure python (or compiled for this very python), refused otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.utils import InvalidSdistFilename, parse_sdist_filename, parse_wheel_filename
from uv import find_uv_bin

from qabox.errors import BuildError
from qabox.host_python import Target

SDISTS = ("*.tar.gz", "*.zip")


def run(cmd: list[str], what: str) -> str:
    """Run a resolver step; its failure is one line (its output's last: uv's cause, pip's error),
    with the output's tail as the log."""
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        last = re.sub(r"^(ERROR|error|cause):\s*", "", lines[-1].strip()) if lines else f"exit {proc.returncode}"
        raise BuildError(f"{what}: {last}", log=lines[-20:])
    return proc.stdout


def find_links_args(find_links: list[Path]) -> list[str]:
    return [arg for place in find_links for arg in ("--find-links", str(place))]


def pins(requirements: Path, target: Target, find_links: list[Path]) -> list[str]:
    """``name==version`` of everything ``requirements`` needs on ``target``, markers judged for it."""
    out = run([find_uv_bin(), "pip", "compile", str(requirements), "--quiet", "--no-header", "--no-annotate",
               "--python", sys.executable, "--python-version", target.python,
               "--python-platform", target.uv_platform(), *find_links_args(find_links)],
              f"cannot resolve the requirements for {target.describe()}")
    return [line.strip() for line in out.splitlines() if line.strip() and not line.lstrip().startswith(("#", "-"))]


def fetch(pinned: list[str], dest: Path, target: Target, find_links: list[Path]) -> tuple[list[Path], list[str]]:
    """The wheels of the ``pinned`` requirements for ``target`` in ``dest``, and those built here from sdists."""
    dest.mkdir(parents=True, exist_ok=True)
    pins_file = dest.parent / "pins.txt"
    pins_file.write_text("".join(pin + "\n" for pin in pinned))
    platforms = [arg for tag in target.platforms() for arg in ("--platform", tag)]
    run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--no-deps",
         "-r", str(pins_file), "-d", str(dest), "--python-version", target.python,
         "--implementation", target.interpreter[:2], "--abi", target.abi, *platforms, *find_links_args(find_links)],
        f"cannot download the requirements' files for {target.describe()}")
    built = []
    for sdist in sorted(p for pattern in SDISTS for p in dest.glob(pattern)):
        built.append(build_wheel(sdist, dest, target))
        sdist.unlink()
    return sorted(dest.glob("*.whl")), built


def build_wheel(sdist: Path, dest: Path, target: Target) -> str:
    """Build the wheel of a requirement that has only an sdist, refusing one ``target`` cannot run."""
    try:
        name, version = parse_sdist_filename(sdist.name)
        requirement = f"{name}=={version}"
    except InvalidSdistFilename:
        requirement = sdist.name
    out = dest.parent / "built"
    out.mkdir(exist_ok=True)
    run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-input", "--no-deps",
         "-w", str(out), str(sdist)],
        f"{requirement} has no wheel for {target.describe()}, and its sdist does not build here")
    (wheel,) = [w for w in out.glob("*.whl") if not (dest / w.name).exists()]
    pure = all(tag.platform == "any" for tag in parse_wheel_filename(wheel.name)[3])
    if pure and not target.accepts(wheel.name):
        raise BuildError(f"{requirement}: the wheel its sdist builds, {wheel.name}, does not install on "
                         f"{target.describe()}: require a version of it that supports that python")
    if not (pure or target.runs_here() and target.accepts(wheel.name)):
        raise BuildError(f"{requirement} has no wheel for {target.describe()}, and its sdist compiles code: "
                         f"build its wheel on such a host and put it in the project's wheels/ directory, "
                         f"or require a version of it that has one")
    wheel.rename(dest / wheel.name)
    return requirement
