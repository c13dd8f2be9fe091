"""A live fuzz of a running agent: the leader of a 3-agent TLS cluster gets at least 10,000
random and mutated frames over TLS connections with a valid operator certificate (so they
reach the decoder and the request handlers), plus hundreds of plain connections sending
garbage before any TLS. Meanwhile a client keeps writing. No agent exits, the leader keeps
its leadership (same leader, same term), and writes commit all through the fuzz.

The frames are seeded (FUZZ_SEED, printed on failure; FUZZ_FRAMES changes the count).
About 30 s on 2 cores; `pytest -m slow tests/security` adds a run of mostly mutated frames.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time

import pytest

from console.client import OutcomeUnknown, RequestError
from console.local import LocalCluster
from nodeagent.protocol import FrameDecoder, ProtocolError, encode

from .fuzzing import SAMPLES, garbage, mutate, randomize
from .helpers import hello, log_records

pytestmark = pytest.mark.integration

FRAMES = int(os.environ.get("FUZZ_FRAMES", "10000"))
GARBAGE_CONNECTIONS = 300
WORKERS = 4
# Each burst on a connection is 0..BURST well-formed frames with random values (they reach
# the request handlers and keep the connection) and then one mutated frame (most end the
# connection, as they must). TLS handshakes are most of the cost, so the default run sends
# long bursts (about 800 connections); the slow run sends one mutated frame in two.
BURST = 24
WRITES = {"put", "delete", "cas", "register", "task_cancel", "task_report"}
SLOW_BURST = 2
WAIT = 0.2  # a quiet time after which the next burst goes
SEED = int(os.environ.get("FUZZ_SEED", "20261126"))


class Counts:
    def __init__(self):
        self.frames = 0
        self.connections = 0
        self.replies = 0
        self.errors = 0
        self.garbage = 0
        self.fuzz_done = 0.0
        self.silent = 0  # frames the agent neither answered nor closed on within the wait


async def fuzz_worker(port: int, ctx, cluster: str, rng: random.Random, counts: Counts, until: int,
                      burst_size: int):
    try:
        await _fuzz(port, ctx, cluster, rng, counts, until, burst_size)
    finally:
        counts.fuzz_done = time.monotonic()


async def _fuzz(port: int, ctx, cluster: str, rng: random.Random, counts: Counts, until: int,
                burst_size: int):
    sendable = [m for m in SAMPLES if m["type"] != "hello"]
    # well-formed frames are requests (a raft or reply frame from a client ends it: fatal)
    # writes go through Raft and an fsync each: one in four, so the run stays short
    requests = [m for m in sendable if "id" in m and m["type"] != "reply"]
    requests = [m for m in requests for _ in range(1 if m["type"] in WRITES else 3)]
    ids = iter(range(1, 1 << 62))
    while counts.frames < until:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), 10)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
            continue
        counts.connections += 1
        dec = FrameDecoder(1 << 22)
        try:
            writer.write(hello(cluster))
            open_ = True
            while open_ and counts.frames < until:
                # A burst: some well-formed frames with random values (answered, the
                # connection stays), then one mutated frame (most end the connection).
                # The agent reads a connection in order, so every frame of the burst
                # reaches it before the mutated one can end the connection.
                n_ok = rng.randrange(burst_size + 1)
                burst = []
                for _ in range(n_ok):
                    msg = randomize(rng, rng.choice(requests))
                    msg["id"] = next(ids)
                    burst.append(encode(msg))
                if burst:
                    writer.write(b"".join(burst))
                    await writer.drain()
                    counts.frames += len(burst)
                    # their answers (requests run concurrently; a quiet WAIT ends it)
                    open_ = await drain(reader, dec, counts, want=len(burst))
                    if not open_:
                        continue
                writer.write(mutate(rng, rng.choice(sendable)))
                await writer.drain()
                counts.frames += 1
                open_ = await drain(reader, dec, counts, want=None)
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1)
            except Exception:
                pass


async def drain(reader, dec: FrameDecoder, counts: Counts, want: int | None) -> bool:
    """Read what the agent sends back: until ``want`` answers, an error frame or the close
    (-> False), or a quiet WAIT. True while the connection is open."""
    got = 0
    while want is None or got < want:
        try:
            msg = dec.next_message()
        except ProtocolError:
            return False
        if isinstance(msg, dict):
            if msg["type"] == "error":
                counts.errors += 1
                return False
            counts.replies += 1
            got += msg["type"] == "reply"
            continue
        try:
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
        except asyncio.TimeoutError:
            counts.silent += 1
            return True
        if not chunk:
            return False
        dec.receive_data(chunk)
    return True


async def garbage_worker(port: int, rng: random.Random, counts: Counts, n: int):
    for _ in range(n):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, asyncio.TimeoutError):
            continue
        try:
            writer.write(garbage(rng))
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), 0.2)  # the agent's answer, if quick
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            counts.garbage += 1
            writer.close()


def test_live_fuzz_of_the_leader_while_writes_commit(tmp_path):
    live_fuzz(tmp_path, BURST)


@pytest.mark.slow
def test_live_fuzz_mostly_mutated_frames(tmp_path):
    """About 5,000 mutated frames and as many TLS connections: about 80 s on 2 cores."""
    live_fuzz(tmp_path, SLOW_BURST)


def live_fuzz(tmp_path, burst_size: int):
    lc = LocalCluster(tmp_path, 3, election_ms=2000)
    lc.start_all()
    counts = Counts()
    written: list[float] = []
    failures: list[str] = []

    async def main():
        async with lc.client(op_timeout=30.0) as c:
            leader = await lc.wait_leader(c, timeout=60)
            term = (await c.status(leader))["term"]
            await c.put("warmup", b"x")
            stop = asyncio.Event()

            async def writer():
                i = 0
                while not stop.is_set():
                    try:
                        await c.put(f"w{i}", str(i).encode())
                        written.append(time.monotonic())
                    except (RequestError, OutcomeUnknown) as e:
                        failures.append(repr(e))
                    i += 1
                    await asyncio.sleep(0.02)

            ctx = lc.ssl_context("operator")
            port = lc.ports[leader]
            w = asyncio.create_task(writer())
            t0 = time.monotonic()
            await asyncio.gather(
                *(fuzz_worker(port, ctx, lc.cluster, random.Random(SEED + k), counts, FRAMES,
                              burst_size) for k in range(WORKERS)),
                *(garbage_worker(port, random.Random(SEED - 1 - k), counts, GARBAGE_CONNECTIONS // 4)
                  for k in range(4)))
            t1 = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            await w
            during = [t for t in written if t0 <= t <= t1]
            info = (f"seed {SEED}: {counts.frames} frames on {counts.connections} TLS connections "
                    f"({counts.replies} answers, {counts.errors} error frames, {counts.silent} quiet waits), {counts.garbage} "
                    f"garbage connections in {t1 - t0:.1f}s (TLS frames done after {counts.fuzz_done - t0:.1f}s); {len(during)} writes committed "
                    f"meanwhile; failures {failures[:3]}")
            print(info)
            assert counts.frames >= FRAMES and counts.garbage >= GARBAGE_CONNECTIONS, info
            assert all(lc.alive(n) for n in lc.names), info + " ".join(lc.stderr(n) for n in lc.names)
            # writes kept committing all through the fuzz: in every quarter of it
            quarter = (t1 - t0) / 4
            for q in range(4):
                lo, hi = t0 + q * quarter, t0 + (q + 1) * quarter
                assert any(lo <= t <= hi for t in written), f"no write committed in quarter {q}: {info}"
            assert not failures, info
            # the same leader in the same term: the fuzz caused no election
            assert await lc.wait_leader(c) == leader
            st = await c.status(leader)
            assert st["term"] == term, info
            assert st["security"]["refused"].get("tls", 0) >= GARBAGE_CONNECTIONS // 2, st["security"]
            await lc.wait_converged(c)
        # the agent logged the protocol errors, at most 50 lines in any second per kind
        recs = log_records(lc.log_path(leader))
        errs = [r for r in recs if r.get("msg") == "protocol error; closing"]
        # One line per connection at most (a protocol error closes it). Not "at most the
        # error frames the fuzzer read": on a loaded machine a worker may stop waiting and
        # close before the agent's error frame reaches it (CI saw 734 lines, 725 frames).
        assert errs and len(errs) <= counts.connections, (len(errs), counts.connections)
        for kind in ("protocol error; closing", "connection refused"):
            per_second = collections.Counter(r["ts"][:19] for r in recs if r.get("msg") == kind)
            # (the limiter counts monotonic seconds: a wall-clock second may span two)
            assert max(per_second.values(), default=0) <= 2 * 50, (kind, per_second.most_common(3))
        assert not [r for r in recs if r.get("level") in ("error", "critical")], \
            [r for r in recs if r.get("level") in ("error", "critical")][:3]

    try:
        asyncio.run(main())
    finally:
        lc.stop_all()
