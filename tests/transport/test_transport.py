"""Tests of nodeagent.transport: FaultRules (pure) and real peer links on 127.0.0.1.

Each socket test is a sync function that calls ``trio.run``; everything it starts lives in
one nursery that the test cancels at the end, under a generous ``fail_after``. Waits are on
conditions (``wait_for`` polls a predicate), never fixed sleeps.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import random
import socket
import ssl

import pytest
import trio

from nodeagent.protocol import CLOSED, NEED_DATA, PROTOCOL_VERSION, FrameDecoder, ProtocolError, encode
from nodeagent.raft.messages import AppendEntries, Entry, Heartbeat
from nodeagent.transport import FaultRule, FaultRules, Transport, backoff_delay

CLUSTER = "test"
ME = "me"
DEADLINE = 10.0  # per test: generous, the suite normally takes a few seconds in total
FAST = {"backoff": (0.01, 0.05), "connect_timeout": 2.0}


def hb(to: str, seq: int, frm: str = ME) -> Heartbeat:
    """A heartbeat whose ``commit`` numbers it, so order can be checked."""
    return Heartbeat(frm=frm, to=to, term=1, commit=seq)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail after ``timeout`` seconds."""
    try:
        with trio.fail_after(timeout):
            while not pred():
                await trio.sleep(0.005)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def run(fn) -> None:
    async def main():
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                await fn(nursery)
                nursery.cancel_scope.cancel()

    trio.run(main)


class PeerServer:
    """A stand-in for a peer's listener: checks the hello, answers hello_ok (or an error),
    and records every raft message with the trio time it arrived."""

    def __init__(self, name: str, *, hello_error: tuple[str, str] | None = None, silent: bool = False,
                 reply_node: str | None = None, error_after: int | None = None,
                 ssl_context: ssl.SSLContext | None = None, hold: trio.Event | None = None,
                 before_data_id: bool = False) -> None:
        self.name = name
        self.before_data_id = before_data_id  # refuses hello.data_id as agents built before it did
        self.hold = hold  # if given: after hello_ok, read nothing until it is set
        self.hello_error = hello_error
        self.silent = silent
        self.reply_node = reply_node or name
        self.error_after = error_after
        self.ssl_context = ssl_context
        self.received: list[tuple[float, object]] = []
        self.hellos: list[dict] = []
        self.errors: list[Exception] = []
        self.accepted = 0
        self.active = 0
        self.port: int | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def msgs(self) -> list:
        return [m for _, m in self.received]

    @property
    def seqs(self) -> list[int]:
        return [m.commit for m in self.msgs]

    def addr(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)

    async def start(self, nursery: trio.Nursery, port: int = 0) -> None:
        self.port = await nursery.start(self._serve, port)

    async def stop(self) -> None:
        """Close the listener and every connection it accepted."""
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def _serve(self, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    if self.ssl_context is None:
                        listeners = await nursery.start(functools.partial(
                            trio.serve_tcp, self._handle, port, host="127.0.0.1"))
                        sock = listeners[0].socket
                    else:
                        listeners = await nursery.start(functools.partial(
                            trio.serve_ssl_over_tcp, self._handle, port, self.ssl_context, host="127.0.0.1"))
                        sock = listeners[0].transport_listener.socket
                    task_status.started(sock.getsockname()[1])
        finally:
            self._stopped.set()

    async def _recv(self, stream, dec: FrameDecoder):
        while True:
            msg = dec.next_message()
            if msg is NEED_DATA:
                # held servers read in small pieces: many moments with a little room
                dec.receive_data(await stream.receive_some(65536 if self.hold is None else 4096))
            elif msg is CLOSED:
                return None
            else:
                return msg

    async def _handle(self, stream) -> None:
        self.accepted += 1
        self.active += 1
        try:
            dec = FrameDecoder()
            hello = await self._recv(stream, dec)
            if hello is None:
                return
            self.hellos.append(hello)
            if self.before_data_id and "data_id" in hello:  # the error such an agent sent
                await stream.send_all(encode({"type": "error", "code": "bad_field", "message": (
                    "hello: unknown field str 'data_id' (the protocol is strict; known fields: "
                    "role, cluster, version, node, client_id)")}))
                return
            if self.silent:
                await trio.sleep_forever()
            if self.hello_error is not None:
                code, text = self.hello_error
                await stream.send_all(encode({"type": "error", "code": code, "message": text}))
                return
            await stream.send_all(encode({"type": "hello_ok", "node": self.reply_node,
                                          "version": PROTOCOL_VERSION, "leader": None}))
            if self.hold is not None:
                await self.hold.wait()
            count = 0
            while True:
                msg = await self._recv(stream, dec)
                if msg is None:
                    return
                assert msg["type"] == "raft" and msg["group"] == 0, msg
                self.received.append((trio.current_time(), msg["msg"]))
                count += 1
                if self.error_after is not None and count == self.error_after:
                    await stream.send_all(encode({"type": "error", "code": "bad_field",
                                                  "message": "test server says no"}))
                    return
        except (trio.BrokenResourceError, ProtocolError) as e:
            self.errors.append(e)  # like a real listener: drop the connection, keep serving
        finally:
            self.active -= 1


def peer_stats(t: Transport, peer: str) -> dict:
    return t.stats()["peers"][peer]


# -- FaultRules: pure ------------------------------------------------------------------------


def test_fault_rule_matching_and_one_way():
    r = FaultRule("partition", frm={"a"}, to={"b"})
    assert r.matches("a", "b") and not r.matches("b", "a") and not r.matches("a", "c")
    anyone = FaultRule("partition", frm=None, to=["b"])
    assert anyone.matches("x", "b") and not anyone.matches("b", "x")
    rules = FaultRules((r,))
    assert rules.partitioned("a", "b") and not rules.partitioned("b", "a")
    assert rules.drops("a", "b", random.Random(0)) and not rules.drops("b", "a", random.Random(0))
    assert FaultRules().heal() == FaultRules() and not FaultRules((r,)).heal()
    with pytest.raises(ValueError):
        FaultRule("explode")
    with pytest.raises(ValueError):
        FaultRule("loss", rate=1.5)
    with pytest.raises(ValueError):
        FaultRule("partition", frm="a")  # a string is not a set of names


def test_fault_rules_wire_roundtrip_and_requests():
    now = 100.0
    req = {"type": "fault", "id": 7, "action": "latency", "from": ["a"], "to": None, "ms": 250,
           "rate": 0.0, "duration_ms": 1500}
    rules = FaultRules().with_request(req, now=now)
    rules = rules.with_request({"action": "loss", "from": None, "to": ["b", "c"], "rate": 0.25}, now=now)
    rules = rules.with_request({"action": "partition", "from": ["c"], "to": ["a"]}, now=now)
    assert len(rules) == 3
    (lat,) = [r for r in rules if r.action == "latency"]
    assert lat.expires_at == pytest.approx(101.5) and lat.ms == 250
    wire = rules.to_wire(now=now + 0.5)
    assert wire[0] == {"action": "latency", "from": ["a"], "to": None, "ms": 250, "duration_ms": 1000}
    assert wire[1] == {"action": "loss", "from": None, "to": ["b", "c"], "rate": 0.25}
    assert wire[2] == {"action": "partition", "from": ["c"], "to": ["a"]}
    # every map is a valid `fault` request body, and reading it back gives the same rules
    for i, w in enumerate(wire):
        encode({"type": "fault", "id": i, **w})
    again = FaultRules.from_wire(wire, now=now + 0.5)
    assert [(r.key, r.ms, r.rate, r.expires_at) for r in again] == [
        (r.key, r.ms, r.rate, r.expires_at) for r in rules]
    # without a clock reading, the requested duration is reported
    assert rules.to_wire_list()[0]["duration_ms"] == 1500
    # re-injecting the same fault replaces it (idempotent); heal removes by exact from/to
    rules2 = rules.with_request({"action": "loss", "from": None, "to": ["c", "b"], "rate": 0.5}, now=now)
    assert len(rules2) == 3 and rules2.loss_rate("x", "b") == 0.5
    healed = rules2.with_request({"action": "heal", "from": ["c"], "to": ["a"]}, now=now)
    assert len(healed) == 2 and not healed.partitioned("c", "a")
    with pytest.raises(ValueError):
        FaultRule.from_wire({"action": "latency", "ms": 5, "duration_ms": 10})  # needs now


def test_fault_rules_strongest_wins_and_expiry():
    rules = FaultRules((
        FaultRule("latency", frm={"a"}, to=None, ms=100),
        FaultRule("latency", frm=None, to={"b"}, ms=300, expires_at=10.0),
        FaultRule("loss", frm={"a"}, rate=0.2),
        FaultRule("loss", to={"b"}, rate=0.6, expires_at=10.0),
        FaultRule("partition", frm={"z"}, expires_at=5.0),
    ))
    assert rules.delay("a", "b", now=1.0) == pytest.approx(0.3)
    assert rules.delay("a", "b", now=10.0) == pytest.approx(0.1)  # the 300 ms rule expired
    assert rules.delay("c", "d", now=1.0) == 0.0
    assert rules.loss_rate("a", "b", now=1.0) == 0.6 and rules.loss_rate("a", "b", now=11.0) == 0.2
    assert rules.partitioned("z", "q", now=4.9) and not rules.partitioned("z", "q", now=5.0)
    assert rules.next_expiry(now=1.0) == 5.0 and rules.next_expiry(now=6.0) == 10.0
    assert len(rules.active(7.0)) == 4 and len(rules.active(10.0)) == 2
    assert rules.to_wire(now=12.0) == [r.to_wire() for r in rules.active(12.0)]


def test_loss_rate_is_statistically_right_and_seeded():
    rules = FaultRules((FaultRule("loss", frm={"a"}, to={"b"}, rate=0.3),))
    rng = random.Random(42)
    n = 20000
    dropped = sum(rules.drops("a", "b", rng) for _ in range(n))
    assert 0.28 < dropped / n < 0.32
    again = random.Random(42)
    assert sum(rules.drops("a", "b", again) for _ in range(n)) == dropped  # reproducible
    # no draw when no loss rule matches: the rng sequence is not consumed
    r1, r2 = random.Random(1), random.Random(1)
    rules.drops("b", "a", r1)
    assert r1.random() == r2.random()


def test_backoff_delay_bounds_and_growth():
    rng = random.Random(3)
    assert backoff_delay(1, 0.05, 1.0, rng) == 0.05
    for attempt in range(1, 40):
        d = backoff_delay(attempt, 0.05, 1.0, rng)
        assert 0.05 <= d <= min(1.0, 0.05 * 2 ** (attempt - 1))
    late = [backoff_delay(20, 0.05, 1.0, rng) for _ in range(200)]
    assert max(late) > 0.8 and len(set(late)) > 100  # jittered over the whole range


# -- links over real sockets -----------------------------------------------------------------


def test_delivery_and_order_to_several_peers():
    async def body(nursery):
        servers = {name: PeerServer(name) for name in ("p1", "p2", "p3")}
        for s in servers.values():
            await s.start(nursery)
        t = Transport(ME, CLUSTER, {n: s.addr() for n, s in servers.items()} | {ME: ("127.0.0.1", 1)},
                      rng=random.Random(0), **FAST)
        await nursery.start(t.run)
        for i in range(300):
            for name in servers:
                assert t.send(hb(name, i))
        await wait_for(lambda: all(len(s.received) == 300 for s in servers.values()), what="delivery")
        # A writer counts a batch when it resumes from send_all, which can be after the
        # server read it (trio runs ready tasks in random order).
        await wait_for(lambda: all(peer_stats(t, n)["sent"] == 300 for n in servers), what="counted")
        for name, s in servers.items():
            assert s.seqs == list(range(300))
            assert all(m.to == name and m.frm == ME for m in s.msgs)
            assert s.hellos == [{"type": "hello", "role": "peer", "cluster": CLUSTER,
                                 "version": PROTOCOL_VERSION, "node": ME}]
            st = peer_stats(t, name)
            assert st["connected"] and st["connects"] == 1 and st["sent"] == 300 and st["queued"] == 0
            assert st["bytes_sent"] > 0 and st["last_sent_at"] is not None and st["peer_version"] == 1
        tot = t.stats()["totals"]
        assert tot["peers"] == 3 and tot["connected"] == 3 and tot["sent"] == 900
        assert ME not in t.stats()["peers"]  # our own entry in peers is ignored

    run(body)


def test_batching_coalesces_queued_messages():
    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, **FAST)
        await nursery.start(t.run)
        await wait_for(lambda: peer_stats(t, "p1")["connected"], what="connected")
        n = 1000
        for i in range(n):  # no checkpoint in between: all queued before the link runs
            assert t.send(hb("p1", i))
        await wait_for(lambda: len(s.received) == n, what="delivery")
        assert s.seqs == list(range(n))
        await wait_for(lambda: peer_stats(t, "p1")["sent"] == n, what="counted")  # see above
        st = peer_stats(t, "p1")
        assert st["sent"] == n and st["batches"] <= 5, st

    run(body)


def big_append(to: str, seq: int, size: int) -> AppendEntries:
    """An append whose ``commit`` numbers it, carrying ``size`` bytes."""
    return AppendEntries(frm=ME, to=to, term=1, prev_log_index=seq, prev_log_term=1,
                         entries=(Entry(1, seq + 1, bytes([seq % 251]) * size),), commit=seq)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_send_batch_writes_at_once_and_a_full_socket_keeps_every_frame_whole(tmp_path, tls):
    """send_batch writes from the caller's task (sent before any checkpoint let the
    writer run), over plain TCP and over TLS; when the peer stops reading and the kernel
    takes only part of a frame (over TLS: of its ciphertext), the rest goes out first once
    the peer reads again: every frame arrives whole and in order."""
    server_ctx, client_ctx = _make_tls(tmp_path) if tls else (None, None)

    async def body(nursery):
        hold = trio.Event()
        s = PeerServer("p1", hold=hold, ssl_context=server_ctx)
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, outbox_size=10_000, outbox_bytes=1 << 30,
                      ssl_context=client_ctx, **FAST)
        await nursery.start(t.run)
        await wait_for(lambda: peer_stats(t, "p1")["connected"], what="connected")
        t.send_batch([hb("p1", 0), hb("p1", 1)])
        st = peer_stats(t, "p1")
        assert st["sent"] == 2 and st["batches"] == 1 and st["queued"] == 0, st  # no checkpoint yet
        n = 2
        while peer_stats(t, "p1")["queued"] == 0:  # until the socket is full and frames wait
            t.send_batch([big_append("p1", n, 64 * 1024)])
            n += 1
            assert n < 10_000, "the socket never filled"
        for _ in range(5):  # more while it is full: they queue behind the partial frame
            t.send_batch([big_append("p1", n, 64 * 1024)])
            n += 1
        await wait_for(lambda: t._links["p1"].busy, what="the writer blocked in send_all")
        for _ in range(5):  # and while the writer is inside send_all: queued, not written
            t.send_batch([big_append("p1", n, 64 * 1024)])
            n += 1
        assert peer_stats(t, "p1")["sent"] < n
        hold.set()
        for _ in range(100):  # and while the backlog drains
            t.send_batch([big_append("p1", n, 64 * 1024)])
            n += 1
            await trio.sleep(0)
        await wait_for(lambda: len(s.received) == n, what="delivery")
        assert s.seqs == list(range(n)) and not s.errors
        assert [len(m.entries[0].data) for m in s.msgs[2:]] == [64 * 1024] * (n - 2)
        assert all(m.entries[0].data == bytes([m.commit % 251]) * 64 * 1024 for m in s.msgs[2:])
        await wait_for(lambda: peer_stats(t, "p1")["sent"] == n, what="counted")  # see above
        st = peer_stats(t, "p1")
        assert st["sent"] == n and st["queued"] == 0 and st["dropped_error"] == 0, st

    run(body)


def test_reconnect_after_server_restart_on_same_port():
    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, **FAST)
        await nursery.start(t.run)
        for i in range(10):
            t.send(hb("p1", i))
        await wait_for(lambda: len(s.received) == 10, what="first delivery")
        await s.stop()
        await wait_for(lambda: not peer_stats(t, "p1")["connected"], what="disconnect noticed")
        for i in range(10, 25):
            assert t.send(hb("p1", i))
        await wait_for(lambda: peer_stats(t, "p1")["connect_failures"] >= 2, what="failed reconnects")
        assert peer_stats(t, "p1")["queued"] == 15
        await s.start(nursery, port=s.port)
        await wait_for(lambda: len(s.received) == 25, what="delivery after restart")
        assert s.seqs == list(range(25))
        st = peer_stats(t, "p1")
        assert st["connects"] == 2 and st["disconnects"] == 1 and st["queued"] == 0
        assert st["last_error"].startswith("connect: ConnectionRefusedError: "), st["last_error"]

    run(body)


def test_a_peer_that_reaches_us_ends_our_reconnect_delay():
    """peer_reached_us: the server calls it when a peer connects to our listener. A link
    waiting out a reconnect delay tries at once; a connected link is left alone. The delay
    here is a minute, so only the call can bring the link up within the wait."""
    async def body(nursery):
        port = free_port()
        t = Transport(ME, CLUSTER, {"p1": ("127.0.0.1", port)}, backoff=(60.0, 60.0),
                      connect_timeout=2.0)
        await nursery.start(t.run)
        t.peer_reached_us("p1")  # nothing to end yet: harmless
        assert t.send(hb("p1", 0))
        await wait_for(lambda: peer_stats(t, "p1")["connect_failures"] == 1, what="refused")
        s = PeerServer("p1")
        await s.start(nursery, port=port)
        t.peer_reached_us("nobody")  # not a peer: ignored
        t.peer_reached_us("p1")
        await wait_for(lambda: s.seqs == [0], what="delivery once p1 reached us")
        t.peer_reached_us("p1")  # connected: nothing to end
        assert t.send(hb("p1", 1))
        await wait_for(lambda: s.seqs == [0, 1], what="the same connection goes on")
        st = peer_stats(t, "p1")
        assert st["connects"] == 1 and st["disconnects"] == 0 and st["connect_failures"] == 1

    run(body)


def test_bounded_outbox_drops_oldest_while_peer_is_down():
    async def body(nursery):
        port = free_port()
        t = Transport(ME, CLUSTER, {"p1": ("127.0.0.1", port)}, outbox_size=16, **FAST)
        await nursery.start(t.run)
        for i in range(50):
            assert t.send(hb("p1", i))  # accepted; the oldest queued one is evicted when full
        st = peer_stats(t, "p1")
        assert st["queued"] == 16 and st["dropped_full"] == 34 and not st["connected"]
        await wait_for(lambda: peer_stats(t, "p1")["last_error"] is not None, what="connect failure")
        assert peer_stats(t, "p1")["last_error"].startswith("connect: ")
        s = PeerServer("p1")
        await s.start(nursery, port=port)
        await wait_for(lambda: len(s.received) == 16, what="backlog delivery")
        assert s.seqs == list(range(34, 50))
        assert t.stats()["totals"]["dropped_full"] == 34

    run(body)


def test_outbox_byte_bound():
    t = Transport(ME, CLUSTER, {"p1": ("127.0.0.1", 9)}, outbox_bytes=200, clock=lambda: 0.0)
    for i in range(10):
        assert t.send(hb("p1", i))  # each frame is about 45 bytes
    st = peer_stats(t, "p1")
    assert st["queued_bytes"] <= 200 and st["queued"] + st["dropped_full"] == 10 and st["dropped_full"] > 0


def test_partition_drops_and_heal_restores():
    async def body(nursery):
        s1, s2 = PeerServer("p1"), PeerServer("p2")
        await s1.start(nursery)
        await s2.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s1.addr(), "p2": s2.addr()}, **FAST)
        await nursery.start(t.run)
        t.set_faults(t.faults().with_request({"action": "partition", "from": [ME], "to": ["p1"]}))
        assert not t.send(hb("p1", 0))
        assert t.send(hb("p2", 0))
        await wait_for(lambda: len(s2.received) == 1, what="p2 delivery")
        assert peer_stats(t, "p1")["dropped_fault"] == 1
        t.set_faults(FaultRules())
        assert t.send(hb("p1", 1))
        await wait_for(lambda: len(s1.received) == 1, what="delivery after heal")
        assert s1.seqs == [1]

    run(body)


def test_partition_also_drops_the_queued_backlog():
    async def body(nursery):
        port = free_port()
        t = Transport(ME, CLUSTER, {"p1": ("127.0.0.1", port)}, **FAST)
        await nursery.start(t.run)
        for i in range(5):
            t.send(hb("p1", i))  # queued while the peer is down
        t.set_faults(FaultRules((FaultRule("partition", frm={ME}, to={"p1"}),)))
        st = peer_stats(t, "p1")  # dropped at once, even though the link is down
        assert st["dropped_fault"] == 5 and st["queued"] == 0 and st["queued_bytes"] == 0
        s = PeerServer("p1")
        await s.start(nursery, port=port)
        await wait_for(lambda: peer_stats(t, "p1")["connected"], what="connected")
        t.set_faults(FaultRules())
        t.send(hb("p1", 99))
        await wait_for(lambda: len(s.received) == 1, what="delivery after heal")
        assert s.seqs == [99]

    run(body)


def test_one_way_partition_is_enforced_at_either_end():
    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr(), "p2": ("127.0.0.1", 9)}, **FAST)
        await nursery.start(t.run)
        # p1 -> me is cut (the rule is held only by the receiver, us): we still send to p1
        t.set_faults(FaultRules((FaultRule("partition", frm={"p1"}, to={ME}),)))
        assert t.send(hb("p1", 0))
        await wait_for(lambda: len(s.received) == 1, what="me -> p1 delivery")
        assert not t.accept_incoming("p1")
        assert t.accept_incoming("p2")
        assert t.incoming_delay("p1") == 0.0
        # me -> p1 is cut: our sends are dropped, p1's messages still come in
        t.set_faults(FaultRules((FaultRule("partition", frm={ME}, to={"p1"}),)))
        assert not t.send(hb("p1", 1))
        assert t.accept_incoming("p1")
        st = peer_stats(t, "p1")
        assert st["received"] == 2 and st["dropped_incoming"] == 1 and st["dropped_fault"] == 1

    run(body)
    # The receiver alone holding "a -> b" is enough, with no transport running at all.
    b = Transport("b", CLUSTER, {"a": ("127.0.0.1", 9), "c": ("127.0.0.1", 9)}, clock=lambda: 0.0)
    b.set_faults(FaultRules.from_wire([{"action": "partition", "from": ["a"], "to": ["b"]}]))
    assert not b.accept_incoming("a") and b.accept_incoming("c") and b.accept_incoming("stranger")
    assert b.stats()["totals"]["received_unknown"] == 1


def test_latency_delays_one_link_in_order_without_delaying_others():
    async def body(nursery):
        s1, s2 = PeerServer("p1"), PeerServer("p2")
        await s1.start(nursery)
        await s2.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s1.addr(), "p2": s2.addr()}, **FAST)
        await nursery.start(t.run)
        await wait_for(lambda: t.stats()["totals"]["connected"] == 2, what="both connected")
        t.set_faults(FaultRules((FaultRule("latency", frm={ME}, to={"p1"}, ms=300),)))
        t0 = trio.current_time()
        for i in range(20):
            assert t.send(hb("p1", i))
            assert t.send(hb("p2", i))
        await wait_for(lambda: len(s2.received) == 20, what="p2 delivery")
        assert s1.received == []  # p1's messages are still held back
        assert s2.received[-1][0] - t0 < 0.3
        await wait_for(lambda: len(s1.received) == 20, what="p1 delayed delivery")
        assert s1.seqs == list(range(20))
        first = s1.received[0][0] - t0
        assert 0.3 <= first < 3.0, first

    run(body)


def test_latency_rule_that_expires_releases_held_messages():
    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, **FAST)
        await nursery.start(t.run)
        t0 = trio.current_time()
        rules = FaultRules().with_request({"action": "latency", "to": ["p1"], "ms": 60_000, "duration_ms": 300},
                                          now=t0)
        t.set_faults(rules)
        t.send(hb("p1", 0))
        await wait_for(lambda: len(s.received) == 1, timeout=5.0, what="release at expiry")
        assert 0.3 <= s.received[0][0] - t0 < 5.0
        assert len(t.faults()) == 0

    run(body)


def test_expired_rules_stop_applying_with_an_injected_clock():
    now = [1000.0]

    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, clock=lambda: now[0], **FAST)
        await nursery.start(t.run)
        t.set_faults(t.faults().with_request({"action": "partition", "from": [ME, "p1"], "to": [ME, "p1"],
                                              "duration_ms": 500},
                                             now=now[0]))
        t.apply_fault({"type": "fault", "id": 1, "action": "loss", "rate": 1.0, "duration_ms": 800})
        assert not t.send(hb("p1", 0)) and not t.accept_incoming("p1")
        assert t.faults().to_wire(now=now[0])[0]["duration_ms"] == 500
        now[0] += 0.6  # partition expired, loss still on
        assert not t.send(hb("p1", 1)) and t.accept_incoming("p1")
        assert [r.action for r in t.faults()] == ["loss"]
        now[0] += 0.6
        assert t.send(hb("p1", 2))
        assert len(t.faults()) == 0
        await wait_for(lambda: len(s.received) == 1, what="delivery after expiry")
        assert s.seqs == [2] and peer_stats(t, "p1")["dropped_fault"] == 2

    run(body)


def test_loss_rule_drops_about_its_rate_and_delivers_the_rest_in_order():
    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, rng=random.Random(7), outbox_size=5000, **FAST)
        await nursery.start(t.run)
        t.set_faults(FaultRules((FaultRule("loss", frm={ME}, to={"p1"}, rate=0.4),)))
        kept = [i for i in range(2000) if t.send(hb("p1", i))]
        assert 0.36 < 1 - len(kept) / 2000 < 0.44
        await wait_for(lambda: len(s.received) == len(kept), what="delivery")
        assert s.seqs == kept
        assert peer_stats(t, "p1")["dropped_fault"] == 2000 - len(kept)

    run(body)


def test_hello_error_is_recorded_and_retried():
    async def body(nursery):
        s = PeerServer("p1", hello_error=("wrong_cluster", "this agent belongs to cluster 'prod'"))
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, **FAST)
        await nursery.start(t.run)
        t.send(hb("p1", 0))
        await wait_for(lambda: s.accepted >= 2, what="a retry")
        st = peer_stats(t, "p1")
        assert st["last_error"] == "hello: wrong_cluster: this agent belongs to cluster 'prod'"
        assert st["connects"] == 0 and st["connect_failures"] >= 1 and not st["connected"]
        assert st["queued"] == 1 and st["last_error_at"] is not None

    run(body)


def test_silent_peer_and_wrong_node_are_errors():
    async def body(nursery):
        silent = PeerServer("p1", silent=True)
        impostor = PeerServer("p2", reply_node="p3")
        await silent.start(nursery)
        await impostor.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": silent.addr(), "p2": impostor.addr()},
                      backoff=(0.01, 0.05), connect_timeout=0.2)
        await nursery.start(t.run)
        # On a busy machine a 0.2 s connect may itself time out first (and be retried):
        # wait for the handshake's own error rather than the first error of any kind.
        await wait_for(lambda: (peer_stats(t, "p1")["last_error"] or "").startswith("hello:"),
                       what="hello timeout")
        assert peer_stats(t, "p1")["last_error"] == "hello: timed out"
        await wait_for(lambda: (peer_stats(t, "p2")["last_error"] or "").startswith("hello:"),
                       what="wrong node")
        assert peer_stats(t, "p2")["last_error"].startswith("hello: wrong_node: ")
        assert t.stats()["totals"]["connects"] == 0

    run(body)


def test_error_frame_during_session_is_noticed_and_link_reconnects():
    async def body(nursery):
        s = PeerServer("p1", error_after=1)
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, **FAST)
        await nursery.start(t.run)
        t.send(hb("p1", 0))
        await wait_for(lambda: peer_stats(t, "p1")["disconnects"] == 1, what="error noticed")
        assert peer_stats(t, "p1")["last_error"] == "receive: bad_field: test server says no"
        await wait_for(lambda: peer_stats(t, "p1")["connects"] == 2, what="reconnect")
        t.send(hb("p1", 1))
        await wait_for(lambda: len(s.received) == 2, what="delivery on the new connection")
        assert s.seqs == [0, 1]

    run(body)


def test_set_peers_adds_removes_and_readdresses_links():
    async def body(nursery):
        s1, s2, s2b = PeerServer("p1"), PeerServer("p2"), PeerServer("p2")
        for s in (s1, s2, s2b):
            await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s1.addr()}, **FAST)
        await nursery.start(t.run)
        assert not t.send(hb("p2", 0))
        assert t.stats()["totals"]["dropped_unknown"] == 1
        t.set_peers({"p1": s1.addr(), "p2": s2.addr()})
        assert t.send(hb("p2", 1)) and t.send(hb("p1", 1))
        await wait_for(lambda: len(s2.received) == 1 and len(s1.received) == 1, what="delivery")
        # remove p1: its link closes its connection and it is forgotten
        t.set_peers({"p2": s2.addr()})
        await wait_for(lambda: s1.active == 0, what="p1 connection closed")
        assert "p1" not in t.stats()["peers"] and not t.send(hb("p1", 2))
        # move p2 to another address: reconnects there at once, outbox kept
        t.set_peers({"p2": s2b.addr()})
        await wait_for(lambda: s2.active == 0 and peer_stats(t, "p2")["connected"], what="re-addressed")
        assert t.send(hb("p2", 2))
        await wait_for(lambda: len(s2b.received) == 1, what="delivery at the new address")
        assert s2.seqs == [1] and s2b.seqs == [2] and t.peers() == {"p2": s2b.addr()}
        # ...and adding back a removed peer starts a fresh link
        t.set_peers({"p2": s2b.addr(), "p1": s1.addr()})
        assert t.send(hb("p1", 3))
        await wait_for(lambda: s1.seqs == [1, 3], what="p1 back")

    run(body)


def test_stopping_run_closes_every_connection():
    async def body(nursery):
        s1, s2 = PeerServer("p1"), PeerServer("p2")
        await s1.start(nursery)
        await s2.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s1.addr(), "p2": s2.addr()}, **FAST)
        scope = trio.CancelScope()
        nursery.start_soon(_run_in, t, scope)
        await wait_for(lambda: s1.active == 1 and s2.active == 1, what="connected")
        scope.cancel()
        await wait_for(lambda: s1.active == 0 and s2.active == 0, what="connections closed")
        assert t.stats()["totals"]["connected"] == 0
        # a transport can run again, with its outboxes intact
        t.send(hb("p1", 5))
        await nursery.start(t.run)
        await wait_for(lambda: s1.seqs == [5], what="delivery after restart")

    run(body)


async def _run_in(t: Transport, scope: trio.CancelScope) -> None:
    with scope:
        await t.run()


def test_bad_and_oversized_messages():
    t = Transport(ME, CLUSTER, {"p1": ("127.0.0.1", 9)}, max_frame=1000, clock=lambda: 0.0)
    with pytest.raises(ProtocolError):
        t.send(Heartbeat(frm=ME, to="p1", term=-1, commit=0))  # a caller's bug: raised
    big = AppendEntries(frm=ME, to="p1", term=1, prev_log_index=0, prev_log_term=0, entries=(), commit=0)
    assert t.send(big)
    from nodeagent.raft.messages import Entry
    huge = AppendEntries(frm=ME, to="p1", term=1, prev_log_index=0, prev_log_term=0,
                         entries=(Entry(1, 1, b"x" * 5000),), commit=0)
    assert not t.send(huge)
    assert peer_stats(t, "p1")["dropped_too_large"] == 1 and peer_stats(t, "p1")["queued"] == 1
    with pytest.raises(ProtocolError):
        Transport("", CLUSTER, {})  # a bad node id is caught at construction


# -- TLS -------------------------------------------------------------------------------------


def _make_tls(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and one certificate for 127.0.0.1 used by both ends (mutual TLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raftdeck test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = tmp_path / "ca.pem"
    cert_pem = tmp_path / "peer.pem"
    key_pem = tmp_path / "peer.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_pem))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(str(cert_pem), str(key_pem))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_pem))
    client.load_cert_chain(str(cert_pem), str(key_pem))
    return server, client


def test_mutual_tls_link_delivers(tmp_path):
    server_ctx, client_ctx = _make_tls(tmp_path)

    async def body(nursery):
        s = PeerServer("p1", ssl_context=server_ctx)
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, ssl_context=client_ctx, **FAST)
        await nursery.start(t.run)
        for i in range(50):
            t.send(hb("p1", i))
        await wait_for(lambda: len(s.received) == 50, what="delivery over TLS")
        assert s.seqs == list(range(50))
        # The server can read the last batch before the writer task resumes from send_all
        # (still ``busy``): wait until it counted them, as above.
        await wait_for(lambda: peer_stats(t, "p1")["sent"] == 50, what="the writer to finish")
        # A direct write over TLS too: send_batch encrypts and writes at once.
        assert t.send_batch([hb("p1", i) for i in range(50, 53)]) is True
        assert peer_stats(t, "p1")["queued"] == 0
        await wait_for(lambda: len(s.received) == 53, what="a batch over TLS")
        assert s.seqs == list(range(53))

    run(body)


def test_tls_to_a_plain_server_fails_cleanly(tmp_path):
    _, client_ctx = _make_tls(tmp_path)

    async def body(nursery):
        s = PeerServer("p1")
        await s.start(nursery)
        t = Transport(ME, CLUSTER, {"p1": s.addr()}, ssl_context=client_ctx,
                      backoff=(0.01, 0.05), connect_timeout=0.5)
        await nursery.start(t.run)
        await wait_for(lambda: (peer_stats(t, "p1")["last_error"] or "").startswith("tls:"),
                       what="TLS failure")
        assert peer_stats(t, "p1")["last_error"].startswith("tls: ")
        assert peer_stats(t, "p1")["connects"] == 0

    run(body)


def test_an_agent_built_before_data_id_is_greeted_without_it_after_it_refuses_it():
    """A rolling upgrade: the peer's strict decoder refuses the unknown hello field; the
    next attempt leaves it out and connects. Every later attempt offers data_id first
    again (the peer may have been upgraded meanwhile)."""
    async def main():
        async with trio.open_nursery() as nursery:
            old = PeerServer("n2", before_data_id=True)
            await old.start(nursery)
            t = Transport("n1", "c", {"n2": old.addr()}, backoff=(0.01, 0.05), data_id="ab" * 8)
            await nursery.start(t.run)
            with trio.fail_after(10):
                while not peer_stats(t, "n2")["connected"]:
                    await trio.sleep(0.01)
            assert [("data_id" in h) for h in old.hellos] == [True, False]
            await old.stop()
            new = PeerServer("n2")  # upgraded, same address
            await new.start(nursery, old.port)
            with trio.fail_after(10):
                while not new.hellos:
                    await trio.sleep(0.01)
            assert new.hellos[0]["data_id"] == "ab" * 8
            nursery.cancel_scope.cancel()

    trio.run(main)
