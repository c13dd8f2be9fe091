"""A console on made-up but realistic data, with no network and fixed clocks.

Used by the snapshot tests (the screen must be the same on every run) and to make the
README's screenshot:

    python -m console.demo docs/console.svg
"""

from __future__ import annotations

import sys

from console.app import RaftdeckApp
from console.cluster import NodeInfo

T0 = 1000.0  # the demo's monotonic "now"
WALL = 1_795_000_000.0  # and its wall clock


def _status(name: str, *, role: str, term: int, leader: str | None, commit: int, applied: int,
            digest: str, running: int, queued: int, capacity: int, faults=(), progress=None,
            voters=("n1", "n2", "n3", "n4", "n5")) -> dict:
    return {
        "node": name, "role": role, "term": term, "leader": leader, "commit": commit,
        "applied": applied, "last_index": commit, "digest": digest, "keys": applied - 3,
        "voters": list(voters), "learners": [], "progress": progress or {},
        "load": {"running": running, "queued": queued, "capacity": capacity},
        "capacity": capacity, "faults": list(faults),
        "tasks": {"counts": {"running": 5, "succeeded": 120, "failed": 2},
                  "executor": {"running": running, "queued": queued, "failed": 0,
                               "timed_out": 0, "succeeded": 24}},
    }


def demo_app(**kw) -> RaftdeckApp:
    names = ["n1", "n2", "n3", "n4", "n5"]
    nodes = [NodeInfo(n, f"127.0.0.1:{7101 + i}", p, 4, True)
             for i, (n, p) in enumerate(zip(names, [3, 2, 1, 1, 1]))]
    addresses = {n: ("127.0.0.1", 7101 + i) for i, n in enumerate(names)}
    app = RaftdeckApp(nodes, "local", addresses, follow=False, mono=lambda: T0 + 31.0,
                      wall=lambda: WALL, **kw)
    app.client = ReplicaClient(demo_tasks())
    m = app.model
    lat = {"action": "latency", "from": ["n4"], "to": None, "ms": 200}
    progress = {n: {"match": 1480 if n != "n5" else 1204, "next": 1481, "state": "replicate",
                    "active": n != "n5", "learner": False, "inflight": 0} for n in names}
    feeds = [
        ("n1", dict(role="leader", term=4, leader="n1", commit=1480, applied=1480,
                    digest="9f3c2a71e0", running=3, queued=1, capacity=4, progress=progress)),
        ("n2", dict(role="follower", term=4, leader="n1", commit=1480, applied=1480,
                    digest="9f3c2a71e0", running=4, queued=2, capacity=4)),
        ("n3", dict(role="follower", term=4, leader="n1", commit=1479, applied=1479,
                    digest="51be07d2aa", running=2, queued=0, capacity=4)),
        ("n4", dict(role="follower", term=4, leader="n1", commit=1480, applied=1478,
                    digest="0c77e9b314", running=1, queued=0, capacity=4, faults=[lat])),
    ]
    for step in range(30):  # thirty seconds of history for the sparklines
        now = T0 + step
        for name, kw_ in feeds:
            st = dict(kw_)
            st["running"] = max(0, min(4, kw_["running"] + (step + len(name) * 3) % 3 - 1))
            m.update(name, _status(name, **st), now)
        m.update("n5", _status("n5", role="follower", term=3, leader="n1", commit=1204,
                               applied=1204, digest="77aa01c3de", running=0, queued=0,
                               capacity=4), now) if step < 10 else \
            m.unreachable("n5", "connection refused", now)
        m.tick(now)
    m.tick(T0 + 31.0)  # the app's clock: its own ticks then add no sample (deterministic)
    return app


class ReplicaClient:
    """The task-reading part of ``ClusterClient``, answered from a local replica of the
    state machine (a real ``nodeagent.state.StateMachine``): the demo's tasks view reads a
    fixed task table through it, with no network."""

    def __init__(self, state):
        self.state = state

    async def tasks(self, state=None, node=None, limit=100, after=None):
        return self.state.list_tasks(state=state, node=node, limit=limit, after_id=after)

    async def task(self, task_id):
        return self.state.task(task_id)

    async def close(self):
        pass


def demo_tasks():
    """A task table built by applying real commands with fixed timestamps."""
    from nodeagent import state as st

    sm = st.StateMachine()
    index = 0

    def apply(op, **fields):
        nonlocal index
        index += 1
        return sm.apply(index, st.encode_command(op, **fields))

    t0 = 1_795_000_000_000
    specs = [
        {"id": "echo-1", "kind": "echo", "args": {"data": b"hello from n2"}, "timeout_ms": 5000},
        {"id": "sleep-2", "kind": "sleep", "args": {"ms": 1500}, "timeout_ms": 5000},
        {"id": "cpu-3", "kind": "cpu", "args": {"ms": 800}, "timeout_ms": 2000},
        {"id": "sleep-4", "kind": "sleep", "args": {"ms": 60000}, "timeout_ms": 90000},
        {"id": "sleep-5", "kind": "sleep", "args": {"ms": 200}, "timeout_ms": 5000},
    ]
    apply("submit_tasks", tasks=[st.check_task_spec({**t, "max_attempts": 3}) for t in specs], ts=t0)
    for i, (tid, node) in enumerate([("echo-1", "n2"), ("sleep-2", "n3"), ("cpu-3", "n1"),
                                     ("sleep-4", "n4")]):
        apply("assign_task", id=tid, node=node, attempt=1, ts=t0 + 40 + i)
        apply("start_task", id=tid, node=node, attempt=1, ts=t0 + 60 + i)
    apply("complete_task", id="echo-1", node="n2", attempt=1, outcome="succeeded", exit_code=0,
          stdout=b"hello from n2", stderr=b"", ts=t0 + 180)
    apply("expire_task", id="sleep-2", attempt=1, reason="node n3 silent for 5.0s", ts=t0 + 5200)
    apply("assign_task", id="sleep-2", node="n2", attempt=2, ts=t0 + 5300)
    apply("start_task", id="sleep-2", node="n2", attempt=2, ts=t0 + 5320)
    apply("complete_task", id="sleep-2", node="n2", attempt=2, outcome="succeeded", exit_code=0,
          stdout=b"", stderr=b"", ts=t0 + 6850)
    apply("complete_task", id="cpu-3", node="n1", attempt=1, outcome="timed_out", exit_code=-15,
          stdout=b"", stderr=b"", error="timed out after 2000 ms", ts=t0 + 2070)
    return sm


async def save_screenshot(path: str, size=(150, 32)) -> None:
    app = demo_app()
    async with app.run_test(size=size) as pilot:
        await pilot.pause(0.5)
        app.save_screenshot(path)


if __name__ == "__main__":
    import asyncio

    asyncio.run(save_screenshot(sys.argv[1] if len(sys.argv) > 1 else "console.svg"))
