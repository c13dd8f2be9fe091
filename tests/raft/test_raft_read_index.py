"""ReadIndex (Raft dissertation §6.4): linearizable reads without writing to the log."""

import pytest
from harness import Network

from nodeagent.raft.messages import (
    AppendEntries,
    Heartbeat,
    HeartbeatResponse,
    NotLeader,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Role,
)

ET = 10


def elected() -> Network:
    net = Network("abc")
    net.campaign("a")
    net.tick_all(1)
    return net


def test_leader_returns_a_read_state_only_after_a_heartbeat_quorum_acks():
    """§6.4: the leader records its commit index as the read index, then confirms it is
    still leader with a round of heartbeats; the read is released once a majority
    (itself and one follower) answered that round."""
    net = elected()
    commit = net["a"].log.committed
    net.read_index("a", b"r1")
    assert net.read_states["a"] == []
    assert [(m.to, m.ctx) for m in net.pending(Heartbeat)] == [("b", b"r1"), ("c", b"r1")]

    net.deliver(2)  # the heartbeats arrive; the answers are on their way
    assert net.read_states["a"] == []
    assert [m.frm for m in net.pending(HeartbeatResponse)] == ["b", "c"]
    net.deliver(1)  # b's answer: a and b are a majority
    assert net.read_states["a"] == [ReadState(commit, b"r1")]
    net.stabilize()
    assert net.read_states["a"] == [ReadState(commit, b"r1")]  # exactly once


def test_a_new_leader_holds_reads_until_an_entry_of_its_term_commits():
    """§6.4 step 1: a new leader does not know the latest commit index until its own
    no-op commits; a read asked earlier waits, and its index covers the no-op."""
    net = Network("abc")
    net.drop(lambda m: isinstance(m, AppendEntries))  # the no-op reaches no one
    net.campaign("a")
    noop = net["a"].log.last_index()
    assert net["a"].role is Role.LEADER and net["a"].log.committed < noop

    net.read_index("a", b"early")
    net.tick_all(3)
    assert net.read_states["a"] == []
    assert not any(m.ctx for m in net.sent(Heartbeat))  # not even asked yet

    net.recover()
    net.tick_all(2)
    assert net["a"].log.committed == noop
    assert net.read_states["a"] == [ReadState(noop, b"early")]


def test_a_follower_read_is_forwarded_to_the_leader_and_answered():
    """A follower sends ReadIndexRequest to its leader, which confirms its leadership and
    answers with the read index; the follower gets the ReadState and serves the read
    once it has applied up to that index."""
    net = elected()
    net.propose("a", b"x")
    net.stabilize()
    net.read_index("b", b"from-b")
    assert net.pending(ReadIndexRequest) == [ReadIndexRequest("b", "a", 2, b"from-b")]

    net.stabilize()
    commit = net["a"].log.committed
    assert net.sent(ReadIndexResponse) == [ReadIndexResponse("a", "b", 2, b"from-b", commit)]
    assert net.read_states["b"] == [ReadState(commit, b"from-b")]
    assert net.read_states["a"] == []
    assert net["b"].log.applied >= commit


def test_a_node_without_a_known_leader_refuses_reads():
    """With no leader to ask, read_index fails at once rather than hang."""
    net = Network("abc")
    with pytest.raises(NotLeader):
        net["b"].read_index(b"r")


def test_an_isolated_leader_never_serves_a_read_asked_after_isolation():
    """A leader cut off from the majority cannot confirm its leadership: a read asked
    after the cut gets no ReadState, while the majority elects a new leader and moves on
    (serving the read would return stale data)."""
    net = elected()
    net.isolate("a")
    net.read_index("a", b"stale?")
    net.tick_all(3 * ET)
    new = net.leader()
    assert new in ("b", "c") and net["a"].role is Role.FOLLOWER
    net.propose(new, b"newer write")
    net.stabilize()

    net.recover()
    net.tick_all(3)
    assert net.read_states["a"] == []
    assert net.apps["a"].values == [b"newer write"]
