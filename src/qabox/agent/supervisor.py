"""The supervisor: one per env, it owns the listening sockets and the app process."""

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from . import agents
from .appenv import app_environ, venv_python
from .control import app_request, env_apps, stop_accepting
from .envs import START_TIMEOUT, Env, link_current
from .errors import with_traceback
from .files import is_port, iso, makedirs, now, rotate, tail, write_json
from .procs import STOP_TIMEOUT, pid_alive, process_started, stop_group
from .protocol import Fail
from .rules import DEFAULT_HEALTH_STATUS, DEFAULT_SERVER, RELEASE_FILE, WARMING_UP, health_codes, is_up
from .session import deploying
from .sockets import bind_listener, fd_port, foreign_peer, http_probe, listening_port, probe_listener, recv_line
from .spare import Spare, handed_path, modules_file
from .testers import next_expiry, tester_ports


class AppProcess:
    """One app process serving a release: started by this supervisor, or adopted."""

    STEADY_FAILURE = 3.0  # seconds of nothing but wrong answers that fail a start

    def __init__(self, env: Env, release: str, pid: int, probe_port: int, started_at: float, proc=None):
        self.env = env
        self.release = release
        self.pid = pid
        self.probe_port = probe_port
        self.started_at = started_at
        self.proc = proc
        info = env.release_info(release)
        self.health = info.get("health", "/")
        self.health_status = info.get("health_status") or DEFAULT_HEALTH_STATUS
        self.health_codes = health_codes(self.health_status)
        self.server = info.get("server") or DEFAULT_SERVER
        self.log_path = env.path("logs", release + ".log")

    @classmethod
    def plan(cls, env: Env, release: str, sockets: dict, live: bool) -> tuple:
        """How a process of a release starts: (its python, its spec but for the
        probe socket's fd, its environment)."""
        info = env.release_info(release, strict=True)
        if not (info.get("entry") and info.get("venv")):
            raise Fail("no_release", "release %s is not complete on the host (no %s in %s): deploy again, "
                       "or roll back to another release" % (release, RELEASE_FILE, env.release_dir(release)))
        spec = {
            "release_dir": env.release_dir(release),
            "entry": info["entry"],
            "static": info.get("static") or {},
            "server": info.get("server") or DEFAULT_SERVER,
            "server_options": info.get("server_options") or {},
            "sockets": sockets,
            "probe_fd": None,
            "live": live,
            "ctl_dir": env.path("run"),
            "base": env.base,
            "env": env.name,
        }
        return venv_python(env, info), spec, app_environ(env, release, info)

    @classmethod
    def spawn(cls, env: Env, release: str, sockets: dict, live: bool, spare: "Spare | None" = None) -> "AppProcess":
        """Start ``agent-<hash>.pyz serve`` for a release with the env's sockets:
        ``sockets[""]`` is the main port, the others testers' own ports. A
        spare that fits is handed the release instead; one that does not is ended."""
        python, spec, environ = cls.plan(env, release, sockets, live)
        makedirs(env.path("run"))
        log_path = env.path("logs", release + ".log")
        if spare is not None:
            if spare.fits(python, spec, environ) and spare.ready():
                try:
                    proc = spare.hand(spec, environ, log_path)
                    return cls(env, release, proc.pid, spare.probe_port, now(), proc)
                except OSError:  # it died meanwhile
                    pass
            spare.end()
        probe = probe_listener()
        probe_port = probe.getsockname()[1]
        spec["probe_fd"] = probe.fileno()
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                [python, agents.archive(), "serve", json.dumps(spec)],
                cwd=spec["release_dir"], env=environ,
                pass_fds=list(sockets.values()) + [probe.fileno()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        finally:
            os.close(log)
            probe.close()
        return cls(env, release, proc.pid, probe_port, now(), proc)

    @classmethod
    def adopt(cls, env: Env, found: dict):
        """Take over an app of the env that no supervisor runs (as env_apps found
        it, whatever state.json says); returns (app, its sockets)."""
        pid = found["pid"]
        _, fds = app_request(env, pid, {}, cmd="sockets")
        probe_port = listening_port(pid, found["probe_fd"])
        if probe_port is None or "" not in fds:
            for fd in fds.values():
                os.close(fd)
            raise OSError("app %d does not show its sockets" % pid)
        return cls(env, found["release"], pid, probe_port, process_started(pid)), fds

    def poll(self):
        """The exit code once the process has ended (-1 if adopted and unknown), else None."""
        if self.proc is not None:
            return self.proc.poll()
        return None if pid_alive(self.pid) else -1

    def healthy(self, timeout: float = 2.0) -> dict:
        return http_probe(self.probe_port, self.health, timeout)

    def up(self, code) -> bool:
        """Whether a probe's HTTP code means up for this release (its health_status)."""
        return is_up(self.health_codes, code)

    def wait_healthy(self, timeout: float) -> dict:
        """Probe until the app is up, exits, answers nothing but a wrong code (a
        500, a 400; not 502-504, a proxy's "still starting") for STEADY_FAILURE
        seconds, or the time is up. The result's ``up`` says which."""
        deadline = time.monotonic() + timeout
        result = {"code": None, "error": "no answer within %.0f s" % timeout}
        wrong_since = None
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return {"code": None, "error": "exited with code %s" % self.poll(), "exited": True}
            probe = self.healthy(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            code = probe.get("code")
            if self.up(code):
                return dict(probe, up=True)
            if code is not None:
                result = dict(probe, error="health check answered HTTP %d until the start timeout of %.0f s "
                                           "(up is %s)" % (code, timeout, self.health_status))
                if code in WARMING_UP:
                    wrong_since = None
                else:
                    wrong_since = wrong_since or time.monotonic()
                    if time.monotonic() - wrong_since >= self.STEADY_FAILURE:
                        return dict(probe, error="health check answered HTTP %d on every probe for %.0f s "
                                                 "(up is %s)" % (code, self.STEADY_FAILURE, self.health_status))
            time.sleep(0.1)
        return result

    def go_live(self) -> None:
        """Have the app serve its main and tester sockets: SIGUSR1, but gunicorn's
        master uses that signal itself (reopen logs): it is told over its control socket."""
        if self.server == "gunicorn":
            try:
                if app_request(self.env, self.pid, {}, cmd="live")[0].get("ok") is True:
                    return
            except (OSError, ValueError) as e:
                raise OSError("app %d did not go live: %s" % (self.pid, e))
        os.kill(self.pid, signal.SIGUSR1)

    def hand_over(self, sockets: dict) -> bool:
        """Have the app serve exactly these sockets (testers added or removed)
        without a restart. False if it cannot (an app of an older agent)."""
        try:
            answer, fds = app_request(self.env, self.pid, sockets, cmd="serve")
        except (OSError, ValueError):
            return False
        for fd in fds.values():
            os.close(fd)
        return answer.get("ok") is True

    def stop(self, timeout: float = STOP_TIMEOUT):
        """SIGTERM the app's process group, give it time to drain, then SIGKILL."""
        if self.poll() is None:
            stop_group(self.pid, timeout)
        else:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # leftovers of its group
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc is not None:
            self.proc.wait()
        try:
            os.unlink(handed_path(self.env.path("run"), self.pid))  # a spare's record (spare.py)
        except OSError:
            pass
        return self.poll()


class Supervisor:
    """Keeps one env's app running, and switches releases without a gap.

    It owns the env's listening socket for its whole life and hands it to each
    app process, so connections queue in the kernel and are never refused
    while one process replaces another. It restarts an app that exits (with
    backoff, giving up after a crash loop) or stops answering its health probe.
    """

    CRASH_LOOP = 5  # this many exits, each within CRASH_WINDOW of starting...
    CRASH_WINDOW = 60.0  # ...and the app counts as crashed: no more restarts
    HANG_PROBES = 3  # failed health probes in a row that count as a hang
    SPARE_CHECK = 2.0  # seconds between checks that the spare fits the live release
    SPARE_DELAY = 1.0  # seconds after a switch, and with no deploy under way, before a spare starts

    def __init__(self, env: Env, listen_fd):
        self.env = env
        self.listen_fd = listen_fd
        self.sockets = {}  # "" -> the main listening fd; tester name -> their port's fd
        self.port = None
        self.app = None
        self.release = None  # the live release, kept while its app is down: current is put back from it
        saved = env.state()
        self.state = "stopped"
        self.restarts = saved.get("restarts") or 0
        self.hangs = saved.get("hangs") or 0
        self.last_exit = saved.get("last_exit")
        self.last_log = None
        self.quick_exits = []
        self.backoff = 0.5
        self.restart_at = None
        self.failed_probes = 0
        self.next_probe = 0.0
        self.next_rotate = 0.0
        self.next_testers = 0.0
        self.missing_testers = False  # a tester port could not be bound: tick() retries
        self.expiry = None  # when the next tester of this env expires: tick() stops serving them
        self.unsaved = False  # state.json could not be written (a full disk): tick retries
        self.next_save = 0.0
        self.spare = None  # a spare app for the next release of the live one's virtualenv (spare.py)
        self.next_spare = 0.0
        self.spare_failed = None  # (python, release) of a spare that ended by itself: none again for them

    @property
    def settings(self) -> dict:
        return self.env.settings(strict=False)  # damaged: the defaults, and the app keeps serving

    def log(self, message: str) -> None:
        """A line in supervisor.log; a full disk loses the line, never the supervisor."""
        try:
            print("%s %s" % (iso(now()), message), flush=True)
        except OSError:
            pass

    def save(self) -> None:
        """Write state.json. A write that fails (a full disk) kills nothing: the
        supervisor keeps its state, answers status with it, and retries."""
        try:
            write_json(self.env.path("state.json"), self.record())
        except OSError as e:
            if not self.unsaved:
                self.log("cannot write state.json (%s): retrying every 2 s" % e)
            self.unsaved = True
        else:
            self.unsaved = False

    def record(self) -> dict:
        """What state.json holds, and what ping tells status."""
        app = self.app
        return {
            "state": self.state,
            "pid": app.pid if app else None,
            "release": self.release,
            "probe_port": app.probe_port if app else None,
            "started_at": app.started_at if app else None,
            "restarts": self.restarts,
            "hangs": self.hangs,
            "last_exit": self.last_exit,
            "last_log": self.last_log,
            "port": self.port,
            "supervisor_pid": os.getpid(),
            "updated_at": now(),
        }

    def run(self) -> None:
        lock = os.open(self.env.path("supervisor.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("another supervisor runs for this env; exiting")
            return
        ctl_path = self.env.path("ctl.sock")
        if os.path.lexists(ctl_path):
            os.unlink(ctl_path)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(ctl_path)
        os.chmod(ctl_path, 0o600)
        ctl.listen(16)
        signal.signal(signal.SIGTERM, lambda *_: self.exit())
        if self.listen_fd.startswith("adopt"):
            self.adopt()
            if self.app is not None:
                self.update_testers()  # testers added while no supervisor ran
        if self.app is None:
            if self.listen_fd.startswith("adopt"):  # nothing could be adopted: listen anew
                port = self.listen_fd.partition(":")[2] or self.settings.get("port", 8080)
                try:
                    self.listen_fd = str(bind_listener(int(port)).detach())
                except Fail as e:
                    self.log("%s; supervisor exits" % e.message)
                    return
            self.sockets[""] = int(self.listen_fd)
            self.port = fd_port(self.sockets[""])
            self.bind_testers()
            current = self.env.current()
            if current and not self.settings.get("stopped"):
                self.start(current)
        self.log("supervisor %d started, port %d" % (os.getpid(), self.port))
        self.save()
        while True:
            ready, _, _ = select.select([ctl], [], [], 0.1)
            if ready:
                conn, _ = ctl.accept()
                foreign = foreign_peer(conn)
                if foreign:  # refused, and the tick still runs: a flood of them starves nothing
                    self.log("refused a control connection from %s: not a qabox agent" % foreign)
                    conn.close()
                else:
                    self.handle(conn)
            self.tick()

    def adopt(self) -> None:
        """Take over an app of this env that no supervisor runs, socket and all,
        and end the others: a supervisor that died mid-switch leaves two apps,
        and a full disk or a lost state.json one that state.json does not name.
        The one kept serves the current release (the recorded one first)."""
        current, recorded = self.env.current(), self.env.state().get("pid")
        found = sorted(env_apps(self.env), reverse=True,
                       key=lambda a: (a["release"] == current, a["pid"] == recorded, a["pid"]))
        enders = []
        for app in found:
            if self.app is None:
                try:
                    self.app, self.sockets = AppProcess.adopt(self.env, app)
                except (OSError, ValueError) as e:
                    self.log("cannot adopt %s (pid %d): %s" % (app["release"], app["pid"], e))
                else:
                    self.app.go_live()  # it may have been starting beside the one that served
                    self.release, self.state, self.port = app["release"], "running", fd_port(self.sockets[""])
                    self.log("adopted %s (pid %d)" % (app["release"], app["pid"]))
                    continue
            self.log("ending %s (pid %d): an app of this env that no supervisor ran" % (app["release"], app["pid"]))
            stop_accepting(self.env, app["pid"])  # at once, before this supervisor serves
            enders.append(threading.Thread(target=stop_group, args=(app["pid"], STOP_TIMEOUT), daemon=True))
            enders[-1].start()
        if self.app is None:
            for ender in enders:  # they hold the port this supervisor listens on next
                ender.join()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = {}
            try:
                data = recv_line(conn)
                if not data:
                    return
                request = json.loads(data.decode())
                reply = self.dispatch(request)
            except Fail as e:
                reply = {"ok": False, "error": dict(code=e.code, message=e.message, **e.data)}
            except (OSError, ValueError, KeyError) as e:
                reply = {"ok": False, "error": {"code": "supervisor", "message": str(e)}}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
        if request.get("cmd") == "stop":
            self.log("stopped on request; supervisor exits")
            sys.exit(0)

    def dispatch(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "port": self.port, "state": self.state, "pid": os.getpid(),
                    "agent": agents.name(), "record": self.record()}
        if cmd == "switch":
            return self.switch(request["release"], float(request.get("timeout", START_TIMEOUT)),
                               request.get("port"))
        if cmd == "stop":
            self.stop_app()
            return {"ok": True}
        if cmd == "testers":
            return self.update_testers()
        raise Fail("bad_request", "unknown supervisor command %r" % cmd)

    def update_testers(self) -> dict:
        """Serve exactly the testers' ports of now, in the running app too."""
        if self.bind_testers() and self.app is not None and not self.app.hand_over(self.sockets):
            return self.switch(self.app.release, START_TIMEOUT)  # a new process gets them
        return {"ok": True}

    def bind_testers(self) -> bool:
        """Listen on each tester's own port for this env. True if anything changed.

        A port it cannot get (held by another process) is tried again from
        tick(); an unreadable tester list changes nothing.
        """
        try:
            wanted, self.expiry = tester_ports(self.env), next_expiry(self.env)
        except Fail as e:
            self.expiry = None  # no retry each tick: the next change of the list brings it
            self.log(e.message)
            return False
        self.missing_testers = False
        changed = False
        for name in [n for n in self.sockets if n and n not in wanted]:
            os.close(self.sockets.pop(name))
            changed = True
        for name, port in wanted.items():
            if name not in self.sockets:
                try:
                    self.sockets[name] = bind_listener(port).detach()  # the fd, kept open
                    changed = True
                except (Fail, OSError) as e:
                    if not self.missing_testers:
                        self.log("cannot listen on tester %s's port %d (retrying): %s" % (name, port, e))
                    self.missing_testers = True
        if changed:
            self.end_spare()  # it holds the sockets of before
        return changed

    def start(self, release: str) -> None:
        """Start a release straight onto the listening socket (no old one to keep)."""
        try:
            self.app = AppProcess.spawn(self.env, release, self.sockets, live=True)
            self.release, self.state = release, "starting"
            self.log("started %s (pid %d)" % (release, self.app.pid))
        except (Fail, OSError, KeyError) as e:
            self.log("cannot start %s: %s" % (release, e))
            self.app, self.state = None, "crashed"
        self.save()

    def switch(self, release: str, timeout: float, port=None) -> dict:
        """Start ``release`` beside the old one; only a healthy one goes live.

        With a new port, it is bound first (or refused) and only the new app
        listens there; the old one serves the old port until the switch, so a
        refused port or a failed release changes nothing.
        """
        if port is not None and not is_port(port):
            raise Fail("bad_request", "port %r is not a port from 1 to 65535" % (port,))
        sockets = dict(self.sockets)
        if port and port != self.port:
            sockets[""] = bind_listener(port).detach()
        moved = sockets[""] != self.sockets[""]
        spare, self.spare = self.spare, None
        try:
            new = AppProcess.spawn(self.env, release, sockets, live=False, spare=spare)
        except BaseException:
            if moved:
                os.close(sockets[""])
            if spare is not None:
                spare.end()
            raise
        self.next_spare = time.monotonic() + self.SPARE_DELAY  # a new one, once this one's deploy is done
        self.log("starting %s (pid %d%s)" % (release, new.pid, ", a spare" if spare and new.proc is spare.proc else ""))
        result = new.wait_healthy(timeout)
        failed = not result.get("up")
        if not failed:
            try:
                link_current(self.env, release)
            except OSError as e:
                result, failed = {"error": "cannot point current at it: %s" % e.strerror}, True
        if failed:
            code = new.stop(timeout=2)
            if moved:
                os.close(sockets[""])
            reason = result["error"]
            self.log("release %s failed to start: %s" % (release, reason))
            again = release == self.release and self.app is not None  # a restart: nothing new
            return {"ok": False, "error": {
                "code": "app_exited" if result.get("exited") else "unhealthy",
                "message": "release %s did not pass its health check when started again (%s): its running "
                           "process keeps serving" % (release, reason) if again else
                           "the new release %s did not pass its health check (%s): %s; fix the app and "
                           "deploy again" % (release, reason, "the previous release keeps serving"
                                             if self.env.current() else "nothing was deployed"),
                "exit": code,
                "log": with_traceback(self.env, tail(new.log_path)),
            }}
        new.go_live()
        old, self.app, self.release = self.app, new, release
        if moved:
            os.close(self.sockets[""])  # the old app keeps its own copy until it is retired
            self.sockets, self.port = sockets, port
        self.state, self.last_log, self.quick_exits, self.backoff = "running", None, [], 0.5
        self.restart_at, self.failed_probes = None, 0
        self.save()
        self.log("release %s is live (pid %d)" % (release, new.pid))
        if old:
            self.retire(old)
        return {"ok": True, "pid": new.pid, "health": result}

    def retire(self, old: AppProcess) -> None:
        """Stop a replaced app: once it takes no new connection (it says so over
        its control socket) the switch returns, and it drains its open requests
        (up to STOP_TIMEOUT) in the background. A prune that would delete its
        release waits for it first (releases.prune). An app of an older agent
        is stopped whole, as it was."""
        if not stop_accepting(self.env, old.pid):
            old.stop()
            self.log("retired %s (pid %d)" % (old.release, old.pid))
            return

        def stop() -> None:
            old.stop()
            self.log("retired %s (pid %d)" % (old.release, old.pid))
            try:
                agents.prune()  # the agent version it ran from may be unused now
            except OSError:
                pass
        threading.Thread(target=stop, daemon=True).start()

    def tick(self) -> None:
        """Restart an app that died or hangs; mark one that became healthy; rotate
        logs; try again for tester ports it could not listen on; stop serving
        a tester who expired (the app closes their open connections)."""
        clock = time.monotonic()
        if self.missing_testers and clock >= self.next_testers or \
                self.expiry is not None and now() >= self.expiry:
            self.next_testers = clock + 2.0
            self.update_testers()
        if self.unsaved and clock >= self.next_save:
            self.next_save = clock + 2
            self.save()
        if clock >= self.next_spare:
            self.next_spare = clock + self.SPARE_CHECK
            self.keep_spare()
        app = self.app
        if app is None:
            if self.restart_at is not None and clock >= self.restart_at:
                self.restart_at = None
                release = self.env.current() or self.release
                if release:
                    self.start(release)
            return
        code = app.poll()
        if code is not None:
            self.exited(app, code)
            return
        if self.state == "starting":
            if app.up(app.healthy(timeout=0.5).get("code")):
                self.state, self.failed_probes = "running", 0
                self.next_probe = clock + float(self.settings.get("health_interval", 10))
                self.save()
        elif clock >= self.next_probe:
            self.probe(app)
        if clock >= self.next_rotate:
            self.next_rotate = clock + 2
            rotate(app.log_path, int(self.settings.get("log_max_bytes", 10 * 2**20)))

    def keep_spare(self) -> None:
        """Have a spare ready for the next release of the live one's virtualenv
        while the live app runs (and the env's settings allow it); end one that
        no longer fits. One that ended by itself (killed, or its supervisor's
        pipe broke) is not started again for the same release."""
        app, python = self.app, None
        if app is not None and self.state == "running" and self.settings.get("spare_app") is not False:
            try:
                python, spec, environ = AppProcess.plan(self.env, app.release, self.sockets, live=False)
            except (Fail, OSError, KeyError, ValueError):
                python = None
        spare = self.spare
        if spare is not None:
            if spare.proc.poll() is not None:
                spare.end()  # its pipes
                self.spare, self.spare_failed = None, (spare.python, spare.release)
                self.log("the spare app ended by itself (exit code %s): this release gets no other"
                         % spare.proc.returncode)
            elif python and spare.fits(python, spec, environ):
                return
            else:
                self.end_spare()
        if python and (python, app.release) != self.spare_failed and os.path.isfile(modules_file(python)):
            if deploying(self.env):  # it would slow the deploy down: it starts once that is done
                self.next_spare = time.monotonic() + self.SPARE_DELAY
                return
            try:
                self.spare = Spare.start(agents.archive(), python, spec, environ, self.env.dir)
            except OSError as e:
                self.spare_failed = (python, app.release)
                self.log("cannot start a spare app: %s" % e)

    def end_spare(self) -> None:
        if self.spare is not None:
            self.spare.end()
            self.spare = None

    def probe(self, app: AppProcess) -> None:
        """A live app that stops answering is hung: restart it, counted as a hang."""
        settings = self.settings
        self.next_probe = time.monotonic() + float(settings.get("health_interval", 10))
        code = app.healthy(timeout=2.0).get("code")
        self.failed_probes = 0 if app.up(code) else self.failed_probes + 1
        if self.failed_probes >= self.HANG_PROBES:
            self.log("app %s (pid %d) failed %d health probes: restarting it"
                     % (app.release, app.pid, self.failed_probes))
            self.hangs += 1
            self.failed_probes = 0
            app.stop(timeout=2)
            self.start(app.release)

    def exited(self, app: AppProcess, code) -> None:
        """Restart with exponential backoff, or give up after a crash loop."""
        self.log("app %s (pid %d) exited with code %s" % (app.release, app.pid, code))
        app.stop(timeout=0)  # reap it, and anything left in its group
        self.app, self.last_exit = None, code
        clock = time.monotonic()
        if now() - app.started_at < self.CRASH_WINDOW:
            self.quick_exits = [t for t in self.quick_exits if clock - t < 10 * self.CRASH_WINDOW]
            self.quick_exits.append(clock)
        else:
            self.quick_exits, self.backoff = [], 0.5
        if len(self.quick_exits) >= self.CRASH_LOOP:
            self.state, self.last_log = "crashed", tail(app.log_path, 20)
            self.log("crash loop: %d quick exits in a row; not restarting" % len(self.quick_exits))
        else:
            self.restarts += 1
            self.state = "starting"
            self.restart_at = clock + self.backoff
            self.backoff = min(self.backoff * 2, 30.0)
        self.save()

    def stop_app(self) -> None:
        self.end_spare()
        if self.app:
            self.app.stop()
            self.log("stopped %s (pid %d)" % (self.app.release, self.app.pid))
            self.app = None
        self.state, self.restart_at = "stopped", None
        self.save()

    def exit(self) -> None:
        """On SIGTERM the supervisor leaves, but the app keeps serving: a new
        supervisor adopts it. (``qabox stop`` is the way to stop the app.)"""
        self.end_spare()
        self.log("supervisor terminated; the app keeps running")
        sys.exit(0)
