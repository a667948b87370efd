"""Static files: ``[app] static`` directories of the release served ahead of the app."""

from __future__ import annotations

import pytest

from conftest import WSGI_APP, free_port, local_get, wsgi_build
from qabox.agent.rules import static_problems


def test_static_tables_name_url_prefixes_and_directories_inside_the_release():
    assert static_problems({"/static": "staticfiles", "/media/": "./public/media"}) == []
    assert static_problems(["/static"]) == [
        '[app] static must be a table of URL prefix = directory in the release, like {"/static" = "staticfiles"}']
    assert static_problems({"static": "s"}) == [
        "[app] static: 'static' is not a URL prefix: start it with / (printable characters, no spaces)"]
    for path in ("/etc", "../up", "a/../../b", ".", "", 3):
        assert static_problems({"/s": path}) == [
            "[app] static: /s = %r is not a directory inside the release: name one like \"staticfiles\" "
            "(not the release itself)" % (path,)], path


@pytest.mark.network
def test_static_directories_are_served_ahead_of_the_app(host, tmp_path):
    build = wsgi_build(tmp_path / "s.tar.gz", files={
        "wsgi.py": WSGI_APP.replace("VERSION", "from the app"),
        "staticfiles/admin/css/base.css": "body { color: red }",
    })
    port = free_port()
    result = host.deploy(build, "main", port, static={"/static": "staticfiles"})
    assert result["ok"], result
    assert local_get(port, "/static/admin/css/base.css") == (200, "body { color: red }")
    assert local_get(port, "/static/missing.css") == (200, "from the app")  # not a file: the app's
    assert local_get(port, "/other") == (200, "from the app")
    refused = host.deploy(build, "main", port, static={"/static": "../../etc"})
    assert not refused["ok"] and refused["error"]["code"] == "bad_build", refused
    assert "is not a directory inside the release" in refused["error"]["message"]
