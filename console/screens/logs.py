"""The logs screen: one local node's agent log, followed like ``tail -f``.

The agent writes one JSON object per line (docs/OPERATIONS.md "Logs"; nodeagent/logs.py).
Each line is shown as ``HH:MM:SS level logger msg key=value ...`` (a line that is not a
JSON object is shown as it is). At most the last ``MAX_READ`` bytes (1 MiB) of the file
are ever read at once, and the view keeps the last ``max_lines`` lines.

Following polls the file every 0.5 s for appended bytes. If the file shrank (truncated)
or was replaced (rotated: another inode at the path), it is read again from its start.
An unreadable file is said so in the view, and polled until it can be read.

Keys: ``/`` search (case-insensitive substring filter; enter or escape closes the box,
the filter stays; an empty search clears it), ``f`` follow on/off, ``escape`` close.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Input, Log, Static

__all__ = ["LogsScreen", "format_line", "MAX_READ"]

MAX_READ = 1 << 20  # bytes read at most, at open and per poll
_SKIP = ("ts", "level", "logger", "node", "msg")


def _value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False) if (not v or any(c.isspace() for c in v) or '"' in v) else v
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)


def _hms(ts: Any) -> str:
    if isinstance(ts, str) and "T" in ts:
        return ts.split("T", 1)[1][:8]
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return time.strftime("%H:%M:%S", time.gmtime(ts))
    return "--:--:--"


def format_line(raw: str) -> str:
    """``HH:MM:SS level logger msg key=value ...`` for one JSON log line; else ``raw``."""
    raw = raw.rstrip("\r\n")
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(obj, dict):
        return raw
    parts = [_hms(obj.get("ts")), str(obj.get("level", "?")), str(obj.get("logger", "?")),
             str(obj.get("msg", ""))]
    for k, v in obj.items():
        if k in _SKIP:
            continue
        if k in ("exc", "stack") and isinstance(v, str):
            v = v.strip().splitlines()[-1] if v.strip() else v  # the last line: the exception
        parts.append(f"{k}={_value(v)}")
    return " ".join(parts)


class LogsScreen(Screen):
    """The agent log of ``node`` read from ``path`` (a local file)."""

    DEFAULT_CSS = """
    LogsScreen #logs-header { height: auto; padding: 0 1; background: $boost; }
    LogsScreen #logs-view { height: 1fr; }
    LogsScreen #logs-error { height: auto; padding: 0 1; color: $error; }
    LogsScreen #logs-search { dock: bottom; display: none; }
    LogsScreen #logs-search.visible { display: block; }
    """
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("slash", "search", "Search"),
        Binding("f", "toggle_follow", "Follow on/off"),
    ]

    def __init__(self, node: str, path: Path | str, *, max_lines: int = 500,
                 interval: float = 0.5, max_read: int = MAX_READ) -> None:
        super().__init__()
        self.node = node
        self.path = Path(path)
        self.max_lines = max_lines
        self.interval = interval
        self.max_read = max_read
        self.follow = True
        self.filter = ""
        self.lines: deque[str] = deque(maxlen=max_lines)  # formatted, unfiltered
        self.error: str | None = None
        self._offset = 0  # bytes of the file consumed (up to the last newline read)
        self._ino: int | None = None
        self._partial = b""
        self._opened = False

    def compose(self) -> ComposeResult:
        yield Static(id="logs-header")
        yield Log(id="logs-view", max_lines=self.max_lines, auto_scroll=True)
        yield Static(id="logs-error")
        yield Input(placeholder="search (case-insensitive; enter: keep, empty: clear)",
                    id="logs-search")
        yield Footer()

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.interval, self.poll)
        self.query_one(Log).focus()

    # -- actions --

    def action_close(self) -> None:
        box = self.query_one("#logs-search", Input)
        if box.has_class("visible"):
            self._close_search()
            return
        self.dismiss()

    def action_search(self) -> None:
        box = self.query_one("#logs-search", Input)
        box.add_class("visible")
        box.value = self.filter
        box.focus()

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        self.query_one(Log).auto_scroll = self.follow
        if self.follow:
            self.poll()
        self._header()

    @on(Input.Changed, "#logs-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.set_filter(event.value)

    @on(Input.Submitted, "#logs-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.set_filter(event.value)
        self._close_search()

    def _close_search(self) -> None:
        self.query_one("#logs-search", Input).remove_class("visible")
        self.query_one(Log).focus()

    def set_filter(self, text: str) -> None:
        text = text.strip()
        if text == self.filter:
            return
        self.filter = text
        self._redraw()

    # -- what is shown --

    def visible_lines(self) -> list[str]:
        """The lines the view shows now (the filter applied)."""
        if not self.filter:
            return list(self.lines)
        f = self.filter.casefold()
        return [ln for ln in self.lines if f in ln.casefold()]

    def _redraw(self) -> None:
        log = self.query_one(Log)
        log.clear()
        lines = self.visible_lines()
        if lines:
            log.write_lines(lines)
        self._header()

    def _append(self, new: list[str]) -> None:
        self.lines.extend(new)
        if self.filter:
            f = self.filter.casefold()
            new = [ln for ln in new if f in ln.casefold()]
        if new:
            self.query_one(Log).write_lines(new[-self.max_lines:])

    def _header(self) -> None:
        text = Text.assemble(("logs", "bold"), f"  {self.node}  ", (str(self.path), "dim"),
                             "   follow: ", ("on", "green") if self.follow else ("off", "yellow"))
        if self.filter:
            text.append(f"   filter: {self.filter!r} ({len(self.visible_lines())} of "
                        f"{len(self.lines)} lines)")
        self.query_one("#logs-header", Static).update(text)

    def _set_error(self, error: str | None) -> None:
        if error != self.error:
            self.error = error
            self.query_one("#logs-error", Static).update(Text(error or ""))

    # -- reading the file --

    def poll(self) -> None:
        """Read what was appended since the last poll (or start over: truncated, rotated)."""
        if not self.follow and self._opened:
            return
        try:
            new, reset = self._read()
        except OSError as e:
            self._set_error(f"cannot read {self.path}: {e.strerror or type(e).__name__}")
            self._header()
            return
        self._set_error(None)
        if reset:
            self.lines.clear()
            self.query_one(Log).clear()
        if new:
            self._append([format_line(s) for s in new])
        if reset or new or not self._opened:
            self._opened = True
            self._header()

    def _read(self) -> tuple[list[str], bool]:
        """(new complete lines, whether the view must start over)."""
        with open(self.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            reset = False
            if self._ino is not None and (st.st_ino != self._ino or st.st_size < self._offset):
                reset = True  # rotated or truncated: read the new file from its start
                self._offset, self._partial = 0, b""
            self._ino = st.st_ino
            size = st.st_size
            if size <= self._offset:
                return [], reset
            start = self._offset
            skip_first = False
            if size - start > self.max_read:
                start = size - self.max_read
                skip_first = start > 0
                self._partial = b""
            fh.seek(start)
            data = fh.read(size - start)
        self._offset = start + len(data)
        if skip_first:
            cut = data.find(b"\n")
            data = b"" if cut < 0 else data[cut + 1:]
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if len(self._partial) > self.max_read:  # a runaway line without a newline
            self._partial = b""
        return [c.decode("utf-8", "replace") for c in complete if c.strip()], reset
