"""The cli section: what one qabox command costs before any work is done.

`qabox --help` (start-up and imports), `qabox status --host lab1` against
`ssh lab1 true` with the same ssh_config, and one agent `status` call timed on
lab1 itself (no SSH), the single-file agent of before the .pyz against the agent
qabox ships now, both run by the host's /usr/bin/python3 with the same request.
Both status figures look at a base dir of this run's own, with no env in it:
they measure the fixed cost of a call (start-up, imports, protocol, SSH), which
is what the .pyz and lazy imports change.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
from importlib.util import find_spec

from .harness import Bench, Row, compared, run, target_note, timed
from .target import HOST, HOSTS_DIR, PROGRAMS, QABOX, REPO, SSH_CONFIG, ssh

BEFORE_PYZ = "f0cf96f"  # the last commit with the agent as one file, src/qabox/agent.py


def agents() -> dict[str, bytes]:
    """The agent before the .pyz and the current one, by the file name each gets on the
    host: the .pyz once qabox.agent_zip exists, else the current src/qabox/agent.py."""
    before = run("git", "-C", REPO, "show", f"{BEFORE_PYZ}:src/qabox/agent.py").stdout.encode()
    if find_spec("qabox.agent_zip") is None:
        return {"agent-before.py": before, "agent.py": (REPO / "src" / "qabox" / "agent.py").read_bytes()}
    from qabox.agent_zip import AGENT_HASH, AGENT_PYZ
    return {"agent-before.py": before, f"agent-{AGENT_HASH}.pyz": AGENT_PYZ}


def hosts_dir(bench: Bench, base: str) -> str:
    """A copy of hosts/ whose lab1 keeps qabox's files in `base`."""
    path = bench.tmp / "cli-hosts"
    path.mkdir()
    settings = HOSTS_DIR / f"{HOST}.toml"
    text = settings.read_text() if settings.exists() else ""
    (path / f"{HOST}.toml").write_text(f'{text}\ndir = "{base}"\n')
    return str(path)


def agent_calls(bench: Bench, base: str, rounds: int) -> list[tuple[str, list[float]]]:
    """Seconds of each agent status call on lab1, in rounds of one call of each agent:
    [(agent file name, seconds)], the one before the .pyz first."""
    remote = f"{base}/bench"
    files = bench.tmp / "cli-agents"
    files.mkdir()
    names = []
    for name, data in agents().items():
        (files / name).write_bytes(data)
        names.append(name)
    shutil.copy(PROGRAMS / "agent_timer.py", files)
    ssh(f"mkdir -p {shlex.quote(remote)}")
    run("scp", "-q", "-F", SSH_CONFIG, *files.iterdir(), f"{HOST}:{remote}/")
    # the request qabox's remote.py sends, protocol 1 (what both agents speak)
    request = json.dumps({"protocol": 1, "cmd": "status", "args": {"base": base}})
    command = ["/usr/bin/python3", f"{remote}/agent_timer.py", str(rounds), request,
               *(f"{remote}/{name}" for name in names)]
    seconds = json.loads(ssh(shlex.join(command), timeout=60 + 10 * rounds).stdout)["seconds"]
    return [(name, seconds[f"{remote}/{name}"]) for name in names]


def section(bench: Bench) -> list[Row]:
    """`qabox --help`, `qabox status` against `ssh true`, and the agent call before and after the .pyz."""
    runs = 3 if bench.quick else 10
    base = f".qabox-bench{os.getpid()}c"
    env = dict(os.environ, QABOX_HOSTS_DIR=hosts_dir(bench, base))
    status = [QABOX, "status", "--host", HOST, "--json"]
    try:
        run(*status, env=env)  # pushes the agent: first use, not what is timed
        help_wall = statistics.median(timed(lambda: run(QABOX, "--help")) for _ in range(runs))
        walls, logins = [], []
        for _ in range(runs):  # interleaved, so drifts hit both alike
            walls.append(timed(lambda: run(*status, env=env)))
            logins.append(timed(lambda: ssh("true")))
        calls = agent_calls(bench, base, runs)
    finally:
        ssh(f"rm -rf {shlex.quote(base)}")
    wall, login = statistics.median(walls), statistics.median(logins)
    (before, old), (now, new) = ((name, statistics.median(seconds)) for name, seconds in calls)
    return [
        Row("qabox --help, wall", help_wall * 1000, "ms",
            note=f"{target_note(help_wall < 0.3, '< 300 ms')}; median of {runs}"),
        compared(f"qabox status --host {HOST}, wall", wall * 1000, "ms", login * 1000,
                 note=f"{target_note(wall <= 1.5 * login, '<= 1.5x')}; baseline: ssh {HOST} true, "
                      f"same ssh_config; median of {runs}"),
        Row("agent status call, before the .pyz", old * 1000, "ms",
            note=f"on {HOST} with /usr/bin/python3, no SSH: {before} of {BEFORE_PYZ}"),
        compared("agent status call, now", new * 1000, "ms", old * 1000,
                 note=f"{target_note(new <= 1.1 * old, 'within 1.10x')}; {now}; median of {runs}"),
    ]
