"""Copies of the Raft rules with one bug planted each, to prove the simulator catches them.

Each is a RaftNode subclass that overrides exactly one rule (or a process_ready with the
steps out of order). tests/sim/test_planted_bugs.py runs seeds until the invariant checks
flag the bug, and fails if they never do within a bounded number of seeds.
"""

from __future__ import annotations

from nodeagent.raft.core import RaftNode
from nodeagent.raft.messages import ReadState, RequestVote
from nodeagent.raft.ready import process_ready


class VotesTwice(RaftNode):
    """Grants a vote to any candidate with an up-to-date log, even after voting for
    another candidate in the same term."""

    def _rule_can_grant_vote(self, m: RequestVote) -> bool:
        return self.log.is_up_to_date(m.last_log_index, m.last_log_term)


class IgnoresLogCheck(RaftNode):
    """Votes without the §5.4.1 check that the candidate's log is at least as up to date."""

    def _rule_can_grant_vote(self, m: RequestVote) -> bool:
        return (
            self.vote == m.frm
            or (self.vote is None and self.lead is None)
            or (m.pre_vote and m.term > self.term)
        )


class CommitsPreviousTerm(RaftNode):
    """Commits any entry stored on a majority, even one from a previous term (Figure 8)."""

    def _rule_can_commit(self, index: int) -> bool:
        return True


class ReadsWithoutQuorum(RaftNode):
    """Answers ReadIndex from its own commit index without confirming leadership."""

    def _leader_read_index(self, ctx: bytes, frm: str) -> None:
        self._release_read(ctx, frm, self.log.committed)


def sends_before_persisting(node, storage, outbox, state):
    """process_ready with step 2 before step 1: messages leave before the fsync."""
    if not node.has_ready():
        return None
    rd = node.ready()
    if rd.messages:
        outbox.send(rd.messages)
    if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
        storage.save(rd.hard_state, rd.entries, rd.snapshot)
    if rd.must_sync:
        storage.sync()
    if rd.snapshot is not None:
        state.restore(rd.snapshot)
    for entry in rd.committed_entries:
        state.apply(entry)
    node.advance(rd)
    return rd


assert process_ready is not sends_before_persisting


def factory(cls):
    def make(cfg, state, rng, bootstrap):
        return cls(cfg, state, rng=rng, bootstrap=bootstrap)

    return make


__all__ = [
    "VotesTwice",
    "IgnoresLogCheck",
    "CommitsPreviousTerm",
    "ReadsWithoutQuorum",
    "sends_before_persisting",
    "factory",
    "ReadState",
]
