"""Structured logging: one JSON object per line, with secrets redacted before they are written.

A line looks like::

    {"ts":"2024-05-01T12:34:56.789Z","level":"info","logger":"nodeagent.driver","node":"n1","msg":"became leader","term":7}

Fields: ``ts`` (ISO-8601 UTC, milliseconds), ``level`` (lower case), ``logger``, ``node``,
``msg``, then every ``extra={...}`` field, then ``exc`` (the formatted traceback) and
``stack`` when present. An extra field named like a core field (``ts``, ``level``, ``logger``,
``node`` is the exception: it overrides) is written with a trailing underscore (``level_``).
Values that JSON cannot hold are written as their ``str()``; NaN and infinities as strings.

``node`` is, in order: an ``extra={"node": ...}`` field, the ``current_node`` context variable
(``with node_context("n2"):`` -- trio tasks and ``trio.to_thread`` workers inherit it, so
several agents in one process log under their own names), the node given to
``setup_logging``.

Redaction (``RedactingFilter``, installed by ``setup_logging`` on its handler, and applied
again by ``JsonFormatter`` on what it writes): the value of every key whose name contains
key, secret, token, password, passphrase or private (any case, at any depth of nested dicts,
in ``extra`` fields and in dict arguments of the message) becomes ``"[redacted]"``, and every
PEM private key block in any string -- message, field, exception text -- becomes
``[redacted private key]``. The match is a substring match and errs on the side of hiding:
``api_key``, ``tls_key_file`` and ``kv_key`` are all redacted.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "current_node",
    "node_context",
    "redact",
    "redact_text",
    "setup_logging",
]

REDACTED = "[redacted]"
REDACTED_PEM = "[redacted private key]"
SECRET_KEY = re.compile(r"key|secret|token|password|passphrase|private", re.IGNORECASE)
# A PEM private key block; an unterminated one (a truncated message) is hidden to the end.
_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*-----|\Z)",
    re.DOTALL,
)
_MAX_DEPTH = 8

current_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("raftdeck_node", default=None)

# Every attribute a plain LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_FIELDS = ("ts", "level", "logger", "node", "msg", "exc", "stack")


@contextmanager
def node_context(node: str) -> Iterator[None]:
    """Log under ``node`` inside the block (and in every task or thread it starts)."""
    token = current_node.set(node)
    try:
        yield
    finally:
        current_node.reset(token)


def redact_text(text: str) -> str:
    """``text`` with every PEM private key block replaced."""
    if "-----BEGIN" not in text:
        return text
    return _PEM.sub(REDACTED_PEM, text)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def redact(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` with secret-named keys and PEM private keys redacted.

    Dicts keep their shape (keys made strings), lists and tuples become lists, strings are
    PEM-redacted, numbers, booleans and None stay, NaN and infinities and anything else become
    their (PEM-redacted) ``str()``. Idempotent.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact_text(value)
    if _depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                key = _safe_str(k)
                out[key] = REDACTED if SECRET_KEY.search(key) else redact(v, _depth + 1)
            return out
        if isinstance(value, list | tuple | set | frozenset):
            return [redact(v, _depth + 1) for v in value]
    return redact_text(_safe_str(value))


def _redact_arg(value: Any) -> Any:
    """A message argument with secrets removed but its type kept where ``%d``/``%f`` need it."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        return redact(value)
    return value  # numbers and objects: the final message text is PEM-redacted as a whole


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            yield key, value


class RedactingFilter(logging.Filter):
    """Rewrites a record in place so that no handler downstream can write a secret.

    The message is formatted now (with secret-named dict arguments redacted first) and its
    PEM blocks removed; ``extra`` fields are replaced by ``redact()``-ed copies (or
    ``"[redacted]"`` when their own name is secret-like); the exception and stack text are
    formatted and redacted into ``exc_text`` / ``stack_info``. Always lets the record through.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _redacted_message(record.msg, record.args)
        record.args = None
        for key, value in list(_extras(record)):
            setattr(record, key, REDACTED if SECRET_KEY.search(key) else redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _redacted_message(msg: Any, args: Any) -> str:
    """``msg % args`` with secret-named dict arguments redacted first, then PEM blocks."""
    if args:
        if isinstance(args, Mapping):
            args = redact(args)
        else:
            args = tuple(_redact_arg(a) for a in args)
    elif not isinstance(msg, str):
        msg = _redact_arg(msg)
    text = _safe_str(msg)
    if args:
        try:
            text = text % args
        except Exception:  # a bad format string must not lose the line
            text = f"{text} {_safe_str(args)}"
    return redact_text(text)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the fields)."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        node = getattr(record, "node", None) or current_node.get() or self.node
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": node,
            "msg": _redacted_message(record.msg, record.args),
        }
        for key, value in _extras(record):
            if key == "node":
                continue
            if key in _CORE_FIELDS:
                key += "_"
            out[key] = REDACTED if SECRET_KEY.search(key) else redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact_text(record.exc_text)
        if record.stack_info:
            out["stack"] = redact_text(record.stack_info)
        return json.dumps(out, separators=(",", ":"), allow_nan=False, default=_safe_str)


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(_LEVELS)}") from None


def setup_logging(node: str, level: str | int = "info", file: str | None = None) -> logging.Handler:
    """Send the root logger's records, as redacted JSON lines, to stderr or to ``file``.

    ``file`` is opened in append mode and reopened if it is moved or deleted (logrotate
    without copytruncate works). Calling it again replaces the handler a previous call
    installed; handlers installed by others (pytest's, for one) are left alone. Returns the
    handler.
    """
    lvl = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_raftdeck", False)]:
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        # Imported here: an agent logging to stderr does not load logging.handlers (or pickle).
        from logging.handlers import WatchedFileHandler

        class LogFileHandler(WatchedFileHandler):
            """A write that fails with an OS error (the disk is full) is counted and
            said on stderr at most once a minute, in one line, instead of logging's
            traceback for every record; the records buffered meanwhile go out once the
            file can be written again."""

            lost = 0
            _said = float("-inf")

            def handleError(self, record: logging.LogRecord) -> None:
                exc = sys.exc_info()[1]
                if not isinstance(exc, OSError):
                    super().handleError(record)
                    return
                self.lost += 1
                now = time.monotonic()
                if now - self._said >= 60.0:
                    self._said = now
                    try:
                        sys.stderr.write(f"nodeagent: cannot write the log file {self.baseFilename}: "
                                         f"{exc.strerror or exc} ({self.lost} records failed so far)\n")
                        sys.stderr.flush()
                    except (OSError, ValueError):
                        pass

        handler = LogFileHandler(file, mode="a", encoding="utf-8")
    handler._raftdeck = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter(node))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(lvl)
    return handler
