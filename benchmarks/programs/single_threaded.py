"""Serve the app in the dir given as argv[1] on Werkzeug's single-threaded server,
on a free loopback port that it prints once it listens: the story's baseline for
testers sharing one box."""
import sys
sys.path.insert(0, sys.argv[1])
from werkzeug.serving import make_server
from wsgi import app
server = make_server("127.0.0.1", 0, app, threaded=False)
print(server.server_port, flush=True)
server.serve_forever()
