"""Notes: the example app qabox deploys in the README demo and the tests.

A real (if tiny) Flask app with state on disk, plus a few routes that exist
only to exercise the deployment: /slow and /big for timeouts and transfers
through the tunnel, /crash to check that the supervisor restarts the app, and
/release to see which build is live.

Notes live in $QABOX_DATA_DIR/notes.json, which survives redeploys; without
that variable a directory under the system temp dir is used.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from flask import Flask, Response, abort, jsonify, redirect, request
from markupsafe import escape

app = Flask(__name__)

MAX_NOTE_CHARS = 10_000
MAX_SLEEP_S = 30.0
MAX_BIG_MB = 64
_MB = 1024 * 1024
# One MiB of incompressible bytes, repeated by /big: zeros would let SSH
# compression flatter the transfer speed.
_BLOCK = random.Random(0).randbytes(_MB)

# The dev server and waitress/gunicorn threads serve requests concurrently:
# read-modify-write of the file must not interleave within a process.  (Across
# processes the atomic replace keeps the file valid, but updates could be lost.)
_lock = threading.Lock()


def _notes_file() -> Path:
    # Read the environment per call, so tests (and restarts) can point it elsewhere.
    data_dir = os.environ.get("QABOX_DATA_DIR") or os.path.join(tempfile.gettempdir(), "qabox-notes")
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path / "notes.json"


def _load(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []


def _save(path: Path, notes: list[dict]) -> None:
    # Write a temp file then rename over the old one: a crash mid-write (see
    # /crash) leaves either the old or the new file, never half of one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(notes, f, ensure_ascii=False, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_notes() -> list[dict]:
    with _lock:
        return _load(_notes_file())


def add_note(text: str) -> dict:
    with _lock:
        path = _notes_file()
        notes = _load(path)
        note = {
            "id": max((n["id"] for n in notes), default=0) + 1,
            "text": text,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        notes.append(note)
        _save(path, notes)
        return note


def _release() -> str:
    return os.environ.get("QABOX_RELEASE") or "unknown"


@app.get("/")
def index():
    items = "\n".join(f"    <li>{escape(n['text'])}</li>" for n in reversed(read_notes()))
    return f"""<!doctype html>
<html>
<head><meta charset="utf-8"><title>Notes</title></head>
<body>
  <h1>Notes</h1>
  <form method="post" action="/notes">
    <input name="text" size="60" autofocus required> <button>Add</button>
  </form>
  <ul>
{items or "    <li><em>No notes yet.</em></li>"}
  </ul>
  <p><small>release {escape(_release())}</small></p>
</body>
</html>
"""


@app.post("/notes")
def create_note():
    if request.is_json:
        payload = request.get_json(silent=True)
        text = payload.get("text") if isinstance(payload, dict) else None
    else:
        text = request.form.get("text")
    if not isinstance(text, str) or not text.strip():
        abort(400, description="field 'text' is required")
    if len(text) > MAX_NOTE_CHARS:
        abort(413, description=f"note longer than {MAX_NOTE_CHARS} characters")
    note = add_note(text.strip())
    if request.is_json:
        return jsonify(note), 201
    return redirect("/", code=303)  # browser form: back to the list


@app.get("/notes.json")
def notes_json():
    return jsonify(read_notes())


@app.get("/health")
def health():
    return Response("ok", mimetype="text/plain")


@app.get("/slow")
def slow():
    s = request.args.get("s", default=0.3, type=float)
    if math.isnan(s):
        abort(400, description="s must be a number of seconds")
    time.sleep(min(max(s, 0.0), MAX_SLEEP_S))
    return Response("slept", mimetype="text/plain")


@app.get("/crash")
def crash():
    # Die the hard way (no cleanup, no response) so supervision is really tested.
    os._exit(3)


@app.get("/big")
def big():
    mb = min(max(request.args.get("mb", default=1, type=int), 0), MAX_BIG_MB)

    def chunks():  # streamed: 64 MiB need not sit in memory
        for _ in range(mb):
            yield _BLOCK

    return Response(
        chunks(),
        mimetype="application/octet-stream",
        headers={"Content-Length": str(mb * _MB)},
    )


@app.get("/release")
def release():
    return Response(_release(), mimetype="text/plain")


if __name__ == "__main__":  # local try-out: python notes.py
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), threaded=True)
