"""setup_logging: text and JSON lines on stderr, structured fields, redaction."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from lakeproxy.log import add_secret, fields, level_number, redact, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(capsys: pytest.CaptureFixture[str], fmt: str, level: str = "info") -> list[str]:
    setup_logging(fmt, level)
    log = logging.getLogger("lakeproxy.test")
    log.debug("hidden at info")
    log.info("connection closed", extra=fields(client="127.0.0.1:5000", bytes_up=10,
                                                note="two words", msg="no override"))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed %s", "here")
    return capsys.readouterr().err.splitlines()


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    lines = emit(capsys, "json")
    assert len(lines) == 2  # one object per line, even with a traceback
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"ts", "level", "logger", "msg", "client", "bytes_up", "note"}
    assert first["level"] == "info"
    assert first["logger"] == "lakeproxy.test"
    assert first["msg"] == "connection closed"
    assert first["client"] == "127.0.0.1:5000"
    assert first["bytes_up"] == 10
    assert first["note"] == "two words"
    assert first["ts"].endswith("Z")
    assert second["level"] == "error"
    assert second["msg"] == "failed here"
    assert "RuntimeError: boom" in second["exc"]


def test_text_lines(capsys: pytest.CaptureFixture[str]) -> None:
    lines = emit(capsys, "text", "debug")
    assert lines[0].split(" ", 1)[1] == "DEBUG lakeproxy.test: hidden at info"
    assert lines[1].split(" ", 1)[1] == (
        'INFO lakeproxy.test: connection closed client=127.0.0.1:5000 bytes_up=10 '
        'note="two words" msg="no override"'
    )
    assert lines[2].split(" ", 1)[1] == "ERROR lakeproxy.test: failed here"
    assert lines[-1] == "RuntimeError: boom"


def test_setup_twice_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text", "info")
    setup_logging("json", "warning")
    logging.getLogger("x").warning("once")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["msg"] == "once"


def test_redaction_safety_net(capsys: pytest.CaptureFixture[str]) -> None:
    add_secret("registered-secret-value")
    add_secret("abc")  # too short to redact safely: ignored
    setup_logging("json", "info")
    logging.getLogger("x").info(
        "leaked %s", "registered-secret-value", extra=fields(also="registered-secret-value")
    )
    line = capsys.readouterr().err
    assert "registered-secret-value" not in line
    assert json.loads(line) | {"ts": None} == {
        "ts": None, "level": "info", "logger": "x", "msg": "leaked ***", "also": "***",
    }
    assert redact("abc") == "abc"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        setup_logging("xml", "info")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("text", "loud")
    assert level_number("WARN") == logging.WARNING
