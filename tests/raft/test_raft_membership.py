"""Membership changes (Raft dissertation §4): one server at a time, learners first."""

import pytest
from harness import Network

from nodeagent.raft.messages import (
    AppendEntries,
    ConfChange,
    ConfChangeOp,
    ConfChangeRejected,
    InstallSnapshot,
    ProposalDropped,
    RequestVote,
    Role,
)

ET = 10


def add_learner(node: str) -> ConfChange:
    return ConfChange(ConfChangeOp.ADD_LEARNER, node)


def add_voter(node: str) -> ConfChange:
    return ConfChange(ConfChangeOp.ADD_VOTER, node)


def remove(node: str) -> ConfChange:
    return ConfChange(ConfChangeOp.REMOVE, node)


def elected(ids="abc", **kw) -> Network:
    net = Network(ids, **kw)
    net.campaign("a")
    net.tick_all(1)
    return net


def test_a_learner_receives_the_log_but_does_not_count_and_never_campaigns():
    """A learner is replicated to like a follower, but it is not part of any quorum and
    never starts an election, however long it hears nothing."""
    net = elected()
    net.propose("a", b"before d")
    net.stabilize()
    net.start("d")  # a new, empty node
    net.propose_conf_change("a", add_learner("d"))
    net.tick_all(2)
    assert net["d"].status()["learners"] == ["d"]
    assert net.apps["d"].values == [b"before d"]
    assert net.log_terms("d") == net.log_terms("a")

    net.isolate("b")
    net.isolate("c")
    idx = net.propose("a", b"needs b or c")
    net.stabilize()
    assert net["d"].log.last_index() == idx  # d has it...
    assert net["a"].log.committed < idx  # ...but a and d are not a majority of a, b, c

    net.recover()
    net.isolate("d")
    net.tick_all(10 * ET)
    assert net["d"].role is Role.FOLLOWER and not net.sent(RequestVote, frm="d")


def test_a_learner_is_promoted_only_once_caught_up():
    """ADD_VOTER is refused for a learner more than learner_promotion_lag entries behind
    (it would stall commits while it catches up), and for a node that never was a
    learner; once the learner caught up, it becomes a voter and counts in the quorum."""
    net = elected(learner_promotion_lag=64)
    net.start("d")
    net.propose_conf_change("a", add_learner("d"))
    net.stabilize()
    net.isolate("d")
    for i in range(70):
        net.propose("a", b"%d" % i)
    net.stabilize()
    with pytest.raises(ConfChangeRejected):
        net["a"].propose_conf_change(add_voter("d"))
    with pytest.raises(ConfChangeRejected):
        net["a"].propose_conf_change(add_voter("e"))  # not a learner

    net.recover()
    net.tick_all(2)
    net.propose_conf_change("a", add_voter("d"))
    net.tick_all(2)
    for n in "abcd":
        assert net[n].status()["voters"] == ["a", "b", "c", "d"]
    assert net["d"].status()["learners"] == []

    net.isolate("b")
    net.isolate("c")  # a and d alone are 2 of 4 voters now: no majority
    idx = net.propose("a", b"needs 3 of 4")
    net.stabilize()
    assert net["a"].log.committed < idx


def test_removing_a_voter_shrinks_the_quorum_and_the_removed_node_cannot_disrupt():
    """After d's removal is applied, a majority of {a, b, c} is 2: a and b commit alone.
    d never learned of its removal and keeps asking for (pre-)votes in a higher term,
    but nobody listens: the leader and its term stay."""
    net = elected("abcd")
    net.isolate("d")
    net.propose_conf_change("a", remove("d"))
    net.tick_all(2)
    assert net["a"].status()["voters"] == ["a", "b", "c"]
    assert net["d"].status()["voters"] == ["a", "b", "c", "d"]  # d missed it

    net.crash("c")
    idx = net.propose("a", b"a and b suffice")
    net.stabilize()
    assert net["a"].log.committed == idx

    net.recover()  # d can talk to everyone again
    net.tick_all(10 * ET)
    assert any(m.frm == "d" for m in net.sent(RequestVote))
    assert net.leader() == "a" and net["a"].term == 2 and net["b"].term == 2


def test_one_conf_change_at_a_time():
    """A second membership change is refused while the first is not yet applied."""
    net = elected()
    net.start("d")
    net.start("e")
    net.propose_conf_change("a", add_learner("d"))
    with pytest.raises(ProposalDropped):
        net["a"].propose_conf_change(add_learner("e"))

    net.stabilize()  # d's change commits and is applied
    net.propose_conf_change("a", add_learner("e"))
    net.stabilize()
    assert net["a"].status()["learners"] == ["d", "e"]


def test_a_new_leader_cannot_change_membership_before_its_own_entry_is_applied():
    """A new leader may not propose a conf change until an entry of its own term (its
    no-op) is committed and applied: otherwise it could apply a change on top of an
    uncommitted change of an earlier leader (Ongaro's single-server change bug, 2015)."""
    net = elected(check_quorum=False)  # no leases: b can win right after a's crash
    net.propose("a", b"x")
    net.stabilize()
    net.crash("a")
    net.drop(lambda m: isinstance(m, AppendEntries) and m.frm == "b")
    net.elect("b")
    assert net["b"].log.committed < net["b"].log.last_index()  # its no-op is not committed
    assert net["b"].log.applied == net["b"].log.committed  # everything before it is applied
    with pytest.raises(ProposalDropped):
        net["b"].propose_conf_change(remove("a"))

    net.recover()
    net.tick_all(1)
    assert net["b"].log.applied == net["b"].log.last_index()
    net.propose_conf_change("b", remove("a"))  # now it may


@pytest.mark.parametrize("via_snapshot", [False, True], ids=["log", "snapshot"])
def test_a_node_that_joins_later_learns_membership_from_the_leader(via_snapshot):
    """A node added after bootstrap starts empty (no bootstrap entry of its own) and
    learns who votes from what the leader sends: the log, or a snapshot whose metadata
    carries the configuration (including itself)."""
    net = elected(compaction_keep=0)
    net.start("d")
    net.isolate("d")
    net.propose_conf_change("a", add_learner("d"))
    net.propose("a", b"x")
    net.stabilize()
    if via_snapshot:
        snap = net.snapshot("a")
        assert snap.meta.conf.learners == {"d"}
    assert net["d"].status()["voters"] == []  # knows nothing yet

    net.recover()
    net.tick_all(2)
    assert bool(net.sent(InstallSnapshot, to="d")) is via_snapshot
    assert net["d"].status()["voters"] == ["a", "b", "c"]
    assert net["d"].status()["learners"] == ["d"]
    assert net.apps["d"].values == [b"x"]


def test_quorum_losses_count_checkquorum_step_downs_only():
    """``quorum_losses`` (status; the agent closes its links on each) counts a leader's
    CheckQuorum step-down, not a leader stepping down because it removed itself."""
    net = elected("abc")
    net.propose_conf_change("a", remove("a"))
    net.stabilize()
    assert net["a"].role is not Role.LEADER and net["a"].quorum_losses == 0

    net = elected("abc")
    net.isolate("a")
    net.tick_all(3 * ET)
    assert net["a"].role is not Role.LEADER and net["a"].quorum_losses == 1
