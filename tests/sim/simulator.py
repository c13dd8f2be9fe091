"""A deterministic simulator for the Raft core: one seed decides everything.

The simulation is a single event loop over a virtual clock (milliseconds). Events are
node ticks, message deliveries, client proposals and reads, and nemesis actions. Each
seed draws its own fault profile (swarm testing, after TigerBeetle's VOPR and
FoundationDB): message drop, duplication and delay ranges, how often nodes crash or
pause, which partitions appear (halves, an isolated leader, bridges, rings), membership
changes, leadership transfers, snapshot frequency, and fsyncs that crash the node
(BUGGIFY: the disk keeps written and synced data apart, and a crash keeps only what was
synced).

Every node runs the real ``RaftNode`` and the real ``process_ready`` (the same code the
agent runs). After every event the touched node is checked:

- Election Safety: at most one leader per term, ever.
- Log Matching: entries with the same index and term have the same chained hash (so the
  same data and the same prefix), across all nodes and all time.
- Leader Completeness: a new leader's log holds every committed entry.
- State Machine Safety: every node applies the same entry at each index (a chained hash
  of the applied sequence is compared per index), and commits never disagree.
- Persistence before acknowledgement: a vote grant or append acknowledgement leaves a
  node only if its synced disk holds what it promises.
- ReadIndex safety: a read index is at least the commit index known when the read began.

Then a liveness phase heals everything and requires, within ``LIVENESS_BOUND_MS`` of
virtual time, one leader and a new proposal applied on every live voter.

A failure raises ``SimFailure`` whose message ends with the command that replays it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.raft.core import Config, RaftNode
from nodeagent.raft.messages import (
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfState,
    Entry,
    HardState,
    PersistentState,
    RaftError,
    RequestVoteResponse,
    Role,
    Snapshot,
)
from nodeagent.raft.ready import process_ready as real_process_ready

TICK_MS = 10  # a node ticks every ~10 virtual ms
ELECTION_TICK = 10  # so an election timeout is 100-200 virtual ms
HEARTBEAT_TICK = 1
# After the network heals (no loss, one-way delays of 1-10 ms, a tenth of the base election
# timeout) and every node is back, one leader must be elected and a new proposal applied on
# every live voter within this much virtual time: 40 base election
# timeouts. It covers the randomized election itself, a priority handover (which waits a
# full election timeout, then transfers), a learner promotion in flight, and catching up
# from a snapshot. The worst case seen over 10,000 seeds is recorded in docs/BENCHMARKS.md.
LIVENESS_BOUND_MS = 40 * ELECTION_TICK * TICK_MS


class SimFailure(AssertionError):
    pass


class SimCrash(Exception):
    """Raised inside the simulated fsync to model a power cut in the middle of a Ready."""


def chain(prev: bytes, term: int, data: bytes, kind: int) -> bytes:
    h = hashlib.blake2b(prev, digest_size=12)
    h.update(term.to_bytes(8, "little"))
    h.update(kind.to_bytes(1, "little"))
    h.update(data)
    return h.digest()


# -- the simulated disk -------------------------------------------------------------------


class SimDisk:
    """Durable state plus writes that are not yet synced. ``crash()`` drops the latter."""

    def __init__(self, sim: "Simulation", node_id: str):
        self.sim = sim
        self.node_id = node_id
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.snapshot_chain = b""  # chain hash of the snapshot's last entry
        self.entries: list[tuple[Entry, bytes]] = []  # durable (entry, chain hash)
        self.pending: list[tuple] = []  # unsynced writes, in order
        self.syncs = 0

    # -- the Storage protocol used by process_ready --
    def save(self, hard_state, entries, snapshot) -> None:
        if snapshot is not None:
            self.pending.append(("snap", snapshot))
        if entries:
            self.pending.append(("entries", tuple(entries)))
        if hard_state is not None:
            self.pending.append(("hs", hard_state))

    def sync(self) -> None:
        if self.sim.rng_disk.random() < self.sim.p.fsync_crash:
            raise SimCrash(self.node_id)
        for op in self.pending:
            kind, val = op
            if kind == "hs":
                self.hard_state = val
            elif kind == "snap":
                self.snapshot = val
                self.snapshot_chain = self.sim.chain_at(val.meta.index, val.meta.term)
                self.entries = []
            else:
                self._append(val)
        self.pending = []
        self.syncs += 1

    def _append(self, ents: tuple[Entry, ...]) -> None:
        first = ents[0].index
        off = self.snapshot.meta.index if self.snapshot else 0
        del self.entries[max(0, first - off - 1) :]
        prev = self.entries[-1][1] if self.entries else self.snapshot_chain
        for e in ents:
            if e.index <= off:
                continue
            prev = chain(prev, e.term, e.data, int(e.kind))
            self.entries.append((e, prev))

    # -- other durable operations --
    def compact(self, snapshot: Snapshot, snapshot_chain: bytes) -> None:
        """The application's own snapshot: written durably at once (temp file + rename)."""
        idx = snapshot.meta.index
        off = self.snapshot.meta.index if self.snapshot else 0
        if idx <= off:
            return
        self.entries = [(e, c) for e, c in self.entries if e.index > idx]
        self.snapshot = snapshot
        self.snapshot_chain = snapshot_chain

    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1][0].index
        return self.snapshot.meta.index if self.snapshot else 0

    def crash(self) -> None:
        self.pending = []

    def persistent_state(self) -> PersistentState:
        return PersistentState(
            self.hard_state, self.snapshot, tuple(e for e, _ in self.entries)
        )


# -- per-node mirror of the in-memory log, and the state machine ---------------------------


class LogMirror:
    """Chain hashes of a node's log as it writes it (what the node holds in memory)."""

    def __init__(self, base_index: int, base_chain: bytes, entries: list[tuple[Entry, bytes]]):
        self.base_index = base_index
        self.base_chain = base_chain
        self.chains: list[bytes] = [c for _, c in entries]
        self.terms: list[int] = [e.term for e, _ in entries]

    def last_index(self) -> int:
        return self.base_index + len(self.chains)

    def chain_at(self, index: int) -> bytes | None:
        if index == self.base_index:
            return self.base_chain
        if index < self.base_index or index > self.last_index():
            return None
        return self.chains[index - self.base_index - 1]

    def append(self, ents) -> list[tuple[int, int, bytes]]:
        first = ents[0].index
        if first <= self.base_index:
            raise SimFailure(f"entries at {first} written below the snapshot {self.base_index}")
        del self.chains[first - self.base_index - 1 :]
        del self.terms[first - self.base_index - 1 :]
        if first != self.last_index() + 1:
            raise SimFailure(f"gap in the log: wrote {first} after {self.last_index()}")
        prev = self.chain_at(first - 1)
        out = []
        for e in ents:
            prev = chain(prev, e.term, e.data, int(e.kind))
            self.chains.append(prev)
            self.terms.append(e.term)
            out.append((e.index, e.term, prev))
        return out

    def restore(self, index: int, c: bytes) -> None:
        self.base_index, self.base_chain = index, c
        self.chains, self.terms = [], []

    def compact(self, index: int) -> None:
        if index <= self.base_index:
            return
        c = self.chain_at(index)
        del self.chains[: index - self.base_index]
        del self.terms[: index - self.base_index]
        self.base_index, self.base_chain = index, c


class SimStateMachine:
    """Applies entries into a chained hash, so equal hashes mean equal histories."""

    def __init__(self, sim: "Simulation", node_id: str):
        self.sim = sim
        self.node_id = node_id
        self.index = 0
        self.hash = b""

    def restore(self, snapshot: Snapshot) -> None:
        idx = int.from_bytes(snapshot.data[:8], "little")
        h = snapshot.data[8:]
        if idx != snapshot.meta.index:
            raise SimFailure(f"{self.node_id}: snapshot data for {idx} in meta {snapshot.meta.index}")
        self.index, self.hash = idx, h
        self.sim.check_applied(self.node_id, idx, h)

    def apply(self, entry: Entry) -> None:
        if entry.index != self.index + 1:
            raise SimFailure(
                f"{self.node_id}: applied index {entry.index} after {self.index} (gap or repeat)"
            )
        self.index = entry.index
        self.hash = chain(self.hash, 0, entry.data, int(entry.kind))
        self.sim.check_applied(self.node_id, self.index, self.hash)

    def snapshot_bytes(self) -> bytes:
        return self.index.to_bytes(8, "little") + self.hash


# -- the network ----------------------------------------------------------------------------


class SimOutbox:
    def __init__(self, sim: "Simulation", node_id: str):
        self.sim = sim
        self.node_id = node_id

    def send(self, messages) -> None:
        for m in messages:
            self.sim.check_sent(self.node_id, m)
            self.sim.net_send(m)


# -- swarm parameters -----------------------------------------------------------------------


@dataclass
class Profile:
    """The fault profile of one seed. Every field is drawn from the seed."""

    nodes: int
    drop: float
    dup: float
    delay_min: int
    delay_max: int
    crash_every: int  # mean ms between crashes (0: never)
    kill_leader_every: int  # mean ms between crashes aimed at the current leader
    pause_every: int
    partition_every: int
    conf_every: int
    transfer_every: int
    read_every: int
    propose_every: int
    snapshot_interval: int
    compaction_keep: int
    max_entries_per_msg: int
    max_inflight: int
    fsync_crash: float
    priorities: bool

    # Leader churn: the leader dies about every 100 ms while appends carry one entry at a
    # time, so new leaders often crash half-way through repairing followers. This is the
    # profile that reaches the Figure 8 corner (an earlier term's entry on a majority, the
    # new leader's own entry not yet).
    CHURN = dict(kill_leader_every=100, max_entries_per_msg=1, max_inflight=1,
                 crash_every=0, pause_every=0, partition_every=0, conf_every=0,
                 transfer_every=0, propose_every=10, drop=0.05, dup=0.0,
                 delay_min=1, delay_max=20)

    @classmethod
    def draw(cls, rng: random.Random, nodes: int | None = None) -> "Profile":
        def maybe(mean: int, p_on: float = 0.7) -> int:
            return mean if rng.random() < p_on else 0

        delay_min = rng.choice([0, 1, 2, 5])
        churn = rng.random() < 0.15
        p = cls(
            nodes=nodes or rng.choice([3, 5, 7]),
            drop=rng.choice([0.0, 0.01, 0.05, 0.15, 0.3]),
            dup=rng.choice([0.0, 0.01, 0.05, 0.15]),
            delay_min=delay_min,
            delay_max=delay_min + rng.choice([1, 5, 20, 60, 150]),
            crash_every=maybe(rng.choice([300, 800, 2000])),
            kill_leader_every=maybe(rng.choice([150, 400, 1000]), 0.5),
            pause_every=maybe(rng.choice([500, 1500]), 0.5),
            partition_every=maybe(rng.choice([300, 800, 2000])),
            conf_every=maybe(rng.choice([500, 1500]), 0.5),
            transfer_every=maybe(rng.choice([400, 1500]), 0.4),
            read_every=rng.choice([20, 60, 200]),
            propose_every=rng.choice([5, 20, 60]),
            snapshot_interval=rng.choice([5, 20, 100, 1000]),
            compaction_keep=rng.choice([0, 100, 500]),
            # BUGGIFY: tiny appends and a window of one make partial replication (and so
            # the Figure 8 corner) common instead of rare.
            max_entries_per_msg=rng.choice([1, 2, 16, 64]),
            max_inflight=rng.choice([1, 4, 16]),
            fsync_crash=rng.choice([0.0, 0.0, 0.002, 0.01]),
            priorities=rng.random() < 0.6,
        )
        if churn:
            for k, v in cls.CHURN.items():
                setattr(p, k, v)
        return p


# -- the simulation -------------------------------------------------------------------------


@dataclass
class SimNode:
    id: str
    disk: SimDisk
    raft: RaftNode | None = None
    sm: SimStateMachine | None = None
    mirror: LogMirror | None = None
    outbox: SimOutbox | None = None
    alive: bool = False
    paused_until: int = 0
    status: str = "member"  # member | joining | leaving | gone
    change: tuple[int, int] | None = None  # (index, term) of the pending add or removal
    last_role: Role = Role.FOLLOWER
    last_commit: int = 0
    held: list = field(default_factory=list)  # messages that arrived while paused
    incarnation: int = 0
    background: tuple | None = None  # (incarnation, index, data, due step): a snapshot in flight


def default_node_factory(cfg: Config, state: PersistentState, rng, bootstrap):
    return RaftNode(cfg, state, rng=rng, bootstrap=bootstrap)


class Simulation:
    def __init__(
        self,
        seed: int,
        steps: int = 2000,
        nodes: int | None = None,
        node_factory: Callable = default_node_factory,
        process_ready: Callable = real_process_ready,
        liveness: bool = True,
        replay_hint: str = "",
        profile: dict | None = None,
    ):
        self.seed = seed
        self.steps = steps
        self.node_factory = node_factory
        self.process_ready = process_ready
        self.liveness = liveness
        self.replay_hint = replay_hint
        master = random.Random(seed)
        self.p = Profile.draw(master, nodes)
        for k, v in (profile or {}).items():
            setattr(self.p, k, v)  # a test pins part of the fault profile
        # Separate streams, so changing how often one kind of event happens does not
        # shift every other random decision.
        self.rng_net = random.Random(master.random())
        self.rng_nemesis = random.Random(master.random())
        self.rng_client = random.Random(master.random())
        self.rng_disk = random.Random(master.random())
        self.rng_nodes = random.Random(master.random())
        # Background snapshots (as the agent's driver takes them): the state is captured at
        # applied = A and adopted with create_snapshot(data, index=A) some steps later,
        # after the node went on (or was overtaken by a snapshot from the leader, a
        # membership change, a crash). Its own stream, seeded apart from ``master``, so the
        # other decisions of a seed stay as they were.
        self.rng_snap = random.Random(f"{seed}/background-snapshots")
        self.background_snapshots = self.rng_snap.random() < 0.5
        # How a leader tells followers of a new commit index: at once (eager) or with the
        # next append or heartbeat (lazy, the agents' default). Half the seeds each; its own
        # stream too.
        self.eager_commit = random.Random(f"{seed}/eager-commit").random() < 0.5
        # The agent tells a follower when the connection from its leader ends (a killed
        # process's kernel closes it): RaftNode.leader_lost. Half the seeds: after a
        # crash, each live peer hears of it after a network delay, and now and then a
        # follower hears it of a leader that is alive (a link that broke). Its own stream.
        self.rng_lost = random.Random(f"{seed}/leader-lost")
        self.leader_lost_notices = self.rng_lost.random() < 0.5
        self.now = 0
        self.seq = 0
        self.events: list = []
        self.step_no = 0
        self.trace: list[str] = []
        self.nodes: dict[str, SimNode] = {}
        self.next_id = 1
        self.blocked: set[tuple[str, str]] = set()
        self.partition_desc = "none"
        # global knowledge for the invariants
        self.leader_of_term: dict[int, str] = {}
        self.chain_of: dict[tuple[int, int], bytes] = {}  # (index, term) -> chain hash
        self.committed_chain: dict[int, bytes] = {}
        self.max_committed = 0
        self.leader_commit: dict[int, int] = {}  # term -> highest index its leader committed
        self.applied_hash: dict[int, bytes] = {}
        self.reads: dict[bytes, int] = {}  # ctx -> max committed when the read began
        self.read_seq = 0
        self.proposed = 0
        self.stats = {"elections": 0, "crashes": 0, "pauses": 0, "partitions": 0,
                      "conf_changes": 0, "transfers": 0, "snapshots": 0, "snapshots_dropped": 0, "reads_ok": 0,
                      "max_commit": 0, "liveness_ms": 0, "fsync_crashes": 0, "early_campaigns": 0}

        ids = [self._new_id() for _ in range(self.p.nodes)]
        prios = {n: (self.rng_nodes.choice([0, 1, 1, 2, 3]) if self.p.priorities else 1) for n in ids}
        if all(p == 0 for p in prios.values()):
            prios[ids[0]] = 1
        self.bootstrap = ConfState.of(ids, priorities=prios)
        for n in ids:
            self.nodes[n] = SimNode(n, SimDisk(self, n))
            self._start(n, bootstrap=self.bootstrap)
            self._schedule(self.rng_nodes.randrange(TICK_MS), ("tick", n, 1))
        self._schedule_nemesis()
        if self.leader_lost_notices:
            self._schedule(self.rng_lost.randint(200, 800), ("spurious_lost",))

    # == plumbing ==========================================================================

    def fail(self, what: str) -> None:
        tail = "\n".join(self.trace[-25:])
        raise SimFailure(
            f"seed {self.seed}: step {self.step_no} t={self.now}ms: {what}\n"
            f"profile: {self.p}; snapshots: {'background' if self.background_snapshots else 'inline'}; "
            f"commit: {'eager' if self.eager_commit else 'lazy'}\nlast events:\n{tail}\n"
            f"replay: {self.replay_hint or f'python -m tests.sim --seed {self.seed} --steps {self.steps}'}"
        )

    def _new_id(self) -> str:
        n = f"n{self.next_id}"
        self.next_id += 1
        return n

    def _schedule(self, delay: int, ev: tuple) -> None:
        self.seq += 1
        heapq.heappush(self.events, (self.now + delay, self.seq, ev))

    def _log(self, s: str) -> None:
        self.trace.append(f"[{self.now}] {s}")
        if len(self.trace) > 400:
            del self.trace[:200]

    def _cfg(self, n: str) -> Config:
        return Config(n, election_tick=ELECTION_TICK, heartbeat_tick=HEARTBEAT_TICK,
                      max_inflight=self.p.max_inflight,
                      max_entries_per_msg=self.p.max_entries_per_msg,
                      compaction_keep=self.p.compaction_keep,
                      eager_commit=self.eager_commit)

    def _start(self, n: str, bootstrap: ConfState | None = None) -> None:
        sn = self.nodes[n]
        state = sn.disk.persistent_state()
        rng = random.Random(self.rng_nodes.random())
        try:
            sn.raft = self.node_factory(self._cfg(n), state, rng, bootstrap)
        except RaftError as e:
            self.fail(f"{n} failed to restart: {e}")
        sn.sm = SimStateMachine(self, n)
        if state.snapshot is not None:
            sn.sm.restore(state.snapshot)
        base = state.snapshot.meta.index if state.snapshot else 0
        sn.mirror = LogMirror(base, sn.disk.snapshot_chain, sn.disk.entries)
        sn.outbox = SimOutbox(self, n)
        sn.alive = True
        sn.paused_until = 0
        sn.held = []
        sn.incarnation += 1
        sn.last_role = Role.FOLLOWER
        sn.last_commit = sn.raft.log.committed
        self._after(n)

    def _bootstrap_for(self, n: str) -> ConfState | None:
        """Like the agent: an initial member always passes the initial membership; it is
        used only if the disk is empty (the node crashed before its first fsync)."""
        return self.bootstrap if n in self.bootstrap.members else None

    def _crash(self, n: str) -> None:
        sn = self.nodes[n]
        if not sn.alive:
            return
        sn.alive = False
        sn.disk.crash()
        sn.raft = None
        sn.held = []
        self.stats["crashes"] += 1
        self._log(f"crash {n}")
        if self.leader_lost_notices:
            for other in self.nodes:
                if other != n:
                    d = self.rng_lost.randint(self.p.delay_min, self.p.delay_max)
                    self._schedule(d, ("lost", n, other))

    def _leader_lost(self, frm: str, to: str) -> None:
        sn = self.nodes.get(to)
        if sn is None or not sn.alive or sn.paused_until > self.now or (frm, to) in self.blocked:
            return
        if sn.raft.leader_lost(frm):
            self.stats["early_campaigns"] += 1
            self._log(f"{to} lost its leader {frm}'s connection")
            self._after(to)

    def chain_at(self, index: int, term: int) -> bytes:
        if index == 0:
            return b""
        c = self.chain_of.get((index, term))
        if c is None:
            self.fail(f"snapshot at ({index}, {term}) of an entry no node ever wrote")
        return c

    # == network ===========================================================================

    def net_send(self, m) -> None:
        if (m.frm, m.to) in self.blocked:
            return
        if self.rng_net.random() < self.p.drop:
            return
        copies = 2 if self.rng_net.random() < self.p.dup else 1
        for _ in range(copies):
            d = self.rng_net.randint(self.p.delay_min, self.p.delay_max)
            self._schedule(d, ("msg", m))

    def _deliver(self, m) -> None:
        sn = self.nodes.get(m.to)
        if sn is None or not sn.alive:
            return
        if (m.frm, m.to) in self.blocked:
            return  # a partition also cuts messages already on the wire
        if sn.paused_until > self.now:
            sn.held.append(m)
            return
        sn.raft.step(m)
        self._after(m.to)

    # == invariants ========================================================================

    def check_sent(self, n: str, m) -> None:
        disk = self.nodes[n].disk
        if isinstance(m, RequestVoteResponse) and m.granted and not m.pre_vote:
            hs = disk.hard_state
            if hs.term < m.term or (hs.term == m.term and hs.vote != m.to):
                self.fail(f"{n} granted its vote to {m.to} in term {m.term} before syncing it "
                          f"(synced hard state {hs})")
        elif isinstance(m, AppendEntriesResponse) and m.success:
            if disk.last_index() < m.index or disk.hard_state.term < m.term:
                self.fail(f"{n} acknowledged entries up to {m.index} in term {m.term} before "
                          f"syncing them (synced last index {disk.last_index()}, "
                          f"term {disk.hard_state.term})")

    def check_applied(self, n: str, index: int, h: bytes) -> None:
        known = self.applied_hash.get(index)
        if known is None:
            self.applied_hash[index] = h
        elif known != h:
            self.fail(f"State Machine Safety: {n} applied a different history at index {index}")

    def _check_written(self, n: str, written) -> None:
        for index, term, c in written:
            known = self.chain_of.get((index, term))
            if known is None:
                self.chain_of[(index, term)] = c
            elif known != c:
                self.fail(f"Log Matching: {n} holds a different entry or prefix at "
                          f"index {index} term {term}")

    def _check_commit(self, n: str, sn: SimNode) -> None:
        commit = sn.raft.log.committed
        if commit < sn.last_commit:
            self.fail(f"{n} commit index went back from {sn.last_commit} to {commit}")
        if commit > sn.last_commit:
            lo = max(sn.last_commit + 1, sn.mirror.base_index)
            for i in range(lo, commit + 1):
                c = sn.mirror.chain_at(i)
                if c is None:
                    continue
                known = self.committed_chain.get(i)
                if known is None:
                    self.committed_chain[i] = c
                elif known != c:
                    self.fail(f"State Machine Safety: {n} committed a different entry at {i}")
            if commit > self.max_committed:
                self.max_committed = commit
                self.stats["max_commit"] = commit
            if sn.raft.role is Role.LEADER:
                t = sn.raft.term
                self.leader_commit[t] = max(self.leader_commit.get(t, 0), commit)
        sn.last_commit = commit

    def _check_leader_complete(self, n: str, sn: SimNode) -> None:
        # Every entry committed by a leader of an earlier term must be in this log. (An
        # entry committed in a later term need not be: a leader of term 3 can be elected
        # after the leader of term 4 committed something, if its votes were delayed.)
        term = sn.raft.term
        mc = max((c for t, c in self.leader_commit.items() if t < term), default=0)
        mirror = sn.mirror
        probe = mc if mc >= mirror.base_index else mirror.base_index
        if probe == 0:
            return
        c = mirror.chain_at(probe)
        known = self.committed_chain.get(probe)
        if c is None:
            self.fail(f"Leader Completeness: new leader {n} (term {sn.raft.term}) lacks "
                      f"committed index {probe} (its last index {mirror.last_index()})")
        if known is not None and c != known:
            self.fail(f"Leader Completeness: new leader {n} (term {sn.raft.term}) holds a "
                      f"different entry at committed index {probe}")

    def _after(self, n: str) -> None:
        """Carry out the node's Ready (if any) and check everything it changed."""
        sn = self.nodes[n]
        raft = sn.raft
        while raft.has_ready():
            try:
                rd = self.process_ready(raft, _MirrorStorage(self, sn), sn.outbox, sn.sm)
            except SimCrash:
                self.stats["fsync_crashes"] += 1
                self._log(f"{n} crashed inside fsync")
                self._crash(n)
                self._schedule(self.rng_nemesis.randint(20, 300), ("restart", n))
                return
            if rd is None:
                break
            for rs in rd.read_states:
                began = self.reads.pop(rs.ctx, None)
                if began is not None:
                    if rs.index < began:
                        self.fail(f"ReadIndex: {n} returned read index {rs.index} but index "
                                  f"{began} was committed before the read began")
                    self.stats["reads_ok"] += 1
        self._check_commit(n, sn)
        role = raft.role
        if role is Role.LEADER and sn.last_role is not Role.LEADER:
            prev = self.leader_of_term.get(raft.term)
            if prev is not None and prev != n:
                self.fail(f"Election Safety: {n} and {prev} both lead term {raft.term}")
            self.leader_of_term[raft.term] = n
            self.stats["elections"] += 1
            self._log(f"{n} leads term {raft.term}")
            self._check_leader_complete(n, sn)
        sn.last_role = role

    # == events ============================================================================

    def _tick(self, n: str, inc: int) -> None:
        sn = self.nodes.get(n)
        if sn is None or sn.incarnation != inc or sn.status == "gone":
            return
        self._schedule(TICK_MS + self.rng_nodes.randint(-1, 1), ("tick", n, inc))
        if not sn.alive or sn.paused_until > self.now:
            return
        sn.raft.tick()
        self._after(n)

    def leaders(self) -> list[SimNode]:
        return [s for s in self.nodes.values()
                if s.alive and s.raft is not None and s.raft.role is Role.LEADER
                and s.paused_until <= self.now]

    def live(self) -> list[SimNode]:
        return [s for s in self.nodes.values() if s.alive and s.status != "gone"]

    def _propose(self) -> None:
        leaders = self.leaders()
        if leaders:
            sn = self.rng_client.choice(leaders)
            self.proposed += 1
            data = f"p{self.proposed}".encode()
            try:
                sn.raft.propose(data)
            except RaftError:
                pass
            else:
                self._after(sn.id)

    def _read(self) -> None:
        cands = [s for s in self.live() if s.paused_until <= self.now]
        if not cands:
            return
        sn = self.rng_client.choice(cands)
        self.read_seq += 1
        ctx = f"r{self.read_seq}".encode()
        try:
            sn.raft.read_index(ctx)
        except RaftError:
            return
        self.reads[ctx] = self.max_committed
        self._after(sn.id)

    # -- nemesis --

    def _schedule_nemesis(self) -> None:
        p = self.p
        for kind, every in (("propose", p.propose_every), ("read", p.read_every),
                            ("crash", p.crash_every), ("kill_leader", p.kill_leader_every),
                            ("pause", p.pause_every),
                            ("partition", p.partition_every), ("conf", p.conf_every),
                            ("transfer", p.transfer_every)):
            if every:
                self._schedule(self.rng_nemesis.randint(1, 2 * every), ("nemesis", kind, every))

    def _nemesis(self, kind: str, every: int) -> None:
        if not self.faults_on and kind not in ("propose", "read"):
            return
        self._schedule(self.rng_nemesis.randint(1, 2 * every), ("nemesis", kind, every))
        r = self.rng_nemesis
        if kind == "propose":
            self._propose()
        elif kind == "read":
            self._read()
        elif kind == "crash":
            cands = [s for s in self.live()]
            if cands:
                sn = r.choice(cands)
                self._crash(sn.id)
                self._schedule(r.randint(20, 1500), ("restart", sn.id))
        elif kind == "kill_leader":
            leaders = self.leaders()
            if leaders:
                sn = r.choice(leaders)
                self._crash(sn.id)
                self._schedule(r.randint(5, 400), ("restart", sn.id))
        elif kind == "pause":
            cands = [s for s in self.live() if s.paused_until <= self.now]
            if cands:
                sn = r.choice(cands)
                sn.paused_until = self.now + r.randint(50, 800)
                self.stats["pauses"] += 1
                self._log(f"pause {sn.id} until {sn.paused_until}")
                self._schedule(sn.paused_until - self.now, ("resume", sn.id, sn.incarnation))
        elif kind == "partition":
            self._partition(r)
        elif kind == "conf":
            self._conf_change(r)
        elif kind == "transfer":
            leaders = self.leaders()
            if leaders:
                sn = leaders[0]
                voters = sorted(sn.raft.conf.voters - {sn.id})
                if voters:
                    to = r.choice(voters)
                    try:
                        sn.raft.transfer_leadership(to)
                    except RaftError:
                        return
                    self.stats["transfers"] += 1
                    self._log(f"transfer {sn.id} -> {to}")
                    self._after(sn.id)

    def _partition(self, r: random.Random) -> None:
        ids = sorted(n for n, s in self.nodes.items() if s.status != "gone")
        self.blocked = set()
        shape = r.choice(["heal", "halves", "isolate_leader", "isolate", "bridge", "ring",
                          "one_way"])
        if shape == "halves":
            r.shuffle(ids)
            k = r.randint(1, len(ids) - 1)
            a, b = set(ids[:k]), set(ids[k:])
            self.blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
        elif shape in ("isolate_leader", "isolate"):
            leaders = self.leaders()
            x = leaders[0].id if (shape == "isolate_leader" and leaders) else r.choice(ids)
            self.blocked = {(x, y) for y in ids if y != x} | {(y, x) for y in ids if y != x}
            shape = f"{shape} {x}"
        elif shape == "bridge" and len(ids) >= 3:
            # two halves that only the bridge node connects
            r.shuffle(ids)
            bridge, rest = ids[0], ids[1:]
            k = len(rest) // 2
            a, b = set(rest[:k]), set(rest[k:])
            self.blocked = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
            shape = f"bridge via {bridge}"
        elif shape == "ring" and len(ids) >= 4:
            # each node reaches only its two ring neighbours
            r.shuffle(ids)
            k = len(ids)
            ok = {(ids[i], ids[(i + 1) % k]) for i in range(k)}
            ok |= {(y, x) for x, y in ok}
            self.blocked = {(x, y) for x in ids for y in ids if x != y and (x, y) not in ok}
        elif shape == "one_way":
            x, y = r.sample(ids, 2)
            self.blocked = {(x, y)}
            shape = f"one_way {x}-/->{y}"
        else:
            shape = "heal"
        self.partition_desc = shape
        self.stats["partitions"] += 1
        self._log(f"partition {shape}")

    def _conf_change(self, r: random.Random) -> None:
        leaders = self.leaders()
        if not leaders:
            return
        ld = leaders[0]
        raft = ld.raft
        conf = raft.conf
        choice = r.random()
        learners = sorted(x for x in conf.learners if self.nodes[x].status == "member")
        voters = sorted(x for x in conf.voters if self.nodes[x].status == "member")
        try:
            if learners and choice < 0.5:
                x = r.choice(learners)
                if r.random() < 0.8:
                    cc = ConfChange(ConfChangeOp.ADD_VOTER, x, conf.priority(x))
                    raft.propose_conf_change(cc)
                    self._log(f"promote {x}")
                else:
                    index = raft.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, x))
                    self.nodes[x].status, self.nodes[x].change = "leaving", (index, raft.term)
                    self._log(f"remove learner {x}")
            elif choice < 0.75 and len(self.nodes) < self.p.nodes + 12:
                x = self._new_id()
                prio = r.choice([0, 1, 2, 3]) if self.p.priorities else 1
                index = raft.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, x, prio))
                self.nodes[x] = SimNode(x, SimDisk(self, x), status="joining",
                                        change=(index, raft.term))
                self._start(x)
                self._schedule(TICK_MS, ("tick", x, self.nodes[x].incarnation))
                self._log(f"add learner {x}")
            elif len(voters) > 3:
                x = r.choice(voters)
                index = raft.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, x))
                self.nodes[x].status, self.nodes[x].change = "leaving", (index, raft.term)
                self._log(f"remove voter {x}")
            else:
                return
        except RaftError:
            return
        self.stats["conf_changes"] += 1
        self._after(ld.id)

    def _change_outcome(self, change: tuple[int, int]) -> bool | None:
        """True once the conf-change entry committed, False once another entry committed
        in its place, None while undecided."""
        index, term = change
        committed = self.committed_chain.get(index)
        if committed is None:
            return None
        return committed == self.chain_of.get((index, term))

    def _membership_housekeeping(self) -> None:
        """Stop a node once its removal has committed (the operator's job in real life),
        and settle joins. Node ids are never reused, as real deployments must not."""
        for sn in list(self.nodes.values()):
            if sn.status not in ("leaving", "joining"):
                continue
            outcome = self._change_outcome(sn.change)
            if outcome is None:
                continue
            if sn.status == "leaving":
                if outcome:
                    self._crash(sn.id)
                    sn.status = "gone"
                    self._log(f"decommission {sn.id}")
                else:
                    sn.status = "member"
            else:
                if outcome:
                    sn.status = "member"
                else:
                    self._crash(sn.id)
                    sn.status = "gone"
                    self._log(f"join of {sn.id} lost; stop it")

    # == the run ===========================================================================

    def _snapshot_maybe(self, sn: SimNode) -> None:
        raft = sn.raft
        if sn.background is not None:
            incarnation, index, data, due = sn.background
            if incarnation != sn.incarnation:
                sn.background = None  # the node crashed meanwhile: the capture is gone
            elif self.step_no >= due:
                sn.background = None
                snap = raft.create_snapshot(data, index=index)
                if snap is None:
                    self.stats["snapshots_dropped"] += 1
                    return
                assert snap.meta.index == index
                sn.disk.compact(snap, sn.mirror.chain_at(index))
                sn.mirror.compact(raft.log.offset)
                self.stats["snapshots"] += 1
            return
        if raft.log.applied - raft.log.snapshot_index() >= self.p.snapshot_interval:
            if self.background_snapshots:
                sn.background = (sn.incarnation, raft.log.applied, sn.sm.snapshot_bytes(),
                                 self.step_no + self.rng_snap.randrange(1, 300))
                return
            snap = raft.create_snapshot(sn.sm.snapshot_bytes())
            sn.disk.compact(snap, sn.mirror.chain_at(snap.meta.index))
            sn.mirror.compact(raft.log.offset)
            self.stats["snapshots"] += 1

    def _run_event(self) -> None:
        t, _, ev = heapq.heappop(self.events)
        self.now = max(self.now, t)
        kind = ev[0]
        if kind == "msg":
            self._deliver(ev[1])
            n = ev[1].to
        elif kind == "tick":
            self._tick(ev[1], ev[2])
            n = ev[1]
        elif kind == "nemesis":
            self._nemesis(ev[1], ev[2])
            n = None
        elif kind == "restart":
            sn = self.nodes[ev[1]]
            if not sn.alive and sn.status != "gone":
                self._log(f"restart {sn.id}")
                self._start(sn.id, self._bootstrap_for(sn.id))
                self._schedule(TICK_MS, ("tick", sn.id, sn.incarnation))
            n = None
        elif kind == "lost":
            self._leader_lost(ev[1], ev[2])
            n = None
        elif kind == "spurious_lost":
            self._schedule(self.rng_lost.randint(200, 800), ("spurious_lost",))
            live = [s for s in self.live() if s.raft is not None and s.raft.lead is not None
                    and s.raft.lead != s.id]
            if live:
                sn = self.rng_lost.choice(live)
                self._leader_lost(sn.raft.lead, sn.id)
            n = None
        elif kind == "resume":
            sn = self.nodes[ev[1]]
            if sn.alive and sn.incarnation == ev[2] and sn.paused_until <= self.now:
                held, sn.held = sn.held, []
                for m in held:
                    self._deliver(m)
            n = None
        else:
            n = None
        if n is not None:
            sn = self.nodes.get(n)
            if sn is not None and sn.alive:
                self._snapshot_maybe(sn)

    def run(self) -> dict:
        self.faults_on = True
        try:
            while self.step_no < self.steps and self.events:
                self.step_no += 1
                self._run_event()
                if self.step_no % 16 == 0:
                    self._membership_housekeeping()
            if self.liveness:
                self._liveness()
        except SimFailure:
            raise
        except Exception as e:  # a crash inside the core is a failure of the seed too
            import traceback

            self.fail(f"exception: {e!r}\n{traceback.format_exc()}")
        self.stats["steps"] = self.step_no
        return self.stats

    def _liveness(self) -> None:
        """Heal everything, then require a leader and a new commit on every live voter."""
        self.faults_on = False
        self.blocked = set()
        self.partition_desc = "healed"
        self.p.drop = 0.0
        self.p.dup = 0.0
        self.p.fsync_crash = 0.0
        # Raft needs broadcast time well under the election timeout to make progress; the
        # safety phase may break that on purpose, the healed network does not.
        self.p.delay_min, self.p.delay_max = 1, 10
        self._log("heal all")
        for sn in self.nodes.values():
            if sn.status == "gone":
                continue
            if not sn.alive:
                self._start(sn.id, self._bootstrap_for(sn.id))
                self._schedule(TICK_MS, ("tick", sn.id, sn.incarnation))
            elif sn.paused_until > self.now:
                sn.paused_until = self.now
                self._schedule(0, ("resume", sn.id, sn.incarnation))
        start = self.now
        deadline = start + LIVENESS_BOUND_MS
        marker: tuple[int, int] | None = None  # (index, term) of our proposal
        while self.now <= deadline and self.events:
            self._run_event()
            self.step_no += 1
            if self.step_no % 16 == 0:
                self._membership_housekeeping()
            leaders = self.leaders()
            if not leaders:
                continue
            ld = max(leaders, key=lambda s: s.raft.term)
            if marker is None or self._marker_lost(marker):
                try:
                    index = ld.raft.propose(b"liveness")
                except RaftError:
                    continue
                marker = (index, ld.raft.term)
                self._after(ld.id)
                continue
            index, term = marker
            if self.committed_chain.get(index) != self.chain_of.get((index, term)):
                continue
            voters = [self.nodes.get(v) for v in ld.raft.conf.voters]
            if all(v is not None and v.alive and v.sm.index >= index for v in voters):
                self.stats["liveness_ms"] = self.now - start
                return
        leaders = [f"{s.id}(t{s.raft.term})" for s in self.leaders()]
        states = {s.id: (s.raft.role.value, s.raft.term, s.raft.log.committed, s.sm.index)
                  for s in self.live()}
        self.fail(f"liveness: no leader with a new commit on every voter within "
                  f"{LIVENESS_BOUND_MS}ms after healing (marker {marker}; leaders {leaders}; "
                  f"nodes {states})")

    def _marker_lost(self, marker: tuple[int, int]) -> bool:
        """Our proposal was overwritten (a leader change) or never reached the log."""
        index, term = marker
        committed = self.committed_chain.get(index)
        mine = self.chain_of.get((index, term))
        if mine is None:
            return not any(s.raft.term == term and s.raft.role is Role.LEADER
                           for s in self.leaders())
        return committed is not None and committed != mine


class _MirrorStorage:
    """Storage seen by process_ready: the node's SimDisk, plus the invariant bookkeeping
    for what the node writes (its in-memory log mirror and the global Log Matching map)."""

    __slots__ = ("sim", "sn")

    def __init__(self, sim: Simulation, sn: SimNode):
        self.sim = sim
        self.sn = sn

    def save(self, hard_state, entries, snapshot) -> None:
        sn = self.sn
        if snapshot is not None:
            meta = snapshot.meta
            sn.mirror.restore(meta.index, self.sim.chain_at(meta.index, meta.term))
        if entries:
            written = sn.mirror.append(entries)
            self.sim._check_written(sn.id, written)
        sn.disk.save(hard_state, entries, snapshot)

    def sync(self) -> None:
        self.sn.disk.sync()


def run_seed(seed: int, steps: int = 2000, **kw) -> dict:
    return Simulation(seed, steps, **kw).run()
