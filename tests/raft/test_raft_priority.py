"""Leader priority: the leader is the highest-priority healthy, caught-up voter."""

import pytest
from harness import Network

from nodeagent.raft.core import CARETAKER_TIMEOUTS
from nodeagent.raft.messages import ConfChange, ConfChangeOp, RequestVote, Role, TimeoutNow

ET = 10
PRIO = {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("first", ["a", "b", "c"])
def test_leadership_settles_on_the_highest_priority_node(first):
    """Whoever wins the first election, a leader that sees a caught-up, healthy voter of
    higher priority hands over to it (after leading one election timeout, with its own
    entry committed); it then stays there."""
    net = Network("abc", priorities=PRIO)
    net.campaign(first)
    assert net.leader() == first
    net.tick_all(3 * ET)
    assert net.leader() == "c"

    term = net["c"].term
    net.tick_all(10 * ET)
    assert net.leader() == "c" and net["c"].term == term
    assert net.terms() == {"a": term, "b": term, "c": term}


def test_with_the_top_node_down_the_highest_live_node_leads():
    """Priority ranks only healthy nodes: with c down, b (priority 2) leads, even if a won
    the election."""
    net = Network("abc", priorities=PRIO)
    net.crash("c")
    net.elect("a")
    net.tick_all(3 * ET)
    assert net.leader() == "b"
    net.tick_all(10 * ET)
    assert net.leader() == "b"


@pytest.mark.parametrize("seed", range(5))
def test_a_priority_0_node_does_not_campaign_while_an_eligible_node_can_lead(seed):
    """Priority 0 means "not leader": the node votes and replicates, but while a voter
    that may lead is alive and able to win, it never starts an election, not even when
    the leader dies (it waits CARETAKER_TIMEOUTS extra timeouts, the others do not)."""
    net = Network("abc", priorities={"a": 0, "b": 1, "c": 1}, seed=seed)
    net.tick_all(10 * ET)
    assert net.leader() in ("b", "c")

    gone = net.leader()
    net.crash(gone)
    net.tick_all(10 * ET)  # a votes, so the other priority-1 node wins
    assert net.leader() == ({"b", "c"} - {gone}).pop()
    assert net["a"].role is Role.FOLLOWER
    assert not net.sent(RequestVote, frm="a") and not net.sent(TimeoutNow, to="a")


@pytest.mark.parametrize("pre_vote", [True, False], ids=["pre-vote", "no-pre-vote"])
def test_a_priority_0_node_leads_only_as_a_caretaker(pre_vote):
    """If every voter that may lead is down or too far behind to win, a priority-0 voter
    campaigns after CARETAKER_TIMEOUTS extra election timeouts without a leader, catches
    the eligible node up, and hands leadership to it.
    Here a (leader) removes itself while b is cut off: only c and d (priority 0) hold
    the removal, so b's log is too old for their votes. Without pre-vote, b's refused
    campaigns raise the term again and again; that must not restart c's and d's timers
    (Figure 2: only a leader or a granted vote does), or no one would ever lead."""
    net = Network("abcd", priorities={"a": 1, "b": 1, "c": 0, "d": 0}, pre_vote=pre_vote)
    net.campaign("a")
    net.tick_all(1)
    net.cut("a", "b")
    net.propose_conf_change("a", ConfChange(ConfChangeOp.REMOVE, "a"))
    net.stabilize()
    net.crash("a")
    net.recover()
    assert net["c"].log.last_index() > net["b"].log.last_index()

    leaderless = 0
    while not net.leaders():
        net.tick_all(1)
        leaderless += 1
    assert leaderless >= (1 + CARETAKER_TIMEOUTS) * ET  # b tried in vain all along
    assert net.leader() in ("c", "d")
    net.tick_all(3 * ET)
    assert net.leader() == "b"
    assert net["b"].status()["voters"] == ["b", "c", "d"]  # b caught up, removal included
    net.tick_all(10 * ET)
    assert net.leader() == "b"


def test_the_high_priority_node_takes_over_again_after_rejoining_and_catching_up():
    """c (priority 3) crashes; b (priority 2) takes over and commits more entries. When c
    restarts it first catches up (it is sent TimeoutNow only once it holds the leader's
    whole log), then leads; its return raises the term exactly once, by the transfer."""
    net = Network("abc", priorities=PRIO)
    net.campaign("c")
    net.tick_all(2)
    net.crash("c")
    net.tick_all(5 * ET)
    assert net.leader() == "b"
    for i in range(20):
        net.propose("b", b"%d" % i)
    net.stabilize()
    term_b = net["b"].term

    net.restart("c")
    net.tick_all(3 * ET)
    assert net.leader() == "c"
    assert net["c"].term == term_b + 1
    assert net.apps["c"].values == [b"%d" % i for i in range(20)]
    [sent] = [m for m in net.sent(TimeoutNow) if m.term == term_b]
    assert sent.to == "c"


@pytest.mark.parametrize(
    "priorities", [None, {"a": 2, "b": 2, "c": 1, "d": 1, "e": 1}], ids=["all-1", "two-top"]
)
def test_equal_priorities_do_not_ping_pong(priorities):
    """A leader hands over only to a strictly higher priority: among equals, leadership
    stays where it is, however long the cluster runs."""
    net = Network("abcde", priorities=priorities)
    net.tick_all(5 * ET)
    leader, term = net.leader(), net[net.leader()].term
    if priorities:
        assert leader in ("a", "b")
    settled = len(net.trace)

    net.tick_all(30 * ET)
    assert net.leader() == leader and net[leader].term == term
    assert not [m for m in net.trace[settled:] if isinstance(m, TimeoutNow)]


def test_changing_a_priority_moves_leadership():
    """Priorities are part of the replicated configuration: raising b's priority above
    the leader's (SET_PRIORITY, one conf change) makes the leader hand over to b."""
    net = Network("abc", priorities=PRIO)
    net.campaign("c")
    net.tick_all(3 * ET)
    assert net.leader() == "c"
    net.propose_conf_change("c", ConfChange(ConfChangeOp.SET_PRIORITY, "b", 9))
    net.tick_all(3 * ET)
    assert net.leader() == "b"
    assert all(net[n].status()["priority"] == p for n, p in {"a": 1, "b": 9, "c": 3}.items())


def test_an_unfit_leader_hands_over_and_an_unfit_node_is_not_handed_leadership():
    """``unfit`` (the agent's word: this node's disk is about to fill). The top-priority
    leader c turns unfit: it hands leadership to the best fit voter (b). b never hands
    it back while c stays unfit (c's agent says so in its reports), however long it
    runs; once c is fit again, priority brings leadership back to it."""
    net = Network("abc", priorities=PRIO)
    net.campaign("c")
    net.tick_all(3 * ET)
    assert net.leader() == "c"
    net["c"].unfit = frozenset({"c"})
    net.tick_all(3 * ET)
    assert net.leader() == "b"
    assert net["c"].status()["unfit"] == ["c"]

    net["b"].unfit = frozenset({"c"})
    term = net["b"].term
    net.tick_all(10 * ET)
    assert net.leader() == "b" and net["b"].term == term

    net["b"].unfit = frozenset()
    net.tick_all(3 * ET)
    assert net.leader() == "c"


def test_an_unfit_leader_stays_when_no_fit_voter_may_lead():
    """Leadership moves only to a fit voter that may lead (priority above 0): with a at
    priority 0 and b unfit too, the unfit leader c keeps leading rather than leave the
    cluster without one."""
    net = Network("abc", priorities={"a": 0, "b": 2, "c": 3})
    net.campaign("c")
    net.tick_all(3 * ET)
    assert net.leader() == "c"
    term = net["c"].term
    net["c"].unfit = frozenset({"b", "c"})
    net.tick_all(10 * ET)
    assert net.leader() == "c" and net["c"].term == term
    assert not net.sent(TimeoutNow)[-1:] or net.sent(TimeoutNow)[-1].term < term
