"""The lab: real OpenSSH test hosts on this machine (scripts/lab is its command).

hosts: names, accounts and addresses per slot, the recorded state, and what to
do on a running host (exec in its namespace, cut its link, remove an env);
control: bringing hosts up and down; cli: the `scripts/lab` command line.
"""
