"""Bringing envs back after a reboot: an @reboot crontab line (no root needed)."""

import os
import re
import shlex
import shutil
import subprocess
import sys

from . import agents
from .control import revive
from .envs import Env, all_envs
from .protocol import Fail


def cmd_on_boot(req, io) -> dict:
    """Have cron bring this host's envs back after a reboot (no root needed)."""
    if shutil.which("crontab") is None:
        raise Fail("no_cron", "crontab is not available on the host: install cron there, or "
                   "deploy without --on-boot")
    return {"changed": set_cron(req["base"])}


def set_cron(base: str, only_if_present: bool = False) -> bool:
    """Put this base's @reboot line, naming the agent's stable entry, in the
    crontab (only to update it, with ``only_if_present``). True if it changed."""
    base = os.path.abspath(os.path.expanduser(base))
    if re.search(r"[\x00-\x1f\x7f%]", base):  # cron reads a new line, or a %, as a line's end
        raise Fail("bad_request", "the deploy directory %r has control characters or a %%: name a plain "
                   "one" % base)
    tag = "# qabox %s" % base
    # cron runs the line with sh: quoted, whatever the hosts file's dir (checked there too)
    line = "@reboot %s %s" % (" ".join(shlex.quote(a) for a in (sys.executable, agents.entry(), "boot", base)),
                              tag)
    listing = subprocess.run(["crontab", "-l"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = listing.stdout.decode().splitlines() if listing.returncode == 0 else []
    if only_if_present and not any(x.endswith(tag) for x in lines):
        return False
    agents.point_entry(switch=False)  # the line names it: it must lead to an agent
    if line in lines:
        return False
    lines = [x for x in lines if not x.endswith(tag)] + [line]
    done = subprocess.run(["crontab", "-"], input=("\n".join(lines) + "\n").encode(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode:
        raise Fail("no_cron", "crontab refused the @reboot entry: %s"
                   % done.stdout.decode("utf-8", "replace").strip())
    return True


def boot(base: str) -> None:
    """At reboot (from cron): give every env that should be up its supervisor."""
    for name in all_envs(base):
        revive(Env(base, name))
