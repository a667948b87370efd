"""A tester's presence on the host: who counts as connected, and the session's heartbeats.

The tunnel end to end (a killed session, an idle one) is in tests/test_tunnel.py;
these are the two mechanisms it rests on, with real processes and sockets.
"""

from __future__ import annotations

import io
import socket
import subprocess

from qabox.agent import protocol, testers
from qabox.agent.files import write_json
from qabox.agent.procs import proc_stat
from qabox.remote import Session


def process_id(proc: subprocess.Popen) -> list:
    """``[pid, start time]``, as a session's record names its SSH connection."""
    return [proc.pid, int(proc_stat(proc.pid)[1][19])]


def test_a_connection_counts_once_and_while_it_lasts(tmp_path):
    base = str(tmp_path)
    connection, session = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        def record(file: str, name: str, pid: int, sshd: list) -> None:
            write_json(str(tmp_path / "connected" / file), {"name": name, "from": "198.51.100.7",
                                                            "since": "2026-01-02T03:04:05Z", "pid": pid, "sshd": sshd})

        (tmp_path / "connected").mkdir()
        # its session was killed: the tunnel is up, opening another
        record("ann-1.json", "ann", ended.pid, process_id(connection))
        # a pid taken by another process since is not that connection
        record("bob-1.json", "bob", ended.pid, [connection.pid, process_id(connection)[1] + 1])
        assert testers.connected(base) == [{"name": "ann", "from": "198.51.100.7", "since": "2026-01-02T03:04:05Z",
                                            "pid": connection.pid, "sshd": process_id(connection), "session": False}]
        record("ann-2.json", "ann", session.pid, process_id(connection))  # the session is back
        assert [(c["name"], c["pid"], c["session"]) for c in testers.connected(base)] == [("ann", session.pid, True)]
        connection.kill()
        connection.wait()
        session.kill()
        session.wait()
        assert testers.connected(base) == []
    finally:
        for proc in (connection, session):
            proc.kill()
            proc.wait()


def test_heartbeats_keep_a_quiet_session_open(monkeypatch):
    """The agent ends a session it hears nothing from for SESSION_IDLE seconds
    (a dead client); the client's heartbeats are what keep an idle tunnel's open."""
    monkeypatch.setattr(protocol, "SESSION_IDLE", 0.5)
    monkeypatch.setattr(Session, "HEARTBEAT", 0.05)
    quiet, silent = socket.socketpair()
    beating, heard = socket.socketpair()
    try:
        unheard, alive = protocol.Stream(io.StringIO(), silent), protocol.Stream(io.StringIO(), heard)
        heartbeat = Session(None, beating)
        assert unheard.gone.wait(10)  # nothing for SESSION_IDLE: taken for gone
        assert not alive.gone.is_set()  # heard from all along, as long
        heartbeat.close()
        assert alive.gone.wait(10)
        assert alive.inbox.get(timeout=1) is None  # heartbeats are no requests
    finally:
        for sock in (quiet, silent, beating, heard):
            sock.close()
