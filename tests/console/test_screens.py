"""The console's divergence and tasks screens (console/screens), driven by Textual's Pilot:
the divergence screen over a pure model fed by hand, the tasks screen against a real
local cluster inside the real app."""

from __future__ import annotations

import asyncio
import time

import pytest
from rich.text import Text
from textual.app import App
from textual.widgets import DataTable, Input, Select, Static

from console.app import app_for_local_cluster
from console.cluster import ClusterModel, NodeInfo
from console.local import LocalCluster
from console.testing import until
from console.screens import NO_DUMP_MESSAGE, DivergenceScreen, SubmitTaskForm, TasksScreen

NAMES = ["n1", "n2", "n3", "n4"]
SIZE = (160, 45)


def plain(v) -> str:
    return v.plain if isinstance(v, Text) else str(v)


def text_of(widget: Static) -> str:
    return plain(widget.content)


def table_rows(table: DataTable) -> dict[str, list[str]]:
    return {k.value: [plain(c) for c in table.get_row(k)] for k in table.rows}


# -- divergence, over a model fed synthetic statuses --------------------------------------


def status(node, *, leader="n1", term=3, commit=10, applied=10, digest="d10", progress=None):
    """The fields of an agent's status map that ClusterModel.update() reads."""
    return {
        "node": node, "role": "leader" if node == leader else "follower", "term": term,
        "leader": leader, "commit": commit, "applied": applied, "last_index": commit,
        "voters": list(NAMES), "learners": [], "progress": progress or {}, "digest": digest,
        "keys": 3, "capacity": 1, "load": {"running": 0, "queued": 0, "capacity": 1},
        "faults": [], "tasks": {"counts": {}},
    }


def diverged_model() -> ClusterModel:
    m = ClusterModel([NodeInfo(n, f"127.0.0.1:{7100 + i}") for i, n in enumerate(NAMES)])
    good = "a" * 64
    m.update("n1", status("n1", digest=good, progress={"n2": {"match": 10}, "n3": {"match": 10},
                                                       "n4": {"match": 8}}), 0.0)
    m.update("n2", status("n2", digest=good), 0.0)
    m.update("n3", status("n3", digest="b" * 64), 0.0)  # planted: same index, other digest
    m.update("n4", status("n4", commit=8, applied=8, digest="c" * 64), 0.0)  # behind: not compared
    return m


class Host(App):
    """The least an app must offer the screens: ``model`` and ``client``."""

    def __init__(self, model: ClusterModel, screen) -> None:
        super().__init__()
        self.model = model
        self.client = None
        self._first = screen

    def on_mount(self) -> None:
        self.push_screen(self._first)


def dumps() -> dict[str, dict[str, bytes]]:
    base = {"a": b"1", "b": b"2", "c": b"3"}
    return {
        "n1": {**base, "d": b"4"},
        "n2": dict(base),
        "n3": {**base, "b": b"X", "e": b"5", **{f"x{i:02d}": b"x" for i in range(60)}},
    }


def test_divergence_screen_rows_conflict_and_key_diff():
    calls = []

    async def fetch():
        calls.append(1)
        return dumps()

    async def main():
        model = diverged_model()
        screen = DivergenceScreen(fetch_dumps=fetch)
        app = Host(model, screen)
        async with app.run_test(size=SIZE) as pilot:
            table = screen.query_one(DataTable)
            rows = await until(pilot, lambda: len(table.rows) == 4 and table_rows(table), 5,
                               "four replica rows")
            cols = {c: i for i, c in enumerate(DivergenceScreen.COLUMNS)}
            assert rows["n1"][0] == "n1 *"  # the leader
            assert [rows[n][cols["APPLIED"]] for n in NAMES] == ["10", "10", "10", "8"]
            assert {rows[n][cols["LEADER COMMIT"]] for n in NAMES} == {"10"}
            assert rows["n4"][cols["MATCH"]] == "8" and rows["n4"][cols["LAG"]] == "2"
            assert rows["n3"][cols["DIGEST"]] == "b" * 10
            # The planted mismatch at applied 10: n3 is the odd one out; n1 and n2 hold the
            # majority digest, which still does not agree with everyone's.
            assert rows["n3"][cols["AGREES"]].startswith("NO @10: differs from n1,n2")
            assert rows["n1"][cols["AGREES"]] == "no @10: n3 differ"
            assert rows["n2"][cols["AGREES"]] == "no @10: n3 differ"
            assert rows["n4"][cols["AGREES"]] == "—"  # nobody else at applied 8
            assert "digest conflict at applied 10" in text_of(screen.query_one("#div-conflicts"))
            # Refreshed from the model: n4 catches up a little.
            model.update("n4", status("n4", commit=9, applied=9, digest="c" * 64), 1.0)
            await until(pilot, lambda: table_rows(table)["n4"][cols["APPLIED"]] == "9", 3,
                        "n4's new applied index on screen")
            # f: the key-level diff from the dumps the app supplies.
            await pilot.press("f")
            await until(pilot, lambda: screen.key_diff is not None, 5, "the key diff")
            text = text_of(screen.query_one("#div-keys"))
            assert "2 keys agree on all 3 replicas" in text  # a and c
            assert "n1: 2 differ, 61 missing" in text
            assert "n2: 1 differ, 62 missing" in text
            assert "n3: 62 differ, 1 missing" in text
            assert "differ: b, d\n" in text  # n1's
            assert "… and 12 more" in text  # only the first 50 keys are listed
            assert calls == [1]
            # escape closes the screen.
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is not screen, 3, "screen closed")

    asyncio.run(main())


def test_divergence_screen_without_a_dump_source_says_so():
    async def main():
        screen = DivergenceScreen()
        app = Host(diverged_model(), screen)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("f")
            await until(pilot, lambda: NO_DUMP_MESSAGE in text_of(screen.query_one("#div-keys")),
                        3, "the no-dump message")

    asyncio.run(main())


# -- tasks: the list window -----------------------------------------------------------------


class FakeTaskList:
    """``client.tasks()`` as the agent pages it: submission order, ``after`` a cursor."""

    def __init__(self, n: int) -> None:
        self.records = [{"id": f"t{i:04d}", "state": "running"} for i in range(n)]
        self.calls = 0

    def add(self, n: int) -> None:
        start = len(self.records)
        self.records += [{"id": f"t{i:04d}", "state": "running"} for i in range(start, start + n)]

    async def tasks(self, state=None, node=None, limit=100, after=None):
        self.calls += 1
        recs = [r for r in self.records if state is None or r["state"] == state]
        i = 0
        if after is not None:
            ids = [r["id"] for r in self.records]
            if after not in ids:
                from console.client import RequestError
                raise RequestError("rejected", f"unknown task {after!r} in 'after'")
            pos = ids.index(after)
            i = sum(1 for r in recs if ids.index(r["id"]) <= pos)
        return [dict(r) for r in recs[i:i + limit]]


def test_tasks_screen_shows_the_newest_tasks_and_keeps_its_cursor():
    async def main():
        screen = TasksScreen(limit=10, max_pages=100)
        c = FakeTaskList(95)
        got = await screen._fetch(c, None)
        assert [r["id"] for r in got] == [f"t{i:04d}" for i in range(85, 95)]  # newest last
        c.calls = 0
        c.add(3)
        got = await screen._fetch(c, None)
        assert [r["id"] for r in got] == [f"t{i:04d}" for i in range(88, 98)]
        assert c.calls == 2  # from the cursor, not through the whole table again
        # Tasks leave the filtered state: the window refills from before the cursor.
        for r in c.records[85:]:
            r["state"] = "succeeded"
        got = await screen._fetch(c, "running")
        assert [r["id"] for r in got] == [f"t{i:04d}" for i in range(75, 85)]
        # The cursor task is forgotten by the cluster: start over, no error.
        del c.records[:90]
        got = await screen._fetch(c, None)
        assert [r["id"] for r in got] == [f"t{i:04d}" for i in range(90, 98)]

    asyncio.run(main())


# -- tasks, against a real cluster --------------------------------------------------------


@pytest.mark.integration
def test_tasks_screen_submit_list_detail_against_a_real_cluster(tmp_path):
    lc = LocalCluster(tmp_path, 3, fsync=False)
    lc.start_all()

    async def main():
        app = app_for_local_cluster(lc)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.model.leader, 30, "a leader")
            screen = TasksScreen()
            await app.push_screen(screen)  # as the app's binding will
            assert app.screen is screen
            table = screen.query_one("#tasks-table", DataTable)
            await until(pilot, lambda: "updated" in text_of(screen.query_one("#tasks-header")),
                        10, "a first (empty) list")

            await pilot.press("n")
            form = await until(pilot, lambda: isinstance(app.screen, SubmitTaskForm) and app.screen,
                               3, "the submit form")
            form.query_one("#kind", Select).value = "echo"
            form.query_one("#arg", Input).focus()
            await pilot.press(*"hello")
            form.query_one("#count", Input).value = "2"
            # A bad field caught by the protocol encoder stays in the form.
            form.query_one("#timeout", Input).value = "0"
            await pilot.click("#submit")
            await until(pilot, lambda: "bad input" in text_of(form.query_one("#form-error")), 10,
                        "the encoder's error in the form")
            assert app.screen is form
            # Fixed, and submitted from the keyboard this time (enter in a field).
            timeout_box = form.query_one("#timeout", Input)
            timeout_box.value = "10000"
            timeout_box.focus()
            await pilot.press("enter")
            await until(pilot, lambda: app.screen is screen, 15,
                        lambda: f"form closed after submitting: {text_of(form.query_one('#form-error'))}")

            def succeeded():
                rows = table_rows(table)
                ok = [k for k, r in rows.items() if k.startswith("ui-") and r[2] == "succeeded"]
                return len(ok) == 2 and ok

            done = await until(pilot, succeeded, 30, "2 tasks succeeded in the list")
            assert len(table.rows) == 2
            assert all(table_rows(table)[k][1] == "echo" and table_rows(table)[k][6] == "0"
                       for k in done)

            # Select one: its record and output in the detail panel.
            table.focus()
            table.move_cursor(row=table.get_row_index(done[1]))
            await pilot.press("enter")
            detail = screen.query_one("#detail", Static)
            await until(pilot, lambda: done[1] in text_of(detail)
                        and "stdout:\nhello" in text_of(detail), 10, "the task's output")
            # Cancelling a finished task is refused on the screen, without a round trip.
            await pilot.press("c")
            await until(pilot, lambda: "already succeeded" in text_of(screen.query_one("#tasks-error")),
                        3, "already succeeded")
            # c on an unfinished task asks, then cancels it.
            await app.client.submit([{"id": "ui-long", "kind": "sleep", "args": {"ms": 30_000},
                                      "timeout_ms": 60_000}])
            await until(pilot, lambda: "ui-long" in table_rows(table), 10, "the long task listed")
            table.move_cursor(row=table.get_row_index("ui-long"))
            await until(pilot, lambda: screen.selected == "ui-long", 3, "long task selected")
            await pilot.press("c")
            await until(pilot, lambda: type(app.screen).__name__ == "ConfirmCancel", 3, "confirm")
            await pilot.press("y")
            await until(pilot, lambda: table_rows(table)["ui-long"][2] == "cancelled", 15,
                        "the long task cancelled")
            # The state filter: all -> submitted -> assigned -> running -> succeeded.
            await pilot.press("s")
            assert screen.state_filter == "submitted"
            await until(pilot, lambda: "updated" in text_of(screen.query_one("#tasks-header"))
                        and not table.rows, 10, "no task left in submitted")
            await pilot.press("s", "s", "s")
            assert screen.state_filter == "succeeded"
            await until(pilot, lambda: sorted(table_rows(table)) == sorted(done), 10,
                        "the succeeded tasks")
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is not screen, 3, "tasks screen closed")

    try:
        asyncio.run(main())
    finally:
        lc.stop_all()
