"""``qabox status``: a table of every host's envs, or their JSON."""

from __future__ import annotations

from typing import List, Optional

import typer

from qabox.cli.options import make_context
from qabox.cli.output import print_error, print_json, print_table, reporting


def status(
    ctx: typer.Context,
    host: Optional[List[str]] = typer.Option(None, "--host", "-H", metavar="HOST", help="Host(s) to ask (default: every host deployed to from here)."),
    env: Optional[str] = typer.Option(None, "--env", "-e", metavar="ENV", help="Only this env."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
):
    """Show what is deployed where, and whether it is up.

    Example: qabox status --host oldbox --json
    """
    with reporting(ctx, as_json):
        from qabox.commands.status import status as get_status

        context = make_context(ctx)
        data = get_status(context, context.expand(host) if host else [], env)
        failed = data["problems"] + [h["error"] for h in data["hosts"] if h["error"]]
        if as_json:
            print_json(ctx, data, failed="; ".join(failed))
        else:
            print_status(data["hosts"])
            for problem in data["problems"]:
                print_error(problem)
        if failed:
            raise typer.Exit(1)


def print_status(hosts: list[dict]) -> None:
    rows, notes = [], []
    for host in hosts:
        if not host["reachable"]:
            rows.append((host["host"], "-", "-", "", "[red]unreachable[/]") + ("",) * 8)
            notes.append(f"{host['host']}: {host['error']}")
        elif host["error"]:  # the env asked for is not there
            rows.append((host["host"], host["env"], "-", "", "[red]no such env[/]") + ("",) * 8)
            notes.append(host["error"])
        elif not host["envs"]:
            rows.append((host["host"], "-", "nothing deployed") + ("",) * 10)
        for e in host["envs"]:
            style = {"running": "green", "starting": "yellow"}.get(e["state"], "red")
            health = e.get("health") or {}
            rows.append((
                host["host"], e["env"], e["release"] or "-", e.get("server") or "-", f"[{style}]{e['state']}[/]",
                str(e["pid"] or "-"), human_seconds(e["uptime"]), str(e["restarts"]), str(e["port"]),
                f"{health['code']} {health['ms']:.0f} ms" if health.get("code") else (health.get("error") or "-"),
                f"{e['deployed_at']} by {e['deployed_by']}" if e["deployed_at"] else "-",
                ", ".join(f"{t['name']} ({t['requests']} req)" for t in e.get("testers", [])) or "-",
                f"[red]{e['errors']}[/]" if e.get("errors") else "0",
            ))
    print_table(("HOST", "ENV", "RELEASE", "SERVER", "STATE", "PID", "UPTIME", "RESTARTS", "PORT", "HEALTH",
                 "DEPLOYED", "TESTERS", "ERRORS"), rows, key=("HOST", "ENV", "RELEASE", "STATE", "PORT"), notes=notes)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
