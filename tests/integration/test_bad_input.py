"""Bad input against real `nodeagent run` processes: every malformed frame, refused
handshake, half-sent frame, broken inventory or damaged data directory gets a clear error,
and never hurts the agent or the cluster.

* Raw sockets to a running 3-agent cluster: each kind of bad connection gets one `error`
  frame with the right code (or, for a frame that never finishes, a close at the hello
  deadline), then a clean close; meanwhile a ClusterClient keeps writing, every agent stays
  up, nobody calls an election, and the agent logs the refusal as a JSON line.
* `nodeagent run` with a broken inventory, an unknown node name, or a taken port exits
  with a one-line message and no traceback.
* A WAL record damaged in the middle of a segment: that agent refuses to start (exit 3,
  naming the file and byte offset), leaves the file as it was, and the others carry on.

Waits are on conditions with deadlines (the machine is shared and slow); every test ends
the processes it started.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from console.local import LocalCluster, free_ports
from nodeagent.protocol import CLOSED, NEED_DATA, PROTOCOL_VERSION, FrameDecoder, encode
from nodeagent.raft.messages import Heartbeat

pytestmark = pytest.mark.integration

HELLO_TIMEOUT = 5.0  # nodeagent.server.Server's default hello deadline
CLOSE_DEADLINE = 15.0  # how long we wait for the agent to close a bad connection
# A longer election timeout than the default 1 s, so that a stall of the shared machine
# is not mistaken for an election caused by bad input.
ELECTION_MS = 2000


def run(coro):
    return asyncio.run(coro)


async def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(interval)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One 3-agent cluster shared by the raw-socket tests (none of them stops an agent)."""
    # Plain TCP (tls=False): these tests speak the frame protocol on raw sockets; the same
    # hostile input over TLS, and the TLS refusals, are in tests/security.
    lc = LocalCluster(tmp_path_factory.mktemp("bad-input"), 3, election_ms=ELECTION_MS, tls=False)
    try:
        lc.start_all()

        async def settle():
            async with lc.client() as c:
                await lc.wait_leader(c, timeout=60)

        run(settle())
        yield lc
    finally:
        lc.stop_all()


@pytest.fixture
def cluster_factory(tmp_path):
    made: list[LocalCluster] = []

    def make(n: int = 3, **kw) -> LocalCluster:
        lc = LocalCluster(tmp_path / f"c{len(made)}", n, **kw)
        made.append(lc)
        return lc

    try:
        yield make
    finally:
        for lc in made:
            lc.stop_all()


# -- raw connections ----------------------------------------------------------------------


class Raw:
    """A raw TCP connection to an agent, decoding whatever it answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.local = f"{host}:{port}"  # what the agent logs as "remote"
        self.decoder = FrameDecoder()
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> "Raw":
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next_message(self, timeout: float = CLOSE_DEADLINE) -> dict | None:
        """The next message from the agent, or None once it closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.decoder.next_message()
            if msg is CLOSED:
                return None
            if msg is not NEED_DATA:
                return msg
            remaining = deadline - time.monotonic()
            try:
                data = await asyncio.wait_for(self.reader.read(65536), max(0.01, remaining))
            except asyncio.TimeoutError:
                raise AssertionError(f"the agent neither answered nor closed within {timeout:g}s") from None
            if not data:
                self.eof = True  # recv returned b"": a clean close by the agent
            self.decoder.receive_data(data)

    async def until_closed(self, timeout: float = CLOSE_DEADLINE) -> list[dict]:
        deadline = time.monotonic() + timeout
        out = []
        while (msg := await self.next_message(max(0.01, deadline - time.monotonic()))) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.writer.close()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def hello(**over) -> dict:
    return {"type": "hello", "role": "client", "cluster": "test", "version": PROTOCOL_VERSION,
            "client_id": "bad-input-test", **over}


@dataclass(frozen=True)
class Case:
    id: str
    code: str | None  # the error code; None: no answer, just a close at the hello deadline
    send: Callable[[Raw, str], Awaitable[None]]  # (connection, agent name)
    what: str


def _sends(data: bytes) -> Callable[[Raw, str], Awaitable[None]]:
    async def send(raw: Raw, node: str) -> None:
        await raw.send(data)

    return send


async def _client_sends_raft(raw: Raw, node: str) -> None:
    await raw.send(encode(hello()))
    ok = await raw.next_message()
    assert ok is not None and ok["type"] == "hello_ok", ok
    # A heartbeat with a huge term: delivered, it would depose the leader (term check below).
    other = "n2" if node != "n2" else "n1"
    await raw.send(encode({"type": "raft", "msg": Heartbeat(frm=other, to=node, term=10**6, commit=0)}))


async def _client_sends_bad_request(raw: Raw, node: str) -> None:
    await raw.send(encode(hello()))
    ok = await raw.next_message()
    assert ok is not None and ok["type"] == "hello_ok", ok
    await raw.send(frame(msgpack.packb({"type": "put", "id": 1, "key": "k", "value": b"v",
                                        "client_id": "x", "seq": "3"}, use_bin_type=True)))


CASES = [
    Case("garbage-http", "frame_too_large", _sends(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n"),
         "garbage (an HTTP request): its first 4 bytes read as a huge length"),
    Case("garbage-bad-msgpack", "bad_msgpack", _sends(frame(b"\xc1\xc1\xc1\xc1\xc1\xc1")),
         "a small length, then bytes that are not msgpack"),
    Case("garbage-not-a-map", "not_a_map", _sends(frame(msgpack.packb([1, 2, 3]))),
         "valid msgpack that is not a map"),
    Case("empty-frame", "empty_frame", _sends(b"\x00\x00\x00\x00"), "a zero length prefix"),
    Case("oversized-length", "frame_too_large", _sends(b"\xff\xff\xff\xff"),
         "only a 0xFFFFFFFF length prefix, nothing after it"),
    Case("unknown-type", "unknown_type", _sends(frame(msgpack.packb({"type": "nope"}))),
         "a valid frame with an unknown message type"),
    Case("half-sent-frame", None, _sends(struct.pack(">I", 100) + b"x" * 10),
         "a length of 100 and 10 bytes, then silence"),
    Case("first-frame-not-hello", "hello_required", _sends(encode({"type": "status", "id": 1})),
         "a valid request before hello"),
    Case("hello-wrong-cluster", "wrong_cluster", _sends(encode(hello(cluster="other"))),
         "hello naming another cluster"),
    Case("hello-wrong-version", "version_mismatch", _sends(encode(hello(version=PROTOCOL_VERSION + 1))),
         "hello with a protocol version the agent does not speak"),
    Case("hello-missing-field", "bad_field",
         _sends(frame(msgpack.packb({"type": "hello", "role": "client", "version": 1}))),
         "hello without its cluster"),
    Case("client-sends-raft", "bad_field", _client_sends_raft,
         "a client connection carrying a raft frame"),
    Case("request-bad-field", "bad_field", _client_sends_bad_request,
         "after hello, a put whose seq is a string"),
]


@dataclass
class Outcome:
    case: Case
    node: str
    local: str
    replies: list[dict]
    eof: bool
    seconds: float  # from the last byte sent to the close


async def attempt(case: Case, lc: LocalCluster, node: str) -> Outcome:
    raw = await Raw.open(lc.ports[node])
    try:
        await case.send(raw, node)
        t0 = time.monotonic()
        replies = await raw.until_closed()
        return Outcome(case, node, raw.local, replies, raw.eof, time.monotonic() - t0)
    finally:
        raw.close()


def check_outcome(o: Outcome) -> None:
    where = f"{o.case.id} ({o.case.what}) to {o.node}"
    assert o.eof, f"{where}: the agent did not close the connection cleanly"
    if o.case.code is None:
        assert o.replies == [], f"{where}: unexpected answer {o.replies}"
        # Closed by the hello deadline, not at once and not never.
        assert HELLO_TIMEOUT - 1.0 <= o.seconds <= CLOSE_DEADLINE, f"{where}: closed after {o.seconds:.1f}s"
        return
    assert len(o.replies) == 1, f"{where}: expected one error frame, got {o.replies}"
    err = o.replies[0]
    assert err["type"] == "error" and err["code"] == o.case.code, f"{where}: {err}"
    assert err["message"], f"{where}: an error without words"
    if o.case.id == "oversized-length":
        # Answered on the 4 length bytes alone, not after waiting for a body (nor at the
        # hello deadline, which would close without an error frame).
        assert o.seconds < HELLO_TIMEOUT - 1.0, f"{where}: answered after {o.seconds:.1f}s"
        assert "4294967295" in err["message"], err


# -- the agents' logs ---------------------------------------------------------------------


def log_records(lc: LocalCluster, node: str) -> list[dict]:
    """Every complete line of the agent's log, each of which must be one JSON object."""
    path = lc.log_path(node)
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    out = []
    for line in text.split("\n")[:-1]:  # the last piece may be a line being written
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"{path}: not a JSON line: {line[:200]!r}") from None
    return out


async def wait_logged(lc: LocalCluster, outcomes: list[Outcome], timeout: float = 15.0) -> None:
    """Each bad connection left its line in its agent's log: a warning naming the error
    code for a protocol error, an info line for a connection closed at the deadline."""

    def missing() -> list[str]:
        by_node: dict[str, dict[str, dict]] = {}
        for node in {o.node for o in outcomes}:
            by_node[node] = {r["remote"]: r for r in log_records(lc, node)
                             if r.get("logger") == "nodeagent.server" and "remote" in r}
        out = []
        for o in outcomes:
            rec = by_node[o.node].get(o.local)
            if o.case.code is None:
                ok = rec is not None and rec["level"] == "info" and "too slow" in rec["msg"]
            else:
                ok = (rec is not None and rec["level"] == "warning" and rec["code"] == o.case.code
                      and rec["msg"] == "protocol error; closing" and rec["error"])
            if not ok:
                out.append(f"{o.node} {o.case.id} from {o.local}: {rec}")
        return out

    deadline = time.monotonic() + timeout
    while (gone := missing()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not gone, "no (or a wrong) log line for: " + "; ".join(gone)


# -- the cluster carries on ---------------------------------------------------------------


class Writer:
    """One ClusterClient writing keys back to back, noting when each write was acknowledged."""

    def __init__(self, c, prefix: str):
        self.c = c
        self.prefix = prefix
        self.acks: list[float] = []
        self.errors: list[str] = []
        self.last_key: tuple[str, bytes] | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key, value = f"{self.prefix}-{i}", b"v%d" % i
            try:
                await self.c.put(key, value)
                self.acks.append(time.monotonic())
                self.last_key = (key, value)
            except Exception as e:  # any failure is a test failure, reported below
                self.errors.append(f"{key}: {e!r}")
            i += 1

    async def wait_acks(self, n: int, timeout: float = 30.0) -> None:
        await wait_until(lambda: len(self.acks) >= n or self.errors, timeout,
                         f"{n} acknowledged writes (have {len(self.acks)})")
        assert not self.errors, f"writes failed: {self.errors[:5]}"

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        assert not self.errors, f"writes failed: {self.errors[:5]}"


async def leadership(lc: LocalCluster, c) -> tuple[str, int]:
    """The leader and term all three agents agree on (each one must answer)."""
    leader = await lc.wait_leader(c, timeout=30)
    st = await lc.statuses(c)
    assert set(st) == set(lc.names), f"agents not answering: {set(lc.names) - set(st)}"
    terms = {s["term"] for s in st.values()}
    assert len(terms) == 1, st
    return leader, terms.pop()


async def connection_counts(lc: LocalCluster, c) -> dict[str, int]:
    return {n: s["connections"] for n, s in (await lc.statuses(c)).items()}


async def under_load(lc: LocalCluster, prefix: str,
                     bad: Callable[[str], Awaitable[list[Outcome]]]) -> list[Outcome]:
    """Run ``bad(leader)`` while a client writes; check that writes kept succeeding during
    and after it, that every agent is alive, and that no election happened."""
    async with lc.client() as c:
        leader, term = await leadership(lc, c)
        conns_before = await connection_counts(lc, c)
        w = Writer(c, prefix)
        w.start()
        await w.wait_acks(3)  # writes flow before
        t_open = time.monotonic()
        outcomes = await bad(leader)
        t_closed = time.monotonic()
        n = len(w.acks)
        await w.wait_acks(n + 5)  # and after
        await w.stop()
        if t_closed - t_open > 1.0:  # long enough to expect writes while bad sockets were open
            during = sum(1 for t in w.acks if t_open <= t <= t_closed)
            assert during > 0, f"no write was acknowledged in the {t_closed - t_open:.1f}s of bad input"
        key, value = w.last_key
        assert await c.get(key) == value
        for name in lc.names:
            assert lc.alive(name), f"{name} died: {lc.stderr(name)[-2000:]}"
        assert await leadership(lc, c) == (leader, term), "bad input caused an election"
        # Every bad connection's handler has ended: the agents hold no leaked connections
        # (at most as many as before: a closed client of an earlier test may still count).
        deadline = time.monotonic() + 15.0
        while True:
            have = await connection_counts(lc, c)
            if set(have) == set(conns_before) and all(have[n] <= conns_before[n] for n in have):
                break
            assert time.monotonic() < deadline, f"connections {have}, before the bad input {conns_before}"
            await asyncio.sleep(0.1)
    return outcomes


# == 1 + 2: raw sockets against a running cluster =============================================


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_connection_gets_an_error_frame_and_a_close_and_the_cluster_carries_on(cluster, case):
    lc = cluster

    async def main():
        async def bad(leader):  # the agent whose stall would cost an election
            return [await attempt(case, lc, leader)]

        outcomes = await under_load(lc, f"w-{case.id}", bad)
        for o in outcomes:
            check_outcome(o)
        await wait_logged(lc, outcomes)

    run(main())


def test_a_storm_of_bad_connections_to_every_agent_at_once(cluster):
    """Every kind of bad connection, twice, to each of the three agents, all at once."""
    lc = cluster

    async def bad(leader):
        return await asyncio.gather(*(attempt(case, lc, node)
                                      for node in lc.names for case in CASES for _ in range(2)))

    async def main():
        outcomes = await under_load(lc, "storm", bad)
        assert len(outcomes) == len(lc.names) * len(CASES) * 2
        for o in outcomes:
            check_outcome(o)
        await wait_logged(lc, outcomes)

    run(main())


# == 3: bad configuration, a taken port ========================================================


def nodeagent_run(cwd: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodeagent.cli", "run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    line = stderr.strip()
    assert line and "\n" not in line, f"expected one line, got: {stderr!r}"
    return line


def _inventory(nodes: list[str]) -> str:
    return "cluster:\n  name: test\nnodes:\n" + "".join(nodes)


def _node(name: str, port: int | None, indent_host: int = 4) -> str:
    text = f"  - name: {name}\n" + " " * indent_host + "host: 127.0.0.1\n"
    if port is not None:
        text += f"    port: {port}\n"
    return text


def _bad_inventory(kind: str, p1: int, p2: int) -> tuple[str, int, str]:
    """(inventory text, the line the message must name, what it must name there)."""
    return {
        # Line 5 is over-indented: a syntax error, before any field exists.
        "bad-yaml": (_inventory([_node("n1", p1, indent_host=5), _node("n2", p2)]), 5, "invalid YAML"),
        "missing-port": (_inventory([_node("n1", None), _node("n2", p2)]), 4, "nodes[0].port"),
        "duplicate-name": (_inventory([_node("n1", p1), _node("n1", p2)]), 7, "nodes[1].name"),
        "duplicate-port": (_inventory([_node("n1", p1), _node("n2", p1)]), 9, "nodes[1].port"),
    }[kind]


@pytest.mark.parametrize("kind", ["bad-yaml", "missing-port", "duplicate-name", "duplicate-port"])
def test_a_malformed_inventory_is_one_line_naming_file_line_and_field(tmp_path, kind):
    p1, p2 = free_ports(2)
    text, line, what = _bad_inventory(kind, p1, p2)
    inv = tmp_path / "inv.yaml"
    inv.write_text(text)
    r = nodeagent_run(tmp_path, "--inventory", "inv.yaml", "--name", "n1")
    assert r.returncode == 2, (r.returncode, r.stderr)
    msg = assert_one_clear_line(r.stderr)
    assert msg.startswith(f"inv.yaml:{line}:"), msg  # file:line: first, so editors can jump
    assert what in msg, msg
    if kind == "duplicate-name":
        assert "'n1'" in msg and "line 4" in msg, msg  # and where the first one is
    if kind == "duplicate-port":
        assert f"port {p1}" in msg and "line 6" in msg, msg  # and where it is first used
    assert not (tmp_path / "data").exists() and not (tmp_path / ".raftdeck").exists()


def test_an_unknown_node_name_is_one_line_naming_the_node(tmp_path):
    p1, p2 = free_ports(2)
    (tmp_path / "inv.yaml").write_text(_inventory([_node("n1", p1), _node("n2", p2)]))
    r = nodeagent_run(tmp_path, "--inventory", "inv.yaml", "--name", "nosuch")
    assert r.returncode == 2, (r.returncode, r.stderr)
    msg = assert_one_clear_line(r.stderr)
    assert "inv.yaml" in msg and "'nosuch'" in msg and "n1, n2" in msg, msg


def test_a_data_dir_that_is_a_file_is_one_clear_line(tmp_path):
    (p1,) = free_ports(1)
    (tmp_path / "inv.yaml").write_text(_inventory([_node("n1", p1) + "    data_dir: blocker\n"]))
    (tmp_path / "blocker").write_text("not a directory")
    r = nodeagent_run(tmp_path, "--inventory", "inv.yaml", "--name", "n1")
    assert r.returncode == 3, (r.returncode, r.stderr)
    msg = assert_one_clear_line(r.stderr)
    assert "data directory" in msg and "blocker" in msg, msg


def _start_on_a_taken_port(lc: LocalCluster, port: int) -> str:
    """Start n1 while something else listens on ``port``; its one-line message."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        lc.start("n1")
        code = lc.procs["n1"].wait(timeout=60)
    assert code != 0
    return assert_one_clear_line(lc.stderr("n1"))


def test_an_agent_whose_port_is_taken_exits_with_one_clear_line(cluster_factory):
    lc = cluster_factory(1)
    port = lc.ports["n1"]
    msg = _start_on_a_taken_port(lc, port)
    assert f"127.0.0.1:{port}" in msg and "n1" in msg and "in use" in msg, msg


def test_a_taken_metrics_port_is_named_not_the_agents_port(cluster_factory):
    lc = cluster_factory(1, metrics=True)
    port = lc.metrics_ports["n1"]
    msg = _start_on_a_taken_port(lc, port)
    assert f"cannot listen on 127.0.0.1:{port}" in msg and "in use" in msg, msg


# == 4: a corrupted WAL ========================================================================


def wal_records(buf: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of each ``[u32 length][u32 crc32][payload]`` record."""
    out, pos = [], 0
    while pos < len(buf):
        length, _crc = struct.unpack_from(">II", buf, pos)
        out.append((pos, length))
        pos += 8 + length
    assert pos == len(buf), "the WAL did not parse before we damaged it"
    return out


def test_a_corrupt_wal_record_stops_that_agent_and_not_the_others(cluster_factory):
    lc = cluster_factory(3, election_ms=ELECTION_MS)
    lc.start_all()

    async def write_and_converge() -> str:
        async with lc.client() as c:
            leader = await lc.wait_leader(c, timeout=60)
            for i in range(40):
                await c.put(f"k{i}", b"v%d" % i)
            await lc.wait_converged(c)
            return leader

    leader = run(write_and_converge())
    victim = next(n for n in lc.names if n != leader)
    lc.signal(victim, 15)  # SIGTERM: a clean stop
    assert lc.procs[victim].wait(timeout=30) == 0, lc.stderr(victim)

    segments = sorted((lc.tmp / "data" / victim / "wal").glob("wal-*.log"))
    assert segments, "no WAL segment"
    seg = max(segments, key=lambda p: p.stat().st_size)
    buf = bytearray(seg.read_bytes())
    records = wal_records(bytes(buf))
    mid = len(buf) // 2
    k = max(i for i, (off, _) in enumerate(records) if off <= mid)
    assert len(records) - k > 3, "the damaged record must be in the middle, not the tail"
    offset, length = records[k]
    buf[offset + 8 + length // 2] ^= 0xFF  # one byte of the payload: the crc32 no longer matches
    seg.write_bytes(bytes(buf))

    err_start = len(lc.stderr(victim))
    lc.start(victim)
    code = lc.procs[victim].wait(timeout=60)
    assert code == 3, (code, lc.stderr(victim)[err_start:])
    msg = assert_one_clear_line(lc.stderr(victim)[err_start:])
    assert str(seg) in msg and f"byte offset {offset}" in msg and victim in msg, msg
    # It refused without "repairing": the damaged segment is exactly as we left it.
    assert seg.read_bytes() == bytes(buf)

    async def the_others_carry_on():
        others = [n for n in lc.names if n != victim]
        async with lc.client() as c:
            assert await lc.wait_leader(c, among=others, timeout=30) == leader
            await c.put("after", b"1")
            assert await c.get("after") == b"1"
            for n in others:
                assert lc.alive(n), lc.stderr(n)
                assert await c.get("k39", consistency="stale", node=n) == b"v39"

    run(the_others_carry_on())


def test_clients_that_vanish_mid_request_do_not_hurt_the_agent(cluster):
    """Clients that send requests and reset the connection before the replies: the agent
    fails to send those replies, drops the connections, and carries on."""
    lc = cluster

    async def vanish(node: str) -> None:
        raw = await Raw.open(lc.ports[node])
        await raw.send(encode(hello()))
        assert (await raw.next_message())["type"] == "hello_ok"
        await raw.send(b"".join(encode({"type": "get", "id": i, "key": f"k{i}"}) for i in range(1, 21))
                       + encode({"type": "subscribe", "id": 21, "interval_ms": 10}))
        sock = raw.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        raw.close()

    async def main():
        async def bad(leader):
            await asyncio.gather(*(vanish(n) for n in lc.names for _ in range(10)))
            return []

        await under_load(lc, "vanish", bad)

    run(main())
