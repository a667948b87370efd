"""Print the first port from FIRST to LAST that is free on this host's loopback.

    python3 free_port.py FIRST LAST
"""
import socket
import sys

first, last = int(sys.argv[1]), int(sys.argv[2])
for port in range(first, last + 1):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
else:
    sys.exit("no free port in %d-%d" % (first, last))
