"""``qabox testers add``, ``remove`` and ``list``."""

from __future__ import annotations

from pathlib import Path

import typer

from qabox.cli.options import HOST, make_context
from qabox.cli.output import out, print_json, print_table, reporting

app = typer.Typer(help="Testers: keys that reach the app through a tunnel and nothing else.", no_args_is_help=True)


@app.command("add")
def testers_add(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name (a-z, 0-9, -, _)."),
                key: Path = typer.Option(..., "--key", metavar="FILE", help="The tester's public key file (.pub)."),
                host: str = HOST, as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")):
    """Let a tester's key reach the app's ports on a host, and nothing else.

    Example: qabox testers add tester2 --key tester2.pub --host oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.testers import tester_add

        result = tester_add(make_context(ctx), host, name, key)
        if as_json:
            print_json(ctx, result)
            return
        ports = ", ".join(f"{e}: {p}" for e, p in sorted(result["ports"].items())) or "no envs yet"
        verb = "added" if result["changed"] else "already has this key"
        out.print(f"tester {name} {verb} on {host} ({result['fingerprint']}; ports {ports})")
        out.print(f"  they connect with: qabox tunnel --user {name} --host {host} -i THEIR_KEY")


@app.command("remove")
def testers_remove(ctx: typer.Context, name: str = typer.Argument(..., metavar="NAME", help="Tester name."), host: str = HOST):
    """Take a tester's key off a host.

    Example: qabox testers remove tester2 --host oldbox
    """
    with reporting(ctx):
        from qabox.commands.testers import tester_remove

        ended = tester_remove(make_context(ctx), host, name).get("disconnected", 0)
        out.print(f"tester {name} removed from {host}" + (f" (their {ended} open tunnel(s) ended)" if ended else ""))


@app.command("list")
def testers_list(ctx: typer.Context, host: str = HOST,
                 as_json: bool = typer.Option(False, "--json", help="Print them as JSON.")):
    """List a host's testers: key fingerprints, their ports per env, who is connected.

    Example: qabox testers list --host oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.testers import tester_list

        data = tester_list(make_context(ctx), host)
        if as_json:
            print_json(ctx, data)
            return
        print_table(("TESTER", "FINGERPRINT", "ENVS (PORT)", "CONNECTED"), [
            (t["name"], t["fingerprint"], ", ".join(f"{e} ({p})" for e, p in sorted(t["ports"].items())) or "-",
             ", ".join(f"from {c['from']} since {c['since']}" for c in t["connected"]) or "-")
            for t in data["testers"]], key=("TESTER", "ENVS (PORT)"))
