"""A synchronous network of RaftNodes for scenario tests, after etcd-io/raft's `network`.

Nothing here runs by itself: a test ticks nodes (`tick`, `tick_all`), and messages move
only when it calls `deliver()` or `stabilize()`. After every tick and every delivered
message the touched node's Ready is carried out by the real `process_ready()` (persist ->
send -> apply -> advance), the same function the agent's driver calls.

Pieces:
- `MemoryStorage` keeps *written* and *durable* (synced) state apart; `crash()` keeps only
  the durable part and `restart()` rebuilds the node from it via `PersistentState`.
- `Recorder` is the state machine: it appends the data of applied entries, and can be
  snapshotted and restored.
- `Network` owns nodes, storage, state machines and one FIFO queue of messages. Filters
  (`cut`, `isolate`, `drop`) are checked when a message is delivered; `recover()` clears
  them. A message to or from a crashed node is lost (a crash loses the outbox too).
  Every message sent is kept in `trace`, dropped or not; `held` nodes are driven by hand
  (the test calls `ready()`/`advance()` itself).

Two rules are checked on every run, so every test checks them:
- persistence before acknowledgement: a granted vote or a successful append response
  leaves a node only when its durable storage holds the vote / the entries it promises;
- apply exactly once, in order, only durable entries.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable, Iterable

from nodeagent.raft.core import Config, RaftNode
from nodeagent.raft.messages import (
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    PersistentState,
    ReadState,
    Ready,
    RequestVoteResponse,
    Role,
    Snapshot,
)
from nodeagent.raft.ready import process_ready

__all__ = [
    "MemoryStorage",
    "Network",
    "Recorder",
    "bootstrap_entry",
    "entries_of_terms",
]


# -- storage --------------------------------------------------------------------------------


class _Disk:
    __slots__ = ("hard_state", "snapshot", "entries")

    def __init__(self, hard_state=HardState(), snapshot=None, entries=()):
        self.hard_state: HardState = hard_state
        self.snapshot: Snapshot | None = snapshot
        self.entries: list[Entry] = list(entries)

    def copy(self) -> "_Disk":
        return _Disk(self.hard_state, self.snapshot, self.entries)

    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.meta.index if self.snapshot else 0

    def term(self, index: int) -> int | None:
        if self.snapshot and index == self.snapshot.meta.index:
            return self.snapshot.meta.term
        for e in self.entries:
            if e.index == index:
                return e.term
        return None


class MemoryStorage:
    """What a node has written (``written``) and what an fsync made durable (``durable``).

    ``save`` writes, ``sync`` makes everything written durable, ``crash`` forgets what
    was not synced. A snapshot from a Ready replaces the whole log (the core restored
    from it); ``compact`` folds entries into a snapshot the application made.
    """

    def __init__(self, state: PersistentState | None = None):
        state = state or PersistentState()
        self.durable = _Disk(state.hard_state, state.snapshot, state.entries)
        self.written = self.durable.copy()
        self.saves: list[tuple[HardState | None, tuple[Entry, ...], Snapshot | None]] = []
        self.syncs = 0

    def save(self, hard_state, entries, snapshot) -> None:
        self.saves.append((hard_state, tuple(entries), snapshot))
        w = self.written
        if snapshot is not None:
            w.snapshot = snapshot
            w.entries = []
        if entries:
            first = entries[0].index
            w.entries = [e for e in w.entries if e.index < first]
            expect = w.last_index() + 1
            assert first == expect, f"storage gap: writing {first} after {expect - 1}"
            w.entries.extend(entries)
        if hard_state is not None:
            w.hard_state = hard_state

    def sync(self) -> None:
        self.syncs += 1
        self.durable = self.written.copy()

    def compact(self, snapshot: Snapshot) -> None:
        """Persist a snapshot the application made (temp file, fsync, rename)."""
        for disk in (self.written, self.durable):
            disk.snapshot = snapshot
            disk.entries = [e for e in disk.entries if e.index > snapshot.meta.index]

    def crash(self) -> None:
        self.written = self.durable.copy()

    def persistent_state(self) -> PersistentState:
        d = self.durable
        return PersistentState(d.hard_state, d.snapshot, tuple(d.entries))


# -- state machine --------------------------------------------------------------------------


class Recorder:
    """The replicated state machine: the data of every applied normal entry, in order."""

    def __init__(self, storage: MemoryStorage):
        self._storage = storage
        self.values: list[bytes] = []
        self.applied_index = 0
        self.applied: list[Entry] = []  # every entry applied by this incarnation
        self.restored: list[Snapshot] = []

    def restore(self, snapshot: Snapshot) -> None:
        self.values = [v.encode() for v in json.loads(snapshot.data or b"[]")]
        self.applied_index = snapshot.meta.index
        self.restored.append(snapshot)

    def apply(self, entry: Entry) -> None:
        assert entry.index == self.applied_index + 1, (
            f"applied {entry.index} after {self.applied_index}: not exactly once, in order"
        )
        disk = self._storage.durable
        assert disk.term(entry.index) == entry.term or (
            disk.snapshot is not None and entry.index <= disk.snapshot.meta.index
        ), f"applied entry {entry.index} that is not durable"
        self.applied_index = entry.index
        self.applied.append(entry)
        if entry.kind is EntryKind.NORMAL and entry.data:
            self.values.append(entry.data)

    def snapshot_data(self) -> bytes:
        return json.dumps([v.decode() for v in self.values]).encode()


# -- network --------------------------------------------------------------------------------


class _Outbox:
    def __init__(self, net: "Network", node_id: str):
        self.net, self.id = net, node_id

    def send(self, messages) -> None:
        disk = self.net.storage[self.id].durable
        for m in messages:
            # Persistence before acknowledgement (STYLE.md §1, "msgsAfterAppend").
            if isinstance(m, RequestVoteResponse) and m.granted and not m.pre_vote:
                hs = disk.hard_state
                assert (hs.term, hs.vote) == (m.term, m.to), (
                    f"{self.id} granted its vote in term {m.term} to {m.to} but its durable "
                    f"hard state is {hs}"
                )
            if isinstance(m, AppendEntriesResponse) and m.success:
                assert disk.last_index() >= m.index, (
                    f"{self.id} acknowledged index {m.index} but holds durably only "
                    f"{disk.last_index()}"
                )
        self.net.queue.extend(messages)
        self.net.trace.extend(messages)


Filter = Callable[[object], bool]  # True: drop the message


class Network:
    """N nodes, their storage and state machines, and one queue of messages."""

    def __init__(
        self,
        ids: Iterable[str],
        *,
        priorities: dict[str, int] | None = None,
        learners: Iterable[str] = (),
        seed: int = 0,
        states: dict[str, PersistentState] | None = None,
        **config,
    ):
        ids = list(ids)
        learners = list(learners)
        self.seed = seed
        # These tests were written for etcd's eager commit propagation (followers hear of
        # a commit at once); test_commit_propagation.py covers the lazy default.
        self.config = {"eager_commit": True, **config}
        self.conf = ConfState.of([i for i in ids if i not in learners], learners, priorities)
        self.nodes: dict[str, RaftNode] = {}
        self.storage: dict[str, MemoryStorage] = {}
        self.apps: dict[str, Recorder] = {}
        self.read_states: dict[str, list[ReadState]] = {}
        self.readies: dict[str, list[Ready]] = {}
        self.queue: deque = deque()
        self.trace: list = []  # every message ever sent, in order
        self.dropped: list = []
        self.filters: list[Filter] = []
        self.held: set[str] = set()  # nodes whose Readies the test handles by hand
        self._incarnation: dict[str, int] = {}
        states = states or {}
        for i in ids:
            if i in states:
                self.start(i, state=states[i])
            else:
                self.start(i, bootstrap=self.conf)

    # -- nodes --------------------------------------------------------------------------

    def start(
        self,
        node_id: str,
        *,
        state: PersistentState | None = None,
        bootstrap: ConfState | None = None,
        **config,
    ) -> RaftNode:
        """Start a node from ``state`` (or empty, as a late joiner when no ``bootstrap``)."""
        cfg = Config(node_id, **{**self.config, **config})
        inc = self._incarnation[node_id] = self._incarnation.get(node_id, -1) + 1
        storage = self.storage[node_id] = MemoryStorage(state)
        app = self.apps[node_id] = Recorder(storage)
        if state is not None and state.snapshot is not None:
            app.restore(state.snapshot)  # the driver restores its state machine on start
        rng = random.Random(f"{self.seed}/{node_id}/{inc}")
        node = RaftNode(cfg, state, rng=rng, bootstrap=bootstrap)
        self.nodes[node_id] = node
        self.read_states.setdefault(node_id, [])
        self.readies.setdefault(node_id, [])
        self.process(node_id)
        return node

    def crash(self, node_id: str) -> None:
        """Power cut: the node stops, storage keeps only what was synced."""
        del self.nodes[node_id]
        self.storage[node_id].crash()

    def restart(self, node_id: str) -> RaftNode:
        state = self.storage[node_id].persistent_state()
        return self.start(node_id, state=state)

    def __getitem__(self, node_id: str) -> RaftNode:
        return self.nodes[node_id]

    def process(self, node_id: str) -> None:
        """Carry out the node's Readies until it has none (unless the test holds them)."""
        node = self.nodes.get(node_id)
        if node is None or node_id in self.held:
            return
        while True:
            rd = process_ready(node, self.storage[node_id], _Outbox(self, node_id), self.apps[node_id])
            if rd is None:
                return
            self.readies[node_id].append(rd)
            self.read_states[node_id].extend(rd.read_states)

    # -- time ---------------------------------------------------------------------------

    def tick(self, node_id: str, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[node_id].tick()
            self.process(node_id)

    def tick_all(self, n: int = 1) -> None:
        """n rounds of: every live node ticks once, then the network stabilizes."""
        for _ in range(n):
            for i in sorted(self.nodes):
                self.tick(i)
            self.stabilize()

    def campaign(self, node_id: str) -> None:
        """Tick one node until its election timer fires, then let the election play out."""
        node = self.nodes[node_id]
        self.tick(node_id, node.randomized_election_timeout - node.election_elapsed)
        self.stabilize()

    def elect(self, node_id: str, rounds: int = 5) -> None:
        """Campaign until the node leads (a first round may only teach it a newer term)."""
        for _ in range(rounds):
            self.campaign(node_id)
            if self.nodes[node_id].role is Role.LEADER:
                return
        raise AssertionError(f"{node_id} did not win in {rounds} elections: {self.roles()}")

    # -- messages -----------------------------------------------------------------------

    def _blocked(self, m) -> bool:
        return m.to not in self.nodes or m.frm not in self.nodes or any(f(m) for f in self.filters)

    def deliver(self, n: int | None = None) -> list:
        """Deliver up to n queued messages (all, until quiet, if None); return them."""
        out = []
        steps = 0
        while self.queue and (n is None or len(out) < n):
            steps += 1
            assert steps < 200_000, "network did not quiesce"
            m = self.queue.popleft()
            if self._blocked(m):
                self.dropped.append(m)
                continue
            self.nodes[m.to].step(m)
            self.process(m.to)
            out.append(m)
        return out

    def stabilize(self) -> list:
        return self.deliver()

    def inject(self, *messages) -> None:
        """Put hand-made messages on the wire (as if a peer had sent them)."""
        self.queue.extend(messages)
        self.trace.extend(messages)

    def pending(self, kind: type | tuple = object, to: str | None = None, frm: str | None = None):
        return [
            m for m in self.queue
            if isinstance(m, kind) and (to is None or m.to == to) and (frm is None or m.frm == frm)
        ]

    def sent(self, kind: type | tuple = object, to: str | None = None, frm: str | None = None):
        return [
            m for m in self.trace
            if isinstance(m, kind) and (to is None or m.to == to) and (frm is None or m.frm == frm)
        ]

    def cut(self, a: str, b: str) -> None:
        self.filters.append(lambda m: {m.frm, m.to} == {a, b})

    def isolate(self, a: str) -> None:
        self.filters.append(lambda m: a in (m.frm, m.to))

    def drop(self, predicate: Filter) -> None:
        self.filters.append(predicate)

    def recover(self) -> None:
        self.filters.clear()

    # -- client -------------------------------------------------------------------------

    def propose(self, node_id: str, data: bytes) -> int:
        index = self.nodes[node_id].propose(data)
        self.process(node_id)
        return index

    def propose_conf_change(self, node_id: str, cc: ConfChange) -> int:
        index = self.nodes[node_id].propose_conf_change(cc)
        self.process(node_id)
        return index

    def read_index(self, node_id: str, ctx: bytes) -> None:
        self.nodes[node_id].read_index(ctx)
        self.process(node_id)

    def snapshot(self, node_id: str) -> Snapshot:
        """The application snapshots its state at the applied index; the log is compacted."""
        snap = self.nodes[node_id].create_snapshot(self.apps[node_id].snapshot_data())
        self.storage[node_id].compact(snap)
        return snap

    # -- views --------------------------------------------------------------------------

    def leaders(self) -> list[str]:
        return sorted(i for i, n in self.nodes.items() if n.role is Role.LEADER)

    def leader(self) -> str:
        """The leader of the highest term (a deposed leader may not know it yet)."""
        ls = self.leaders()
        assert ls, "no leader"
        return max(ls, key=lambda i: self.nodes[i].term)

    def roles(self) -> dict[str, str]:
        return {i: n.role.value for i, n in sorted(self.nodes.items())}

    def terms(self) -> dict[str, int]:
        return {i: n.term for i, n in sorted(self.nodes.items())}

    def log_terms(self, node_id: str) -> list[int]:
        log = self.nodes[node_id].log
        return [log.term(i) for i in range(log.first_index(), log.last_index() + 1)]


# -- building logs by hand -------------------------------------------------------------------


def bootstrap_entry(conf: ConfState) -> Entry:
    """Entry 1 of every initial member's log, as the core writes it."""
    cc = ConfChange(ConfChangeOp.BOOTSTRAP, bootstrap=conf)
    return Entry(1, 1, cc.encode(), EntryKind.CONF_CHANGE)


def entries_of_terms(conf: ConfState, terms: list[int], tag: str = "") -> tuple[Entry, ...]:
    """A log whose entry i has term terms[i-1]; entry 1 is the bootstrap (term 1)."""
    assert terms[0] == 1
    ents = [bootstrap_entry(conf)]
    for i, t in enumerate(terms[1:], start=2):
        ents.append(Entry(t, i, f"{tag}{i}@{t}".encode()))
    return tuple(ents)
