"""``qabox start``, ``stop``, ``restart``, ``rollback`` (on one host or several) and ``releases``."""

from __future__ import annotations

from typing import List, Optional

import typer

from qabox.cli.options import ENV, HOST, HOSTS, LOCK_TIMEOUT, make_context
from qabox.cli.output import out, print_error, print_json, print_table, reporting

JSON = typer.Option(False, "--json", help="Print the result as JSON.")


def change_env(ctx: typer.Context, cmd: str, hosts: list, env: str, lock_timeout: float,
               as_json: bool, **args) -> None:
    """Print what the change did on each host; exit 1 if it failed on any."""
    with reporting(ctx, as_json):
        from qabox.commands.lifecycle import change_hosts

        context = make_context(ctx)
        rows = change_hosts(context, context.expand(hosts), env, cmd, lock_timeout, **args)
        failed = [r["error"] for r in rows if r["error"]]
        if as_json:
            print_json(ctx, rows[0]["result"] if len(rows) == 1 else {"hosts": rows}, failed="; ".join(failed))
        for r in rows:
            if r["error"]:
                print_error(r["error"])
            elif not as_json:
                out.print(change_message(cmd, f"{r['host']}/{env}", r["result"]), markup=False, highlight=False)
        if failed:
            raise typer.Exit(1)


def change_message(cmd: str, where: str, result: dict) -> str:
    release = result.get("release")
    if not result.get("changed"):
        return {"start": f"{where}: already running release {release}",
                "stop": f"{where}: already stopped",
                "rollback": f"{where}: already on release {release}"}[cmd]
    return {"start": f"{where}: release {release} is running",
            "stop": f"{where}: stopped",
            "restart": f"{where}: release {release} restarted (pid {result.get('pid')})",
            "rollback": f"{where}: rolled back to release {release} (was {result.get('previous')})"
                        + (f", with the data from before release {result['data_from']}"
                           if result.get("data_from") else "")}[cmd]


def start(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV, lock_timeout: float = LOCK_TIMEOUT,
          as_json: bool = JSON):
    """Start an env's current release (also after a crash loop).

    Example: qabox start --host oldbox --env main
    """
    change_env(ctx, "start", host, env, lock_timeout, as_json)


def stop(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV, lock_timeout: float = LOCK_TIMEOUT,
         as_json: bool = JSON):
    """Stop an env's app gracefully (in-flight requests finish).

    Example: qabox stop --host oldbox --env main
    """
    change_env(ctx, "stop", host, env, lock_timeout, as_json)


def restart(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV, lock_timeout: float = LOCK_TIMEOUT,
            as_json: bool = JSON):
    """Restart an env's app with no failed requests: new process first, then the old one goes.

    Example: qabox restart --host oldbox
    """
    change_env(ctx, "restart", host, env, lock_timeout, as_json)


def rollback(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV,
             to: Optional[str] = typer.Option(None, "--to", metavar="RELEASE", help="Release id to go back to (default: the previous one)."),
             with_data: bool = typer.Option(False, "--with-data", help="Also put the env's data back as it was "
                                            "when that release was left (its snapshot)."),
             lock_timeout: float = LOCK_TIMEOUT, as_json: bool = JSON):
    """Go back to the previous (or a named) release, health-checked, with no failed requests.
    The env's data stays as it is unless --with-data.

    Example: qabox rollback --host oldbox --to 20261124-104000 --with-data
    """
    change_env(ctx, "rollback", host, env, lock_timeout, as_json, to=to, with_data=with_data)


def releases(ctx: typer.Context, host: str = HOST, env: str = ENV,
             as_json: bool = typer.Option(False, "--json", help="Print the releases as JSON.")):
    """List the releases kept on the host, which is current, and who deployed each.

    Example: qabox releases --host oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.lifecycle import releases as get_releases

        data = get_releases(make_context(ctx), host, env)
        if as_json:
            print_json(ctx, data)
            return
        print_table(("", "RELEASE", "DEPLOYED AT", "BY", "FILE", "SHA256"), [
            ("*" if r["current"] else "", r["release"], r.get("deployed_at") or "-",
             r.get("deployed_by") or "-", r.get("file") or "-", (r.get("sha256") or "")[:12])
            for r in data["releases"]], key=("", "RELEASE"))
