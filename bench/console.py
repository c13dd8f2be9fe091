"""The console's node table: CPU cost of following agents, and change-to-render delay.

Default mode ("full"): each simulated agent keeps a full status map shaped like
``nodeagent.agent.Agent.status()`` (driver fields, ``progress``/``peer_reports`` on the
leader, ``transport`` with one link per peer (``--links`` to cap), ``storage``, ``tasks``,
``load``, ``faults``), changes it a little per push (commit/applied advance, load varies),
encodes it with ``nodeagent.protocol.encode({"type": "status_update", ...})``, and the
"console side" decodes it with one ``FrameDecoder`` per agent and calls
``ClusterModel.update``. The 4 Hz tick runs ``RaftdeckApp.refresh_view``'s body (rows ->
``console.app.render_row`` -> ``TableRow`` -> ``NodeTable.set_rows``; ``health()`` into a
header); a 1 Hz timer calls ``model.tick``. ``time.process_time`` is added up around the
simulated agents (build + encode), decode, model, the render tick and the paint's
``render_line``; ``cpu_cores_console`` is process CPU minus the simulated agents. The delay
``decode_to_render_ms`` runs from the decode of a status that changed a row to the render
of that row version. Each feed callback does at most 0.1 s of work; pushes it could not do
are counted in ``changes_skipped`` (the console could not keep up).

``--table-only``: the old mode, described below (prebuilt TableRows, no encode/decode, no
ClusterModel).

A headless Textual app (``App.run_test(size=(160, 50))``, no terminal output) holds one
``NodeTable`` (console/widgets/node_table.py) with one row per simulated agent. Two timers
stand in for the console's real loop:

- the feed (50 Hz): each agent pushes a status change ``--rate`` times a second (the
  number of changes due is computed from elapsed time, so timer jitter does not change
  the rate). A change replaces the agent's ``TableRow`` in a plain list (the model) with a
  new one: version + 1, new term/commit/applied/lag/RTT/status cells, sometimes a
  highlighted lag cell or a dimmed (unreachable) row. Each change is stamped with
  ``time.perf_counter()``;
- the render tick (``--tick`` Hz, default 4): ``table.set_rows(model)``, which repaints
  only the visible lines whose version changed, in one ``refresh``.

Measured over ``--seconds`` (default 10) after a 1 s warm-up, for each agent count in
``--agents`` (default 100 and 1,000; one row per agent), plus an idle baseline (100 rows,
no feed, same timers) unless ``--no-baseline``:

- ``cpu_cores``: process CPU time (``time.process_time``: user + system, all threads)
  divided by wall time. This is everything in the process: the simulated feed, set_rows,
  row rendering, Textual's compositor and timers, the headless driver;
- ``breakdown_ms_per_s``: wall time spent inside the feed callbacks, inside ``set_rows``
  and inside ``render_line`` (which includes the row renders on cache misses), per second
  of the window; single-threaded, so roughly CPU time;
- ``row_renders_per_s`` (cache misses) and ``render_lines_per_s`` (calls of render_line);
- ``change_to_render_ms``: for each (row, version) that the widget rendered, the time from
  the change's stamp to the row render (the row renderer's ``render_probe``). Only rows on
  screen (49 of them at 160x50) are rendered, and a version superseded before the next tick
  is never drawn, so samples cover rendered versions only (``samples``, ``superseded``
  counts). ``tick_to_render_ms`` is the same delay measured from the set_rows call of the
  tick that carried the change: the paint pipeline alone, without waiting for the tick.
  Headless, "the screen" is the widget render: Textual composes each update but skips
  encoding it as escape sequences and writing it, so that cost is not included.

Not included: decoding status messages from the network (msgpack), the agents' connection
tasks, and a real terminal's output cost. The simulated feed (building the new rows) and
this benchmark's bookkeeping (stamping, the render probe) are included in ``cpu_cores``.

    python -m bench.console [--agents 100,1000] [--rate 5] [--tick 4] [--seconds 10]
                            [--links N] [--table-only] [--no-baseline]

Prints one JSON object. Percentiles use the nearest rank.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time

import msgpack
from textual.app import App, ComposeResult

from rich.text import Text
from textual.widgets import Static

from console import app as console_app
from console.cluster import ClusterModel, NodeInfo
from console.widgets.node_table import Column, NodeTable, TableRow
from nodeagent import protocol
from nodeagent.statusmap import apply_delta, compact_status, status_delta

SIZE = (160, 50)
FEED_HZ = 50
WARMUP_S = 1.0
FEED_BUDGET_S = 0.1  # full mode: at most this much feed work per feed callback

COLUMNS = [
    Column("node", "NODE", 10),
    Column("addr", "ADDRESS", 21),
    Column("role", "ROLE", 9),
    Column("term", "TERM", 6, "right"),
    Column("commit", "COMMIT", 9, "right"),
    Column("applied", "APPLIED", 9, "right"),
    Column("lag", "LAG", 6, "right"),
    Column("rtt", "RTT ms", 7, "right"),
    Column("tasks", "TASKS", 6, "right"),
    Column("status", "STATUS", 40),
]
ROLES = ("follower", "follower", "follower", "candidate", "leader")
STATUSES = ("ok", "ok", "ok", "catching up", "snapshot sending", "fsync slow", "ok")


def percentile(sorted_ms: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_ms:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_ms)))
    return round(sorted_ms[rank - 1], 3)


def summary(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {
        "samples": len(s),
        "p50_ms": percentile(s, 50),
        "p90_ms": percentile(s, 90),
        "p99_ms": percentile(s, 99),
        "max_ms": round(s[-1], 3) if s else None,
        "mean_ms": round(statistics.fmean(s), 3) if s else None,
    }


class Agent:
    """One simulated agent's status; ``row()`` turns it into a TableRow."""

    __slots__ = ("key", "addr", "version", "term", "commit", "applied", "rtt", "tasks",
                 "status", "role", "reachable")

    def __init__(self, i: int) -> None:
        self.key = f"node-{i:04d}"
        self.addr = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:7400"
        self.version = 1
        self.term = 3
        self.commit = 1000 + i
        self.applied = 1000 + i
        self.rtt = 0.4
        self.tasks = 0
        self.status = "ok"
        self.role = "follower"
        self.reachable = True

    def change(self, rng: random.Random) -> None:
        self.version += 1
        self.commit += rng.randint(1, 40)
        self.applied = self.commit - rng.choice((0, 0, 0, 1, 3, 120))
        if rng.random() < 0.01:
            self.term += 1
            self.role = rng.choice(ROLES)
        self.rtt = round(rng.uniform(0.2, 3.0), 2)
        self.tasks = rng.randint(0, 16)
        self.status = rng.choice(STATUSES)
        if rng.random() < 0.01:
            self.reachable = not self.reachable

    def row(self) -> TableRow:
        lag = self.commit - self.applied
        return TableRow(
            self.key,
            self.version,
            (self.key, self.addr, self.role, str(self.term), str(self.commit),
             str(self.applied), str(lag), f"{self.rtt:.2f}", str(self.tasks), self.status),
            dim=not self.reachable,
            highlight=frozenset((6,)) if lag > 100 else frozenset(),
        )


class TimedTable(NodeTable):
    """NodeTable that adds up the wall time spent in set_rows and render_line."""

    set_rows_s = 0.0
    render_line_s = 0.0

    def set_rows(self, rows) -> None:
        t = time.perf_counter()
        super().set_rows(rows)
        self.set_rows_s += time.perf_counter() - t

    def render_line(self, y: int):
        t = time.perf_counter()
        strip = super().render_line(y)
        self.render_line_s += time.perf_counter() - t
        return strip


class BenchApp(App):
    def __init__(self, agents: int, rate: float, tick_hz: float, feed: bool, seed: int = 1):
        super().__init__()
        self.rng = random.Random(seed)
        self.agents = [Agent(i) for i in range(agents)]
        self.model: list[TableRow] = [a.row() for a in self.agents]
        self.order = list(range(agents))
        self.rng.shuffle(self.order)  # changes visit agents round robin, in this order
        self.next_agent = 0
        self.rate = rate
        self.tick_hz = tick_hz
        self.feed_enabled = feed
        self.carry = 0.0
        self.last_feed = 0.0
        self.changes = 0
        self.feed_s = 0.0
        self.ticks = 0
        self.last_tick_at = 0.0
        # per key: {version: (change stamp, tick stamp or None)} for versions not drawn yet
        self.pending: dict[str, dict[int, list]] = {}
        self.window_start = math.inf
        self.latencies_ms: list[float] = []
        self.tick_latencies_ms: list[float] = []
        self.superseded = 0

    def compose(self) -> ComposeResult:
        yield TimedTable(COLUMNS)

    def on_mount(self) -> None:
        table = self.query_one(TimedTable)
        table.render_probe = self.rendered
        table.set_rows(self.model)
        self.last_feed = time.perf_counter()
        if self.feed_enabled:
            self.set_interval(1 / FEED_HZ, self.feed)
        self.set_interval(1 / self.tick_hz, self.tick)

    def feed(self) -> None:
        now = time.perf_counter()
        due = self.carry + len(self.agents) * self.rate * (now - self.last_feed)
        self.last_feed = now
        n = int(due)
        self.carry = due - n
        agents, order, model, rng = self.agents, self.order, self.model, self.rng
        for _ in range(n):
            i = order[self.next_agent]
            self.next_agent = (self.next_agent + 1) % len(order)
            agent = agents[i]
            agent.change(rng)
            model[i] = agent.row()
            self.pending.setdefault(agent.key, {})[agent.version] = [now, None]
        self.changes += n
        self.feed_s += time.perf_counter() - now

    def tick(self) -> None:
        self.ticks += 1
        now = time.perf_counter()
        self.last_tick_at = now
        # Stamp the changes this tick carries (those not yet carried by an earlier tick).
        for row in self.model:
            versions = self.pending.get(row.key)
            if versions:
                stamp = versions.get(row.version)
                if stamp is not None and stamp[1] is None:
                    stamp[1] = now
        self.query_one(TimedTable).set_rows(self.model)

    def rendered(self, key: str, version: int) -> None:
        now = time.perf_counter()
        versions = self.pending.get(key)
        if not versions:
            return
        stamp = versions.pop(version, None)
        older = [v for v in versions if v < version]
        for v in older:
            del versions[v]
        if stamp is None or stamp[0] < self.window_start:
            return
        self.superseded += len(older)
        self.latencies_ms.append((now - stamp[0]) * 1000)
        if stamp[1] is not None:
            self.tick_latencies_ms.append((now - stamp[1]) * 1000)


# -- full mode: realistic status maps, encoded, decoded, through ClusterModel --------------

TASK_STATES = ("submitted", "assigned", "running", "succeeded", "failed", "timed_out", "cancelled")
TRANSPORT_COUNTERS = ("connects", "connect_failures", "disconnects", "sent", "batches", "bytes_sent",
                      "dropped_full", "dropped_fault", "dropped_error", "dropped_too_large",
                      "received", "dropped_incoming")
STORAGE_KEYS = ("fsync", "segments", "bytes", "first_index", "last_index", "snapshot_index",
                "syncs", "fsyncs", "fsync_latency_ms_sum", "fsync_latency_ms_max", "repaired")
COMMIT_RATE = 200.0  # cluster entries committed per second (drives commit/applied advance)


def digest_of(applied: int) -> str:
    """Same digest for the same applied index on every replica (they agree)."""
    return f"{(applied * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:016x}"


# Agents push the compact status (nodeagent.statusmap) to subscribers; --full-status
# measures the full map a `status` request returns, as pushes carried before.
FULL_STATUS = False
# Subscriptions ask for deltas (nodeagent.statusmap.status_delta) as the console does;
# --no-delta pushes the whole compact map every time.
DELTA = True


class SimAgent:
    """One simulated agent: a full status map shaped like nodeagent.agent.Agent.status()
    (driver fields, progress/peer_reports on the leader, transport with one link per peer,
    storage, tasks, load, faults), changed a little on every push."""

    def __init__(self, i: int, names: list[str], peers: int, leader: bool, rng: random.Random):
        self.name = names[i]
        self.leader = leader
        self.leader_name = names[0]
        others = [n for n in names if n != self.name]
        links = others if peers < 0 else others[:peers]
        self.pushes = 0
        self.rng = rng
        base = 10_000
        self.s: dict = {
            "role": "leader" if leader else "follower", "term": 3,
            "vote": names[0], "leader": names[0],
            "commit": base, "applied": base, "last_index": base, "first_index": 1,
            "snapshot_index": 0, "voters": list(names), "learners": [], "priority": 1,
            "transferee": None,
            "progress": {}, "peer_reports": {},
            "digest": digest_of(base), "keys": 500,
            "leader_changes_1m": 0, "pending_proposals": 0, "pending_reads": 0,
            "inbox_dropped": 0, "messages_in": 0, "messages_out": 0, "pid": 40000 + i,
            "node": self.name, "cluster": "bench",
            "address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:7400",
            "version": "0.1.0", "uptime_s": 100.0, "capacity": 4,
            "load": {"running": 0, "queued": 0, "capacity": 4, "shell": False, "load1": 0.5, "seq": 1},
            "faults": [],
            "transport": {
                "node": self.name, "now": 0.0,
                "peers": {p: {"address": f"{p}:7400", "connected": True,
                              **{c: 0 for c in TRANSPORT_COUNTERS}, "queued": 0,
                              "queued_bytes": 0, "last_error": None, "last_error_at": None,
                              "last_sent_at": 0.0, "last_connected_at": 0.0,
                              "last_received_at": 0.0, "peer_version": "0.1.0"}
                          for p in links},
                "totals": {"peers": len(links), "connected": len(links),
                           **{c: 0 for c in TRANSPORT_COUNTERS}, "queued": 0, "queued_bytes": 0,
                           "dropped_unknown": 0, "received_unknown": 0},
            },
            "storage": {"fsync": True, "segments": 3, "bytes": 4 << 20, "first_index": 1,
                        "last_index": base, "snapshot_index": 0, "syncs": 0, "fsyncs": 0,
                        "fsync_latency_ms_sum": 0.0, "fsync_latency_ms_max": 0.0,
                        "repaired": False},
            "connections": 3, "requests": {"status": 1, "subscribe": 1, "get": 0, "put": 0},
            "tasks": {"counts": {st: 0 for st in TASK_STATES},
                      "executor": {"capacity": 4, "running": 0, "queued": 0, "allow_shell": False,
                                   "submitted": 0, "started": 0, "succeeded": 0, "failed": 0,
                                   "timed_out": 0, "cancelled": 0, "refused": 0,
                                   "duplicates": 0, "stale": 0},
                      "assigned_total": 0, "loads": {}, "expired_total": 0},
        }
        if leader:
            self.s["progress"] = {n: {"match": base, "next": base + 1, "state": "replicate",
                                      "active": True, "learner": False, "inflight": 0}
                                  for n in names}
            self.s["peer_reports"] = {n: {"running": 0, "queued": 0, "capacity": 4, "shell": False,
                                          "load1": 0.5, "seq": 1} for n in others}
            loads_for = names
        else:
            loads_for = [self.name]
        self.s["tasks"]["loads"] = {n: {"at": 0.0, "age": 0.0, "running": 0, "queued": 0,
                                        "capacity": 4, "load1": 0.5, "alive": True}
                                    for n in loads_for}

    def change(self, now: float, cluster_commit: int) -> None:
        """Advance commit/applied, vary the load, bump counters: a realistic next push."""
        rng, s = self.rng, self.s
        self.pushes += 1
        commit = max(s["commit"], cluster_commit - rng.choice((0, 0, 1, 2)))
        applied = commit - rng.choice((0, 0, 0, 1))
        n = commit - s["commit"]
        s["commit"] = commit
        s["applied"] = applied
        s["last_index"] = commit + rng.choice((0, 0, 1))
        s["digest"] = digest_of(applied)
        s["keys"] = 500 + applied // 50
        s["messages_in"] += n + 5
        s["messages_out"] += n + 5
        s["uptime_s"] = round(s["uptime_s"] + 0.2, 1)
        running = rng.randint(0, 4)
        queued = rng.choice((0, 0, 0, 1, 2))
        load1 = round(rng.uniform(0.1, 3.0), 2)
        s["load"] = {"running": running, "queued": queued, "capacity": 4, "shell": False,
                     "load1": load1, "seq": self.pushes}
        ex = s["tasks"]["executor"]
        ex["running"], ex["queued"] = running, queued
        done = rng.choice((0, 0, 1))
        ex["submitted"] += done
        ex["started"] += done
        ex["succeeded"] += done
        s["tasks"]["counts"]["succeeded"] += done
        st = s["storage"]
        st["last_index"] = s["last_index"]
        st["bytes"] += n * 64
        st["syncs"] += 1
        st["fsyncs"] += 1
        lat = rng.uniform(0.2, 4.0)
        st["fsync_latency_ms_sum"] = round(st["fsync_latency_ms_sum"] + lat, 3)
        st["fsync_latency_ms_max"] = round(max(st["fsync_latency_ms_max"], lat), 3)
        tr = s["transport"]
        tr["now"] = round(now, 3)
        # The leader sends to every peer; a follower answers only the leader.
        links = list(tr["peers"].values()) if self.leader else \
            [tr["peers"][p] for p in (self.leader_name,) if p in tr["peers"]]
        for link in links:
            link["sent"] += n + 1
            link["batches"] += 1
            link["bytes_sent"] += 80 * (n + 1)
            link["received"] += 1
            link["last_sent_at"] = link["last_received_at"] = tr["now"]
        tot = tr["totals"]
        k = len(links)
        tot["sent"] += k * (n + 1)
        tot["batches"] += k
        tot["bytes_sent"] += k * 80 * (n + 1)
        tot["received"] += k
        if self.leader:
            for name, p in s["progress"].items():
                m = commit - rng.choice((0, 0, 0, 1, 2))
                p["match"], p["next"] = m, m + 1
                p["inflight"] = commit - m
            for r in s["peer_reports"].values():
                r["running"] = rng.randint(0, 4)
                r["seq"] += 1
            for r in s["tasks"]["loads"].values():
                r["at"] = tr["now"]
                r["running"] = rng.randint(0, 4)
                r["load1"] = round(rng.uniform(0.1, 3.0), 2)
        else:
            r = s["tasks"]["loads"][self.name]
            r["at"], r["running"], r["queued"], r["load1"] = tr["now"], running, queued, load1

    def frame(self) -> bytes:
        status = self.s if FULL_STATUS else compact_status(self.s)
        return protocol.encode({"type": "status_update", "id": 1, "status": status})

    def delta_frames(self, count: int, t0: float, rate: float) -> list[bytes]:
        """``count`` successive pushes of a ``delta: true`` subscription, built as the agent
        builds them (compact map, private copy, ``status_delta`` against the previous one):
        the first whole, the rest deltas. Built before the measured window, because
        computing 5,000 deltas a second over 1,000-peer maps is the agents' work, spread
        over a thousand processes, not the console's."""
        out, prev = [], None
        for k in range(count):
            now = t0 + k / rate
            self.change(now, int(k / rate * COMMIT_RATE) + 10_000)
            cur = msgpack.unpackb(msgpack.packb(compact_status(self.s)), raw=False)
            if prev is None:
                out.append(protocol.encode({"type": "status_update", "id": 1, "status": cur}))
            else:
                out.append(protocol.encode({"type": "status_update", "id": 1, "delta": True,
                                            "status": status_delta(prev, cur)}))
            prev = cur
        return out


class CpuTable(NodeTable):
    """NodeTable adding up the process CPU time of render_line calls made outside the
    render tick (the compositor's paint; calls inside the tick are in its own figure)."""

    render_line_cpu = 0.0
    render_line_s = 0.0
    in_tick = False

    def render_line(self, y: int):
        if self.in_tick:
            return super().render_line(y)
        c = time.process_time()
        strip = super().render_line(y)
        self.render_line_cpu += time.process_time() - c
        return strip


class FullApp(App):
    """What RaftdeckApp does with N followed agents, minus the sockets: status frames are
    decoded by one FrameDecoder per agent, fed to ClusterModel.update, and a 4 Hz tick runs
    refresh_view's body (rows -> render_row -> TableRow -> set_rows; health header)."""

    CSS = "NodeTable { height: 1fr; }"

    def __init__(self, agents: int, rate: float, tick_hz: float, feed: bool, peers: int = -1,
                 seed: int = 1, frames_s: float = 10.0):
        super().__init__()
        self.rng = random.Random(seed)
        names = [f"node-{i:04d}" for i in range(agents)]
        self.sims = [SimAgent(i, names, peers, i == 0, self.rng) for i in range(agents)]
        self.decoders = [protocol.FrameDecoder() for _ in range(agents)]
        # Delta mode: every agent replays the pushes of one of a few templates (the leader
        # its own), and the console side keeps each agent's map as AgentConnection does.
        self.feeds: list[list[bytes]] | None = None
        self.feed_pos = [0] * agents
        self.bases: list[dict | None] = [None] * agents
        self.delta_bytes = 0
        if DELTA and not FULL_STATUS:
            count = int(rate * (frames_s + WARMUP_S + 2)) + 2
            templates = [self.sims[0].delta_frames(count, 0.0, rate)] + [
                self.sims[t].delta_frames(count, 0.0, rate) for t in range(1, min(agents, 17))]
            self.feeds = [templates[0]] + [templates[1 + (i - 1) % (len(templates) - 1)]
                                           for i in range(1, agents)]
            self.delta_bytes = statistics.mean(len(f) for f in templates[-1][1:]) \
                if count > 1 and len(templates) > 1 else 0
        self.model = ClusterModel([NodeInfo(s.name, s.s["address"]) for s in self.sims])
        self.order = list(range(agents))
        self.rng.shuffle(self.order)
        self.next_agent = 0
        self.rate, self.tick_hz, self.feed_enabled = rate, tick_hz, feed
        self.carry = 0.0
        self.last_feed = 0.0
        self.t0 = 0.0
        self.changes = 0
        self.dropped = 0  # pushes skipped because the feed fell more than 1 s behind
        self.frame_bytes = 0
        self.cpu = {"sim": 0.0, "decode": 0.0, "model": 0.0, "render_tick": 0.0,
                    "render_line": 0.0}
        self.ticks = 0
        self.spark_epoch = 0
        self.row_cache = console_app.RowCache()
        self.pending: dict[str, dict[int, float]] = {}  # name -> {model row version: stamp}
        self.window_start = math.inf
        self.latencies_ms: list[float] = []
        self.superseded = 0

    def compose(self) -> ComposeResult:
        yield Static(id="health")
        yield CpuTable(console_app.COLUMNS)

    def on_mount(self) -> None:
        table = self.query_one(CpuTable)
        table.render_probe = self.rendered
        self.t0 = self.last_feed = time.perf_counter()
        now = self.t0
        for i in range(len(self.sims)):  # every agent's first status (the subscribe reply)
            self.push(i, now)
        self.refresh_view()
        if self.feed_enabled:
            self.set_interval(1 / FEED_HZ, self.feed)
        self.set_interval(1 / self.tick_hz, self.refresh_view)
        self.set_interval(1.0, self.tick_model)

    def push(self, i: int, now: float) -> None:
        pt = time.process_time
        sim = self.sims[i]
        c0 = pt()
        if self.feeds is None:
            sim.change(now, int((now - self.t0) * COMMIT_RATE) + 10_000)
            data = sim.frame()
        else:
            feed = self.feeds[i]
            data = feed[self.feed_pos[i] % len(feed)]
            self.feed_pos[i] += 1
        c1 = pt()
        dec = self.decoders[i]
        dec.receive_data(data)
        msg = dec.next_message()
        if msg.get("delta"):
            status = self.bases[i] = apply_delta(self.bases[i], msg["status"])
        else:
            status = self.bases[i] = msg["status"]
        stamp = time.perf_counter()
        c2 = pt()
        model = self.model
        before = model.row_version(sim.name)
        model.update(sim.name, status, time.monotonic())
        after = model.row_version(sim.name)
        c3 = pt()
        if after != before:
            self.pending.setdefault(sim.name, {})[after] = stamp
        cpu = self.cpu
        cpu["sim"] += c1 - c0
        cpu["decode"] += c2 - c1
        cpu["model"] += c3 - c2
        self.frame_bytes += len(data)

    def feed(self) -> None:
        now = time.perf_counter()
        per_s = len(self.sims) * self.rate
        due = self.carry + per_s * (now - self.last_feed)
        self.last_feed = now
        if due > per_s:  # more than a second behind: skip the excess, count it
            self.dropped += int(due - per_s)
            due = per_s
        n = int(due)
        self.carry = due - n
        order = self.order
        deadline = now + FEED_BUDGET_S
        done = 0
        for _ in range(n):
            i = order[self.next_agent]
            self.next_agent = (self.next_agent + 1) % len(order)
            self.push(i, now)
            done += 1
            if time.perf_counter() > deadline:  # saturated: let the loop (and render) run
                break
        self.dropped += n - done
        self.changes += done

    def tick_model(self) -> None:
        c0 = time.process_time()
        self.model.tick(time.monotonic())
        self.spark_epoch += 1
        self.cpu["model"] += time.process_time() - c0

    def refresh_view(self) -> None:
        """RaftdeckApp.refresh_view's body (sort by name, no filter, nothing paused)."""
        c0 = time.process_time()
        self.query_one(CpuTable).in_tick = True
        self.ticks += 1
        now = time.monotonic()
        m = self.model
        table_rows = self.row_cache.table_rows(m, m.rows(sort="name"), now, frozenset(),
                                               self.spark_epoch)
        self.query_one(CpuTable).set_rows(table_rows)
        h = m.health(now)
        line1 = Text.assemble(
            ("bench", "bold"), " (local)   leader: ",
            (f"{h.leader} (term {h.leader_term})", "bold green") if h.leader else ("none", "bold red"),
            "   ", ("quorum", "green") if h.has_quorum else ("NO QUORUM", "bold red"),
            f"   reachable {h.reachable}/{h.nodes}   leader changes/min: {h.leader_changes_1m}",
        )
        faults = ", ".join(f.summary for f in h.faults) if h.faults else "none"
        line2 = Text.assemble("faults: ", (faults, "bold yellow" if h.faults else ""))
        self.query_one("#health", Static).update(Text("\n").join([line1, line2]))
        self.query_one(CpuTable).in_tick = False
        self.cpu["render_tick"] += time.process_time() - c0

    def rendered(self, key: str, version: int) -> None:
        now = time.perf_counter()
        versions = self.pending.get(key)
        if not versions:
            return
        mv = version // 4096 // 2
        stamp = versions.pop(mv, None)
        older = [v for v in versions if v < mv]
        for v in older:
            del versions[v]
        if stamp is None or stamp < self.window_start:
            return
        self.superseded += len(older)
        self.latencies_ms.append((now - stamp) * 1000)


async def run_full(agents: int, rate: float, tick_hz: float, seconds: float, feed: bool,
                   peers: int = -1) -> dict:
    gc.collect()
    app = FullApp(agents, rate, tick_hz, feed, peers, frames_s=seconds)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await asyncio.sleep(WARMUP_S)
        table = app.query_one(CpuTable)

        def snap():
            return (app.changes, app.dropped, app.frame_bytes, app.ticks, dict(app.cpu),
                    table.render_line_cpu, table.render_count, table.line_count)

        before = snap()
        app.window_start = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.sleep(seconds)
        cpu1 = time.process_time()
        wall = time.perf_counter() - app.window_start
        after = snap()
        visible_rows = table.scrollable_content_region.height - 1
        sample_status = app.sims[1 % agents].s
        leader_status = app.sims[0].s
    changes = after[0] - before[0]
    cpu = {k: after[4][k] - before[4][k] for k in after[4]}
    total = cpu1 - cpu0
    sim = cpu["sim"]
    console = total - sim
    result = {
        "mode": "full",
        "agents": agents,
        "transport_links_per_agent": len(sample_status["transport"]["peers"]),
        "status_bytes": {
            "follower": len(protocol.encode({"type": "status_update", "id": 1, "status": sample_status})),
            "leader": len(protocol.encode({"type": "status_update", "id": 1, "status": leader_status})),
        },
        "visible_rows": visible_rows,
        "pushes": "delta" if app.feeds is not None else ("full" if FULL_STATUS else "compact"),
        "delta_bytes_follower_mean": round(app.delta_bytes, 1),
        "feed": feed,
        "wall_s": round(wall, 3),
        "changes_per_s": round(changes / wall, 1),
        "changes_skipped": after[1] - before[1],
        "decoded_mb_per_s": round((after[2] - before[2]) / wall / 1e6, 2),
        "ticks_per_s": round((after[3] - before[3]) / wall, 2),
        "cpu_cores_process": round(total / wall, 4),
        "cpu_cores_console": round(console / wall, 4),
        "cpu_ms_per_s": {
            "sim_agents_build_and_encode": round(sim * 1000 / wall, 2),
            "decode": round(cpu["decode"] * 1000 / wall, 2),
            "model_update_and_tick": round(cpu["model"] * 1000 / wall, 2),
            "render_tick_rows_to_set_rows_and_health": round(cpu["render_tick"] * 1000 / wall, 2),
            "render_line_paint": round((after[5] - before[5]) * 1000 / wall, 2),
            "other_textual_and_loop": round((console - cpu["decode"] - cpu["model"]
                                             - cpu["render_tick"]) * 1000 / wall
                                            - (after[5] - before[5]) * 1000 / wall, 2),
        },
        "row_renders_per_s": round((after[6] - before[6]) / wall, 1),
        "render_lines_per_s": round((after[7] - before[7]) / wall, 1),
    }
    if feed:
        result["decode_to_render_ms"] = summary(app.latencies_ms)
        result["decode_to_render_ms"]["superseded"] = app.superseded
    return result


async def run_one(agents: int, rate: float, tick_hz: float, seconds: float, feed: bool) -> dict:
    gc.collect()
    app = BenchApp(agents, rate, tick_hz, feed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await asyncio.sleep(WARMUP_S)
        table = app.query_one(TimedTable)
        before = (app.changes, app.feed_s, app.ticks, table.set_rows_s, table.render_line_s,
                  table.render_count, table.line_count)
        app.window_start = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.sleep(seconds)
        cpu1 = time.process_time()
        wall = time.perf_counter() - app.window_start
        after = (app.changes, app.feed_s, app.ticks, table.set_rows_s, table.render_line_s,
                 table.render_count, table.line_count)
        changes, feed_s, ticks, set_rows_s, render_s, renders, lines = (
            b - a for a, b in zip(before, after))
        visible_rows = table.scrollable_content_region.height - 1
    result = {
        "agents": agents,
        "rows": agents,
        "visible_rows": visible_rows,
        "feed": feed,
        "wall_s": round(wall, 3),
        "changes_per_s": round(changes / wall, 1),
        "ticks_per_s": round(ticks / wall, 2),
        "cpu_cores": round((cpu1 - cpu0) / wall, 4),
        "breakdown_ms_per_s": {
            "feed": round(feed_s * 1000 / wall, 2),
            "set_rows": round(set_rows_s * 1000 / wall, 2),
            "render_line": round(render_s * 1000 / wall, 2),
        },
        "row_renders_per_s": round(renders / wall, 1),
        "render_lines_per_s": round(lines / wall, 1),
    }
    if feed:
        result["change_to_render_ms"] = summary(app.latencies_ms)
        result["change_to_render_ms"]["superseded"] = app.superseded
        result["tick_to_render_ms"] = summary(app.tick_latencies_ms)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__.split("\n")[0])
    p.add_argument("--agents", default="100,1000",
                   help="comma-separated agent counts (one table row each)")
    p.add_argument("--rate", type=float, default=5.0, help="status changes per agent per second")
    p.add_argument("--tick", type=float, default=4.0, help="render ticks per second")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    p.add_argument("--no-baseline", action="store_true", help="skip the idle 100-row run")
    p.add_argument("--table-only", action="store_true",
                   help="the old mode: prebuilt TableRows, no encode/decode, no ClusterModel")
    p.add_argument("--links", type=int, default=-1,
                   help="full mode: transport links per agent status (default: all peers)")
    p.add_argument("--no-delta", action="store_true",
                   help="push the whole compact map every time (subscriptions without delta)")
    p.add_argument("--full-status", action="store_true",
                   help="push the full status map (as a `status` request answers) instead of "
                   "the compact one subscriptions push")
    a = p.parse_args(argv)
    global FULL_STATUS, DELTA
    FULL_STATUS = a.full_status
    DELTA = not a.no_delta
    args = sys.argv[1:] if argv is None else argv
    counts = [int(x) for x in a.agents.split(",") if x.strip()]

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    if a.table_only:
        def one(n, feed):
            return run_one(n, a.rate, a.tick, a.seconds, feed=feed)
    else:
        def one(n, feed):
            return run_full(n, a.rate, a.tick, a.seconds, feed=feed, peers=a.links)
    if not a.no_baseline:
        runs.append(asyncio.run(one(100, False)))
    for n in counts:
        runs.append(asyncio.run(one(n, True)))

    import textual

    result = {
        "bench": "console",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.console", *args]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "textual": textual.__version__,
            "loadavg_at_start": load_at_start,
        },
        "size": list(SIZE),
        "rate_per_agent": a.rate,
        "tick_hz": a.tick,
        "feed_hz": FEED_HZ,
        "seconds": a.seconds,
        "mode": "table-only" if a.table_only else "full",
        "links": a.links,
        "runs": runs,
        "note": ("cpu_cores is the whole process (feed + table + Textual, headless driver); "
                 "status decoding and network tasks are not included") if a.table_only else
                ("cpu_cores_console = process CPU minus the simulated agents' build+encode; "
                 "sockets/asyncio streams not included"),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
