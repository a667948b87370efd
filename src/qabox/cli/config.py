"""``qabox config set``, ``unset`` and ``list``: the app's environment variables per env."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from qabox.cli.options import ENV, HOST, LOCK_TIMEOUT, make_context
from qabox.cli.output import out, print_json, print_table, reporting
from qabox.errors import ConfigError

app = typer.Typer(help="The app's configuration: environment variables per env, kept on the host.",
                  no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print the result as JSON.")
NO_RESTART = typer.Option(False, "--no-restart", help="Store only: the app gets it at its next restart or deploy.")
MASK = "********"


def parse_assignments(items: list[str]) -> dict:
    """KEY=VALUE arguments as a table; a bare KEY's value is asked for (hidden) or,
    when stdin is not a terminal, read from it (one trailing newline dropped; empty is refused)."""
    values, asked = {}, [item for item in items if "=" not in item]
    if len(asked) > 1:
        raise ConfigError(f"only one KEY without =VALUE at a time ({', '.join(asked)}): its value is read "
                          f"from stdin or a prompt")
    for item in items:
        name, is_set, value = item.partition("=")
        if not is_set:
            if sys.stdin.isatty():
                value = typer.prompt(f"value of {name}", hide_input=True, prompt_suffix=" (hidden): ")
            else:
                value = sys.stdin.read()
                value = value[:-1] if value.endswith("\n") else value
                if not value:  # `printf %s "$UNSET" | qabox config set KEY` would blank a secret
                    raise ConfigError(f"no value for {name} came on stdin: pipe it in, or write {name}= "
                                      f"for an empty one")
        values[name] = value
    return values


def config_set(ctx: typer.Context,
               assignments: Optional[List[str]] = typer.Argument(
                   None, metavar="KEY=VALUE|KEY...", help="Variables to set; a bare KEY's value is read "
                   "from a hidden prompt, or from stdin when it is not a terminal."),
               host: str = HOST, env: str = ENV,
               from_file: Optional[Path] = typer.Option(None, "--from-file", metavar="FILE",
                                                        help="Set every variable of a dotenv file (.env)."),
               no_restart: bool = NO_RESTART, lock_timeout: float = LOCK_TIMEOUT, as_json: bool = JSON):
    """Set the app's environment variables on an env, then restart it with no failed requests.

    Example: qabox config set DEBUG=0 SECRET_KEY --host oldbox   (SECRET_KEY's value is asked for)
    """
    with reporting(ctx, as_json):
        from qabox.commands.config import change, check_names, read_dotenv

        if not assignments and from_file is None:
            raise ConfigError("nothing to set: name KEY=VALUE, a KEY (its value is then asked for) or "
                              "--from-file FILE")
        check_names(item.partition("=")[0] for item in assignments or [])
        values = read_dotenv(from_file) if from_file else {}
        values.update(parse_assignments(assignments or []))
        report(ctx, host, env, "set", change(make_context(ctx), host, env, values=values,
                                             restart=not no_restart, lock_timeout=lock_timeout), as_json)


def config_unset(ctx: typer.Context,
                 names: List[str] = typer.Argument(..., metavar="KEY...", help="Variables to remove."),
                 host: str = HOST, env: str = ENV, no_restart: bool = NO_RESTART,
                 lock_timeout: float = LOCK_TIMEOUT, as_json: bool = JSON):
    """Remove variables set with `config set` (a default from qabox.toml or the hosts file shows again).

    Example: qabox config unset DEBUG --host oldbox
    """
    with reporting(ctx, as_json):
        from qabox.commands.config import change

        report(ctx, host, env, "unset", change(make_context(ctx), host, env, unset=names,
                                               restart=not no_restart, lock_timeout=lock_timeout), as_json)


def report(ctx: typer.Context, host: str, env: str, verb: str, result: dict, as_json: bool) -> None:
    if as_json:
        print_json(ctx, result)
        return
    where = f"{host}/{env}"
    if result["not_set"]:
        out.print(f"{where}: not set: {', '.join(result['not_set'])}", markup=False, highlight=False)
    if not result["changed"]:
        out.print(f"{where}: nothing changed", markup=False, highlight=False)
        return
    done = f"{where}: {verb} {', '.join(result['names'])}" if result["names"] else f"{where}: hosts file's environment recorded"
    if result["restarted"]:
        tail = f"release {result['release']} restarted (pid {result['restarted'].get('pid')})"
    elif result["deferred"]:
        tail = "not restarted (--no-restart): the app gets it at `qabox restart` or the next deploy"
    elif result["release"] is None:
        tail = "nothing is deployed yet: the first deploy gets it"
    else:
        tail = "the env is stopped: it gets it at `qabox start`"
    out.print(f"{done}; {tail}", markup=False, highlight=False)


def config_list(ctx: typer.Context, host: str = HOST, env: str = ENV,
                show: bool = typer.Option(False, "--show", help="Show the values (masked otherwise)."),
                as_json: bool = JSON):
    """List the app's environment variables on an env and where each comes from (config, hosts file, qabox.toml).

    Example: qabox config list --host oldbox --show
    """
    with reporting(ctx, as_json):
        from qabox.commands.config import listing

        data = listing(make_context(ctx), host, env, show)
        if as_json:
            print_json(ctx, data)
            return
        print_table(("NAME", "VALUE", "SOURCE"), [
            (v["name"], v["value"].replace("\n", "\\n") if show else MASK, v["source"])  # one line each
            for v in data["variables"]], key=("NAME",))


app.command("set")(config_set)
app.command("unset")(config_unset)
app.command("list")(config_list)
