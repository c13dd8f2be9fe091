"""The deploy screen: one row per host of a deploy, upgrade or undeploy run, with its
current step (connect, check python, probe, upload, install, config, stop, start, health,
transfer leadership, catch up) or its outcome; a failed host shows its one-line error.

It only reads a ``console.deploy.DeployProgress`` (the model the CLI's progress display
reads too), redrawn when its ``version`` changes. ``run``, if given, is a coroutine
function started in a worker when the screen opens (e.g. ``Deployer.deploy``) that
updates the progress; the screen never touches SSH itself. ``escape`` closes it (the run
goes on in the background and keeps updating the model).
"""

from __future__ import annotations

from typing import Awaitable, Callable

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from console.deploy import DeployProgress, HostRow

__all__ = ["DeployScreen", "render_progress"]

STYLE = {"pending": "dim", "running": "yellow", "ok": "green", "unchanged": "cyan",
         "failed": "bold red"}


def render_progress(p: DeployProgress) -> Table:
    t = Table(expand=True, box=None, pad_edge=False)
    for col, kw in (("HOST", {"no_wrap": True}), ("ADDRESS", {"no_wrap": True}),
                    ("STATE", {"no_wrap": True}), ("TIME", {"justify": "right"}),
                    ("DETAIL", {"ratio": 1})):
        t.add_column(col, **kw)
    for r in p.rows.values():
        t.add_row(r.name, r.address, Text(_state(r), style=STYLE.get(r.state, "")),
                  "" if r.elapsed is None else f"{r.elapsed:.1f}s", r.message)
    return t


def _state(r: HostRow) -> str:
    if r.state == "running":
        return f"{r.step}…"
    return {"pending": "waiting", "ok": "done"}.get(r.state, r.state)


def summary(p: DeployProgress) -> str:
    rows = list(p.rows.values())
    done = sum(r.done for r in rows)
    failed = len(p.failed)
    text = f"{p.action}: {done} of {len(rows)} hosts done"
    if failed:
        text += f", {failed} FAILED"
    if p.error:
        text += f"; stopped: {p.error}"
    return text


class DeployScreen(Screen):
    BINDINGS = [Binding("escape", "close", "Close")]

    def __init__(self, progress: DeployProgress,
                 run: Callable[[], Awaitable[object]] | None = None, *,
                 interval: float = 0.25) -> None:
        super().__init__()
        self.progress = progress
        self.run_fn = run
        self.interval = interval
        self._seen = -1
        self.rendered: Table | None = None  # what is on screen (tests read it)
        self.summary_text = ""

    @classmethod
    def for_inventory(cls, inv, action: str = "deploy", **kw) -> "DeployScreen":
        """A screen that runs ``console.deploy.run(inv, action, ...)`` (``kw``: its
        options: names, ssh, wheel, wheelhouse, parallel, client_ssl...) and follows it."""
        from console.deploy import run

        progress = DeployProgress(action)

        async def go() -> None:
            try:
                await run(inv, action, progress, **kw)
            except Exception as e:  # shown in the summary line, never a crash of the console
                progress.error = " ".join(str(e).split()) or type(e).__name__
            finally:
                progress.ended = True
                progress.version += 1

        return cls(progress, go)

    def compose(self) -> ComposeResult:
        yield Static(id="deploy-summary")
        yield Static(id="deploy-table")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(self.interval, self.refresh_view)
        if self.run_fn is not None:
            # On the app, not this screen: closing the screen must not cancel a deploy
            # half-way (a screen's workers end with it).
            run, self.run_fn = self.run_fn, None
            self.app.run_worker(run(), group="deploy")

    def refresh_view(self) -> None:
        if self.progress.version == self._seen and all(r.done for r in self.progress.rows.values()):
            return
        self._seen = self.progress.version
        self.summary_text = summary(self.progress)
        self.rendered = render_progress(self.progress)
        self.query_one("#deploy-summary", Static).update(self.summary_text)
        self.query_one("#deploy-table", Static).update(self.rendered)

    def action_close(self) -> None:
        self.app.pop_screen()
