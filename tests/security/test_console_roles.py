"""The console with a viewer's certificate: it follows the cluster (status streams over
TLS), and the kill and latency keys are refused with a notification naming the role;
nothing is killed and no fault is injected. No traceback, the app keeps running."""

from __future__ import annotations

import asyncio
import time

import pytest

from console.app import app_for_local_cluster
from console.testing import until
from console.widgets.node_table import NodeTable

pytestmark = pytest.mark.integration


def test_a_viewer_console_is_refused_kill_and_faults_with_a_notification(make_cluster):
    lc = make_cluster(3)

    async def main():
        app = app_for_local_cluster(lc, ssl=lc.ssl_context("viewer"), role="viewer")
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: [r for r in app.model.rows() if r.role == "leader"
                                        and r.reachable], 30, "a leader on screen")
            leader = next(r.name for r in app.model.rows() if r.role == "leader")
            app.query_one(NodeTable).select(leader)
            await pilot.press("k")
            await until(pilot, lambda: any("admin role" in str(n.message)
                                           for n in app._notifications), 10, "kill refused")
            await pilot.pause(0.5)
            assert lc.alive(leader)
            await pilot.press("l")  # latency on the selected node: a fault request
            await until(pilot, lambda: any(n.title == "forbidden" for n in app._notifications),
                        20, "fault refused")
            assert not app.model.health(time.monotonic()).faults
            async with lc.client() as c:
                assert not (await c.status(leader))["faults"]
            await pilot.press("q")

    asyncio.run(main())
