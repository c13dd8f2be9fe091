"""Snapshots and log compaction (Raft §7): InstallSnapshot, retries, restarts."""

from harness import Network

from nodeagent.raft.messages import AppendEntries, InstallSnapshot

ET = 10


def cluster_with_snapshot(lagging: str = "c", n: int = 10, keep: int = 0) -> Network:
    """a leads; ``lagging`` misses n proposals; a and b snapshot and compact them away
    (keeping ``keep`` entries behind the snapshot)."""
    net = Network("abc", compaction_keep=keep)
    net.campaign("a")
    net.isolate(lagging)
    for i in range(n):
        net.propose("a", b"v%d" % i)
        net.stabilize()
    for node in "ab":
        if node != lagging:
            net.snapshot(node)
    net.recover()
    return net


def five_values_applied() -> Network:
    """a leads a, b, c (no tail kept behind snapshots); v0..v4 applied everywhere."""
    net = Network("abc", compaction_keep=0)
    net.campaign("a")
    for i in range(5):
        net.propose("a", b"v%d" % i)
    net.stabilize()
    return net


def test_create_snapshot_compacts_the_log():
    """The application snapshots its state at the applied index; the core folds every
    entry up to it into the snapshot, and storage keeps only the entries after it."""
    net = five_values_applied()

    snap = net.snapshot("a")
    assert (snap.meta.index, snap.meta.term) == (7, 2)
    assert snap.meta.conf.voters == {"a", "b", "c"}
    assert net["a"].log.first_index() == 8 and net["a"].log.last_index() == 7
    assert net["a"].status()["snapshot_index"] == 7
    assert net.storage["a"].durable.entries == []

    net.propose("a", b"after")
    net.stabilize()
    assert [e.index for e in net.storage["a"].durable.entries] == [8]
    assert net.apps["c"].values[-1] == b"after"


def test_entries_kept_behind_a_snapshot_spare_a_slightly_lagging_follower_a_snapshot():
    """compaction_keep: the leader keeps the last entries behind its snapshot in memory,
    so a follower that is only a little behind catches up with ordinary appends."""
    net = cluster_with_snapshot("c", n=10, keep=20)
    assert net["a"].status()["snapshot_index"] == 12
    assert net["a"].log.first_index() <= 3  # c's next entry is still in memory
    net.tick_all(2)

    assert not net.sent(InstallSnapshot)
    assert net.apps["c"].values == [b"v%d" % i for i in range(10)]


def test_a_follower_far_behind_installs_a_snapshot_then_continues_with_appends():
    """§7: when the entries a follower needs were compacted, the leader sends its snapshot;
    the follower replaces its log and state with it, then gets ordinary appends again."""
    net = cluster_with_snapshot("c")
    net.tick_all(2)

    [install] = net.sent(InstallSnapshot, to="c")
    assert install.snapshot.meta.index == 12
    assert net.apps["c"].restored == [install.snapshot]
    assert net.apps["c"].values == [b"v%d" % i for i in range(10)]
    assert net["c"].log.first_index() == 13
    assert net.storage["c"].durable.snapshot == install.snapshot
    assert net["a"].status()["progress"]["c"].state == "replicate"

    net.propose("a", b"next")
    net.stabilize()
    assert len(net.sent(InstallSnapshot)) == 1
    assert [e.data for m in net.sent(AppendEntries, to="c") for e in m.entries][-1] == b"next"
    assert net.apps["c"].values[-1] == b"next"


def test_an_installed_snapshot_may_be_held_as_another_object_with_the_same_meta():
    """hold_snapshot_as: after the install (applied), the node keeps what the driver hands
    it (the file) in place of the bytes; a snapshot with another meta is refused."""
    from dataclasses import replace

    net = cluster_with_snapshot("c")
    net.tick_all(2)
    [install] = net.sent(InstallSnapshot, to="c")
    c = net["c"]
    assert c.log.snapshot == install.snapshot

    class Held(bytes):  # stands in for storage.SnapshotFile
        pass

    other = replace(install.snapshot, meta=replace(install.snapshot.meta, index=11))
    assert not c.hold_snapshot_as(other)
    held = replace(install.snapshot, data=Held(install.snapshot.data))
    assert c.hold_snapshot_as(held)
    assert c.log.snapshot is held
    net.propose("a", b"after")
    net.stabilize()
    assert net.apps["c"].values[-1] == b"after"


def test_a_lost_snapshot_is_sent_again_after_a_timeout():
    """A follower in snapshot state gets nothing else until it acknowledges; if the
    snapshot (or its answer) is lost, the leader goes back to probing after an election
    timeout, and the probe leads to a new snapshot."""
    net = cluster_with_snapshot("c")
    lost = []
    net.drop(lambda m: isinstance(m, InstallSnapshot) and not lost and not lost.append(m))
    net.tick_all(1)
    assert len(lost) == 1
    net.tick_all(ET - 2)
    assert net["a"].status()["progress"]["c"].state == "snapshot"
    assert len(net.sent(InstallSnapshot)) == 1  # nothing else while it waits

    net.tick_all(3)
    assert len(net.sent(InstallSnapshot)) == 2
    assert net.apps["c"].values == [b"v%d" % i for i in range(10)]
    assert net["a"].status()["progress"]["c"].state == "replicate"


def test_restart_from_a_snapshot_the_node_made():
    """A node that crashes after compacting restarts from its snapshot and the entries
    after it: same log bounds, same membership, same state, and it keeps replicating."""
    net = five_values_applied()
    snap = net.snapshot("b")
    for i in range(5, 8):
        net.propose("a", b"v%d" % i)
    net.tick_all(1)
    bounds = (net["b"].log.first_index(), net["b"].log.last_index())

    net.crash("b")
    b = net.restart("b")
    assert (b.log.first_index(), b.log.last_index()) == bounds == (snap.meta.index + 1, 10)
    assert b.status()["voters"] == ["a", "b", "c"] and b.term == 2
    net.tick_all(1)
    assert net.apps["b"].values == [b"v%d" % i for i in range(8)]
    net.propose("a", b"after restart")
    net.stabilize()
    assert net.apps["b"].values[-1] == b"after restart"


def test_restart_after_installing_a_snapshot_from_the_leader():
    """A snapshot received with InstallSnapshot is persisted by the Ready that carries it
    (replacing the whole stored log); a crash right after keeps it."""
    net = cluster_with_snapshot("c")
    net.tick_all(2)
    assert net.sent(InstallSnapshot, to="c")

    net.crash("c")
    c = net.restart("c")
    assert c.log.first_index() == 13 and c.status()["voters"] == ["a", "b", "c"]
    assert net.apps["c"].values == [b"v%d" % i for i in range(10)]
    net.propose("a", b"more")
    net.tick_all(1)
    assert net.apps["c"].values[-1] == b"more"
    assert len(net.sent(InstallSnapshot)) == 1


# -- snapshots made in the background at an older applied index ----------------------------


def test_a_snapshot_at_an_older_index_compacts_to_it_and_keeps_the_tail():
    """The driver captured the state at index 5, serialized it while the node applied up
    to 7: the snapshot is at 5 with 5's term, and entries 6..7 stay in the log (memory
    and storage), so nothing applied after the capture is lost."""
    net = five_values_applied()
    a = net["a"]
    assert a.log.applied == 7
    data_at_5 = b'["v0", "v1", "v2"]'
    snap = a.create_snapshot(data_at_5, index=5)
    assert snap is not None
    assert (snap.meta.index, snap.meta.term, snap.data) == (5, 2, data_at_5)
    assert a.log.snapshot_index() == 5 and a.log.first_index() == 6 and a.log.last_index() == 7
    assert [e.data for e in a.log.entries] == [b"v3", b"v4"]
    net.storage["a"].compact(snap)
    assert [e.index for e in net.storage["a"].durable.entries] == [6, 7]

    # c, cut off, falls behind the snapshot and is caught up from it plus the tail
    net.isolate("c")
    net.propose("a", b"v5")
    net.stabilize()
    snap2 = a.create_snapshot(b'["v0", "v1", "v2", "v3", "v4", "v5"]', index=8)
    net.storage["a"].compact(snap2)
    net.recover()
    net.tick_all(2)
    net.stabilize()
    assert net.apps["c"].values[-1] == b"v5"


def test_a_stale_background_snapshot_is_refused():
    """Not above the current snapshot, or beyond applied: refused (None) or a bug
    (ValueError); the log is left as it was."""
    net = five_values_applied()
    a = net["a"]
    net.snapshot("a")  # at 7
    before = (a.log.snapshot, a.log.offset, list(a.log.entries))
    assert a.create_snapshot(b"old", index=5) is None
    assert a.create_snapshot(b"same", index=7) is None
    assert (a.log.snapshot, a.log.offset, list(a.log.entries)) == before
    try:
        a.create_snapshot(b"future", index=8)
    except ValueError as e:
        assert "beyond the applied index 7" in str(e)
    else:
        raise AssertionError("a snapshot beyond applied was accepted")


def test_a_background_snapshot_overtaken_by_an_installed_one_is_dropped():
    """c captured its state at some index, then the leader's InstallSnapshot moved it past
    that index: the stale snapshot must not replace the installed one."""
    net = cluster_with_snapshot("c", n=10, keep=0)
    c = net["c"]
    stale_index = c.log.applied  # what c had applied when it "captured" its view
    net.tick_all(2)
    net.stabilize()
    assert net.sent(InstallSnapshot)
    assert c.log.snapshot_index() == 12 > stale_index
    installed = c.log.snapshot
    assert c.create_snapshot(b"stale", index=stale_index) is None
    assert c.log.snapshot is installed


def test_a_background_snapshot_across_a_membership_change_is_refused():
    """A conf change applied after the captured index: the snapshot would carry the new
    membership with the old state, so it is refused; one taken after it is fine."""
    from nodeagent.raft.messages import ConfChange, ConfChangeOp

    net = Network("abc", compaction_keep=0)
    net.campaign("a")
    net.propose("a", b"v0")
    net.stabilize()
    a = net["a"]
    captured = a.log.applied
    net.propose_conf_change("a", ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    net.stabilize()
    assert a.log.applied > captured and "d" in a.conf.learners
    assert a.create_snapshot(b"old", index=captured) is None
    snap = a.create_snapshot(b"new", index=a.log.applied)
    assert snap is not None and "d" in snap.meta.conf.learners
