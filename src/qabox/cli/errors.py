"""``qabox errors list`` and ``qabox errors show``: the app's captured errors on a host."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from qabox.cli.options import HOST, make_context
from qabox.cli.output import out, print_json, print_table, reporting

app = typer.Typer(help="Errors the app raised while serving requests, captured on the host.", no_args_is_help=True)


def since_seconds(text: str | None) -> int | None:
    from qabox.expiry import parse_duration

    return None if text is None else parse_duration(text, "--since")


@app.command("list")
def errors_list(ctx: typer.Context, host: str = HOST,
                env: Optional[str] = typer.Option(None, "--env", "-e", metavar="ENV", help="Only this env (default: every env)."),
                tester: Optional[str] = typer.Option(None, "--tester", metavar="NAME", help="Only the errors of this tester's requests."),
                since: Optional[str] = typer.Option(None, "--since", metavar="DURATION", help="Only those of the last 30m, 12h, 7d..."),
                follow: bool = typer.Option(False, "-f", "--follow", help="Then print each new error as it is captured, until Ctrl-C."),
                as_json: bool = typer.Option(False, "--json", help="Print the groups (and, with -f, each new error) as JSON.")):
    """List the app's errors grouped by where they were raised: count, first and last seen, releases, testers.

    Example: qabox errors list --host oldbox --tester ann --since 1h
    """
    with reporting(ctx, as_json):
        from qabox.commands.errors import errors_list as list_errors

        context, seconds = make_context(ctx), since_seconds(since)
        if not follow:
            data = list_errors(context, host, env, tester, seconds)
            print_json(ctx, data) if as_json else print_groups(data)
            return

        def groups(data: dict) -> None:
            print_json(ctx, data, stream=True) if as_json else print_groups(data)
            if not as_json:
                out.print("following new errors (Ctrl-C ends)", style="dim")

        def new(error: dict) -> None:
            if as_json:
                print_json(ctx, {"error": error}, stream=True)
            else:
                out.print(error_line(error), markup=False, highlight=False)

        try:
            list_errors(context, host, env, tester, seconds, follow=True, on_new=new, on_groups=groups)
        except KeyboardInterrupt:
            return


@app.command("show")
def errors_show(ctx: typer.Context, error_id: str = typer.Argument(..., metavar="ID", help="The error's id (X-Qabox-Error, or from `qabox errors list`)."),
                host: str = HOST,
                env: Optional[str] = typer.Option(None, "--env", "-e", metavar="ENV", help="Look only in this env."),
                as_json: bool = typer.Option(False, "--json", help="Print the error as JSON.")):
    """Print one captured error whole: its traceback, request, tester, release and time.

    Example: qabox errors show 3f9c0a1b2c4d --host oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.errors import error_show

        error = error_show(make_context(ctx), host, error_id, env)
        if as_json:
            print_json(ctx, error)
            return
        for line in error_text(error):
            out.print(line, markup=False, highlight=False)


def print_groups(data: dict) -> None:
    if not data["groups"]:
        out.print("no errors captured")
        return
    rows = [(g["last"], str(g["count"]), g["env"], g["where"], f"{g['type']}: {g['message']}"[:120],
             ", ".join(g["testers"]) or "-", ", ".join(g["releases"]), g["first"], g["last_id"])
            for g in data["groups"]]
    print_table(("LAST SEEN", "COUNT", "ENV", "WHERE", "ERROR", "TESTERS", "RELEASES", "FIRST SEEN", "LAST ID"),
                [tuple(escape(c) for c in row) for row in rows], key=("LAST SEEN", "COUNT", "WHERE"))


def error_line(e: dict) -> str:
    return (f"{e['at']}  {e['env']}  {e['tester'] or '-'}  {e['type']}: {e['message'][:120]}  "
            f"at {e['where']}  id {e['id']}")


def error_text(e: dict) -> list[str]:
    query = f"?{e['query']}" if e.get("query") else ""
    lines = [f"error {e['id']}", f"  time:     {e['at']}", f"  env:      {e['env']}",
             f"  release:  {e['release']}", f"  tester:   {e['tester'] or '-'}",
             f"  request:  {e['method']} {e['path']}{query}", f"  request id: {e['request_id'] or '-'}",
             f"  where:    {e['where']}", f"  error:    {e['type']}: {e['message']}", "  headers:"]
    lines += [f"    {name}: {value}" for name, value in sorted((e.get("headers") or {}).items())]
    return lines + ["", *e["traceback"].rstrip("\n").splitlines()]
