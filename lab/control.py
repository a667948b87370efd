"""Bringing lab hosts up and down: tools, keys, namespaces, accounts, sshds,
and the ssh_config and known_hosts that reach them."""
import fcntl
import os
import pwd
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .hosts import (DEPLOY_KEY, IS_ROOT, LAB, MAX_HOSTS, STATE, Host, LabError, account_exists,
                    check_privileges, env_slot, kill_all, lab_hosts, load_state, pick_slot,
                    pid_alive, port_open, run, save_state, write_if_changed)

SSHD = "/usr/sbin/sshd"
FIRST_LOCAL_PORT = 2222


def ensure_tools():
    """Install OpenSSH (and iproute2) with apt-get when missing: the lab needs a real sshd."""
    needed = {SSHD: "openssh-server", "ssh-keygen": "openssh-client", "ip": "iproute2"}
    missing = sorted({pkg for tool, pkg in needed.items()
                      if not shutil.which(tool) and (IS_ROOT or tool != "ip")})
    if missing and not IS_ROOT:
        raise LabError(f"{SSHD} or ssh-keygen is missing and installing it needs root: "
                       f"apt-get install {' '.join(missing)}")
    if missing:
        print(f"lab: installing {' '.join(missing)}", file=sys.stderr)
        run("apt-get", "update")
        run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
            "--reinstall", "--no-install-recommends", *missing)
    if not shutil.which(SSHD):
        raise LabError(f"{SSHD} is still missing after installing openssh-server")


def ensure_key(path, comment):
    """Create an ed25519 key once (kept across up/down) and return its 'type base64'."""
    pub = path.with_name(path.name + ".pub")
    if not (path.exists() and pub.exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (path, pub):
            stale.unlink(missing_ok=True)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path)
    return " ".join(pub.read_text().split()[:2])


def sshd_config(host):
    """Render the host's sshd_config; the non-root variant needs no privileges."""
    lines = [
        f"ListenAddress {host.address}", f"Port {host.port}", f"HostKey {host.hostkey}",
        f"PidFile {host.pidfile}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", f"AllowUsers {host.user}", "AllowTcpForwarding yes", "X11Forwarding no",
        "PermitUserEnvironment no", "MaxStartups 100:30:200", "MaxSessions 100",
        "LogLevel VERBOSE", "Subsystem sftp internal-sftp", "PrintMotd no",
    ]
    if host.local_port:
        lines += [f"AuthorizedKeysFile {LAB / 'keys' / 'authorized_keys'}", "StrictModes no"]
    else:
        lines += ["AuthorizedKeysFile .ssh/authorized_keys"]
    return "\n".join(lines) + "\n"


def sshd_pid(host):
    """Return the pid of the host's running sshd listener, or None."""
    try:
        pid = int(host.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid, "sshd") else None


def stop_sshd(host):
    """Stop the host's sshd listener, politely first."""
    pid = sshd_pid(host)
    if pid and not kill_all([pid], signal.SIGTERM):
        kill_all([pid])
    host.pidfile.unlink(missing_ok=True)


def start_sshd(host):
    """Start sshd (inside the namespace as root), reporting sshd's own error on failure."""
    offset = host.log.stat().st_size if host.log.exists() else 0
    prefix = [] if host.local_port else ["ip", "netns", "exec", host.ns]
    if not host.local_port:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    proc = run(*prefix, SSHD, "-f", host.dir / "sshd_config", "-E", host.log, check=False)
    if proc.returncode:  # with -E, sshd writes its fatal errors to the log
        with host.log.open() as log:
            log.seek(offset)
            lines = (log.read() + proc.stderr).strip().splitlines() or ["no output"]
        raise LabError(f"{host.name}: sshd failed to start: {lines[-1]}")


def wait_port(host, timeout=5.0):
    """Wait (bounded) until sshd answers, since it daemonizes before it listens."""
    deadline = time.monotonic() + timeout
    while not port_open(host, timeout=0.5):
        if time.monotonic() > deadline:
            raise LabError(f"{host.name}: nothing answers on {host.address}:{host.port} "
                           f"after {timeout:.0f}s (see {host.log})")
        time.sleep(0.05)


def setup_netns(host):
    """Give the host its own namespace, loopback and veth link to the root namespace."""
    if not Path("/run/netns", host.ns).exists():
        run("ip", "netns", "add", host.ns)
        run("ip", "-n", host.ns, "link", "set", "lo", "up")
    if run("ip", "-n", host.ns, "link", "show", "eth0", check=False).returncode:
        run("ip", "link", "del", host.veth, check=False)  # an end whose namespace is gone
        run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
            "netns", host.ns)
    run("ip", "addr", "replace", f"198.18.{host.number}.1/24", "dev", host.veth)
    run("ip", "link", "set", host.veth, "up")
    run("ip", "-n", host.ns, "addr", "replace", f"{host.address}/24", "dev", "eth0")
    run("ip", "-n", host.ns, "link", "set", "eth0", "up")


def setup_account(host, client_key):
    """Create the deploy account, which may log in with the lab's client key."""
    if not account_exists(host.user):
        run("useradd", "-m", "-s", "/bin/bash", host.user)
        run("usermod", "-p", "*", host.user)  # useradd's '!' means locked to sshd sans PAM
    account = pwd.getpwnam(host.user)
    ssh_dir = Path(account.pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    # Add the lab's key, keeping every other line: qabox's tester keys live here too.
    lines = keys.read_text().splitlines() if keys.exists() else []
    if client_key not in lines:
        write_if_changed(keys, "\n".join([client_key] + lines) + "\n", 0o600)
    for path in (ssh_dir, keys):
        os.chown(path, account.pw_uid, account.pw_gid)


def bring_up(host, client_key):
    """Make one host reachable over SSH; return True if sshd had to be (re)started."""
    ensure_key(host.hostkey, f"qabox-{host.name}")
    if host.local_port:
        write_if_changed(LAB / "keys" / "authorized_keys", client_key + "\n", 0o600)
    else:
        setup_netns(host)
        setup_account(host, client_key)
    restart = write_if_changed(host.dir / "sshd_config", sshd_config(host)) or not sshd_pid(host)
    if restart:
        stop_sshd(host)
        start_sshd(host)
    wait_port(host)
    return restart


def tear_down(host, system=True):
    """Remove everything of one host except its host key; without system, only stop its sshd."""
    stop_sshd(host)
    if not (IS_ROOT and system):
        return
    has_netns, has_account = Path("/run/netns", host.ns).exists(), account_exists(host.user)
    pids = set()
    if has_account:  # like pkill -KILL -u, but we also wait for them to die
        pids.update(run("pgrep", "-u", host.user, check=False).stdout.split())
    if has_netns:
        pids.update(run("ip", "netns", "pids", host.ns, check=False).stdout.split())
    if not kill_all(sorted(map(int, pids))):
        raise LabError(f"{host.name}: processes survived SIGKILL: {' '.join(sorted(pids))}")
    run("ip", "link", "del", host.veth, check=False)
    if has_netns:
        run("ip", "netns", "del", host.ns)
    if has_account:
        run("crontab", "-r", "-u", host.user, check=False)  # userdel leaves it, owned by a uid that goes
        run("userdel", "-r", host.user)


def free_port():
    """Find a free TCP port on 127.0.0.1 for the non-root sshd, starting at 2222."""
    for port in range(FIRST_LOCAL_PORT, FIRST_LOCAL_PORT + 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise LabError(f"no free port in {FIRST_LOCAL_PORT}-{FIRST_LOCAL_PORT + 99}")


def write_client_files(hosts):
    """Write ssh_config and known_hosts, which trust exactly the host keys the lab made."""
    config, known = [], []
    for host in hosts:
        config.append(f"Host {host.name}\n  HostName {host.address}\n  Port {host.port}\n"
                      f"  User {host.user}\n  IdentityFile {DEPLOY_KEY}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {LAB / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
        pattern = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        known.append(f"{pattern} {ensure_key(host.hostkey, f'qabox-{host.name}')}\n")
    write_if_changed(LAB / "known_hosts", "".join(known))
    write_if_changed(LAB / "ssh_config", "\n".join(config))


@contextmanager
def locked():
    """Serialize up/down, since parallel test workers may all call `up` at once."""
    LAB.mkdir(parents=True, exist_ok=True)
    with open(LAB / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def machine_locked(timeout=60.0):
    """Serialize picking slots across every lab on this machine, chroots included:
    an abstract unix socket's name is shared by the whole network namespace."""
    with socket.socket(socket.AF_UNIX) as sock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.bind("\0qabox-lab-slots")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise LabError("another lab's `up` held the slot lock too long") from None
                time.sleep(0.1)
        yield



def up(hosts=1):
    """Start lab1..labN, keeping further hosts that are up: [(host, whether sshd was
    (re)started)]."""
    if hosts > 1 and not IS_ROOT:
        raise LabError("more than one host needs root (one network namespace per host)")
    check_privileges()
    with locked():
        ensure_tools()
        client_key = ensure_key(DEPLOY_KEY, "qabox-lab-deploy")
        old = lab_hosts()
        if IS_ROOT:
            with machine_locked():
                slot = pick_slot(load_state())
                save_state("netns", len(old), slot)  # first, so `down` finds a half-made lab
                made = [Host(i, slot=slot) for i in range(1, max(hosts, len(old)) + 1)]
                started = [bring_up(host, client_key) for host in made]
                save_state("netns", len(made), slot)
        else:
            port = old[0].local_port if old and sshd_pid(old[0]) else free_port()
            made = [Host(1, port)]
            started = [bring_up(made[0], client_key)]
            save_state("local", 1, port=port)
        write_client_files(made)
    return list(zip(made, started))


def down():
    """Stop every lab host; keep the keys and host keys so known_hosts stays valid."""
    check_privileges()
    with locked():
        # Without a record of this lab's slot, its kernel-wide names may be another
        # lab's: then stop only the sshds whose pidfiles are here.
        state = load_state()
        slot = state.get("slot", 0) if state else env_slot()
        for index in range(1, MAX_HOSTS + 1):
            tear_down(Host(index, slot=slot or 0), system=slot is not None)
        for path in (STATE, LAB / "ssh_config", LAB / "known_hosts"):
            path.unlink(missing_ok=True)
