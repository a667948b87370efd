"""``qabox debug``: the URL and PIN of the release under Werkzeug's debugger, then its output."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from qabox.cli.options import ENV, HOST, make_context
from qabox.cli.output import out, reporting


def debug(ctx: typer.Context, host: str = HOST, env: str = ENV,
          port: Optional[int] = typer.Option(None, "--port", metavar="N",
                                             help="Local port (default: a free one).")):
    """Run the env's current release under Werkzeug's debugger, for you alone, until Ctrl-C.

    The host serves it on a second loopback port of its own (never the app's or a tester's
    port), reached here through your SSH connection at http://127.0.0.1:PORT; its PIN is
    shown here only. The debugger's console is a shell on the host for whoever has the PIN.

    Example: qabox debug --host oldbox
    """
    with reporting(ctx):
        from qabox.commands.debug import debug as debug_command

        def on_up(d) -> None:
            out.print(f"{d.host}/{d.env}: release {d.release} under Werkzeug's debugger: {d.url}  "
                      f"(Ctrl-C to stop)", markup=False, highlight=False)
            out.print(f"  PIN: {d.pin}", markup=False, highlight=False)
            out.print(f"  the debugger's console is a shell on {d.host} as the deploy account for whoever has "
                      f"this PIN: keep it to yourself", markup=False, highlight=False)

        data = debug_command(make_context(ctx), host, env, port, on_up, sys.stdout.buffer, sys.stderr.buffer)
        out.print(f"stopped the debugger of {host}/{env} (nothing listens on its port {data['port']} "
                  f"there any more)", markup=False, highlight=False)
