"""The console's deploy and upgrade keys (D, U): they run the same deploy as `raftdeck
deploy` and show it on the deploy screen, one row per host; they ask for the cluster's
name first, need the admin role and an inventory with ssh: nodes. Real connections: the
hosts here are SSH ports on 127.0.0.1 with nothing listening, so every host fails (after
the wheels are built), each with its own one-line error (tests/ssh covers the successful runs against real sshd)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from console.app import RaftdeckApp
from console.cluster import node_infos
from console.screens import DeployScreen
from console.testing import until, until_asked
from nodeagent.config import parse_inventory

pytestmark = pytest.mark.integration


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inventory(tmp_path, ssh: bool = True):
    lines = ["cluster:", "  name: dk", "  tls: off", "nodes:"]
    for i in (1, 2, 3):
        lines.append(f"  - name: n{i}")
        lines.append("    host: 127.0.0.1")
        lines.append(f"    port: {closed_port()}")
        if ssh:
            lines += ["    ssh:", f"      port: {closed_port()}", "      user: nobody"]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return parse_inventory(text, path)


def app_for(inv, **kw) -> RaftdeckApp:
    return RaftdeckApp(node_infos(inv), inv.cluster.name,
                       {n.name: (n.host, n.port) for n in inv.nodes}, inventory=inv, **kw)


def test_deploy_key_asks_for_the_cluster_name_then_shows_every_host(tmp_path):
    inv = inventory(tmp_path)

    async def main():
        app = app_for(inv, role="admin")
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.press("D")
            await until_asked(pilot)
            await pilot.press(*"dk", "enter")
            first = await until(pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen,
                                10, "the deploy screen")
            # Closing the screen does not stop the run; D shows the running one again
            # (no second run, no question).
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DeployScreen), 10, "closed")
            assert not first.progress.ended, "the wheels take seconds to build"
            await pilot.press("D")
            screen = await until(pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen,
                                 10, "the deploy screen again")
            assert screen.progress is first.progress
            rows = screen.progress.rows
            await until(pilot, lambda: len(rows) == 3 and all(r.done for r in rows.values()),
                        120, lambda: f"every host done: {rows}")
            for name, r in rows.items():
                assert r.state == "failed", r
                assert "\n" not in r.message and r.message.startswith(f"{name} (nobody@127.0.0.1:")
                assert "connection refused; check ssh.port and that sshd runs on the host" in r.message
            await until(pilot, lambda: "3 FAILED" in screen.summary_text, 10,
                        lambda: f"the summary says so: {screen.summary_text!r}")
            await until(pilot, lambda: screen.progress.ended, 10, "the run ended")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DeployScreen), 10, "closed")

    asyncio.run(main())


def test_deploy_key_refused_without_admin_without_ssh_nodes_and_when_cancelled(tmp_path):
    async def main():
        app = app_for(inventory(tmp_path), role="operator")
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.press("D")
            await pilot.pause(0.5)
            assert not isinstance(app.screen, DeployScreen)
            assert any("needs the admin role" in str(n.message) for n in app._notifications)

        app = app_for(inventory(tmp_path, ssh=False), role="admin")
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.press("U")
            await pilot.pause(0.5)
            assert not isinstance(app.screen, DeployScreen)
            log = "\n".join(str(line) for line in app.query_one("#events").lines)
            assert "nothing to upgrade: no node of this inventory has ssh: settings" in log

        app = app_for(inventory(tmp_path), role="admin")
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.press("D")
            await until_asked(pilot)
            await pilot.press("escape")
            await pilot.pause(0.5)
            assert not isinstance(app.screen, DeployScreen)

    asyncio.run(main())
