"""A bug the chaos work found in the client library's outcome classification
(console/client.py, ``ClusterClient._leader_call``): a write whose first attempt timed out
(outcome unknown: it may commit) and whose retry was refused with a final code (the leader
refused proposals with ``rejected`` while it transferred leadership) raised
``RequestError``, documented as "the request had no effect" - but the first attempt
committed, and a chaos history recorded ``fail`` for a write that took effect.

Fixed twice over: a final refusal after an unknown attempt is ``OutcomeUnknown``, and a
leader that is transferring answers ``dropped`` (certainly no effect, retry). This test
provokes the race and checks the client's answer against the cluster every time: "ok"
means the write is there, "no effect" means it is not; "unknown" is always honest."""

from __future__ import annotations

import asyncio
import time

import pytest

from console.client import OutcomeUnknown, RequestError

pytestmark = pytest.mark.integration


def test_a_refused_retry_after_an_unknown_attempt_is_not_reported_as_no_effect(make_cluster):
    lc = make_cluster(3)

    async def main():
        async with lc.client(timeout=2.0) as admin:
            for attempt in range(5):
                ld = await lc.wait_leader(admin)
                to = [n for n in lc.names if n != ld][0]
                async with lc.client(timeout=0.5, op_timeout=3.0) as c:
                    await c.put("warm", b"1")  # the session exists: one attempt path below
                    # The leader's messages are 0.7 s late: the put commits after the
                    # client's 0.5 s attempt gave up. A transfer started meanwhile makes
                    # the leader refuse the retry (it used to say "rejected").
                    await admin.fault(ld, action="latency", ms=700)
                    c.leader = ld
                    key = f"k{attempt}"

                    async def transfer():
                        await asyncio.sleep(0.15)
                        try:
                            await admin.call(ld, "transfer", to=to)
                        except (RequestError, OutcomeUnknown):
                            pass  # the race this test wants may still have happened

                    tr = asyncio.create_task(transfer())
                    outcome = None
                    try:
                        await c.put(key, b"x")
                        outcome = "ok"
                    except RequestError as e:
                        outcome = ("no effect", e.code)
                    except OutcomeUnknown:
                        outcome = "unknown"
                    await tr
                await admin.heal()
                value = None
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        value = await admin.get(key)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
                if outcome == "ok":
                    assert value == b"x", f"the client reported ok, yet {key} = {value!r}"
                elif outcome != "unknown":
                    # The client said the write had no effect: it must not be there.
                    assert value is None, \
                        f"{outcome}: the client reported no effect, yet {key} = {value!r}"

    asyncio.run(main())
