"""process_ready(): the one place that turns a Ready into effects, in Raft's order.

Both the trio driver and the deterministic simulator carry out a Ready with these same
functions, so the order that makes Raft safe is written once:

1. persist: write the snapshot (if one arrived), then entries and hard state;
2. send the leader's AppendEntries at once, before the fsync: the leader's disk write
   and the followers' run in parallel (Raft thesis 10.2.1). Safe because the leader
   counts itself towards a commit only for entries it has persisted (``advance``), and
   an AppendEntries promises nothing about the sender's disk;
3. apply the committed entries that were already durable here before this Ready (index
   below its first new entry), so their clients need not wait for this batch's fsync;
4. one fsync when ``must_sync`` (group commit: a whole batch of proposals costs one);
5. send every other message only now: a vote or an append acknowledgement never
   promises data the node could lose in a crash;
6. restore the state machine from the snapshot, then apply the remaining committed
   entries; read states are handed to the caller, to serve once applied reaches them;
7. advance: tell the core all of the above is done.

``begin_ready`` does 1-3 and ``finish_ready`` 5-7; the caller does 4 in between (the
trio driver in its own task while the disk is fast, in a worker thread while it is slow,
so its event loop keeps serving while the disk works).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from .core import RaftNode
from .messages import AppendEntries, Entry, HardState, Message, Ready, Snapshot


class Storage(Protocol):
    def save(
        self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None
    ) -> None: ...

    def sync(self) -> None: ...


class Outbox(Protocol):
    def send(self, messages: Sequence[Message]) -> None: ...


class StateMachine(Protocol):
    def restore(self, snapshot: Snapshot) -> None: ...

    def apply(self, entry: Entry) -> None: ...


def _term_and_vote_durable(node: RaftNode, rd: Ready) -> bool:
    """False when this Ready changes the term or vote (a node that just won an election
    in one step): then its AppendEntries must wait for the fsync like everything else,
    or a crash could let it lead the same term twice with different entries."""
    hs = rd.hard_state
    prev = node.durable_hard_state
    return hs is None or (hs.term == prev.term and hs.vote == prev.vote)


def _replace_messages(rd: Ready, messages: list[Message]) -> Ready:
    return dataclasses.replace(rd, messages=tuple(messages))


def begin_ready(node: RaftNode, storage: Storage, outbox: Outbox, state: StateMachine) -> Ready | None:
    """Steps 1-3 of one Ready, if the node has one; the caller then syncs when
    ``rd.must_sync`` and calls :func:`finish_ready`."""
    if not node.has_ready():
        return None
    rd = node.ready()
    if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
        storage.save(rd.hard_state, rd.entries, rd.snapshot)
    if rd.messages and rd.must_sync and _term_and_vote_durable(node, rd):
        early = [m for m in rd.messages if type(m) is AppendEntries]
        if early:
            outbox.send(early)
            rd = _replace_messages(rd, [m for m in rd.messages if type(m) is not AppendEntries])
    if rd.snapshot is None and rd.committed_entries:
        first_new = rd.entries[0].index if rd.entries else None
        for entry in rd.committed_entries:
            if first_new is not None and entry.index >= first_new:
                break
            state.apply(entry)
    return rd


def finish_ready(node: RaftNode, rd: Ready, outbox: Outbox, state: StateMachine) -> Ready:
    """Steps 5-7, after the caller synced (when ``rd.must_sync``)."""
    if rd.messages:
        outbox.send(rd.messages)
    if rd.snapshot is not None:
        state.restore(rd.snapshot)
        for entry in rd.committed_entries:
            state.apply(entry)
    elif rd.committed_entries:
        first_new = rd.entries[0].index if rd.entries else None
        for entry in rd.committed_entries:
            if first_new is not None and entry.index >= first_new:
                state.apply(entry)
    node.advance(rd)
    return rd


def process_ready(
    node: RaftNode, storage: Storage, outbox: Outbox, state: StateMachine
) -> Ready | None:
    """Carry out one Ready, if the node has one, syncing in the calling thread. Returns
    it (for read states and soft state), or None when there was nothing to do."""
    rd = begin_ready(node, storage, outbox, state)
    if rd is None:
        return None
    if rd.must_sync:
        storage.sync()
    return finish_ready(node, rd, outbox, state)
