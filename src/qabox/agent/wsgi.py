"""What every request to the app goes through, whatever server runs it: who
sent it, its request id, the release that answered, and the errors it raised.

The tester is told by the port the request came in on (the server knows which
of its sockets is whose), never by what the client sent: a client's
``X-Qabox-Tester`` is dropped. Frameworks catch their own exceptions and answer
their own 500 page, so their ``got_request_exception`` signals are hooked; a
bare WSGI app's exception is caught here, and its 500 page, rendered here,
names the error's id and nothing of its traceback.
"""

import re
import sys
import uuid
import warnings


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
OWN_HEADERS = ("x-qabox-release", "x-request-id", "x-qabox-error")
ERROR_PAGE = """<!doctype html>
<title>500 Internal Server Error</title>
<h1>Internal Server Error</h1>
<p>The app failed to answer this request. Give the developer this error id:
<strong>%s</strong> (<code>qabox errors show %s</code>).</p>
"""
STOCK_PAGES = (  # a framework's own 500 page, which says nothing the tester can hand on: qabox's replaces it
    b"The server encountered an internal error and was unable to complete your request.",  # Flask's (Werkzeug's)
    b"<title>Server Error (500)</title>",  # Django's, when the project has no 500.html
)
# Django's technical 500 page (DEBUG = True, startproject's default): the traceback, its frames' local
# variables and the settings, for anyone on a tester's port. qabox's replaces it too: the developer
# reads the error with `qabox errors show`, or meets it in `qabox debug`.
DEBUG_PAGES = (b"seeing this error because you have <code>DEBUG = True</code>",)  # You're, You\u2019re


def stock_page(body: bytes) -> bool:
    return (any(marker in body for marker in DEBUG_PAGES)
            or len(body) < 4096 and any(marker in body for marker in STOCK_PAGES))


def local_port(environ: dict) -> "int | None":
    """The port of the socket the request came in on. gunicorn takes
    SERVER_PORT from the Host header, so its socket is asked instead."""
    sock = environ.get("gunicorn.socket")
    try:
        if sock is not None:
            return sock.getsockname()[1]
        return int(environ.get("SERVER_PORT", ""))
    except (OSError, ValueError, IndexError, TypeError):
        return None


class Requests:
    """The WSGI middleware: ``testers`` maps a port to its tester's name (the
    server keeps it current as testers come and go); ``store`` records errors."""

    def __init__(self, app, release: str, testers: dict, store):
        self.app = app
        self.release = release
        self.testers = testers
        self.store = store

    def __call__(self, environ, start_response):
        environ.pop("HTTP_X_QABOX_TESTER", None)
        tester = self.testers.get(local_port(environ))
        if tester:
            environ["HTTP_X_QABOX_TESTER"] = tester
        request_id = environ.get("HTTP_X_REQUEST_ID", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        environ["HTTP_X_REQUEST_ID"] = environ["qabox.request_id"] = request_id
        environ["qabox.capture"] = lambda error: self.capture(environ, error)  # for the frameworks' hooks

        held = {}  # the status and headers of a framework's 500 page for a captured error

        def start(status, headers, exc_info=None):
            headers = [(k, v) for k, v in headers if k.lower() not in OWN_HEADERS]
            headers += [("X-Qabox-Release", self.release), ("X-Request-ID", request_id)]
            if environ.get("qabox.error_id"):
                headers.append(("X-Qabox-Error", environ["qabox.error_id"]))
                if status.startswith("500") and exc_info is None:
                    held.update(status=status, headers=headers, body=[])
                    return held["body"].append
            if exc_info is None:
                return start_response(status, headers)
            held.clear()  # the app answers anew, after an error of its own
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, start)
        except Exception as e:
            error_id = environ.get("qabox.error_id") or self.capture(environ, e)
            headers, body = self.page(error_id)
            start("500 Internal Server Error", headers, sys.exc_info())
            return [body]
        if not held:
            return result
        try:  # the framework answered its 500 page for an error a signal captured
            body = b"".join(held["body"]) + b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        headers = held["headers"]
        if stock_page(body):
            headers, body = self.page(environ["qabox.error_id"])
            headers += [(k, v) for k, v in held["headers"] if k.startswith("X-")]
        start_response(held["status"], headers)
        return [body]

    @staticmethod
    def page(error_id: str) -> tuple:
        """qabox's 500 page: the headers of its own and its body, naming the error's id only."""
        body = (ERROR_PAGE % (error_id, error_id)).encode()
        return [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))], body

    def capture(self, environ: dict, error: BaseException) -> str:
        """Record an error once per request (a framework may signal it and raise it too)."""
        if not environ.get("qabox.error_id"):
            environ["qabox.error_id"] = self.store.capture(environ, error)
        return environ["qabox.error_id"]


HOOKED = []  # the frameworks hooked in this process: once each


def capture(environ, error) -> None:
    """A framework's signal: the request's middleware records the error."""
    if isinstance(environ, dict) and error is not None and "qabox.capture" in environ:
        environ["qabox.capture"](error)


def hook_frameworks() -> list:
    """Connect the ``got_request_exception`` of the frameworks the app imported
    (found in sys.modules: the agent imports none itself) to the middleware of
    the request that raised; the names of those hooked. A Flask without
    blinker has no signals: skipped."""
    hooked = HOOKED
    flask, flask_signals = sys.modules.get("flask"), sys.modules.get("flask.signals")
    if flask is not None and flask_signals is not None and "flask" not in hooked:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                available = getattr(flask_signals, "signals_available", True)
            if available:
                def on_flask(sender, exception=None, **extra):
                    capture(flask.request.environ, exception)

                flask_signals.got_request_exception.connect(on_flask, weak=False)
                hooked.append("flask")
        except Exception as e:  # a Flask too old or too odd: errors still reach the middleware if raised
            print("qabox: cannot hook Flask's errors: %s" % e, flush=True)
    django_signals = sys.modules.get("django.core.signals")
    if django_signals is not None and "django" not in hooked:
        try:
            def on_django(sender, request=None, **extra):
                capture(getattr(request, "environ", None), sys.exc_info()[1])

            django_signals.got_request_exception.connect(on_django, weak=False)
            hooked.append("django")
        except Exception as e:
            print("qabox: cannot hook Django's errors: %s" % e, flush=True)
    return list(hooked)
