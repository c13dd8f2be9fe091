"""A follower that fell behind the leader's compacted log catches up from the leader's
snapshot, which the leader reads back from its snapshot file (it keeps no second copy of
its state in memory). Real processes, real files."""

from __future__ import annotations

import asyncio
import json

import pytest

from console.local import LocalCluster

pytestmark = pytest.mark.integration


def test_a_follower_behind_the_compacted_log_installs_the_leaders_snapshot(make_cluster):
    asyncio.run(_main(make_cluster(3, snapshot_interval=100)))


async def _main(lc: LocalCluster) -> None:
    async with lc.client(timeout=3.0) as c:
        leader = await lc.wait_leader(c)
        behind = next(n for n in lc.names if n != leader)
        lc.kill(behind)
        # Past the leader's snapshot and the 1,000 entries it keeps behind one: the
        # killed node's next entry is gone from every log.
        sem = asyncio.Semaphore(16)

        async def put(i: int) -> None:
            async with sem:
                await c.put(f"k{i:05d}", b"v%d" % i)

        n = 1500
        await asyncio.gather(*(put(i) for i in range(n)))
        st = await lc.statuses(c, [leader])
        assert st[leader]["first_index"] > 200, st[leader]
        sent_before = st[leader]["snapshots"]["sent"]
        assert st[leader]["snapshots"]["taken"] >= 1
        # The appends the leader sent towards the dead node still wait in its link's
        # outbox (up to 64 in flight); delivered on reconnect they would carry it past
        # the compacted part whenever the writes came in big enough batches. A partition
        # drops what a link has queued; healed, only new messages go out.
        await c.fault(leader, action="partition", **{"from": [leader], "to": [behind]})
        await c.heal(leader)

        lc.start(behind)
        st = await lc.wait_converged(c, timeout=60)
        assert st[behind]["snapshots"]["installed"] >= 1, st[behind]["snapshots"]
        # The statuses are read one node after the other, the leader's first: once the
        # writes are over, its reading may predate the snapshot it then sent, yet show
        # the same applied index as the follower read after the install. Read it again:
        # the send came before the install, which came before the follower's reading.
        st.update(await lc.statuses(c, [leader]))
        assert st[leader]["snapshots"]["sent"] > sent_before
        # and both say so in their logs: what the leader sent is what the follower installed
        def events(name: str, msg: str) -> list[dict]:
            lines = lc.log_path(name).read_text().splitlines()
            return [ev for ev in map(json.loads, lines) if ev.get("msg") == msg]

        sent = {(ev["to"], ev["index"], ev["bytes"]) for ev in events(leader, "snapshot sent")}
        installed = events(behind, "snapshot installed")
        assert installed and all((behind, ev["index"], ev["bytes"]) in sent for ev in installed), \
            (sent, installed)
        # Neither keeps a second copy of its state in memory: the installed snapshot, too,
        # is held as its file.
        assert st[behind]["snapshots"]["held"] == "file", st[behind]["snapshots"]
        assert st[leader]["snapshots"]["held"] == "file", st[leader]["snapshots"]
        assert st[behind]["keys"] == n
        for i in (0, n // 2, n - 1):
            assert await c.get(f"k{i:05d}", consistency="stale", node=behind) == b"v%d" % i


def test_a_snapshot_that_does_not_load_is_refused_and_the_follower_stays_up(make_cluster):
    """A leader's snapshot whose data is damaged (here: sent by hand on the leader's peer
    link) is refused before it is stored: the follower logs it, counts it, keeps its state
    and keeps following; it does not crash on it."""
    asyncio.run(_corrupt(make_cluster(3, tls=False)))


async def _corrupt(lc: LocalCluster) -> None:
    from nodeagent.protocol import PROTOCOL_VERSION, encode
    from nodeagent.raft.messages import InstallSnapshot, Snapshot, SnapshotMeta

    async with lc.client(timeout=3.0) as c:
        leader = await lc.wait_leader(c)
        for i in range(20):
            await c.put(f"k{i}", b"v")
        st = await lc.wait_converged(c)
        victim = next(n for n in lc.names if n != leader)
        term, before = st[leader]["term"], st[victim]
        meta = SnapshotMeta(st[leader]["commit"] + 100, term,
                            _conf_of(st[leader]["voters"]))
        bad = InstallSnapshot(leader, victim, term, Snapshot(meta, b"\x81\xa6format\xc4\x03bad"))
        reader, writer = await asyncio.open_connection("127.0.0.1", lc.ports[victim])
        writer.write(encode({"type": "hello", "role": "peer", "cluster": lc.cluster,
                             "version": PROTOCOL_VERSION, "node": leader}))
        writer.write(encode({"type": "raft", "msg": bad}))
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            s = await c.call(victim, "status")
            if s["snapshots"]["refused"] >= 1:
                break
            assert asyncio.get_running_loop().time() < deadline, s["snapshots"]
            await asyncio.sleep(0.1)
        writer.close()
        assert lc.alive(victim)
        assert s["applied"] >= before["applied"] and s["snapshot_index"] < meta.index
        assert "snapshot from the leader refused" in lc.log_path(victim).read_text()
        await c.put("after", b"x")
        st = await lc.wait_converged(c)
        assert st[victim]["keys"] == 21


def _conf_of(voters):
    from nodeagent.raft.messages import ConfState

    return ConfState.of(list(voters))
