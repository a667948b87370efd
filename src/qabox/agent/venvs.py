"""A release's virtualenv, installed offline from the build's own wheels, linking
what the host's wheel cache (``wheelcache``) holds; pip runs from the bundled
wheel unpacked once into ``pip/<pip wheel>/``; and the host's python as wheels
see it (``python-info``)."""

import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from .envs import Env
from .files import LOG_TAIL, read_text_in
from .protocol import Fail
from .rules import SERVERS, requirements_problems
from .wheelcache import WheelCache

def venv_key(release_dir: str, python: str) -> str:
    """Releases whose requirements and wheels are equal share one virtualenv."""
    h = hashlib.sha256(python.encode())
    req = os.path.join(release_dir, "requirements.txt")
    if os.path.isfile(req):
        with open(req, "rb") as f:
            h.update(f.read())
    wheels = os.path.join(release_dir, "wheels")
    if os.path.isdir(wheels):
        for name in sorted(os.listdir(wheels)):
            h.update(("%s:%d\n" % (name, os.path.getsize(os.path.join(wheels, name)))).encode())
    return h.hexdigest()[:16]


def prepare_venv(env: Env, release_dir: str, io) -> dict:
    """Create (or reuse) the release's virtualenv; installs offline from wheels/,
    linking what the wheel cache holds. Its key, python and what it took."""
    key = venv_key(release_dir, sys.executable)
    venv = env.path("venvs", key)
    python = os.path.join(venv, "bin", "python")
    done = {"key": key, "python": python, "created": False, "linked": 0, "installed": 0}
    if os.path.isfile(os.path.join(venv, ".complete")):
        return done
    req = os.path.join(release_dir, "requirements.txt")
    problems = requirements_problems(lambda name: read_text_in(release_dir, name))
    if problems:
        raise Fail("bad_build", "the build's requirements are refused: %s" % "; ".join(problems[:5]))
    shutil.rmtree(venv, ignore_errors=True)  # one a killed deploy left half made: never trusted
    wheels = os.path.join(release_dir, "wheels")
    io.emit({"progress": "creating virtualenv"})
    pip_dir = unpacked_pip(env.base) if os.path.isfile(req) else None
    cmd = [sys.executable, "-m", "venv", venv]
    if not os.path.isfile(req):
        cmd.insert(3, "--system-site-packages")
    elif pip_dir:
        cmd.insert(3, "--without-pip")  # installing pip into the venv is most of venv's time
    run_step(cmd, "could not create a virtualenv on the host (is python3-venv installed?)")
    done["created"] = True
    if os.path.isfile(req):
        cache = WheelCache(env.base)
        found = cache.wheels(wheels)
        with cache.locked():
            known = cache.known_set(key, found)
            entries = known if known is not None else cache.cached(found)
            for entry in entries:
                cache.link(entry, venv)
        done["linked"] = len(entries)
        if known is None:
            io.emit({"progress": "installing requirements"})
            pip = [python] + ([os.path.join(pip_dir, "pip")] if pip_dir else ["-m", "pip"])
            pip += ["install", "--disable-pip-version-check", "--no-input", "-q", "--only-binary=:all:",
                    "-r", req]
            if os.path.isdir(wheels):
                pip[-3:-3] = ["--no-index", "--find-links", wheels]
            run_step(pip, "could not install the build's requirements.txt on the host"
                     " (ship every wheel in the build's wheels/ directory)")
            with cache.locked():
                done["installed"] = cache.harvest(key, venv, found, entries)
    with open(os.path.join(venv, ".complete"), "w"):
        pass
    return done


def unpacked_pip(base: str):
    """The bundled pip unpacked once on the host: run from its wheel, every start compiles
    pip again (zipimport keeps no .pyc), about a second of each install; unpacked, the first
    run writes the .pyc of what pip imports and later runs load them."""
    wheel = bundled_pip()
    if not wheel:
        return None
    final = os.path.join(base, "pip", os.path.basename(wheel)[:-len(".whl")])
    if os.path.isdir(final):
        return final
    tmp = "%s.%d.tmp" % (final, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another deploy unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bundled_pip():
    """The pip wheel that venv itself would install, to run pip straight from it. Found
    without importing ensurepip (about 4 ms, most of a changed deploy's upload-state)."""
    spec = importlib.util.find_spec("ensurepip")
    places = [os.path.join(place, "_bundled") for place in (spec and spec.submodule_search_locations or [])]
    places.append("/usr/share/python-wheels")
    for place in places:
        found = sorted(glob.glob(os.path.join(place, "pip-*.whl")))
        if found:
            return found[-1]
    return None


def pip_version():
    """The version of the pip prepare_venv installs with: it decides which wheel tags the host takes."""
    wheel = bundled_pip()
    if wheel:
        return os.path.basename(wheel).split("-")[1]
    import ensurepip

    return ensurepip.version()


def cmd_python_info(req, io) -> dict:
    """The host's python as wheels see it, so that qabox resolves a build's wheels for it."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # not glibc (musl)
        libc = ""
    name, _, version = libc.partition(" ")
    return {
        "python": "%d.%d.%d" % sys.version_info[:3],
        "implementation": sys.implementation.name,
        "abiflags": getattr(sys, "abiflags", ""),
        "soabi": sysconfig.get_config_var("SOABI") or "",
        "platform": sysconfig.get_platform(),
        "glibc": version if name == "glibc" else None,
        "pip": pip_version(),
        "servers": [name for name in SERVERS if importlib.util.find_spec(name)],  # for a build with no requirements
    }


def run_step(cmd: list, what: str) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode:
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        if any("No space left" in line for line in lines):
            raise Fail("disk_full", "the host's disk is full: free some space and deploy again")
        raise Fail("step_failed", what, log=lines[-LOG_TAIL:])
