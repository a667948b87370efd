"""The cli section: what one qabox command costs before any work is done.

`qabox --help` (start-up and imports); `qabox status --host lab1` against
`ssh lab1 true` with the same ssh_config, now and with the client and agent of
the last commit before the agent became a .pyz; and one agent `status` call
timed on lab1 itself (no SSH), the single-file agent of before against the .pyz,
both run by the host's /usr/bin/python3 with the same request.  The status
figures look at base dirs of this run's own, with no env in them: they measure
the fixed cost of a call (start-up, imports, protocol, SSH), which is what the
.pyz and lazy imports change.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from qabox.agent_zip import AGENT_HASH, AGENT_PYZ

from .harness import Bench, Row, compared, run, target_note, timed
from .target import HOST, HOSTS_DIR, PROGRAMS, QABOX, REPO, SSH_CONFIG, ssh

BEFORE_PYZ = "f0cf96f"  # the last commit with the agent as one file, src/qabox/agent.py


def before_pyz(bench: Bench) -> Path:
    """src/ of the last commit before the .pyz, from git: its qabox runs with today's venv."""
    dest = bench.tmp / "before-pyz"
    dest.mkdir()
    run("git", "-C", REPO, "archive", "-o", dest / "src.tar", BEFORE_PYZ, "src/qabox")
    run("tar", "-xf", dest / "src.tar", "-C", dest)
    return dest / "src"


def client_env(bench: Bench, name: str, base: str, src: Path | None = None) -> dict[str, str]:
    """The environment of a qabox whose lab1 keeps its files in `base`, with a state dir
    of its own, and its code from `src` if given (else the installed qabox)."""
    hosts = bench.tmp / f"{name}-hosts"
    hosts.mkdir()
    settings = HOSTS_DIR / f"{HOST}.toml"
    text = settings.read_text() if settings.exists() else ""
    (hosts / f"{HOST}.toml").write_text(f'{text}\ndir = "{base}"\n')
    env = dict(os.environ, QABOX_HOSTS_DIR=str(hosts), QABOX_STATE_DIR=str(bench.tmp / f"{name}-state"))
    if src:
        env["PYTHONPATH"] = str(src)
    return env


def agent_calls(bench: Bench, old_agent: Path, base: str, rounds: int) -> dict[str, list[float]]:
    """Seconds of each agent status call on lab1, in rounds of one call of each:
    {"before": [...], "now": [...]}."""
    remote = f"{base}/bench"
    files = bench.tmp / "cli-agents"
    files.mkdir()
    names = {"before": "agent-before.py", "now": f"agent-{AGENT_HASH}.pyz"}
    shutil.copy(old_agent, files / names["before"])
    (files / names["now"]).write_bytes(AGENT_PYZ)
    shutil.copy(PROGRAMS / "agent_timer.py", files)
    ssh(f"mkdir -p {shlex.quote(remote)}")
    run("scp", "-q", "-F", SSH_CONFIG, *files.iterdir(), f"{HOST}:{remote}/")
    # the request qabox's remote.py sends, protocol 1 (what both agents speak)
    request = json.dumps({"protocol": 1, "cmd": "status", "args": {"base": base}})
    command = ["/usr/bin/python3", f"{remote}/agent_timer.py", str(rounds), request,
               *(f"{remote}/{name}" for name in names.values())]
    seconds = json.loads(ssh(shlex.join(command), timeout=60 + 10 * rounds).stdout)["seconds"]
    return {which: seconds[f"{remote}/{name}"] for which, name in names.items()}


def section(bench: Bench) -> list[Row]:
    """`qabox --help`, `qabox status` against `ssh true` now and before the .pyz, and the
    agent call on the host before and after the .pyz."""
    runs = 3 if bench.quick else 10
    src = before_pyz(bench)
    bases = {"before": f".qabox-bench{os.getpid()}b", "now": f".qabox-bench{os.getpid()}c"}
    envs = {"before": client_env(bench, "before", bases["before"], src),
            "now": client_env(bench, "now", bases["now"])}
    status = [sys.executable, "-m", "qabox", "status", "--host", HOST, "--json"]
    walls: dict[str, list[float]] = {"before": [], "now": [], "ssh": []}
    try:
        for env in envs.values():
            run(*status, env=env)  # pushes the agent: first use, not what is timed
        help_wall = statistics.median(timed(lambda: run(QABOX, "--help")) for _ in range(runs))
        for _ in range(runs):  # interleaved, so drifts hit all alike
            for which, env in envs.items():
                walls[which].append(timed(lambda: run(*status, env=env)))
            walls["ssh"].append(timed(lambda: ssh("true")))
        calls = agent_calls(bench, src / "qabox" / "agent.py", bases["now"], runs)
    finally:
        ssh(shlex.join(["rm", "-rf", *bases.values()]))
    wall = {which: statistics.median(seconds) * 1000 for which, seconds in walls.items()}
    call = {which: statistics.median(seconds) * 1000 for which, seconds in calls.items()}
    since = wall["now"] / wall["before"]
    return [
        Row("qabox --help, wall", help_wall * 1000, "ms",
            note=f"{target_note(help_wall < 0.3, '< 300 ms')}; median of {runs}"),
        compared(f"qabox status --host {HOST}, wall", wall["now"], "ms", wall["ssh"],
                 note=f"{target_note(wall['now'] <= 1.5 * wall['ssh'], '<= 1.5x')}; baseline: ssh {HOST} "
                      f"true, same ssh_config; {since:.2f}x the wall before the .pyz "
                      f"({target_note(since <= 1.1, 'within 1.10x')}); median of {runs}"),
        compared(f"qabox status --host {HOST}, wall, before the .pyz", wall["before"], "ms", wall["ssh"],
                 note=f"the client and agent of {BEFORE_PYZ}"),
        Row("agent status call, before the .pyz", call["before"], "ms",
            note=f"on {HOST} with /usr/bin/python3, no SSH: agent.py of {BEFORE_PYZ}"),
        compared("agent status call, now", call["now"], "ms", call["before"],
                 note=f"{target_note(call['now'] <= 1.1 * call['before'], 'within 1.10x')}; "
                      f"agent-{AGENT_HASH}.pyz; median of {runs}"),
    ]
