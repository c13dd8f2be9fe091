"""Log replication (Raft §5.3): repair with conflict hints, pipelining, batching."""

import pytest
from harness import Network, entries_of_terms

from nodeagent.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfState,
    HardState,
    PersistentState,
)

# Figure 7 of the Raft paper: the leader of term 8 and six possible followers (a-f).
# Entry i has term terms[i-1]; entry 1 here is our bootstrap entry, which has term 1.
FIG7_LEADER = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIG7_FOLLOWERS = {
    #      terms                                 rejected probes with hints
    "a": ([1, 1, 1, 4, 4, 5, 5, 6, 6], 1),  # missing entry 10
    "b": ([1, 1, 1, 4], 1),  # missing entries 5-10
    "c": ([1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6], 0),  # one extra uncommitted entry
    "d": ([1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7], 0),  # two extra entries of term 7
    "e": ([1, 1, 1, 4, 4, 4, 4], 1),  # conflicting 6-7, missing 8-10
    "f": ([1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], 1),  # conflicting 4-11 (terms 2 and 3)
}


def first_mismatch(follower: list[int], leader: list[int]) -> int:
    for i, (f, ld) in enumerate(zip(follower, leader), start=1):
        if f != ld:
            return i
    return min(len(follower), len(leader)) + 1


@pytest.mark.parametrize("shape", sorted(FIG7_FOLLOWERS))
def test_figure7_leader_repairs_each_follower_with_few_round_trips(shape):
    """§5.3 and Figure 7: the leader of term 8 makes any follower's log match its own,
    deleting conflicting entries. With the follower's hint (the last index whose term is
    at most the probe's term) the leader skips a whole term per round trip: one rejection
    at most here, where backing off one entry at a time would take up to seven."""
    follower_terms, expected_rejections = FIG7_FOLLOWERS[shape]
    conf = ConfState.of(["F", "L", "V"])
    leader_log = entries_of_terms(conf, FIG7_LEADER)
    states = {
        "L": PersistentState(HardState(7, None, 1), None, leader_log),
        "V": PersistentState(HardState(7, None, 1), None, leader_log),  # votes for L
        "F": PersistentState(
            HardState(max(follower_terms), None, 1), None,
            entries_of_terms(conf, follower_terms),
        ),
    }
    net = Network(["F", "L", "V"], states=states)
    net.elect("L")
    assert net["L"].term == 8

    assert net.log_terms("F") == FIG7_LEADER + [8]  # plus the no-op of term 8
    assert net["F"].log.committed == 11
    assert [e.data for e in net["F"].log.entries] == [e.data for e in net["L"].log.entries]
    rejections = [m for m in net.sent(AppendEntriesResponse, frm="F") if not m.success]
    assert len(rejections) == expected_rejections
    one_by_one = len(FIG7_LEADER) - first_mismatch(follower_terms, FIG7_LEADER) + 1
    assert len(rejections) <= 1 and (one_by_one <= 1 or len(rejections) < one_by_one)


def elected(n_ids="abc", **config) -> Network:
    net = Network(n_ids, **config)
    net.campaign("a")
    net.tick_all(1)
    return net


def test_a_duplicated_old_append_does_not_truncate_newer_entries():
    """§5.3: a follower deletes entries only on a conflict (same index, other term). An old
    AppendEntries delivered again (a retransmission) must not cut off what came after."""
    net = elected()
    net.propose("a", b"x1")
    net.propose("a", b"x2")
    first, second = net.pending(AppendEntries, to="b")
    net.drop(lambda m: m.frm != "a")  # acks are lost: nothing commits, b must keep both
    net.stabilize()
    assert net["b"].log.committed < 3 and net.log_terms("b")[-2:] == [2, 2]

    net.inject(first)  # the retransmitted append of x1 only
    net.stabilize()
    assert [e.data for e in net["b"].log.entries[-2:]] == [b"x1", b"x2"]
    net.recover()
    net.tick_all(1)
    assert net.apps["b"].values == [b"x1", b"x2"]


def test_pipelining_keeps_several_appends_in_flight_up_to_max_inflight():
    """A follower in replicate state gets appends streamed without waiting for answers,
    bounded by max_inflight unacknowledged messages; the rest follows as acks return."""
    net = elected(max_inflight=4)
    assert net["a"].status()["progress"]["b"].state == "replicate"

    for i in range(10):
        net.propose("a", b"p%d" % i)  # one Ready each, nothing delivered yet
    in_flight = net.pending(AppendEntries, to="b")
    assert 1 < len(in_flight) == 4
    assert not net.pending(AppendEntriesResponse)
    assert net["a"].status()["progress"]["b"].inflight == 4

    net.stabilize()
    assert net.apps["b"].values == [b"p%d" % i for i in range(10)]
    assert net["a"].status()["progress"]["b"].inflight == 0


def test_proposals_before_one_ready_go_out_as_one_append_per_follower():
    """Batching: every proposal made between two Readies leaves in one AppendEntries per
    follower, and the leader persists them with one fsync (group commit)."""
    net = elected()
    syncs = net.storage["a"].syncs
    for i in range(5):
        net["a"].propose(b"b%d" % i)  # no Ready in between
    net.process("a")

    assert net.storage["a"].syncs == syncs + 1
    for f in ("b", "c"):
        [app] = net.pending(AppendEntries, to=f)
        assert [e.data for e in app.entries] == [b"b%d" % i for i in range(5)]
    net.stabilize()
    assert net.apps["c"].values == [b"b%d" % i for i in range(5)]


@pytest.mark.parametrize(
    "limit, sizes",
    [
        ({"max_bytes_per_msg": 1000}, [3, 3, 3, 1]),  # 300-byte entries: ~324 bytes each
        ({"max_entries_per_msg": 4}, [4, 4, 2]),
    ],
)
def test_message_size_cap_splits_a_large_batch(limit, sizes):
    """An append carries at most max_entries_per_msg entries and about max_bytes_per_msg
    bytes (at least one entry); a bigger batch is split across several appends."""
    net = elected(**limit)
    for i in range(10):
        net["a"].propose(bytes([65 + i]) * 300)
    net.process("a")
    net.stabilize()

    apps = [m for m in net.sent(AppendEntries, frm="a", to="b") if m.entries and m.entries[-1].index > 2]
    assert [len(m.entries) for m in apps] == sizes
    if "max_bytes_per_msg" in limit:
        assert all(sum(len(e.data) + 24 for e in m.entries) <= 1000 for m in apps)
    assert len(net.apps["b"].values) == 10
