"""``qabox logs``: lines as they come, each prefixed by its host when there are several."""

from __future__ import annotations

import threading
from typing import List

import typer

from qabox.cli.options import ENV, HOSTS, make_context
from qabox.cli.output import print_error, print_json, reporting


def logs(ctx: typer.Context, host: List[str] = HOSTS, env: str = ENV,
         lines: int = typer.Option(50, "-n", "--lines", metavar="N", help="How many of the last lines to show."),
         follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines until Ctrl-C."),
         as_json: bool = typer.Option(False, "--json", help="Print each line as a JSON envelope, one per line.")):
    """Show the app's output and access log from the host (or several, each line prefixed).

    Example: qabox logs --host oldbox -n 100 -f
    """
    with reporting(ctx, as_json):
        from qabox.commands.logs import logs_of_hosts

        context = make_context(ctx)
        names = context.expand(host)
        printing = threading.Lock()

        def show(name: str, line: str) -> None:
            with printing:
                if as_json:
                    print_json(ctx, {"host": name, "line": line}, stream=True)
                else:
                    print((f"{name} | " if len(names) > 1 else "") + line, flush=True)

        try:
            errors = logs_of_hosts(context, names, env, lines, follow, show)
        except KeyboardInterrupt:
            return
        for name, e in errors.items():
            if as_json:
                print_json(ctx, {"host": name}, failed=e, stream=True)
            print_error(e.message)
        if errors:
            raise typer.Exit(1)
