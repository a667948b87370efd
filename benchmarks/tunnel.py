"""The tunnel section: `qabox tunnel` against `ssh -L` and a plain sshtunnel
forwarder: latency, concurrent throughput, CPU per request, bulk transfer, and
reconnecting after lab1's link is cut."""
from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from lab.hosts import LAB, find_host, set_link

from .harness import MB, Bench, BenchError, Row, compared, percentile, run, target_note
from .target import HOST, PROGRAMS, REPO, DeployTarget, host_program

TUNNEL_CLIENTS = 8  # concurrent connections of the throughput figure
BIG = "/big?mb=1"  # the notes app's bulk page: 1 MiB of incompressible bytes
LINK_DOWN = 5.0  # seconds lab1's link is cut for the reconnect figure
SERVED_WITHIN = 30.0  # how long the reconnect figure waits for a first answer


def http_get(port: int, path: str, timeout: float = 10) -> int:
    """GET one page through a local port on a new connection; return its body's size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"HTTP {response.status} for {path}")
        return len(body)
    finally:
        conn.close()


def free_local_port() -> int:
    """A local port that was free a moment ago, for ssh -L to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Forward:
    """One way to the app's port: a process of its own that listens on a local port."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path):
        self.name, self.proc, self.log = name, proc, log
        self.port = 0

    def started(self, find_port: Callable[[], int]) -> "Forward":
        """The forward once it serves on the port that find_port() learns; stopped if not."""
        try:
            return self.wait_served(find_port())
        except BaseException:
            self.stop()
            raise

    def wait_served(self, port: int, within: float = 30) -> "Forward":
        """Poll /health through the port until it answers (the forward is up)."""
        self.port = port
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.proc.returncode}): {self.last_log_line()}")
            try:
                http_get(port, "/health", timeout=5)
                return self
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"{self.name} did not serve /health within {within:.0f} s: {self.last_log_line()}")

    def last_log_line(self) -> str:
        """Its last line on stderr, with a hint when its login was refused."""
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        line = lines[-1] if lines else "no output"
        if any(word in line for word in ("Permission denied", "refused", "Authentication failed")):
            line += " (is the tester's key gone? `scripts/lab up` rewrites authorized_keys)"
        return line

    def cpu_seconds(self) -> float:
        """utime + stime of the process, all its threads (/proc/PID/stat fields 14, 15)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Ask nicely (SIGINT, like Ctrl-C; stdin closed), then kill."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        else:
            self.proc.communicate()


def first_line(forward: Forward, within: float = 30) -> str:
    """The first stdout line of a starting forward, or a BenchError after within seconds."""
    ready, _, _ = select.select([forward.proc.stdout], [], [], within)
    line = forward.proc.stdout.readline() if ready else ""
    if not line:
        raise BenchError(f"{forward.name} printed nothing within {within:.0f} s: {forward.last_log_line()}")
    return line


def start_qabox_tunnel(bench: Bench, tester: dict) -> Forward:
    """`qabox tunnel` in the foreground, as the tester runs it."""
    log = bench.tmp / "qabox-tunnel.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qabox", "tunnel", "--user", tester["name"], "--host", HOST,
             "--env", tester["env"], "-i", tester["key"]],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    forward = Forward("qabox tunnel", proc, log)

    def url_port() -> int:
        line = first_line(forward)
        url = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not url:
            raise BenchError(f"qabox tunnel printed no URL: {line.strip() or forward.last_log_line()}")
        return int(url.group(1))

    return forward.started(url_port)


def start_ssh_forward(bench: Bench, tester: dict) -> Forward:
    """OpenSSH's `ssh -N -L` with the tester's key and nothing else."""
    host = find_host(HOST)
    config = bench.tmp / "tester_ssh_config"
    config.write_text(f"Host {HOST}\n  HostName {host.address}\n  Port {host.port}\n"
                      f"  User {host.user}\n  IdentityFile {tester['key']}\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {LAB / 'known_hosts'}\n"
                      f"  StrictHostKeyChecking yes\n  BatchMode yes\n")
    port = free_local_port()
    log = bench.tmp / "ssh-forward.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["ssh", "-F", str(config), "-N", "-o", "ExitOnForwardFailure=yes",
             "-L", f"127.0.0.1:{port}:127.0.0.1:{tester['port']}", HOST],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    return Forward("ssh -L", proc, log).started(lambda: port)


def start_plain_sshtunnel(bench: Bench, tester: dict) -> Forward:
    """sshtunnel.SSHTunnelForwarder with its defaults, in a python process of its own."""
    host = find_host(HOST)
    log = bench.tmp / "sshtunnel.log"
    child_env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}  # the tester key only
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, PROGRAMS / "plain_sshtunnel.py", host.address, host.user, tester["key"],
             str(tester["port"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env)
    forward = Forward("sshtunnel", proc, log)

    def printed_port() -> int:
        line = first_line(forward)
        if not line.strip().isdigit():
            raise BenchError(f"sshtunnel.SSHTunnelForwarder: {line.strip()}")
        return int(line)

    return forward.started(printed_port)


def add_tester(bench: Bench, env: str, name: str = "t") -> dict:
    """A tester with a fresh key, whose own port on lab1 reaches the env (and every
    other env there now); `name` tells this run's testers apart."""
    key = bench.tmp / f"tester-{name}"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qabox bench tester", "-f", key)
    name = f"bench{os.getpid()}{name}"
    added = json.loads(run(sys.executable, "-m", "qabox", "testers", "add", name, "--key", f"{key}.pub",
                           "--host", HOST, "--json", timeout=180).stdout)["data"]
    tester = {"name": name, "key": str(key), "env": env, "port": added["ports"].get(env)}
    if tester["port"] is None:
        remove_tester(tester)
        raise BenchError(f"tester {name} got no port for env {env}: {added['ports']}")
    return tester


def remove_tester(tester: dict) -> None:
    run(sys.executable, "-m", "qabox", "testers", "remove", tester["name"], "--host", HOST, timeout=180)


def sequential_latencies(port: int, requests: int) -> list[float]:
    """Seconds per GET / from one client, one request after another."""
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        http_get(port, "/")
        samples.append(time.perf_counter() - started)
    return samples


def concurrent_load(forward: Forward, clients: int, seconds: float) -> dict:
    """GET / from `clients` threads for `seconds`: requests, rate, the forward's CPU."""
    done, failed, errors, lock = [0], [0], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            try:
                http_get(forward.port, "/")
                ok = True
            except OSError as e:
                ok = False
                errors[:] = errors[:1] or [repr(e)]
            with lock:
                done[0] += ok
                failed[0] += not ok

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    cpu, client_cpu, started = forward.cpu_seconds(), time.process_time(), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    elapsed = time.monotonic() - started
    return {"requests": done[0], "failed": failed[0], "errors": errors, "seconds": elapsed,
            "rate": done[0] / elapsed, "cpu": forward.cpu_seconds() - cpu,
            "client_cpu": (time.process_time() - client_cpu) / elapsed}


def bulk_rate(port: int, requests: int) -> float:
    """MB/s of 1 MiB responses, one after another."""
    started, size = time.perf_counter(), 0
    for _ in range(requests):
        size += http_get(port, BIG, timeout=60)
    return size / MB / (time.perf_counter() - started)


def app_alone(port: int, clients: int, seconds: float) -> dict:
    """The same concurrent load inside lab1, straight to the app's port."""
    proc = run(*host_program("app_alone.py", port, clients, seconds), timeout=seconds + 60)
    return json.loads(proc.stdout)


def first_served(ports: dict[str, int], since: float) -> dict[str, float | None]:
    """Seconds from `since` until each port first serves /health again (None: not within
    SERVED_WITHIN).  A new try starts every 0.1 s, like a user reloading, and each
    waits up to 10 s: one stuck on a dead connection does not hide a later success."""
    served: dict[str, float] = {}
    lock = threading.Lock()

    def attempt(name: str, port: int) -> None:
        try:
            http_get(port, "/health", timeout=10)
        except OSError:
            return
        with lock:
            served.setdefault(name, time.monotonic() - since)

    threads = []
    while time.monotonic() - since < SERVED_WITHIN and len(served) < len(ports):
        for name, port in ports.items():
            if name not in served:
                threads.append(threading.Thread(target=attempt, args=(name, port), daemon=True))
                threads[-1].start()
        time.sleep(0.1)
    for t in threads:
        t.join(max(0.0, since + SERVED_WITHIN + 10 - time.monotonic()))
    return {name: served.get(name) for name in ports}


def cut_link(seconds: float) -> float:
    """Take lab1's link down for `seconds`; return the monotonic time it came back up."""
    set_link(HOST, "down")
    try:
        time.sleep(seconds)
    finally:
        set_link(HOST, "up")
    return time.monotonic()


def section(bench: Bench) -> list[Row]:
    """`qabox tunnel` against `ssh -L` and a plain sshtunnel forwarder: latency,
    concurrent throughput, CPU per request, bulk transfer, and reconnect after a cut."""
    sequential, seconds, bulk = (50, 2.0, 5) if bench.quick else (300, 5.0, 30)
    target = DeployTarget(bench, REPO / "examples" / "notes", suffix="t")
    build = target.make_build("tunnel")
    figures: dict[str, list[dict]] = {"qabox": [], "ssh": [], "sshtunnel": []}
    forwards: dict[str, Forward] = {}
    try:
        target.deploy_cli(build)
        tester = add_tester(bench, target.env)
        try:
            for name, start in (("qabox", start_qabox_tunnel), ("ssh", start_ssh_forward),
                                ("sshtunnel", start_plain_sshtunnel)):
                forwards[name] = start(bench, tester)
            for forward in forwards.values():  # warm up: first connections, lazy imports
                sequential_latencies(forward.port, 5)
            for _ in range(bench.repeats):  # interleaved, so drifts hit all three alike
                for name, forward in forwards.items():
                    latencies = sequential_latencies(forward.port, sequential)
                    load = concurrent_load(forward, TUNNEL_CLIENTS, seconds)
                    figures[name].append(dict(
                        p50=percentile(latencies, 50), p95=percentile(latencies, 95),
                        slow=sum(took > 0.03 for took in latencies) / len(latencies),
                        load=load, rate=load["rate"], cpu=load["cpu"] / load["requests"] * 1000,
                        bulk=bulk_rate(forward.port, bulk)))
            alone = app_alone(tester["port"], TUNNEL_CLIENTS, seconds)
            reconnect = first_served({name: f.port for name, f in forwards.items()}, cut_link(LINK_DOWN))
            still = forwards["qabox"].proc.poll() is None
        finally:
            try:
                for forward in forwards.values():
                    forward.stop()
            finally:
                remove_tester(tester)
    finally:
        target.reset()
    log = forwards["qabox"].log.read_text(errors="replace")
    return tunnel_rows(figures, alone, reconnect, still, log, sequential, seconds, bulk)


def median_of(runs: list[dict], key: str) -> float:
    """The median of one figure over the repeats."""
    return statistics.median(r[key] for r in runs)


def tunnel_rows(figures: dict[str, list[dict]], alone: dict, reconnect: dict[str, float | None],
                still: bool, log: str, sequential: int, seconds: float, bulk: int) -> list[Row]:
    """Each figure for qabox tunnel, then sshtunnel with its defaults, each against ssh -L, whose
    own figure comes last."""
    q, s, t = figures["qabox"], figures["ssh"], figures["sshtunnel"]
    repeats = f"median of {len(q)} runs" if len(q) > 1 else "1 run"
    failed = sum(r["load"]["failed"] for runs in figures.values() for r in runs)
    client_cpu = max(r["load"]["client_cpu"] for runs in figures.values() for r in runs)

    def three(name: str, key: str, unit: str, scale: float = 1, notes: tuple[str, ...] = ("", "", "")):
        qabox, plain, ssh_l = (median_of(runs, key) * scale for runs in (q, t, s))
        return [compared(f"{name}, qabox tunnel", qabox, unit, ssh_l, note=notes[0]),
                compared(f"{name}, sshtunnel", plain, unit, ssh_l, note=notes[1]),
                Row(f"{name}, ssh -L", ssh_l, unit, note=notes[2])]

    p50_ok = median_of(q, "p50") <= 1.5 * median_of(s, "p50")
    rate_ok = median_of(q, "rate") >= 0.7 * median_of(s, "rate")
    rows = three("1 client, GET / p50", "p50", "ms", 1000, (
        target_note(p50_ok, "<= 1.5x ssh -L"),
        "no TCP_NODELAY on its SSH socket: Nagle waits on delayed ACKs",
        f"{sequential} GET / one by one, a new connection each; {repeats}"))
    rows += three("1 client, GET / p95", "p95", "ms", 1000, notes=tuple(
        f"{median_of(runs, 'slow'):.0%} of requests over 30 ms" for runs in (q, t, s)))
    rows += three(f"{TUNNEL_CLIENTS} connections", "rate", "req/s", notes=(
        target_note(rate_ok, ">= 0.7x ssh -L"),
        f"GET / for {seconds:.0f} s; failed requests, all three: {failed}",
        f"the bench's client threads used up to {client_cpu:.2f} CPU"))
    rows.append(Row(f"{TUNNEL_CLIENTS} connections, app alone in lab1", alone["requests"] / alone["seconds"],
                    "req/s", note=f"the same load to the app's port, no SSH; failed {alone['failed']}"))
    rows += three("CPU per 1000 requests", "cpu", "s", notes=(
        f"utime+stime of the forwarding process in the {TUNNEL_CLIENTS}-connection run",
        "in a python process of its own, measured the same way",
        "the ssh client process (sshd's share is in no row)"))
    rows += three("1 MiB responses", "bulk", "MB/s", notes=(f"{bulk} GET {BIG} one by one", "", ""))
    how = "it reconnected" if "reconnecting" in log else "the same link carried on"
    if not still:
        how += "; the tunnel process EXITED"

    def after_cut(name: str, label: str, note: str = "") -> Row:
        served = reconnect[name]
        missing = f"no answer within {SERVED_WITHIN:.0f} s"
        return Row(label, SERVED_WITHIN if served is None else served, "s",
                   note="; ".join(filter(None, [note, missing if served is None else ""])))

    ok = reconnect["qabox"] is not None and reconnect["qabox"] < 2
    cut = f"link down {LINK_DOWN:.0f} s: link up to served"
    return rows + [
        after_cut("qabox", f"{cut}, qabox tunnel",
                  f"{target_note(ok, '< 2 s')}; {how}; a new try every 0.1 s"),
        after_cut("sshtunnel", f"{cut}, sshtunnel"),
        after_cut("ssh", f"{cut}, ssh -L"),
    ]

