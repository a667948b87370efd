"""App entries as real apps name them: ``module:name``, ``module:factory()``,
a factory with literal arguments; parsed alike by qabox and the host."""

from __future__ import annotations

import keyword

import pytest
from hypothesis import given, strategies as st

from conftest import Host, free_port, local_get, wsgi_build
from qabox.agent.rules import parse_entry

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))
LITERALS = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3), max_leaves=6)


@given(st.lists(NAMES, min_size=1, max_size=3), st.lists(NAMES, min_size=1, max_size=3),
       st.none() | st.tuples(st.lists(LITERALS, max_size=3), st.dictionaries(NAMES, LITERALS, max_size=3)))
def test_an_entry_reads_back_as_written(module, path, call):
    entry = "%s:%s" % (".".join(module), ".".join(path))
    if call is not None:
        entry += "(%s)" % ", ".join([repr(a) for a in call[0]] + ["%s=%r" % kv for kv in call[1].items()])
    assert parse_entry(entry) == (".".join(module), path, call)


@pytest.mark.parametrize("entry, why", [
    ("notes", "is not of the form module:callable"),
    ("app;rm -rf ~", "is not of the form module:callable"),
    ("notes:", "is not a name or a call"),
    ("notes:app[0]", "is not a name or a call of one"),
    ("notes:__import__('os').system('id')", "is not a name or a call of one"),
    ("notes:create_app(os.environ)", "a factory's arguments must be literals"),
    ("notes:create_app(**options)", "a factory's arguments must be literals"),
    ("notes:create_app(*args)", "a factory's arguments must be literals"),
    ("notes:create_app()()", "is not a name or a call of one"),
])
def test_what_is_not_an_entry_is_refused_saying_why(entry, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        parse_entry(entry)


FACTORY = """
def create_app(name="default", *, greeting="hello"):  # like flaskr's: cannot take (environ, start_response)
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [("%s %s" % (greeting, name)).encode()]
    return app
"""


@pytest.fixture(scope="module")
def box(agent_cmd, tmp_path_factory):
    top = tmp_path_factory.mktemp("entries")
    (top / "home").mkdir()
    local = Host(agent_cmd(), top / "home")
    yield {"host": local, "build": wsgi_build(top / "factory.tar.gz", files={"wsgi.py": FACTORY})}
    local.kill_all()


@pytest.mark.network
@pytest.mark.parametrize("env, entry, answer", [
    ("args", 'wsgi:create_app("qa", greeting="hi")', "hi qa"),
    ("call", "wsgi:create_app()", "hello default"),
    ("bare", "wsgi:create_app", "hello default"),  # a factory named without (): called, as flask --app does
])
def test_a_factory_entry_serves_what_the_factory_returns(box, env, entry, answer):
    port = free_port()
    result = box["host"].deploy(box["build"], env, port, entry=entry)
    assert result["ok"], result
    assert local_get(port) == (200, answer)
    (status,) = box["host"].data("status", env=env)["envs"]
    log = box["host"].home / ".qabox" / "envs" / env / "logs" / (status["release"] + ".log")
    assert ("is an app factory" in log.read_text()) == (not entry.endswith(")"))


@pytest.mark.network
def test_the_host_refuses_an_entry_that_is_not_one(box):
    result = box["host"].deploy(box["build"], "bad", free_port(), entry="wsgi:create_app(open('x'))")
    assert not result["ok"] and result["error"]["code"] == "bad_build", result
    assert "a factory's arguments must be literals" in result["error"]["message"]
