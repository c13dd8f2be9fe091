"""The node table: a line-rendered table that holds thousands of rows cheaply.

A ``DataTable`` updated with ``update_cell`` re-renders every visible cell when one cell
changes (about 75% of a core at 1,000 rows and 4 Hz, per DESIGN.md "Console"). This
widget is a ``ScrollView`` that draws itself one line at a time (``render_line``):

- the caller hands over the whole table with ``set_rows(rows)`` once per render tick;
  every ``TableRow`` carries a ``version`` that the caller bumps whenever the row's
  content changes (rows are frozen: build a new one rather than mutating);
- rendered rows are kept as ``Strip``s keyed by (row key, selected, marked) and stamped
  with (version, width, style generation): a row is rendered again only when one of
  those changed, and only when it is on screen;
- ``set_rows`` marks dirty only the visible lines whose version changed (all lines when
  the order or the set of keys changed), in one ``refresh`` call;
- line 0 of the viewport is the header; it does not scroll.

Keys: up/down/pageup/pagedown/home/end move the selected row (the view follows), space
toggles a mark on it. ``NodeTable.Selected`` is posted when the selected key changes,
``NodeTable.MarksChanged`` when the set of marked keys changes.

``render_count`` counts row renders (cache misses) and ``line_count`` calls to
``render_line``; ``render_probe(key, version)``, when set, is called for each row render
(benchmarks use it to time a status change to the screen).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ClassVar, Literal, NamedTuple, Sequence

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

ELLIPSIS = "…"
GUTTER = 2  # the mark and one space, before the first column
SEPARATOR = 1  # blank cells between two columns
MIN_COLUMN_WIDTH = 1


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int
    align: Literal["left", "right"] = "left"


@dataclass(frozen=True)
class TableRow:
    """One row. Bump ``version`` whenever anything else in it changes."""

    key: str
    version: int
    cells: tuple[str | Text, ...]
    dim: bool = False  # unreachable node: the row is drawn grey
    style: str = ""  # a Rich style string for the whole row
    highlight: frozenset[int] = frozenset()  # indexes of cells to highlight


class _Styles(NamedTuple):
    header: Style
    cursor: Style
    dim: Style
    highlight: Style
    marker: Style


@lru_cache(maxsize=256)
def _parse_style(style: str) -> Style:
    return Style.parse(style) if style else Style()


def fit_widths(wanted: Sequence[int], available: int) -> list[int]:
    """Column widths that fit ``available`` cells, separators included.

    Widths are kept when they fit; otherwise the widest columns shrink first, down to
    ``MIN_COLUMN_WIDTH``; if even that does not fit, trailing columns are dropped (width 0).
    """
    widths = [max(MIN_COLUMN_WIDTH, w) for w in wanted]
    if not widths:
        return []
    while widths:
        room = available - SEPARATOR * (len(widths) - 1)
        if len(widths) * MIN_COLUMN_WIDTH <= room:
            break
        widths.pop()
    if not widths:
        return [0] * len(wanted)
    excess = sum(widths) - room
    while excess > 0:
        top = max(widths)
        tops = [i for i, w in enumerate(widths) if w == top]
        below = max([w for w in widths if w < top], default=MIN_COLUMN_WIDTH)
        step = min(top - max(below, MIN_COLUMN_WIDTH), -(-excess // len(tops)))
        step = max(step, 1)
        for i in reversed(tops):  # shrink the rightmost of the widest first
            if excess <= 0:
                break
            widths[i] -= step if excess >= step else excess
            excess -= step if excess >= step else excess
    return widths + [0] * (len(wanted) - len(widths))


def fit_str(text: str, width: int, align: str) -> str:
    """``text`` cropped (with an ellipsis) or padded to exactly ``width`` cells."""
    if "\n" in text:
        text = text.replace("\n", " ")
    length = cell_len(text)
    if length > width:
        text = set_cell_size(text, width - 1) + ELLIPSIS if width > 1 else ELLIPSIS[:width]
        length = width
    pad = width - length
    if not pad:
        return text
    return " " * pad + text if align == "right" else text + " " * pad


class NodeTable(ScrollView, can_focus=True):
    """A keyboard-driven table of nodes, rendered line by line from cached strips."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "Up", show=False, id="node_table.cursor_up"),
        Binding("down", "cursor_down", "Down", show=False, id="node_table.cursor_down"),
        Binding("pageup", "page_up", "Page up", show=False, id="node_table.page_up"),
        Binding("pagedown", "page_down", "Page down", show=False, id="node_table.page_down"),
        Binding("home", "first", "First", show=False, id="node_table.first"),
        Binding("end", "last", "Last", show=False, id="node_table.last"),
        Binding("space", "toggle_mark", "Mark", id="node_table.toggle_mark"),
    ]

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "node-table--header",
        "node-table--cursor",
        "node-table--dim",
        "node-table--highlight",
        "node-table--marker",
    }

    DEFAULT_CSS = """
    NodeTable {
        width: 1fr;
        height: 1fr;
        overflow-x: hidden;
        overflow-y: auto;
    }
    NodeTable > .node-table--header {
        color: $text-accent;
        text-style: bold;
    }
    NodeTable > .node-table--cursor {
        background: $block-cursor-blurred-background;
    }
    NodeTable:focus > .node-table--cursor {
        background: $block-cursor-background;
        color: $block-cursor-foreground;
        text-style: $block-cursor-text-style;
    }
    NodeTable > .node-table--dim {
        color: $text-disabled;
        text-style: dim;
    }
    NodeTable > .node-table--highlight {
        color: $text-warning;
        text-style: bold;
    }
    NodeTable > .node-table--marker {
        color: $text-accent;
        text-style: bold;
    }
    """

    MARK = "●"

    class Selected(Message):
        """The selected row changed (``key`` is its key)."""

        def __init__(self, node_table: NodeTable, key: str) -> None:
            super().__init__()
            self.node_table = node_table
            self.key = key

        @property
        def control(self) -> NodeTable:
            return self.node_table

    class MarksChanged(Message):
        """The set of marked rows changed."""

        def __init__(self, node_table: NodeTable, marked: frozenset[str]) -> None:
            super().__init__()
            self.node_table = node_table
            self.marked = marked

        @property
        def control(self) -> NodeTable:
            return self.node_table

    # Class-level defaults: notify_style_update may run before __init__ finishes.
    _generation: int = 0
    _styles: _Styles | None = None

    def __init__(
        self,
        columns: Sequence[Column] = (),
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self._columns: list[Column] = list(columns)
        self._rows: list[TableRow] = []
        self._keys: tuple[str, ...] = ()
        self._index: dict[str, int] = {}
        self._cursor = 0
        self._marked: set[str] = set()
        self._posted_key: str | None = None
        # (key, selected, marked) -> (version, width, generation, strip)
        self._strips: dict[tuple[str, bool, bool], tuple[int, int, int, Strip]] = {}
        self._header: tuple[int, int, Strip] | None = None
        self._widths: tuple[int, int, list[int]] | None = None
        self.render_count = 0
        self.line_count = 0
        self.render_probe: Callable[[str, int], None] | None = None

    # ----- data in -----------------------------------------------------------------

    @property
    def columns(self) -> tuple[Column, ...]:
        return tuple(self._columns)

    @property
    def rows(self) -> Sequence[TableRow]:
        return tuple(self._rows)

    @property
    def row_count(self) -> int:
        return len(self._rows)

    def set_columns(self, columns: Sequence[Column]) -> None:
        self._columns = list(columns)
        self._invalidate()

    def set_rows(self, rows: Sequence[TableRow]) -> None:
        """Replace the table's rows; repaint only visible lines whose version changed."""
        old = self._rows
        new = list(rows)
        keys = tuple(row.key for row in new)
        self._rows = new
        if keys != self._keys:
            selected = self.selected_key
            key_set_changed = set(keys) != set(self._keys)
            self._keys = keys
            self._index = {key: i for i, key in enumerate(keys)}
            if key_set_changed:
                self._strips = {k: v for k, v in self._strips.items() if k[0] in self._index}
                marked = self._marked & self._index.keys()
                if marked != self._marked:
                    self._marked = marked
                    self.post_message(self.MarksChanged(self, frozenset(marked)))
            if selected in self._index:
                self._cursor = self._index[selected]
            else:
                self._cursor = max(0, min(self._cursor, len(new) - 1))
            if self.virtual_size.height != len(new) + 1:
                self.virtual_size = Size(0, len(new) + 1)
            self.refresh()
            self._check_selection()
            return
        top = self.scroll_offset.y
        width, height = self._view_size()
        lines = max(0, height - 1)
        regions = [
            Region(0, i - top + 1, width, 1)
            for i in range(top, min(len(new), top + lines))
            if new[i].version != old[i].version
        ]
        if regions:
            self.refresh(*regions)

    # ----- selection and marks -------------------------------------------------------

    @property
    def cursor_row(self) -> int:
        return self._cursor

    @property
    def selected_key(self) -> str | None:
        if not self._rows:
            return None
        return self._rows[self._cursor].key

    @property
    def marked_keys(self) -> frozenset[str]:
        return frozenset(self._marked)

    def select(self, key: str) -> bool:
        """Move the selection to the row ``key``; False if there is no such row."""
        index = self._index.get(key)
        if index is None:
            return False
        self._move_cursor(index)
        return True

    def toggle_mark(self, key: str) -> None:
        if key not in self._index:
            return
        if key in self._marked:
            self._marked.discard(key)
        else:
            self._marked.add(key)
        self._refresh_row(self._index[key])
        self.post_message(self.MarksChanged(self, frozenset(self._marked)))

    def clear_marks(self) -> None:
        if self._marked:
            self._marked.clear()
            self.refresh()
            self.post_message(self.MarksChanged(self, frozenset()))

    def action_cursor_up(self) -> None:
        self._move_cursor(self._cursor - 1)

    def action_cursor_down(self) -> None:
        self._move_cursor(self._cursor + 1)

    def action_page_up(self) -> None:
        page = self._page_height()
        self.scroll_to(y=self.scroll_offset.y - page, animate=False)
        self._move_cursor(self._cursor - page)

    def action_page_down(self) -> None:
        page = self._page_height()
        self.scroll_to(y=self.scroll_offset.y + page, animate=False)
        self._move_cursor(self._cursor + page)

    def action_first(self) -> None:
        self._move_cursor(0)

    def action_last(self) -> None:
        self._move_cursor(len(self._rows) - 1)

    def action_toggle_mark(self) -> None:
        key = self.selected_key
        if key is not None:
            self.toggle_mark(key)

    def _on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or offset.y < 1:
            return
        index = self.scroll_offset.y + offset.y - 1
        if index < len(self._rows):
            self._move_cursor(index)

    def _view_size(self) -> Size:
        """The visible content size: ``self.size`` minus the vertical scrollbar."""
        return self.scrollable_content_region.size

    def _page_height(self) -> int:
        return max(1, self._view_size().height - 1)

    def _move_cursor(self, index: int) -> None:
        if not self._rows:
            return
        index = max(0, min(index, len(self._rows) - 1))
        if index != self._cursor:
            self._refresh_row(self._cursor)
            self._cursor = index
            self._refresh_row(index)
        self._scroll_to_cursor()
        self._check_selection()

    def _scroll_to_cursor(self) -> None:
        page = self._page_height()
        top = self.scroll_offset.y
        if self._cursor < top:
            self.scroll_to(y=self._cursor, animate=False)
        elif self._cursor >= top + page:
            self.scroll_to(y=self._cursor - page + 1, animate=False)

    def _check_selection(self) -> None:
        key = self.selected_key
        if key is not None and key != self._posted_key:
            self._posted_key = key
            self.post_message(self.Selected(self, key))

    def _refresh_row(self, index: int) -> None:
        line = index - self.scroll_offset.y + 1
        width, height = self._view_size()
        if 1 <= line < height:
            self.refresh(Region(0, line, width, 1))

    # ----- styles --------------------------------------------------------------------

    def _invalidate(self) -> None:
        self._generation += 1
        self._styles = None
        self._header = None
        self._widths = None
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._invalidate()

    def _on_focus(self, event: events.Focus) -> None:
        self._invalidate()

    def _on_blur(self, event: events.Blur) -> None:
        self._invalidate()

    def _get_styles(self) -> _Styles:
        if self._styles is None:
            get = self.get_component_rich_style

            def foreground(name: str) -> Style:
                # The partial style keeps only what the rule sets (no background) but
                # drops a colour's alpha; the full style has it blended: take that colour.
                return get(name, partial=True) + Style(color=get(name).color)

            self._styles = _Styles(
                header=foreground("node-table--header"),
                cursor=get("node-table--cursor"),
                dim=foreground("node-table--dim"),
                highlight=foreground("node-table--highlight"),
                marker=foreground("node-table--marker"),
            )
        return self._styles

    def _column_widths(self, width: int) -> list[int]:
        cached = self._widths
        if cached is not None and cached[0] == width and cached[1] == self._generation:
            return cached[2]
        widths = fit_widths([c.width for c in self._columns], width - GUTTER)
        self._widths = (width, self._generation, widths)
        return widths

    # ----- rendering -----------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        self.line_count += 1
        width = self._view_size().width
        if y == 0:
            return self._header_strip(width)
        index = self.scroll_offset.y + y - 1
        if not 0 <= index < len(self._rows):
            return Strip.blank(width)
        row = self._rows[index]
        selected = index == self._cursor
        marked = row.key in self._marked
        cache_key = (row.key, selected, marked)
        hit = self._strips.get(cache_key)
        if (
            hit is not None
            and hit[0] == row.version
            and hit[1] == width
            and hit[2] == self._generation
        ):
            return hit[3]
        strip = self._render_row(row, width, selected, marked)
        self._strips[cache_key] = (row.version, width, self._generation, strip)
        return strip

    def _header_strip(self, width: int) -> Strip:
        cached = self._header
        if cached is not None and cached[0] == width and cached[1] == self._generation:
            return cached[2]
        style = self._get_styles().header
        segments = [Segment(" " * min(GUTTER, width), style)]
        used = min(GUTTER, width)
        for n, (column, w) in enumerate(zip(self._columns, self._column_widths(width))):
            if not w:
                continue
            if n:
                segments.append(Segment(" " * SEPARATOR, style))
                used += SEPARATOR
            segments.append(Segment(fit_str(column.label, w, column.align), style))
            used += w
        if used < width:
            segments.append(Segment(" " * (width - used), style))
        strip = Strip(segments, max(used, width))
        if used > width:
            strip = strip.crop(0, width)
        self._header = (width, self._generation, strip)
        return strip

    def _render_row(self, row: TableRow, width: int, selected: bool, marked: bool) -> Strip:
        self.render_count += 1
        if self.render_probe is not None:
            self.render_probe(row.key, row.version)
        styles = self._get_styles()
        base = _parse_style(row.style)
        mark = self.MARK if marked else " "
        segments = [
            Segment(mark, base + styles.marker if marked else base),
            Segment(" " * (GUTTER - 1), base),
        ]
        used = GUTTER
        cells = row.cells
        highlight = row.highlight
        console = self.app.console
        for n, (column, w) in enumerate(zip(self._columns, self._column_widths(width))):
            if not w:
                continue
            if n:
                segments.append(Segment(" " * SEPARATOR, base))
                used += SEPARATOR
            cell = cells[n] if n < len(cells) else ""
            style = base + styles.highlight if n in highlight else base
            if isinstance(cell, str):
                segments.append(Segment(fit_str(cell, w, column.align), style))
            else:
                segments.extend(_render_text(cell, w, column.align, style, console))
            used += w
        if used < width:
            segments.append(Segment(" " * (width - used), base))
        if row.dim:
            segments = list(Segment.apply_style(segments, post_style=styles.dim))
        if selected:
            segments = list(Segment.apply_style(segments, post_style=styles.cursor))
        strip = Strip(segments, max(used, width))
        return strip.crop(0, width) if used > width else strip


def _render_text(text: Text, width: int, align: str, style: Style, console) -> list[Segment]:
    text = text.copy()
    if "\n" in text.plain:
        text = Text(" ").join(text.split("\n"))
    if text.cell_len > width:
        text.truncate(width, overflow="ellipsis")
    pad = width - text.cell_len
    if pad > 0:
        if align == "right":
            text.pad_left(pad)
        else:
            text.pad_right(pad)
    return [
        Segment(seg.text, style + seg.style if seg.style else style)
        for seg in text.render(console)
        if seg.text
    ]
