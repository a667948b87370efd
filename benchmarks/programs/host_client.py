"""Testers' requests from inside the lab host's network namespace, with the host's
python, so that they hit the app's loopback port directly and time the app, not SSH.

    python3 host_client.py MODE JSON-KWARGS      prints one JSON object

  load: `clients` each GET `path` (/) `rate` times a second until stdin closes and
        at least `requests` (0) were sent; with `keepalive`, each on one connection
        it reuses, as a browser does (keepalive_client.Client, which retries what
        browsers retry), else a new connection per request
  kill: kill -9 the process answering /pid, poll every 20 ms until another answers
  latency: /slow?s=`seconds` from 1 client `sequential` times, then from
           `clients` clients at once, `each` times each
"""
import json, os, signal, sys, threading, time, urllib.request

from keepalive_client import Client

def get(port, path, timeout=10.0):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.read().decode()

def load(port, clients, rate, max_seconds, path="/", requests=0, keepalive=False):
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stats = {"sent": 0, "failed": 0, "answers": [], "errors": [], "slowest": 0.0, "connections": 0,
             "retries": 0}
    lock = threading.Lock()
    started = time.monotonic()

    def client():
        browser = Client(port) if keepalive else None
        next_at = time.monotonic()
        while not (stop.is_set() and stats["sent"] >= requests) and time.monotonic() - started < max_seconds:
            sent = time.monotonic()
            try:
                body, error = (browser.get(path) if browser else get(port, path)), None
            except Exception as e:
                body, error = None, repr(e)
            with lock:
                stats["sent"] += 1
                stats["slowest"] = max(stats["slowest"], time.monotonic() - sent)
                if error:
                    stats["failed"] += 1
                    stats["errors"] = (stats["errors"] + [error])[:5]
                elif body not in stats["answers"]:
                    stats["answers"].append(body)
            next_at = max(next_at + 1.0 / rate, time.monotonic())  # no catching up in bursts
            time.sleep(max(0.0, next_at - time.monotonic()))  # paced on after stdin closes, too
        if browser:
            browser.close()
            with lock:
                stats["connections"] += browser.connections
                stats["retries"] += browser.retries

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["seconds"] = time.monotonic() - started
    return stats

def kill(port, within):
    old = get(port, "/pid")
    try:
        os.kill(int(old), signal.SIGKILL)
    except ProcessLookupError:
        sys.exit("pid %s was gone before kill -9: did something else restart the app?" % old)
    killed = time.monotonic()
    while time.monotonic() - killed < within:
        try:
            if get(port, "/pid", timeout=max(0.1, within - (time.monotonic() - killed))) != old:
                return {"seconds": time.monotonic() - killed}
        except OSError:
            pass
        time.sleep(0.02)
    sys.exit("no new process answered within %s s of kill -9 %s" % (within, old))

def latency(port, seconds, sequential, clients, each):
    path = "/slow?s=%s" % seconds
    def timed():
        started = time.monotonic()
        get(port, path, timeout=120)
        return time.monotonic() - started
    one = [timed() for _ in range(sequential)]
    many, lock = [], threading.Lock()
    barrier = threading.Barrier(clients)
    def client():
        barrier.wait()
        for _ in range(each):
            try:
                took = timed()
            except Exception as e:
                took = repr(e)
            with lock:
                many.append(took)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [took for took in many if isinstance(took, str)]
    if errors:
        sys.exit("%d of %d concurrent requests failed: %s" % (len(errors), len(many), errors[0]))
    return {"one": one, "many": many}

mode, kwargs = sys.argv[1], json.loads(sys.argv[2])
print(json.dumps({"load": load, "kill": kill, "latency": latency}[mode](**kwargs)))
