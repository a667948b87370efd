"""What broke, and for whom, on a lab host through a tester's real tunnel: the
tester's name set by the port (a forged one dropped), the release on every
response, and an exception in a bare WSGI app, in a Flask app factory's view
and in a Django view, each captured with the tester's name and shown by
``qabox errors``. One env, the three apps deployed to it in turn."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import free_port, json_data, qabox, wsgi_build
from test_real_apps import FLASKR_DB, FLASKR_INIT, FLASKR_PYPROJECT, django, startproject, write  # noqa: F401

pytestmark = [pytest.mark.usefixtures("lab"), pytest.mark.network]

BARE_APP = """
import json

def app(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise LookupError("bare app failed")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"tester": environ.get("HTTP_X_QABOX_TESTER")}).encode()]
"""
FLASKR_BOOM = """
    @app.route('/boom')
    def boom():
        return {'posts': 1 // 0}

    return app
"""
DJANGO_URLS = """
def boom(request):
    raise ValueError("django view failed")


urlpatterns.append(path("boom/", boom))
"""


def get(url: str, **headers) -> tuple[int, dict, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def line_of(path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def deploy(build, env: str) -> str:
    result = qabox("deploy", build, "--host", "lab1", "--env", env, "--json")
    assert result.code == 0, result
    return json_data(result.stdout)["release"]


def test_errors_of_three_apps_are_captured_with_the_tester_who_met_them(tester, tmp_path, django):  # noqa: F811
    from qabox import tunnel
    from qabox.context import Context

    env, name = tester["env"], tester["name"]
    bare = deploy(wsgi_build(tmp_path / "bare.tar.gz", files={"wsgi.py": BARE_APP}), env)
    with tunnel.Tunnel(Context.create(), "lab1", env, name, free_port(), tester["key"]) as t:
        code, headers, body = get(t.url + "/", **{"X-Qabox-Tester": "boss", "X-Request-ID": "qa-1"})
        assert code == 200 and json.loads(body) == {"tester": name}, body
        assert headers["X-Qabox-Release"] == bare and headers["X-Request-ID"] == "qa-1"
        code, headers, body = get(t.url + "/boom")
        assert code == 500 and headers["X-Qabox-Error"] in body and "LookupError" not in body, body
        ids = {"bare": headers["X-Qabox-Error"]}

        src = write(tmp_path / "flaskr", {"flaskr/__init__.py": FLASKR_INIT.replace("    return app\n", FLASKR_BOOM),
                                          "flaskr/db.py": FLASKR_DB, "flaskr/schema.sql": "",
                                          "pyproject.toml": FLASKR_PYPROJECT,
                                          "qabox.toml": '[app]\nentry = "flaskr:create_app()"\nhealth = "/hello"\n'})
        assert qabox("build", src, "-o", tmp_path / "flaskr.tar.gz").code == 0
        flaskr = deploy(tmp_path / "flaskr.tar.gz", env)
        code, headers, body = get(t.url + "/boom")
        assert code == 500 and headers["X-Qabox-Release"] == flaskr and "ZeroDivisionError" not in body, body
        assert headers["X-Qabox-Error"] in body, body  # qabox's page in place of Flask's stock one
        ids["flask"] = headers["X-Qabox-Error"]

        site = startproject(django, tmp_path / "site")  # DEBUG = True, as startproject makes it: no traceback still
        with open(site / "mysite" / "urls.py", "a") as f:
            f.write(DJANGO_URLS)
        assert qabox("build", site, "-o", tmp_path / "site.tar.gz").code == 0
        mysite = deploy(tmp_path / "site.tar.gz", env)
        code, headers, body = get(t.url + "/boom/", Cookie="sessionid=s3cret")
        assert code == 500 and "ValueError" not in body and headers["X-Qabox-Error"] in body, body
        ids["django"] = headers["X-Qabox-Error"]

    listed = qabox("errors", "list", "--host", "lab1", "--env", env, "--tester", name, "--since", "1h", "--json")
    assert listed.code == 0, listed
    groups = {g["last_id"]: g for g in json_data(listed.stdout)["groups"]}
    assert set(groups) == set(ids.values()), groups
    where = {kind: groups[i]["where"] for kind, i in ids.items()}
    assert where == {"bare": "wsgi.py:6 in app", "flask": f"flaskr/__init__.py:{line_of(src / 'flaskr/__init__.py', '1 // 0')} in boom",
                     "django": f"mysite/urls.py:{line_of(site / 'mysite/urls.py', 'raise ValueError')} in boom"}, where
    assert [groups[ids[k]]["releases"] for k in ("bare", "flask", "django")] == [[bare], [flaskr], [mysite]]
    assert all(g["testers"] == [name] and g["count"] == 1 for g in groups.values())
    assert [g["last_id"] for g in json_data(listed.stdout)["groups"]] == [ids["django"], ids["flask"], ids["bare"]]
    assert "no errors captured" in qabox("errors", "list", "--host", "lab1", "--env", env, "--tester", "nobody").stdout

    shown = qabox("errors", "show", ids["django"], "--host", "lab1")
    assert shown.code == 0, shown
    assert f"  tester:   {name}\n" in shown.stdout and f"  release:  {mysite}\n" in shown.stdout
    assert "  request:  GET /boom/\n" in shown.stdout and "    Cookie: sessionid=***\n" in shown.stdout
    assert "ValueError: django view failed" in shown.stdout and "s3cret" not in shown.stdout
    missing = qabox("errors", "show", "0" * 12, "--host", "lab1")
    assert missing.code != 0 and missing.stderr.startswith("qabox: error: lab1: no error 000000000000 on this host")
    assert len(missing.stderr.splitlines()) == 1, missing

    status = json_data(qabox("status", "--host", "lab1", "--env", env, "--json").stdout)
    assert status["hosts"][0]["envs"][0]["errors"] == 1  # the current release's (Django's) only
