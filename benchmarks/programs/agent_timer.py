"""Time agent calls on the host, where no SSH is in the way: each AGENT (a file
this python runs: an agent .py or .pyz) gets REQUEST (one JSON line) on stdin,
ROUNDS times in turn after one untimed round, and must answer "ok".

    python3 agent_timer.py ROUNDS REQUEST AGENT...     prints one JSON object:
    {"seconds": {AGENT: [seconds of each call]}}
"""
import json
import subprocess
import sys
import time

rounds, request, agents = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
seconds = {agent: [] for agent in agents}
for round in range(rounds + 1):
    for agent in agents:  # interleaved, so that drifts hit all alike
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, agent], input=request + "\n", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)
        took = time.perf_counter() - started
        lines = proc.stdout.splitlines()
        if proc.returncode or not lines or not json.loads(lines[-1]).get("ok"):
            last = (proc.stderr.strip().splitlines() or lines or ["no output"])[-1]
            sys.exit("%s failed (exit %d): %s" % (agent, proc.returncode, last))
        if round:
            seconds[agent].append(took)
print(json.dumps({"seconds": seconds}))
