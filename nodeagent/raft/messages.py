"""Values that flow in and out of the Raft core.

Every message is a frozen dataclass compared by value. A message names its sender
(``frm``), its receiver (``to``) and the sender's term. Node ids are strings (the
inventory's node names). Nothing here does I/O; the wire codec (``nodeagent.protocol``)
and the storage layer turn these values into bytes.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

NodeId = str

# -- log entries --------------------------------------------------------------------------


class EntryKind(enum.IntEnum):
    NORMAL = 0  # application command (empty data: the leader's no-op of a new term)
    CONF_CHANGE = 1  # data is a ConfChange, encoded with ConfChange.encode()


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    data: bytes = b""
    kind: EntryKind = EntryKind.NORMAL


class ConfChangeOp(enum.Enum):
    BOOTSTRAP = "bootstrap"  # entry 1 of every initial member's log: the whole first ConfState
    ADD_LEARNER = "add_learner"  # a non-voting member: replicated to, never counted, never leads
    ADD_VOTER = "add_voter"  # a new voter, or promotion of a caught-up learner
    REMOVE = "remove"  # removes a voter or a learner
    SET_PRIORITY = "set_priority"  # changes a member's leader priority


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change, or (op BOOTSTRAP) the initial membership in ``bootstrap``.

    Conf-change entries carry ``encode()``'s bytes: canonical JSON, so every replica and
    every language reads the same thing.
    """

    op: ConfChangeOp
    node: NodeId = ""
    priority: int = 1
    bootstrap: "ConfState | None" = None
    context: str = ""  # opaque to the core; the agent puts the new member's "host:port" here

    def encode(self) -> bytes:
        obj: dict = {"op": self.op.value}
        if self.op is ConfChangeOp.BOOTSTRAP:
            assert self.bootstrap is not None
            obj["voters"] = sorted(self.bootstrap.voters)
            obj["learners"] = sorted(self.bootstrap.learners)
            obj["priorities"] = dict(self.bootstrap.priorities)
        else:
            obj["node"] = self.node
            obj["priority"] = self.priority
            if self.context:
                obj["context"] = self.context
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "ConfChange":
        obj = json.loads(data)
        op = ConfChangeOp(obj["op"])
        if op is ConfChangeOp.BOOTSTRAP:
            conf = ConfState.of(obj["voters"], obj["learners"], obj["priorities"])
            return cls(op, bootstrap=conf)
        return cls(op, str(obj["node"]), int(obj["priority"]), context=str(obj.get("context", "")))


@dataclass(frozen=True, slots=True)
class ConfState:
    """Cluster membership: who votes, who only learns, and everyone's leader priority.

    ``priorities`` is a sorted tuple of (node, priority) pairs so the value is hashable
    and has one canonical form.
    """

    voters: frozenset[NodeId]
    learners: frozenset[NodeId] = frozenset()
    priorities: tuple[tuple[NodeId, int], ...] = ()

    @classmethod
    def of(cls, voters, learners=(), priorities=None) -> "ConfState":
        prio = dict(priorities or {})
        for n in (*voters, *learners):
            prio.setdefault(n, 1)
        return cls(frozenset(voters), frozenset(learners), tuple(sorted(prio.items())))

    def priority(self, node: NodeId) -> int:
        for n, p in self.priorities:
            if n == node:
                return p
        return 0

    @property
    def members(self) -> frozenset[NodeId]:
        return self.voters | self.learners

    def apply(self, cc: ConfChange) -> "ConfState":
        """The configuration after one change (pure; validation is the leader's job)."""
        if cc.op is ConfChangeOp.BOOTSTRAP:
            assert cc.bootstrap is not None
            return cc.bootstrap
        voters, learners = set(self.voters), set(self.learners)
        prio = dict(self.priorities)
        if cc.op is ConfChangeOp.ADD_LEARNER:
            if cc.node not in voters:
                learners.add(cc.node)
                prio[cc.node] = cc.priority
        elif cc.op is ConfChangeOp.ADD_VOTER:
            learners.discard(cc.node)
            voters.add(cc.node)
            prio[cc.node] = cc.priority
        elif cc.op is ConfChangeOp.REMOVE:
            voters.discard(cc.node)
            learners.discard(cc.node)
            prio.pop(cc.node, None)
        elif cc.op is ConfChangeOp.SET_PRIORITY:
            if cc.node in voters or cc.node in learners:
                prio[cc.node] = cc.priority
        return ConfState(frozenset(voters), frozenset(learners), tuple(sorted(prio.items())))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    conf: ConfState


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes = b""


# -- durable and volatile node state ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HardState:
    """What must survive a crash, written as one atomic record: term, vote and commit."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class PersistentState:
    """What storage recovered for a restart: the newest snapshot (or None), the entries
    after it, and the hard state. A brand-new node has ``PersistentState()``."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()

    def is_empty(self) -> bool:
        return self.snapshot is None and not self.entries and self.hard_state == HardState()


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver may want to show: who leads, and our role."""

    leader: NodeId | None
    role: Role


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex result: once the local applied index reaches ``index`` a read tagged
    ``ctx`` may be served from the local state machine and is linearizable."""

    index: int
    ctx: bytes


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestVote:
    frm: NodeId
    to: NodeId
    term: int  # for a pre-vote: the term the sender would campaign in (its term + 1)
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False  # a campaign ordered by leadership transfer: ignore the leader lease


@dataclass(frozen=True, slots=True)
class RequestVoteResponse:
    frm: NodeId
    to: NodeId
    term: int
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class AppendEntries:
    frm: NodeId
    to: NodeId
    term: int
    prev_log_index: int
    prev_log_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendEntriesResponse:
    """Success: ``index`` is the last index the follower now holds matching the leader.

    Rejection: ``index`` is the rejected ``prev_log_index``; ``hint_index`` and
    ``hint_term`` tell the leader where the follower's log could match (the largest index
    at or below the probe whose term is at most the probe's term), so the leader can skip
    a whole term of conflicting entries in one round trip.
    """

    frm: NodeId
    to: NodeId
    term: int
    success: bool
    index: int
    hint_index: int = 0
    hint_term: int = 0


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    frm: NodeId
    to: NodeId
    term: int
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Heartbeat:
    frm: NodeId
    to: NodeId
    term: int
    commit: int  # min(follower's match, leader's commit): never past what the follower holds
    ctx: bytes = b""  # ReadIndex round this heartbeat confirms leadership for


@dataclass(frozen=True, slots=True)
class HeartbeatResponse:
    frm: NodeId
    to: NodeId
    term: int
    ctx: bytes = b""
    report: bytes = b""  # opaque payload for the leader (the agent's load report)


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the receiver campaigns at once, skipping pre-vote."""

    frm: NodeId
    to: NodeId
    term: int


@dataclass(frozen=True, slots=True)
class ReadIndexRequest:
    """A follower asks the leader for a read index on behalf of a local reader."""

    frm: NodeId
    to: NodeId
    term: int
    ctx: bytes


@dataclass(frozen=True, slots=True)
class ReadIndexResponse:
    frm: NodeId
    to: NodeId
    term: int
    ctx: bytes
    index: int


Message = (
    RequestVote
    | RequestVoteResponse
    | AppendEntries
    | AppendEntriesResponse
    | InstallSnapshot
    | Heartbeat
    | HeartbeatResponse
    | TimeoutNow
    | ReadIndexRequest
    | ReadIndexResponse
)

MESSAGE_TYPES: tuple[type, ...] = (
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    InstallSnapshot,
    Heartbeat,
    HeartbeatResponse,
    TimeoutNow,
    ReadIndexRequest,
    ReadIndexResponse,
)


# -- errors -------------------------------------------------------------------------------


class RaftError(Exception):
    """Base of the errors the core raises to its caller."""


class NotLeader(RaftError):
    def __init__(self, leader: NodeId | None):
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalDropped(RaftError):
    """The leader cannot take proposals now (a leadership transfer is in progress, or a
    configuration change is already pending)."""


class ConfChangeRejected(RaftError):
    """A membership change that would be unsafe or meaningless."""


@dataclass(frozen=True, slots=True)
class Ready:
    """What the driver must do (the exact order, and why, is in ``nodeagent.raft.ready``):

    1. persist ``snapshot`` (if any), then ``entries`` (replacing any stored entries at or
       after ``entries[0].index``) and ``hard_state`` (if not None);
    2. a leader may send its AppendEntries before the fsync, unless this Ready changes
       its term or vote; committed entries already durable here may be applied;
    3. fsync if ``must_sync``;
    4. send every other message (votes and acknowledgements only after the fsync);
    5. restore the state machine from ``snapshot`` (if any), then apply the rest of
       ``committed_entries``; serve ``read_states`` once applied reaches their index;
    6. call ``advance(ready)``.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False

    def empty(self) -> bool:
        return not (
            self.soft_state
            or self.hard_state
            or self.entries
            or self.snapshot
            or self.committed_entries
            or self.messages
            or self.read_states
        )


@dataclass(slots=True)
class PeerProgress:
    """The leader's view of one follower, as shown by ``RaftNode.status()``."""

    match: int
    next: int
    state: str
    recent_active: bool
    learner: bool
    inflight: int = 0
    report: bytes = field(default=b"", repr=False)
