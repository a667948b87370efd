"""What the CLI prints: tables, the one JSON envelope, and errors (caught here, once).

Every ``--json`` output is one envelope::

    {"qabox_json": 1, "ok": true, "command": "status", "data": {...}}
    {"qabox_json": 1, "ok": false, "command": "status", "error": {"code": "...", "message": "..."}}

``ok`` is false exactly when qabox exits non-zero. A command that has results
and still fails (a host of several unreachable, a check that fails) keeps its
``data`` beside the ``error``, whose code is then ``failed``. A streaming
command prints one envelope per line, compact.
"""

from __future__ import annotations

import json
import textwrap
import traceback
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.text import Text

from qabox.errors import QaboxError

JSON_VERSION = 1

out = Console(soft_wrap=True)  # one line stays one line, for people and for grep
err = Console(stderr=True, soft_wrap=True)


def command_name(ctx: typer.Context) -> str:
    """The command as typed after ``qabox``: ``status``, ``hosts check``."""
    return ctx.command_path.partition(" ")[2]


def envelope(ctx: typer.Context, data=None, error: dict | None = None) -> dict:
    """The JSON envelope of a result, an error, or both (results and a failure)."""
    shape = {"qabox_json": JSON_VERSION, "ok": error is None, "command": command_name(ctx)}
    if data is not None:
        shape["data"] = data
    if error is not None:
        shape["error"] = error
    return shape


def print_json(ctx: typer.Context, data=None, failed: str | QaboxError | None = None,
               stream: bool = False) -> None:
    """Print a result as its envelope. ``failed``: the error that stopped the
    command, or why it fails despite its data (code ``failed``). ``stream``: one
    compact line, for commands that print an envelope per item."""
    if isinstance(failed, QaboxError):
        error = {"code": failed.code or type(failed).__name__, "message": failed.message}
    else:
        error = {"code": "failed", "message": failed} if failed else None
    print(json.dumps(envelope(ctx, data, error), indent=None if stream else 2), flush=stream)


@contextmanager
def reporting(ctx: typer.Context, as_json: bool = False):
    """Turn a QaboxError into one line on stderr (and its envelope with --json) and its exit code."""
    try:
        yield
    except QaboxError as e:
        if ctx.obj["verbose"]:
            err.print(traceback.format_exc(), markup=False, highlight=False)
        for line in e.log:
            err.print(f"  | {line}", markup=False, highlight=False, style="dim")
        if as_json:
            print_json(ctx, failed=e, stream=True)
        print_error(e.message)
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("qabox: interrupted")
        raise typer.Exit(130)


def print_error(message: str) -> None:
    err.print(f"qabox: error: {message}", markup=False, highlight=False)


def print_table(columns: tuple, rows: list, key: tuple = (), notes: list = ()) -> None:
    """Rows under their headers, then free text (an unreachable host's reason) as
    notes below, one each, never squeezed into a column.

    On a terminal too narrow for every column, the ``key`` columns (what names a
    row) stay whole and each row's other columns follow it as ``name: value``
    lines; off a terminal, one line per row however wide, for grep and logs.
    """
    width = out.width if out.is_terminal else None
    for line in table_lines(columns, rows, key, width):
        out.print(line)
    for note in notes:
        for line in textwrap.wrap(note, width, subsequent_indent="  ", break_long_words=False,
                                  break_on_hyphens=False) if width else [note]:
            out.print(line, markup=False, highlight=False)


def table_lines(columns: tuple, rows: list, key: tuple = (), width: int | None = None) -> list[Text]:
    """The lines print_table prints: every column if they fit in ``width`` (None:
    no limit), else the key columns, with the others below each row."""
    header = [Text(c, style="bold") for c in columns]
    cells = [[Text.from_markup(c) for c in row] for row in rows]

    def widths(keep: list) -> dict:
        return {i: max(r[i].cell_len for r in [header, *cells]) for i in keep}

    keep = list(range(len(columns)))
    if width is not None and sum(widths(keep).values()) + 2 * (len(keep) - 1) > width:
        keep = [i for i, c in enumerate(columns) if c in key]
    sizes = widths(keep)

    def line(row: list) -> Text:
        text = Text()
        for n, i in enumerate(keep):
            text.append("  " if n else "").append_text(row[i]).append(" " * (sizes[i] - row[i].cell_len))
        text.rstrip()
        return text

    lines = [line(header)]
    for row in cells:
        lines.append(line(row))
        if len(keep) < len(columns):
            lines += detail_lines([(columns[i].lower(), row[i]) for i in range(len(columns))
                                   if i not in keep and row[i].plain not in ("", "-")], width)
    return lines


def detail_lines(items: list, width: int) -> list[Text]:
    """``name: value`` items, indented, as many to a line as fit in width."""
    lines, current = [], Text("  ")
    for name, value in items:
        item = Text(f"{name}: ", style="dim").append_text(value)
        if current.plain.strip() and current.cell_len + 2 + item.cell_len > width:
            lines.append(current)
            current = Text("  ")
        current.append("  " if current.plain.strip() else "").append_text(item)
    if current.plain.strip():
        lines.append(current)
    return lines
