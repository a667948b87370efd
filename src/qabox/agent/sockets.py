"""Sockets: loopback ports, who holds them, fd passing, peer checks, probes."""

import array
import errno
import json
import os
import socket
import struct
import time

from .agents import agent_args
from .procs import own_pids
from .protocol import Fail


def http_probe(port: int, path: str, timeout: float = 2.0) -> dict:
    """GET path on the loopback: the HTTP code and milliseconds, or the error.

    Only the status line is read, over a plain socket: http.client (and the
    email and ssl modules it imports) would double the cost of a status call.
    """
    start = time.monotonic()
    request = "GET %s HTTP/1.0\r\nHost: 127.0.0.1:%d\r\nUser-Agent: qabox-health\r\n\r\n" % (path, port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(request.encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
    except OSError as e:
        return {"code": None, "error": str(e) or type(e).__name__}
    words = head.split(b"\r\n", 1)[0].split()
    if len(words) < 2 or not words[0].startswith(b"HTTP/") or not words[1].isdigit():
        return {"code": None, "error": "not an HTTP answer: %r" % head[:60]}
    return {"code": int(words[1]), "ms": round((time.monotonic() - start) * 1000, 1)}


def port_is_free(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", int(port)))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def free_port(start: int, taken: set) -> int:
    for port in range(start, start + 1000):
        if port not in taken and port_is_free(port):
            return port
    raise Fail("port_in_use", "no free port from %d to %d on the host" % (start, start + 999))


def tcp_sockets() -> list:
    """(local port, state, inode) of every TCP socket in this network namespace,
    whoever owns it (/proc/net/tcp{,6}); state "0A" is listening, "01" open."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            found.append((int(fields[1].rsplit(":", 1)[1], 16), fields[3], int(fields[9])))
    return found


def socket_inodes(pid) -> set:
    """The inodes of the sockets a process of ours holds open."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    except (OSError, TypeError):
        pass
    return inodes


def holder(inode: int) -> str:
    """Which process holds a socket, as far as this account can see."""
    for pid in own_pids():
        if inode in socket_inodes(pid):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                command = "?"
            return "pid %s (%s)" % (pid, command[:80])
    return "a process qabox cannot inspect (an SSH session's forward?)"


def peer_pid(sock: socket.socket) -> int:
    """The pid at the other end of a unix socket, as the kernel saw it
    (SO_PEERCRED); 0 when it runs as another user.

    Why: a tester's key cannot be kept from ``ssh -R /path/ctl.sock:...``
    (unix-socket forwards can only be switched off in sshd_config), so the
    socket at a path may be sshd's, not ours: each end checks who the other is.
    """
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                       struct.calcsize("3i")))
    return pid if uid == os.getuid() else 0


def foreign_peer(sock: socket.socket, pid: int = 0, role: list = ()):
    """None when the peer is the process qabox started (``pid`` exactly, or
    else an agent whose arguments start with ``role``); otherwise what it is."""
    peer = peer_pid(sock)
    if pid:
        ok = peer == pid
    else:
        args = agent_args(peer) if peer else None
        ok = args is not None and args[:len(role)] == list(role)
    return None if ok else ("pid %d" % peer if peer else "a process of another user")


def expect_peer(sock: socket.socket, what: str, pid: int = 0, role: list = ()) -> None:
    """Connected to ``what``: talk on only if qabox started the other end."""
    foreign = foreign_peer(sock, pid, role)
    if foreign:
        raise Fail("foreign_socket", "%s is held by %s, which qabox did not start: refused; "
                   "`qabox hosts check` says how to stop testers from making such sockets"
                   % (what, foreign))


def recv_line(sock: socket.socket) -> bytes:
    """One JSON line from a control socket (empty if the peer closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def probe_listener() -> socket.socket:
    """A listening socket on a loopback port the kernel picks: an app process's
    own, for its supervisor's health probes only."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    probe.listen(64)
    return probe


def bind_listener(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as e:
        listener.close()
        if e.errno == errno.EADDRINUSE:
            raise Fail("port_in_use", "port %d is already in use on the host's loopback by another "
                       "program: stop it, or deploy with --port N" % port)
        if e.errno == errno.EACCES:
            raise Fail("port_privileged", "port %d is privileged on the host (below %s, only root may "
                       "listen there): deploy with a --port of 1024 or more" % (port, privileged_below()))
        raise
    listener.listen(128)
    return listener


def privileged_below() -> str:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return f.read().strip()
    except OSError:
        return "1024"


def listening_port(pid: int, fd):
    """The local port of a process's TCP socket: the probe port of an adopted app."""
    try:
        link = os.readlink("/proc/%d/fd/%d" % (pid, fd))  # socket:[INODE]
    except (OSError, TypeError):
        return None
    return next((port for port, _, inode in tcp_sockets() if link == "socket:[%d]" % inode), None)


def fd_port(fd: int) -> int:
    """The port a listening socket (by its file descriptor) is bound to."""
    sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a dup, closed below
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def send_fds(sock: socket.socket, fds: dict, **message) -> None:
    """Send a JSON message with named file descriptors over a unix socket."""
    names = sorted(fds)
    payload = json.dumps(dict(message, names=names)).encode()
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                array.array("i", [fds[n] for n in names]).tobytes())] if names else []
    sock.sendmsg([payload], ancdata)


def recv_fds(sock: socket.socket) -> tuple:
    """(message, {name: fd}) as send_fds sent them."""
    size = array.array("i").itemsize
    payload, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_LEN(64 * size))
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % size])
    message = json.loads(payload.decode()) if payload else {}
    if isinstance(message, list):  # an app of an older agent sends just the names
        message = {"names": message}
    names = message.get("names", [])
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise OSError("expected %d file descriptors, got %d" % (len(names), len(fds)))
    return message, dict(zip(names, fds))
