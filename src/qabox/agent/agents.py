"""This agent on the host: the archive it runs from, the stable entry that
forced commands and cron name, and old versions removed once nothing runs them.

Under the base directory::

    agent/agent-<hash>.pyz   one per version, never changed once written
    agent/current            symlink to the newest, switched atomically

A long-lived process (supervisor, app, tester session) runs from the
hash-named archive, never from ``current``: zipimport reopens its archive by
path on every lazy import, so a path switched to another file under a
running process would break it (see the archive's ``__main__`` in ``qabox.agent_zip``).
"""

import os
import re

from .procs import own_pids
from .protocol import Fail

ARCHIVE = ""  # the hash-named archive this process runs from: set once by main
ENTRY = "current"
VERSION = re.compile(r"agent-[0-9a-f]{16}\.pyz?")  # older agents were one .py file
COMPILED = re.compile(r"(agent-[0-9a-f]{16})\.[\w.-]+\.zip")  # a version's compiled copy (see compiled)


def archive() -> str:
    return ARCHIVE


def name() -> str:
    """This version's file name, how supervisors tell their agent's version."""
    return os.path.basename(ARCHIVE)


def entry() -> str:
    """The stable path of the newest agent, for forced commands and cron."""
    return os.path.join(os.path.dirname(ARCHIVE), ENTRY)


def run_by(pid: int):
    """The agent file a process of ours runs (absolute) and its arguments after
    it, or None when it runs no agent file."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")[1:]
        while argv and argv[0].startswith("-"):  # the interpreter's options (python -I, -X importtime)
            if argv[0] in ("-c", "-m"):
                return None
            argv = argv[2:] if argv[0] in ("-X", "-W") else argv[1:]
        if not argv:
            return None
        path = os.path.join(os.readlink("/proc/%d/cwd" % pid), argv[0])  # qabox runs it by a relative path
    except (OSError, ValueError):
        return None
    return os.path.normpath(path), [a for a in argv[1:] if a]


def agent_args(pid: int):
    """A process's arguments after the agent file (``["supervise", base, env]``),
    or None when it is not an agent of this host's agent directory."""
    found = run_by(pid)
    if found is None or os.path.dirname(found[0]) != os.path.dirname(ARCHIVE):
        return None
    return found[1]


def cmd_install(req, io) -> dict:
    """Make this agent the host's newest (``qabox`` calls it after pushing it):
    point ``current`` at it, move tester keys and the @reboot line that name an
    older agent to ``current``, and remove the versions nothing runs."""
    from . import boot, compiled, testers

    try:
        compiled.write(ARCHIVE)
    except OSError:
        pass  # a full disk: the agent runs from its sources, as before
    changed = point_entry()
    for move in (testers.point_keys_at_entry, lambda base: boot.set_cron(base, only_if_present=True)):
        try:
            changed = move(req["base"]) or changed
        except (Fail, OSError):
            pass  # a damaged tester list, no cron: what names the old agent keeps it (see prune)
    removed = prune()
    return {"agent": name(), "removed": removed, "changed": changed or bool(removed)}


def point_entry(switch: bool = True) -> bool:
    """Point ``current`` at this agent (or, not switching, only if it leads
    nowhere: a push cut before its install). True if it changed."""
    link = entry()
    if os.path.islink(link) and os.readlink(link) == name() or not switch and os.path.exists(link):
        return False
    tmp = "%s.%d.tmp" % (link, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(name(), tmp)  # relative: the directory can move with its base
    os.replace(tmp, link)
    return True


def named_elsewhere() -> str:
    """authorized_keys and the crontab: the lines that may name an agent file."""
    import subprocess

    try:
        with open(os.path.expanduser("~/.ssh/authorized_keys")) as f:
            text = f.read()
    except OSError:
        text = ""
    try:
        listing = subprocess.run(["crontab", "-l"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        text += listing.stdout.decode("utf-8", "replace")
    except OSError:
        pass  # no cron on the host
    return text


def version_of(name: str):
    """The version a file of the agent directory belongs to (an archive itself,
    or a compiled copy's archive), or None if it is no agent's."""
    copy = COMPILED.fullmatch(name)
    if copy:
        return copy.group(1) + ".pyz"
    return name if VERSION.fullmatch(name) else None


def prune() -> list:
    """Delete older versions of the agent (and their compiled copies) that no process of ours runs."""
    folder = os.path.dirname(ARCHIVE)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    keep = {name(), os.path.basename(os.path.realpath(os.path.join(folder, ENTRY)))}
    named = named_elsewhere()  # a key or cron line not moved to current yet keeps its agent
    keep.update(n for n in names if os.path.join(folder, n) in named)
    for pid in own_pids():
        found = run_by(pid)
        if found and os.path.dirname(found[0]) == folder:
            keep.add(os.path.basename(os.path.realpath(found[0])))
    removed = []
    for old in sorted(n for n in names if version_of(n) not in keep | {None}):
        try:
            os.unlink(os.path.join(folder, old))
            removed.append(old)
        except OSError:
            pass
    return removed
