"""Where the bench runs: lab1 of the lab package's lab (started here if needed,
in $QABOX_LAB_DIR and $QABOX_LAB_SLOT), reached with the lab's ssh_config, and an
env and port of this run's own there."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from lab.control import up
from lab.hosts import LAB, exec_command, find_host, remove_env
from qabox.agent import manifest
from qabox.hosts import load_settings

from .harness import Bench, BenchError, run

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"  # what runs beside qabox, as files
HOST = "lab1"
SSH_CONFIG = LAB / "ssh_config"
HOSTS_DIR = REPO / "hosts"
QABOX = Path(sys.executable).with_name("qabox")
STAMP = "bench-stamp.txt"  # programs/supervised_app.py reads it


def lab_up(hosts: int = 1) -> None:
    """Start lab1..labN (idempotent) and point qabox, in-process and CLI, at the lab."""
    up(hosts)
    os.environ.update(QABOX_SSH_CONFIG=str(SSH_CONFIG), QABOX_HOSTS_DIR=str(HOSTS_DIR))


def ssh(command: str, input: str | None = None, timeout: float = 120):
    """Run a shell command on the lab host with the system's OpenSSH client.

    Keepalives make it fail within about 20 s when lab1's link is cut (the
    lab's fault tests do that), rather than wait for TCP to give up.
    """
    return run("ssh", "-F", SSH_CONFIG, "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=4",
               HOST, command, input=input, timeout=timeout)


def in_lab_host(*cmd) -> list[str]:
    """A command line that runs cmd where lab1's loopback is: its network namespace, as root."""
    return exec_command(HOST, cmd)


def stored_as(build: Path) -> list[str]:
    """The names a build is stored under on the host: its manifest's id and its files' contents."""
    with tarfile.open(build, "r|*") as tar:
        listed = manifest.scan(tar, 10**9)[1]
    return [manifest.identity(listed)] + [item[5] for item in listed["members"] if item[5]]


def host_program(name: str, *args) -> list[str]:
    """A command line that runs programs/NAME with the host's python in lab1's namespace."""
    return in_lab_host("/usr/bin/python3", PROGRAMS / name, *args)


class DeployTarget:
    """This run's own env and port on lab1, and the builds uploaded to it.

    Builds are made from a copy of an app dir.  Every build gets a stamp file
    naming this run, so its sha256 is unique: no other env can already hold
    it, and deleting it disturbs nobody.
    """

    def __init__(self, bench: Bench, app: Path, suffix: str = "", assets_mb: int = 0, first_port: int = 9900):
        self.bench = bench
        self.env = f"bench{os.getpid()}{suffix}"
        self.base = load_settings(HOST, HOSTS_DIR).dir.removeprefix("~/")  # relative to home
        self.port = int(run(*host_program("free_port.py", first_port, 9999)).stdout)
        self.assets_mb = assets_mb
        self.builds: list[Path] = []
        self.src = bench.tmp / self.env
        shutil.copytree(app, self.src, ignore=shutil.ignore_patterns("__pycache__"))

    def make_build(self, stamp: str) -> Path:
        """The app plus its wheels and assets, with a one-line stamp file that makes it unique."""
        (self.src / STAMP).write_text(f"{self.env} {stamp}\n")
        out = self.bench.tmp / f"{self.env}-{stamp}.tar.gz"
        run(sys.executable, REPO / "scripts" / "example-build", self.src, "-o", out,
            "--assets-mb", self.assets_mb, timeout=300)
        self.builds.append(out)
        return out

    def reset(self, keep: "DeployTarget | None" = None) -> None:
        """Stop and delete the env and every build we uploaded, as before a first deploy;
        but what ``keep``'s builds are stored as too stays (its release shares it)."""
        # qabox stores a build on the host as its manifest and blobs, by sha256
        kept = {sha for build in keep.builds for sha in stored_as(build)} if keep else set()
        remove_env(HOST, self.env, self.base,
                   [sha for build in self.builds for sha in stored_as(build) if sha not in kept])

    def forget_wheels(self) -> None:
        """Empty the host's wheel cache, so the next deploy installs as on a host that never
        installed these wheels (other envs' venvs keep their own links to those files)."""
        shutil.rmtree(Path(find_host(HOST).home, self.base, "wheelcache"), ignore_errors=True)

    def venv_python(self) -> str:
        """The python of the env's virtualenv on lab1."""
        envs = Path(find_host(HOST).home, self.base, "envs")
        pythons = sorted((envs / self.env / "venvs").glob("*/bin/python"))
        if not pythons:
            raise BenchError(f"env {self.env} has no venv")
        return str(pythons[0])

    def cli(self, *args, timeout: float = 900):
        """Run a qabox command on this env, as users type it."""
        return run(QABOX, *args, "--host", HOST, "--env", self.env, timeout=timeout)

    def deploy_cli(self, build: Path) -> tuple[float, dict]:
        """`qabox deploy --json` as users run it: (wall seconds, its JSON result)."""
        started = time.perf_counter()
        proc = self.cli("deploy", build, "--port", self.port, "--json")
        return time.perf_counter() - started, json.loads(proc.stdout)["data"]
