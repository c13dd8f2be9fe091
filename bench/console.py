"""The console's node table: CPU cost of following agents, and change-to-render delay.

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

from textual.app import App, ComposeResult

from console.widgets.node_table import Column, NodeTable, TableRow

SIZE = (160, 50)
FEED_HZ = 50
WARMUP_S = 1.0

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
    a = p.parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    counts = [int(x) for x in a.agents.split(",") if x.strip()]

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    if not a.no_baseline:
        runs.append(asyncio.run(run_one(100, a.rate, a.tick, a.seconds, feed=False)))
    for n in counts:
        runs.append(asyncio.run(run_one(n, a.rate, a.tick, a.seconds, feed=True)))

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
        "runs": runs,
        "note": "cpu_cores is the whole process (feed + table + Textual, headless driver); "
                "status decoding and network tasks are not included",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
