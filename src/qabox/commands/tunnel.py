"""``qabox tunnel`` and ``qabox tunnels``: which host, port and key a tester's
tunnel uses; serving it in the foreground or the background; listing and
stopping the tunnels of this machine."""

from __future__ import annotations

import signal as signals
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qabox import joined, local_tunnels, ssh
from qabox.context import Context, check_env
from qabox.errors import ConfigError
from qabox.local_tunnels import Recorder, running  # noqa: F401 - `qabox tunnels` lists them
from qabox.agent.sockets import port_is_free
from qabox.tunnel import Tunnel, TunnelState


@dataclass(frozen=True)
class TunnelPlan:
    """Where a tester's tunnel goes, on which local port, with which key."""

    user: str
    host: str
    env: str
    port: int
    identity: str | None
    target: ssh.Target | None = None  # a joined invite's; else the host's, as ssh_config has it


def tester_host(ctx: Context, user: str) -> str:
    """The host for a tunnel without --host: the tester's earlier tunnels' host,
    else the host whose hosts file names the tester, else the one deployed to
    from here; it must be just one."""
    before = sorted({key.split("@", 1)[1].split("/", 1)[0] for key in ctx.load_state("ports.json")
                     if key.startswith(user + "@")})
    for found in (before, [h for h in ctx.host_files() if user in ctx.settings(h).testers],
                  ctx.remembered_hosts()):
        if len(found) == 1:
            return found[0]
        if found:
            raise ConfigError(f"tester {user} could tunnel to {', '.join(found)}: say which with --host")
    raise ConfigError(f"name the host: qabox tunnel --user {user} --host HOST")


def local_port(ctx: Context, host: str, env: str, user: str, wanted: int | None) -> int:
    """A stable local port per tester, host and env, so bookmarks keep working."""
    if wanted:
        return wanted
    key = f"{user}@{host}/{env}"
    ports = ctx.load_state("ports.json")
    if key in ports:
        return ports[key]
    taken = set(ports.values())
    port = 20000 + zlib.crc32(key.encode()) % 10000
    while port in taken or not port_is_free(port):
        port = 20000 + (port - 20000 + 1) % 10000
    ports[key] = port
    ctx.save_state("ports.json", ports)
    return port


def plan(ctx: Context, user: str | None, host: str | None, env: str, port: int | None,
         identity: str | None) -> TunnelPlan:
    """What the options leave open: from the invite joined here that they match,
    else from the hosts files and this machine's state."""
    check_env(env)
    invite = joined.choose(ctx, user, host)
    if invite is not None:
        user, host = invite.invite.tester, invite.invite.host
        return TunnelPlan(user, host, env, local_port(ctx, host, env, user, port),
                          str(Path(identity).expanduser()) if identity else None, invite.target())
    if not user:
        raise ConfigError("name the tester: qabox tunnel --user NAME [--host HOST], or join "
                          "the invite you were sent first: qabox join INVITE")
    check_env(user)
    host = host or tester_host(ctx, user)
    tester = ctx.settings(host).testers.get(user, {})
    identity = identity or tester.get("key")
    identity = str(Path(identity).expanduser()) if identity else None
    return TunnelPlan(user, host, env, local_port(ctx, host, env, user, port or tester.get("port")), identity)


def start_in_background(ctx: Context, user: str | None, host: str | None, env: str, port: int | None,
                        identity: str | None) -> dict:
    """The tunnel as a background process, once it is up: its record."""
    p = plan(ctx, user, host, env, port, identity)
    return local_tunnels.detach(ctx, p.user, p.host, p.env, p.port, p.identity)


def serve(ctx: Context, user: str | None, host: str | None, env: str, port: int | None,
          identity: str | None, on_up: Callable[[TunnelPlan, str], None],
          on_change: Callable[[TunnelState], None], on_notice: Callable[[str], None]) -> None:
    """Serve the tunnel in the foreground until Ctrl-C or SIGTERM, keeping its record.

    ``on_up(plan, url)`` once it is up, ``on_change`` on every change of state
    (also before it is up) and request count, ``on_notice`` for the host's
    deploy notices. An error starting it is raised, and so is what a background
    thread of the tunnel died of.
    """
    p = plan(ctx, user, host, env, port, identity)
    done = threading.Event()

    def changed(status: TunnelState) -> None:
        recorder(status)
        on_change(status)

    t = Tunnel(ctx, p.host, p.env, p.user, p.port, p.identity, on_change=changed, on_notice=on_notice,
               target=p.target)
    recorder = Recorder(ctx, t)
    signals.signal(signals.SIGTERM, lambda *_: done.set())
    try:
        with t:
            on_up(p, t.url)
            changed(t.status)
            while not done.wait(0.2):
                t.refresh()
                recorder(t.status)  # a count it skipped a moment ago
    except KeyboardInterrupt:
        pass
    finally:
        recorder.remove()


def stop(ctx: Context, user: str | None, host: str | None, env: str, all_: bool) -> list[dict]:
    """Stop the tester's background tunnels (to that host and env, if given), or all of them."""
    invite = None if user or all_ else joined.choose(ctx, None, host)
    if invite is not None:
        user = invite.invite.tester  # the host (and env) only as given
    if not (user or all_):
        raise ConfigError("say whose tunnel to stop: --stop --user NAME, or --stop --all")
    if all_:
        return local_tunnels.stop_tunnels(ctx, None, None, None)
    return local_tunnels.stop_tunnels(ctx, user, host, env if host else None)
