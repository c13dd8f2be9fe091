"""The Raft log as the core sees it: a snapshot boundary, then entries.

Indexes start at 1. ``offset`` is the index of the last entry dropped from memory (0 when
none was), so the entries in memory are ``offset+1 .. last_index``. ``snapshot`` is the
newest snapshot; its index is at or after ``offset``: after the application makes a
snapshot the log keeps a tail of entries behind it, so a follower that is only a little
behind catches up with appends instead of a whole snapshot.
Entries up to ``stable`` have been persisted (the driver said so via ``advance``);
entries after it are *unstable* and are handed out in the next Ready.

Invariants kept here:
- ``applied <= committed <= last_index``, ``offset <= committed``;
- a committed entry is never overwritten (``maybe_append`` raises if asked to);
- ``stable`` only moves back when a conflict truncates unstable or stable entries.
"""

from __future__ import annotations

from collections.abc import Sequence

from .messages import Entry, Snapshot


class LogInvariantError(AssertionError):
    """The core was asked to break a Raft invariant: a bug, never a peer's fault."""


class RaftLog:
    def __init__(
        self,
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        committed: int = 0,
    ):
        self.snapshot: Snapshot | None = snapshot
        self.offset = snapshot.meta.index if snapshot else 0
        self.offset_term = snapshot.meta.term if snapshot else 0
        self.entries: list[Entry] = list(entries)
        for i, e in enumerate(self.entries):
            if e.index != self.offset + 1 + i:
                raise LogInvariantError(
                    f"entries not contiguous after the snapshot at {self.offset}: "
                    f"position {i} holds index {e.index}"
                )
        self.stable = self.last_index()
        self.committed = max(self.offset, min(committed, self.last_index()))
        self.applied = self.offset
        # A snapshot received from the leader that must be persisted and restored.
        self.pending_snapshot: Snapshot | None = None

    # -- queries ----------------------------------------------------------------------

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """The term of ``index``, or None if it is compacted away or beyond the log."""
        if index == self.offset:
            return self.offset_term
        if index < self.offset or index > self.last_index():
            return None
        return self.entries[index - self.offset - 1].term

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.offset - 1]

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """§5.4.1: a candidate's log is at least as up to date as ours."""
        my_term = self.last_term()
        return last_term > my_term or (last_term == my_term and last_index >= self.last_index())

    def slice(self, lo: int, hi: int, max_count: int, max_bytes: int) -> list[Entry]:
        """Entries lo..hi-1, at most ``max_count`` and about ``max_bytes`` (at least one)."""
        if lo <= self.offset:
            raise LogInvariantError(f"slice from {lo} but the log is compacted to {self.offset}")
        hi = min(hi, self.last_index() + 1, lo + max_count)
        out = self.entries[lo - self.offset - 1 : hi - self.offset - 1]
        if max_bytes and len(out) > 1:
            size = 0
            for n, e in enumerate(out):
                size += len(e.data) + 24
                if size > max_bytes and n > 0:
                    return out[:n]
        return out

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or that we lack); 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, with its term.

        Used by both sides of a rejected append to skip a whole conflicting term at once.
        Stops at the snapshot boundary (term 0 there means "unknown, probe from here").
        """
        index = min(index, self.last_index())
        while index > self.offset:
            t = self.term(index)
            assert t is not None
            if t <= term:
                return index, t
            index -= 1
        return index, (self.offset_term if index == self.offset else 0)

    def unstable_entries(self) -> tuple[Entry, ...]:
        if self.stable >= self.last_index():
            return ()
        return tuple(self.entries[self.stable - self.offset :])

    def has_next_committed(self) -> bool:
        return self.pending_snapshot is None and self.committed > self.applied

    def next_committed(self, max_count: int = 1 << 30) -> tuple[Entry, ...]:
        if not self.has_next_committed():
            return ()
        lo = self.applied + 1
        hi = min(self.committed, lo + max_count - 1)
        return tuple(self.entries[lo - self.offset - 1 : hi - self.offset])

    # -- changes ----------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> int:
        """Append after truncating everything at or after ``entries[0].index``."""
        if not entries:
            return self.last_index()
        first = entries[0].index
        if first <= self.committed:
            raise LogInvariantError(
                f"would overwrite committed entry {first} (committed {self.committed})"
            )
        if first > self.last_index() + 1:
            raise LogInvariantError(f"gap: appending {first} after {self.last_index()}")
        del self.entries[first - self.offset - 1 :]
        self.entries.extend(entries)
        self.stable = min(self.stable, first - 1)
        return self.last_index()

    def maybe_append(
        self, prev_index: int, prev_term: int, committed: int, entries: Sequence[Entry]
    ) -> int | None:
        """A follower's handling of AppendEntries. Returns the last index now known to
        match the leader, or None if the log does not contain (prev_index, prev_term)."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            if conflict <= self.committed:
                raise LogInvariantError(
                    f"leader's entry {conflict} conflicts with committed {self.committed}"
                )
            self.append(entries[conflict - prev_index - 1 :])
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            if index > self.last_index():
                raise LogInvariantError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index < self.applied or index > self.committed:
            raise LogInvariantError(f"applied {index} outside [{self.applied}, {self.committed}]")
        self.applied = index

    def stable_to(self, index: int) -> None:
        self.stable = max(self.stable, min(index, self.last_index()))

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the log with a snapshot received from the leader."""
        self.snapshot = snapshot
        self.offset = snapshot.meta.index
        self.offset_term = snapshot.meta.term
        self.entries = []
        self.committed = snapshot.meta.index
        self.stable = snapshot.meta.index
        self.pending_snapshot = snapshot

    def snapshot_applied(self) -> None:
        snap = self.pending_snapshot
        if snap is not None:
            self.applied = max(self.applied, snap.meta.index)
            self.pending_snapshot = None

    def hold_snapshot_as(self, snapshot: Snapshot) -> bool:
        cur = self.snapshot
        if cur is None or self.pending_snapshot is not None or cur.meta != snapshot.meta:
            return False
        self.snapshot = snapshot
        return True

    def snapshot_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot else 0

    def compact(self, snapshot: Snapshot, keep: int = 0) -> None:
        """The application made ``snapshot``: adopt it and drop the entries it covers,
        except the last ``keep`` of them."""
        index = snapshot.meta.index
        if index <= self.snapshot_index():
            return
        if index > self.applied:
            raise LogInvariantError(f"compact to {index} beyond applied {self.applied}")
        self.snapshot = snapshot
        new_offset = max(self.offset, index - keep)
        if new_offset > self.offset:
            new_term = self.term(new_offset)
            assert new_term is not None
            del self.entries[: new_offset - self.offset]
            self.offset = new_offset
            self.offset_term = new_term
