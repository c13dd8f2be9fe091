"""Commitment (Raft §5.3, §5.4.2, Figure 8), applying, and persistence before acks."""

from harness import Network

from nodeagent.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    RequestVote,
    RequestVoteResponse,
    Role,
)

FIG8 = ["s1", "s2", "s3", "s4", "s5"]


def figure8_until_c() -> Network:
    """Figure 8 (a)-(c), with the paper's algorithm (no pre-vote, no leases), one entry per
    append so that an old entry can travel without the new one.

    (a) s1 leads term 2 and replicates index 2 to s2 only.
    (b) s1 crashes; s5 wins term 3 with s3, s4 and itself and takes a different index 2,
        which reaches no one; s5 crashes.
    (c) s1 restarts, wins term 4 and replicates index 2 (term 2) to s3: index 2 is now on
        a majority (s1, s2, s3); its own entry 3 (term 4) has reached no one.
    """
    net = Network(FIG8, pre_vote=False, check_quorum=False, max_entries_per_msg=1)
    net.drop(lambda m: isinstance(m, AppendEntries) and m.frm == "s1" and m.to != "s2")
    net.elect("s1")
    assert net.log_terms("s2") == [1, 2] and net.log_terms("s3") == [1]
    net.crash("s1")
    net.recover()

    net.drop(lambda m: isinstance(m, AppendEntries) and m.frm == "s5")
    net.elect("s5")
    assert net["s5"].term == 3 and net.log_terms("s5") == [1, 3]
    net.crash("s5")
    net.recover()

    net.restart("s1")
    net.drop(lambda m: isinstance(m, AppendEntries) and m.frm == "s1" and m.to == "s4")
    net.drop(lambda m: isinstance(m, AppendEntries) and any(e.term == 4 for e in m.entries)
             and net[m.to].log.match_term(m.prev_log_index, m.prev_log_term))
    net.elect("s1")
    assert net["s1"].term == 4
    assert {n: net.log_terms(n) for n in ("s1", "s2", "s3", "s4")} == {
        "s1": [1, 2, 4], "s2": [1, 2], "s3": [1, 2], "s4": [1],
    }
    return net


def test_figure8_old_term_entry_is_not_committed_by_counting_replicas():
    """§5.4.2: a leader never commits an entry from a previous term by counting replicas.
    Index 2 (term 2) is on s1, s2, s3, a majority, yet s1 (term 4) must not commit it: s5
    can still win term 5 (its last term 3 beats their 2) and overwrite it everywhere."""
    net = figure8_until_c()
    assert net["s1"].status()["progress"]["s3"].match == 2  # s1 knows s3 has index 2
    assert net["s1"].log.committed == 1
    assert all(e.index < 2 for n in ("s1", "s2", "s3") for e in net.apps[n].applied)

    # (d) s1 crashes, s5 returns and wins with s2, s3 and s4: index 2 is overwritten.
    net.crash("s1")
    net.recover()
    net.restart("s5")
    net.elect("s5")
    assert net["s5"].term == 5
    for n in ("s2", "s3", "s4", "s5"):
        assert net.log_terms(n) == [1, 3, 5]
        assert [e.term for e in net.apps[n].applied] == [1, 3, 5]


def test_figure8_old_entry_commits_with_an_entry_of_the_current_term():
    """Figure 8 (e): once s1 replicates an entry of its own term (4) to a majority, that
    entry commits, and index 2 with it (Log Matching). Now s5 can no longer win."""
    net = figure8_until_c()
    net.recover()
    net.tick("s1")  # heartbeat; the answers let s1 send entry 3
    net.stabilize()
    assert net["s1"].log.committed == 3
    assert [e.term for e in net.apps["s1"].applied] == [1, 2, 4]

    net.crash("s1")
    net.restart("s5")
    for _ in range(3):
        net.campaign("s5")
    assert net["s5"].role is not Role.LEADER
    assert not any(m.granted for m in net.sent(RequestVoteResponse, to="s5") if m.term > 3)
    assert [e.term for e in net.apps["s2"].applied][:3] == [1, 2, 4]


def test_committed_entries_are_applied_exactly_once_in_order():
    """Every node applies each committed entry once, in log order, and only after it is
    durable (the harness's state machine asserts both on every apply), across a leader
    change."""
    net = Network("abc")
    net.campaign("a")
    for i in range(3):
        net.propose("a", b"x%d" % i)
    net.stabilize()
    net.isolate("a")
    net.tick_all(30)
    new = net.leader()
    assert new != "a"
    for i in range(3, 6):
        net.propose(new, b"x%d" % i)
    net.recover()
    net.tick_all(3)

    want = [b"x%d" % i for i in range(6)]
    for n in "abc":
        applied = [e.index for rd in net.readies[n] for e in rd.committed_entries]
        assert applied == list(range(1, net[n].log.committed + 1))
        assert net.apps[n].values == want


def test_leader_counts_itself_only_for_persisted_entries():
    """The leader's own match index moves only in advance(), after the Ready that holds
    its entries was persisted: b's ack alone (c is cut off) is not a majority of {a,b,c}
    while a's copy is unsynced. etcd-io/raft does the same."""
    net = Network("abc")
    net.campaign("a")
    net.isolate("c")
    net.held.add("a")  # the test carries out a's Readies by hand
    idx = net["a"].propose(b"x")
    rd = net["a"].ready()
    assert [e.index for e in rd.entries] == [idx]
    assert net["a"].status()["progress"]["a"].match == idx - 1

    net.storage["a"].save(rd.hard_state, rd.entries, rd.snapshot)  # written, not synced
    net.inject(*rd.messages)
    net.stabilize()  # b appends and acks; a steps the ack
    assert net["a"].status()["progress"]["b"].match == idx
    assert net["a"].log.committed == idx - 1

    net.storage["a"].sync()
    net["a"].advance(rd)
    assert net["a"].status()["progress"]["a"].match == idx
    assert net["a"].log.committed == idx


def test_acks_leave_in_the_same_ready_as_what_they_promise():
    """Persist before acknowledging: a vote grant comes out of the Ready whose hard state
    records that vote (must_sync), and an append ack out of a Ready whose entries (or an
    earlier one's) hold what it acknowledges, never earlier. Same for a candidate's own
    vote: its RequestVote leaves with the hard state that records it."""
    net = Network("abc", pre_vote=False)
    net.campaign("a")
    for i in range(3):
        net.propose("a", b"x%d" % i)
        net.stabilize()

    for n in "abc":
        held = 0  # last index written by this node's Readies so far
        for rd in net.readies[n]:
            if rd.entries:
                assert rd.must_sync
                held = rd.entries[-1].index
            for m in rd.messages:
                if isinstance(m, RequestVoteResponse) and m.granted:
                    assert rd.must_sync and rd.hard_state is not None
                    assert (rd.hard_state.term, rd.hard_state.vote) == (m.term, m.to)
                if isinstance(m, RequestVote):
                    assert rd.must_sync and rd.hard_state is not None
                    assert (rd.hard_state.term, rd.hard_state.vote) == (m.term, n)
                if isinstance(m, AppendEntriesResponse) and m.success:
                    assert m.index <= held

    # The first ack of each index came out of the very Ready that wrote that entry.
    first_ack = {}
    for m in net.sent(AppendEntriesResponse, frm="b"):
        first_ack.setdefault(m.index, m)
    assert sorted(first_ack) == [2, 3, 4, 5]
    for index, m in first_ack.items():
        rd = next(rd for rd in net.readies["b"] if m in rd.messages)
        assert rd.entries and rd.entries[-1].index == index
