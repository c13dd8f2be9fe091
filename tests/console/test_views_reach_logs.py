"""The reachability matrix (pure, and its screen over a real ClusterModel) and the logs
screen over a real temp log file, driven by Textual's Pilot. No network."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from rich.console import Console
from textual.app import App
from textual.widgets import Input, Log, Static

from console.cluster import ClusterModel, NodeInfo
from console.screens import LogsScreen, ReachabilityScreen, reachability_matrix
from console.screens.logs import format_line
from console.screens.reachability import render_matrix
from console.testing import until

NAMES = ["n1", "n2", "n3"]
SIZE = (140, 40)


def peer(connected=True, sent=0, full=0, fault=0, error=0, incoming=0, last_error=None):
    return {"address": "127.0.0.1:1", "connected": connected, "connects": 1, "sent": sent,
            "dropped_full": full, "dropped_fault": fault, "dropped_error": error,
            "dropped_too_large": 0, "received": 0, "dropped_incoming": incoming, "queued": 0,
            "last_error": last_error}


def st(node, peers, faults=()):
    return {"node": node, "role": "follower", "term": 1, "leader": "n1", "commit": 1,
            "applied": 1, "last_index": 1, "voters": list(NAMES), "learners": [],
            "digest": "d", "keys": 0, "capacity": 1, "faults": list(faults),
            "transport": {"node": node, "now": 0.0, "peers": peers, "totals": {}}}


# -- reachability_matrix, pure --------------------------------------------------------------


def test_matrix_connected_rates_and_drops():
    prev = {"n1": st("n1", {"n2": peer(sent=100), "n3": peer(sent=10, full=1)}),
            "n2": st("n2", {"n1": peer(sent=0), "n3": peer(sent=0)})}
    cur = {"n1": st("n1", {"n2": peer(sent=340), "n3": peer(sent=10, full=3, error=2, incoming=50)}),
           "n2": st("n2", {"n1": peer(sent=5), "n3": peer(sent=5)})}
    m = reachability_matrix(cur, prev, 2.0)
    assert m.names == ("n1", "n2", "n3")
    c = m.cell("n1", "n2")
    assert (c.state, c.sent, c.rate, c.dropped) == ("ok", 240, 120.0, 0)
    assert c.label() == "✓ 120/s"
    c = m.cell("n1", "n3")
    assert (c.sent, c.dropped) == (0, 4)  # dropped_incoming is the other direction
    assert c.label() == "✓ 0/s ↯4"
    assert m.cell("n1", "n1").state == "self"
    # n3 reported nothing: its row is unknown
    assert all(m.cell("n3", r).label() == "?" for r in ("n1", "n2"))


def test_matrix_without_previous_has_no_rates_and_counter_reset():
    cur = {"n1": st("n1", {"n2": peer(sent=50)})}
    m = reachability_matrix(cur, None, 0.0, NAMES)
    c = m.cell("n1", "n2")
    assert (c.state, c.rate, c.sent) == ("ok", None, None)
    assert c.label() == "✓ up"
    assert m.cell("n1", "n3").label() == "?"  # n3 is not among n1's peers
    # an agent restart resets its counters: count from zero, never negative
    m = reachability_matrix({"n1": st("n1", {"n2": peer(sent=7)})},
                            {"n1": st("n1", {"n2": peer(sent=900)})}, 1.0, NAMES)
    assert m.cell("n1", "n2").sent == 7


def test_matrix_down_unknown_and_faults():
    part = {"action": "partition", "from": ["n1"], "to": ["n3"]}
    lat = {"action": "latency", "from": None, "to": ["n2"], "ms": 200}
    cur = {
        "n1": st("n1", {"n2": peer(), "n3": peer()}, faults=[part, lat]),
        "n2": st("n2", {"n1": peer(connected=False, last_error="connect: refused"), "n3": peer()}),
        "n3": None,  # unreachable sender
    }
    m = reachability_matrix(cur, None, 0.0, NAMES)
    c = m.cell("n1", "n3")
    assert c.state == "fault" and c.label() == "⛔ fault" and "partition" in c.fault
    c = m.cell("n1", "n2")
    assert c.state == "ok" and c.degraded and c.label().endswith("~")
    c = m.cell("n2", "n1")
    assert c.state == "down" and c.label() == "✗ down" and c.error == "connect: refused"
    assert m.cell("n3", "n1").label() == "?" and m.cell("n3", "n2").state == "unknown"
    # a partition enforced by the receiver only also cuts; 100% loss at the sender cuts
    cur = {"n1": st("n1", {"n2": peer(), "n3": peer()},
                    faults=[{"action": "loss", "from": None, "to": ["n2"], "rate": 1.0}]),
           "n3": st("n3", {"n1": peer()}, faults=[{"action": "partition", "from": ["n1"], "to": None}])}
    m = reachability_matrix(cur, None, 0.0, NAMES)
    assert m.cell("n1", "n2").state == "fault"
    assert m.cell("n1", "n3").state == "fault"
    assert m.cell("n3", "n1").state == "ok"  # the rule is from n1, not to it
    # renders
    out = Console(width=120, record=True)
    out.print(render_matrix(m))
    text = out.export_text()
    assert "⛔ fault" in text and "?" in text and "n3" in text


# -- the reachability screen, over a real ClusterModel ----------------------------------------


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class ReachApp(App):
    def __init__(self, model, clock):
        super().__init__()
        self.model = model
        self.mono = clock
        self.wall = lambda: 1_700_000_000.0

    def on_mount(self):
        self.push_screen(ReachabilityScreen(interval=0.2))


def test_reachability_screen_renders_symbols():
    async def main():
        model = ClusterModel([NodeInfo(n, f"127.0.0.1:{7100 + i}") for i, n in enumerate(NAMES)])
        part = {"action": "partition", "from": ["n2"], "to": ["n3"]}
        model.update("n1", st("n1", {"n2": peer(sent=0), "n3": peer(connected=False)}), 0.0)
        model.update("n2", st("n2", {"n1": peer(), "n3": peer()}, faults=[part]), 0.0)
        model.unreachable("n3", "connection refused", 0.0)
        clock = Clock()
        app = ReachApp(model, clock)
        async with app.run_test(size=SIZE) as pilot:
            screen = await until(pilot, lambda: isinstance(app.screen, ReachabilityScreen)
                                 and app.screen.matrix is not None and app.screen, 5, "screen")

            def rendered():
                out = Console(width=140, record=True)
                out.print(screen.query_one("#reach-matrix", Static).content)
                return out.export_text()

            text = rendered()
            assert "✓ up" in text and "✗ down" in text and "⛔ fault" in text and "?" in text
            assert "⛔ fault" in str(screen.query_one("#reach-legend", Static).content)
            # traffic flows: 240 messages in 2 s of the app's mono clock -> 120/s
            model.update("n1", st("n1", {"n2": peer(sent=240), "n3": peer(connected=False)}), 1.0)
            clock.t += 2.0
            await until(pilot, lambda: "✓ 120/s" in rendered(), 15, rendered)
            # More refreshes in the same clock tick keep the rates (they once blinked out,
            # and a poll that missed the one refresh showing them failed here).
            await pilot.pause(0.6)
            assert "✓ 120/s" in rendered(), rendered()
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, ReachabilityScreen), 5, "closed")

    asyncio.run(main())


# -- the logs screen, over a real temp file ----------------------------------------------------


def jline(msg, level="info", **fields):
    return json.dumps({"ts": "2024-05-01T12:34:56.789Z", "level": level,
                       "logger": "nodeagent.driver", "node": "n1", "msg": msg, **fields}) + "\n"


def test_format_line():
    assert format_line(jline("role change", term=7, leader="n2")) == \
        "12:34:56 info nodeagent.driver role change term=7 leader=n2"
    assert format_line("not json at all\n") == "not json at all"
    assert format_line("[1, 2]") == "[1, 2]"
    assert format_line(jline("x", error="a b")).endswith('error="a b"')


class LogsApp(App):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_mount(self):
        self.push_screen(LogsScreen("n1", self.path, interval=0.1))


def test_logs_screen_follow_search_truncate(tmp_path: Path):
    path = tmp_path / "n1.log"
    with open(path, "w") as f:
        f.write("".join(jline(f"line {i}") for i in range(600)))
        f.write("plain text line\n")

    async def main():
        app = LogsApp(path)
        async with app.run_test(size=SIZE) as pilot:
            screen = await until(pilot, lambda: isinstance(app.screen, LogsScreen) and app.screen, 5, "screen")
            log = screen.query_one(Log)
            await until(pilot, lambda: log.line_count > 0, 5, "initial lines")
            lines = list(log.lines)
            assert len(lines) <= 500 and lines[-1] == "plain text line"
            assert lines[-2] == "12:34:56 info nodeagent.driver line 599"
            assert len(lines) == 500 and lines[0].endswith(" line 101")  # the last 500 of 601
            # follow: appended lines show up (a line written in two pieces shows once whole)
            with open(path, "a") as f:
                f.write(jline("peer unreachable", level="warning", peer="n3")[:20])
                f.flush()
                await pilot.pause(0.3)
                f.write(jline("peer unreachable", level="warning", peer="n3")[20:])
            await until(pilot, lambda: log.lines[-1].endswith("peer unreachable peer=n3"), 5,
                        lambda: log.lines[-3:])
            # search: / opens the box, typing filters (case-insensitive)
            await pilot.press("slash")
            box = screen.query_one("#logs-search", Input)
            assert box.has_focus
            await pilot.press(*"UNREACH")
            await until(pilot, lambda: list(log.lines) == [
                "12:34:56 warning nodeagent.driver peer unreachable peer=n3"], 5, lambda: log.lines[:3])
            await pilot.press("enter")
            assert not box.has_class("visible") and screen.filter == "UNREACH"
            # new matching and non-matching lines while filtered
            with open(path, "a") as f:
                f.write(jline("boring"))
                f.write(jline("unreachable again"))
            await until(pilot, lambda: log.line_count == 2, 5, lambda: list(log.lines))
            # clear the filter
            await pilot.press("slash")
            box.value = ""
            await until(pilot, lambda: log.line_count > 100, 5, "unfiltered")
            await pilot.press("escape")  # closes the box, not the screen
            assert isinstance(app.screen, LogsScreen)
            # follow off: appended lines wait; on again: they come
            await pilot.press("f")
            assert screen.follow is False
            with open(path, "a") as f:
                f.write(jline("while paused"))
            await pilot.pause(0.4)
            assert "while paused" not in log.lines[-1]
            await pilot.press("f")
            await until(pilot, lambda: log.lines[-1].endswith("while paused"), 5, "resumed")
            # truncation: the file starts over
            with open(path, "w") as f:
                f.write(jline("after truncate"))
            await until(pilot, lambda: list(log.lines) == [
                "12:34:56 info nodeagent.driver after truncate"], 5, lambda: log.lines[-3:])
            # rotation: another file at the path
            os.rename(path, tmp_path / "n1.log.1")
            with open(path, "w") as f:
                f.write(jline("rotated a lot more text to be longer than before"))
            await until(pilot, lambda: list(log.lines)[-1].endswith("longer than before")
                        and log.line_count == 1, 5, lambda: log.lines[-3:])
            # unreadable: said in the view
            os.remove(path)
            err = screen.query_one("#logs-error", Static)
            await until(pilot, lambda: "cannot read" in str(err.content), 5, "error shown")
            with open(path, "w") as f:
                f.write(jline("back"))
            await until(pilot, lambda: log.lines and log.lines[-1].endswith("back")
                        and not str(err.content), 5, lambda: (log.lines[-3:], str(err.content)))
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, LogsScreen), 5, "closed")

    asyncio.run(main())


def test_logs_screen_reads_at_most_the_tail_and_missing_file(tmp_path: Path):
    path = tmp_path / "big.log"
    with open(path, "w") as f:
        for i in range(40_000):  # ~4 MiB
            f.write(jline(f"entry {i}", pad="x" * 20))

    async def main():
        app = LogsApp(path)
        async with app.run_test(size=SIZE) as pilot:
            screen = await until(pilot, lambda: isinstance(app.screen, LogsScreen) and app.screen, 5, "screen")
            log = screen.query_one(Log)
            await until(pilot, lambda: log.line_count == 500, 5, lambda: log.line_count)
            assert log.lines[-1].startswith("12:34:56 info nodeagent.driver entry 39999")
            assert all(ln.startswith("12:34:56 ") for ln in log.lines)  # no torn first line
        missing = LogsApp(tmp_path / "nope.log")
        async with missing.run_test(size=SIZE) as pilot:
            screen = await until(pilot, lambda: isinstance(missing.screen, LogsScreen)
                                 and missing.screen, 5, "screen")
            err = screen.query_one("#logs-error", Static)
            await until(pilot, lambda: "cannot read" in str(err.content), 5, "error")
            assert "nope.log" in str(err.content)

    asyncio.run(main())
