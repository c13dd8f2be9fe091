"""The leader's disk fills up under writes: a real, small filesystem under its data dir.

What an operator must see: the node says its disk is low while there is still time
(status ``disk``) and, leading, hands leadership to another voter before its disk fills
(a planned handover, not a failover); priority does not hand it back while the disk is
low. The node then stops with one line that names the directory and what to do (exit
3, no traceback); the other two go on; once space is freed the node starts again,
catches up, leads again, and no acknowledged write is lost.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from console.client import OutcomeUnknown
from console.local import LocalCluster
from tests.smallfs import fill

pytestmark = pytest.mark.integration


def test_the_leader_runs_out_of_disk_and_the_cluster_goes_on(tmp_path, small_fs):
    lc = LocalCluster(tmp_path / "c", 3, priorities={"n2": 5})
    data = small_fs.mount(lc.tmp / "data" / "n2", 200)
    try:
        lc.start_all()
        asyncio.run(_scenario(lc, data))
    finally:
        lc.stop_all()


async def _scenario(lc: LocalCluster, data) -> None:
    value = b"d" * 100_000
    acked: dict[str, bytes] = {}
    async with lc.client(timeout=3.0, op_timeout=20.0) as c:
        await _led_by(lc, c, "n2")  # the highest priority: it takes over if another won first
        # 20 MiB left: under the 2 x 64 MiB (a WAL segment) the agent wants ahead of it.
        # (tmpfs: the ballast is memory while the test runs.)
        fill(data, 20 << 20)
        st = await _wait_status(lc, c, "n2", lambda s: s["disk"]["free_bytes"] < 21 << 20,
                                "n2 seeing its disk filled")
        assert st["disk"]["low"] is True and st["disk"]["needs_bytes"] >= 64 << 20
        # It hands leadership on while it still runs, and the new leader knows why.
        new = await lc.wait_leader(c, among=["n1", "n3"], timeout=30)
        assert lc.alive("n2")
        await _wait_status(lc, c, new, lambda s: s["unfit"] == ["n2"], "the leader to avoid n2")
        assert (await lc.statuses(c, ["n2"]))["n2"]["unfit"] == ["n2"]
        others = await lc.statuses(c, ["n1", "n3"])
        assert not any(s["disk"]["low"] for s in others.values()), others
        out = subprocess.run([sys.executable, "-m", "console.cli", "--inventory", str(lc.inventory),
                              "status"], capture_output=True, text=True, timeout=60).stdout
        warned = [ln for ln in out.splitlines() if ln.startswith("disk: WARNING:")]
        assert len(warned) == 1 and "n2 has" in warned[0], out

        deadline = time.monotonic() + 120
        i = 0
        while lc.alive("n2"):
            assert time.monotonic() < deadline, "n2 never filled its disk"
            key = f"k{i:05d}"
            i += 1
            try:
                await c.put(key, value)
            except OutcomeUnknown:
                continue  # in flight when n2 stopped: may or may not have committed
            acked[key] = value
        lc.procs["n2"].wait(timeout=30)
        assert lc.procs["n2"].returncode == 3
        err = lc.stderr("n2")
        assert "Traceback" not in err, err
        assert f"the disk is full under {data}" in err and "free space there" in err, err
        assert len(acked) >= 50  # 20 MiB of 100 kB writes, less the log's own records

        # The other two go on (n2 was a follower: it kept up until its disk was full).
        assert await lc.wait_leader(c, among=["n1", "n3"], timeout=60) in ("n1", "n3")
        for k in range(20):
            await c.put(f"after{k}", b"a")
            acked[f"after{k}"] = b"a"

        # The operator frees space and starts it again: it recovers, catches up, and
        # (with the highest priority, fit again) leads again, serving every acknowledged
        # write.
        os.unlink(data / "ballast")
        lc.start("n2")
        await lc.wait_converged(c, timeout=90)
        await _led_by(lc, c, "n2")
        st = (await lc.statuses(c, ["n2"]))["n2"]
        assert st["disk"]["low"] is False and st["unfit"] == [], st["disk"]  # 180 MiB free
        # Under four segments' worth free, its reopened segment's blocks were not reserved
        # up front, and the status says so (OPERATIONS, "Disk full").
        assert st["storage"]["reservations_skipped"] >= 1 and st["storage"]["reserved_segments"] == 0, st["storage"]
        missing = [k for k, v in acked.items() if await c.get(k, node="n2") != v]
        assert not missing, missing[:5]


async def _wait_status(lc: LocalCluster, c, name: str, cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = (await lc.statuses(c, [name])).get(name)
        if isinstance(st, dict) and cond(st):
            return st
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s (status {st})")


async def _led_by(lc: LocalCluster, c, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while await lc.wait_leader(c, timeout=timeout) != name:
        assert time.monotonic() < deadline, f"{name} did not take the leadership"
        await asyncio.sleep(0.2)
