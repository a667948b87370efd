"""The package as users get it: `python -m build` makes a wheel and an sdist, and
the wheel, installed into a fresh virtualenv outside the checkout, deploys."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import LAB_DIR, REPO, http_get

pytestmark = pytest.mark.network  # the build backend and qabox's dependencies come from the index


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    return out


def test_wheel_and_sdist_carry_the_host_agent(dist):
    wheel, = dist.glob("qabox-*.whl")
    sdist, = dist.glob("qabox-*.tar.gz")
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("qabox/")}
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/src/", 1)[1] for n in tar.getnames() if "/src/qabox/" in n}
    assert {"qabox/agent_zip.py", "qabox/agent/main.py", "qabox/agent/rules.py"} <= in_wheel
    modules = {n for n in in_wheel if n.endswith(".py")}
    assert modules == {n for n in in_sdist if n.endswith(".py")}
    assert modules == {str(p.relative_to(REPO / "src")) for p in (REPO / "src" / "qabox").rglob("*.py")}


def test_installed_wheel_deploys_from_outside_the_checkout(dist, tmp_path, lab, notes_build, env_name, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # nothing of the checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel, = dist.glob("qabox-*.whl")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600, env=env)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env.update(QABOX_SSH_CONFIG=str(LAB_DIR / "ssh_config"), QABOX_HOSTS_DIR=str(workdir))
    proc = subprocess.run([str(venv / "bin" / "qabox"), "deploy", str(notes_build), "--host", "lab1",
                           "--env", env_name, "--port", str(port)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"lab1/{env_name}: release " in proc.stdout
    assert http_get("lab1", port, "/health")[0] == 200
