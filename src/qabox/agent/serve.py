"""The app process: the release's WSGI app on the server it names (Werkzeug's threaded
server by default; serve_waitress.py and serve_gunicorn.py for the others).

It runs with the release's virtualenv python, from the same archive.
"""

import os
import signal
import socket
import sys
import time

from .envs import Env
from .errors import ErrorStore, errors_dir
from .procs import STOP_TIMEOUT
from .rules import parse_entry
from .sockets import foreign_peer, recv_fds, send_fds
from .spare import remember_modules, wait_to_serve
from .wsgi import Requests, hook_frameworks


MAX_CONNECTIONS_PER_PORT = 64  # a browser opens about 6 at once per site
MAX_CONNECTIONS = 256  # app threads, all ports together
IDLE_TIMEOUT = 30.0  # seconds a connection may send nothing


def load_app(entry: str):
    """Import the entry's module and return its WSGI app (a factory's, called
    with the entry's literal arguments), with debugging forced off.

    A bare function that cannot take (environ, start_response) but can be
    called with nothing is a factory named without its ``()`` (``flask --app``
    calls it too): it is called, and the log says so.
    """
    import importlib
    import inspect

    module_name, path, call = parse_entry(entry)
    obj = importlib.import_module(module_name)
    for part in path:
        obj = getattr(obj, part)
    if call is None and inspect.isfunction(obj) and not takes(obj, None, None) and takes(obj):
        print("qabox: %s is an app factory (it takes no environ and start_response): serving what it "
              "returns; name it %s() to say so" % (entry, entry), flush=True)
        call = ([], {})
    if call is not None:
        obj = obj(*call[0], **call[1])
    if hasattr(obj, "debug"):
        obj.debug = False  # a Flask app in debug mode would show tracebacks to testers
    while type(obj).__name__ == "DebuggedApplication" and hasattr(obj, "app"):
        obj = obj.app  # never the interactive debugger, whatever the build says
    return obj


def takes(function, *args) -> bool:
    """Whether ``function`` can be called with these positional arguments."""
    import inspect

    try:
        inspect.signature(function).bind(*args)
    except TypeError:
        return False
    return True


def wrapped_app(spec: dict, tester_ports: dict):
    """The release's app as every server runs it: its static directories ahead
    of it, then the ``Requests`` middleware (identity headers, captured errors).
    ``tester_ports`` (port -> tester) is the server's to keep current."""
    sys.path.insert(0, spec["release_dir"])
    app = load_app(spec["entry"])
    if spec.get("static"):  # the release's own directories, ahead of the app (Django serves none itself)
        from werkzeug.middleware.shared_data import SharedDataMiddleware

        app = SharedDataMiddleware(app, {prefix: os.path.join(spec["release_dir"], path)
                                         for prefix, path in spec["static"].items()})
    release = os.environ.get("QABOX_RELEASE") or os.path.basename(spec["release_dir"])
    app = Requests(app, release, tester_ports,
                   ErrorStore(errors_dir(Env(spec["base"], spec["env"])), release, spec["release_dir"]))
    hooked = hook_frameworks()
    if hooked:
        print("qabox: capturing %s's errors" % " and ".join(hooked), flush=True)
    remember_modules()  # what the next release's spare imports ahead (spare.py)
    return app


def control_loop(spec: dict, path: str, answer, retired=None) -> None:
    """Serve the app's control socket at ``path`` for its supervisor (and for a
    new one that adopts it): each request, checked to come from this env's
    supervisor, is ``answer(message, fds)``'s to handle; it returns the fds to
    send back, None (ok) or False (not done). After an ok to "retire",
    ``retired()`` runs: the answer is sent before the app may exit."""
    if os.path.lexists(path):
        os.unlink(path)
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.bind(path)
    ctl.listen(4)
    while True:
        conn, _ = ctl.accept()
        with conn:
            conn.settimeout(5)
            try:
                foreign = foreign_peer(conn, role=["supervise", spec["base"], spec["env"]])
                if foreign:
                    raise OSError("refused a connection from %s: not this env's supervisor" % foreign)
                message, fds = recv_fds(conn)
                reply = answer(message, fds)
                if reply is None:
                    send_fds(conn, {}, ok=True)
                elif reply is False:
                    send_fds(conn, {}, ok=False)
                else:
                    send_fds(conn, reply)
            except (OSError, ValueError) as e:
                print("control request failed: %s" % e, flush=True)
                continue
        if message.get("cmd") == "retire" and reply is None and retired is not None:
            retired()


class Lifecycle:
    """An app process's moments, whatever its server: it goes live (SIGUSR1,
    once the supervisor saw it healthy, or at once when started live) and
    stops (SIGTERM, SIGINT, or retired over its control socket ``run/app-PID.sock``)."""

    def __init__(self, spec: dict):
        import threading

        self.spec = spec
        self.go_live, self.stop = threading.Event(), threading.Event()
        self.wake = threading.Event()  # the main loop acts at once on either
        signal.signal(signal.SIGUSR1, self.setting(self.go_live))
        signal.signal(signal.SIGTERM, self.setting(self.stop))
        signal.signal(signal.SIGINT, self.setting(self.stop))
        self.ctl_path = os.path.join(spec["ctl_dir"], "app-%d.sock" % os.getpid())

    def setting(self, event):
        def handler(*_):
            event.set()
            self.wake.set()
        return handler

    def take(self, sockets: dict, fds: dict, serve_all) -> None:
        """Add the sockets the supervisor sent (testers added) to those served
        by name, and serve them if live (a retiring app takes no new port)."""
        for name, fd in fds.items():
            if name in sockets:
                os.close(fd)  # the same socket, already served
            else:
                sockets[name] = fd
        if self.go_live.is_set() and not self.stop.is_set():
            serve_all()

    def run(self, answer, serve_all, stop_accepting, busy) -> None:
        """Answer the control socket (``answer``, see control_loop), ``serve_all()``
        at go-live; once stopped, ``stop_accepting()``, wait while ``busy()``
        (the connections still open, up to STOP_TIMEOUT - 1 s), and exit."""
        import threading

        threading.Thread(target=control_loop, args=(self.spec, self.ctl_path, answer, self.setting(self.stop)),
                         daemon=True).start()
        if self.spec.get("live"):
            self.go_live.set()
        live = False
        while not self.stop.is_set():
            if self.go_live.is_set() and not live:
                serve_all()
                live = True
            self.wake.wait(1.0)
            self.wake.clear()
        stop_accepting()
        deadline = time.monotonic() + STOP_TIMEOUT - 1
        while busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        if os.path.lexists(self.ctl_path):
            os.unlink(self.ctl_path)
        sys.exit(0)


def serve(spec: dict) -> None:
    """Run the app on the server its release names (``spec["server"]``); a
    spare (spare.py) first waits to be handed its release."""
    if spec.get("spare"):
        spec = wait_to_serve(spec)
    server = spec.get("server") or "werkzeug"
    if server == "waitress":
        from .serve_waitress import serve_waitress

        return serve_waitress(spec)
    if server == "gunicorn":
        from .serve_gunicorn import serve_gunicorn

        return serve_gunicorn(spec)
    return serve_werkzeug(spec)


def serve_werkzeug(spec: dict) -> None:
    """Run the app on Werkzeug's threaded server over the inherited sockets.

    It serves the private probe socket at once and the shared listening socket
    after SIGUSR1 (when the supervisor has seen it healthy). On SIGTERM it stops
    accepting, lets in-flight requests finish (Werkzeug alone would kill them
    mid-response), and exits. On ``run/app-PID.sock`` a new supervisor can ask
    it for its sockets (adoption), and its supervisor hands it the sockets of
    testers added since (and takes back those of testers removed).
    """
    import threading

    life = Lifecycle(spec)
    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    active = [0]
    active_lock = threading.Lock()
    open_by = {}  # tester name -> their connections open now (closed when they are removed)

    class Handler(WSGIRequestHandler):
        # One request per connection: nothing idles in a keep-alive that a
        # release switch would cut, and each tunnel request is its own channel.
        protocol_version = "HTTP/1.0"
        tester = ""
        timeout = IDLE_TIMEOUT  # a connection that sends nothing is let go

        def handle(self):
            with active_lock:
                active[0] += 1
                open_by.setdefault(self.tester, set()).add(self.connection)
            try:
                super().handle()
            finally:
                with active_lock:
                    active[0] -= 1
                    open_by.get(self.tester, set()).discard(self.connection)

        def log_request(self, code="-", size="-"):
            request_id = (getattr(self, "environ", None) or {}).get("qabox.request_id")
            super().log_request(code, "%s rid=%s" % (size, request_id) if request_id else size)

    def tester_handler(name: str):
        class TesterHandler(Handler):
            tester = name

            def address_string(self):
                return name  # the access log names the tester, not 127.0.0.1

        return TesterHandler

    class QuietHandler(Handler):
        def log_request(self, *args, **kwargs):
            pass  # the supervisor's health probes are not testers' requests

    tester_ports = {}  # port -> the tester it is for (the app's own port and the probe are no one's)
    app = wrapped_app(spec, tester_ports)
    sockets = dict(spec["sockets"])  # what this app serves once live, by name
    servers = {}  # the same names, once live
    lock = threading.Lock()  # sockets and servers: the control thread changes them too

    counts = {}  # port name -> connections it serves now
    refused_at = {}  # port name -> when its cap was last logged

    class Retiring(ThreadedWSGIServer):
        """A server that can stop accepting at once: the supervisor waits for
        that before a switch returns. Its socket is non-blocking (it is shared
        with the app that replaces this one: the other may take a connection
        first), and no accept starts once it is retired."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.socket.setblocking(False)
            self.accepting = threading.Lock()
            self.retired = False

        def get_request(self):
            with self.accepting:
                if self.retired:
                    raise OSError("retired: the new release takes the connections")
                return super().get_request()

        def retire(self) -> None:
            with self.accepting:
                self.retired = True
            threading.Thread(target=self.shutdown, daemon=True).start()  # its loop ends within its poll

    class Server(Retiring):
        """A thread per connection, but only so many per port and in all: one
        tester holding hundreds of idle connections is turned away, and the
        others (and the supervisor's health probe, which is not counted) are
        still served."""

        name = ""

        def process_request(self, request, client_address):
            with active_lock:
                mine, total = counts.get(self.name, 0), sum(counts.values())
                full = mine >= MAX_CONNECTIONS_PER_PORT or total >= MAX_CONNECTIONS
                if not full:
                    counts[self.name] = mine + 1
            if full:
                if time.monotonic() - refused_at.get(self.name, -60) > 60:
                    refused_at[self.name] = time.monotonic()
                    print("connection cap reached (%s has %d open, %d in all; caps %d and %d): "
                          "refusing new connections" % (self.name or "the app's port", mine, total,
                                                        MAX_CONNECTIONS_PER_PORT, MAX_CONNECTIONS), flush=True)
                self.shutdown_request(request)
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                with active_lock:
                    counts[self.name] -= 1

    class ProbeServer(Retiring):
        pass  # uncapped: the health probe must get through a flood

    def start(fd: int, handler, kind=Server):
        server = kind("127.0.0.1", 0, app, handler=handler, fd=fd)
        server.name = handler.tester
        if handler.tester:  # before it serves: its first request is already the tester's
            tester_ports[server.socket.getsockname()[1]] = handler.tester
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return server

    def serve_all() -> None:
        for name, fd in sockets.items():
            if name not in servers:
                servers[name] = start(fd, tester_handler(name) if name else Handler)

    def serve_only(fds: dict) -> None:
        """The supervisor's sockets now: testers were added or removed."""
        for name in [n for n in sockets if n not in fds]:
            server = servers.pop(name, None)
            if server is not None:
                tester_ports.pop(server.socket.getsockname()[1], None)
                server.shutdown()
                server.server_close()
            os.close(sockets.pop(name))
            with active_lock:  # a removed tester keeps no connection they opened before
                for conn in open_by.pop(name, ()):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        life.take(sockets, fds, serve_all)

    def stop_accepting() -> None:
        """Take no new connection on any port, from now on; those open are still served."""
        with lock:
            running = [probe] + list(servers.values())
        for server in running:
            server.retire()

    def answer(message: dict, fds: dict):
        """A new supervisor asks for the sockets (adoption), or sends new ones;
        the supervisor that replaced this app has it stop accepting (retire)."""
        if message.get("cmd") == "retire":
            stop_accepting()
            return None
        with lock:
            if message.get("cmd") == "serve":
                serve_only(fds)
                return None
            return dict(sockets)

    def serve_all_now() -> None:
        with lock:
            serve_all()

    probe = start(spec["probe_fd"], QuietHandler, ProbeServer)
    life.run(answer, serve_all_now, stop_accepting, lambda: active[0])
