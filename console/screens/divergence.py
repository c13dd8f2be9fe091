"""The divergence screen: how far each replica is behind, and whether the replicas agree.

Per replica, from ``ClusterModel.divergence()`` (pure, re-read every 0.5 s and redrawn
only when the model's version moved): applied index, the leader's commit, the leader's
match index for it, lag, short digest, and whether its digest agrees with the other
replicas at an applied index they share.

``f`` runs the key-level diff on demand: the dumps come from the ``fetch_dumps`` callable
given to the constructor (the protocol has no ``dump`` request yet, so the default one
returns nothing and says so) and are compared with ``ClusterModel.key_diff``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from console.cluster import DivergenceView, KeyDiff, ReplicaDivergence

__all__ = ["DivergenceScreen", "FetchDumps", "NO_DUMP_MESSAGE", "no_dumps", "sync_table",
           "render_key_diff"]

FetchDumps = Callable[[], Awaitable[dict[str, dict[str, bytes]]]]

NO_DUMP_MESSAGE = "no dump source given: the key-level diff needs the agents' dump request"
KEYS_SHOWN = 50  # per replica and kind (differs / missing)


async def no_dumps() -> dict[str, dict[str, bytes]]:
    """The default ``fetch_dumps``: no agent can send its key-value dump yet."""
    return {}


def sync_table(table: DataTable, rows: Sequence[tuple[str, tuple]], shown: dict[str, tuple]) -> None:
    """Make ``table`` show ``rows`` ((key, cells) in order) touching only what changed.

    ``shown`` is the caller's record of what the table holds (key -> cells, in table
    order); it is updated. Rows are removed, updated cell by cell, and appended; if the
    wanted order cannot be reached that way, the table is rebuilt, keeping the cursor on
    the same key when it is still there.
    """
    wanted = {k for k, _ in rows}
    kept = [k for k in shown if k in wanted]
    if [k for k, _ in rows[:len(kept)]] != kept:
        cursor = _cursor_key(table)
        table.clear()
        shown.clear()
        for k, cells in rows:
            table.add_row(*cells, key=k)
            shown[k] = cells
        if cursor is not None and cursor in shown:
            table.move_cursor(row=table.get_row_index(cursor))
        return
    for k in [k for k in shown if k not in wanted]:
        table.remove_row(k)
        del shown[k]
    columns = list(table.columns)
    for k, cells in rows:
        old = shown.get(k)
        if old is None:
            table.add_row(*cells, key=k)
        elif old != cells:
            for col, (a, b) in zip(columns, zip(old, cells)):
                if a != b:
                    table.update_cell(k, col, b)
        shown[k] = cells


def _cursor_key(table: DataTable) -> str | None:
    if table.row_count == 0 or not table.is_valid_row_index(table.cursor_row):
        return None
    return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def agreement(r: ReplicaDivergence, view: DivergenceView) -> Text:
    """Whether ``r`` agrees with the other replicas at an applied index they share."""
    if r.digest_ok is None:
        return Text("—", style="dim")  # no other replica reported an index it holds
    if r.digest_ok:
        return Text(f"yes @{r.agreed_at}" if r.agreed_at is not None else "yes", style="green")
    i = r.conflict_at
    others = ",".join(r.conflicts_with) or "?"
    groups = view.conflicts.get(i, {}) if i is not None else {}
    mine = next((len(g) for g in groups.values() if r.name in g), 0)
    if groups and all(mine > len(g) for g in groups.values() if r.name not in g):
        # The majority at that index; the others are the odd ones.
        return Text(f"no @{i}: {others} differ", style="yellow")
    return Text(f"NO @{i}: differs from {others}", style="bold red")


def replica_cells(r: ReplicaDivergence, view: DivergenceView) -> tuple:
    name = f"{r.name} *" if r.name == view.leader else r.name
    reach = {True: "up", False: "down", None: "?"}[r.reachable]
    lag = Text(_s(r.lag), style="bold yellow" if r.lag else "")
    return (name, reach, _s(r.applied), _s(r.leader_commit), _s(r.match), lag,
            (r.digest or "")[:10], agreement(r, view))


def render_key_diff(kd: KeyDiff, replicas: int, limit: int = KEYS_SHOWN) -> Text:
    """The key-level diff: the intersection's size, then per replica what differs."""
    out = Text()
    out.append(f"{kd.agreed} keys agree on all {replicas} replicas", style="bold")
    if kd.converged:
        out.append("  (converged: no key differs)\n", style="green")
        return out
    out.append(f"  ({len(kd.divergent_keys)} keys differ somewhere)\n", style="bold red")
    for name in sorted(set(kd.differs) | set(kd.missing)):
        differs = sorted(kd.differs.get(name, ()))
        missing = sorted(kd.missing.get(name, ()))
        out.append(f"{name}: ", style="bold")
        out.append(f"{len(differs)} differ, {len(missing)} missing\n")
        for label, keys in (("differ", differs), ("missing", missing)):
            if not keys:
                continue
            more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
            out.append(f"  {label}: ", style="dim")
            out.append(", ".join(keys[:limit]) + more + "\n")
    return out


class DivergenceScreen(Screen):
    """Replica divergence (pushed by the app; reads ``self.app.model``)."""

    DEFAULT_CSS = """
    DivergenceScreen #div-header { height: auto; padding: 0 1; background: $boost; }
    DivergenceScreen #div-table { height: auto; max-height: 60%; }
    DivergenceScreen #div-conflicts { height: auto; padding: 0 1; }
    DivergenceScreen #div-keys-box { height: 1fr; border-top: solid $primary; }
    DivergenceScreen #div-keys { padding: 0 1; }
    DivergenceScreen #div-error { height: auto; padding: 0 1; color: $error; }
    """
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("f", "fetch", "Key diff (fetch)"),
    ]
    COLUMNS = ("REPLICA", "STATE", "APPLIED", "LEADER COMMIT", "MATCH", "LAG", "DIGEST",
               "AGREES")

    def __init__(self, fetch_dumps: FetchDumps | None = None, *, interval: float = 0.5,
                 fetch_timeout: float = 15.0) -> None:
        super().__init__()
        self.fetch_dumps: FetchDumps = fetch_dumps or no_dumps
        self.interval = interval
        self.fetch_timeout = fetch_timeout
        self._shown: dict[str, tuple] = {}
        self._seen_version: int | None = None
        self.key_diff: KeyDiff | None = None  # the last fetched diff

    def compose(self) -> ComposeResult:
        yield Static(id="div-header")
        table = DataTable(id="div-table", cursor_type="row", zebra_stripes=True)
        for i, label in enumerate(self.COLUMNS):
            table.add_column(label, key=f"c{i}")
        yield table
        yield Static(id="div-conflicts")
        with VerticalScroll(id="div-keys-box"):
            yield Static("press f to fetch every replica's keys and compare them", id="div-keys")
        yield Static(id="div-error")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(self.interval, self.refresh_view)
        self.query_one(DataTable).focus()

    def action_close(self) -> None:
        self.dismiss()

    def set_error(self, text: str) -> None:
        self.query_one("#div-error", Static).update(Text(text))

    # -- the replica table, from the pure model --

    def refresh_view(self) -> None:
        model = self.app.model
        version = getattr(model, "version", None)
        if version is not None and version == self._seen_version:
            return
        self._seen_version = version
        try:
            view = model.divergence()
        except Exception as e:  # a model bug must not take the console down
            self.set_error(f"divergence: {type(e).__name__}: {e}")
            return
        sync_table(self.query_one(DataTable),
                   [(r.name, replica_cells(r, view)) for r in view.replicas], self._shown)
        header = Text.assemble(
            ("divergence", "bold"), "   leader: ",
            (view.leader, "bold green") if view.leader else ("none", "bold red"),
            f"   leader commit: {_s(view.leader_commit) or '?'}   replicas: {len(view.replicas)}",
            f"   updated {time.strftime('%H:%M:%S', time.localtime(getattr(self.app, 'wall', time.time)()))}")
        self.query_one("#div-header", Static).update(header)
        self.query_one("#div-conflicts", Static).update(self._conflicts_text(view.conflicts))

    @staticmethod
    def _conflicts_text(conflicts: Mapping[int, Mapping[str, tuple[str, ...]]]) -> Text:
        if not conflicts:
            return Text("no digest conflict at any shared applied index", style="green")
        out = Text()
        for i, groups in list(conflicts.items())[-5:]:  # the newest few
            parts = [f"{d[:10]}: {','.join(names[:6])}{' …' if len(names) > 6 else ''}"
                     for d, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))]
            out.append(f"digest conflict at applied {i}: ", style="bold red")
            out.append(" | ".join(parts) + "\n")
        return out

    # -- the key-level diff, on demand --

    def action_fetch(self) -> None:
        self.query_one("#div-keys", Static).update(Text("fetching the replicas' keys…", style="dim"))
        self.set_error("")
        self.run_worker(self._fetch(), group="fetch", exclusive=True, exit_on_error=False)

    async def _fetch(self) -> None:
        keys = self.query_one("#div-keys", Static)
        try:
            dumps = await asyncio.wait_for(self.fetch_dumps(), self.fetch_timeout)
        except asyncio.TimeoutError:
            keys.update(Text("key-level diff: no answer", style="dim"))
            self.set_error(f"fetching the dumps took more than {self.fetch_timeout:g}s")
            return
        except Exception as e:
            keys.update(Text("key-level diff failed", style="dim"))
            self.set_error(f"fetching the dumps failed: {type(e).__name__}: {e}")
            return
        if not dumps:
            keys.update(Text(NO_DUMP_MESSAGE if self.fetch_dumps is no_dumps
                             else "no replica returned a dump", style="yellow"))
            return
        try:
            kd = self.app.model.key_diff(dumps)
        except Exception as e:
            self.set_error(f"key diff: {type(e).__name__}: {e}")
            return
        self.key_diff = kd
        text = Text(f"key-level diff of {', '.join(sorted(dumps))} at "
                    f"{time.strftime('%H:%M:%S', time.localtime(getattr(self.app, 'wall', time.time)()))} (f to fetch again)\n", style="dim")
        text.append_text(render_key_diff(kd, len(dumps)))
        keys.update(text)
