"""The console's deploy screen follows a run's progress model: steps while hosts work,
outcomes when done, a failed host's one-line error, and a summary that counts them."""

from __future__ import annotations

import asyncio

from textual.app import App

from console.deploy import DeployProgress
from console.screens import DeployScreen
from console.testing import until


def table_cells(screen) -> list[list[str]]:
    table = screen.rendered
    if table is None:
        return []
    cols = [[str(c) for c in col._cells] for col in table.columns]
    return [list(r) for r in zip(*cols)]


def test_deploy_screen_shows_steps_outcomes_and_failures():
    p = DeployProgress("deploy")
    p.add("n1", "ops@10.0.0.1:22")
    p.add("n2", "ops@10.0.0.2:22")
    release = asyncio.Event()

    async def run():  # what Deployer.deploy does to the model, paced by the test
        p.update("n1", step="install", state="running")
        p.update("n2", step="connect", state="running")
        await release.wait()
        p.update("n1", state="ok", message="deployed, agent pid 42 answers as leader")
        p.update("n2", state="failed", message="n2 (ops@10.0.0.2:22): cannot connect: connection "
                 "refused; check ssh.port and that sshd runs on the host")

    class Host(App):
        def on_mount(self):
            self.push_screen(DeployScreen(p, run, interval=0.05))

    async def main():
        app = Host()
        async with app.run_test(size=(200, 20)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, DeployScreen), 5, "screen open")
            screen = app.screen
            rows = await until(pilot, lambda: (r := table_cells(screen)) and r[0][2] == "install…"
                               and r, 5, "running steps shown")
            assert rows[1][:3] == ["n2", "ops@10.0.0.2:22", "connect…"]
            release.set()
            rows = await until(pilot, lambda: (r := table_cells(screen)) and r[1][2] == "failed"
                               and r, 5, "outcomes shown")
            assert rows[0][2] == "done" and rows[0][4] == "deployed, agent pid 42 answers as leader"
            assert rows[1][4].startswith("n2 (ops@10.0.0.2:22): cannot connect")
            assert screen.summary_text == "deploy: 2 of 2 hosts done, 1 FAILED"
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, DeployScreen), 5, "closed")

    asyncio.run(main())


def test_deploy_screen_runs_a_real_run(tmp_path):
    """for_inventory starts the run itself: here an undeploy of a node whose sshd port is
    closed (on loopback), which fails in its one line on the screen."""
    from console.local import free_ports
    from nodeagent.config import parse_inventory

    port = free_ports(1)[0]
    text = ("cluster: {name: scr}\nnodes:\n"
            f"  - {{name: r1, host: 10.255.0.9, port: 7100, ssh: {{host: 127.0.0.1, port: {port}, "
            "user: ops}}\n")
    inv = parse_inventory(text, tmp_path / "inventory.yaml")

    class Host(App):
        def on_mount(self):
            self.push_screen(DeployScreen.for_inventory(inv, "undeploy"))

    async def main():
        app = Host()
        async with app.run_test(size=(200, 20)) as pilot:
            screen = await until(pilot, lambda: isinstance(app.screen, DeployScreen) and app.screen,
                                 5, "screen open")
            rows = await until(pilot, lambda: (r := table_cells(screen)) and r[0][2] == "failed"
                               and r, 20, "the host's failure shown")
            assert rows[0][4] == (f"r1 (ops@127.0.0.1:{port}): cannot connect: connection refused; "
                                  "check ssh.port and that sshd runs on the host")
            assert screen.summary_text == "undeploy: 1 of 1 hosts done, 1 FAILED"

    asyncio.run(main())
