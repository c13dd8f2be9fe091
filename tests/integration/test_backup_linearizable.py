"""A backup taken from "the leader" holds every write acknowledged before it was asked for
(agent request ``backup`` with ``consistency: linearizable``, the default): the agent
confirms its leadership with a quorum and waits until it has applied that far before it
takes the state, as a linearizable read does.

The history, on real agents: the leader is paused; the others elect a new leader, which
acknowledges a write. The old leader is cut off from them and resumed: it still believes
it leads until its check-quorum period runs out. A backup asked of it in that window
must not be its stale state, which lacks the acknowledged write.
"""

from __future__ import annotations

import asyncio

import pytest

from console import backup
from console.client import RequestError
from nodeagent.state import StateMachine

pytestmark = pytest.mark.integration


@pytest.mark.long(11)  # seconds, roughly: the longest start first
def test_a_deposed_leader_gives_no_stale_backup(make_cluster):
    # A long election timeout: the deposed leader believes it leads for up to 2 s after
    # it is resumed, so the backup below reaches it inside that window.
    lc = make_cluster(3, election_ms=2000, heartbeat_ms=100)

    async def main():
        async with lc.client(timeout=8.0) as c:
            old = await lc.wait_leader(c)
            others = [n for n in lc.names if n != old]
            await c.put("before", b"1")
            lc.pause(old)
            new = await lc.wait_leader(c, among=others, timeout=60)
            c.leader = new  # not the paused one, which would hold the write unanswered
            await c.put("acknowledged", b"while the old leader was paused")
            for n in others:  # the old leader is cut off: it hears nobody, nobody hears it
                await c.call(n, "fault", action="partition", **{"from": [old], "to": others})
                await c.call(n, "fault", action="partition", **{"from": others, "to": [old]})
            lc.resume(old)
            try:
                r = await c.call(old, "backup")
            except RequestError as e:
                # It could not confirm that it leads; once its check-quorum period ran out
                # it stepped down, and the waiting barrier was answered then, not at the
                # request's timeout.
                assert e.code == "not_leader", e
            else:
                sm = StateMachine()
                sm.restore(await _rest(c, old, r))
                raise AssertionError(
                    f"{old} gave a backup at index {r['index']} although it cannot reach a "
                    f"quorum; it has 'acknowledged' (written by {new}): "
                    f"{sm.get('acknowledged') is not None}")
            # From the leader: every acknowledged write is in it.
            b = await backup.fetch(c, await c.find_leader())
            sm = StateMachine()
            sm.restore(b.state)
            assert sm.get("acknowledged") == b"while the old leader was paused"
            assert sm.get("before") == b"1"
            # An explicitly stale backup of a replica is still what it has applied.
            r = await c.call(old, "backup", consistency="stale")
            assert r["node"] == old

    asyncio.run(main())


async def _rest(c, node: str, first: dict) -> bytes:
    parts, got = [first["data"]], len(first["data"])
    while got < first["size"]:
        r = await c.call(node, "backup", backup=first["backup"], offset=got)
        parts.append(r["data"])
        got += len(r["data"])
    return b"".join(parts)
