"""Start real OpenSSH test hosts for qabox's test suite, demo and benchmarks.

As root, host lab{i} is the network namespace qabox-lab{n} (198.18.{n}.2, its own
loopback) running its own sshd for the account qalab{n}, where n = 8 * slot + i.
Slot 0 (n = i) is the one the tests expect; a lab started while another lab on this
machine holds slot 0 takes the first free slot (or $QABOX_LAB_SLOT), since
namespace links and routes are kernel-wide. Without root, one sshd on 127.0.0.1
serves the current user as lab1. State lives in $QABOX_LAB_DIR (default
<repo>/.lab); `ssh -F <lab>/ssh_config lab1` reaches a host.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from .control import down, sshd_pid, up
from .hosts import LAB, MAX_HOSTS, LabError, exec_command, lab_hosts, port_open, set_link


def cmd_up(args):
    """Start lab1..labN (keeping further hosts that are up) and print the ssh_config."""
    for host, restarted in up(args.hosts):
        print(f"{host.name}: {'started' if restarted else 'already up'} at "
              f"{host.user}@{host.address}:{host.port}", file=sys.stderr)
    return cmd_ssh_config(args)


def cmd_down(args):
    """Stop every lab host; keep the keys."""
    down()
    print("lab: down", file=sys.stderr)


def cmd_status(args):
    """Report each host's namespace, sshd and port; exit 0 only if all are up."""
    rows = []
    for host in lab_hosts():
        pid, reachable = sshd_pid(host), port_open(host)
        netns = None if host.local_port else Path("/run/netns", host.ns).exists()
        rows.append({"name": host.name, "address": host.address, "port": host.port,
                     "user": host.user, "netns": netns, "sshd_pid": pid, "reachable": reachable,
                     "up": bool(pid and reachable and netns is not False)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(map(status_line, rows)) or "lab is down")
    return 0 if rows and all(row["up"] for row in rows) else 1


def status_line(row):
    """Format one host's health for people."""
    netns = {None: "-", True: "yes", False: "MISSING"}[row["netns"]]
    return (f"{row['name']:<6} {row['address']}:{row['port']:<6} netns={netns:<7} "
            f"sshd={row['sshd_pid'] or 'DEAD':<8} port={'open' if row['reachable'] else 'CLOSED':<6} "
            f"{'UP' if row['up'] else 'DOWN'}")


def cmd_ssh_config(args):
    """Print the ssh_config that `ssh -F` and qabox use to reach the lab."""
    path = LAB / "ssh_config"
    if not path.exists():
        raise LabError("the lab is down (run: scripts/lab up)")
    print(path.read_text(), end="")



def cmd_exec(args):
    """Run a command where the host's loopback is: its namespace (or here, without root)."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LabError("usage: scripts/lab exec HOST -- CMD...")
    command = exec_command(args.host, command)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise LabError(f"cannot run {command[0]}: {exc.strerror}") from None


def cmd_link(args):
    """Set the host's root-side veth down or up, to cut its network in fault tests."""
    set_link(args.host, args.state)


def parse_args(argv):
    """Build the command line: up, down, status, ssh-config, exec, link."""
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start lab1..labN (idempotent) and print the ssh_config")
    up.add_argument("--hosts", type=int, default=1, choices=range(1, MAX_HOSTS + 1),
                    metavar="N", help=f"number of hosts, 1..{MAX_HOSTS} (default 1)")
    sub.add_parser("down", help="stop all hosts, keep the keys")
    status = sub.add_parser("status", help="one line per host; exit 0 only if all are up")
    status.add_argument("--json", action="store_true")
    sub.add_parser("ssh-config", help="print the ssh_config")
    exe = sub.add_parser("exec", help="run CMD in a host's namespace: exec lab1 -- CMD...")
    exe.add_argument("host")
    exe.add_argument("command", nargs=argparse.REMAINDER)
    link = sub.add_parser("link", help="set a host's network link down or up")
    link.add_argument("host")
    link.add_argument("state", choices=["down", "up"])
    return parser.parse_args(argv)


def main(argv=None):
    """Run one subcommand, turning every expected failure into one line on stderr."""
    args = parse_args(argv)
    command = {"up": cmd_up, "down": cmd_down, "status": cmd_status,
               "ssh-config": cmd_ssh_config, "exec": cmd_exec, "link": cmd_link}[args.cmd]
    try:
        return command(args) or 0
    except (LabError, OSError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

