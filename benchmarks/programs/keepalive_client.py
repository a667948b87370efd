"""HTTP/1.1 load from stdlib http.client as a browser sends it: each client keeps
one connection and reuses it for as long as the server keeps it open (host_client.py's
load mode sends its paced load with this Client too).

    python3 keepalive_client.py MODE JSON-KWARGS      prints one JSON object

  probe: one GET `path`: its status, Server header and body
  burst: `clients` connections GET `path` one request after another for `seconds`,
         in `procs` processes (the clients' threads share one GIL per process);
         cpu: the CPU seconds they used

A request on a reused connection that the server closed before it sent any byte
of a response (the send fails, or the status line meets a close or a reset) is
retried once on a new connection, as browsers do on keep-alive; anything else
(another error, a status other than 200, an empty body) counts as failed.
"""
import http.client, json, os, socket, sys, threading, time

# what a keep-alive connection the server closed in the meantime looks like
CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Retry(Exception):
    """The reused connection was closed before any byte of a response: send again."""


class Client:
    """One browser-like connection to 127.0.0.1:port, reopened when the server closes it."""

    def __init__(self, port, timeout=10.0):
        self.port, self.timeout = port, timeout
        self.conn, self.reused = None, False
        self.connections = self.retries = 0
        self.server = ""

    def get(self, path):
        """The body of GET path; raises on a failed request."""
        if self.conn is None or self.conn.sock is None:  # http.client drops a socket the server closes
            self.open()
        try:
            return self.once(path, may_retry=self.reused)
        except Retry:
            self.retries += 1
            self.open()
            return self.once(path, may_retry=False)

    def open(self):
        self.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        self.reused = False

    def once(self, path, may_retry):
        """One request on the open connection; Retry if may_retry and the server had closed it."""
        try:
            try:
                self.conn.request("GET", path)
                response = self.conn.getresponse()  # reads the status line and headers
            except CLOSED as e:
                if may_retry:
                    raise Retry() from e
                raise
            body = response.read()
        except BaseException:
            self.close()
            raise
        self.server = response.getheader("Server", "")
        self.reused = self.conn.sock is not None  # None: the server closes after this response
        if response.status != 200 or not body:
            raise OSError("HTTP %d with %d bytes for %s" % (response.status, len(body), path))
        return body.decode("utf-8", "replace")

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def probe(port, path):
    client = Client(port)
    body = client.get(path)
    client.close()
    return {"server": client.server, "body": body[:200]}


def burst_threads(port, path, clients, seconds):
    """`clients` threads of this process: their latencies, failures, connections, retries."""
    stats = {"latencies": [], "failed": 0, "errors": [], "connections": 0, "retries": 0, "server": ""}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run():
        client, latencies, failed, errors = Client(port), [], 0, []
        barrier.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.get(path)
                latencies.append(time.perf_counter() - started)
            except Exception as e:
                failed += 1
                errors = (errors + [repr(e)])[:3]
        client.close()
        with lock:
            stats["latencies"] += latencies
            stats["failed"] += failed
            stats["errors"] = (stats["errors"] + errors)[:3]
            stats["connections"] += client.connections
            stats["retries"] += client.retries
            stats["server"] = stats["server"] or client.server

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


def burst(port, path, clients, seconds, procs=1):
    """The threads of `procs` forked processes, their figures merged; seconds: the wall of all."""
    started, children = time.monotonic(), []
    for n in range(procs):
        share = clients // procs + (n < clients % procs)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            cpu = time.process_time()
            stats = burst_threads(port, path, share, seconds)
            stats["cpu"] = time.process_time() - cpu
            with os.fdopen(write, "w") as out:
                json.dump(stats, out)
            os._exit(0)
        os.close(write)
        children.append((pid, os.fdopen(read)))
    merged = {"latencies": [], "failed": 0, "errors": [], "connections": 0, "retries": 0, "cpu": 0.0,
              "server": ""}
    for pid, pipe in children:
        text = pipe.read()
        os.waitpid(pid, 0)
        if not text:
            sys.exit("a client process of burst died")
        part = json.loads(text)
        for key in ("latencies", "errors"):
            merged[key] += part[key]
        for key in ("failed", "connections", "retries", "cpu"):
            merged[key] += part[key]
        merged["server"] = merged["server"] or part["server"]
    merged["seconds"] = time.monotonic() - started
    merged["requests"] = len(merged["latencies"])
    return merged


if __name__ == "__main__":
    mode, kwargs = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"probe": probe, "burst": burst}[mode](**kwargs)))
