"""A killed leader's followers campaign on the connection's end, not on their timers.

SIGKILL makes the leader's kernel close its sockets, so each follower's connection from
it ends at once (server.py -> Driver.peer_lost -> RaftNode.leader_lost). The followers
then campaign within a quarter of an election timeout. A follower that restarts (not the
leader) changes nobody's term.
"""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.integration


def test_followers_campaign_when_the_killed_leaders_connection_ends(make_cluster):
    lc = make_cluster(3)

    async def main():
        async with lc.client(timeout=3.0) as c:
            old = await lc.wait_leader(c)
            for i in range(20):
                await c.put(f"k{i}", b"v")
            term = (await lc.statuses(c))[old]["term"]
            lc.kill(old)
            new = await lc.wait_leader(c, exclude=(old,), timeout=30)
            st = await lc.statuses(c)
            survivors = [n for n in lc.names if n != old]
            early = {n: st[n]["early_campaigns"] for n in survivors}
            assert new != old and sum(early.values()) >= 1, early
            # One election (with pre-vote, a lost pre-vote round does not bump the term).
            # Both survivors campaign at once when the connection ends, so on a starved
            # machine their two campaigns can pass pre-vote together and split the vote:
            # one more term then, never more than that in a quiet cluster of two.
            new_term = st[new]["term"]
            assert term + 1 <= new_term <= term + 2, (term, {n: st[n]["term"] for n in survivors})
            await c.put("after", b"v")

            # A follower that goes away and comes back is not anybody's leader.
            follower = next(n for n in survivors if n != new)
            before = dict(early)
            lc.kill(follower)
            lc.start(follower)
            await lc.wait_converged(c, timeout=30)
            st = await lc.statuses(c)
            assert st[new]["role"] == "leader" and st[new]["term"] == new_term
            assert st[new]["early_campaigns"] == before[new]

    asyncio.run(main())


def test_a_leader_that_hears_nobody_steps_down_and_its_followers_campaign_at_once(make_cluster):
    """A one-way cut: the leader can send but hears nobody (a `fault` partition from the
    others to it). Its heartbeats still reach the followers, so their timers never fire;
    its quorum check makes it step down, and then it closes its links, so the followers
    see their leader's connection end and campaign at once."""
    lc = make_cluster(3)

    async def main():
        async with lc.client(timeout=3.0) as c:
            old = await lc.wait_leader(c)
            await c.put("before", b"v")
            others = [n for n in lc.names if n != old]
            for n in lc.names:
                await c.call(n, "fault", action="partition", **{"from": others, "to": [old]})
            new = await lc.wait_leader(c, exclude=(old,), timeout=30)
            st = await lc.statuses(c)
            assert st[old]["role"] != "leader" and st[old]["quorum_losses"] == 1, st[old]
            early = {n: st[n]["early_campaigns"] for n in others}
            assert new in others and sum(early.values()) >= 1, early
            for n in lc.names:
                await c.call(n, "heal")
            await c.put("after", b"v")
            await lc.wait_converged(c, timeout=30)

    asyncio.run(main())
