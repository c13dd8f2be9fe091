"""Snapshot tests of the console's screens on deterministic data (console/demo.py: no
network, fixed clocks). Regenerate after an intended change with
`pytest tests/console/test_snapshots.py --snapshot-update` and review the SVG diff."""

from __future__ import annotations

from console.demo import demo_app

SIZE = (150, 32)


def test_main_screen(snap_compare):
    assert snap_compare(demo_app(), terminal_size=SIZE)


def test_help_screen(snap_compare):
    assert snap_compare(demo_app(), press=["question_mark"], terminal_size=SIZE)


def test_worst_first_and_marks(snap_compare):
    assert snap_compare(demo_app(), press=["w", "down", "space", "down", "space"],
                        terminal_size=SIZE)


def test_divergence_screen(snap_compare):
    assert snap_compare(demo_app(), press=["d"], terminal_size=SIZE)


def test_tasks_screen(snap_compare):
    """The task table of console/demo.py (built by applying real commands to a real state
    machine): a success, a retried task, a timeout, a running and a waiting task."""
    assert snap_compare(demo_app(), press=["T", "down"], terminal_size=SIZE)
