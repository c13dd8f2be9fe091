"""The agent's write path for put, delete and cas (nodeagent/server.py ``_write_now``):
answered from the driver's callback, without a task per request. Real agents, raw
connections: every write gets exactly one reply, pipelined writes on one connection are
all answered, a write that cannot commit is answered ``timeout`` after the request
timeout (not left hanging), and a connection that goes away with writes in flight leaves
the agent serving."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest

from console.client import AgentConnection, RequestError
from console.local import LocalCluster
from nodeagent.protocol import NEED_DATA, PROTOCOL_VERSION, FrameDecoder, encode

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 10.0  # nodeagent.server.Server's default request_timeout


@pytest.fixture
def cluster(tmp_path):
    lc = LocalCluster(tmp_path / "c", 3)
    lc.tmp.mkdir(parents=True, exist_ok=True)
    lc.start_all()
    yield lc
    lc.stop_all()


async def _connect(lc: LocalCluster, name: str, client_id: str) -> AgentConnection:
    """A connection of its own (TLS, the admin certificate), outside any ClusterClient."""
    conn = AgentConnection(name, "127.0.0.1", lc.ports[name], lc.cluster, client_id=client_id,
                           ssl=lc.ssl_context("admin"))
    await conn.connect()
    return conn


def test_pipelined_writes_on_one_connection_each_get_one_answer(cluster):
    """200 puts, then 40 cas and 40 deletes, in flight together on one connection (under
    the agent's 256 per connection): each id is answered once, with its own index, and the
    values are what the writes said."""

    async def main():
        async with cluster.client() as c:
            leader = await cluster.wait_leader(c)
            conn = await _connect(cluster, leader, "pipe-1")
            try:
                await conn.request("register", client_id="pipe-1")
                seq = iter(range(2, 10_000))
                puts = [conn.request("put", key=f"p{i}", value=b"v%d" % i, client_id="pipe-1",
                                     seq=next(seq), timeout=30) for i in range(200)]
                got = await asyncio.gather(*puts)
                indexes = [r["index"] for r in got]
                assert len(set(indexes)) == 200
                cas = [conn.request("cas", key=f"p{i}", expected=b"v%d" % i, value=b"w",
                                    client_id="pipe-1", seq=next(seq), timeout=30) for i in range(40)]
                dels = [conn.request("delete", key=f"p{i}", client_id="pipe-1", seq=next(seq),
                                     timeout=30) for i in range(40, 80)]
                got = await asyncio.gather(*cas, *dels)
                assert all(r["swapped"] and r["value"] == b"w" for r in got[:40])
                assert all(isinstance(r["index"], int) for r in got[40:])
                # A cas that does not match says so and shows the value it found.
                r = await conn.request("cas", key="p0", expected=b"nope", value=b"x",
                                       client_id="pipe-1", seq=next(seq))
                assert r == {"swapped": False, "value": b"w", "index": r["index"]}
            finally:
                await conn.close()
            assert await c.get("p0") == b"w"
            assert await c.get("p40") is None
            assert await c.get("p199") == b"v199"
            # Every replica reaches the same state (the followers take most appends in
            # direct rounds: nodeagent/driver.py deliver, tests/integration/test_direct_round.py).
            for _ in range(200):
                st = await c.statuses()
                if len({(s["applied"], s["digest"]) for s in st.values()}) == 1:
                    break
                await asyncio.sleep(0.05)
            assert len({(s["applied"], s["digest"]) for s in st.values()}) == 1, st
            assert all(type(s["direct_rounds"]) is int for s in st.values()), st

    asyncio.run(main())


def test_a_write_that_cannot_commit_is_answered_timeout(cluster):
    """Both followers stopped (SIGSTOP): the leader's put cannot commit. The agent answers
    it ``timeout`` (the outcome is unknown) once its request timeout has passed, instead
    of leaving the client waiting; after the followers resume, the agent serves writes."""

    async def main():
        async with cluster.client() as c:
            leader = await cluster.wait_leader(c)
            followers = [n for n in cluster.names if n != leader]
            conn = await _connect(cluster, leader, "stuck-1")
            try:
                await conn.request("register", client_id="stuck-1")
                for n in followers:
                    cluster.signal(n, signal.SIGSTOP)
                try:
                    t0 = time.monotonic()
                    with pytest.raises(RequestError) as e:
                        await conn.request("put", key="k", value=b"v", client_id="stuck-1",
                                           seq=2, timeout=REQUEST_TIMEOUT_S + 20)
                    waited = time.monotonic() - t0
                    assert e.value.code == "timeout", e.value
                    assert "outcome is unknown" in e.value.message
                    # Not before the request timeout; the watchdog ticks once a second.
                    assert REQUEST_TIMEOUT_S - 0.5 <= waited < REQUEST_TIMEOUT_S + 15, waited
                finally:
                    for n in followers:
                        cluster.signal(n, signal.SIGCONT)
            finally:
                await conn.close()
            await cluster.wait_leader(c)
            await c.put("after", b"1")
            assert await c.get("after") == b"1"

    asyncio.run(main())


def test_a_connection_closed_with_writes_in_flight_leaves_the_agent_serving(cluster):
    """A client sends 200 puts and closes at once. The agent neither crashes nor stops
    serving others; the writes it took apply (every replica ends with the same state)."""

    async def main():
        async with cluster.client() as c:
            leader = await cluster.wait_leader(c)
            for round_ in range(3):
                cid = f"gone-{round_}"
                conn = await _connect(cluster, leader, cid)
                await conn.request("register", client_id=cid)
                for i in range(200):
                    conn._transport.write(_put_frame(i, cid, 2 + i))
                await conn.close()
            await c.put("still", b"here")
            st = await cluster.wait_converged(c)
            assert all(cluster.alive(n) for n in cluster.names)
            assert len({s["digest"] for s in st.values()}) == 1
            assert await c.get("still") == b"here"

    asyncio.run(main())


def _put_frame(i: int, cid: str, seq: int) -> bytes:
    from nodeagent.protocol import encode

    return encode({"type": "put", "id": 10_000 + i, "key": f"g{i}", "value": b"x" * 100,
                   "client_id": cid, "seq": seq})


def test_a_reply_that_does_not_encode_is_answered_internal():
    """Connection.push (replies made in the driver's callbacks): a reply that cannot be
    encoded is logged and replaced by an ``internal`` failure for the same id, so the
    client is not left waiting; the frames already queued go out in one send."""
    import trio
    import trio.testing

    from nodeagent.protocol import FrameDecoder, NEED_DATA
    from nodeagent.server import Connection

    async def main():
        ours, theirs = trio.testing.memory_stream_pair()
        conn = Connection(ours, 1 << 20, "test")
        conn.push({"type": "reply", "id": 1, "ok": True, "result": {"index": 5}})
        conn.push({"type": "reply", "id": 2, "ok": "not a bool"})  # does not validate
        got = []
        dec = FrameDecoder()
        async with trio.open_nursery() as n:
            n.start_soon(conn.flush_loop)
            with trio.fail_after(5):
                while len(got) < 2:
                    dec.receive_data(await theirs.receive_some(65536))
                    while (m := dec.next_message()) is not NEED_DATA:
                        got.append(m)
            n.cancel_scope.cancel()
        assert got[0]["id"] == 1 and got[0]["ok"] is True
        assert got[1]["id"] == 2 and got[1]["ok"] is False
        assert got[1]["error"]["code"] == "internal"

    trio.run(main)


def test_the_driver_fsyncs_in_its_task_while_the_disk_is_fast_and_in_a_thread_while_slow(tmp_path):
    """Driver._sync: a real driver on a real DiskStorage (one voter). Fast syncs run in
    the driver's task; once they take ~20 ms the next ones go to a worker thread, and the
    loop runs other tasks meanwhile; when the disk is fast again, they come back. (The
    storage is opened without fsync and the slowness is a sleep, so how fast this
    machine's disk is today does not decide the test.)"""
    import trio

    from nodeagent.state import encode_command
    from nodeagent.storage import DiskStorage
    from tests.integration.single_voter import single_voter_driver, start_leading

    storage = DiskStorage.open(tmp_path / "n1", fsync=False)
    slow = {"s": 0.0}
    real_sync = storage.sync

    spans: list[tuple[float, float]] = []  # (start, end) of each slow sync

    def sync() -> None:
        if slow["s"]:
            t0 = time.monotonic()
            time.sleep(slow["s"])  # a slow disk (in whichever thread runs the fsync)
            spans.append((t0, time.monotonic()))
        real_sync()

    storage.sync = sync
    try:
        node, driver = single_voter_driver(storage, tick_interval=0.025,
                                           snapshot_interval=100_000, sync_in_thread=True)

        async def writes(n: int, tag: str) -> None:
            for i in range(n):
                p = driver.submit("propose", encode_command("put", key=f"{tag}{i}", value=b"x"))
                await p.wait(30)

        async def main():
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await start_leading(nursery, driver, node, poll=0.025)
                    await writes(20, "fast")
                    # Inline, all but a few: on a starved machine a fast sync that the
                    # scheduler preempted measures slow, and the next one or two go to
                    # the thread until the average decays (seen in a loaded full run).
                    assert driver.syncs_inline >= 15 and driver.syncs_threaded <= 5, (
                        driver.syncs_inline, driver.syncs_threaded)
                    slow["s"] = 0.02
                    await writes(20, "slow")
                    inline_when_slow = driver.syncs_inline
                    assert driver.syncs_threaded >= 15, (driver.syncs_inline, driver.syncs_threaded)
                    # While a threaded fsync runs, the loop runs other tasks: some wake-up
                    # of ours falls inside a slow sync. (A sync in the driver's task
                    # blocks the loop: none could.)
                    beats: list[float] = []

                    async def beat() -> None:
                        while True:
                            await trio.sleep(0.002)
                            beats.append(time.monotonic())

                    nursery.start_soon(beat)
                    spans.clear()
                    await writes(10, "slow2")
                    inside = [b for b in beats if any(a < b < e for a, e in spans)]
                    assert inside, (len(beats), len(spans))
                    slow["s"] = 0.0
                    await writes(40, "again")
                    assert driver.syncs_inline > inline_when_slow + 10
                    assert driver.status()["fsync"]["recent_ms"] < 1.0
                    nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        storage.close()


def test_large_replies_to_a_client_that_reads_slowly_arrive_whole(tmp_path):
    """Plain TCP, where the agent writes a reply from the driver's callback at once when
    nothing else is being sent (server.Connection._write_now) and hands the rest of a
    frame the kernel did not take to flush_loop. 60 pipelined cas that fail, each answered
    with the current 200 KB value, read 4 KB at a time: every reply arrives whole, once,
    in a stream that decodes to the end."""
    lc = LocalCluster(tmp_path / "c", 3, tls=False)
    lc.start_all()
    try:
        big = bytes(range(256)) * 800  # 200 KiB

        async def setup() -> str:
            async with lc.client() as c:
                leader = await lc.wait_leader(c)
                await c.put("big", big)
                return leader

        leader = asyncio.run(setup())
        with socket.create_connection(("127.0.0.1", lc.ports[leader]), timeout=30) as s:
            dec = FrameDecoder(max_frame=1 << 20)

            def read_one() -> dict:
                while (msg := dec.next_message()) is NEED_DATA:
                    data = s.recv(4096)
                    assert data, "the agent closed the connection"
                    dec.receive_data(data)
                return msg

            s.sendall(encode({"type": "hello", "role": "client", "cluster": lc.cluster,
                              "version": PROTOCOL_VERSION, "client_id": "slow-1"}))
            assert read_one()["type"] == "hello_ok"
            s.sendall(encode({"type": "register", "id": 1, "client_id": "slow-1"}))
            assert read_one()["ok"]
            n = 60
            replies = []
            for i in range(n):  # one at a time, between pieces of the replies so far
                s.sendall(encode({"type": "cas", "id": 100 + i, "key": "big", "expected": b"nope",
                                  "value": b"x", "client_id": "slow-1", "seq": 2 + i}))
                if i % 3 == 2:
                    replies.append(read_one())
            replies += [read_one() for _ in range(n - len(replies))]
        assert sorted(r["id"] for r in replies) == [100 + i for i in range(n)]
        for r in replies:
            assert r["ok"] and r["result"]["swapped"] is False and r["result"]["value"] == big, r["id"]
    finally:
        lc.stop_all()


def test_a_read_whose_confirmation_never_comes_is_swept_not_kept(tmp_path):
    """A ReadIndex request or answer lost on the way (a loss fault, a full inbox) is not
    resent by the core, and until a leader change its entry held memory and its client's
    slot for good. The driver fails such reads after READ_LOST_S and counts them; a
    fresh one is kept."""
    from nodeagent.driver import Driver, Pending
    from nodeagent.storage import DiskStorage
    from tests.integration.single_voter import single_voter_driver

    storage = DiskStorage.open(tmp_path / "n1", fsync=False)
    try:
        node, driver = single_voter_driver(storage, tick_interval=0.05, snapshot_interval=100_000)
        now = time.monotonic()
        lost, fresh = Pending(), Pending()
        driver._reads_by_ctx[b"lost"] = ("k", lost, node.term, node.lead, now - Driver.READ_LOST_S - 1)
        driver._reads_by_ctx[b"fresh"] = ("k", fresh, node.term, node.lead, now)
        driver._reads_swept_at = now - 2
        driver._sweep_lost_reads()
        assert lost.done and lost.error.code == "timeout" and not fresh.done
        assert list(driver._reads_by_ctx) == [b"fresh"]
        assert driver.status()["reads_lost"] == 1 and driver.status()["pending_reads"] == 1
    finally:
        storage.close()
