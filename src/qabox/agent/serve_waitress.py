"""The app on waitress, over the supervisor's sockets (``[app] server = "waitress"``).

One waitress server object per socket, all on one socket map, one loop thread
and one task dispatcher (``threads`` threads): the probe socket is served at
once, the main and tester sockets at go-live (SIGUSR1), tester sockets come
and go while it runs (the supervisor's "serve"), and "retire" or SIGTERM stop
every accept at once. Changes to the map happen in the loop's own thread
(through waitress's trigger). waitress keeps HTTP/1.1 connections alive, so a
draining process answers what is in flight with ``Connection: close`` and
closes the connections that wait idle for a next request, then exits.
waitress writes no access log: AccessLog writes Werkzeug's lines, naming the
tester. The internals used are all in waitress_compat.py.
"""

import socket
import threading
import time

from .serve import Lifecycle, wrapped_app
from .waitress_compat import Waitress

THREADS = 8
CONNECTION_LIMIT = 256  # all ports together, as Werkzeug's MAX_CONNECTIONS
PER_PORT = 64  # a browser opens about 6 at once per site
IDLE_TIMEOUT = 30.0


class AccessLog:
    """Werkzeug's access log line for each request (probes excepted), naming
    the tester of the port (or 127.0.0.1) and the request id."""

    def __init__(self, app, tester_ports: dict, quiet_port: int):
        self.app, self.tester_ports, self.quiet_port = app, tester_ports, quiet_port

    def __call__(self, environ, start_response):
        try:
            port = int(environ.get("SERVER_PORT", ""))
        except ValueError:
            port = None
        if port == self.quiet_port:
            return self.app(environ, start_response)
        answer = {}

        def start(status, headers, exc_info=None):
            answer["code"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = self.app(environ, start)
        path = environ.get("PATH_INFO", "") + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        print('%s - - [%s] "%s %s %s" %s - rid=%s' % (
            self.tester_ports.get(port) or environ.get("REMOTE_ADDR", "-"),
            time.strftime("%d/%b/%Y %H:%M:%S"), environ.get("REQUEST_METHOD"), path,
            environ.get("SERVER_PROTOCOL"), answer.get("code", "-"), environ.get("qabox.request_id")), flush=True)
        return result


def serve_waitress(spec: dict) -> None:
    waitress = Waitress()
    options = spec.get("server_options") or {}
    limit = int(options.get("connection_limit", CONNECTION_LIMIT))
    per_port = min(PER_PORT, limit)
    idle = float(options.get("idle_timeout", IDLE_TIMEOUT))
    life = Lifecycle(spec)
    tester_ports = {}
    probe_sock = socket.socket(fileno=spec["probe_fd"])
    app = AccessLog(wrapped_app(spec, tester_ports), tester_ports, probe_sock.getsockname()[1])
    adj = waitress.Adjustments(threads=int(options.get("threads", THREADS)), connection_limit=limit,
                               channel_timeout=idle, cleanup_interval=min(idle, 30), asyncore_use_poll=True,
                               expose_tracebacks=False, log_socket_errors=False)
    dispatcher = waitress.ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    shared = {}  # the socket map: servers, connections and triggers of this process
    sockets = dict(spec["sockets"])  # name -> fd, what is served once live
    servers = {}  # the same names, once live (in the loop's thread only)
    draining = [False]
    refused_at = [-60.0]

    def open_connections() -> int:
        return sum(len(s.active_channels) for s in [probe] + list(servers.values()))

    class Task(waitress.WSGITask):
        def build_response_header(self):
            if draining[0]:  # the client must not send another request on it
                self.request.headers["CONNECTION"] = "close"
            return super().build_response_header()

    class Channel(waitress.HTTPChannel):
        task_class = Task

    class Server(waitress.TcpWSGIServer):
        """A socket's server: only so many connections per port and in all
        (the others wait in the kernel's queue; the probe is never capped)."""

        channel_class = Channel
        name = ""
        capped = True

        def readable(self):
            now = time.time()
            if now >= self.next_channel_cleanup:
                self.next_channel_cleanup = now + self.adj.cleanup_interval
                self.maintenance(now)
            if not self.accepting:
                return False
            if not self.capped:
                return True
            mine, total = len(self.active_channels), open_connections()
            if mine < per_port and total < limit:
                return True
            if time.monotonic() - refused_at[0] > 60:
                refused_at[0] = time.monotonic()
                print("connection cap reached (%s has %d open, %d in all; caps %d and %d): new connections "
                      "wait" % (self.name or "the app's port", mine, total, per_port, limit), flush=True)
            return False

    def make(fd: int, name: str = "", capped: bool = True):
        sock = fd if isinstance(fd, socket.socket) else socket.socket(fileno=fd)
        address = sock.getsockname()
        if name:  # before it serves: its first request is already the tester's
            tester_ports[address[1]] = name
        server = Server(app, shared, True, sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                        sockinfo=(sock.family, sock.type, sock.proto, address))
        server.name, server.capped = name, capped
        return server

    probe = make(probe_sock, capped=False)

    def in_loop(thunk) -> None:
        """Run ``thunk`` in the loop's thread, and wait for it (the map is the loop's)."""
        done, failed = threading.Event(), []

        def run():
            try:
                thunk()
            except Exception as e:
                failed.append(e)
            finally:
                done.set()
        waitress.in_loop(probe, run)
        if not done.wait(5.0):
            raise OSError("waitress's loop did not answer within 5 s")
        if failed:
            raise failed[0]

    def serve_all() -> None:
        for name, fd in sockets.items():
            if name not in servers:
                servers[name] = make(fd, name)

    def serve_only(fds: dict) -> None:
        """The supervisor's sockets now: testers were added or removed."""
        for name in [n for n in sockets if n not in fds]:
            server = servers.pop(name, None)
            sockets.pop(name)
            if server is None:
                continue
            tester_ports.pop(server.effective_port, None)
            for channel in waitress.channels(server):  # a removed tester keeps no connection
                channel.handle_close()
            server.close()
        life.take(sockets, fds, serve_all)

    def stop_accepting() -> None:
        draining[0] = True
        for server in [probe] + list(servers.values()):
            waitress.stop_accepting(server)

    def close_idle() -> int:
        """Close the connections waiting for a next request (a request already
        in the kernel's buffer is read and answered first); how many are left."""
        for server in [probe] + list(servers.values()):
            for channel in waitress.channels(server):
                if waitress.idle(channel) and not pending(channel.socket):
                    channel.handle_close()
        return open_connections()

    def answer(message: dict, fds: dict):
        if message.get("cmd") == "retire":
            in_loop(stop_accepting)
            return None
        if message.get("cmd") == "serve":
            in_loop(lambda: serve_only(fds))
            return None
        return dict(sockets)

    def still_open() -> int:
        left = []
        in_loop(lambda: left.append(close_idle()))
        return left[0]

    threading.Thread(target=probe.run, daemon=True).start()
    life.run(answer, lambda: in_loop(serve_all), lambda: in_loop(stop_accepting), still_open)


def pending(sock) -> bool:
    """Whether a connection has bytes waiting (or has been closed by its client)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
