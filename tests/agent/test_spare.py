"""The spare app process (agent/spare.py): once a release runs, its supervisor
keeps a warm process of its virtualenv, handed the next release that fits and
ended whenever it no longer would. Host-side, through the .pyz, no SSH."""

from __future__ import annotations

import glob
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Host, free_port, local_get, new_key, wait_until, wsgi_build
from qabox.agent.procs import pid_alive

pytestmark = pytest.mark.network  # the app server's wheels, downloaded once into .cache/wheels

WSGI = """
import os

try:
    import shadowme  # in the virtualenv, or the release's own (test 2)
    SHADOW = shadowme.WHO
except ImportError:
    SHADOW = "none"
try:
    import slowfail  # imports in a release's directory only (the last test)
except ImportError:
    pass

def app(environ, start_response):
    answers = {"/pid": str(os.getpid()), "/release": os.environ["QABOX_RELEASE"], "/cwd": os.getcwd(),
               "/shadow": SHADOW,
               "/env": repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("CFG_")))}
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [answers.get(environ["PATH_INFO"], "VERSION").encode()]
"""


@pytest.fixture(scope="module")
def box(module_host, tmp_path_factory):
    """A host, and build(env, version, **files) -> a new build answering ``version``."""
    top = tmp_path_factory.mktemp("spare")
    n = [0]

    def build(version: str, **files) -> Path:
        n[0] += 1
        return wsgi_build(top / f"b{n[0]}.tar.gz", files={"wsgi.py": WSGI.replace("VERSION", version), **files})

    return {"host": module_host, "build": build, "ports": {}}


def deploy(box, env: str, version: str, files: dict = None, **request) -> dict:
    """Deploy a new build of ``version`` to ``env`` (its port picked once), checked to serve it."""
    port = box["ports"].setdefault(env, free_port())
    result = box["host"].deploy(box["build"](version, **(files or {})), env, port, **request)
    assert result["ok"] and result["changed"], result
    assert local_get(port) == (200, version)
    return dict(result["data"], pid=int(local_get(port, "/pid")[1]))


def env_dir(local: Host, env: str) -> Path:
    return Path(local.base) / "envs" / env


def serve_spec(pid: int):
    """The spec on a process's command line if it runs ``serve``, else None."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return json.loads(args[args.index(b"serve") + 1]) if b"serve" in args else None


def spares(local: Host, env: str) -> list[int]:
    """The env's waiting spares: started as spares, never handed a release."""
    found = []
    for pid in local.processes():
        spec = serve_spec(pid)
        if spec and spec.get("spare") and spec["env"] == env and \
                not (env_dir(local, env) / "run" / f"app-{pid}.json").exists():
            found.append(pid)
    return found


def ready(pid: int) -> bool:
    """Whether a spare is done importing: it has closed its ready pipe (spare.py)."""
    spec = serve_spec(pid)
    return spec is not None and not os.path.lexists(f"/proc/{pid}/fd/{spec['ready_fd']}")


def one_spare(local: Host, env: str, besides: tuple = (), timeout: float = 10, imported: bool = True) -> int:
    """The env's spare once there is exactly one (other than ``besides``), done importing if ``imported``."""
    found = wait_until(lambda: (lambda s: len(s) == 1 and s[0] not in besides and (ready(s[0]) or not imported)
                                and s)(spares(local, env)), timeout)
    assert found, (spares(local, env), log(local, env))
    return found[0]


def log(local: Host, env: str) -> str:
    return (env_dir(local, env) / "logs" / "supervisor.log").read_text()


def status(local: Host, env: str) -> dict:
    (found,) = local.data("status", env=env)["envs"]
    return found


def venv_dir(local: Host, env: str, release: str) -> Path:
    venv = json.loads((env_dir(local, env) / "releases" / release / "release.json").read_text())["venv"]
    return env_dir(local, env) / "venvs" / venv


def site_packages(local: Host, env: str, release: str) -> Path:
    (found,) = glob.glob(str(venv_dir(local, env, release) / "lib" / "python*" / "site-packages"))
    return Path(found)


def listening(port: int) -> bool:
    """Whether any process listens on this TCP port (IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
    return False


def supervisor_pid(local: Host, env: str) -> int:
    return status(local, env)["supervisor_pid"]


def test_a_spare_follows_a_release_and_is_handed_the_next_one(box):
    local = box["host"]
    first = deploy(box, "main", "v1")
    live = time.monotonic()
    spare = one_spare(local, "main")
    waited = time.monotonic() - live
    assert 0.5 < waited < 5, waited  # a second after the switch, once the deploy is done
    assert spare != first["pid"] and serve_spec(spare)["release_dir"].endswith(first["release"])
    second = deploy(box, "main", "v2")
    assert f"(pid {spare}, a spare)" in log(local, "main")
    assert second["pid"] == spare and status(local, "main")["pid"] == spare
    port = box["ports"]["main"]
    release_dir = str(env_dir(local, "main") / "releases" / second["release"])
    assert local_get(port, "/pid") == (200, str(spare))
    assert local_get(port, "/release") == (200, second["release"])
    assert local_get(port, "/cwd") == (200, release_dir) and os.readlink(f"/proc/{spare}/cwd") == release_dir
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{spare}/environ").read_text().split("\0") if "=" in v)
    assert environ["QABOX_RELEASE"] == first["release"]  # what it was started with; the app sees v2's (above)
    handed = json.loads((env_dir(local, "main") / "run" / f"app-{spare}.json").read_text())
    assert handed["release_dir"] == release_dir
    assert one_spare(local, "main", besides=(spare,)) != spare  # and a new spare follows
    assert wait_until(lambda: not pid_alive(first["pid"]), 10)  # v1 retired
    state = json.loads((env_dir(local, "main") / "state.json").read_text())
    assert state["pid"] == spare and state["release"] == second["release"] and state["state"] == "running"


def test_a_handed_spare_is_adopted_by_a_new_supervisor_with_its_release(box):
    local = box["host"]
    live = status(local, "main")
    assert serve_spec(live["pid"]).get("spare")  # the app is the handed spare of the last test
    spare = one_spare(local, "main")
    os.kill(live["supervisor_pid"], signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(spare), 5), "the spare outlived its supervisor"
    assert wait_until(lambda: not pid_alive(live["supervisor_pid"]), 5)
    revived = status(local, "main")  # status revives a dead supervisor
    assert revived["supervisor_revived"] and revived["supervisor_pid"] != live["supervisor_pid"]
    assert revived["pid"] == live["pid"] and revived["release"] == live["release"], revived
    assert f"adopted {live['release']} (pid {live['pid']})" in log(local, "main")
    assert local_get(box["ports"]["main"], "/pid") == (200, str(live["pid"]))
    one_spare(local, "main", besides=(spare,))  # the new supervisor keeps one too
    third = deploy(box, "main", "v3")  # and hands it the next release
    assert f"(pid {third['pid']}, a spare)" in log(local, "main")


def test_a_spare_that_cannot_record_its_release_starts_afresh(box):
    """Its record (run/app-PID.json) is how a new supervisor would know what it serves:
    a directory in its place stands for a full disk."""
    local, port = box["host"], box["ports"]["main"]
    spare = one_spare(local, "main")
    record = env_dir(local, "main") / "run" / f"app-{spare}.json"
    record.mkdir()
    try:
        fresh = deploy(box, "main", "v2b")
        assert fresh["pid"] == spare and f"(pid {spare}, a spare)" in log(local, "main"), log(local, "main")
        assert not serve_spec(spare).get("spare")  # exec'd: its command line names its release
        assert serve_spec(spare)["release_dir"].endswith(fresh["release"])
        assert local_get(port, "/release") == (200, fresh["release"])
    finally:
        record.rmdir()


def test_a_release_that_provides_a_module_the_spare_imported_starts_afresh(box):
    local, port = box["host"], box["ports"]["main"]
    release = status(local, "main")["release"]
    site = site_packages(local, "main", release)
    (site / "shadowme.py").write_text('WHO = "venv"\n')
    try:
        with local.session("main") as call:
            assert call("restart", env="main")["ok"]  # this process imports it, and records it
        assert local_get(port, "/shadow") == (200, "venv")
        assert "shadowme" in json.loads((venv_dir(local, "main", release) / "qabox-modules.json").read_text())
        spare = one_spare(local, "main", besides=spares(local, "main"))
        shipped = deploy(box, "main", "v4", files={"shadowme.py": 'WHO = "release"\n'})
        assert shipped["pid"] == spare and f"(pid {spare}, a spare)" in log(local, "main")
        assert local_get(port, "/shadow") == (200, "release")  # the release's own copy
        assert local_get(port, "/pid") == (200, str(spare))  # the same process, exec'd
        assert not serve_spec(spare).get("spare")  # a fresh app's command line
        assert status(local, "main")["pid"] == spare
    finally:
        (site / "shadowme.py").unlink()


def test_spare_app_false_keeps_none_and_true_brings_one_back(box):
    local = box["host"]
    deploy(box, "main", "v5", spare_app=False)
    assert wait_until(lambda: not spares(local, "main"), 5), spares(local, "main")
    settings = json.loads((env_dir(local, "main") / "env.json").read_text())
    assert settings["spare_app"] is False
    seen = set()
    deadline = time.monotonic() + 4  # more than SPARE_CHECK twice: none comes back
    while time.monotonic() < deadline:
        seen.update(spares(local, "main"))
        time.sleep(0.1)
    assert not seen
    deploy(box, "main", "v6", spare_app=True)
    one_spare(local, "main")


def test_stop_and_sigterm_end_the_spare_and_a_killed_supervisors_spare_exits(box):
    local, port = box["host"], box["ports"]["main"]
    spare = one_spare(local, "main")
    with local.session("main") as call:
        assert call("stop", env="main")["ok"]
    assert not pid_alive(spare)
    assert wait_until(lambda: not [p for p in local.processes() if serve_spec(p) and serve_spec(p)["env"] == "main"]
                      and not listening(port), 10), local.processes()
    with local.session("main") as call:
        assert call("start", env="main")["ok"]
    spare = one_spare(local, "main")
    live = status(local, "main")
    os.kill(live["supervisor_pid"], signal.SIGTERM)  # it leaves; the app keeps serving
    assert wait_until(lambda: not pid_alive(live["supervisor_pid"]), 5)
    assert not pid_alive(spare) and "the app keeps running" in log(local, "main")
    assert pid_alive(live["pid"]) and local_get(port, "/pid") == (200, str(live["pid"]))
    assert status(local, "main")["supervisor_revived"]
    spare = one_spare(local, "main")
    sup = supervisor_pid(local, "main")
    os.kill(sup, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(spare), 5), "the spare outlived its killed supervisor"
    assert status(local, "main")["supervisor_revived"]
    one_spare(local, "main")


def test_testers_added_or_removed_end_the_spare_and_a_removed_testers_port_closes(box, tmp_path):
    local = box["host"]
    spare = one_spare(local, "main")
    key = new_key(tmp_path / "ann")
    added = local.call("tester-add", name="ann", key=key.with_suffix(".pub").read_text(),
                       sshd="SSH-2.0-OpenSSH_9.2p1", by="tests")
    assert added["ok"], added
    tester_port = added["data"]["ports"]["main"]
    assert not pid_alive(spare)  # it held the sockets of before
    assert local_get(tester_port) == (200, "v6")
    spare = one_spare(local, "main", besides=(spare,))
    assert sorted(serve_spec(spare)["sockets"]) == ["", "ann"]  # the tester's port too
    assert local.call("tester-remove", name="ann")["ok"]
    assert not pid_alive(spare)
    assert wait_until(lambda: not listening(tester_port), 5), "a removed tester's port still listens"
    assert local_get(tester_port)[0] == 0
    spare = one_spare(local, "main", besides=(spare,))
    handed = deploy(box, "main", "v7")  # the spare of now fits
    assert handed["pid"] == spare


def test_a_config_change_starts_cold_then_a_spare_with_the_new_environment_follows(box):
    local, port = box["host"], box["ports"]["main"]
    old = one_spare(local, "main")
    with local.session("main") as call:
        assert call("config-change", env="main", set={"CFG_NEW": "yes"})["ok"]
        restarted = call("restart", env="main")
    assert restarted["ok"], restarted
    pid = restarted["data"]["pid"]
    assert pid != old and not pid_alive(old) and f"(pid {pid}, a spare)" not in log(local, "main")
    assert local_get(port, "/env") == (200, repr([("CFG_NEW", "yes")]))
    spare = one_spare(local, "main", besides=(old,))
    assert "CFG_NEW=yes" in Path(f"/proc/{spare}/environ").read_text().split("\0")
    handed = deploy(box, "main", "v8")
    assert handed["pid"] == spare and local_get(port, "/env") == (200, repr([("CFG_NEW", "yes")]))


def test_a_spare_stops_importing_at_a_module_it_cannot_import_and_is_still_handed_releases(box):
    local = box["host"]
    live = status(local, "main")
    modules = venv_dir(local, "main", live["release"]) / "qabox-modules.json"
    os.kill(live["supervisor_pid"], signal.SIGTERM)  # no app starts (it would record its modules anew)
    assert wait_until(lambda: not pid_alive(live["supervisor_pid"]), 5)
    modules.write_text(json.dumps(["qabox_no_such_module"] + json.loads(modules.read_text())))
    assert status(local, "main")["supervisor_revived"]  # it adopts the app and starts a spare
    spare = one_spare(local, "main")  # ready at once: it stopped at the first module, as if never tried
    handed = deploy(box, "main", "v9")
    assert handed["pid"] == spare and f"(pid {spare}, a spare)" in log(local, "main")
    assert "qabox_no_such_module" not in modules.read_text()  # the new app recorded what it imported
    one_spare(local, "main", besides=(spare,))


SLOWFAIL = """
import os, time
if not os.path.exists("wsgi.py"):  # a spare's directory is the env's: it cannot import this
    time.sleep(3)
    raise ImportError("slowfail needs a release's directory")
"""


def test_a_spare_still_importing_at_a_switch_is_ended_and_the_release_starts_afresh(box):
    local = box["host"]
    release = status(local, "main")["release"]
    site = site_packages(local, "main", release)
    (site / "slowfail.py").write_text(SLOWFAIL)
    try:
        with local.session("main") as call:
            assert call("restart", env="main")["ok"]  # this process imports it, and records it
        assert "slowfail" in json.loads((venv_dir(local, "main", release) / "qabox-modules.json").read_text())
        spare = one_spare(local, "main", besides=spares(local, "main"), imported=False)  # importing it for 3 s
        assert not ready(spare)
        cold = deploy(box, "main", "v10")  # not ready: ended, and the release starts afresh
        assert cold["pid"] != spare and not pid_alive(spare)
        assert f"(pid {cold['pid']}, a spare)" not in log(local, "main")
        # the next spare stops at slowfail (it needs a release's directory) and is ready, not ended
        assert one_spare(local, "main", besides=(spare,), timeout=15)
    finally:
        (site / "slowfail.py").unlink()
