"""The baseline forwarder: sshtunnel's own SSHTunnelForwarder with its default
settings, as a Python user would write it, in a process of its own so that its CPU
can be read like the others'.  Prints its local port, forwards until stdin closes.

    python plain_sshtunnel.py HOST USER KEY PORT
"""
import sys, sshtunnel
host, user, key, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
forwarder = sshtunnel.SSHTunnelForwarder(host, ssh_username=user, ssh_pkey=key,
                                         remote_bind_address=("127.0.0.1", port),
                                         local_bind_address=("127.0.0.1", 0))
forwarder.start()
print(forwarder.local_bind_port, flush=True)
sys.stdin.read()
forwarder.stop()
