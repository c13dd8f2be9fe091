"""The raftdeck console: a Textual app over every agent of an inventory.

Network work and drawing are kept apart, as DESIGN.md asks. One asyncio task per agent
holds a connection with a status subscription and writes what arrives into the pure
``ClusterModel`` (reconnecting with backoff; a dead agent only greys its own row). One
render timer (4 Hz) turns the model into the health bar, the node table (which redraws
only rows whose version changed) and the event log.

Fault keys act on the selected node, or on every node marked with space: kill, restart,
pause/resume, isolate, heal all, transfer leadership. Destructive keys ask first; heal
and isolate are sent to every agent (partitions are enforced at both ends). Active faults
are always in the health bar. ``--readonly`` refuses every action.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, RichLog, Static

from console.certs import cert_alerts, node_rows
from console.disk import disk_alerts, refused_alerts
from console.client import AgentConnection, ClusterClient, ConnectionFailed
from console.cluster import ClusterModel, NodeInfo, NodeRow
from console.widgets.node_table import Column, NodeTable, TableRow
from nodeagent.statusmap import keepalive_s

COLUMNS = [
    Column("name", "NODE", 8),
    Column("address", "ADDRESS", 16),
    Column("role", "ROLE", 10),
    Column("term", "TERM", 5, "right"),
    Column("leader", "LEADER", 7),
    Column("commit", "COMMIT", 8, "right"),
    Column("applied", "APPLIED", 8, "right"),
    Column("lag", "LAG", 6, "right"),
    Column("digest", "DIGEST", 8),
    Column("load", "LOAD", 10),
    Column("spark", "LOAD (1m)", 20),
    Column("tasks", "RUN/Q", 7, "right"),
    Column("faults", "FAULTS", 7, "right"),
    Column("reach", "STATE", 12),
]
# NodeRow fields that feed each column, for highlighting what just changed.
FIELDS = {"role": "role", "term": "term", "leader": "leader", "commit": "commit",
          "applied": "applied", "lag": "lag", "digest": "digest_ok", "load": "load",
          "reach": "reachable"}


class ProcessControl(Protocol):
    """What the fault keys need from a process manager (local or, later, SSH)."""

    def kill(self, name: str) -> object: ...

    def pause(self, name: str) -> object: ...

    def resume(self, name: str) -> object: ...

    def restart(self, name: str) -> object: ...


@dataclass(frozen=True)
class Target:
    address: str
    host: str
    port: int


def push_interval_ms(agents: int) -> int:
    """How often the console lets each agent push its status: 4 times a second up to 250
    agents, then slower so that the whole cluster sends about 1,000 pushes a second (one a
    second each at 1,000 agents, the rate one Python thread decodes with room to spare:
    bench/console.py)."""
    return max(250, agents)


def bar(fraction: float | None, width: int = 8) -> str:
    if fraction is None:
        return ""
    full = min(width, round(fraction * width))
    return "█" * full + "·" * (width - full)


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(history, width: int = 20) -> str:
    """The last ``width`` load samples as block characters (a gap where unreachable)."""
    out = []
    for v in list(history)[-width:]:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, int(max(0.0, v) * (len(SPARKS) - 1) + 0.5))])
    return "".join(out)


_HIGHLIGHTED = tuple((FIELDS[c.key], i) for i, c in enumerate(COLUMNS) if c.key in FIELDS)


def row_highlight(r: NodeRow, now: float, window: float = 1.5) -> frozenset[int]:
    """The indexes of the cells whose field changed less than ``window`` seconds ago."""
    changed = r.changed_at
    return frozenset(i for f, i in _HIGHLIGHTED
                     if (t := changed.get(f)) is not None and now - t < window)


class RowCache:
    """``TableRow``s by node, rebuilt only when the row's version, its highlight, its
    paused mark or the second (the sparkline moves once a second) changed. At 1,000 nodes
    a render tick then formats the rows that changed since the last tick, not all of them."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[tuple, TableRow]] = {}

    def table_rows(self, model, rows: list[NodeRow], now: float, paused: set[str] | frozenset,
                   epoch: int) -> list[TableRow]:
        out = []
        cache = self._rows
        for r in rows:
            hl = row_highlight(r, now)
            is_paused = r.name in paused
            key = (r.version, hl, is_paused, epoch)
            hit = cache.get(r.name)
            if hit is not None and hit[0] == key:
                out.append(hit[1])
                continue
            cells = row_cells(r, is_paused, model.load_history(r.name))
            # The highlight fades with time and the sparkline moves once a second, so both
            # are part of the row's version.
            version = (r.version * 2 + (1 if hl else 0)) * 4096 + epoch % 4096
            tr = TableRow(r.name, version, cells, dim=r.reachable is not True, highlight=hl)
            cache[r.name] = (key, tr)
            out.append(tr)
        if len(cache) > 2 * len(rows) + 64:  # nodes filtered out or gone
            keep = {r.name for r in rows}
            for name in [n for n in cache if n not in keep]:
                del cache[name]
        return out


def render_row(r: NodeRow, now: float, paused: bool, history=()) -> tuple[tuple, frozenset[int]]:
    """One row's cells and highlighted cell indexes."""
    return row_cells(r, paused, history), row_highlight(r, now)


def row_cells(r: NodeRow, paused: bool, history=()) -> tuple:
    role = r.role or "?"
    if r.reachable is False:
        reach = "paused" if paused else "down"
    elif r.reachable is None:
        reach = "connecting"
    else:
        reach = "paused?" if paused else "up"
    digest = "" if r.digest is None else (r.digest[:6] if r.digest_ok is not False else "≠ " + r.digest[:4])
    role_text = Text(role, style="bold green" if role == "leader" else "")
    cells = (
        r.name, r.address, role_text, _s(r.term), _s(r.leader), _s(r.commit), _s(r.applied),
        _s(r.lag), digest, bar(r.load), sparkline(history),
        "" if r.running is None else f"{r.running}/{r.queued}",
        str(len(r.faults)) if r.faults else "", reach,
    )
    return cells


def _s(v) -> str:
    return "" if v is None else str(v)


class Confirm(ModalScreen[bool]):
    """Ask before anything destructive; cluster-wide actions need the cluster's name."""

    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel")]

    def __init__(self, question: str, type_to_confirm: str | None = None):
        super().__init__()
        self.question = question
        self.expect = type_to_confirm

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.question)
            if self.expect:
                yield Label(f"Type [b]{self.expect}[/b] to confirm:")
                yield Input(id="confirm-input")
            yield Button("Yes (y)", id="yes", variant="error")
            yield Button("No (n / esc)", id="no")

    def on_key(self, event) -> None:
        if self.expect is None and event.key == "y":
            self.dismiss(True)
        elif self.expect is None and event.key == "n":
            self.dismiss(False)

    @on(Button.Pressed, "#yes")
    def yes(self) -> None:
        if self.expect is not None and self.query_one(Input).value.strip() != self.expect:
            self.query_one(Input).placeholder = "does not match"
            return
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def no(self) -> None:
        self.dismiss(False)

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.yes()


KEY_NAMES = {"question_mark": "?", "plus": "+", "slash": "/", "colon": ":"}


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        app = self.app
        lines = ["[b]raftdeck[/b] keys", ""]
        for b in app.BINDINGS:
            if isinstance(b, Binding) and b.description:
                key = KEY_NAMES.get(b.key, b.key)
                lines.append(f"  [b]{key:<14}[/b] {b.description}")
        lines += ["", f"  [b]{'up/down':<14}[/b] select a node", f"  [b]{'space':<14}[/b] mark a node",
                  "", "esc closes this help"]
        yield Static("\n".join(lines), id="help")


class RaftdeckApp(App):
    TITLE = "raftdeck"
    CSS = """
    #health { height: 2; padding: 0 1; background: $boost; }
    NodeTable { height: 1fr; }
    #events { height: 8; border-top: solid $primary; }
    #filter { dock: bottom; display: none; }
    #filter.visible { display: block; }
    #confirm { width: 60; height: auto; padding: 1 2; border: thick $error; background: $surface; }
    Confirm, Help { align: center middle; }
    #help { width: 60; height: auto; padding: 1 2; border: thick $primary; background: $surface; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit", id="quit"),
        # Operators expect Ctrl-C to leave (k9s, top); Textual's default only hints at ctrl+q.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("k", "kill", "Kill", id="kill"),
        Binding("x", "restart", "Restart", id="restart"),
        Binding("p", "pause", "Pause/resume", id="pause"),
        Binding("i", "isolate", "Isolate", id="isolate"),
        Binding("h", "heal", "Heal all", id="heal"),
        Binding("t", "transfer", "Make leader", id="transfer"),
        Binding("S", "split", "Split in two", id="split"),
        Binding("l", "latency", "Latency", id="latency"),
        Binding("o", "loss", "Loss", id="loss"),
        Binding("plus", "fault_limit", "Fault time limit", id="fault_limit"),
        Binding("g", "select_leader", "Select leader", id="select_leader"),
        Binding("m", "mark_minority", "Mark a minority", id="mark_minority"),
        Binding("s", "sort", "Sort", id="sort"),
        Binding("d", "divergence", "Divergence", id="divergence"),
        Binding("r", "reachability", "Reachability", id="reachability"),
        Binding("L", "logs", "Logs", id="logs"),
        Binding("T", "tasks", "Tasks", id="tasks"),
        Binding("w", "worst", "Worst first", id="worst"),
        Binding("D", "deploy", "Deploy (SSH)", id="deploy"),
        Binding("U", "upgrade", "Rolling upgrade (SSH)", id="upgrade"),
        Binding("slash", "filter", "Filter", id="filter"),
        Binding("colon", "command_palette", "Commands", id="palette", show=False),
    ]
    ACTIONS_THAT_CHANGE = {"kill", "restart", "pause", "isolate", "heal", "transfer", "split",
                           "latency", "loss", "deploy", "upgrade"}
    SORTS = ("name", "role", "term", "commit", "applied", "lag", "load")
    LATENCY_PRESETS = (50, 200, 1000, 0)  # ms; 0 heals the latency rule
    LOSS_PRESETS = (0.1, 0.3, 0.0)
    FAULT_LIMITS = (0, 30_000, 120_000)  # ms a key-injected fault lasts; 0: until healed

    def __init__(self, nodes: list[NodeInfo], cluster: str, addresses: dict[str, tuple[str, int]],
                 *, procs: ProcessControl | None = None, readonly: bool = False,
                 interval_ms: int | None = None, follow: bool = True, mono=time.monotonic,
                 wall=time.time, ssl=None, role: str | None = None, inventory=None):
        """``follow=False`` connects to nothing (the model is fed by the caller: demos
        and snapshot tests); ``mono`` and ``wall`` are the clocks, injectable for the same
        reason. ``interval_ms`` (how often each agent may push) defaults to
        ``push_interval_ms(len(nodes))``. ``inventory`` (the loaded inventory) enables the
        deploy and upgrade keys for its nodes with ``ssh:`` settings."""
        super().__init__()
        self.follow = follow
        self.mono = mono
        self.wall = wall
        if interval_ms is None:
            interval_ms = push_interval_ms(len(nodes))
        self.model = ClusterModel(nodes, stale_after=max(8.0, 3 * keepalive_s(interval_ms / 1000)))
        self.cluster = cluster
        self.addresses = dict(addresses)
        self.procs = procs
        self.readonly = readonly
        self.interval_ms = interval_ms
        self.ssl = ssl  # the operator certificate's context (None: TLS off)
        self.role = role  # its role, for the local process actions (None: not checked)
        self.inventory = inventory
        self._deploy_progress = None  # the last deploy/upgrade started from the keys
        self.client = ClusterClient(self.addresses, cluster, timeout=2.0, op_timeout=5.0, ssl=ssl)
        self.paused: set[str] = set()
        self.worst_first = False
        self.sort_by = "name"
        self.filter = ""
        self._spark_epoch = 0
        self._row_cache = RowCache()
        self.latency_step = 0
        self.loss_step = 0
        self.fault_limit_step = 0
        self._events_seen = 0
        self._cert_alerts: list[str] = []
        self._disk_alerts: list[str] = []
        self._refused_alerts: list[str] = []
        self._cert_checked = -1.0  # mono time of the last look at the certificates
        self._tasks: list[asyncio.Task] = []

    # -- layout and lifecycle --

    def compose(self) -> ComposeResult:
        yield Static(id="health")
        table = NodeTable(columns=COLUMNS)
        yield table
        yield RichLog(id="events", max_lines=500, markup=True)
        yield Input(placeholder="filter nodes (name, address, role)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        if self.follow:
            for name in self.addresses:
                self._tasks.append(asyncio.create_task(self._follow(name)))
        self.set_interval(0.25, self.refresh_view)
        self.set_interval(1.0, self._tick_model)
        self.query_one(NodeTable).focus()
        self.refresh_view()

    def _tick_model(self) -> None:
        self.model.tick(self.mono())
        self._spark_epoch += 1

    async def on_unmount(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.client.close()

    async def _follow(self, name: str) -> None:
        """One agent: connect, subscribe, feed the model; on failure mark it unreachable
        and retry with backoff. Never raises."""
        host, port = self.addresses[name]
        delay = 0.2
        while True:
            conn = AgentConnection(name, host, port, self.cluster, client_id=f"console-{name}",
                                   connect_timeout=2.0, ssl=self.ssl)
            try:
                await conn.connect()
                delay = 0.2
                # Silent past the stale bound: the row is already down; reconnect, so it
                # comes back when the host does (a dead host's end may never arrive).
                async for st in conn.subscribe(self.interval_ms,
                                               silence_s=self.model.stale_after):
                    self.model.update(name, st, self.mono())
                raise ConnectionFailed("connection closed")
            except asyncio.CancelledError:
                await conn.close()
                raise
            except Exception as e:
                self.model.unreachable(name, str(e)[:200], self.mono())
            await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- drawing --

    def refresh_view(self) -> None:
        if not self.screen_stack or not self.screen_stack[0].query(NodeTable):
            return  # the app is shutting down: the render timer may fire once more
        now = self.mono()
        m = self.model
        rows = m.rows(sort=self.sort_by, worst_first=self.worst_first, filter=self.filter)
        table_rows = self._row_cache.table_rows(m, rows, now, self.paused, self._spark_epoch)
        self.query_one(NodeTable).set_rows(table_rows)
        h = m.health(now)
        line1 = Text.assemble(
            (self.cluster, "bold"), " (", ("local" if h.local else "REMOTE",
                                          "" if h.local else "bold reverse"), ")",
            ("  READ-ONLY" if self.readonly else "", "bold"),
            "   leader: ",
            (f"{h.leader} (term {h.leader_term})", "bold green") if h.leader else ("none", "bold red"),
            "   ", ("quorum", "green") if h.has_quorum else ("NO QUORUM", "bold red"),
            f"   reachable {h.reachable}/{h.nodes}   leader changes/min: {h.leader_changes_1m}",
        )
        faults = ", ".join(f.summary for f in h.faults) if h.faults else "none"
        line2 = Text.assemble("faults: ", (faults, "bold yellow" if h.faults else ""))
        if self.paused:
            line2.append(f"   paused: {', '.join(sorted(self.paused))}", "bold yellow")
        if now - self._cert_checked >= 1.0 or self._cert_checked < 0:  # O(nodes): once a second
            self._cert_checked = now
            sts = {n: m.status(n) for n in m.names}
            self._cert_alerts = cert_alerts(node_rows(sts), self.wall())
            self._disk_alerts = disk_alerts(sts)
            self._refused_alerts = refused_alerts(sts)
        if self._cert_alerts:
            line2.append(f"   TLS: {'; '.join(self._cert_alerts)}", "bold yellow")
        if self._disk_alerts:
            line2.append(f"   DISK LOW: {'; '.join(self._disk_alerts)}", "bold red")
        if self._refused_alerts:
            line2.append(f"   DATA LOST: {'; '.join(self._refused_alerts)}", "bold red")
        self.query_one("#health", Static).update(Text("\n").join([line1, line2]))
        log = self.query_one("#events", RichLog)
        for ev in m.new_events(self._events_seen):
            stamp = time.strftime("%H:%M:%S", time.localtime(self.wall() - (now - ev.ts)))
            log.write(Text.assemble(stamp, " ", (ev.kind, "bold"), " ", ev.text))
            if ev.kind == "node_down" and ev.node is not None:
                self._explain_down(ev.node)
        self._events_seen = m.events_total

    @work(group="explain", exit_on_error=False)
    async def _explain_down(self, name: str) -> None:
        """A local agent that went down by itself (a full disk, a damaged log) said why on
        its stderr: put that line in the event log. Looked for a few times over 3 s (the
        process may still be exiting); nothing for a kill, a remote node, or one that is
        back."""
        words_of = getattr(self.procs, "last_words", None)
        if words_of is None:
            return
        for _ in range(6):
            await asyncio.sleep(0.5)
            if self.model.row(name).reachable:
                return
            try:
                words = await asyncio.to_thread(words_of, name)
            except Exception:
                return
            if words:
                self.note(f"[bold]{escape(name)} stopped by itself:[/] {escape(words)}")
                return

    def note(self, text: str) -> None:
        self.query_one("#events", RichLog).write(
            Text.assemble(time.strftime("%H:%M:%S", time.localtime(self.wall())), " ",
                          ("console", "bold cyan"), " ",
                          Text.from_markup(text)))

    # -- which nodes an action applies to --

    def targets(self) -> list[str]:
        table = self.query_one(NodeTable)
        marked = sorted(table.marked_keys)
        if marked:
            return marked
        return [table.selected_key] if table.selected_key else []

    def check_action(self, action: str, parameters) -> bool | None:
        if action in self.ACTIONS_THAT_CHANGE or action in ("sort", "worst", "filter", "logs",
                                                            "select_leader", "mark_minority"):
            if self.screen is not self.screen_stack[0]:
                return False  # another view is open: node keys would act on a hidden table
            if self.readonly and action in self.ACTIONS_THAT_CHANGE:
                return None  # shown greyed out, refused
        return True

    def action_divergence(self) -> None:
        from console.screens import DivergenceScreen

        self.push_screen(DivergenceScreen(fetch_dumps=self.fetch_dumps))

    async def fetch_dumps(self) -> dict[str, dict[str, bytes]]:
        """Every reachable replica's key-value pairs, for the key-level diff."""
        async def one(name: str):
            try:
                return name, (await self.client.dump(name))["kv"]
            except Exception:
                return name, None

        results = await asyncio.gather(*(one(n) for n in sorted(self.addresses)))
        return {n: kv for n, kv in results if kv is not None}

    def action_reachability(self) -> None:
        from console.screens import ReachabilityScreen

        self.push_screen(ReachabilityScreen())

    def action_logs(self) -> None:
        from console.screens import LogsScreen

        names = self.targets()
        if len(names) != 1:
            return
        path = getattr(self.procs, "log_path", lambda n: None)(names[0])
        if path is None:
            self.note(f"no log file known for {names[0]} (remote logs need deploy)")
            return
        self.push_screen(LogsScreen(names[0], path))

    def action_tasks(self) -> None:
        from console.screens import TasksScreen

        self.push_screen(TasksScreen())

    # -- actions --

    def action_help(self) -> None:
        self.push_screen(Help())

    def action_select_leader(self) -> None:
        """Target the leader by role: select it (so k, p, i, l, o... act on it)."""
        leader = self.model.health(self.mono()).leader
        table = self.query_one(NodeTable)
        table.clear_marks()
        if leader is None:
            self.note("no leader to select")
        else:
            table.select(leader)

    def action_mark_minority(self) -> None:
        """Target a minority by role: mark the largest minority of followers (the leader
        excluded), so isolating or killing them leaves the majority a quorum."""
        table = self.query_one(NodeTable)
        table.clear_marks()
        leader = self.model.health(self.mono()).leader
        followers = [r.name for r in self.model.rows() if r.name != leader and r.reachable]
        size = (len(self.addresses) - 1) // 2
        for name in followers[:size]:
            table.toggle_mark(name)
        self.note(f"marked a minority: {', '.join(followers[:size]) or 'none'}")

    def action_sort(self) -> None:
        i = self.SORTS.index(self.sort_by) if self.sort_by in self.SORTS else -1
        self.sort_by = self.SORTS[(i + 1) % len(self.SORTS)]
        self.note(f"sorted by {self.sort_by}")
        self.refresh_view()

    def action_fault_limit(self) -> None:
        self.fault_limit_step = (self.fault_limit_step + 1) % len(self.FAULT_LIMITS)
        ms = self.FAULT_LIMITS[self.fault_limit_step]
        self.note(f"faults injected from now on heal themselves after {ms // 1000} s" if ms
                  else "faults injected from now on last until healed")

    def _with_limit(self, fault: dict) -> dict:
        ms = self.FAULT_LIMITS[self.fault_limit_step]
        return {**fault, "duration_ms": ms} if ms else fault

    @work(group="actions")
    async def action_split(self) -> None:
        names = sorted(self.addresses)
        half = set(names[: len(names) // 2])
        a, b = sorted(half), [n for n in names if n not in half]
        if not await self._confirm(f"Split the cluster into {','.join(a)} | {','.join(b)}?",
                                   cluster_wide=True):
            return
        await self._fault_everywhere(self._with_limit({"action": "partition", "from": a, "to": b}))
        await self._fault_everywhere(self._with_limit({"action": "partition", "from": b, "to": a}))
        self.note(f"split {','.join(a)} | {','.join(b)}")

    @work(group="actions")
    async def action_latency(self) -> None:
        ms = self.LATENCY_PRESETS[self.latency_step]
        self.latency_step = (self.latency_step + 1) % len(self.LATENCY_PRESETS)
        await self._preset_fault("latency", {"ms": ms} if ms else None, f"latency {ms} ms")

    @work(group="actions")
    async def action_loss(self) -> None:
        rate = self.LOSS_PRESETS[self.loss_step]
        self.loss_step = (self.loss_step + 1) % len(self.LOSS_PRESETS)
        await self._preset_fault("loss", {"rate": rate} if rate else None,
                                 f"{int(rate * 100)}% loss")

    async def _preset_fault(self, action: str, params: dict | None, what: str) -> None:
        """Apply one preset of a cycled fault to messages from the target nodes, or
        remove it (``params`` None: the cycle's "off" step)."""
        names = self.targets()
        if not names:
            return
        if params:
            await self._fault_everywhere(self._with_limit({"action": action, "from": names, **params}))
            self.note(f"{what} on messages from {', '.join(names)}")
        else:
            await self._fault_everywhere({"action": "heal", "from": names})
            self.note(f"{action} removed from {', '.join(names)}")

    def action_worst(self) -> None:
        self.worst_first = not self.worst_first
        self.refresh_view()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.focus()

    @on(Input.Submitted, "#filter")
    def filter_set(self, event: Input.Submitted) -> None:
        self.filter = event.value.strip()
        event.input.remove_class("visible")
        self.query_one(NodeTable).focus()
        self.refresh_view()

    # -- deploy over SSH (console/deploy.py; the same run as `raftdeck deploy/upgrade`) --

    @work(group="actions")
    async def action_deploy(self) -> None:
        await self._deploy("deploy", "Install or update raftdeck and start the agents on {hosts} "
                                     "over SSH (known host keys only)?")

    @work(group="actions")
    async def action_upgrade(self) -> None:
        await self._deploy("upgrade", "Rolling upgrade of {hosts} to this version: followers "
                                      "first, the leader last after a transfer?")

    async def _deploy(self, action: str, question: str) -> None:
        from console.deploy import remote_nodes
        from console.screens import DeployScreen

        if self.role is not None and self.role != "admin":
            self.notify(f"{action} needs the admin role; this console runs as {self.role}",
                        severity="error")
            return
        nodes = remote_nodes(self.inventory) if self.inventory is not None else []
        if not nodes:
            self.note(f"nothing to {action}: no node of this inventory has ssh: settings "
                      "(docs/OPERATIONS.md, Deploying to real hosts)")
            return
        running = self._deploy_progress
        if running is not None and not running.ended:
            self.note(f"a {running.action} is still running: showing it")
            self.push_screen(DeployScreen(running))
            return
        hosts = ", ".join(n.name for n in nodes)
        if not await self._confirm(question.format(hosts=hosts), cluster_wide=True):
            return
        self.note(f"{action}: {hosts}")
        screen = DeployScreen.for_inventory(self.inventory, action, client_ssl=self.ssl)
        self._deploy_progress = screen.progress
        self.push_screen(screen)

    async def _confirm(self, question: str, cluster_wide: bool = False) -> bool:
        return await self.push_screen_wait(Confirm(question, self.cluster if cluster_wide else None))

    def _need_procs(self) -> bool:
        if self.procs is None:
            self.note("no process manager for these nodes (remote control needs deploy)")
            return False
        if self.role is not None and self.role != "admin":
            self.notify(f"kill, pause and restart need the admin role; this console runs as "
                        f"{self.role}", severity="error")
            self.note(f"[red]refused:[/] kill, pause and restart need the admin role (this console "
                      f"is {self.role})")
            return False
        return True

    async def _each(self, verb: str, fn, names: list[str]) -> None:
        for n in names:
            try:
                await asyncio.to_thread(fn, n)
                self.note(f"{verb} {n}")
            except Exception as e:
                self.note(f"[red]{verb} {n} failed:[/] {e}")

    @work(group="actions")
    async def action_kill(self) -> None:
        names = self.targets()
        if not names or not self._need_procs():
            return
        if await self._confirm(f"SIGKILL {', '.join(names)}?", cluster_wide=len(names) > 1):
            await self._each("killed", self.procs.kill, names)

    @work(group="actions")
    async def action_restart(self) -> None:
        names = self.targets()
        if names and self._need_procs():
            for n in names:
                self.paused.discard(n)
            await self._each("restarted", self.procs.restart, names)

    @work(group="actions")
    async def action_pause(self) -> None:
        names = self.targets()
        if not names or not self._need_procs():
            return
        to_resume = [n for n in names if n in self.paused]
        to_pause = [n for n in names if n not in self.paused]
        if to_pause and not await self._confirm(f"SIGSTOP {', '.join(to_pause)}?"):
            to_pause = []
        await self._each("paused", self.procs.pause, to_pause)
        self.paused |= set(to_pause)
        await self._each("resumed", self.procs.resume, to_resume)
        self.paused -= set(to_resume)

    @work(group="actions")
    async def action_isolate(self) -> None:
        names = self.targets()
        if not names:
            return
        if not await self._confirm(f"Cut {', '.join(names)} off from the rest?",
                                   cluster_wide=len(names) > 1):
            return
        others = [n for n in self.addresses if n not in names]
        await self._fault_everywhere(self._with_limit({"action": "partition", "from": names, "to": others}))
        await self._fault_everywhere(self._with_limit({"action": "partition", "from": others, "to": names}))
        self.note(f"isolated {', '.join(names)}")

    @work(group="actions")
    async def action_heal(self) -> None:
        await self.heal_all()

    async def heal_all(self) -> None:
        for n in sorted(self.addresses):
            try:
                await self.client.call(n, "heal")
            except Exception as e:
                self._forbidden(e)
                self.note(f"[red]heal {n} failed:[/] {e}")
        if self.paused and self.procs is not None:
            await self._each("resumed", self.procs.resume, sorted(self.paused))
            self.paused.clear()
        self.note("healed every fault")

    @work(group="actions")
    async def action_transfer(self) -> None:
        names = self.targets()
        if len(names) != 1:
            return
        try:
            await self.client.transfer(names[0])
            self.note(f"leadership transfer to {names[0]} started")
        except Exception as e:
            self._forbidden(e)
            self.note(f"[red]transfer to {names[0]} failed:[/] {e}")

    async def _fault_everywhere(self, fault: dict) -> None:
        for n in sorted(self.addresses):
            try:
                await self.client.call(n, "fault", **fault)
            except Exception as e:
                self._forbidden(e)
                self.note(f"[red]fault on {n} not confirmed:[/] {e}")

    def _forbidden(self, e: BaseException) -> None:
        """A refusal by role is a notification (once per message), not only an event line."""
        if getattr(e, "code", None) == "forbidden":
            self.notify(getattr(e, "message", str(e)), title="forbidden", severity="error")

    @work(group="actions")
    async def action_quit(self) -> None:
        if self.model.health(self.mono()).faults or self.paused:
            if not self.readonly and await self._confirm("Heal the faults this console injected before leaving?"):
                await self.heal_all()
        self.exit()


class ClusterProcesses:
    """ProcessControl over console.local.LocalCluster (the tests' and benchmarks' clusters)."""

    def __init__(self, lc):
        self.lc = lc

    def kill(self, name: str) -> None:
        self.lc.kill(name)

    def pause(self, name: str) -> None:
        self.lc.pause(name)

    def resume(self, name: str) -> None:
        self.lc.resume(name)

    def restart(self, name: str) -> None:
        if self.lc.alive(name):
            self.lc.kill(name)
        self.lc.start(name)

    def log_path(self, name: str):
        return self.lc.log_path(name)

    def last_words(self, name: str) -> str:
        return self.lc.last_words(name)


def app_for_local_cluster(lc, **kw) -> RaftdeckApp:
    nodes = [NodeInfo(n, f"127.0.0.1:{p}", lc.priorities.get(n, 1), 1, True)
             for n, p in lc.ports.items()]
    return RaftdeckApp(nodes, lc.cluster, {n: ("127.0.0.1", p) for n, p in lc.ports.items()},
                       procs=ClusterProcesses(lc), **{"ssl": lc.ssl_context(), **kw})
