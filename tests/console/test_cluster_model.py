"""The console's pure cluster model (console/cluster.py), driven by hand-made status maps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from console.cluster import ClusterModel, Event, NodeInfo, fault_summary, node_infos

NAMES = ["n1", "n2", "n3", "n4", "n5"]


def infos(names=NAMES, local=True):
    return [NodeInfo(n, f"10.0.0.{i + 1}:7100", 1, 4, local) for i, n in enumerate(names)]


def model(names=NAMES, **kw) -> ClusterModel:
    return ClusterModel(infos(names), **kw)


def status(node, *, role="follower", term=3, leader="n1", commit=10, applied=None, digest=None,
           voters=None, learners=(), progress=None, running=0, queued=0, capacity=4, faults=(),
           executor=None, counts=None):
    applied = commit if applied is None else applied
    s = {
        "node": node, "address": None, "role": role, "term": term, "leader": leader,
        "commit": commit, "applied": applied, "last_index": commit,
        "voters": list(voters if voters is not None else NAMES), "learners": list(learners),
        "progress": progress or {}, "digest": digest if digest is not None else f"d{applied}",
        "keys": 0, "capacity": capacity,
        "load": {"running": running, "queued": queued, "capacity": capacity},
        "faults": [dict(f) for f in faults],
        "tasks": {"counts": counts or {}},
    }
    if executor is not None:
        s["tasks"]["executor"] = executor
    return s


def feed_cluster(m, now=0.0, leader="n1", term=3, commit=10, names=NAMES, **kw):
    for n in names:
        role = "leader" if n == leader else "follower"
        m.update(n, status(n, role=role, term=term, leader=leader, commit=commit, **kw), now)


def kinds(m, kind):
    return [e for e in m.events if e.kind == kind]


# -- leader and quorum --------------------------------------------------------------------


def test_leader_and_quorum_in_a_healthy_cluster():
    m = model()
    feed_cluster(m)
    h = m.health(0.0)
    assert h.leader == "n1" and h.leader_term == 3 and h.term == 3
    assert h.has_quorum and h.reachable_voters == 5 and h.quorum == 3
    assert h.nodes == 5 and h.reachable == 5 and h.local
    assert m.row("n3").leader == "n1" and m.row("n1").role == "leader"


def test_split_brain_views_pick_the_claimant_with_majority_support():
    m = model()
    # n1 is a stale leader of term 3 (partitioned); n2 was elected in term 4.
    m.update("n1", status("n1", role="leader", term=3, leader="n1"), 0.0)
    for n in ("n3", "n4", "n5"):
        m.update(n, status(n, term=4, leader="n2"), 0.0)
    m.update("n2", status("n2", role="leader", term=4, leader="n2"), 0.0)
    h = m.health(0.0)
    assert h.leader == "n2" and h.leader_term == 4 and h.term == 4


def test_lower_term_claimant_with_majority_beats_unsupported_higher_term():
    m = model()
    m.update("n5", status("n5", role="leader", term=9, leader="n5"), 0.0)  # alone
    for n in ("n1", "n2", "n3", "n4"):
        m.update(n, status(n, role="leader" if n == "n1" else "follower", term=3, leader="n1"), 0.0)
    assert m.health(0.0).leader == "n1"


def test_no_leader_without_majority_support():
    m = model()
    m.update("n1", status("n1", role="leader", term=3, leader="n1"), 0.0)
    m.update("n2", status("n2", term=3, leader="n1"), 0.0)
    m.update("n3", status("n3", role="leader", term=4, leader="n3"), 0.0)
    m.update("n4", status("n4", term=4, leader="n3"), 0.0)
    m.update("n5", status("n5", role="candidate", term=5, leader=None), 0.0)
    assert m.health(0.0).leader is None
    # the claimant must say it is leader itself: followers' views alone are not enough
    m2 = model()
    for n in ("n2", "n3", "n4"):
        m2.update(n, status(n, term=3, leader="n1"), 0.0)
    assert m2.health(0.0).leader is None


def test_quorum_loss_and_recovery():
    m = model()
    feed_cluster(m)
    for n in ("n3", "n4", "n5"):
        m.unreachable(n, "connection refused", 1.0)
    h = m.health(1.0)
    assert not h.has_quorum and h.reachable_voters == 2
    assert h.leader == "n1"  # both reachable nodes still agree on it
    m.update("n3", status("n3"), 2.0)
    assert m.health(2.0).has_quorum


def test_voters_come_from_the_leaders_status():
    m = model()
    feed_cluster(m, voters=["n1", "n2", "n3"], learners=["n4", "n5"])
    m.unreachable("n4", "down", 1.0)
    m.unreachable("n5", "down", 1.0)
    h = m.health(1.0)
    assert h.voters == ("n1", "n2", "n3") and h.has_quorum
    assert not m.row("n4").voter and m.row("n1").voter
    m.unreachable("n3", "down", 1.0)
    m.unreachable("n2", "down", 1.0)
    assert not m.health(1.0).has_quorum


def test_voters_fall_back_to_the_inventory():
    m = ClusterModel([NodeInfo("a", "a:1", 1, 1, True, True), NodeInfo("b", "b:1", 1, 1, True, True),
                      NodeInfo("c", "c:1", 1, 1, True, True), NodeInfo("d", "d:1", 1, 1, True, False)])
    h = m.health(0.0)
    assert h.voters == ("a", "b", "c") and not h.has_quorum and h.leader is None
    m.update("a", {"role": "follower", "term": 1}, 0.0)
    m.update("b", {"role": "follower", "term": 1}, 0.0)
    assert m.health(0.0).has_quorum


def test_local_flag():
    assert model().health(0.0).local
    m = ClusterModel(infos() + [NodeInfo("far", "far:7100", 1, 1, False)])
    assert not m.health(0.0).local


# -- reachability, staleness ----------------------------------------------------------------


def test_stale_node_becomes_unreachable_once_and_comes_back():
    m = model(stale_after=5.0)
    feed_cluster(m, now=0.0)
    feed_cluster(m, now=4.0, names=["n1", "n2", "n3", "n4"])
    m.tick(4.5)
    assert m.row("n5").reachable is True
    m.tick(6.0)
    r = m.row("n5")
    assert r.reachable is False and "no status" in r.error
    assert r.term == 3 and r.applied == 10  # the last known values stay, greyed by the UI
    m.tick(7.0)
    m.tick(8.0)
    downs = kinds(m, "node_down")
    assert [e.node for e in downs] == ["n5"] and downs[0].ts == 6.0
    assert m.health(8.0).reachable == 4
    m.update("n5", status("n5"), 9.0)
    assert m.row("n5").reachable is True and m.row("n5").error is None
    assert [e.node for e in kinds(m, "node_up")] == ["n5"]


def test_unreachable_events_once_and_first_status_is_not_node_up():
    m = model()
    m.unreachable("n2", "connection refused", 0.0)
    m.unreachable("n2", "connection refused", 1.0)
    m.unreachable("n2", "timed out", 2.0)
    assert len(kinds(m, "node_down")) == 1
    assert m.row("n2").error == "timed out" and m.row("n2").reachable is False
    assert m.row("n3").reachable is None
    feed_cluster(m, now=3.0, names=["n1", "n3"])
    assert kinds(m, "node_up") == []
    m.update("n2", status("n2"), 4.0)
    assert len(kinds(m, "node_up")) == 1
    assert m.row("n2").age(6.0) == 2.0


def test_unreachable_leader_is_not_the_leader():
    m = model()
    feed_cluster(m)
    m.unreachable("n1", "reset", 1.0)
    assert m.health(1.0).leader is None
    assert all(r.lag is None for r in m.rows())


# -- events --------------------------------------------------------------------------------


def test_leader_and_term_events_are_emitted_once():
    m = model()
    feed_cluster(m, now=0.0)
    feed_cluster(m, now=1.0)  # the same statuses again
    assert len(kinds(m, "leader_elected")) == 1
    assert kinds(m, "term_changed") == []  # discovery of the first term is not a change
    assert m.health(1.0).leader_changes_1m == 0  # nor is discovering the first leader
    # n1 dies, n2 wins term 4
    m.unreachable("n1", "killed", 2.0)
    m.update("n3", status("n3", role="candidate", term=4, leader=None), 3.0)
    for n in ("n2", "n3", "n4", "n5"):
        m.update(n, status(n, role="leader" if n == "n2" else "follower", term=4, leader="n2"), 4.0)
        m.update(n, status(n, role="leader" if n == "n2" else "follower", term=4, leader="n2"), 4.5)
    elected = kinds(m, "leader_elected")
    assert [(e.node, e.ts) for e in elected] == [("n1", 0.0), ("n2", 4.0)]
    terms = kinds(m, "term_changed")
    assert len(terms) == 1 and terms[0].node == "n3" and "3 -> 4" in terms[0].text
    assert m.health(5.0).leader == "n2"
    assert m.health(5.0).leader_changes_1m == 1
    m.tick(65.0)
    assert m.health(65.0).leader_changes_1m == 0
    assert m.health(65.0).leader is None  # everyone went stale
    for n in ("n2", "n3", "n4", "n5"):
        m.update(n, status(n, role="leader" if n == "n2" else "follower", term=4, leader="n2"), 65.5)
    # a stale status of the old term names no new leader
    m.update("n1", status("n1", role="leader", term=3, leader="n1"), 66.0)
    assert len(kinds(m, "leader_elected")) == 2
    assert m.health(66.0).leader == "n2"


def test_fault_events_are_deduplicated_across_agents():
    m = model()
    part = {"action": "partition", "from": ["n3"], "to": None}
    lat = {"action": "latency", "from": None, "to": ["n2"], "ms": 200, "duration_ms": 30000}
    feed_cluster(m, now=0.0)
    feed_cluster(m, now=1.0, faults=[part, lat])
    feed_cluster(m, now=2.0, faults=[lat, part])
    inj = kinds(m, "fault_injected")
    assert len(inj) == 2
    h = m.health(2.0)
    assert [f.summary for f in h.faults] == ["latency 200ms * -> n2 (30s)", "partition n3 -> *"]
    assert all(f.nodes == 5 for f in h.faults)
    assert m.row("n4").faults == ("latency 200ms * -> n2 (30s)", "partition n3 -> *")
    # heal on all but one agent: still active; then the last one
    feed_cluster(m, now=3.0, names=["n1", "n2", "n3", "n4"], faults=[lat])
    assert kinds(m, "fault_healed") == []
    assert {f.summary: f.nodes for f in m.health(3.0).faults}["partition n3 -> *"] == 1
    m.update("n5", status("n5", faults=[lat]), 4.0)
    healed = kinds(m, "fault_healed")
    assert len(healed) == 1 and "partition n3 -> *" in healed[0].text
    feed_cluster(m, now=5.0)
    assert len(kinds(m, "fault_healed")) == 2 and m.health(5.0).faults == ()


def test_fault_summary():
    assert fault_summary({"action": "loss", "from": ["n1"], "to": ["n2", "n3"], "rate": 0.1}) == "loss 10% n1 -> n2,n3"


def test_task_failed_from_executor_counters():
    m = model()
    ex = {"running": 1, "queued": 0, "succeeded": 5, "failed": 2, "timed_out": 0}
    m.update("n2", status("n2", executor=ex), 0.0)  # the baseline: no event for old failures
    m.update("n2", status("n2", executor=ex), 1.0)
    assert kinds(m, "task_failed") == []
    m.update("n2", status("n2", executor={**ex, "failed": 3, "timed_out": 1}), 2.0)
    m.update("n2", status("n2", executor={**ex, "failed": 3, "timed_out": 1}), 3.0)
    ev = kinds(m, "task_failed")
    assert len(ev) == 1 and ev[0].node == "n2" and "1 failed" in ev[0].text and "1 timed out" in ev[0].text
    assert m.row("n2").tasks["failed"] == 3
    m.update("n2", status("n2", executor={**ex, "failed": 0}), 4.0)  # agent restarted: new baseline
    assert len(kinds(m, "task_failed")) == 1


def test_task_failed_from_the_replicated_table_once_for_all_replicas():
    m = model()
    feed_cluster(m, now=0.0, counts={"succeeded": 4, "failed": 1, "timed_out": 0})
    feed_cluster(m, now=1.0, counts={"succeeded": 4, "failed": 2, "timed_out": 0})
    feed_cluster(m, now=2.0, counts={"succeeded": 4, "failed": 2, "timed_out": 0})
    ev = kinds(m, "task_failed")
    assert len(ev) == 1 and ev[0].node == "n1"
    assert m.health(2.0).tasks["failed"] == 2


def test_new_events_cursor_and_bound():
    m = model(max_events=3)
    cur = m.events_total
    for i in range(5):
        m.unreachable("n1", "x", float(2 * i))
        m.update("n1", status("n1", leader=None), float(2 * i + 1))
    assert len(m.events) == 3 and m.events_total == 10
    assert [e.kind for e in m.new_events(m.events_total - 2)] == ["node_down", "node_up"]
    assert len(m.new_events(cur)) == 3 and m.new_events(m.events_total) == []
    assert all(isinstance(e, Event) for e in m.events)


# -- digests ---------------------------------------------------------------------------------


def test_digest_agreement_at_equal_index():
    m = model()
    m.update("n1", status("n1", role="leader", leader="n1", commit=10, digest="A10"), 0.0)
    assert m.row("n1").digest_ok is None  # nobody to compare with
    m.update("n2", status("n2", commit=10, digest="A10"), 0.0)
    assert m.row("n1").digest_ok is True and m.row("n2").digest_ok is True
    m.update("n3", status("n3", commit=7, digest="A7"), 0.0)
    assert m.row("n3").digest_ok is None  # no one else at 7
    # n1 moves on; n3 reaches 10 later: compared with n1's history, not its current index
    m.update("n1", status("n1", role="leader", leader="n1", commit=12, digest="A12"), 1.0)
    m.update("n2", status("n2", commit=11, digest="A11"), 1.0)
    m.update("n3", status("n3", commit=10, digest="A10"), 1.0)
    assert m.row("n3").digest_ok is True
    assert kinds(m, "digest_mismatch") == []
    assert not m.health(1.0).divergent


def test_planted_digest_mismatch():
    m = model()
    feed_cluster(m, now=0.0, names=["n1"], commit=20, digest="AAAA")
    m.update("n2", status("n2", commit=20, applied=20, digest="BBBB"), 0.5)
    assert m.row("n1").digest_ok is False and m.row("n2").digest_ok is False
    ev = kinds(m, "digest_mismatch")
    assert len(ev) == 1 and "20" in ev[0].text
    assert m.health(0.5).divergent
    # repeated statuses and the same divergence at later indexes: no new event
    m.update("n2", status("n2", commit=20, applied=20, digest="BBBB"), 1.0)
    m.update("n1", status("n1", role="leader", leader="n1", commit=21, digest="AAA1"), 1.5)
    m.update("n2", status("n2", commit=21, digest="BBB1"), 1.5)
    assert len(kinds(m, "digest_mismatch")) == 1
    dv = m.divergence()
    n2 = {r.name: r for r in dv.replicas}["n2"]
    assert n2.conflict_at == 21 and n2.conflicts_with == ("n1",) and n2.digest_ok is False
    assert set(dv.conflicts) == {20, 21}
    assert dv.conflicts[20] == {"AAAA": ("n1",), "BBBB": ("n2",)}


def test_mismatch_names_the_odd_replica_and_clears_when_history_moves_on():
    m = model(digest_history=2)
    for n in ("n1", "n2", "n3", "n4"):
        m.update(n, status(n, role="leader" if n == "n1" else "follower", commit=30, digest="good"), 0.0)
    m.update("n5", status("n5", commit=30, digest="evil"), 0.0)
    ev = kinds(m, "digest_mismatch")
    assert len(ev) == 1 and ev[0].node == "n5"
    assert {r.name: r.digest_ok for r in m.rows()} == dict.fromkeys(NAMES, False)
    assert [r.name for r in m.rows() if r.digest_suspect] == ["n5"]
    # everyone moves on twice and agrees (n5 was repaired by a snapshot)
    for idx in (31, 32):
        for n in NAMES:
            m.update(n, status(n, role="leader" if n == "n1" else "follower", commit=idx, digest=f"g{idx}"), 1.0)
    assert {r.name: r.digest_ok for r in m.rows()} == dict.fromkeys(NAMES, True)
    assert not any(r.digest_suspect for r in m.rows())
    assert not m.health(1.0).divergent
    # a new divergence of n5 is a new event
    for n in NAMES:
        m.update(n, status(n, role="leader" if n == "n1" else "follower", commit=33,
                           digest="bad" if n == "n5" else "g33"), 2.0)
    assert len(kinds(m, "digest_mismatch")) == 2


# -- lag -------------------------------------------------------------------------------------


def test_lag_from_applied_and_from_the_leaders_match():
    m = model()
    m.update("n1", status("n1", role="leader", leader="n1", commit=100, applied=98), 0.0)
    m.update("n2", status("n2", commit=95, applied=90), 0.0)
    m.update("n3", status("n3", commit=100, applied=100), 0.0)
    m.update("n4", status("n4", commit=100, applied=100), 0.0)
    assert m.row("n1").lag == 2  # the leader's own apply lag
    assert m.row("n2").lag == 10 and m.row("n3").lag == 0
    assert m.row("n5").lag is None  # never heard from
    # the leader's commit advances: followers' lags follow without their own status
    m.update("n1", status("n1", role="leader", leader="n1", commit=110, applied=110), 1.0)
    assert m.row("n2").lag == 20 and m.row("n3").lag == 10
    # the leader's progress is preferred where it has the member (n5 too, never seen)
    prog = {"n2": {"match": 105}, "n3": {"match": 110}, "n5": {"match": 60}}
    m.update("n1", status("n1", role="leader", leader="n1", commit=110, applied=110, progress=prog), 2.0)
    assert (m.row("n2").lag, m.row("n3").lag, m.row("n5").lag) == (5, 0, 50)
    assert m.row("n2").match == 105 and m.row("n4").lag == 10
    # the leader drops n2 from its progress: back to applied
    del prog["n2"]
    m.update("n1", status("n1", role="leader", leader="n1", commit=110, applied=110, progress=prog), 3.0)
    assert m.row("n2").match is None and m.row("n2").lag == 20
    div = {r.name: r for r in m.divergence().replicas}
    assert div["n5"].match == 60 and div["n5"].leader_commit == 110


def test_lag_follows_a_new_leader():
    m = model()
    feed_cluster(m, commit=50)
    m.update("n4", status("n4", commit=40), 0.0)
    assert m.row("n4").lag == 10
    m.unreachable("n1", "gone", 1.0)
    assert m.row("n4").lag is None
    for n in ("n2", "n3", "n5"):
        m.update(n, status(n, role="leader" if n == "n2" else "follower", term=4, leader="n2", commit=60), 2.0)
    m.update("n4", status("n4", term=4, leader="n2", commit=45), 2.0)
    assert m.health(2.0).leader == "n2" and m.row("n4").lag == 15


# -- table: rows, versions, highlight, history ------------------------------------------------


def _varied(m):
    m.update("n1", status("n1", role="leader", leader="n1", commit=100, running=4, queued=4), 0.0)
    m.update("n2", status("n2", commit=100, applied=70, running=1), 0.0)
    m.update("n3", status("n3", commit=100, applied=95, running=2), 0.0)
    m.update("n4", status("n4", commit=100, applied=100), 0.0)
    m.unreachable("n5", "refused", 0.0)


def test_rows_sort_filter_and_worst_first():
    m = ClusterModel([NodeInfo("n1", "alpha:1", 3, 4, True), NodeInfo("n2", "beta:1", 1, 4, True),
                      NodeInfo("n3", "gamma:1", 1, 4, True), NodeInfo("n4", "delta:1", 2, 4, True),
                      NodeInfo("n5", "eps:1", 1, 4, True)])
    _varied(m)
    assert [r.name for r in m.rows()] == NAMES
    assert [r.name for r in m.rows(reverse=True)] == NAMES[::-1]
    assert [r.name for r in m.rows("lag")] == ["n1", "n4", "n3", "n2", "n5"]  # None last
    assert [r.name for r in m.rows("lag", reverse=True)] == ["n2", "n3", "n1", "n4", "n5"]
    assert [r.name for r in m.rows("load", reverse=True)][:2] == ["n1", "n3"]
    assert m.row("n1").load == 2.0 and m.row("n4").load == 0.0
    assert [r.name for r in m.rows("priority")] == ["n2", "n3", "n5", "n4", "n1"]  # ties by name
    assert [r.name for r in m.rows(worst_first=True)] == ["n5", "n2", "n3", "n1", "n4"]
    assert [r.name for r in m.rows(filter="LEAD")] == ["n1"]
    assert [r.name for r in m.rows(filter="ELTA:")] == ["n4"]  # address
    assert [r.name for r in m.rows(filter="n")] == NAMES
    with pytest.raises(ValueError):
        m.rows("nonsense")


def test_versions_and_changed_since():
    m = model()
    feed_cluster(m)
    v = m.version
    assert m.changed_since(v) == set()
    feed_cluster(m, now=1.0)  # keep-alive: the same statuses
    assert m.version == v and m.changed_since(v) == set()
    m.update("n3", status("n3", commit=11, applied=9), 2.0)
    assert m.changed_since(v) == {"n3"}
    assert m.row_version("n3") > v >= m.row_version("n4")
    r1 = m.row("n3")
    assert m.row("n3") is r1  # cached until the row changes
    v2 = m.version
    m.update("n1", status("n1", role="leader", leader="n1", commit=12), 3.0)  # every lag moves
    assert m.changed_since(v2) == {"n1", "n2", "n3", "n4", "n5"}
    m.tick(3.5)
    assert m.version > v2 + 1 - 1 and m.changed_since(m.version) == set()


def test_highlight_window():
    m = model()
    feed_cluster(m, now=0.0)
    assert not m.recently_changed("n2", "term", 0.1)  # the first status is not a change
    m.update("n2", status("n2", term=4, leader="n1"), 10.0)
    assert m.recently_changed("n2", "term", 10.5)
    assert m.row("n2").recently_changed("term", 10.5)
    assert not m.recently_changed("n2", "commit", 10.5)
    assert not m.recently_changed("n2", "term", 11.6)
    assert m.row("n2").changed_at["term"] == 10.0


def test_load_history_for_sparklines():
    m = model(history_len=5)
    for i in range(8):
        m.update("n1", status("n1", role="leader", leader="n1", running=i % 5, capacity=4), float(i))
        m.tick(float(i))
    h = m.load_history("n1")
    assert len(h) == 5 and h == [3 / 4, 4 / 4, 0.0, 1 / 4, 2 / 4]
    assert m.load_history("n2") == [None] * 5  # never heard from
    m.unreachable("n1", "x", 9.0)
    m.tick(9.0)
    assert m.load_history("n1")[-1] is None
    # A late or repeated tick within the same second adds no sample: the snapshot tests
    # (fixed clock, real timers) depend on it.
    m.tick(9.0)
    m.tick(9.5)
    assert m.load_history("n1")[-2:] == [2 / 4, None]
    m.tick(10.0)
    assert m.load_history("n1")[-2:] == [None, None]


def test_key_diff():
    dumps = {
        "n1": {"a": b"1", "b": b"2", "c": b"3"},
        "n2": {"a": b"1", "b": b"X", "c": b"3"},
        "n3": {"a": b"1", "c": b"3", "d": b"4"},
    }
    kd = ClusterModel.key_diff(dumps)
    assert kd.agreed == 2 and not kd.converged
    assert kd.differs["n2"] == {"b"} and kd.missing["n3"] == {"b"} and kd.differs["n3"] == {"d"}
    assert kd.missing["n1"] == {"d"} and kd.divergent_keys == {"b", "d"}
    assert model().key_diff({"n1": {"a": b"1"}, "n2": {"a": b"1"}}).converged


def test_unknown_node_status_adds_a_row_and_node_infos_from_inventory():
    m = model()
    m.update("n9", status("n9"), 0.0)
    assert "n9" in m and m.row("n9").reachable is True and not m.health(0.0).local
    m.remove_node("n9")
    assert "n9" not in m and m.health(0.0).local
    from nodeagent.config import load_inventory

    inv = load_inventory(Path(__file__).resolve().parents[2] / "inventory.yaml")
    ni = node_infos(inv)
    assert [n.name for n in ni] == list(inv.names) and all(n.local for n in ni)


# -- scale -------------------------------------------------------------------------------------


def _big_run(n_nodes: int, n_updates: int, voters: int = 5):
    """n nodes (5 voters, the rest learners); round-robin statuses with a moving commit."""
    names = [f"node{i:04d}" for i in range(n_nodes)]
    m = ClusterModel([NodeInfo(n, f"h{i}:7100", 1, 4, False) for i, n in enumerate(names)])
    vs, ls = names[:voters], names[voters:]
    leader = names[0]
    base = {"term": 2, "leader": leader, "voters": vs, "learners": ls, "keys": 10, "capacity": 4,
            "faults": [], "tasks": {"counts": {"succeeded": 1}}}
    t0 = time.perf_counter()
    now = 0.0
    for k in range(n_updates):
        n = names[k % n_nodes]
        commit = 1000 + k // 50
        applied = commit - (k % 3)
        st = dict(base, node=n, role="follower", commit=commit, applied=applied,
                  digest=f"d{applied}", load={"running": k % 4, "queued": 0, "capacity": 4})
        if n == leader:
            st["role"] = "leader"
            st["progress"] = {p: {"match": commit - (j % 2), "next": commit + 1, "state": "replicate"}
                              for j, p in enumerate(names)}
        m.update(n, st, now)
        now += 0.0002
        if k % 1000 == 0:
            m.tick(now)
            m.rows(worst_first=True)
            m.health(now)
    return m, time.perf_counter() - t0


def test_scale_ten_thousand_updates_on_a_thousand_nodes(capsys):
    m, secs = _big_run(1000, 10_000)
    assert secs < 20.0  # generous: this is about quadratic behaviour, not speed
    st = m.stats()
    small, _ = _big_run(100, 10_000)
    per_big = st["ops"] / st["updates"]
    per_small = small.stats()["ops"] / small.stats()["updates"]
    with capsys.disabled():
        print(f"\n[cluster model] 1000 nodes: {secs / 10_000 * 1e6:.1f} us/update (incl. ticks, rows), "
              f"{per_big:.2f} per-node ops/update; 100 nodes: {per_small:.2f} ops/update")
    # work done for other rows per update stays flat as the cluster grows
    assert per_big < 10 and per_big < 3 * per_small + 2
    h = m.health(now := 2.0)
    assert h.leader == "node0000" and h.nodes == 1000 and h.reachable == 1000 and now
    assert len(m.rows()) == 1000


def test_first_election_of_a_fresh_cluster():
    m = model()
    for n in NAMES:
        m.update(n, status(n, term=0, leader=None, commit=0), 0.0)
    assert m.health(0.0).leader is None and kinds(m, "term_changed") == []
    m.update("n2", status("n2", role="candidate", term=1, leader=None, commit=0), 1.0)
    # a leader's status without a leader field still counts as its own view
    m.update("n2", {**status("n2", role="leader", term=1, commit=1), "leader": None}, 2.0)
    for n in ("n1", "n3"):
        m.update(n, status(n, term=1, leader="n2", commit=1), 2.0)
    assert len(kinds(m, "term_changed")) == 1
    assert m.health(2.0).leader == "n2"
    assert [e.node for e in kinds(m, "leader_elected")] == ["n2"]


def test_a_leader_that_lost_its_quorum_is_an_event_once():
    """Status ``quorum_losses`` rising (CheckQuorum made the node step down) is one event;
    the count the console first sees, or sees again unchanged, is none."""
    m = model()
    feed_cluster(m, now=0.0)
    first = dict(status("n1", role="leader"), quorum_losses=2)  # from before the console
    m.update("n1", first, 0.5)
    assert kinds(m, "quorum_lost") == []
    m.update("n1", dict(status("n1", role="follower", leader=None), quorum_losses=3), 1.0)
    m.update("n1", dict(status("n1", role="follower", leader=None), quorum_losses=3), 1.5)
    [ev] = kinds(m, "quorum_lost")
    assert ev.node == "n1" and ev.ts == 1.0 and "no quorum answered" in ev.text


def test_a_voter_refused_for_another_data_directory_is_an_event_per_refusing_node():
    m = model()
    feed_cluster(m, now=0.0)
    refused = {"n2": {"known": "a" * 16, "offered": "b" * 16, "refusals": 1}}
    for t in (1.0, 1.5):  # seen twice: one event
        m.update("n1", dict(status("n1", role="leader"), refused_peers=refused), t)
    m.update("n3", dict(status("n3"), refused_peers=refused), 2.0)
    evs = kinds(m, "peer_refused")
    assert [(e.node, e.ts) for e in evs] == [("n1", 1.0), ("n3", 2.0)]
    assert "n1 refuses n2" in evs[0].text and "remove-node n2" in evs[0].text
    m.update("n1", dict(status("n1", role="leader"), refused_peers={}), 3.0)  # let in again
    m.update("n1", dict(status("n1", role="leader"), refused_peers=refused), 4.0)
    assert len(kinds(m, "peer_refused")) == 3
