"""The agent's file helpers."""

from qabox.agent.files import tail


def test_logs_with_no_lines_asked_prints_none(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("one\ntwo\n")
    assert tail(str(log), 0) == [] and tail(str(log), 1) == ["two"]
