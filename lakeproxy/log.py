"""Logging set-up: text or JSON lines on stderr.

Structured fields go in ``extra={"fields": {...}}``; :func:`fields` builds that::

    log.info("closed", extra=fields(client="127.0.0.1:5043", bytes_up=10))

Text (``LAKEPROXY_LOG_FORMAT=text``, the default), one line per record::

    2025-01-02T03:04:05.678Z INFO lakeproxy.server: closed client=127.0.0.1:5043 bytes_up=10

JSON (``json``), one object per line with ``ts`` (UTC, RFC 3339 with
milliseconds), ``level`` (lower case), ``logger``, ``msg``, then the fields
(a field never overrides those four), and ``exc`` with the traceback when
there is one.

Secrets must never be passed to a logger. As a safety net, :func:`add_secret`
registers a value that the formatters then replace with ``***`` wherever it
appears in a formatted line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Final

_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc"})
#: Registered values shorter than this are not redacted (they would mangle ordinary text).
MIN_SECRET_LEN: Final = 6

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def fields(**values: object) -> dict[str, object]:
    """``extra=`` for a log call carrying structured fields."""
    return {"fields": values}


def add_secret(value: str | None) -> None:
    """Redact ``value`` from every formatted log line from now on (safety net only)."""
    if value is not None and len(value) >= MIN_SECRET_LEN:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    if not _secrets:
        return text
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + (
        f".{int(created * 1000) % 1000:03d}Z"
    )


def _record_fields(record: logging.LogRecord) -> Mapping[str, object]:
    value = getattr(record, "fields", None)
    return value if isinstance(value, Mapping) else {}


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c in text for c in ' ="\\') or not text.isprintable():
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``TS LEVEL logger: message key=value ...`` (values quoted when needed)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record.created),
            record.levelname,
            f"{record.name}: {record.getMessage()}",
        ]
        parts.extend(f"{k}={_logfmt_value(v)}" for k, v in _record_fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for the keys."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _record_fields(record).items():
            if key not in _RESERVED:
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(obj, default=str, ensure_ascii=False))


def level_number(level: str) -> int:
    """The :mod:`logging` level for ``debug``, ``info``, ``warning`` (``warn``), ``error``.

    Raises:
        ValueError: unknown level name.
    """
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def setup_logging(fmt: str, level: str) -> None:
    """Send every log record at ``level`` and above to stderr as ``fmt`` (text or json).

    Installs one handler on the root logger, replacing the one a previous call
    installed (handlers others added, e.g. pytest's, are left alone).

    Raises:
        ValueError: unknown format or level.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    number = level_number(level)
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _Handler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`setup_logging` installs (so a second call can find it)."""
