"""What a lab is: its hosts' names, accounts and addresses per slot, the state
`up` recorded, and what the tests and the benchmark do on a running host (run
a command in its namespace, cut its link, remove an env).

As root, host lab{i} is the network namespace qabox-lab{n} (198.18.{n}.2, its own
loopback) running its own sshd for the account qalab{n}, where n = 8 * slot + i.
Without root, one sshd on 127.0.0.1 serves the current user as lab1. State lives
in $QABOX_LAB_DIR (default <repo>/.lab).
"""
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MAX_HOSTS = 8
MAX_SLOT = 30  # 8 * 30 + 8 = 248: host numbers stay within 198.18.1-254
REPO = Path(__file__).resolve().parent.parent
LAB = Path(os.environ.get("QABOX_LAB_DIR") or REPO / ".lab").absolute()
DEPLOY_KEY = LAB / "keys" / "deploy"
STATE = LAB / "state.json"
IS_ROOT = os.geteuid() == 0


class LabError(Exception):
    """A failure reported as one line on stderr, without a traceback."""


class Host:
    """One lab host: a namespace with its sshd (root), or the local sshd (non-root)."""

    def __init__(self, index, local_port=0, slot=0):
        self.index, self.local_port = index, local_port  # local_port: non-root fallback
        n = self.number = slot * MAX_HOSTS + index  # names below are kernel-wide
        self.name, self.ns, self.veth = f"lab{index}", f"qabox-lab{n}", f"qlab{n}"
        self.user = pwd.getpwuid(os.getuid()).pw_name if local_port else f"qalab{n}"
        self.address = "127.0.0.1" if local_port else f"198.18.{n}.2"
        self.home = pwd.getpwuid(os.getuid()).pw_dir if local_port else f"/home/{self.user}"
        self.port = local_port or 22
        self.dir = LAB / self.name
        self.hostkey, self.pidfile = self.dir / "ssh_host_ed25519_key", self.dir / "sshd.pid"
        self.log = self.dir / "sshd.log"


def run(*cmd, check=True):
    """Run a command quietly; on failure raise its last stderr line as a LabError."""
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]}") from None
    if check and proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise LabError(f"{' '.join(cmd)}: {lines[-1]}")
    return proc


def write_if_changed(path, text, mode=0o644):
    """Write a file only when its content differs, so a repeated `up` changes nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text:
        return False
    path.write_text(text)
    path.chmod(mode)
    return True


def pid_alive(pid, comm=None):
    """Tell whether pid runs; zombies count as dead since this machine's init may not reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return state not in "ZX" and comm in (None, name)


def kill_all(pids, sig=signal.SIGKILL, timeout=3.0):
    """Signal processes and wait (bounded) until they are gone; True if they are."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(pid_alive, pids))


def account_exists(name):
    """Tell whether a Unix account exists."""
    try:
        return bool(pwd.getpwnam(name))
    except KeyError:
        return False


def port_open(host, timeout=1.0):
    """Tell whether the host answers with an SSH banner."""
    try:
        with socket.create_connection((host.address, host.port), timeout=timeout) as sock:
            return sock.recv(256).startswith(b"SSH-")  # read it all: no RST, calmer log
    except OSError:
        return False


def load_state():
    """Read what the last `up` started, or None when the lab is down."""
    try:
        return json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None


def save_state(mode, hosts, slot=0, port=0):
    """Record what `up` made; a lab of old versions has no slot, which means slot 0."""
    state = {"mode": mode, "hosts": hosts, "slot": slot}
    if port:
        state["port"] = port
    write_if_changed(STATE, json.dumps(state) + "\n")


def lab_hosts():
    """List the hosts the last `up` started."""
    state = load_state() or {"hosts": 0}
    return [Host(i, state.get("port", 0), state.get("slot", 0))
            for i in range(1, state["hosts"] + 1)]


def env_slot():
    """The slot asked for in $QABOX_LAB_SLOT, or None."""
    value = os.environ.get("QABOX_LAB_SLOT", "")
    if not value:
        return None
    if not value.isdigit() or int(value) > MAX_SLOT:
        raise LabError(f"QABOX_LAB_SLOT={value!r}: expected a number from 0 to {MAX_SLOT}")
    return int(value)


def used_numbers(links, addresses):
    """Host numbers (n of qlab{n} and 198.18.{n}.0/24) that something here already uses."""
    used = {int(m) for m in re.findall(r"^\d+: qlab(\d+)[@:]", links, re.M)}
    return used | {int(m) for m in re.findall(r"\b198\.18\.(\d+)\.", addresses)}


def slot_free(slot, used):
    """Tell whether none of the slot's host numbers is in use."""
    return not used & set(range(slot * MAX_HOSTS + 1, (slot + 1) * MAX_HOSTS + 1))


def machine_used_numbers():
    """Look at the links, addresses and routes of this network namespace."""
    links = run("ip", "-o", "link", "show").stdout
    addresses = run("ip", "-o", "addr", "show").stdout + run("ip", "route", "show").stdout
    return used_numbers(links, addresses)


def pick_slot(state):
    """The lab's slot: the recorded one, else $QABOX_LAB_SLOT, else the first free one."""
    wanted = env_slot()
    if state:
        slot = state.get("slot", 0)
        if wanted not in (None, slot):
            raise LabError(f"this lab is up in slot {slot}, QABOX_LAB_SLOT asks for {wanted}: "
                           f"run scripts/lab down first")
        return slot
    used = machine_used_numbers()
    if wanted is not None:
        # Links and addresses outlive the processes of a lab whose machine
        # session ended (CI's clone finds its developer's): taken over, unless
        # that lab's sshd still answers.
        if not slot_free(wanted, used) and any(port_open(Host(i, slot=wanted), timeout=0.5)
                                               for i in range(1, MAX_HOSTS + 1)):
            first, last = wanted * MAX_HOSTS + 1, (wanted + 1) * MAX_HOSTS
            raise LabError(f"slot {wanted} is in use by another lab on this machine (an sshd "
                           f"answers in 198.18.{first}-{last}.0/24): take that lab down, or pick "
                           f"another QABOX_LAB_SLOT")
        return wanted
    for slot in range(MAX_SLOT + 1):
        if slot_free(slot, used):
            if slot:
                print(f"lab: slot 0 is in use by another lab on this machine; using slot {slot} "
                      f"(lab1 is qalab{slot * MAX_HOSTS + 1}@198.18.{slot * MAX_HOSTS + 1}.2)",
                      file=sys.stderr)
            return slot
    raise LabError("every lab slot on this machine is in use")


def find_host(name):
    """Look a host up by name in the running lab."""
    for host in lab_hosts():
        if host.name == name:
            return host
    raise LabError(f"no lab host named {name!r} is up (try: scripts/lab up)")


def check_privileges():
    """Refuse to manage a lab made by root without root, which would fail halfway."""
    state = load_state()
    if state and state["mode"] == "netns" and not IS_ROOT:
        raise LabError(f"the lab in {LAB} was started as root; run this as root")



def exec_command(name, command):
    """The command line that runs command where the host's loopback is: its
    namespace (as root), or right here (non-root)."""
    host = find_host(name)
    command = [str(arg) for arg in command]
    if host.local_port:
        return command
    check_privileges()
    return ["ip", "netns", "exec", host.ns] + command


def set_link(name, state):
    """Set the host's root-side veth "down" or "up", to cut its network in fault tests."""
    host = find_host(name)
    if host.local_port or not IS_ROOT:
        raise LabError("link needs root and the namespace lab")
    run("ip", "link", "set", host.veth, state)


def env_pids(host, env):
    """The host account's processes of an env: its supervisor (an agent's
    `supervise BASE ENV`) and whatever runs from the env's directory (its apps)."""
    uid, marker = pwd.getpwnam(host.user).pw_uid, f"/envs/{env}/"
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or proc.stat().st_uid != uid:
                continue
            argv = (proc / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        supervisor = any(arg == "supervise" and argv[i + 2:i + 3] == [env] for i, arg in enumerate(argv))
        if (supervisor or any(marker in arg for arg in argv)) and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def remove_env(name, env, base=".qabox", builds=(), timeout=20.0):
    """Stop an env's supervisor and apps on a lab host, delete its files and the
    manifests and blobs named in ``builds`` (by sha256).  Killed, not terminated: a supervisor that is
    only terminated leaves its app serving for the next one to adopt, and a supervisor
    restarts an app it sees die, so this kills until nothing of the env is left."""
    host = find_host(name)
    deadline = time.monotonic() + timeout
    while pids := env_pids(host, env):
        if time.monotonic() > deadline:
            raise LabError(f"{name}: processes of env {env} survive SIGKILL: {pids}")
        kill_all(pids, timeout=1.0)
    root = Path(host.home, base)
    shutil.rmtree(root / "envs" / env, ignore_errors=True)
    for sha in builds:
        for file in (root / "manifests" / f"{sha}.json", root / "blobs" / sha):
            file.unlink(missing_ok=True)
