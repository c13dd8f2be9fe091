"""The reachability screen: which node's messages reach which.

Rows are senders, columns receivers. Every cell comes from the SENDER's last status
(``transport.peers[receiver]``, docs/OPERATIONS.md "Status"): whether its link is
connected, how many Raft messages it sent per second since the previous refresh (delta
of ``sent``), how many it dropped (delta of the sender-side ``dropped_*`` counters:
full, fault, error, too_large; ``dropped_incoming`` is the other direction and is not
counted), and whether an active fault rule cuts the pair: a partition (or 100% loss) in
the sender's ``faults``, or a partition in the receiver's (partitions are enforced at
both ends). Latency and partial loss do not cut; they are shown as a note.

``reachability_matrix()`` is pure (no Textual, no clock) and is what the screen renders;
the screen samples ``app.model.status(name)`` every second and measures the interval with
``app.mono()``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from console.cluster import fault_summary

__all__ = ["Cell", "Matrix", "ReachabilityScreen", "reachability_matrix", "render_matrix",
           "LEGEND"]

# Cell states.
OK, DOWN, FAULT, UNKNOWN, SELF = "ok", "down", "fault", "unknown", "self"

LEGEND = ("✓ N/s  connected, messages sent per second since the last refresh   "
          "✗ down  link not connected   ⛔ fault  a fault rule cuts it   "
          "? unknown (sender unreachable or peer not in its transport)   "
          "↯N  messages dropped since the last refresh   ~  latency/loss rule")


@dataclass(frozen=True, slots=True)
class Cell:
    """What the sender's status says about its messages to the receiver."""

    sender: str
    receiver: str
    state: str  # ok, down, fault, unknown, self
    connected: bool | None = None
    sent: int | None = None  # delta of ``sent`` since the previous sample (None: no previous)
    rate: float | None = None  # sent / dt (messages per second)
    dropped: int | None = None  # delta of the sender-side dropped_* counters
    fault: str | None = None  # the rule that cuts the pair (a summary), if any
    degraded: str | None = None  # a latency / partial-loss rule on the pair, if any
    error: str | None = None  # the link's last_error

    def label(self) -> str:
        """The cell's text: ``✓ 120/s``, ``✗ down``, ``⛔ fault``, ``?``, ``·``."""
        if self.state == SELF:
            return "·"
        if self.state == UNKNOWN:
            return "?"
        if self.state == FAULT:
            out = "⛔ fault"
        elif self.state == DOWN:
            out = "✗ down"
        elif self.rate is not None:
            out = f"✓ {self.rate:.0f}/s"
        else:
            out = "✓ up"
        if self.dropped:
            out += f" ↯{self.dropped}"
        if self.degraded and self.state != FAULT:
            out += " ~"
        return out


@dataclass(frozen=True, slots=True)
class Matrix:
    names: tuple[str, ...]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    dt: float = 0.0

    def cell(self, sender: str, receiver: str) -> Cell:
        return self.cells[(sender, receiver)]

    def row(self, sender: str) -> list[Cell]:
        return [self.cells[(sender, r)] for r in self.names]


def _peers(status: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not isinstance(status, Mapping):
        return {}
    tr = status.get("transport")
    peers = tr.get("peers") if isinstance(tr, Mapping) else None
    return peers if isinstance(peers, Mapping) else {}


def _dropped(peer: Mapping[str, Any]) -> int:
    return sum(int(v) for k, v in peer.items()
               if k.startswith("dropped_") and k != "dropped_incoming"
               and isinstance(v, (int, float)) and not isinstance(v, bool))


def _delta(now: int, before: int | None) -> int | None:
    if before is None:
        return None
    d = now - before
    return d if d >= 0 else now  # counters went back: the agent restarted, count from 0


def _in(names: Any, node: str) -> bool:
    return names is None or node in names


def _rules(status: Mapping[str, Any] | None, frm: str, to: str) -> list[Mapping[str, Any]]:
    faults = status.get("faults") if isinstance(status, Mapping) else None
    if not isinstance(faults, (list, tuple)):
        return []
    return [r for r in faults if isinstance(r, Mapping)
            and _in(r.get("from"), frm) and _in(r.get("to"), to)]


def _cuts(rule: Mapping[str, Any]) -> bool:
    if rule.get("action") == "partition":
        return True
    return rule.get("action") == "loss" and float(rule.get("rate") or 0) >= 1.0


def _summary(rule: Mapping[str, Any]) -> str:
    return fault_summary(rule)


def reachability_matrix(statuses: Mapping[str, Mapping[str, Any] | None],
                        previous: Mapping[str, Mapping[str, Any] | None] | None,
                        dt: float, names: Iterable[str] | None = None) -> Matrix:
    """The matrix for ``statuses`` (node -> its last status, None: unreachable).

    ``previous`` is the same map from the previous sample, ``dt`` the seconds between
    the two; without them (or with ``dt <= 0``) there are no rates. ``names`` fixes the
    rows/columns (default: every node in ``statuses`` and every peer they report, sorted).
    """
    if names is None:
        found = {n for n in statuses}
        for st in statuses.values():
            found.update(_peers(st))
        names = sorted(found)
    names = tuple(names)
    cells: dict[tuple[str, str], Cell] = {}
    for s in names:
        st = statuses.get(s)
        peers = _peers(st)
        prev_peers = _peers((previous or {}).get(s))
        for r in names:
            if s == r:
                cells[(s, r)] = Cell(s, r, SELF)
                continue
            if not isinstance(st, Mapping):
                cells[(s, r)] = Cell(s, r, UNKNOWN)
                continue
            cut = [x for x in _rules(st, s, r) if _cuts(x)]
            cut += [x for x in _rules(statuses.get(r), s, r) if x.get("action") == "partition"]
            soft = [x for x in _rules(st, s, r) if not _cuts(x)]
            p = peers.get(r)
            if not isinstance(p, Mapping):
                if cut:
                    cells[(s, r)] = Cell(s, r, FAULT, fault=_summary(cut[0]))
                else:
                    cells[(s, r)] = Cell(s, r, UNKNOWN)
                continue
            q = prev_peers.get(r)
            q = q if isinstance(q, Mapping) else None
            sent = _delta(int(p.get("sent") or 0), None if q is None else int(q.get("sent") or 0))
            dropped = _delta(_dropped(p), None if q is None else _dropped(q))
            rate = sent / dt if sent is not None and dt > 0 else None
            connected = bool(p.get("connected"))
            state = FAULT if cut else (OK if connected else DOWN)
            cells[(s, r)] = Cell(
                s, r, state, connected=connected, sent=sent if dt > 0 else None, rate=rate,
                dropped=dropped, fault=_summary(cut[0]) if cut else None,
                degraded=_summary(soft[0]) if soft else None,
                error=p.get("last_error") or None)
    return Matrix(names, cells, dt)


_STYLES = {OK: "green", DOWN: "bold red", FAULT: "bold magenta", UNKNOWN: "dim", SELF: "dim"}


def render_matrix(m: Matrix) -> Table:
    """A Rich table: one row per sender, one column per receiver."""
    table = Table(title="sender → receiver", title_justify="left", expand=False,
                  show_lines=False, header_style="bold")
    table.add_column("from \\ to", style="bold", no_wrap=True)
    for r in m.names:
        table.add_column(r, no_wrap=True)
    for s in m.names:
        cells: list[Text | str] = [s]
        for c in m.row(s):
            style = _STYLES[c.state]
            if c.state == OK and c.dropped:
                style = "yellow"
            cells.append(Text(c.label(), style=style))
        table.add_row(*cells)
    return table


def details_text(m: Matrix, limit: int = 12) -> Text:
    """The faults and link errors behind the cells (the first ``limit``)."""
    out = Text()
    lines = 0
    for c in m.cells.values():
        why = None
        if c.state == FAULT:
            why = f"cut by {c.fault}"
        elif c.state == DOWN:
            why = f"down: {c.error or 'not connected'}"
        elif c.degraded:
            why = f"degraded by {c.degraded}"
        if why and lines < limit:
            out.append(f"{c.sender} → {c.receiver}: ", style="bold")
            out.append(why + "\n")
            lines += 1
    return out


class ReachabilityScreen(Screen):
    """The reachability matrix (pushed by the app; reads ``self.app.model``)."""

    DEFAULT_CSS = """
    ReachabilityScreen #reach-header { height: auto; padding: 0 1; background: $boost; }
    ReachabilityScreen #reach-box { height: 1fr; }
    ReachabilityScreen #reach-matrix { padding: 0 1; height: auto; }
    ReachabilityScreen #reach-details { padding: 0 1; height: auto; }
    ReachabilityScreen #reach-legend { height: auto; padding: 0 1; color: $text-muted; }
    ReachabilityScreen #reach-error { height: auto; padding: 0 1; color: $error; }
    """
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, *, interval: float = 1.0) -> None:
        super().__init__()
        self.interval = interval
        self.matrix: Matrix | None = None
        self._prev: dict[str, Mapping[str, Any] | None] | None = None
        self._prev_t: float | None = None
        # the sample the last rates were computed from (reused while no time passes)
        self._base: dict[str, Mapping[str, Any] | None] | None = None
        self._base_t: float | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="reach-header")
        with VerticalScroll(id="reach-box"):
            yield Static(id="reach-matrix")
            yield Static(id="reach-details")
        yield Static(Text(LEGEND), id="reach-legend")
        yield Static(id="reach-error")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(self.interval, self.refresh_view)

    def action_close(self) -> None:
        self.dismiss()

    def _sample(self) -> tuple[list[str], dict[str, Mapping[str, Any] | None]]:
        model = self.app.model
        names = [r.name for r in model.rows()]
        out: dict[str, Mapping[str, Any] | None] = {}
        for n in names:
            reachable = model.row(n).reachable if hasattr(model, "row") else True
            out[n] = model.status(n) if reachable else None
        return sorted(names), out

    def refresh_view(self) -> None:
        mono = getattr(self.app, "mono", time.monotonic)
        try:
            names, statuses = self._sample()
            now = mono()
            if self._prev_t is not None and now > self._prev_t:
                self._base, self._base_t = self._prev, self._prev_t
            # No time since the last sample (two refreshes in one clock tick): the rates
            # over the span before, not none; the traffic figures would blink otherwise.
            dt = now - self._base_t if self._base_t is not None else 0.0
            m = reachability_matrix(statuses, self._base, dt, names)
        except Exception as e:  # a model bug must not take the console down
            self.query_one("#reach-error", Static).update(Text(f"reachability: {type(e).__name__}: {e}"))
            return
        if self._prev_t is None or now > self._prev_t:
            self._prev, self._prev_t = statuses, now
        self.matrix = m
        self.query_one("#reach-matrix", Static).update(render_matrix(m))
        self.query_one("#reach-details", Static).update(details_text(m))
        wall = getattr(self.app, "wall", time.time)
        cut = sum(1 for c in m.cells.values() if c.state == FAULT)
        down = sum(1 for c in m.cells.values() if c.state == DOWN)
        header = Text.assemble(("reachability", "bold"),
                               f"   nodes: {len(m.names)}   links down: {down}   cut by faults: {cut}",
                               f"   rates over {dt:.1f}s" if dt > 0 else "   rates: next refresh",
                               f"   updated {time.strftime('%H:%M:%S', time.localtime(wall()))}")
        self.query_one("#reach-header", Static).update(header)
        self.query_one("#reach-error", Static).update("")
