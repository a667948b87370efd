"""Measure qabox side by side with plain baselines, in one run on lab1.

    scripts/bench [--only SECTION]... [--quick] [--json]

Each section is a function that returns rows of (name, value, unit, baseline,
ratio, note), where ratio is value / baseline: for times below 1 means qabox is
faster, for throughputs above 1 means it is faster.  The baselines are plain
OpenSSH (deploy, tunnel, cli), the same app on Werkzeug's single-threaded server
(supervision), on Werkzeug's threaded server, qabox's default (servers), one host
(fleet) and the agent before the .pyz (cli).  Figures are medians of several
repeats (one with --quick, which also uses smaller builds and fewer requests, and
is meant as a smoke test).  Everything runs against the lab hosts of scripts/lab
($QABOX_LAB_DIR, $QABOX_LAB_SLOT; started here if needed), in an env and port of
this run's own, removed again afterwards; the supervision and servers sections'
direct clients run inside the lab host, on its loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from lab.hosts import LabError
from qabox.errors import QaboxError

from . import cli, deploy, fleet, servers, supervision, tunnel
from .harness import Bench, BenchError, Row, print_table
from .target import HOST, lab_up

SECTIONS: dict[str, Callable[[Bench], list[Row]]] = {
    "deploy": deploy.section,
    "supervision": supervision.section,
    "tunnel": tunnel.section,
    "servers": servers.section,
    "fleet": fleet.section,
    "cli": cli.section,
}
EXPECTED = (BenchError, LabError, QaboxError)  # failures reported as one line, no traceback


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smaller builds, fewer requests and one repeat: a smoke test, "
                             "not figures to quote")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(SECTIONS)
    try:
        lab_up()
        with tempfile.TemporaryDirectory(prefix=f"qabox-bench{os.getpid()}-") as tmp:
            os.environ["QABOX_STATE_DIR"] = str(Path(tmp) / "state")
            bench = Bench(quick=args.quick, tmp=Path(tmp))
            results = {name: SECTIONS[name](bench) for name in names}
    except EXPECTED as e:
        if isinstance(e.__context__, EXPECTED):  # the cleanup failed after it
            print(f"bench: {e.__context__}", file=sys.stderr)
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps({"host": HOST, "quick": args.quick, "repeats": bench.repeats,
                          "sections": {name: [row._asdict() for row in rows]
                                       for name, rows in results.items()}}, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
