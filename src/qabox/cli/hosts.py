"""``qabox hosts list``, ``check`` and ``trust``."""

from __future__ import annotations

import typer

from qabox.cli.options import make_context
from qabox.cli.output import out, print_json, print_table, reporting

app = typer.Typer(help="Hosts: list them, check them, trust their keys.", no_args_is_help=True)


@app.command("list")
def hosts_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List the hosts known from hosts/ and ssh_config: address, user, port, envs.

    Example: qabox hosts list
    """
    with reporting(ctx, as_json):
        from qabox.commands.hosts import list_hosts

        rows = list_hosts(make_context(ctx))
        if as_json:
            print_json(ctx, {"hosts": rows})
            return
        print_table(("HOST", "ADDRESS", "USER", "PORT", "ENVS", "SETTINGS"), [
            (r["host"], r["address"], r["user"] or "-", str(r["port"]), ", ".join(r["envs"]) or "-",
             r["settings"] or "-") for r in rows], key=("HOST", "ADDRESS", "USER", "PORT"))


@app.command("check")
def hosts_check(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Host name, as for `ssh NAME`."),
                as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")):
    """Check that a host is ready for qabox: each check passes or says the fix.

    Example: qabox hosts check oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.hosts import check_host

        checks = check_host(make_context(ctx), name)
        failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
        if as_json:
            print_json(ctx, {"host": name, "ok": not failed, "checks": [c.__dict__ for c in checks]},
                       failed="; ".join(failed))
        else:
            for c in checks:
                mark = "[red]FAIL[/]" if not c.ok else "[yellow]warn[/]" if c.warning else "[green]pass[/]"
                fix = f"  → {c.fix}" if not c.ok or c.warning else ""
                out.print(f"{mark}  {c.name}: {c.detail}{fix}", highlight=False)
        if failed:
            raise typer.Exit(1)


@app.command("trust")
def hosts_trust(
    ctx: typer.Context,
    name: str = typer.Argument(..., metavar="NAME", help="Host name, as for `ssh NAME`."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Trust without asking."),
):
    """Show a host's key fingerprint and add it to known_hosts after you confirm.

    Example: qabox hosts trust oldbox
    """
    with reporting(ctx):
        from qabox.commands.hosts import trust

        def confirm(key) -> bool:
            out.print(f"{name} ({key.key_name}) presents {key.kind} key {key.fingerprint}")
            return yes or typer.confirm("Trust this key and add it to known_hosts?", default=False)

        trusted = trust(make_context(ctx), name, confirm)
        if trusted.added_to is None:
            key = trusted.key
            out.print(f"{name} ({key.key_name}) is already trusted: {key.kind} {key.fingerprint}")
        else:
            out.print(f"added to {trusted.added_to}")
