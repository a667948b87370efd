"""The agent on every python a host may have (3.6 on RHEL/CentOS 7 and Ubuntu 18.04,
up to 3.13), run with ``python -I`` as qabox ships it: it answers, checks builds, loads
nothing but the standard library, and deploys, serves, reports and stops an app."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from conftest import Host, free_port, link, local_get, raw_tar, wait_until, wsgi_build
from qabox.agent.protocol import PROTOCOL
from qabox.host_python import Target

PYTHONS = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python")) + ["/usr/bin/python3"]

# Runs the agent file given after it as python would, then writes (to stderr) the modules
# it loaded, and those of them from outside the standard library and the agent itself. (What
# python loads before, such as the host's .pth hooks in site-packages, is the host's own.)
WATCH = r"""
import sys
before = set(sys.modules)
import json, os, runpy
sys.argv = sys.argv[1:]
agent = os.path.realpath(sys.argv[0])
try:
    runpy.run_path(agent, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
files = dict((name, getattr(module, "__file__", None)) for name, module in list(sys.modules.items())
             if name not in before)
import sysconfig
stdlib = [os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")]

def standard(path):
    if not path:
        return True  # built in, or frozen
    path = os.path.realpath(path)
    if path == agent or path.startswith(agent + os.sep) or path.startswith(agent[:-len(".pyz")] + "."):
        return True  # the agent's own modules, inside its archive or its compiled copy
    parts = path.split(os.sep)
    return (any(path.startswith(lib + os.sep) for lib in stdlib)
            and "site-packages" not in parts and "dist-packages" not in parts)

outside = sorted("%s (%s)" % (name, path) for name, path in files.items() if not standard(path))
sys.stderr.write("\nloaded %s\n" % json.dumps({"modules": sorted(files), "outside": outside}))
sys.exit(code)
"""


def loaded(stderr: str) -> dict:
    lines = [line for line in stderr.splitlines() if line.startswith("loaded ")]
    assert lines, stderr
    return json.loads(lines[-1][len("loaded "):])


def version_of(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.network  # the app server's wheels for each python
@pytest.mark.parametrize("python", PYTHONS)
def test_the_agent_runs_on_every_python_and_loads_only_the_standard_library(python, agent_cmd, tmp_path):
    if not os.path.exists(python):
        pytest.skip(f"no {python} on this machine")
    home = tmp_path / "host"
    home.mkdir()
    argv = agent_cmd(python)
    private = home / ".qabox" / "agent" / os.path.basename(argv[-1])  # install writes beside it: our own copy
    private.parent.mkdir(parents=True)
    shutil.copy(argv[-1], private)
    argv[-1] = str(private)
    watched = Host(argv[:2] + ["-c", WATCH] + argv[2:], home)
    seen = set()

    def watch(result: dict) -> dict:
        found = loaded(watched.stderr)
        assert found["outside"] == [], found["outside"]
        seen.update(found["modules"])
        return result

    version = version_of(python)
    hello = watch(watched.call("hello"))
    assert hello["ok"] and hello["data"]["protocol"] == PROTOCOL and hello["data"]["python"] == version, hello
    assert not hello["data"]["compiled"]
    # installed, it compiles itself for this python once; every call after imports that copy
    assert watch(watched.call("install"))["ok"]
    hello = watch(watched.call("hello"))
    assert hello["ok"] and hello["data"]["compiled"], hello
    assert watch(watched.call("status")) == {"ok": True, "changed": False, "data": {"envs": []}}
    info = watch(watched.call("python-info"))["data"]  # what qabox build --for resolves wheels for
    target = Target.from_json(info, "the host's python")
    assert info["python"] == version and info["pip"] and info["glibc"], info
    assert target.accepts(f"x-1-{target.interpreter}-{target.abi}-manylinux1_x86_64.whl"), info
    # the host's own checks of a build, with no check on the client's side
    chain = raw_tar(tmp_path / "chain.tar", [(tarfile.TarInfo("wsgi.py"), b"app = None\n")] + [
        (link(name, target), None) for name, target in (("a/b", ".."), ("a/b/c", "../.."))
    ] + [(tarfile.TarInfo("a/b/c/f"), b"through the links\n")])
    refused = watch(watched.deploy(chain, "main", free_port()))
    assert not refused["ok"] and refused["error"]["code"] == "bad_build", refused
    assert "unsafe members: a/b/c: written through the link a/b" in refused["error"]["message"]
    other = raw_tar(tmp_path / "other.tar", [(tarfile.TarInfo("wsgi.py"), b"app = None\n")])
    garbled = watch(watched.deploy(other, "main", free_port(), sent=b"not the build"))
    assert not garbled["ok"] and garbled["error"]["code"] == "checksum", garbled
    assert os.listdir(home / ".qabox" / "envs" / "main" / "releases") == []
    assert list(tmp_path.rglob("f")) == []  # nothing was written through the links, anywhere
    assert {"json", "tarfile", "fcntl", "hashlib"} <= seen  # the watch saw the agent's imports
    # the app's life, not watched: a supervisor talks only to agents it knows by their command line
    local = Host(argv, home)
    try:
        port = free_port()
        build = wsgi_build(tmp_path / "app.tar.gz", python=".".join(version.split(".")[:2]))
        deployed = local.deploy(build, "main", port)
        assert deployed["ok"] and deployed["changed"], (deployed, local.stderr)
        assert local_get(port) == (200, "v1")
        (env,) = local.data("status", env="main")["envs"]
        assert env["state"] == "running" and env["health"]["code"] == 200
        with local.session("main") as call:
            assert call("config-change", env="main", set={"CFG_A": "a=1\nb"})["data"]["restart"]
            assert call("stop", env="main")["changed"]
        assert local.data("config-list", env="main", show=True)["variables"] == [
            {"name": "CFG_A", "source": "config", "value": "a=1\nb"}]
        assert local_get(port)[0] == 0 and wait_until(lambda: not local.processes(), 10)
    finally:
        local.kill_all()

