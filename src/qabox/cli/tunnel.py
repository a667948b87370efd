"""``qabox tunnel`` (its status line in the foreground) and ``qabox tunnels``."""

from __future__ import annotations

import time
from typing import Optional

import typer

from qabox.cli.options import ENV, make_context
from qabox.cli.output import err, out, print_json, print_table, reporting


def tunnel(
    ctx: typer.Context,
    user: Optional[str] = typer.Option(None, "--user", "-u", metavar="NAME", help="Tester name (as in `qabox testers add`)."),
    host: Optional[str] = typer.Option(None, "--host", "-H", metavar="HOST", help="Host name, as for `ssh NAME` "
                                       "(default: the tester's earlier tunnels' host, or the one host known)."),
    env: str = ENV,
    port: Optional[int] = typer.Option(None, "--port", metavar="N", help="Local port (default: the tester's own, stable)."),
    identity: Optional[str] = typer.Option(None, "-i", "--identity", metavar="KEYFILE", help="The tester's private key file."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background."),
    stop_: bool = typer.Option(False, "--stop", help="Stop the tester's background tunnel(s)."),
    all_: bool = typer.Option(False, "--all", help="With --stop: stop every tunnel on this machine."),
):
    """Open a tester's tunnel: a stable http://127.0.0.1:PORT to the env's app.

    Example: qabox tunnel --user tester2 --host oldbox
    """
    with reporting(ctx):
        from qabox.commands import tunnel as tunnels  # here: an incompatible paramiko is one line

        context = make_context(ctx)
        if stop_:
            stopped = tunnels.stop(context, user, host, env, all_)
            for r in stopped:
                out.print(f"stopped {r['user']}'s tunnel to {r['host']}/{r['env']} ({r['url']})")
            if not stopped:
                out.print("no such tunnel is running")
        elif detach:
            record = tunnels.start_in_background(context, user, host, env, port, identity)
            out.print(f"{record['user']}'s tunnel to {record['host']}/{record['env']} runs in the background: "
                      f"{record['url']}")
            out.print(f"  stop it with: qabox tunnel --stop --user {record['user']}")
        else:
            serve(context, tunnels, user, host, env, port, identity)


def serve(context, tunnels, user, host, env, port, identity) -> None:
    """The tunnel in the foreground: a header once it is up, then its status (one
    line rewritten in place on a terminal, else a line per change of state);
    nothing of it when it cannot start, only the error."""
    live = err.is_terminal
    shown = {"up": False, "state": None, "width": 0}

    def on_up(plan, url: str) -> None:
        out.print(f"{plan.user}'s tunnel to {plan.host}/{plan.env}: {url}  (Ctrl-C to stop)")
        shown["up"] = True

    def on_change(status) -> None:
        if not shown["up"]:
            return
        state = f"{status.state}{' (' + status.reason + ')' if status.reason else ''}"
        line = f"{state}, {status.requests} requests served"
        if live:  # not err.print, which drops "\r"; padded over the longer line it replaces
            err.file.write("\r" + line.ljust(shown["width"]))
            err.file.flush()
            shown["width"] = len(line)
        elif state != shown["state"]:
            err.print(line, markup=False, highlight=False)
        shown["state"] = state

    def on_notice(text: str) -> None:
        err.print(("\n" if live else "") + text, markup=False, highlight=False)
        shown["width"] = 0

    try:
        tunnels.serve(context, user, host, env, port, identity, on_up, on_change, on_notice)
    finally:
        if live and shown["up"]:
            err.print()


def tunnels_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List the tunnels running on this machine.

    Example: qabox tunnels
    """
    with reporting(ctx, as_json):
        from qabox.commands import tunnel as tunnels  # here: an incompatible paramiko is one line

        records = tunnels.running(make_context(ctx))
        if as_json:
            print_json(ctx, {"tunnels": records})
            return
        print_table(("TESTER", "HOST", "ENV", "URL", "STATE", "SINCE", "REQUESTS", "PID"), [
            (r["user"], r["host"], r["env"], r["url"], r["state"],
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"])), str(r["requests"]), str(r["pid"]))
            for r in records], key=("TESTER", "HOST", "ENV", "URL", "STATE"),
            notes=[f"{r['user']}'s tunnel to {r['host']}/{r['env']}: {r['state']} ({r['reason']})"
                   for r in records if r.get("reason")])
