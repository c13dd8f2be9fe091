"""process_ready(): the one place that turns a Ready into effects, in Raft's order.

Both the trio driver and the deterministic simulator call this same function, so the
order that makes Raft safe is written once:

1. persist: the snapshot (if one arrived), then entries and hard state; one fsync when
   ``must_sync`` (group commit: a whole batch of proposals costs one fsync);
2. send: messages leave only after step 1, so a vote or an append acknowledgement never
   promises data the node could lose in a crash;
3. apply: restore the state machine from the snapshot, then apply committed entries;
   read states are handed to the caller, to serve once applied reaches their index;
4. advance: tell the core all of the above is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .core import RaftNode
from .messages import Entry, HardState, Message, Ready, Snapshot


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


def process_ready(
    node: RaftNode, storage: Storage, outbox: Outbox, state: StateMachine
) -> Ready | None:
    """Carry out one Ready, if the node has one. Returns it (for read states and soft
    state), or None when there was nothing to do."""
    if not node.has_ready():
        return None
    rd = node.ready()
    if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
        storage.save(rd.hard_state, rd.entries, rd.snapshot)
    if rd.must_sync:
        storage.sync()
    if rd.messages:
        outbox.send(rd.messages)
    if rd.snapshot is not None:
        state.restore(rd.snapshot)
    for entry in rd.committed_entries:
        state.apply(entry)
    node.advance(rd)
    return rd
