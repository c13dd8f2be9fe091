"""Leader election (Raft §5.2, §5.4.1): terms, one vote per term, randomized timeouts."""

import pytest
from harness import Network, entries_of_terms

from nodeagent.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfState,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    PersistentState,
    RequestVote,
    RequestVoteResponse,
    Role,
)

ET = 10  # the harness's default election_tick


def test_a_single_candidate_wins_and_everyone_follows_it():
    """A candidate that gets votes from a majority becomes leader; the others learn of it
    from its first AppendEntries, which carries the empty entry of its term."""
    net = Network("abc")
    net.campaign("a")

    assert net.roles() == {"a": "leader", "b": "follower", "c": "follower"}
    assert net.terms() == {"a": 2, "b": 2, "c": 2}
    assert [net[n].lead for n in "abc"] == ["a", "a", "a"]
    for n in "abc":
        assert net.log_terms(n) == [1, 2]  # bootstrap entry, then the leader's no-op
        assert net[n].log.committed == 2


def test_election_timeout_is_randomized_in_et_to_2et():
    """§5.2: each node picks its election timeout at random from
    [election_tick, 2*election_tick), and campaigns exactly when it expires."""
    seen = set()
    for seed in range(40):
        net = Network("abc", seed=seed)
        a = net["a"]
        timeout = a.randomized_election_timeout
        assert ET <= timeout < 2 * ET
        seen.add(timeout)

        net.tick("a", timeout - 1)
        assert a.role is Role.FOLLOWER and not net.sent(RequestVote)
        net.tick("a")
        assert a.role is Role.PRE_CANDIDATE
        assert [m.to for m in net.sent(RequestVote, frm="a")] == ["b", "c"]
        assert ET <= a.randomized_election_timeout < 2 * ET  # re-drawn for the next round
    assert len(seen) >= 6  # really random, not a constant


def test_a_node_votes_once_per_term():
    """§5.2: each server votes for at most one candidate in a given term, first come first
    served. Asking again for the same candidate is answered again (a lost reply)."""
    net = Network("abc", pre_vote=False)
    net.drop(lambda m: m.frm == "b")  # keep b's answers on the wire for inspection
    net.inject(
        RequestVote("a", "b", term=2, last_log_index=1, last_log_term=1),
        RequestVote("c", "b", term=2, last_log_index=1, last_log_term=1),
        RequestVote("a", "b", term=2, last_log_index=1, last_log_term=1),
    )
    net.stabilize()

    answers = [(m.to, m.granted) for m in net.sent(RequestVoteResponse, frm="b")]
    assert answers == [("a", True), ("c", False), ("a", True)]
    assert net.storage["b"].durable.hard_state == HardState(term=2, vote="a", commit=1)


def test_a_vote_survives_a_crash():
    """Term and vote are one durable record: a node that voted for a in term 2, crashed
    and restarted, still refuses c in term 2 (no double vote after a restart)."""
    net = Network("abc", pre_vote=False)
    net.drop(lambda m: m.frm == "b")
    net.inject(RequestVote("a", "b", term=2, last_log_index=1, last_log_term=1))
    net.stabilize()
    net.crash("b")
    net.restart("b")
    net.inject(RequestVote("c", "b", term=2, last_log_index=1, last_log_term=1))
    net.stabilize()

    answers = [(m.to, m.granted) for m in net.sent(RequestVoteResponse, frm="b")]
    assert answers == [("a", True), ("c", False)]


@pytest.mark.parametrize(
    "last_index, last_term, granted",
    [
        (3, 2, True),  # the same log
        (5, 2, True),  # longer, same last term
        (2, 2, False),  # shorter, same last term
        (9, 1, False),  # longer, but its last entry is from an older term
        (1, 3, True),  # shorter, but its last entry is from a newer term
    ],
)
def test_vote_is_granted_only_to_a_log_at_least_as_up_to_date(last_index, last_term, granted):
    """§5.4.1: compare the last entries' terms; if equal, the longer log is more up to date.
    The voter's log here is [1, 2, 2]."""
    conf = ConfState.of("abc")
    state = PersistentState(HardState(2, None, 1), None, entries_of_terms(conf, [1, 2, 2]))
    net = Network("abc", states={"a": state, "b": state, "c": state}, pre_vote=False)
    net.drop(lambda m: m.frm == "b")
    net.inject(RequestVote("c", "b", 3, last_index, last_term))
    net.stabilize()

    [answer] = net.sent(RequestVoteResponse, frm="b")
    assert answer.granted is granted
    assert net["b"].vote == ("c" if granted else None)


def test_a_candidate_that_missed_committed_entries_cannot_win():
    """§5.4.1 in a cluster: c missed an entry committed by a and b, so neither votes for c;
    once a is gone, b (which has it) wins instead."""
    net = Network("abc", pre_vote=False, check_quorum=False)
    net.campaign("a")
    net.isolate("c")
    net.propose("a", b"x")
    net.stabilize()
    assert net["a"].log.committed == 3 and net["c"].log.last_index() == 2
    net.recover()
    net.crash("a")

    net.campaign("c")
    assert net["c"].role is Role.CANDIDATE  # still waiting: b said no, a is gone
    assert not any(m.granted for m in net.sent(RequestVoteResponse, to="c") if m.term == 3)
    net.elect("b")
    assert net.leader() == "b" and net.log_terms("c") == net.log_terms("b")


def test_dueling_candidates_resolve():
    """etcd's TestDuelingCandidates: a and c campaign in the same term while they cannot
    talk; b votes for the first one only. When c campaigns again in a higher term, its
    shorter log gets it nothing, but its term deposes a. The next timeout elects a node
    with the full log, and the cluster agrees again."""
    net = Network("abc", pre_vote=False, check_quorum=False)
    net.cut("a", "c")
    net.campaign("a")
    net.campaign("c")
    assert net.roles() == {"a": "leader", "b": "follower", "c": "candidate"}
    assert net.terms() == {"a": 2, "b": 2, "c": 2}

    net.recover()
    net.campaign("c")  # term 3: a and b hold entry 2 of term 2, c does not
    assert net.roles() == {"a": "follower", "b": "follower", "c": "follower"}
    assert net.terms() == {"a": 3, "b": 3, "c": 3}

    for _ in range(10 * ET):
        net.tick_all()
        if net.leaders():
            break
    assert net.leader() in ("a", "b")
    net.tick_all(2)
    assert net.log_terms("c") == net.log_terms(net.leader())


def test_simultaneous_candidates_end_with_one_leader_per_term():
    """Two nodes time out in the same tick (with pre-vote on): both may reach term 2, but
    b votes once, so exactly one wins and the other becomes its follower."""
    net = Network("abc")
    for n in ("a", "c"):
        net.tick(n, net[n].randomized_election_timeout)
    assert net[n].role is Role.PRE_CANDIDATE
    net.stabilize()

    assert len(net.leaders()) == 1
    leader = net.leader()
    loser = "c" if leader == "a" else "a"
    assert net[loser].role is Role.FOLLOWER and net[loser].lead == leader
    assert net.terms() == {"a": 2, "b": 2, "c": 2}


def test_a_candidate_steps_down_on_seeing_a_leader_of_its_term():
    """§5.2: a candidate that receives AppendEntries from a leader of its own term
    recognizes it and returns to follower."""
    net = Network("abc", pre_vote=False)
    net.isolate("c")
    net.campaign("a")  # a wins term 2 with b
    net.campaign("c")  # c, cut off, becomes a candidate of term 2 too
    assert net["c"].role is Role.CANDIDATE and net["c"].term == 2

    net.recover()
    net.tick("a")  # heartbeat
    net.stabilize()
    assert net["c"].role is Role.FOLLOWER and net["c"].lead == "a" and net["c"].term == 2


@pytest.mark.parametrize(
    "msg",
    [
        AppendEntriesResponse("b", "a", 7, success=False, index=0),
        HeartbeatResponse("b", "a", 7),
        AppendEntries("b", "a", 7, 1, 1, (), 1),
        Heartbeat("b", "a", 7, 1),
        RequestVoteResponse("b", "a", 7, granted=False),
        RequestVoteResponse("b", "a", 7, granted=False, pre_vote=True),
    ],
    ids=lambda m: type(m).__name__ + ("(pre)" if getattr(m, "pre_vote", False) else ""),
)
def test_a_higher_term_in_any_message_makes_the_leader_a_follower(msg):
    """§5.1: if a server sees a larger term, it updates its term; a leader or candidate
    reverts to follower. (A vote *request* is the exception: see the lease tests.)"""
    net = Network("abc")
    net.campaign("a")
    net.drop(lambda m: m.frm == "a")
    net.inject(msg)
    net.stabilize()

    assert net["a"].role is Role.FOLLOWER
    assert net["a"].term == 7
    assert net.storage["a"].durable.hard_state.term == 7
