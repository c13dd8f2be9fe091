"""RaftNode.leader_lost: a follower whose connection from the leader ended campaigns early.

The agent calls it when a peer connection from its leader ends (end of stream or reset),
which is what a crashed or killed leader's kernel does to its sockets. Only timing may
change: a leader that is alive keeps its term, and a node that is not the leader is
ignored."""

from __future__ import annotations

from harness import Network
from nodeagent.raft.messages import Role

ET = 10  # the harness's election_tick (Config default)


def ticks_until_leader(net: Network, exclude: str, limit: int) -> int | None:
    for n in range(1, limit + 1):
        net.tick_all()
        leaders = [i for i in net.leaders() if i != exclude]
        if leaders:
            return n
    return None


def test_followers_that_lose_a_crashed_leader_elect_one_within_two_ticks():
    net = Network(["a", "b", "c"], check_quorum=True)
    net.elect("a")
    term = net["a"].term
    net.crash("a")
    assert net["b"].leader_lost("a") and net["c"].leader_lost("a")
    n = ticks_until_leader(net, "a", ET)
    # Without the notice the first campaign comes after ET to 2 ET ticks; with it the
    # followers go one tick apart in an agreed order, so the first one wins.
    assert n is not None and n <= 2, n
    new = next(i for i in net.leaders() if i != "a")
    assert net[new].term == term + 1


def test_one_follower_losing_a_live_leader_does_not_depose_it():
    net = Network(["a", "b", "c"], check_quorum=True)
    net.elect("a")
    term = net["a"].term
    net.cut("a", "b")  # b stops hearing a, as if its connection from a were gone
    assert net["b"].leader_lost("a")
    for _ in range(3):
        net.tick("b")  # b campaigns early: a pre-vote, which c refuses (in a's lease)
        net.stabilize()
    assert net["a"].role is Role.LEADER and net["a"].term == term
    assert net["c"].term == term and net["c"].lead == "a"
    net.filters.clear()
    net.tick_all(2)
    assert net.leader() == "a" and net["a"].term == term and net["b"].lead == "a"


def test_a_notice_about_anyone_but_the_leader_changes_nothing():
    net = Network(["a", "b", "c"], check_quorum=True)
    net.elect("a")
    b = net["b"]
    before = (b.election_elapsed, b.randomized_election_timeout)
    assert not b.leader_lost("c")
    assert not net["a"].leader_lost("b")  # the leader itself
    assert (b.election_elapsed, b.randomized_election_timeout) == before


def test_five_followers_campaign_in_priority_order_without_splitting_the_vote():
    net = Network(["a", "b", "c", "d", "e"], check_quorum=True,
                  priorities={"a": 1, "b": 1, "c": 1, "d": 3, "e": 2})
    net.elect("a")
    term = net["a"].term
    net.crash("a")
    for n in "bcde":
        assert net[n].leader_lost("a")
    assert ticks_until_leader(net, "a", ET) is not None
    assert net.leader() == "d" and net["d"].term == term + 1  # the highest priority, first try


def test_without_prevote_or_checkquorum_the_notice_is_ignored():
    """Without PreVote an early campaign bumps the term, and without CheckQuorum the
    other followers grant it even while the leader is alive: either could depose a live
    leader, so the notice changes nothing then."""
    for cfg in ({"pre_vote": False, "check_quorum": True}, {"pre_vote": True, "check_quorum": False}):
        net = Network(["a", "b", "c"], **cfg)
        net.elect("a")
        b = net["b"]
        before = (b.election_elapsed, b.randomized_election_timeout)
        assert not b.leader_lost("a"), cfg
        assert (b.election_elapsed, b.randomized_election_timeout) == before
