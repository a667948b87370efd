"""The tunnel section's load straight to the app's port, run in lab1's namespace
with the host's python, no SSH: what the app itself serves on this machine.

    python3 app_alone.py PORT CLIENTS SECONDS     prints one JSON object
"""
import http.client, json, sys, threading, time
port, clients, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
done, lock = [0, 0], threading.Lock()  # failed, answered
deadline = time.monotonic() + seconds
def client():
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            ok = response.status == 200 and bool(response.read())
        except OSError:
            ok = False
        conn.close()
        with lock:
            done[ok] += 1
started = time.monotonic()
threads = [threading.Thread(target=client) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"requests": done[1], "failed": done[0], "seconds": time.monotonic() - started}))
