"""The supervision section's app, deployed as its build's wsgi.py: "/" names the
build it came from (the last word of the bench's stamp file), /pid the process
serving, /slow?s=SECONDS a page that takes that long of waiting."""
import os
import time

from flask import Flask, request

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench-stamp.txt")) as f:
    BUILD = f.read().split()[-1]
app = Flask(__name__)


@app.get("/")
def index():
    return BUILD


@app.get("/pid")
def pid():
    return str(os.getpid())


@app.get("/slow")
def slow():
    time.sleep(float(request.args["s"]))
    return "slept"
