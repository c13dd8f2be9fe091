"""A voter that lost its data directory must not help elect a leader that lacks a
committed entry (nodeagent/peerids.py).

The history, on real agents: n_stale is cut off while a write commits on the other two
(the leader and n_wiped). Both of those are killed; n_wiped's data directory is emptied
and it is started again. It has forgotten the write and its votes, and its log is only
the bootstrap entry, so it would grant n_stale's vote request: n_stale would lead without
the committed write, and lose it. n_stale remembers n_wiped's data id and refuses the new
one, so nobody leads until the old leader is back; then the write is still there. The way
back for n_wiped is the documented one: removed, emptied, added again with ``--join``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


async def _all_links_up(lc, c, timeout: float = 30.0) -> None:
    """Every agent's link to every other is connected: each has seen, and recorded, the
    data id of every peer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = await lc.statuses(c)
        if len(st) == len(lc.names) and all(
                s["transport"]["peers"][p]["connected"]
                for n, s in st.items() for p in lc.names if p != n):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the peer links did not all come up")


async def _eventually(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_a_voter_that_lost_its_data_cannot_elect_a_leader_without_a_committed_write(make_cluster):
    lc = make_cluster(3)

    async def main():
        async with lc.client(timeout=3.0) as c:
            leader = await lc.wait_leader(c)
            stale, wiped = [n for n in lc.names if n != leader]
            await _all_links_up(lc, c)
            ids = {n: s["data_id"] for n, s in (await lc.statuses(c)).items()}

            # stale is cut off both ways; the write commits on leader + wiped.
            for n in lc.names:
                await c.call(n, "fault", action="partition", **{"from": [stale], "to": [leader, wiped]})
                await c.call(n, "fault", action="partition", **{"from": [leader, wiped], "to": [stale]})
            await c.put("committed", b"on two of three")
            lc.kill(leader)
            lc.kill(wiped)
            await c.call(stale, "heal")
            shutil.rmtree(lc.tmp / "data" / wiped)
            lc.start(wiped)

            async def refused():
                st = (await lc.statuses(c, [stale])).get(stale) or {}
                return st.get("refused_peers", {}).get(wiped)

            r = await _eventually(f"{stale} to refuse the emptied {wiped}", refused)
            assert r["known"] == ids[wiped] and r["offered"] != ids[wiped], r
            st = (await lc.statuses(c, [wiped]))[wiped]
            assert st["data_id"] == r["offered"]
            err = st["transport"]["peers"][stale].get("last_error") or ""
            assert "data_dir_changed" in err and "remove-node" in err, err
            said = [json.loads(ln) for ln in lc.log_path(wiped).read_text().splitlines()]
            assert any(r["level"] == "error" and r["msg"].startswith("refused by a peer")
                       and r.get("peer") == stale for r in said), said[-5:]
            said = [json.loads(ln) for ln in lc.log_path(stale).read_text().splitlines()]
            assert [r.get("peer") for r in said if r["msg"].startswith("peer refused")] == [wiped]

            # What the operator reads.
            out = await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "console.cli", "--inventory", str(lc.inventory), "status"],
                capture_output=True, text=True, timeout=60)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("data: ERROR:")), "")
            assert f"{stale} refuses {wiped}" in line and f"remove-node {wiped}" in line, out

            # Without the check, stale wins wiped's vote within a few election timeouts.
            deadline = time.monotonic() + 6.0
            while time.monotonic() < deadline:
                st = await lc.statuses(c, [stale, wiped])
                assert st[stale]["role"] != "leader", f"{stale} leads without the write"
                await asyncio.sleep(0.1)

            lc.start(leader)
            new = await lc.wait_leader(c, among=[leader, stale])
            assert new == leader, new
            assert await c.get("committed") == b"on two of three"
            async def refused_both_ways():  # nothing is sent to it either
                st = (await lc.statuses(c, [leader]))[leader]
                link = st["transport"]["peers"][wiped]
                return wiped in st["refused_peers"] and link["dropped_refused"] > 0

            await _eventually(f"{leader} to refuse {wiped} both ways", refused_both_ways)

            # The way back: remove it, empty its directory, add it as a learner with
            # --join, then make it a voter again.
            lc.kill(wiped)
            await c.call(leader, "remove_node", node=wiped)

            async def nothing_refused():  # not a voter now: nothing to refuse
                st = await lc.statuses(c, [leader, stale])
                return len(st) == 2 and all(not s["refused_peers"] for s in st.values())

            await _eventually("the removed node no longer refused", nothing_refused)
            shutil.rmtree(lc.tmp / "data" / wiped)
            port = lc.ports[wiped]
            await c.call(leader, "add_node", node=wiped, host="127.0.0.1", port=port,
                         priority=1, learner=True)
            lc.start(wiped, join=True)
            await lc.wait_converged(c, timeout=30)

            async def promoted():
                try:
                    await c.call(leader, "add_node", node=wiped, host="127.0.0.1", port=port,
                                 priority=1, learner=False)
                    return True
                except Exception:
                    return False  # refused while it lags: ask again

            await _eventually(f"{wiped} made a voter again", promoted)
            st = await lc.wait_converged(c, timeout=30)
            assert all(not s["refused_peers"] for s in st.values()), \
                {n: s["refused_peers"] for n, s in st.items()}
            assert sorted(st[leader]["voters"]) == sorted(lc.names)
            got = await c.get("committed", node=wiped, consistency="stale")
            assert got == b"on two of three", got

    asyncio.run(main())
