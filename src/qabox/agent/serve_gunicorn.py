"""The app on gunicorn, over the supervisor's sockets (``[app] server = "gunicorn"``).

gunicorn runs in this process through its documented Custom Application
(``gunicorn.app.base.BaseApplication``): the master here, gthread workers
(sync workers stall on a slow client) bound to ``fd://N``, copies of the
supervisor's sockets (gunicorn closes the fds it is given: the originals stay
open here for adoption). Where it differs from the other servers:
- go-live: the master already uses SIGUSR1 (reopen logs), so the supervisor
  says "live" over the control socket; the master sets a byte in memory shared
  with its workers, which until then accept on the probe socket only.
- it cannot take new listening sockets while it runs: "serve" answers not
  done, and the supervisor restarts it (a zero-downtime switch) on
  ``testers add``; it answers "retire" not done either, and the supervisor
  stops it whole (SIGTERM: gunicorn's graceful stop, which closes kept-alive
  connections and answers requests in flight).
The only private names of gunicorn used are those of gthread's accept switch
(check_gunicorn, pinned in rules.SERVER_PACKAGES); the rest is its documented
settings, Custom Application and logger_class.
"""

import mmap
import os
import selectors
import threading

from .procs import STOP_TIMEOUT
from .rules import server_processes
from .serve import control_loop, wrapped_app
from .sockets import fd_port

MINIMUM = "27.0"  # its gthread worker's accept switch (set_accept_enabled), which Worker below builds on
THREADS = 4
CONNECTION_LIMIT = 256
IDLE_TIMEOUT = 30.0
TIMEOUT = 30.0


def check_gunicorn(worker) -> None:
    """The gthread internals Worker overrides (its only private use of gunicorn),
    checked before anything starts: a gunicorn without them is named, with the pin."""
    import inspect

    missing = [name for name in ("set_accept_enabled", "wait_for_and_dispatch_events", "accept")
               if not hasattr(worker, name)]
    if "_accepting" not in inspect.getsource(worker.__init__):
        missing.append("_accepting")
    if missing:
        import gunicorn

        raise RuntimeError("gunicorn %s's gthread worker lacks %s, which qabox serves with: pin gunicorn>=%s in "
                           "the build's requirements" % (gunicorn.__version__, ", ".join(missing), MINIMUM))


def serve_gunicorn(spec: dict) -> None:
    from gunicorn import glogging
    from gunicorn.app.base import BaseApplication
    from gunicorn.workers.gthread import ThreadWorker

    check_gunicorn(ThreadWorker)
    options = spec.get("server_options") or {}
    live = mmap.mmap(-1, 1)  # shared with the workers forked from here: 1 once live
    if spec.get("live"):
        live[0] = 1
    kept = dict(spec["sockets"])  # name -> fd, kept open here (adoption asks for them)
    probe_port = fd_port(spec["probe_fd"])
    tester_ports = {fd_port(fd): name for name, fd in kept.items() if name}  # all it will ever serve
    app = wrapped_app(spec, tester_ports)

    class Worker(ThreadWorker):
        """gthread, accepting on the probe socket only until the master says live."""

        registered = ()

        def allowed(self) -> list:
            return [s for s in self.sockets if live[0] or s.getsockname()[1] == probe_port]

        def set_accept_enabled(self, enabled):
            wanted = self.allowed() if enabled else []
            if enabled == self._accepting and len(wanted) == len(self.registered):
                return
            for listener in self.registered:
                self.poller.unregister(listener)
            for listener in wanted:
                listener.setblocking(False)
                self.poller.register(listener, selectors.EVENT_READ, self.accept)
            self.registered, self._accepting = wanted, enabled

        def wait_for_and_dispatch_events(self, timeout):
            if self._accepting and self.alive and len(self.allowed()) != len(self.registered):
                self.set_accept_enabled(True)  # gone live
            return super().wait_for_and_dispatch_events(min(timeout, 0.1) if not live[0] else timeout)

    class Log(glogging.Logger):
        """Werkzeug's access log line, naming the tester (probes are not logged)."""

        def access(self, resp, req, environ, request_time):
            sock = environ.get("gunicorn.socket")
            try:
                if sock is not None and sock.getsockname()[1] == probe_port:
                    return
            except OSError:
                pass
            return super().access(resp, req, environ, request_time)

        def atoms(self, resp, req, environ, request_time):
            atoms = super().atoms(resp, req, environ, request_time)
            atoms["who"] = environ.get("HTTP_X_QABOX_TESTER") or atoms.get("h") or "-"
            atoms["rid"] = environ.get("qabox.request_id") or "-"
            return atoms

    workers = server_processes("gunicorn", options, os.cpu_count())
    threads = int(options.get("threads", THREADS))
    settings = {
        "bind": ["fd://%d" % os.dup(fd) for fd in [spec["probe_fd"]] + list(kept.values())],
        "workers": workers,
        "threads": threads,
        "worker_class": Worker,
        "worker_connections": max(threads + 1, int(options.get("connection_limit", CONNECTION_LIMIT)) // workers),
        "keepalive": int(options.get("idle_timeout", IDLE_TIMEOUT)),
        "timeout": int(options.get("timeout", TIMEOUT)),
        "graceful_timeout": int(STOP_TIMEOUT - 1),
        "logger_class": Log,
        "accesslog": "-",
        "errorlog": "-",
        "access_log_format": '%(who)s - - %(t)s "%(r)s" %(s)s - rid=%(rid)s',
        "proc_name": "qabox-" + spec["env"],
    }

    class Application(BaseApplication):
        def load_config(self):
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            return app

    def answer(message: dict, fds: dict):
        cmd = message.get("cmd")
        if cmd == "live":
            live[0] = 1
            return None
        if cmd in ("serve", "retire"):
            for fd in fds.values():
                os.close(fd)
            return False  # it cannot: the supervisor restarts it, or stops it whole
        return dict(kept)

    ctl_path = os.path.join(spec["ctl_dir"], "app-%d.sock" % os.getpid())
    threading.Thread(target=control_loop, args=(spec, ctl_path, answer), daemon=True).start()
    master = os.getpid()
    try:
        Application().run()
    finally:
        if os.getpid() == master and os.path.lexists(ctl_path):  # a worker leaves through here too
            os.unlink(ctl_path)
