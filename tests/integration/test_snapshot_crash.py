"""kill -9 while a background snapshot is half written: every acknowledged write survives.

The agents run with ``RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY`` (nodeagent/storage.py), which
pauses each background snapshot write half-way, before its fsync and rename. The test
waits until a node's snapshot directory holds such a half-written file, SIGKILLs every
agent at once (so nothing can be recovered from a peer), restarts them and reads back,
linearizably, every write that was acknowledged before the kill.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from console.client import OutcomeUnknown, RequestError
from console.local import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY", "3")
    lc = LocalCluster(tmp_path / "c", 3, election_ms=1000, heartbeat_ms=100, snapshot_interval=300)
    try:
        yield lc
    finally:
        lc.stop_all()


def half_written(lc: LocalCluster) -> list[str]:
    out = []
    for n in lc.names:
        snap_dir = lc.tmp / "data" / n / "snap"
        if snap_dir.is_dir():
            out += [f"{n}/{p.name}" for p in snap_dir.iterdir() if p.name.endswith(".bg.tmp")]
    return out


def test_kill_9_during_a_background_snapshot_loses_no_acknowledged_write(cluster, monkeypatch):
    lc = cluster
    lc.start_all()
    acked: dict[str, bytes] = {}
    seen: list[str] = []

    async def load():
        async with lc.client() as c:
            await lc.wait_leader(c)
            stop = asyncio.Event()

            async def writer(w: int):
                i = 0
                while not stop.is_set():
                    key, value = f"w{w}/{i}", b"v%d" % i
                    try:
                        await c.put(key, value)
                    except (OutcomeUnknown, RequestError, OSError):
                        continue  # not acknowledged: may or may not be there
                    if not stop.is_set():
                        acked[key] = value
                    i += 1

            tasks = [asyncio.create_task(writer(w)) for w in range(8)]
            deadline = time.monotonic() + 60
            while not seen:
                assert time.monotonic() < deadline, "no background snapshot write was seen"
                for t in tasks:
                    if t.done():
                        t.result()  # a writer that died: its exception fails the test
                seen.extend(half_written(lc))
                await asyncio.sleep(0.02)
            # a few more acknowledged writes while the snapshot is stuck half-way
            target = len(acked) + 50
            while len(acked) < target and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            still = half_written(lc)
            stop.set()
            for n in lc.names:  # every agent at once: nothing to recover from a peer
                lc.kill(n)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return still

    still = asyncio.run(load())
    assert still, f"the half-written snapshot {seen} was finished before the kill; the test proves nothing"
    assert len(acked) >= 300

    monkeypatch.delenv("RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY")
    lc.start_all()

    async def check():
        async with lc.client() as c:
            await lc.wait_leader(c, timeout=60)
            missing = {}
            for key, value in acked.items():
                got = await c.get(key)
                if got != value:
                    missing[key] = got
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {list(missing.items())[:5]}"
            await lc.wait_converged(c, timeout=60)

    asyncio.run(check())
    assert not half_written(lc), "recovery leaves no temp file behind"
    for n in lc.names:
        assert lc.alive(n), lc.stderr(n)
