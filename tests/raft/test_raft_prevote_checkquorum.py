"""PreVote and CheckQuorum (Raft dissertation §9.6): a node that was cut off must not
depose a healthy leader, and a leader that cannot reach a majority must stop leading."""

from harness import Network

from nodeagent.raft.messages import RequestVote, RequestVoteResponse, Role

ET = 10


def test_a_rejoining_partitioned_node_does_not_depose_the_leader():
    """§9.6: with pre-vote, a node cut off for many election timeouts does not raise its
    term, so when the partition heals the leader keeps leading in the same term."""
    net = Network("abc")
    net.campaign("a")
    net.isolate("c")
    net.tick_all(10 * ET)
    assert net["c"].term == 2  # it tried (pre-votes) but never won one
    assert any(m.pre_vote for m in net.sent(RequestVote, frm="c"))

    net.recover()
    net.tick_all(5 * ET)
    assert net.leader() == "a"
    assert net.terms() == {"a": 2, "b": 2, "c": 2}
    net.propose("a", b"after heal")
    net.tick_all(1)
    assert net.apps["c"].values == [b"after heal"]


def test_pre_vote_changes_neither_term_nor_vote_of_the_pre_candidate():
    """A pre-vote round asks "would you vote for me in term T+1?" without moving to T+1:
    nothing durable changes until the pre-vote is won."""
    net = Network("abc")
    net.campaign("a")
    before = net.storage["c"].durable.hard_state
    net.isolate("c")
    for _ in range(5):
        net.campaign("c")
        assert net["c"].role is Role.PRE_CANDIDATE
        assert (net["c"].term, net["c"].vote) == (before.term, before.vote)
    assert net.storage["c"].durable.hard_state == before


def test_granting_a_pre_vote_changes_neither_term_nor_vote_of_the_voter():
    """A voter that grants a pre-vote for term T+1 stays in term T with its old vote: only
    a real vote is recorded."""
    net = Network("abc")
    net.campaign("a")
    net.crash("a")
    net.tick("b", ET)  # b's lease on a has run out
    net.drop(lambda m: isinstance(m, RequestVote) and not m.pre_vote)  # stop after pre-vote
    before = net.storage["b"].durable.hard_state

    net.campaign("c")
    assert [m.granted for m in net.sent(RequestVoteResponse, frm="b", to="c")] == [True]
    assert net["c"].role is Role.CANDIDATE and net["c"].term == 3  # c won its pre-vote
    assert (net["b"].term, net["b"].vote) == (2, "a")
    assert net.storage["b"].durable.hard_state == before
    assert (before.term, before.vote) == (2, "a")


def test_pre_vote_is_not_granted_while_followers_hear_the_leader():
    """§9.6: a server that has heard from a leader within the minimum election timeout
    does not grant (pre-)votes. c, cut off from a only, asks b forever in vain."""
    net = Network("abc")
    net.campaign("a")
    net.cut("a", "c")
    net.tick_all(10 * ET)

    asked_b = [m for m in net.sent(RequestVote, frm="c", to="b")]
    assert asked_b and all(m.pre_vote for m in asked_b)
    assert not any(m.granted for m in net.sent(RequestVoteResponse, to="c"))
    assert net.leader() == "a"
    assert net.terms() == {"a": 2, "b": 2, "c": 2}


def test_an_isolated_leader_steps_down_within_two_election_timeouts():
    """CheckQuorum: every election timeout the leader checks that a majority answered it
    since the last check; if not, it steps down (so clients stop waiting on it)."""
    net = Network("abc")
    net.campaign("a")
    net.tick_all(3)
    net.isolate("a")

    stepped_down_at = None
    for t in range(1, 3 * ET):
        net.tick("a")
        if net["a"].role is not Role.LEADER:
            stepped_down_at = t
            break
    assert stepped_down_at is not None and ET < stepped_down_at <= 2 * ET
    assert net["a"].role is Role.FOLLOWER and net["a"].lead is None
    assert net["a"].term == 2  # stepping down needs no new term

    net.tick_all(4 * ET)  # the majority side elects a new leader
    assert net.leader() in ("b", "c") and net[net.leader()].term == 3


def test_a_leader_with_a_majority_keeps_leading():
    """CheckQuorum counts answers, not silence: a leader that still hears one of two
    followers keeps its majority and its term."""
    net = Network("abc")
    net.campaign("a")
    net.isolate("c")
    net.tick_all(10 * ET)
    assert net.leader() == "a" and net["a"].term == 2


def test_a_follower_in_lease_ignores_a_higher_term_vote_request():
    """§9.6 (leader stickiness): a follower that heard from its leader within an election
    timeout ignores RequestVote, even with a higher term: no answer, no new term."""
    net = Network("abc")
    net.campaign("a")
    net.tick_all(1)
    net.inject(RequestVote("c", "b", term=9, last_log_index=99, last_log_term=9))
    net.stabilize()

    assert not net.sent(RequestVoteResponse, frm="b", to="c")
    assert (net["b"].term, net["b"].vote, net["b"].lead) == (2, "a", "a")
    assert net.leader() == "a"

    net.tick("b", ET)  # lease expired (and a has not been heard from)
    net.inject(RequestVote("c", "b", term=9, last_log_index=99, last_log_term=9))
    net.drop(lambda m: m.frm == "b")
    net.stabilize()
    assert net["b"].term == 9 and net["b"].vote == "c"
