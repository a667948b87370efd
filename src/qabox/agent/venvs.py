"""A release's virtualenv, installed offline from the build's own wheels.

What pip installs is kept host-wide, per wheel file, in the wheel cache:

    wheelcache/<python>/<wheel sha256>/   the files pip installed into site-packages
                                          (hard links, read-only), its scripts left out
    wheelcache/<python>/sets/<key>.json   the entries a pip run installed for a venv key
    wheelcache/.lock                      held while linking, harvesting, collecting
    pip/<pip wheel>/                      the bundled pip, unpacked

A new virtualenv gets the cached wheels of its wheelhouse hard-linked in first,
so pip finds them satisfied and installs only the others; a venv key pip has
installed before on this host is linked whole and pip does not run at all.
"""

import configparser
import csv
import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from .envs import Env
from .files import LOG_TAIL, file_sha256, makedirs, read_json, read_text_in, write_json
from .protocol import Fail
from .rules import requirements_problems

CONSOLE_SCRIPT = """#!%s
# -*- coding: utf-8 -*-
import re
import sys
from %s import %s
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(%s())
"""


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


class WheelCache:
    """The host's installed wheels, for this python (see the module's docstring)."""

    def __init__(self, base: str, tag: str = sys.implementation.cache_tag):
        self.top = os.path.join(base, "wheelcache")
        self.dir = os.path.join(self.top, tag)

    @contextlib.contextmanager
    def locked(self):
        makedirs(os.path.join(self.dir, "sets"))
        with open(os.path.join(self.top, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def wheels(self, wheelhouse: str) -> dict:
        """{sha256: wheel path} of the wheelhouse's wheels whose project no other wheel there names."""
        paths = sorted(glob.glob(os.path.join(wheelhouse, "*.whl")))
        projects = [project(p) for p in paths]
        return {file_sha256(p): p for p, name in zip(paths, projects) if projects.count(name) == 1}

    def known_set(self, key: str, found: dict):
        """The entries a pip run installed for this venv key, if all of them are cached and
        are wheels of this wheelhouse (the key knows wheels by name and size only); else None."""
        entries = read_json(os.path.join(self.dir, "sets", key + ".json"), None)
        if isinstance(entries, list) and all(e in found and os.path.isdir(os.path.join(self.dir, e))
                                             for e in entries):
            return entries
        return None

    def cached(self, found: dict) -> list:
        """The found wheels cached: a wheelhouse holds what its requirements resolved to, so
        each is one pip would install."""
        return [sha for sha in sorted(found) if os.path.isdir(os.path.join(self.dir, sha))]

    def link(self, entry: str, venv: str) -> None:
        """Hard-link an entry's files into the venv's site-packages, and write its console scripts."""
        src, site = os.path.join(self.dir, entry), site_packages(venv)
        for root, dirs, files in os.walk(src):
            dest = os.path.join(site, os.path.relpath(root, src))
            makedirs(dest)
            for name in files:
                target = os.path.join(dest, name)
                if os.path.lexists(target):  # two distributions ship one file: the later wins, as with pip
                    os.unlink(target)
                os.link(os.path.join(root, name), target)
        for info in glob.glob(os.path.join(src, "*.dist-info")):
            write_console_scripts(info, venv)

    def harvest(self, key: str, venv: str, found: dict, linked: list) -> int:
        """Cache what pip installed from the found wheels; record the venv key's whole set.
        How many distributions pip installed."""
        site = site_packages(venv)
        by_release = {release_of(os.path.basename(p)): sha for sha, p in found.items()}
        infos = glob.glob(os.path.join(site, "*.dist-info"))
        entries, installed = list(linked), 0
        for info in infos:
            sha = by_release.get(release_of(os.path.basename(info)))
            if sha in linked:
                continue
            installed += 1
            if sha and self.store(sha, site, info):
                entries.append(sha)
        if len(entries) == len(infos):  # every distribution in the venv is cached
            write_json(os.path.join(self.dir, "sets", key + ".json"), sorted(entries))
        return installed

    def store(self, sha: str, site: str, info: str) -> bool:
        """Hard-link one distribution's site-packages files into the cache, read-only (an app
        writing into its venv gets an error rather than changing every venv's copy). False if
        it installed files elsewhere that are not its console scripts (data, headers)."""
        scripts = set(entry_points(info))
        paths = []
        with open(os.path.join(info, "RECORD"), encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                path = row[0] if row else ""
                full = os.path.normpath(os.path.join(site, path))
                if full.startswith(site + os.sep):
                    paths.append(full)
                elif path and os.path.basename(full) not in scripts:
                    return False
        final = os.path.join(self.dir, sha)
        if os.path.isdir(final):
            return True
        tmp = os.path.join(self.dir, ".%s.%d.tmp" % (sha, os.getpid()))
        shutil.rmtree(tmp, ignore_errors=True)
        for full in paths:
            if os.path.isfile(full):
                dest = os.path.join(tmp, os.path.relpath(full, site))
                makedirs(os.path.dirname(dest))
                os.chmod(full, os.stat(full).st_mode & 0o555)
                os.link(full, dest)
        os.rename(tmp, final)
        return True

    def collect(self) -> None:
        """Delete the entries no venv links any more (on any env), a killed harvest's leftovers,
        and the sets that name a deleted entry. Under the lock: nobody links from them meanwhile."""
        with self.locked():
            for name in os.listdir(self.dir):
                path = os.path.join(self.dir, name)
                if name != "sets" and (name.startswith(".") or not linked_anywhere(path)):
                    shutil.rmtree(path, ignore_errors=True)
            for name in os.listdir(os.path.join(self.dir, "sets")):
                entries = read_json(os.path.join(self.dir, "sets", name), None) or []
                if not all(os.path.isdir(os.path.join(self.dir, e)) for e in entries):
                    os.unlink(os.path.join(self.dir, "sets", name))


def collect_wheel_caches(base: str) -> None:
    """Collect every python's wheel cache on the host (see WheelCache.collect)."""
    for sets in sorted(glob.glob(os.path.join(base, "wheelcache", "*", "sets"))):
        WheelCache(base, os.path.basename(os.path.dirname(sets))).collect()


def linked_anywhere(path: str) -> bool:
    """Whether some venv still links a file of a cache entry: its link count says, on any env."""
    for root, dirs, files in os.walk(path):
        for name in files:
            if os.stat(os.path.join(root, name)).st_nlink > 1:
                return True
    return False


def site_packages(venv: str) -> str:
    return os.path.join(venv, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def project(wheel: str) -> str:
    return canonical(os.path.basename(wheel).split("-")[0])


def release_of(name: str) -> tuple:
    """(project, version) of a wheel file's or a .dist-info directory's name."""
    parts = re.sub(r"\.(whl|dist-info)$", "", name).split("-")
    return canonical(parts[0]), parts[1] if len(parts) > 1 else ""


def entry_points(info: str) -> dict:
    """{script name: "module:attr"} of a distribution's console and gui scripts."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(os.path.join(info, "entry_points.txt"), encoding="utf-8")
    return {name.strip(): value.split("[")[0].strip() for section in ("console_scripts", "gui_scripts")
            if parser.has_section(section) for name, value in parser.items(section)}


def write_console_scripts(info: str, venv: str) -> None:
    """A linked distribution's scripts, written as pip does: their shebang names this venv's python."""
    for name, target in entry_points(info).items():
        module, _, attr = target.partition(":")
        path = os.path.join(venv, "bin", name)
        with open(path, "w") as f:
            f.write(CONSOLE_SCRIPT % (os.path.join(venv, "bin", "python"), module.strip(),
                                      attr.strip().split(".")[0], attr.strip()))
        os.chmod(path, 0o755)


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
    """The pip wheel that venv itself would install, to run pip straight from it."""
    import ensurepip

    places = [os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"), "/usr/share/python-wheels"]
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
    }


def run_step(cmd: list, what: str) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    if proc.returncode:
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        if any("No space left" in line for line in lines):
            raise Fail("disk_full", "the host's disk is full: free some space and deploy again")
        raise Fail("step_failed", what, log=lines[-LOG_TAIL:])
