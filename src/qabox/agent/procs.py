"""Processes of the deploy account, read from /proc."""

import os
import signal
import time


STOP_TIMEOUT = 10.0


def proc_stat(pid):
    """(name, fields from the state on) of /proc/PID/stat, or None if no such process.
    ``fields[0]`` is the state, ``fields[1]`` the parent, ``fields[19]`` the start."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (OSError, TypeError):
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def own_pids() -> list:
    """The processes of this account: the only ones whose /proc entries it may read."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat("/proc/" + name).st_uid == os.getuid():
                pids.append(int(name))
        except OSError:
            pass
    return pids


def pid_alive(pid) -> bool:
    """Whether pid runs; a zombie counts as dead (an orphan's reaper may be slow)."""
    stat = proc_stat(pid) if pid else None
    return stat is not None and stat[1][0] not in "ZX"


def stop_group(pid: int, timeout: float) -> None:
    """SIGTERM a process group, wait for it, then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    wait_for(lambda: not pid_alive(pid), timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_started(pid: int) -> float:
    """When a process started (epoch seconds), from /proc."""
    try:
        ticks = int(proc_stat(pid)[1][19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError, StopIteration):
        return time.time()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
