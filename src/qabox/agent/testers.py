"""Testers: their keys in authorized_keys, their ports, their sessions.

A tester's public key goes into the deploy account's authorized_keys with
OpenSSH's restrictions: no shell, no command but the agent's tester-session,
and port forwarding only to the tester's own ports, one per env of their scope
(see ``access``). The app's supervisor listens on those ports too, so the
access log can name the tester.
"""

import fcntl
import glob
import os
import re
import signal
import sys

from . import access, agents, control
from .envs import START_TIMEOUT, Env, all_envs
from .files import iso, makedirs, now, read_json, write_json, write_text
from .procs import STOP_TIMEOUT, own_pids, pid_alive, proc_stat
from .protocol import Fail
from .rules import ENV_NAME, check_sshd
from .sockets import free_port, tcp_sockets


TESTER_MARK = " qabox-tester:"
PUBKEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com|"
                    r"sk-ecdsa-sha2-nistp256@openssh\.com) ([A-Za-z0-9+/]+={0,3})(?: [^\r\n]*)?")
FIRST_TESTER_PORT = 18080
MAX_SESSIONS = 8  # open tunnels per tester: a few machines each, not a flood


def testers_file(base: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "testers.json")


def read_testers(base: str) -> dict:
    """The tester store: ``{"testers": {name: tester}, "retired_ports": [...]}``,
    kept in testers.json and retired-ports.json (older agents read the first).

    A store that exists but cannot be read is an error, never "no testers":
    rewriting authorized_keys from it would drop every tester's key.
    """
    path = testers_file(base)
    testers = read_json(path) if os.path.lexists(path) else {}
    retired = read_json(path.replace("testers.json", "retired-ports.json"), [])
    if not (isinstance(testers, dict) and isinstance(retired, list)
            and all(access.well_formed(t) for t in testers.values())):
        raise Fail("bad_state", "%s is not a readable tester list: restore it from a backup, or "
                   "move it away and add the testers again (their keys stay in authorized_keys "
                   "until then)" % path)
    return {"testers": testers, "retired_ports": retired}


def load_testers(base: str) -> dict:
    return read_testers(base)["testers"]


def tester_ports(env: Env) -> dict:
    """Each tester's own port for this env, except an expired tester's: it stays
    theirs (``extend`` brings it back) but is not served."""
    at = now()
    return {name: t["ports"][env.name] for name, t in load_testers(env.base).items()
            if env.name in t.get("ports", {}) and not access.expired(t, at)}


def next_expiry(env: Env) -> "float | None":
    """When the next of this env's testers expires: its supervisor stops
    serving their port then (and closes the connections open to it)."""
    at = now()
    times = [access.expires_at(t) for t in load_testers(env.base).values() if env.name in t.get("ports", {})]
    return min([t for t in times if t is not None and t > at], default=None)


class TestersLock:
    """Serialises edits of testers.json and authorized_keys on this host."""

    def __init__(self, base: str):
        makedirs(os.path.abspath(os.path.expanduser(base)))
        self.fd = os.open(testers_file(base) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def ssh_connections() -> list:
    """``[pid, start time]`` of this account's sshd processes: its SSH
    connections open now, any of which may hold a forward to a tester's port."""
    found = []
    for pid in own_pids():
        stat = proc_stat(pid)
        if stat and stat[0].startswith("sshd"):
            found.append([pid, int(stat[1][19])])
    return found


def retire(ports) -> list:
    """Retired ports, each with the SSH connections open when it was retired:
    it is not given to anyone again while one of them lasts (a removed tester's
    ``ssh -N`` keeps its forward to it, and sshd cannot tell us whose it is)."""
    now_open = ssh_connections()
    return [{"port": port, "sshd": now_open} for port in sorted(ports)]


def allocate_tester_ports(base: str, store: dict) -> bool:
    """Give every tester a port of their own in every env of their scope, and
    retire the ports of envs deleted or out of it. True if any changed.

    A retired port is given again only once every SSH connection that was open
    when it was retired has ended (see ``retire``).
    """
    base = os.path.abspath(os.path.expanduser(base))
    testers = store["testers"]
    alive = {tuple(c) for c in ssh_connections()}
    store["retired_ports"] = [r for r in store["retired_ports"] if isinstance(r, dict)
                              and isinstance(r.get("port"), int)
                              and alive & {tuple(c) for c in r.get("sshd") or []}]
    taken = {Env(base, e).settings(strict=False).get("port") for e in all_envs(base)}
    taken.update(r["port"] for r in store["retired_ports"])
    for t in testers.values():
        taken.update(t.get("ports", {}).values())
    changed = False
    envs = set(all_envs(base))
    for name in sorted(testers):
        ports = testers[name].setdefault("ports", {})
        mine = access.in_scope(testers[name], envs)
        gone = [env for env in ports if env not in mine]  # envs deleted or out of scope since
        if gone:
            store["retired_ports"] += retire(ports.pop(env) for env in gone)
            changed = True
        for env in sorted(mine):
            if env not in ports:
                ports[env] = free_port(FIRST_TESTER_PORT, taken)
                taken.add(ports[env])
                changed = True
    return changed


def give_ports(base: str) -> None:
    """Ports for every tester in a new env (a deploy calls this)."""
    with TestersLock(base):
        store = read_testers(base)
        if allocate_tester_ports(base, store):
            store_testers(base, store)  # the new env's supervisor binds them as it starts


SAFE_PATH = re.compile(r"[A-Za-z0-9._/+-]+")
LINE_BASE = re.compile(r'tester-session (\S+) [^ "]+"')


def authorized_line(base: str, name: str, tester: dict) -> str:
    """The tester's key line: a tunnel to their own ports and nothing else.

    ``restrict`` takes everything away; ``port-forwarding`` gives back local
    *and* remote forwarding, so ``permitlisten`` names a port the account can
    never bind, and ``permitopen`` the tester's own ports. (Unix-socket
    forwards cannot be refused per key: see ``peer_pid`` for why that is safe.)
    ``expiry-time`` has sshd refuse the key after the tester's expiry.
    """
    options = ["restrict"]
    stamp = tester.get("expiry_time")
    if stamp is not None:
        if not access.EXPIRY_TIME.fullmatch(stamp):
            raise Fail("bad_state", "tester %s's expiry %r is not a time: set it again with "
                       "qabox testers extend" % (name, stamp))
        options.append('expiry-time="%s"' % stamp)
    ports = sorted(tester.get("ports", {}).values())
    if ports:
        options += ["port-forwarding", 'permitlisten="127.0.0.1:1"']
        options += ['permitopen="127.0.0.1:%d"' % port for port in ports]
    words = [sys.executable, agents.entry(), os.path.abspath(os.path.expanduser(base))]
    for word in words:
        if not SAFE_PATH.fullmatch(word):
            raise Fail("bad_path", "%r cannot go into a forced command: use a directory and a "
                       "python whose paths have only letters, digits and . _ / + -" % word)
    options.append('command="%s %s tester-session %s %s"' % (words[0], words[1], words[2], name))
    return "%s %s%s%s" % (",".join(options), tester["key"], TESTER_MARK, name)


def write_authorized_keys(base: str, testers: dict) -> bool:
    """Rewrite this base's tester lines atomically, leaving every other line
    (the deploy account's own keys, testers of another base) as it was.
    True if the file changed."""
    ssh_dir = makedirs(os.path.expanduser("~/.ssh"))
    path = os.path.join(ssh_dir, "authorized_keys")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    here = os.path.abspath(os.path.expanduser(base))

    def ours(line: str) -> bool:
        found = LINE_BASE.search(line) if TESTER_MARK in line else None
        return bool(found) and found.group(1) == here

    kept = [line for line in lines if not ours(line)]
    mine = [authorized_line(base, name, testers[name]) for name in sorted(testers)]
    if mine:
        agents.point_entry(switch=False)  # the lines name it: it must lead to an agent
    if kept + mine == lines:
        return False
    write_text(path, "\n".join(kept + mine) + "\n")  # 0600, as sshd wants it
    return True


def point_keys_at_entry(base: str) -> bool:
    """Have this base's tester keys run the agent's stable entry (an upgrade
    from an agent that named its own file). True if authorized_keys changed."""
    with TestersLock(base):
        return write_authorized_keys(base, load_testers(base))


def store_testers(base: str, store: dict) -> None:
    write_json(testers_file(base).replace("testers.json", "retired-ports.json"), store["retired_ports"])
    write_json(testers_file(base), store["testers"])
    write_authorized_keys(base, store["testers"])


def save_testers(base: str, store: dict) -> None:
    """Store the testers and have every running app serve their ports."""
    store_testers(base, store)
    for env in all_envs(base):  # hand the new ports to running apps
        env = Env(base, env)
        try:
            if control.supervisor_ping(env):
                control.ensure_supervisor(env)  # one of an older agent would not know the command
                control.supervisor_call(env, {"cmd": "testers"}, timeout=START_TIMEOUT + STOP_TIMEOUT + 10)
        except (Fail, OSError):
            pass  # that env's app gets the ports at its next start; the key is in place


def key_fingerprint(key: str) -> str:
    import base64
    import hashlib

    blob = base64.b64decode(key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def set_expiry(tester: dict, req) -> None:
    """The tester's ``expires`` (ISO UTC or None) from the request, and the
    ``expiry-time`` value for this host's sshd."""
    when = access.parse_expires(req.get("expires"), now())
    tester["expires"] = iso(when)
    tester["expiry_time"] = None if when is None else access.expiry_time(when, req.get("sshd"))


def cmd_tester_add(req, io) -> dict:
    """Add a tester, or change their key, scope (``envs``: names, or None for
    every env) and expiry (``expires``: ISO UTC, or None for never)."""
    name, key = req["name"], " ".join(req["key"].split()[:2])
    if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
        raise Fail("bad_name", "tester name %r is not allowed: use a-z, 0-9, - and _" % name)
    if not PUBKEY.fullmatch(req["key"].strip()):
        raise Fail("bad_key", "that is not an OpenSSH public key line (type, base64 key, comment)")
    check_sshd(req.get("sshd"))
    scope = access.check_envs(req.get("envs"), all_envs(req["base"]))
    wanted = {"envs": scope}
    set_expiry(wanted, req)
    with TestersLock(req["base"]):
        try:
            with open(os.path.expanduser("~/.ssh/authorized_keys")) as f:
                unrestricted = [line for line in f if key.split()[1] in line and TESTER_MARK not in line]
        except FileNotFoundError:
            unrestricted = []
        if unrestricted:
            raise Fail("key_in_use", "this key already logs in to the deploy account without "
                       "restrictions: give the tester a key of their own")
        store = read_testers(req["base"])
        testers = store["testers"]
        for other, t in testers.items():
            if t["key"] == key and other != name:
                raise Fail("key_in_use", "this key is tester %s's already" % other)
        old = testers.get(name, {})
        same = old.get("key") == key and all(old.get(k) == v for k, v in wanted.items())
        if old.get("key") != key:
            old = {"key": key, "fingerprint": key_fingerprint(key), "added_at": iso(now()),
                   "added_by": req.get("by"), "ports": old.get("ports", {})}
        testers[name] = dict(old, **wanted)
        allocate_tester_ports(req["base"], store)
        save_testers(req["base"], store)  # unchanged or not, make sure every app listens
        t = testers[name]
    return {"name": name, "fingerprint": t["fingerprint"], "ports": t["ports"], "envs": t["envs"],
            "expires": t["expires"], "changed": not same}


def cmd_tester_extend(req, io) -> dict:
    """Change only a tester's expiry (``expires``: ISO UTC, or None for never)."""
    check_sshd(req.get("sshd"))
    with TestersLock(req["base"]):
        store = read_testers(req["base"])
        tester = store["testers"].get(req["name"])
        if tester is None:
            raise Fail("no_tester", "there is no tester %r on this host" % req["name"])
        before = tester.get("expires")
        set_expiry(tester, req)
        save_testers(req["base"], store)  # the supervisors serve an expired tester's ports again
    return {"name": req["name"], "expires": tester["expires"], "changed": tester["expires"] != before}


def cmd_tester_remove(req, io) -> dict:
    """Take a tester's key out, close their ports (never given again) and end
    their open sessions: an open SSH connection outlives its key."""
    with TestersLock(req["base"]):
        store = read_testers(req["base"])
        gone = store["testers"].pop(req["name"], None)
        if gone is None:
            raise Fail("no_tester", "there is no tester %r on this host" % req["name"])
        store["retired_ports"] += retire(gone.get("ports", {}).values())
        save_testers(req["base"], store)
    ended = 0
    for record in connected(req["base"]):
        if record["name"] == req["name"]:
            ended += end_connection(record["pid"])
    return {"changed": True, "disconnected": ended}


def cmd_tester_list(req, io) -> dict:
    base, at = req["base"], now()
    online = connected(base)
    return {"testers": [
        {"name": name, "fingerprint": t["fingerprint"], "ports": t.get("ports", {}),
         "envs": t.get("envs"), "expires": t.get("expires"), "expired": access.expired(t, at),
         "added_at": t.get("added_at"), "added_by": t.get("added_by"),
         "connected": [c for c in online if c["name"] == name]}
        for name, t in sorted(load_testers(base).items())]}


def connected(base: str) -> list:
    """Testers connected now, one entry per SSH connection: those whose tunnel's
    session is open, or whose session ended while its SSH connection lasts (the
    tunnel opens its session again), and those with a connection open to one
    of their ports (``ssh -N`` opens no session). An entry's ``pid`` is a
    process of its connection: its session's, or else its sshd's."""
    by_connection = {}
    for record in session_records(base):
        live, sshd = pid_alive(record.get("pid")), record.get("sshd")
        if not live and not (sshd and connection_alive(sshd)):
            continue
        record = dict(record, session=live) if live else dict(record, pid=sshd[0], session=False)
        key = tuple(sshd) if isinstance(sshd, list) else record.pop("path")
        if key not in by_connection or not by_connection[key]["session"]:
            by_connection[key] = record  # a connection's open session over its ended ones
    result = sorted(({k: v for k, v in r.items() if k != "path"} for r in by_connection.values()),
                    key=lambda r: (r["name"], r.get("since") or "", r["pid"]))
    in_use = {port for port, kind, _ in tcp_sockets() if kind == "01"}
    seen = {r["name"] for r in result}
    for name, tester in sorted(load_testers(base).items()):
        if name not in seen and in_use & set(tester.get("ports", {}).values()):
            result.append({"name": name, "from": "a forward without a session", "since": None,
                           "session": False})
    return result


def session_records(base: str) -> list:
    """The records tester sessions keep in ``connected/``, each with its ``path``."""
    folder = os.path.join(os.path.abspath(os.path.expanduser(base)), "connected")
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        record = read_json(path)
        if isinstance(record, dict) and record.get("name"):
            records.append(dict(record, path=path))
    return records


def connection_of(pid):
    """``[pid, start time]`` of the sshd process that pid runs under (its SSH
    connection, whose forwards outlive a killed session), or None."""
    while pid and pid > 1:
        stat = proc_stat(pid)
        if stat is None:
            return None
        if stat[0].startswith("sshd"):
            return [pid, int(stat[1][19])]
        pid = int(stat[1][1])  # the parent
    return None


def connection_alive(sshd) -> bool:
    """Whether that sshd process still runs (the same one: its start time matches)."""
    stat = proc_stat(sshd[0]) if isinstance(sshd, list) and len(sshd) == 2 else None
    return stat is not None and stat[1][0] not in "ZX" and int(stat[1][19]) == sshd[1]


def end_connection(pid: int) -> bool:
    """End the SSH connection a tester's session runs under (its sshd process):
    taking their key out of authorized_keys ends no connection already open."""
    found = connection_of(pid)
    if found is None:
        return False
    try:
        os.kill(found[0], signal.SIGTERM)
        return True
    except OSError:
        return False


def connected_testers(env: Env) -> list:
    ports = tester_ports(env)
    return [c for c in connected(env.base) if c["name"] in ports]


def tester_requests(env: Env, name: str) -> int:
    """Requests a tester made to the current release, from its access log."""
    release = env.current()
    if not release:
        return 0
    prefix = (name + " - - [").encode()
    count = 0
    for path in glob.glob(env.path("logs", release + ".log*")):
        with open(path, "rb") as f:
            count += sum(1 for line in f if line.startswith(prefix))
    return count


def expired_now(base: str, name: str) -> bool:
    """Whether the tester is past their expiry, as the store says now (an
    ``extend`` or a new ``add`` since counts); an unreadable store says no."""
    try:
        tester = load_testers(base).get(name)
    except Fail:
        return False
    return tester is not None and access.expired(tester, now())


def tester_session(base: str, name: str, io) -> int:
    """The forced command of a tester's key: say which ports are theirs, count
    them as connected while the tunnel is open, and pass on deploy notices.

    Its record names its SSH connection too: should the session end otherwise
    than by qabox leaving (killed, say), the record counts the tester as
    connected while that connection lasts, and the session the tunnel opens
    again on it takes the record's place.

    At the tester's expiry it ends its own SSH connection (the tunnel's
    forwards go with it): sshd refuses the key only to new logins. An
    ``ssh -N`` tester has no session; their env's supervisor stops serving
    their port then and closes what was open to it (``next_expiry``).
    """
    testers = load_testers(base)
    if name not in testers:
        io.emit({"ok": False, "error": {"code": "no_tester", "message": "tester %s was removed" % name}})
        return 1
    if access.expired(testers[name], now()):
        io.emit({"ok": False, "error": {"code": "expired", "message": "tester %s's access expired at %s: "
                                        "ask for it to be extended" % (name, testers[name]["expires"])}})
        return 1
    mine = connection_of(os.getpid())
    open_now = [c for c in connected(base) if c["name"] == name and (mine is None or c.get("sshd") != mine)]
    if len(open_now) >= MAX_SESSIONS:
        io.emit({"ok": False, "error": {"code": "too_many_sessions", "message":
                 "tester %s has %d tunnels open already: close one first" % (name, len(open_now))}})
        return 1
    folder = makedirs(os.path.join(os.path.abspath(os.path.expanduser(base)), "connected"))
    record_path = os.path.join(folder, "%s-%d.json" % (name, os.getpid()))
    origin = (os.environ.get("SSH_CONNECTION") or "local").split()[0]
    since = iso(now())
    for old in session_records(base):  # ended sessions: of this connection, or of none still open
        if old["path"] != record_path and not pid_alive(old.get("pid")) and (
                old.get("sshd") == mine or not (old.get("sshd") and connection_alive(old["sshd"]))):
            if mine is not None and old.get("sshd") == mine:
                since = min(since, old.get("since") or since)  # the tunnel's, not this session's
            try:
                os.unlink(old["path"])
            except OSError:
                pass
    write_json(record_path, {"name": name, "from": origin, "since": since, "pid": os.getpid(), "sshd": mine})
    try:
        ports = testers[name].get("ports", {})
        seen = {env: Env(base, env).current() for env in ports}
        io.emit({"ok": True, "changed": False, "data": {"tester": name, "envs": {
            env: dict(release_by(base, env, seen[env]), port=port) for env, port in ports.items()}}})
        while not io.gone.wait(1.0):
            if expired_now(base, name):
                end_connection(os.getpid())
                return 1
            for env in ports:
                release = Env(base, env).current()
                if release != seen[env]:
                    seen[env] = release
                    io.emit({"notice": dict(release_by(base, env, release), env=env)})
    finally:
        if io.gone.is_set():  # qabox left; else the record lasts as long as its connection
            os.unlink(record_path)
    return 0


def release_by(base: str, env: str, release) -> dict:
    """An env's release and who deployed it, as a session tells the tunnel."""
    info = Env(base, env).release_info(release) if release else {}
    return {"release": release, "by": info.get("deployed_by")}


def cmd_tester_session(req, io) -> None:
    """The same session, asked for with the deploy account's own key."""
    tester_session(req["base"], req["name"], io)
    return None
