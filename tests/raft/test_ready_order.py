"""The order begin_ready / finish_ready carry out a Ready in (nodeagent/raft/ready.py):
the leader's AppendEntries leave before its own fsync, everything that promises
durability after it, and the leader commits only what it has persisted itself."""

from __future__ import annotations

from harness import Network, _Outbox
from nodeagent.raft.messages import AppendEntries, AppendEntriesResponse, Role
from nodeagent.raft.ready import begin_ready, finish_ready


class _Recorder:
    """Storage and outbox that record the order of effects."""

    def __init__(self, net: Network, node_id: str):
        self.storage, self.outbox = net.storage[node_id], _Outbox(net, node_id)
        self.events: list[tuple] = []

    def save(self, hs, entries, snap):
        self.events.append(("save", len(entries)))
        self.storage.save(hs, entries, snap)

    def sync(self):
        self.events.append(("sync",))
        self.storage.sync()

    def send(self, messages):
        self.events.extend(("send", type(m).__name__) for m in messages)
        self.outbox.send(messages)


def _rounds(net: Network, node_id: str) -> list[tuple]:
    """Carry out the node's Readies as the driver does: [(ready, events), ...]."""
    out = []
    node = net[node_id]
    while True:
        rec = _Recorder(net, node_id)
        rd = begin_ready(node, rec, rec, net.apps[node_id])
        if rd is None:
            return out
        if rd.must_sync:
            rec.sync()
        finish_ready(node, rd, rec, net.apps[node_id])
        out.append((rd, rec.events))


def test_leader_sends_appends_before_its_fsync_then_commits():
    net = Network(["a", "b", "c"])
    net.elect("a")
    net.held.add("a")
    net["a"].propose(b"x")
    (rd, ev), *_ = _rounds(net, "a")
    sync_at = ev.index(("sync",))
    appends = [i for i, e in enumerate(ev) if e == ("send", "AppendEntries")]
    assert len(appends) == 2 and max(appends) < sync_at, ev
    net.held.discard("a")
    net.stabilize()
    assert net["a"].log.committed == rd.entries[-1].index
    assert net.apps["a"].values[-1] == b"x"


def test_a_follower_ack_alone_does_not_commit_what_the_leader_has_not_synced():
    net = Network(["a", "b", "c"])
    net.elect("a")
    net.held.add("a")
    a = net["a"]
    a.propose(b"y")
    rd = begin_ready(a, net.storage["a"], _Outbox(net, "a"), net.apps["a"])
    new = rd.entries[-1].index
    for m in [m for m in net.queue if isinstance(m, AppendEntries) and m.to == "b"]:
        net.queue.remove(m)
        net["b"].step(m)
        net.process("b")
    acks = [m for m in net.queue if isinstance(m, AppendEntriesResponse) and m.to == "a"]
    assert acks and acks[-1].success and acks[-1].index >= new
    for m in acks:  # even stepped before the leader's own fsync ...
        net.queue.remove(m)
        a.step(m)
    assert a.log.committed < new  # ... one follower plus an unsynced leader is no majority
    net.storage["a"].sync()
    finish_ready(a, rd, _Outbox(net, "a"), net.apps["a"])  # advance: the leader counts itself
    assert a.log.committed >= new


def test_appends_in_the_ready_that_changes_the_term_wait_for_the_fsync():
    """A single voter wins its election in one step; its first appends (to the learner)
    carry a term it has not synced yet, so they must not leave before the fsync."""
    net = Network(["a", "l"], learners=["l"])
    net.held.add("a")
    a = net["a"]
    checked = 0
    for _ in range(200):
        a.tick()
        for rd, ev in _rounds(net, "a"):
            if rd.hard_state is not None and ("send", "AppendEntries") in ev:
                prev_terms = {r.hard_state.term for r in net.readies["a"] if r.hard_state}
                if rd.hard_state.term not in prev_terms:
                    assert ev.index(("sync",)) < ev.index(("send", "AppendEntries")), ev
                    checked += 1
            net.readies["a"].append(rd)
        if a.role is Role.LEADER:
            break
    assert a.role is Role.LEADER and checked >= 1
