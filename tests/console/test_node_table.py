"""NodeTable: a line-rendered table (ScrollView + render_line, strips cached by version).

Textual's run_test is async; pytest-asyncio is not a dependency, so each test is a plain
function that drives its coroutine with asyncio.run().
"""

from __future__ import annotations

import asyncio
import dataclasses

from rich.text import Text
from textual.app import App, ComposeResult

from console.widgets.node_table import (
    ELLIPSIS,
    Column,
    NodeTable,
    TableRow,
    fit_str,
    fit_widths,
)

COLUMNS = [
    Column("node", "NODE", 8),
    Column("role", "ROLE", 10),
    Column("term", "TERM", 6, align="right"),
    Column("note", "NOTE", 20),
]


def make_rows(n: int, version: int = 1) -> list[TableRow]:
    return [
        TableRow(f"n{i}", version, (f"n{i}", "follower", str(i), f"note {i}"))
        for i in range(n)
    ]


class TableApp(App):
    def __init__(self, rows: list[TableRow], columns: list[Column] = COLUMNS) -> None:
        super().__init__()
        self.initial_rows = rows
        self.columns = columns
        self.selected: list[str] = []
        self.marks: list[frozenset[str]] = []

    def compose(self) -> ComposeResult:
        yield NodeTable(self.columns)

    def on_mount(self) -> None:
        table = self.query_one(NodeTable)
        table.set_rows(self.initial_rows)
        table.focus()

    def on_node_table_selected(self, message: NodeTable.Selected) -> None:
        self.selected.append(message.key)

    def on_node_table_marks_changed(self, message: NodeTable.MarksChanged) -> None:
        self.marks.append(message.marked)


def run(app: TableApp, body, size=(80, 12)) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await body(pilot, app.query_one(NodeTable))

    asyncio.run(main())


def line_text(table: NodeTable, y: int) -> str:
    return table.render_line(y).text


# ----- pure helpers ----------------------------------------------------------------------


def test_fit_widths_keeps_shrinks_and_drops():
    assert fit_widths([8, 10, 6], 40) == [8, 10, 6]
    # 2 separators leave 22 cells for 24: the widest column gives up 2.
    assert fit_widths([8, 10, 6], 24) == [8, 8, 6]
    widths = fit_widths([30, 30], 21)
    assert sum(widths) + 1 == 21 and max(widths) - min(widths) <= 1
    assert fit_widths([5, 5, 5], 4) == [2, 1, 0]  # three columns cannot fit: drop the last
    assert fit_widths([5], 0) == [0]


def test_fit_str_truncates_with_ellipsis_and_aligns():
    assert fit_str("leader", 4, "left") == "lea" + ELLIPSIS
    assert fit_str("7", 3, "right") == "  7"
    assert fit_str("7", 3, "left") == "7  "
    assert fit_str("abc", 3, "left") == "abc"


# ----- rendering ---------------------------------------------------------------------------


def test_renders_header_and_rows():
    rows = make_rows(3)
    rows[1] = dataclasses.replace(rows[1], cells=("n1", Text("leader", style="bold"), "12", "x" * 40))

    async def body(pilot, table: NodeTable):
        width = table.scrollable_content_region.width
        header = line_text(table, 0)
        assert len(header) == width
        assert header.split() == ["NODE", "ROLE", "TERM", "NOTE"]
        assert line_text(table, 1).split() == ["n0", "follower", "0", "note", "0"]
        second = line_text(table, 2)
        assert "leader" in second
        assert second.index("12") + 2 == header.index("TERM") + 4  # right-aligned
        assert ("x" * 19 + ELLIPSIS) in second  # 40 cells cut to the column's 20
        assert line_text(table, 4).strip() == ""  # past the last row
        # What the screen shows is what render_line returns.
        assert table.render_count == 3

    run(TableApp(rows), body)


def test_columns_fit_a_narrow_widget():
    async def body(pilot, table: NodeTable):
        width = table.scrollable_content_region.width
        assert width == 30
        for y in range(3):
            assert len(line_text(table, y)) == width
        assert ELLIPSIS in line_text(table, 1)

    rows = [TableRow("n0", 1, ("n0", "follower", "1", "a long note that cannot fit"))]
    run(TableApp(rows), body, size=(30, 8))


def test_dimmed_row_is_grey():
    rows = make_rows(3)
    rows[1] = dataclasses.replace(rows[1], dim=True)

    async def body(pilot, table: NodeTable):
        await pilot.press("down", "down")  # the cursor is not on the dimmed row
        await pilot.pause()
        dim_style = table.get_component_rich_style("node-table--dim")
        dimmed = [seg.style for seg in table.render_line(2) if seg.text.strip()]
        normal = [seg.style for seg in table.render_line(1) if seg.text.strip()]
        assert dimmed and all(s.dim for s in dimmed)
        assert all(s.color == dim_style.color for s in dimmed)
        assert not any(s.dim for s in normal)
        assert all(s.color != dim_style.color for s in normal)

    run(TableApp(rows), body)


def test_highlighted_cell_and_row_style():
    rows = make_rows(2)
    rows[1] = dataclasses.replace(rows[1], highlight=frozenset({1}), style="italic")

    async def body(pilot, table: NodeTable):
        segments = {seg.text.strip(): seg.style for seg in table.render_line(2) if seg.text.strip()}
        highlight = table.get_component_rich_style("node-table--highlight")
        assert segments["follower"].color == highlight.color
        assert segments["follower"].italic and segments["n1"].italic
        assert segments["n1"].color != highlight.color

    run(TableApp(rows), body)


# ----- keyboard --------------------------------------------------------------------------


def test_cursor_keys_marks_and_selected_messages():
    async def body(pilot, table: NodeTable):
        assert table.selected_key == "n0"
        await pilot.press("down", "down")
        assert table.selected_key == "n2"
        await pilot.press("space")
        assert table.marked_keys == {"n2"}
        await pilot.press("up", "space")
        assert table.marked_keys == {"n1", "n2"}
        await pilot.pause()
        assert line_text(table, 2).startswith(NodeTable.MARK)
        assert line_text(table, 3).startswith(NodeTable.MARK)
        assert not line_text(table, 1).startswith(NodeTable.MARK)
        await pilot.press("space")
        assert table.marked_keys == {"n2"}
        await pilot.press("up", "up")  # stops at the first row
        assert table.selected_key == "n0"
        await pilot.pause()
        assert app.selected == ["n0", "n1", "n2", "n1", "n0"]
        assert app.marks == [{"n2"}, {"n1", "n2"}, {"n2"}]
        # The selected row is drawn with the cursor style.
        cursor = table.get_component_rich_style("node-table--cursor")
        assert all(seg.style.bgcolor == cursor.bgcolor for seg in table.render_line(1))

    app = TableApp(make_rows(5))
    run(app, body)


def test_paging_and_end_keep_the_cursor_visible():
    async def body(pilot, table: NodeTable):
        page = table.scrollable_content_region.height - 1  # data lines under the header
        assert page == 11
        await pilot.press("pagedown")
        assert table.cursor_row == page
        assert table.scroll_offset.y <= table.cursor_row < table.scroll_offset.y + page
        await pilot.press("end")
        await pilot.pause()
        assert table.selected_key == "n99"
        assert table.scroll_offset.y == 100 - page
        assert line_text(table, page).split()[0] == "n99"
        assert line_text(table, 0).split()[0] == "NODE"  # the header does not scroll
        await pilot.press("pageup")
        assert table.cursor_row == 99 - page
        await pilot.press("home")
        await pilot.pause()
        assert table.selected_key == "n0" and table.scroll_offset.y == 0
        await pilot.press("down")
        assert table.scroll_offset.y == 0
        table.select("n50")
        await pilot.pause()
        assert table.scroll_offset.y <= 50 < table.scroll_offset.y + page

    run(TableApp(make_rows(100)), body)


def test_selection_follows_its_key_when_rows_reorder_or_vanish():
    async def body(pilot, table: NodeTable):
        await pilot.press("down", "down", "space")
        rows = make_rows(5)
        table.set_rows(list(reversed(rows)))
        assert table.selected_key == "n2" and table.cursor_row == 2
        table.set_rows([r for r in rows if r.key != "n2"])
        await pilot.pause()
        assert table.selected_key == "n3"  # the row that took its place
        assert table.marked_keys == frozenset()
        assert app.selected[-1] == "n3"

    app = TableApp(make_rows(5))
    run(app, body)


# ----- render cost -----------------------------------------------------------------------


def test_one_changed_version_renders_one_row():
    rendered: list[tuple[str, int]] = []

    async def body(pilot, table: NodeTable):
        table.render_probe = lambda key, version: rendered.append((key, version))
        before = table.render_count
        rows = make_rows(8)
        table.set_rows(rows)  # same versions: nothing to draw
        await pilot.pause()
        assert table.render_count == before
        lines_before = table.line_count
        rows[3] = TableRow("n3", 2, ("n3", "candidate", "4", "voting"))
        table.set_rows(rows)
        await pilot.pause()
        assert table.render_count == before + 1
        assert rendered == [("n3", 2)]
        assert table.line_count == lines_before + 1  # one line repainted, not the view
        assert line_text(table, 4).split()[:3] == ["n3", "candidate", "4"]
        # Content changed without a version bump is not redrawn: versions are the contract.
        rows[3] = TableRow("n3", 2, ("n3", "leader", "4", "voting"))
        table.set_rows(rows)
        await pilot.pause()
        assert table.render_count == before + 1

    run(TableApp(make_rows(8)), body)


def test_five_thousand_rows_render_only_visible_lines():
    async def body(pilot, table: NodeTable):
        visible = table.scrollable_content_region.height - 1
        assert table.row_count == 5000
        assert table.render_count <= visible
        for _ in range(10):
            await pilot.press("pagedown")
        await pilot.pause()
        assert table.render_count <= 11 * visible + 20  # each page draws one screen
        await pilot.press("end")
        await pilot.pause()
        assert table.selected_key == "n4999"
        count = table.render_count
        assert count <= 12 * visible + 30
        # Every row changes: only the rows on screen are drawn again.
        table.set_rows(make_rows(5000, version=2))
        await pilot.pause()
        assert table.render_count - count <= visible
        # Scrolling back to the top draws one screen, not the 5,000 rows in between.
        count = table.render_count
        await pilot.press("home")
        await pilot.pause()
        assert table.render_count - count <= visible
        assert line_text(table, 1).split()[0] == "n0"

    run(TableApp(make_rows(5000)), body, size=(80, 24))


def test_bench_console_short_run():
    from bench.console import run_one

    result = asyncio.run(run_one(20, rate=5, tick_hz=4, seconds=0.5, feed=True))
    assert result["rows"] == 20 and result["visible_rows"] == 49
    assert 0 < result["cpu_cores"] < 2
    assert 20 <= result["changes_per_s"] <= 200  # 100/s asked
    latency = result["change_to_render_ms"]
    assert latency["samples"] > 0
    assert 0 <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] < 2000
    assert result["row_renders_per_s"] <= result["render_lines_per_s"]


def test_bench_console_full_short_run():
    from bench.console import run_full

    result = asyncio.run(run_full(20, rate=5, tick_hz=4, seconds=0.5, feed=True))
    assert result["mode"] == "full" and result["agents"] == 20
    assert result["transport_links_per_agent"] == 19
    assert result["status_bytes"]["leader"] > result["status_bytes"]["follower"] > 1000
    assert 20 <= result["changes_per_s"] <= 200  # 100/s asked
    assert 0 < result["cpu_cores_console"] <= result["cpu_cores_process"] < 2
    parts = result["cpu_ms_per_s"]
    assert parts["decode"] > 0 and parts["model_update_and_tick"] > 0
    assert parts["render_tick_rows_to_set_rows_and_health"] > 0
    latency = result["decode_to_render_ms"]
    assert latency["samples"] > 0
    assert 0 <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] < 2000
