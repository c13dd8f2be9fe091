"""The tasks screen: a live list of the replicated task table, one task's record and
output, a submit form and cancel.

Every network call (``self.app.client``) runs in a worker under a timeout; a failure
becomes a line in the screen and the last good list stays on screen.

The list shows the newest ``limit`` tasks (newest last). ``task_list`` pages forward in
submission order, so the screen keeps a cursor: the task just before the shown window.
Each refresh reads from that cursor (usually one request) and moves it when newer tasks
push the window on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, Select, Static
from textual.worker import Worker

from console.client import InvalidRequest, OutcomeUnknown, RequestError
from console.screens.divergence import sync_table
from nodeagent.protocol import ProtocolError

__all__ = ["TasksScreen", "SubmitTaskForm", "ConfirmCancel", "STATE_FILTERS", "KINDS", "POLICIES", "new_task_id",
           "build_specs", "task_cells", "task_detail"]

STATE_FILTERS: tuple[str | None, ...] = (None, "submitted", "assigned", "running", "succeeded",
                                         "failed", "timed_out", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
KINDS = ("sleep", "cpu", "echo", "shell")
POLICIES = ("default", "least_loaded", "round_robin", "weighted", "hash")
ARG_NAMES = {"sleep": "ms", "cpu": "ms", "echo": "data", "shell": "cmd"}
ARG_HINTS = {"sleep": "ms to sleep", "cpu": "ms of CPU to burn", "echo": "data to echo back",
             "shell": "command (the node must allow shell)"}
MAX_COUNT = 10_000
OUTPUT_SHOWN = 4000  # characters of stdout / stderr shown in the detail panel
STATE_STYLE = {"succeeded": "green", "failed": "bold red", "timed_out": "bold red",
               "cancelled": "yellow", "running": "cyan", "assigned": "blue"}


def new_task_id() -> str:
    return "ui-" + uuid.uuid4().hex[:10]


def build_specs(kind: str, argument: str, count: str, policy: str, timeout_ms: str) -> list[dict]:
    """Task specs from the form's fields (ValueError, in words, for a field that is wrong)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    try:
        n = int(count.strip())
    except ValueError:
        raise ValueError(f"count must be a whole number, not {count!r}") from None
    if not 1 <= n <= MAX_COUNT:
        raise ValueError(f"count must be 1..{MAX_COUNT}")
    try:
        timeout = int(timeout_ms.strip())
    except ValueError:
        raise ValueError(f"timeout must be a whole number of ms, not {timeout_ms!r}") from None
    if kind in ("sleep", "cpu"):
        try:
            args: dict[str, Any] = {"ms": int(argument.strip())}
        except ValueError:
            raise ValueError(f"{kind} needs ms as a whole number, not {argument!r}") from None
    elif kind == "echo":
        args = {"data": argument.encode()}
    else:
        if not argument.strip():
            raise ValueError("shell needs a command")
        args = {"cmd": argument}
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
    specs = []
    for _ in range(n):
        spec: dict[str, Any] = {"id": new_task_id(), "kind": kind, "args": dict(args),
                                "timeout_ms": timeout}
        if policy != "default":
            spec["policy"] = policy  # absent: the cluster's policy
        specs.append(spec)
    return specs


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def duration_ms(rec: Mapping[str, Any]) -> int | None:
    """How long the current (or last) attempt ran, once it finished."""
    attempts = rec.get("attempts") or []
    last = attempts[-1] if attempts else None
    if isinstance(last, Mapping):
        s, f = last.get("started_at"), last.get("finished_at")
        if isinstance(s, int) and isinstance(f, int):
            return max(0, f - s)
    return None


def task_cells(rec: Mapping[str, Any]) -> tuple:
    """One DataTable row: id, kind, state, node, attempts, duration ms, exit code."""
    state = _s(rec.get("state"))
    tid = _s(rec.get("id"))
    attempts = f"{_s(rec.get('attempt'))}/{_s(rec.get('max_attempts'))}" \
        if rec.get("max_attempts") else _s(rec.get("attempt"))
    return (tid if len(tid) <= 32 else tid[:31] + "…", _s(rec.get("kind")),
            Text(state, style=STATE_STYLE.get(state, "")), _s(rec.get("node")), attempts,
            _s(duration_ms(rec)), _s(rec.get("exit_code")))


def _when(ms: Any) -> str:
    if not isinstance(ms, int):
        return ""
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def _output(data: Any, dropped: Any) -> Text:
    if not isinstance(data, (bytes, bytearray)):
        return Text("(none)" if data is None else str(data), style="dim")
    if not data:
        return Text("(empty)", style="dim")
    s = bytes(data).decode("utf-8", errors="replace")
    out = Text()
    if isinstance(dropped, int) and dropped > 0:
        out.append(f"[{dropped} earlier bytes dropped by the agent]\n", style="dim")
    if len(s) > OUTPUT_SHOWN:
        out.append(f"[… {len(s) - OUTPUT_SHOWN} earlier characters not shown]\n", style="dim")
        s = s[-OUTPUT_SHOWN:]
    out.append(s)
    return out


def _args_text(args: Any) -> str:
    if not isinstance(args, Mapping):
        return _s(args)
    parts = []
    for k, v in args.items():
        if isinstance(v, (bytes, bytearray)):
            v = bytes(v).decode("utf-8", errors="replace")
            v = repr(v if len(v) <= 60 else v[:60] + "…")
        parts.append(f"{k}={v}")
    return " ".join(parts)


def task_detail(rec: Mapping[str, Any]) -> Text:
    """The record of one task and its output, for the detail panel (plain Text: task
    output is never read as markup)."""
    t = Text()
    state = _s(rec.get("state"))
    t.append(_s(rec.get("id")), style="bold")
    t.append("  ")
    t.append(state, style=STATE_STYLE.get(state, "bold"))
    t.append("\n")
    for label, value in (
        ("kind", f"{_s(rec.get('kind'))}  {_args_text(rec.get('args'))}"),
        ("node", _s(rec.get("node"))),
        ("attempt", f"{_s(rec.get('attempt'))} of {_s(rec.get('max_attempts'))}"),
        ("policy", _s(rec.get("policy")) or "(cluster's)"),
        ("key", _s(rec.get("key"))),
        ("timeout", f"{_s(rec.get('timeout_ms'))} ms"),
        ("submitted", f"{_when(rec.get('submitted_at'))} by {_s(rec.get('submitted_by'))}"),
        ("finished", _when(rec.get("finished_at"))),
        ("exit code", _s(rec.get("exit_code"))),
        ("error", _s(rec.get("error"))),
    ):
        if value.strip():
            t.append(f"{label:>10}: ", style="dim")
            t.append(value + "\n")
    for a in rec.get("attempts") or []:
        if not isinstance(a, Mapping):
            continue
        s, f = a.get("started_at"), a.get("finished_at")
        took = f" {f - s} ms" if isinstance(s, int) and isinstance(f, int) else ""
        t.append(f"   attempt {_s(a.get('attempt'))}: ", style="dim")
        t.append(f"{_s(a.get('node'))} {_s(a.get('outcome')) or 'in progress'}{took}"
                 f" (assigned {_when(a.get('assigned_at'))})\n")
    t.append("stdout:\n", style="bold")
    t.append_text(_output(rec.get("stdout"), rec.get("stdout_truncated")))
    t.append("\nstderr:\n", style="bold")
    t.append_text(_output(rec.get("stderr"), rec.get("stderr_truncated")))
    return t


class ConfirmCancel(ModalScreen[bool]):
    """y / enter to cancel the task, n / escape to keep it."""

    DEFAULT_CSS = """
    ConfirmCancel { align: center middle; }
    ConfirmCancel #cc-box { width: 60; height: auto; padding: 1 2; border: thick $error;
                            background: $surface; }
    """
    BINDINGS = [Binding("escape,n", "dismiss(False)", "Keep"), Binding("y", "dismiss(True)", "Cancel it")]

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id

    def compose(self) -> ComposeResult:
        with Vertical(id="cc-box"):
            yield Label(Text(f"Cancel task {self.task_id}?"))
            yield Button("Yes, cancel it (y)", id="cc-yes", variant="error")
            yield Button("No (n / esc)", id="cc-no")

    @on(Button.Pressed, "#cc-yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#cc-no")
    def _no(self) -> None:
        self.dismiss(False)


class SubmitTaskForm(ModalScreen[list[str] | None]):
    """Submit one or more tasks; dismissed with the submitted ids (None: closed).

    Errors (refused by the cluster, a bad field caught by the protocol encoder, no
    answer) stay in the form. Pressing Submit again with unchanged fields resends the
    same task ids, which the cluster treats as a no-op if they were already applied: a
    retry after "no answer" never submits twice.
    """

    DEFAULT_CSS = """
    SubmitTaskForm { align: center middle; }
    SubmitTaskForm #form { width: 76; height: auto; padding: 1 2; border: thick $primary;
                           background: $surface; }
    SubmitTaskForm .row { height: auto; }
    SubmitTaskForm .row Label { width: 12; padding: 1 1 0 0; }
    SubmitTaskForm .row Input, SubmitTaskForm .row Select { width: 1fr; }
    SubmitTaskForm #form-error { height: auto; color: $error; padding: 0 0 1 0; }
    SubmitTaskForm #buttons { height: auto; }
    """
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, *, timeout: float = 20.0) -> None:
        super().__init__()
        self.timeout = timeout
        self._last: tuple[tuple, list[dict]] | None = None  # (field values, specs) last sent
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical(id="form"):
            yield Label(Text("Submit tasks", style="bold"))
            with Horizontal(classes="row"):
                yield Label("kind")
                yield Select([(k, k) for k in KINDS], value="echo", allow_blank=False, id="kind")
            with Horizontal(classes="row"):
                yield Label("data", id="arg-label")
                yield Input(placeholder=ARG_HINTS["echo"], id="arg")
            with Horizontal(classes="row"):
                yield Label("count")
                yield Input("1", id="count")
            with Horizontal(classes="row"):
                yield Label("policy")
                yield Select([(p, p) for p in POLICIES], value="default", allow_blank=False,
                             id="policy")
            with Horizontal(classes="row"):
                yield Label("timeout ms")
                yield Input("10000", id="timeout")
            yield Static(id="form-error")
            with Horizontal(id="buttons"):
                yield Button("Submit", id="submit", variant="primary")
                yield Button("Close (esc)", id="close")

    def on_mount(self) -> None:
        self.query_one("#arg", Input).focus()

    @on(Select.Changed, "#kind")
    def _kind_changed(self, event: Select.Changed) -> None:
        kind = str(event.value)
        if kind in ARG_NAMES:
            self.query_one("#arg-label", Label).update(ARG_NAMES[kind])
            arg = self.query_one("#arg", Input)
            arg.placeholder = ARG_HINTS[kind]
            if kind in ("sleep", "cpu") and not arg.value.strip().isdigit():
                arg.value = "1000"

    def values(self) -> tuple[str, str, str, str, str]:
        return (str(self.query_one("#kind", Select).value), self.query_one("#arg", Input).value,
                self.query_one("#count", Input).value, str(self.query_one("#policy", Select).value),
                self.query_one("#timeout", Input).value)

    def show_error(self, text: str) -> None:
        self.query_one("#form-error", Static).update(Text(text))

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#close")
    def _close(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    @on(Button.Pressed, "#submit")
    def _submit(self) -> None:
        if self.busy:
            return
        fields = self.values()
        if self._last is not None and self._last[0] == fields:
            specs = self._last[1]  # same fields again: a retry, same ids
        else:
            try:
                specs = build_specs(*fields)
            except ValueError as e:
                self.show_error(str(e))
                return
        self._last = (fields, specs)
        self.busy = True
        self.query_one("#submit", Button).disabled = True
        self.query_one("#form-error", Static).update(Text(f"submitting {len(specs)} task(s)…",
                                                          style="dim"))
        self._send(specs)

    @work(group="submit", exclusive=True, exit_on_error=False)
    async def _send(self, specs: list[dict]) -> None:
        try:
            result = await asyncio.wait_for(self.app.client.submit(specs), self.timeout)
        except (InvalidRequest, ProtocolError) as e:  # the encoder's: nothing was sent
            self._failed(f"bad input: {e}")
            return
        except RequestError as e:
            self._failed(f"refused: {e}")
            return
        except (OutcomeUnknown, asyncio.TimeoutError) as e:
            self._failed(f"no answer ({e or 'timed out'}): submit again to retry with the same ids")
            return
        except Exception as e:
            self._failed(f"{type(e).__name__}: {e}")
            return
        finally:
            self.busy = False
        refused = [(s["id"], r.get("error") or r.get("detail") or "refused")
                   for s, r in zip(specs, result.get("results") or []) if not r.get("ok")]
        if refused:
            self._last = None  # some ids are taken or bad: the next press makes new ones
            tid, why = refused[0]
            self._failed(f"{len(refused)} of {len(specs)} refused; {tid}: {why}")
            return
        self.dismiss([s["id"] for s in specs])

    def _failed(self, text: str) -> None:
        self.query_one("#submit", Button).disabled = False
        self.show_error(text)


class TasksScreen(Screen):
    """The live task list (pushed by the app; uses ``self.app.client``)."""

    DEFAULT_CSS = """
    TasksScreen #tasks-header { height: 1; padding: 0 1; background: $boost; }
    TasksScreen #tasks-body { height: 1fr; }
    TasksScreen #tasks-table { width: 3fr; height: 1fr; }
    TasksScreen #detail-box { width: 2fr; height: 1fr; border-left: solid $primary; }
    TasksScreen #detail { padding: 0 1; }
    TasksScreen #tasks-error { height: auto; padding: 0 1; }
    """
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("s", "cycle_state", "State filter"),
        Binding("n", "new", "New task"),
        Binding("c", "cancel_task", "Cancel task"),
        Binding("r", "reload", "Refresh"),
    ]
    COLUMNS = ("ID", "KIND", "STATE", "NODE", "ATT", "DURATION MS", "EXIT")
    WRITES = {"new", "cancel_task"}

    def __init__(self, *, limit: int = 200, interval: float = 1.0, timeout: float = 4.0,
                 max_pages: int = 10) -> None:
        super().__init__()
        self.limit = limit
        self.interval = interval
        self.timeout = timeout
        self.max_pages = max_pages
        self.state_filter: str | None = None
        self.records: dict[str, dict] = {}  # id -> record, as shown (submission order)
        self.selected: str | None = None
        self._shown: dict[str, tuple] = {}
        self._after: str | None = None  # the task just before the shown window
        self._generation = 0  # bumped when the filter changes: older answers are dropped
        self._load_worker: Worker | None = None
        self._list_failed = False  # the message line shows a list error

    def compose(self) -> ComposeResult:
        yield Static(id="tasks-header")
        with Horizontal(id="tasks-body"):
            table = DataTable(id="tasks-table", cursor_type="row", zebra_stripes=True)
            for i, label in enumerate(self.COLUMNS):
                table.add_column(label, key=f"c{i}")
            yield table
            with VerticalScroll(id="detail-box"):
                yield Static(Text("select a task (arrows, enter)", style="dim"), id="detail")
        yield Static(id="tasks-error")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self._header()
        self.reload()
        self.set_interval(self.interval, self.reload)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in self.WRITES and getattr(self.app, "readonly", False):
            return None  # shown greyed out, refused
        return True

    # -- status lines --

    def set_error(self, text: str) -> None:
        self.query_one("#tasks-error", Static).update(Text(text, style="red"))

    def set_info(self, text: str) -> None:
        self.query_one("#tasks-error", Static).update(Text(text))

    def _note(self, text: str) -> None:
        note = getattr(self.app, "note", None)
        if callable(note):
            try:
                note(text)
            except Exception:
                pass

    def _header(self, when: str | None = None) -> None:
        n = len(self.records)
        text = Text.assemble(
            ("tasks", "bold"), "   filter: ", (self.state_filter or "all", "bold"),
            f"   shown: {n}" + (f" (the newest {self.limit})" if n >= self.limit else ""),
            f"   updated {when}" if when else "   loading…")
        model = getattr(self.app, "model", None)
        if model is not None:
            try:
                counts = model.health(getattr(self.app, 'mono', time.monotonic)()).tasks
            except Exception:
                counts = {}
            if counts:
                text.append("   cluster: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())
                                                        if v), style="dim")
        self.query_one("#tasks-header", Static).update(text)

    # -- the list --

    def reload(self) -> None:
        """Start one refresh unless one is in flight (a slow leader never piles them up)."""
        if self._load_worker is not None and not self._load_worker.is_finished:
            return
        client = getattr(self.app, "client", None)
        if client is None:
            self.set_error("no cluster client")
            return
        self._load_worker = self.run_worker(self._load(client, self._generation),
                                            group="tasks-load", exit_on_error=False)

    def action_reload(self) -> None:
        self.reload()

    async def _load(self, client, generation: int) -> None:
        try:
            records = await asyncio.wait_for(self._fetch(client, self.state_filter),
                                             self.timeout)
        except asyncio.TimeoutError:
            if generation == self._generation:
                self._list_failed = True
                self.set_error(f"task list: no answer within {self.timeout:g}s (showing the last list)")
            return
        except Exception as e:
            if generation == self._generation:
                self._list_failed = True
                self.set_error(f"task list: {e}")
            return
        if generation != self._generation:
            return
        self.show(records)
        if self._list_failed:
            self._list_failed = False
            self.set_error("")

    async def _fetch(self, client, state: str | None) -> list[dict]:
        """The newest ``limit`` tasks (in ``state``), oldest first; moves the cursor.

        Tasks leave a transient state (and a cluster may forget old tasks), so when the
        window after the cursor is no longer full, or the cursor task is gone, it pages
        again from the start."""
        start = self._after
        got: list[dict] | None
        try:
            got = await self._pages(client, state, start)
        except RequestError as e:
            if start is None or "after" not in e.message:
                raise
            got = None  # the cursor task is gone
        if start is not None and (got is None or len(got) < self.limit):
            start = None
            got = await self._pages(client, state, None)
        if len(got) > self.limit:
            self._after = got[-self.limit - 1]["id"]
            return got[-self.limit:]
        self._after = start
        return got

    async def _pages(self, client, state: str | None, after: str | None) -> list[dict]:
        """Up to ``max_pages`` pages after ``after`` (a backlog is caught up over refreshes)."""
        got: list[dict] = []
        for _ in range(self.max_pages):
            page = await client.tasks(state=state, limit=self.limit, after=after)
            got += page
            if len(page) < self.limit:
                break
            after = page[-1]["id"]
        return got

    def show(self, records: list[dict]) -> None:
        self.records = {r["id"]: r for r in records if isinstance(r, Mapping) and "id" in r}
        table = self.query_one(DataTable)
        sync_table(table, [(k, task_cells(r)) for k, r in self.records.items()], self._shown)
        self._header(time.strftime("%H:%M:%S", time.localtime(getattr(self.app, "wall", time.time)())))
        if self.selected is None and table.row_count:
            self._select_cursor_row()
        elif self.selected in self.records:
            self._show_detail(self.records[self.selected])

    def action_cycle_state(self) -> None:
        i = STATE_FILTERS.index(self.state_filter)
        self.state_filter = STATE_FILTERS[(i + 1) % len(STATE_FILTERS)]
        self._generation += 1
        self._after = None
        if self._load_worker is not None:
            self._load_worker.cancel()  # it asks for the old filter
            self._load_worker = None
        self.records = {}
        self.query_one(DataTable).clear()
        self._shown.clear()
        self._header()
        self.reload()

    # -- one task --

    def _select_cursor_row(self) -> None:
        table = self.query_one(DataTable)
        if table.row_count and table.is_valid_row_index(table.cursor_row):
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.select_task(key, fetch=False)

    @on(DataTable.RowHighlighted, "#tasks-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.select_task(event.row_key.value, fetch=False)

    @on(DataTable.RowSelected, "#tasks-table")
    def _selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.select_task(event.row_key.value, fetch=True)

    def select_task(self, task_id: str, fetch: bool = True) -> None:
        """Show ``task_id`` in the detail panel (from the list; ``fetch``: ask the cluster)."""
        self.selected = task_id
        rec = self.records.get(task_id)
        if rec is not None:
            self._show_detail(rec)
        if fetch or rec is None:
            self.run_worker(self._fetch_one(task_id), group="task-get", exclusive=True,
                            exit_on_error=False)

    async def _fetch_one(self, task_id: str) -> None:
        try:
            rec = await asyncio.wait_for(self.app.client.task(task_id), self.timeout)
        except asyncio.TimeoutError:
            self.set_error(f"task {task_id}: no answer within {self.timeout:g}s")
            return
        except Exception as e:
            self.set_error(f"task {task_id}: {e}")
            return
        if self.selected != task_id:
            return
        if rec is None:
            self.query_one("#detail", Static).update(Text(f"{task_id}: unknown task", style="yellow"))
        else:
            self._show_detail(rec)

    def _show_detail(self, rec: Mapping[str, Any]) -> None:
        self.query_one("#detail", Static).update(task_detail(rec))

    # -- actions --

    def action_close(self) -> None:
        self.dismiss()

    def action_new(self) -> None:
        def done(ids: list[str] | None) -> None:
            if ids:
                what = ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"
                self.set_info(f"submitted {len(ids)} task(s): {what}")
                self._note(f"submitted {len(ids)} task(s) ({what})")
                self.reload()

        self.app.push_screen(SubmitTaskForm(), done)

    @work(group="tasks-cancel", exclusive=True, exit_on_error=False)
    async def action_cancel_task(self) -> None:
        tid = self.selected
        if tid is None:
            self.set_error("no task selected")
            return
        rec = self.records.get(tid)
        if rec is not None and rec.get("state") in FINAL_STATES:
            self.set_error(f"{tid} is already {rec['state']}")
            return
        if not await self.app.push_screen_wait(ConfirmCancel(tid)):
            return
        try:
            after = await asyncio.wait_for(self.app.client.cancel(tid), self.timeout * 3)
        except asyncio.TimeoutError:
            self.set_error(f"cancel {tid}: no answer (it may or may not be cancelled)")
            return
        except OutcomeUnknown as e:
            self.set_error(f"cancel {tid}: outcome unknown ({e})")
            return
        except Exception as e:
            self.set_error(f"cancel {tid}: {e}")
            return
        state = after.get("state") if isinstance(after, Mapping) else None
        self.set_info(f"cancel {tid}: now {state or '?'}")
        self._note(f"cancelled task {tid} (now {state or '?'})")
        if isinstance(after, Mapping) and self.selected == tid:
            self._show_detail(after)
        self.reload()
