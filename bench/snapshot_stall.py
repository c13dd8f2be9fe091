"""How long a snapshot holds up the agent's event loop, with the state at N keys.

    python -m bench.snapshot_stall [--keys 100000 300000] [--mode both|thread|inline]

A real driver (nodeagent/driver.py) on a real DiskStorage (fsync on) in a temp dir, one
voter, its state machine filled with N keys of 100 bytes. A writer keeps proposing; a
sampler task sleeps 5 ms at a time and records the longest gap between its wake-ups
while the snapshot is taken. ``thread``: the snapshot is serialized and written in a
worker thread (the default); ``inline``: the old way, all of it in the driver task.
Prints one JSON object per (keys, mode).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import trio

from nodeagent.driver import Driver
from nodeagent.raft.core import Config, RaftNode
from nodeagent.raft.messages import ConfState, Role
from nodeagent.state import StateMachine, encode_command
from nodeagent.storage import DiskStorage

TICK = 0.025  # the default heartbeat interval
ELECTION_TICKS = 10  # 250 ms, the default election timeout


def filled_state(keys: int, value_size: int = 100) -> StateMachine:
    """A machine holding ``keys`` keys, built directly (applying 300k log entries through
    Raft would take minutes; the snapshot only sees the state)."""
    sm = StateMachine()
    value = b"v" * value_size
    for i in range(keys):
        sm._kv_set(f"bench/{(i * 7919) % keys:08d}", value)
    return sm


async def measure(keys: int, in_thread: bool, data_dir: Path, *, timeout: float = 120.0) -> dict:
    state = filled_state(keys)
    storage = DiskStorage.open(data_dir, fsync=True)
    try:
        node = RaftNode(Config("n1", election_tick=ELECTION_TICKS, heartbeat_tick=1), storage.recovered(),
                        rng=random.Random(1), bootstrap=ConfState(frozenset({"n1"})))
        # (the keyword only when asked for, so the script also measures older drivers)
        kw = {} if in_thread else {"snapshot_in_thread": False}
        driver = Driver(node, storage, state, lambda m: True, tick_interval=TICK, snapshot_interval=50,
                        sync_in_thread=True, **kw)
        gaps: list[float] = []
        acked_during = 0
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                await nursery.start(driver.run)
                while node.role is not Role.LEADER:
                    await trio.sleep(TICK)

                async def sampler(done: trio.Event) -> None:
                    last = time.perf_counter()
                    while not done.is_set():
                        await trio.sleep(0.005)
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now

                done = trio.Event()
                nursery.start_soon(sampler, done)
                seq = 0
                started = time.perf_counter()
                while driver.last_snapshot_index == 0:
                    seq += 1
                    p = driver.submit("propose", encode_command("put", key=f"w{seq}", value=b"x" * 100))
                    await p.wait(30)
                    if getattr(driver, "_snap_inflight", False):
                        acked_during += 1
                elapsed = time.perf_counter() - started
                await trio.sleep(0.05)  # the sampler wakes up once more: the last gap is counted
                done.set()
                nursery.cancel_scope.cancel()
        return {"keys": keys, "mode": "thread" if in_thread else "inline",
                "max_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
                "samples": len(gaps), "writes_acked_while_snapshotting": acked_during,
                "writes": seq, "seconds": round(elapsed, 3),
                "snapshot_bytes": _newest_snapshot_bytes(data_dir)}
    finally:
        storage.close()


def _newest_snapshot_bytes(data_dir: Path) -> int:
    snaps = sorted((data_dir / "snap").glob("snap-*.snap"))
    return snaps[-1].stat().st_size if snaps else 0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.snapshot_stall", description=__doc__.split("\n\n")[1])
    ap.add_argument("--keys", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--mode", choices=["both", "thread", "inline"], default="both")
    a = ap.parse_args()
    modes = {"both": [False, True], "thread": [True], "inline": [False]}[a.mode]
    for keys in a.keys:
        for in_thread in modes:
            with tempfile.TemporaryDirectory(prefix="snapstall-") as tmp:
                print(json.dumps(trio.run(measure, keys, in_thread, Path(tmp) / "n1")), flush=True)


if __name__ == "__main__":
    main()
