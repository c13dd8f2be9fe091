"""Old snapshot files leave the disk: an agent keeps its two newest snapshots.

The driver adopts a background snapshot and leaves the unlinking of what it replaced
(a snapshot file of up to 100 MB, WAL segments, and their directories' fsyncs) to a
worker thread (``DiskStorage.delete_purged``). Ten snapshots later each agent's snap
directory must hold two files, not ten.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from console.local import LocalCluster

pytestmark = pytest.mark.integration


def snap_files(lc: LocalCluster, name: str) -> list[str]:
    d = lc.tmp / "data" / name / "snap"
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".snap")) if d.is_dir() else []


def test_each_agent_keeps_its_two_newest_snapshot_files(make_cluster):
    lc = make_cluster(3, snapshot_interval=40)

    async def main():
        async with lc.client(timeout=3.0) as c:
            await lc.wait_leader(c)
            sem = asyncio.Semaphore(8)

            async def put(i: int) -> None:
                async with sem:
                    await c.put(f"k{i:04d}", b"v%d" % i)

            await asyncio.gather(*(put(i) for i in range(600)))
            deadline = time.monotonic() + 60
            while True:
                st = await lc.statuses(c)
                taken = {n: s["snapshots"]["taken"] for n, s in st.items()}
                files = {n: snap_files(lc, n) for n in lc.names}
                if all(t >= 5 for t in taken.values()) and all(len(f) == 2 for f in files.values()):
                    break
                assert time.monotonic() < deadline, (taken, files)
                await asyncio.sleep(0.1)
            # The two kept are the newest: the storage's own snapshot is the later one.
            for n, s in st.items():
                newest = int(files[n][-1].split("-")[1])
                assert newest == s["storage"]["snapshot_index"], (n, files[n], s["storage"])

    asyncio.run(main())
