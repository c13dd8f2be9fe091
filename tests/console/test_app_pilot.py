"""The console against a real local cluster, driven by Textual's Pilot: what an operator
sees after pressing the fault keys."""

from __future__ import annotations

import asyncio
import time

import pytest

from console.app import app_for_local_cluster
from console.local import LocalCluster
from console.widgets.node_table import NodeTable

pytestmark = pytest.mark.integration


async def until(pilot, cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def leader_rows(app):
    return [r.name for r in app.model.rows() if r.role == "leader" and r.reachable]


def test_kill_restart_isolate_heal_from_the_keyboard(tmp_path):
    lc = LocalCluster(tmp_path, 3)
    lc.start_all()

    async def main():
        app = app_for_local_cluster(lc)
        async with app.run_test(size=(160, 40)) as pilot:
            # The table shows exactly one leader.
            old = await until(pilot, lambda: len(leader_rows(app)) == 1 and leader_rows(app)[0],
                              30, "one leader on screen")
            table = app.query_one(NodeTable)
            table.select(old)
            # Kill it from the keyboard, confirming: a new leader within 3 s (generous
            # here: the machine is shared), the old one shown as down.
            await pilot.press("k")
            await pilot.pause(0.2)
            await pilot.press("y")
            t0 = time.monotonic()
            new = await until(pilot, lambda: [n for n in leader_rows(app) if n != old],
                              20, "a new leader")
            elapsed = time.monotonic() - t0
            await until(pilot, lambda: app.model.row(old).reachable is False, 20, "old shown down")
            assert elapsed < 15, elapsed
            assert app.model.health(time.monotonic()).leader == new[0]
            # Restart brings it back with zero lag.
            table.select(old)
            await pilot.press("x")
            await until(pilot, lambda: app.model.row(old).reachable and app.model.row(old).lag == 0,
                        30, "restarted node caught up")
            # Isolate a follower: it has no leader; the majority keeps one.
            follower = next(n for n in lc.names if n != new[0] and n != old) \
                if old != new[0] else old
            table.select(follower)
            await pilot.press("i")
            await pilot.pause(0.2)
            await pilot.press("y")
            await until(pilot, lambda: app.model.row(follower).leader in (None, follower)
                        and app.model.row(follower).role != "leader", 20, "isolated node leaderless")
            assert app.model.health(time.monotonic()).faults, "active faults are listed"
            # Heal restores: everyone follows one leader again, no faults listed.
            await pilot.press("h")
            await until(pilot, lambda: not app.model.health(time.monotonic()).faults
                        and len({r.leader for r in app.model.rows()}) == 1
                        and all(r.reachable for r in app.model.rows()), 30, "healed")
            await pilot.press("q")

    try:
        asyncio.run(main())
    finally:
        lc.stop_all()
