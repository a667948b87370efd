"""Releases of an env: deploy, switch, prune, rollback, start, restart, stop."""

import errno
import glob
import os
import shutil
import time

from . import agents, testers
from .builds import Store, assemble
from .config import checked_environment, record_hosts_file, stored
from .control import ensure_supervisor, env_apps, foreign_listeners, revive, supervisor_call, supervisor_ping, \
    supervisor_state
from .envs import START_TIMEOUT, Env, all_envs, existing_env, update_settings
from .files import disk_full, is_port, iso, now, remove, write_json
from .persist import DEFAULT_SNAPSHOT_MAX_MB, checked_paths, drop_replaced, persist_release, \
    prune_snapshots, restore, snapshot_dir, undo_restore, unseed
from .procs import STOP_TIMEOUT, pid_alive, stop_group, wait_for
from .protocol import Fail
from .oneoff import run_release_hooks
from .rules import DEFAULT_HEALTH_STATUS, DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS, DEFAULT_PERSIST, HEALTH_PATH, \
    RELEASE_FILE, RELEASE_TIMEOUT, DEFAULT_SERVER, health_codes, parse_entry, release_hooks, server_problems, \
    static_problems
from .session import locked
from .sockets import bind_listener, free_port
from .venvs import cmd_python_info, prepare_venv
from .wheelcache import collect_wheel_caches


def new_release_id(env: Env) -> str:
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rid, n = base, 1
    while os.path.lexists(env.release_dir(rid)):
        n += 1
        rid = "%s-%d" % (base, n)
    return rid


SETTINGS = ("health_interval", "log_max_bytes", "start_timeout", "spare_app")  # of env.json, as a deploy may ask them
RECORDED = ("entry", "health", "health_status", "static", "environment", "release_hooks", "persist", "server",
            "server_options")
UNRECORDED = {"server": DEFAULT_SERVER, "server_options": {}}  # what a release of an older agent ran with  # release.json


def cmd_upload_state(req, io) -> dict:
    """What the host needs of a build, in one answer: nothing (the env serves it
    already, as asked: the deploy is done), its manifest, or the blobs it lacks
    (a delta) and how much of that was sent already (to resume); with a change,
    also the host's python (``python-info``), which qabox checks the build against
    before sending it: no request of its own."""
    env = locked(req, io)
    store = Store(env.base, env.name)
    if req.get("discard"):  # the client gave up on an upload (disk full)
        store.discard()
        return {"discarded": True, "free_bytes": shutil.disk_usage(store.base).free}
    same = unchanged(env, req)
    if same:
        return same
    mid = req["manifest"]
    told = {"free_bytes": shutil.disk_usage(store.base).free, "python": cmd_python_info(req, io)}
    if not os.path.isfile(store.manifest_path(mid)) and not req.get("uploaded"):
        store.discard()  # what was sent for another build, or half a manifest
        return dict(told, manifest_path=store.upload("manifest-" + mid))
    members = store.members(mid, int(req.get("max_bytes") or DEFAULT_MAX_BYTES),
                            int(req.get("max_members") or DEFAULT_MAX_MEMBERS),
                            uploaded=not os.path.isfile(store.manifest_path(mid)))
    return dict(store.delta(members), **told)


def unchanged(env: Env, req: dict) -> "dict | None":
    """A deploy's answer when it would change nothing (the env runs this build as
    asked: its app's settings, port, hosts file, env settings), found without
    writing anything; else None."""
    current = env.current()
    info = env.release_info(current) if current else {}
    if not current or info.get("sha256") != req.get("manifest") or \
            any(key in req and info.get(key, UNRECORDED.get(key)) != req[key] for key in RECORDED):
        return None
    if req.get("hosts_environment") is not None and \
            (stored(env).get("hosts_file") or {}) != req["hosts_environment"]:
        return None
    settings = env.settings()
    if any(req.get(key) is not None and settings.get(key) != req[key] for key in SETTINGS):
        return None
    pong = supervisor_ping(env)
    port = req.get("port") or settings.get("port") or (pong or {}).get("port")
    if not (pong and pong.get("state") == "running" and pong.get("port") == port):
        return None
    return {"unchanged": True, "release": current, "previous": current, "port": port,
            "testers": testers.connected_testers(env), "changed": False}


def cmd_deploy(req, io) -> dict:
    """Assemble an uploaded build as a new release and switch the env to it.

    The current release keeps serving until the new one passes its health
    check; on any failure the new release is removed and nothing else changes.
    """
    env = locked(req, io)
    env.ensure()
    mid = req["manifest"]
    started = time.monotonic()
    current = env.current()
    settings = env_settings(env, req)
    testers.give_ports(env.base)
    health = req.get("health") or "/"
    hooks = release_hooks(req.get("release_hooks") or [])
    if not HEALTH_PATH.fullmatch(health):
        raise Fail("bad_build", "the health path %r is not a URL path: use one like \"/health\" "
                   "(printable characters, no spaces) in the build's qabox.toml" % health)
    health_status = req.get("health_status") or DEFAULT_HEALTH_STATUS
    try:
        health_codes(health_status)
        parse_entry(req["entry"])
    except ValueError as e:
        raise Fail("bad_build", str(e))
    static = req.get("static") or {}
    problems = static_problems(static)
    if problems:
        raise Fail("bad_build", "qabox.toml: " + "; ".join(problems))
    server, server_options = req.get("server") or DEFAULT_SERVER, req.get("server_options") or {}
    problems = server_problems(server, server_options, "the build's qabox.toml")
    if problems:
        raise Fail("bad_build", "; ".join(problems))
    defaults = checked_environment(req.get("environment") or {}, "[app.environment] in the build's qabox.toml")
    hosts_changed = record_hosts_file(env, req.get("hosts_environment"))
    persist = req.get("persist", DEFAULT_PERSIST)
    paths = checked_paths(persist)
    max_snapshot = req.get("snapshot_max_bytes")
    max_snapshot = DEFAULT_SNAPSHOT_MAX_MB * 2**20 if max_snapshot is None else int(max_snapshot)
    same = None if hosts_changed else unchanged(env, req)
    if same:
        return same
    store = Store(env.base, env.name)
    members = store.members(mid, int(req.get("max_bytes") or DEFAULT_MAX_BYTES),
                            int(req.get("max_members") or DEFAULT_MAX_MEMBERS))
    release = new_release_id(env)
    rdir = env.release_dir(release)
    tmp = env.path("releases", "." + release + ".tmp")
    seeded, hooks_ran = [], False
    try:
        store.take_delta(members)
        io.emit({"progress": "extracting"})
        for name in os.listdir(env.path("releases")):  # left by an agent killed midway (we hold the lock)
            if name.startswith(".") and name.endswith(".tmp"):
                remove(env.path("releases", name))
        assemble(store, members, tmp)
        io.check()
        snapshot, seeded = persist_release(env, release, tmp, paths, max_snapshot)
        io.check()
        venv = prepare_venv(env, tmp, io)
        io.check()
        info = {
            "release": release,
            "sha256": mid,  # the build's identity: its manifest's
            "file": req.get("file"),
            "entry": req["entry"],
            "health": health,
            "health_status": health_status,
            "static": static,
            "server": server,
            "server_options": server_options,
            "venv": venv["key"],
            "persist": persist,
            "deployed_at": iso(now()),
            "deployed_by": req.get("by"),
            "environment": defaults,
            "release_hooks": hooks,
            "release_timeout": float(req.get("release_timeout") or RELEASE_TIMEOUT),
        }
        write_json(os.path.join(tmp, RELEASE_FILE), info)
        os.rename(tmp, rdir)
        io.check()
        hooks_ran = bool(hooks)
        run_release_hooks(env, release, info, io)
        io.emit({"progress": "starting"})
        switch_to(env, release, settings)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if env.current() == release:
            pass  # it failed after the switch: the release is live, and it stays
        else:
            if hooks_ran and isinstance(e, Fail) and e.code not in ("hook_failed", "hook_timeout"):
                e.message += " (its release hooks had run: the env's data is as they left it)"
            shutil.rmtree(rdir, ignore_errors=True)
            unseed(env, seeded)
            shutil.rmtree(snapshot_dir(env, release), ignore_errors=True)
            full = isinstance(e, OSError) and e.errno == errno.ENOSPC
            if full or getattr(e, "code", None) == "disk_full":
                store.discard()  # it cannot be assembled here anyway: give its space back
                store.gc(grace=0)
            if full:
                raise disk_full(env.base)
            raise
    pruned = prune(env, int(req.get("keep") or 5))
    return {
        "release": release,
        "previous": current,
        "port": settings["port"],
        "venv_created": venv["created"],
        "wheels_linked": venv["linked"],
        "wheels_installed": venv["installed"],
        "pruned": pruned,
        "snapshot_skipped": snapshot["skipped"],
        "testers": testers.connected_testers(env),
        "seconds": round(time.monotonic() - started, 2),
        "changed": True,
    }


def env_settings(env: Env, req: dict) -> dict:
    """The env's recorded settings, updated with what this request asks.

    The port is as asked, else as recorded (or served), else the first free
    one from 8080 that no other env on the host has taken. A new port is
    recorded only once it is bound (see switch_to): a refused one changes
    nothing, and it is refused here already, before any work is done.
    """
    settings = env.settings()
    others = {name: Env(env.base, name).settings(strict=False).get("port")
              for name in all_envs(env.base) if name != env.name}
    pong = supervisor_ping(env)
    serving = pong.get("port") if pong else None
    port = req.get("port")
    if port:
        if not is_port(port):
            raise Fail("bad_request", "port %r is not a port from 1 to 65535" % (port,))
        taken = [name for name, p in others.items() if p == port]
        if taken:
            raise Fail("port_in_use", "port %d is already the port of env %s on this host: "
                       "pick another with --port" % (port, taken[0]))
        if port not in (serving, settings.get("port")):
            bind_listener(port).close()
    update_settings(env, **{key: req[key] for key in SETTINGS if req.get(key) is not None})
    settings = env.settings()
    settings["port"] = port or settings.get("port") or serving or free_port(8080, set(others.values()))
    return settings


def switch_to(env: Env, release: str, settings: dict) -> dict:
    """Have the env's supervisor serve ``release`` on the settings' port, live
    only once it is healthy; the port is recorded once the switch is done.

    A supervisor that dies during the switch is revived (it adopts what
    serves and ends the rest), and the answer is whatever is live then.
    """
    held = foreign_listeners(env, settings["port"])
    if held:
        raise Fail("port_taken", held[0] + ": stop that process (or remove the tester "
                   "whose key made it), then try again; nothing was changed")
    update_settings(env, stopped=False)
    port = settings["port"]
    ensure_supervisor(env, port)
    timeout = float(settings.get("start_timeout") or START_TIMEOUT)
    request = {"cmd": "switch", "release": release, "timeout": timeout, "port": port}
    try:
        result = supervisor_call(env, request, timeout=timeout + STOP_TIMEOUT + 10)
    except (Fail, OSError) as e:  # no answer: it died (a Fail: it closed the socket) or hangs
        revive(env)
        live = env.current()
        if live != release:
            raise Fail("supervisor", "the supervisor of env %s %s while switching to release %s, and was "
                       "restarted: %s; deploy again" % (
                           env.name, "died" if isinstance(e, Fail) else "failed (%s)" % (e.strerror or e),
                           release, "release %s keeps serving" % live if live else "nothing was deployed"))
        pong = supervisor_ping(env) or {}
        result = {"ok": True, "pid": (pong.get("record") or {}).get("pid")}
    if not result.get("ok"):
        err = result.get("error", {})
        raise Fail(err.get("code", "start_failed"), err.get("message", "the app did not start"),
                   log=err.get("log", []))
    update_settings(env, port=port)
    agents.prune()  # versions nothing runs (the supervisor prunes again once the old app is retired)
    return result


def prune(env: Env, keep: int) -> list:
    """Delete releases beyond the newest ``keep``, never the current one,
    then the virtualenvs, manifests and blobs no kept release uses, and the
    cached wheels no virtualenv on the host links.

    Pruning runs under the env's deploy lock, as do rollbacks, so it never
    races a rollback to the release it would delete."""
    current = env.current()
    releases = env.releases()
    old = [r for r in releases[: max(0, len(releases) - keep)] if r != current]
    for app in env_apps(env):
        if app["release"] in old:  # replaced, and still draining (the supervisor retires it meanwhile)
            wait_for(lambda: not pid_alive(app["pid"]), STOP_TIMEOUT + 1)
    for release in old:
        shutil.rmtree(env.release_dir(release), ignore_errors=True)
        for log in glob.glob(env.path("logs", release + ".log*")):
            os.unlink(log)
    prune_snapshots(env, env.releases())
    kept = [env.release_info(r) for r in env.releases()]
    venvs = {i.get("venv") for i in kept}
    for key in os.listdir(env.path("venvs")):
        if key not in venvs:
            shutil.rmtree(env.path("venvs", key), ignore_errors=True)
    collect_wheel_caches(env.base)  # entries no venv of any env links any more
    Store(env.base).gc()
    return old


def cmd_rollback(req, io) -> dict:
    """Switch back to the previous (or the named) kept release, zero-downtime.

    The env's data stays as it is, unless ``with_data``: then it goes back to
    the snapshot taken before the release after the target was deployed (the
    data as it was when the target was left), put back as it was if the
    switch fails."""
    env = locked(req, io)
    current = env.current()
    releases = env.releases()
    target = req.get("to")
    if target:
        if target not in releases:
            raise Fail("no_release", "release %r is not kept on this host; kept: %s"
                       % (target, ", ".join(releases) or "none"))
    else:
        older = [r for r in releases if current is None or r < current]
        if not older:
            raise Fail("no_release", "there is no release before %s to roll back to" % current)
        target = older[-1]
    if req.get("with_data"):
        return rollback_with_data(env, current, target)
    if target == current and supervisor_state(env) == "running":
        return {"release": current, "previous": current, "changed": False}
    switch_to(env, target, env_settings(env, {}))
    return {"release": target, "previous": current, "changed": True}


def rollback_with_data(env: Env, current: str, target: str) -> dict:
    if current is None or target >= current:
        raise Fail("no_snapshot", "--with-data goes back to an older release, and %s is not older than "
                   "the current one (%s): roll back without --with-data" % (target, current or "none"))
    left = [r for r in env.releases() if r > target][0]  # deployed when the target was left
    settings = env_settings(env, {})
    manifest = restore(env, left)
    try:
        switch_to(env, target, settings)
    except BaseException:
        undo_restore(env, manifest["paths"])
        raise
    drop_replaced(env)
    return {"release": target, "previous": current, "data_from": left, "changed": True}


def cmd_start(req, io) -> dict:
    """Start the env's current release if it is not running (clears ``crashed``)."""
    env = locked(req, io)
    current = env.current()
    if current is None:
        raise Fail("no_release", "nothing is deployed to env %s: deploy a build first" % env.name)
    if supervisor_state(env) == "running":
        return {"release": current, "changed": False}
    switch_to(env, current, env_settings(env, {}))
    return {"release": current, "changed": True}


def cmd_restart(req, io) -> dict:
    """Start a fresh process of the current release, then retire the old one."""
    env = locked(req, io)
    current = env.current()
    if current is None:
        raise Fail("no_release", "nothing is deployed to env %s: deploy a build first" % env.name)
    result = switch_to(env, current, env_settings(env, {}))
    return {"release": current, "pid": result.get("pid"), "changed": True}


def cmd_stop(req, io) -> dict:
    """Stop the env's app gracefully and its supervisor; nothing revives it."""
    env = locked(req, io)
    update_settings(env, stopped=True)
    pong = supervisor_ping(env)
    if pong is None:  # whatever apps of the env run, no supervisor runs them
        apps = env_apps(env)
        if not apps:
            return {"changed": False}
        for app in apps:
            stop_group(app["pid"], STOP_TIMEOUT)
    else:
        supervisor_call(env, {"cmd": "stop"}, timeout=STOP_TIMEOUT + 10)
        wait_for(lambda: not pid_alive(pong["pid"]), 5.0)  # it leaves once stopped: then its ports are free
    return {"changed": True}


def cmd_releases(req, io) -> dict:
    env = existing_env(req["base"], req["env"])
    current = env.current()
    return {"current": current,
            "releases": [dict(env.release_info(r), release=r, current=r == current) for r in env.releases()]}
