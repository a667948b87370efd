"""What users read: tables on a narrow terminal, help, sizes. Pure formatting,
so no lab host is needed; the end-to-end cases are in test_deploy/test_tunnel."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
from rich.console import Console

from conftest import qabox
from qabox.cli import deploy as cli_deploy, output
from qabox.cli.status import print_status
from test_cli import all_commands

STATUS = ("HOST", "ENV", "RELEASE", "STATE", "PID", "UPTIME", "RESTARTS", "PORT", "HEALTH",
          "DEPLOYED", "TESTERS")
STATUS_KEY = ("HOST", "ENV", "RELEASE", "STATE", "PORT")
RUNNING = ("oldbox", "main", "20261124-165841", "[green]running[/]", "7097", "4m10s", "0", "8080",
           "200 5 ms", "2026-11-24T16:58:47Z by alice@laptop", "tester2 (12 req)")
STOPPED = ("oldbox", "staging", "20261120-090000", "[red]stopped[/]", "-", "-", "3", "8081", "-",
           "2026-11-20T09:00:02Z by bob@desk", "-")


def lines(columns, rows, key=(), width=None) -> list[str]:
    return [line.plain for line in output.table_lines(columns, rows, key, width)]


@pytest.fixture
def terminal(monkeypatch):
    """output.out as an 80-column terminal; returns what was printed to it."""
    screen = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=screen, width=80, force_terminal=True,
                                            color_system=None, soft_wrap=True))
    return screen


def test_off_a_terminal_a_table_is_one_line_per_row_however_wide():
    assert lines(STATUS, [RUNNING, STOPPED], STATUS_KEY) == [
        "HOST    ENV      RELEASE          STATE    PID   UPTIME  RESTARTS  PORT  HEALTH    "
        "DEPLOYED                              TESTERS",
        "oldbox  main     20261124-165841  running  7097  4m10s   0         8080  200 5 ms  "
        "2026-11-24T16:58:47Z by alice@laptop  tester2 (12 req)",
        "oldbox  staging  20261120-090000  stopped  -     -       3         8081  -         "
        "2026-11-20T09:00:02Z by bob@desk      -",
    ]


def test_on_a_narrow_terminal_key_columns_stay_whole_and_the_rest_follow_each_row(terminal):
    output.print_table(STATUS, [RUNNING, STOPPED], STATUS_KEY)
    assert terminal.getvalue() == (
        "HOST    ENV      RELEASE          STATE    PORT\n"
        "oldbox  main     20261124-165841  running  8080\n"
        "  pid: 7097  uptime: 4m10s  restarts: 0  health: 200 5 ms\n"
        "  deployed: 2026-11-24T16:58:47Z by alice@laptop  testers: tester2 (12 req)\n"
        "oldbox  staging  20261120-090000  stopped  8081\n"
        "  restarts: 3  deployed: 2026-11-20T09:00:02Z by bob@desk\n"
    )


def test_a_table_that_fits_is_printed_whole(terminal):
    output.print_table(("HOST", "RELEASE", "RESULT", "SECONDS"),
                    [("oldbox", "20261124-165841", "[green]deployed[/]", "7.2")], ("HOST", "RELEASE", "RESULT"))
    assert terminal.getvalue() == ("HOST    RELEASE          RESULT    SECONDS\n"
                                   "oldbox  20261124-165841  deployed  7.2\n")


def test_free_text_goes_below_the_table_wrapped_at_words(terminal):
    reason = ("cannot connect to 198.18.99.2:22 (ghost): timed out; check the host is up and "
              "that `ssh -F /home/alice/qa/ssh_config ghost` works")
    print_status([{"host": "ghost", "reachable": False, "error": reason, "envs": []}])
    assert terminal.getvalue() == (
        "HOST   ENV  RELEASE  STATE        PORT\n"
        "ghost  -    -        unreachable\n"
        "ghost: cannot connect to 198.18.99.2:22 (ghost): timed out; check the host is up\n"
        "  and that `ssh -F /home/alice/qa/ssh_config ghost` works\n"
    )


def test_tunnels_table_keeps_the_url_whole_on_80_columns(terminal):
    output.print_table(("TESTER", "HOST", "ENV", "URL", "STATE", "SINCE", "REQUESTS", "PID"),
                    [("tester6", "oldbox", "main", "http://127.0.0.1:24758", "reconnecting",
                      "2026-11-24 16:59:01", "12", "4242")],
                    ("TESTER", "HOST", "ENV", "URL", "STATE"),
                    notes=["tester6's tunnel to oldbox/main: reconnecting (no answer from the host)"])
    assert terminal.getvalue() == (
        "TESTER   HOST    ENV   URL                     STATE\n"
        "tester6  oldbox  main  http://127.0.0.1:24758  reconnecting\n"
        "  since: 2026-11-24 16:59:01  requests: 12  pid: 4242\n"
        "tester6's tunnel to oldbox/main: reconnecting (no answer from the host)\n"
    )


def test_details_wrap_between_items_never_inside_one():
    row = ("lab1", "x" * 30, "y" * 30, "z" * 30)
    assert lines(("HOST", "A", "B", "C"), [row], ("HOST",), width=40) == [
        "HOST", "lab1", f"  a: {'x' * 30}", f"  b: {'y' * 30}", f"  c: {'z' * 30}"]


def test_help_shows_metavars_not_python_types():
    placeholder = re.compile(r"<(bool|str|int|float|path|list\[)")
    for name in ["", *all_commands(), "hosts", "testers"]:
        result = qabox(*name.split(), "--help")
        assert result.code == 0, name
        assert not placeholder.search(result.stdout), f"qabox {name} --help:\n{result.stdout}"
    deploy = qabox("deploy", "--help").stdout
    assert re.search(r"Usage: \S+ deploy \[OPTIONS\] BUILD\s", deploy)
    for option, metavar in (("--host", "HOST"), ("--env", "ENV"), ("--port", "N"), ("--app", "MOD:APP"),
                            ("--lock-timeout", "SECONDS"), ("--parallel", "N")):
        assert re.search(rf"{option}\s.*\s{re.escape(metavar)}\s", deploy), (option, deploy)
    assert re.search(r"--json\s+Print the result as JSON", deploy)  # a flag: no placeholder
    assert re.search(r"--ssh-config\s+FILE\s", qabox("--help").stdout)


def test_sizes_are_decimal_like_the_progress_bar():
    assert not hasattr(output, "human_bytes")  # one way to print a size: rich.filesize.decimal
    assert cli_deploy.decimal(617_800) == "617.8 kB"


def test_json_errors_come_in_the_envelope_too(tmp_path, monkeypatch):
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(tmp_path / "ssh_config"))
    (tmp_path / "ssh_config").write_text("")
    result = qabox("status", "--json")
    assert result.code == 2
    assert json.loads(result.stdout) == {
        "qabox_json": 1, "ok": False, "command": "status",
        "error": {"code": "ConfigError", "message": "no hosts known yet: name one with --host NAME"}}
    assert result.stderr == "qabox: error: no hosts known yet: name one with --host NAME\n"


def test_a_json_result_names_its_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QABOX_SSH_CONFIG", str(tmp_path / "ssh_config"))
    monkeypatch.setenv("QABOX_HOSTS_DIR", str(tmp_path))
    (tmp_path / "ssh_config").write_text("Host oldbox\n  HostName 192.0.2.7\n  User qa\n")
    result = qabox("hosts", "list", "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout) == {
        "qabox_json": 1, "ok": True, "command": "hosts list",
        "data": {"hosts": [{"host": "oldbox", "address": "192.0.2.7", "port": 22, "user": "qa", "envs": [],
                            "settings": None}]}}


def test_help_loads_no_paramiko_and_no_core():
    """`qabox --help` stays fast: the core (and paramiko, rich's progress bars) load
    inside the commands that use them."""
    code = ("import sys; from qabox.cli import main; sys.argv = ['qabox', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'paramiko' or m == 'rich.progress'"
            " or m.startswith(('qabox.commands', 'qabox.agent', 'qabox.context'))), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Usage: qabox" in proc.stdout, proc
    assert proc.stderr == "[]\n"


def test_errors_list_keeps_when_where_and_how_often_whole_on_80_columns(terminal):
    from qabox.cli.errors import print_groups

    group = {"last": "2026-12-02T17:40:30Z", "count": 3, "env": "main", "where": "flaskr/blog.py:88 in update",
             "type": "sqlite3.OperationalError", "message": "no such table: [post]", "testers": ["ann", "bob"],
             "releases": ["20261202-174000"], "first": "2026-12-02T17:01:02Z", "last_id": "3f9c0a1b2c4d"}
    print_groups({"groups": [group], "count": 3})
    assert terminal.getvalue() == (
        "LAST SEEN             COUNT  WHERE\n"
        "2026-12-02T17:40:30Z  3      flaskr/blog.py:88 in update\n"
        "  env: main  error: sqlite3.OperationalError: no such table: [post]\n"
        "  testers: ann, bob  releases: 20261202-174000  first seen: 2026-12-02T17:01:02Z\n"
        "  last id: 3f9c0a1b2c4d\n")
