"""Leadership transfer (Raft dissertation §3.10): catch the target up, then TimeoutNow."""

import pytest
from harness import Network

from nodeagent.raft.messages import (
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfChangeRejected,
    ProposalDropped,
    Role,
    TimeoutNow,
)

ET = 10


def elected(**kw) -> Network:
    net = Network("abc", **kw)
    net.campaign("a")
    net.tick_all(1)
    return net


def test_transfer_to_an_up_to_date_follower():
    """The target already holds the leader's whole log: the leader sends TimeoutNow at
    once, the target campaigns in the next term without pre-vote, and the others vote
    for it even though they heard from the old leader moments ago."""
    net = elected()
    net["a"].transfer_leadership("b")
    net.process("a")
    assert net.pending(TimeoutNow) == [TimeoutNow("a", "b", 2)]

    net.stabilize()
    assert net.leader() == "b" and net["b"].term == 3
    assert net.roles() == {"a": "follower", "b": "leader", "c": "follower"}
    net.propose("b", b"from b")
    net.stabilize()
    assert net.apps["a"].values == [b"from b"]


def test_transfer_to_a_lagging_follower_catches_it_up_first():
    """The leader first brings the target's log up to date; only when the target has
    acknowledged the leader's last index does it send TimeoutNow."""
    net = elected()
    net.cut("a", "b")
    for i in range(3):
        net.propose("a", b"x%d" % i)
    net.stabilize()
    net.recover()
    last = net["a"].log.last_index()
    assert net["b"].log.last_index() < last

    net["a"].transfer_leadership("b")
    net.process("a")
    net.stabilize()
    [timeout_now] = [i for i, m in enumerate(net.trace) if isinstance(m, TimeoutNow)]
    caught_up = [
        i for i, m in enumerate(net.trace)
        if isinstance(m, AppendEntriesResponse) and m.frm == "b" and m.success and m.index == last
    ]
    assert caught_up and caught_up[0] < timeout_now
    assert net.leader() == "b" and net["b"].term == 3
    assert net.apps["b"].values == [b"x0", b"x1", b"x2"]


def test_proposals_are_refused_during_a_transfer():
    """While a transfer is in progress the leader refuses proposals, so the target can
    catch up with a log that stops growing."""
    net = elected()
    net.isolate("b")
    net["a"].transfer_leadership("b")
    with pytest.raises(ProposalDropped):
        net["a"].propose(b"x")
    with pytest.raises(ProposalDropped):
        net["a"].propose_conf_change(ConfChange(ConfChangeOp.SET_PRIORITY, "c", 5))
    assert net["a"].status()["transferee"] == "b"


def test_a_transfer_to_a_dead_node_is_aborted_after_an_election_timeout():
    """If the target does not take over within an election timeout, the leader gives up
    the transfer and accepts proposals again."""
    net = elected()
    net.crash("b")
    net["a"].transfer_leadership("b")
    net.tick_all(ET - 1)
    assert net["a"].status()["transferee"] == "b"
    with pytest.raises(ProposalDropped):
        net["a"].propose(b"x")

    net.tick_all(1)
    assert net["a"].role is Role.LEADER and net["a"].status()["transferee"] is None
    net.propose("a", b"x")
    net.stabilize()
    assert net.apps["c"].values == [b"x"]


def test_transfer_to_a_priority_0_node_or_a_non_voter_is_refused():
    """Priority 0 means "never leader": such a node cannot be the target of a transfer,
    nor can a node that does not vote."""
    net = elected(priorities={"a": 1, "b": 1, "c": 0})
    with pytest.raises(ConfChangeRejected):
        net["a"].transfer_leadership("c")
    with pytest.raises(ConfChangeRejected):
        net["a"].transfer_leadership("z")
    assert net["a"].status()["transferee"] is None
    assert not net.pending(TimeoutNow)


def test_a_priority_0_node_ignores_timeout_now():
    """Even if told to campaign, a node that may never lead does not."""
    net = elected(priorities={"a": 1, "b": 1, "c": 0})
    net.inject(TimeoutNow("a", "c", 2))
    net.stabilize()
    assert net["c"].role is Role.FOLLOWER and net["c"].term == 2
    assert net.leader() == "a"
