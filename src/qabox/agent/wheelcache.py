"""The host's installed wheels, kept per wheel file so a new virtualenv links them.

    wheelcache/<python>/<wheel sha256>/   the files pip installed into site-packages
                                          (hard links, read-only), its scripts left out
    wheelcache/<python>/sets/<key>.json   the entries a pip run installed for a venv key
    wheelcache/.lock                      held while linking, harvesting, collecting

A new virtualenv gets the cached wheels of its wheelhouse hard-linked in first,
so pip finds them satisfied and installs only the others; a venv key pip has
installed before on this host is linked whole and pip does not run at all.
"""

import configparser
import contextlib
import csv
import fcntl
import glob
import os
import re
import shutil
import sys

from .files import digest, makedirs, read_json, write_json

CONSOLE_SCRIPT = """#!%s
# -*- coding: utf-8 -*-
import re
import sys
from %s import %s
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(%s())
"""


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
        return {sha256_of(p): p for p, name in zip(paths, projects) if projects.count(name) == 1}

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


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return digest(f)[0]


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
