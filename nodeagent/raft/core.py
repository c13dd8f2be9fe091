"""RaftNode: the consensus rules, and nothing else.

Inputs: ``tick()`` (the only clock), ``step(message)``, ``propose()``,
``propose_conf_change()``, ``read_index()``, ``transfer_leadership()``.
Outputs: ``ready()``, a ``Ready`` value the driver carries out in order (persist, send,
apply) before calling ``advance()``. Every message the node wants to send, including
vote grants and append acknowledgements, leaves only through a Ready, so a driver that
follows the order never acknowledges data it has not persisted.

Structure (after etcd-io/raft): ``step()`` applies the term rules once, then calls the
function of the current role, installed by ``_become_*``. The role *is* which function is
installed. Rules that the simulator's planted-bug tests replace in a subclass are small
methods with a leading ``_rule_``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from . import quorum
from .log import RaftLog
from .messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    ConfChangeRejected,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    NodeId,
    NotLeader,
    PeerProgress,
    PersistentState,
    ProposalDropped,
    ReadIndexRequest,
    ReadIndexResponse,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
    TimeoutNow,
)
from .progress import Progress, ProgressState


# Extra base election timeouts a priority-0 voter waits, with no leader, before it
# campaigns as a caretaker (see _tick_election and docs/ARCHITECTURE.md).
CARETAKER_TIMEOUTS = 4


@dataclass(frozen=True)
class Config:
    id: NodeId
    election_tick: int = 10  # ticks without a leader before campaigning (randomized up to 2x)
    heartbeat_tick: int = 1  # ticks between leader heartbeats
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight: int = 64  # unacknowledged appends per follower in REPLICATE
    max_entries_per_msg: int = 512
    max_bytes_per_msg: int = 1 << 20
    priority_transfer: bool = True  # leader hands over to a caught-up peer of higher priority
    learner_promotion_lag: int = 64  # a learner must be this close to the leader's log to vote
    # Entries kept in memory behind a new snapshot, so a follower that is only a little
    # behind (or one that just installed a snapshot while the leader took the next one)
    # catches up with appends instead of needing another snapshot.
    compaction_keep: int = 1000
    # When the leader's commit index advances: True (etcd's way) sends every follower an
    # append at once, empty if it has nothing new, just to carry the index; False
    # (hashicorp/raft's way) lets the index ride on the next append or heartbeat (within
    # one heartbeat_tick; a ReadIndex's own heartbeat round carries it too). Lazy halves
    # the messages per write when writes come one at a time (docs/BENCHMARKS.md);
    # followers apply up to one heartbeat later.
    eager_commit: bool = False

    def __post_init__(self) -> None:
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need 1 <= heartbeat_tick < election_tick")


@dataclass
class _ReadRequest:
    index: int
    frm: NodeId
    acks: set


class RaftNode:
    def __init__(
        self,
        config: Config,
        state: PersistentState | None = None,
        *,
        rng: random.Random,
        bootstrap: ConfState | None = None,
    ):
        """Start from what storage recovered (``state``), or from nothing.

        A brand-new member of the *initial* cluster passes ``bootstrap``: every initial
        member writes the same entry 1 (term 1, the whole ConfState) and treats it as
        committed. A node that joins later passes neither and waits for the leader to send
        it the log (or a snapshot), from which it learns the membership.
        """
        self.cfg = config
        self.id = config.id
        self.rng = rng
        state = state or PersistentState()
        snap = state.snapshot
        self.log = RaftLog(snap, state.entries, state.hard_state.commit)
        self.term = state.hard_state.term
        self.vote: NodeId | None = state.hard_state.vote
        self.conf: ConfState = snap.meta.conf if snap else ConfState(frozenset())
        if state.is_empty() and bootstrap is not None:
            cc = ConfChange(ConfChangeOp.BOOTSTRAP, bootstrap=bootstrap)
            self.log.append([Entry(1, 1, cc.encode(), EntryKind.CONF_CHANGE)])
            self.log.commit_to(1)
            self.term = 1
        # The hard state storage has; a Ready carries a new one only when it differs.
        self._prev_hard = state.hard_state
        self._prev_soft = SoftState(None, Role.FOLLOWER)

        self.role = Role.FOLLOWER
        self.lead: NodeId | None = None
        self.prs: dict[NodeId, Progress] = {}
        self.votes: dict[NodeId, bool] = {}
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.lead_transferee: NodeId | None = None
        self.pending_conf_index = 0
        self.leader_ticks = 0  # ticks since this node became leader
        self._read_only: OrderedDict[bytes, _ReadRequest] = OrderedDict()
        self._pending_reads: list[tuple[bytes, NodeId]] = []  # wait for a commit in our term
        self._need_bcast = False
        self.report = b""  # sent to the leader on each heartbeat response (the agent's load)
        # Voters that should not lead for now, this node included; the agent says which (a
        # disk about to fill). A leader in it hands leadership to a fit voter, and leader
        # priority never hands it to one in it (_maybe_transfer_to_priority).
        self.unfit: frozenset[NodeId] = frozenset()
        self.quorum_losses = 0  # times this node stopped leading for want of a quorum
        self._step_role: Callable[[Message], None] = self._step_follower
        self._tick: Callable[[], None] = self._tick_election
        self._become_follower(self.term, None)

    # == public interface ==================================================================

    def tick(self) -> None:
        self._tick()

    def step(self, m: Message) -> None:
        """Feed one message from a peer. Messages for another node or from an unknown
        term ordering are handled by the rules below; nothing a peer sends can raise."""
        if m.to != self.id:
            return
        if m.term > self.term:
            if isinstance(m, RequestVote):
                in_lease = (
                    self.cfg.check_quorum
                    and self.lead is not None
                    and self.election_elapsed < self.cfg.election_tick
                )
                if in_lease and not m.transfer:
                    # We heard from a live leader within an election timeout: a node that
                    # was cut off must not depose it (it would only disrupt).
                    return
            if isinstance(m, RequestVote) and m.pre_vote:
                pass  # a pre-vote never changes our term
            elif isinstance(m, RequestVoteResponse) and m.pre_vote and m.granted:
                pass  # a granted pre-vote is answered in the future term we asked for
            else:
                leader = m.frm if isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)) else None
                elapsed = self.election_elapsed
                self._become_follower(m.term, leader)
                if isinstance(m, RequestVote) and self.conf.priority(self.id) <= 0:
                    # A priority-0 caretaker waits CARETAKER_TIMEOUTS extra timeouts. If a
                    # stale candidate's refused campaigns (no pre-vote: a new term each
                    # time) restarted its timer, it would never campaign and nothing could
                    # ever lead. Only a leader or a granted vote restarts it (Figure 2).
                    self.election_elapsed = elapsed
        elif m.term < self.term:
            if isinstance(m, (AppendEntries, Heartbeat)) and (
                self.cfg.check_quorum or self.cfg.pre_vote
            ):
                # A deposed leader still sending: tell it our term so it steps down.
                self._send(AppendEntriesResponse(self.id, m.frm, self.term, False, 0))
            elif isinstance(m, RequestVote) and m.pre_vote:
                self._send(RequestVoteResponse(self.id, m.frm, self.term, False, pre_vote=True))
            return
        if isinstance(m, RequestVote):
            self._handle_vote_request(m)
        else:
            self._step_role(m)

    def leader_lost(self, peer: NodeId) -> bool:
        """The connection from ``peer`` ended (end of stream or reset): if ``peer`` is our
        leader, its process is most likely gone (a crashed or killed process's sockets
        are closed by its kernel at once). Give up the lease now, so other followers' pre-
        votes are granted, and campaign within a tick or a few instead of a whole
        randomized election timeout. Only timing changes: a leader that is in fact alive
        keeps its term, since the other followers, still in its lease, refuse the
        pre-vote, and its next heartbeat cancels the early campaign here. That needs
        PreVote and CheckQuorum (the defaults): without them an early campaign could
        depose a live leader, so nothing is done. Returns whether it acted."""
        if not (self.cfg.pre_vote and self.cfg.check_quorum):
            return False
        if self.role is not Role.FOLLOWER or self.lead is None or self.lead != peer:
            return False
        et = self.cfg.election_tick
        self.election_elapsed = max(self.election_elapsed, et)
        # One tick apart in an order every follower agrees on (priority, then id), so
        # they do not split the vote: the first usually wins before the next one's tick
        # (an election takes milliseconds here, a tick 50 ms by default).
        prio = self.conf.priority
        order = sorted((v for v in self.conf.voters if v != peer), key=lambda v: (-prio(v), v))
        rank = order.index(self.id) if self.id in order else len(order)
        self.randomized_election_timeout = et + 1 + rank
        return True

    def propose(self, data: bytes) -> int:
        """Append a command to the leader's log; returns its index. The entry is sent to
        followers with the next Ready, batched with every other proposal since the last."""
        return self.propose_many([data])[-1]

    def propose_many(self, datas: list[bytes]) -> list[int]:
        self._check_can_propose()
        last = self.log.last_index()
        ents = [Entry(self.term, last + 1 + i, d) for i, d in enumerate(datas)]
        self._append_entries(ents)
        return [e.index for e in ents]

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose one membership change. One change at a time: the previous one must have
        been applied. Takes effect on each node when the entry is applied."""
        self._check_can_propose()
        if self.pending_conf_index > self.log.applied:
            raise ProposalDropped(
                f"configuration change at index {self.pending_conf_index} is not applied yet"
            )
        self._validate_conf_change(cc)
        index = self.log.last_index() + 1
        self._append_entries([Entry(self.term, index, cc.encode(), EntryKind.CONF_CHANGE)])
        self.pending_conf_index = index
        return index

    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read point. A ReadState(index, ctx) comes out in a later
        Ready once a quorum has confirmed this node's leadership (or the leader's, for a
        follower). ``ctx`` must be unique among outstanding reads."""
        if self.role is Role.LEADER:
            self._leader_read_index(ctx, self.id)
        elif self.lead is not None:
            self._send(ReadIndexRequest(self.id, self.lead, self.term, ctx))
        else:
            raise NotLeader(None)

    def transfer_leadership(self, to: NodeId) -> None:
        """Hand leadership to ``to``: bring it up to date, then tell it to campaign now.
        Proposals are refused until the transfer ends (success, or an election timeout)."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if to == self.id:
            return
        if to not in self.conf.voters:
            raise ConfChangeRejected(f"{to} is not a voter")
        if self.conf.priority(to) <= 0:
            raise ConfChangeRejected(f"{to} has priority 0 and may never lead")
        if self.lead_transferee == to:
            return
        self.lead_transferee = to
        self.election_elapsed = 0
        pr = self.prs[to]
        if pr.match == self.log.last_index():
            self._send(TimeoutNow(self.id, to, self.term))
        else:
            self._send_append(to)

    def hold_snapshot_as(self, snapshot: Snapshot) -> bool:
        """Keep ``snapshot`` (the current one, installed and restored: same meta) in place
        of the copy the log holds, e.g. with its data in a file the driver can read back,
        so a follower that installed a leader's snapshot does not hold its bytes in memory
        as well as the state they restored. False (nothing changed) for any other."""
        return self.log.hold_snapshot_as(snapshot)

    def create_snapshot(self, data: bytes, index: int | None = None) -> Snapshot | None:
        """The application serialized its state at ``index`` (default: ``applied``): make
        it the snapshot and compact the log up to it. The driver persists the returned
        snapshot.

        An explicit ``index`` is for a snapshot serialized in the background while the
        node went on applying: it must be at most ``applied`` (else ``ValueError``: the
        caller's bug). A snapshot the node has moved past meanwhile is refused and None
        returned: ``index`` not above the current snapshot (one from the leader was
        installed), its entry no longer in the log, or a membership change applied
        after ``index`` (the snapshot's configuration would be the wrong one; the next
        snapshot will carry it).
        """
        log = self.log
        if index is None:
            index = log.applied
        else:
            if index > log.applied:
                raise ValueError(f"snapshot index {index} is beyond the applied index {log.applied}")
            if index <= log.snapshot_index() or log.term(index) is None:
                return None
            later = log.entries[index - log.offset : log.applied - log.offset]  # index+1 .. applied
            if any(e.kind is EntryKind.CONF_CHANGE for e in later):
                return None
        term = log.term(index)
        assert term is not None
        snap = Snapshot(SnapshotMeta(index, term, self.conf), data)
        self.log.compact(snap, self.cfg.compaction_keep)
        return snap

    @property
    def durable_hard_state(self) -> HardState:
        """The hard state of the last Ready handed to ``advance``: the one on disk."""
        return self._prev_hard

    def has_ready(self) -> bool:
        # Called several times per write: the fields compared one by one rather than a
        # HardState and a SoftState built for it (the same test as ``ready()`` makes).
        log, hs, ss = self.log, self._prev_hard, self._prev_soft
        return bool(
            self._need_bcast
            or self.msgs
            or self.read_states
            or log.stable < log.last_index()
            or log.pending_snapshot is not None
            or log.has_next_committed()
            or self.term != hs.term or self.vote != hs.vote or log.committed != hs.commit
            or self.lead != ss.leader or self.role is not ss.role
        )

    def ready(self) -> Ready:
        if self._need_bcast:
            self._need_bcast = False
            if self.role is Role.LEADER:
                self._bcast_append()
        hs = self._hard_state()
        ss = self._soft_state()
        entries = self.log.unstable_entries()
        rd = Ready(
            soft_state=ss if ss != self._prev_soft else None,
            hard_state=hs if hs != self._prev_hard else None,
            entries=entries,
            snapshot=self.log.pending_snapshot,
            committed_entries=self.log.next_committed(),
            messages=tuple(self.msgs),
            read_states=tuple(self.read_states),
            must_sync=bool(entries) or self.log.pending_snapshot is not None or (
                hs.term != self._prev_hard.term or hs.vote != self._prev_hard.vote
            ),
        )
        self.msgs = []
        self.read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver carried out ``rd``: its entries and hard state are durable, its
        messages sent, its committed entries applied."""
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            self.log.snapshot_applied()
        if rd.entries:
            last = rd.entries[-1]
            if self.log.match_term(last.index, last.term):
                self.log.stable_to(last.index)
            if self.role is Role.LEADER and self.id in self.prs:
                # The leader counts itself only for what it has persisted.
                if self.prs[self.id].maybe_update(self.log.stable) and self._maybe_commit():
                    self._commit_advanced()
        for e in rd.committed_entries:
            self.log.applied_to(e.index)
            if e.kind is EntryKind.CONF_CHANGE:
                self._apply_conf_change(ConfChange.decode(e.data))

    def status(self) -> dict:
        """A plain snapshot of this node's view, for status pages and tests."""
        progress = {}
        if self.role is Role.LEADER:
            for nid, pr in self.prs.items():
                progress[nid] = PeerProgress(
                    pr.match, pr.next, pr.state.value, pr.recent_active, pr.learner,
                    len(pr.inflights), pr.report,
                )
        return {
            "id": self.id,
            "role": self.role.value,
            "term": self.term,
            "vote": self.vote,
            "leader": self.lead,
            "commit": self.log.committed,
            "applied": self.log.applied,
            "last_index": self.log.last_index(),
            "first_index": self.log.first_index(),
            "snapshot_index": self.log.snapshot_index(),
            "voters": sorted(self.conf.voters),
            "learners": sorted(self.conf.learners),
            "priority": self.conf.priority(self.id),
            "transferee": self.lead_transferee,
            "unfit": sorted(self.unfit),
            "progress": progress,
        }

    # == role transitions ==================================================================

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = None
        self.lead = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._randomize_election_timeout()
        self.lead_transferee = None
        self.votes = {}
        self._read_only.clear()
        self._pending_reads.clear()
        self.leader_ticks = 0
        last = self.log.last_index()
        self.prs = {
            n: Progress(last + 1, self.cfg.max_inflight, learner=n in self.conf.learners)
            for n in self.conf.members
        }

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        self._step_role = self._step_follower
        self._tick = self._tick_election

    def _become_pre_candidate(self) -> None:
        # Term and vote stay as they are: a pre-vote changes nothing durable.
        self.role = Role.PRE_CANDIDATE
        self.lead = None
        self.votes = {}
        self._step_role = self._step_candidate
        self._tick = self._tick_election

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self._step_role = self._step_candidate
        self._tick = self._tick_election

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        self._step_role = self._step_leader
        self._tick = self._tick_heartbeat
        if self.id in self.prs:
            self.prs[self.id].match = self.log.stable
            self.prs[self.id].become_replicate()
            self.prs[self.id].recent_active = True
        # The empty entry of the new term: committing it commits everything before it
        # (Figure 8) and unblocks reads (ReadIndex needs an entry of our term committed).
        self._append_entries([Entry(self.term, self.log.last_index() + 1)])
        # No conf change may be proposed until that entry of our own term is applied
        # (not merely everything before it): otherwise a change could be appended on top
        # of an earlier leader's uncommitted one (Ongaro, raft-dev 2015).
        self.pending_conf_index = self.log.last_index()

    def _promotable(self) -> bool:
        return self.id in self.conf.voters and self.log.pending_snapshot is None

    def _campaign(self, kind: str) -> None:
        """kind: 'pre' (pre-vote round), 'elect' (real election), 'transfer' (ordered)."""
        if not self._promotable():
            return
        if kind == "transfer" and self.conf.priority(self.id) <= 0:
            return
        if kind == "pre":
            self._become_pre_candidate()
            vote_term = self.term + 1
        else:
            self._become_candidate()
            vote_term = self.term
        self.votes[self.id] = True
        if quorum.vote_result(self.conf.voters, self.votes) is quorum.VoteResult.WON:
            if kind == "pre":
                self._campaign("elect")
            else:
                self._become_leader()
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for v in sorted(self.conf.voters):
            if v != self.id:
                self._send(
                    RequestVote(
                        self.id, v, vote_term, last_index, last_term,
                        pre_vote=kind == "pre", transfer=kind == "transfer",
                    )
                )

    # == ticks =============================================================================

    def _randomize_election_timeout(self) -> None:
        et = self.cfg.election_tick
        self.randomized_election_timeout = et + self.rng.randrange(et)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if not self._promotable():
            return
        timeout = self.randomized_election_timeout
        if self.conf.priority(self.id) <= 0:
            # Priority 0 leads only as a caretaker: after CARETAKER_TIMEOUTS extra election
            # timeouts with no leader, because every voter that may lead is down or too far
            # behind to win. It then hands leadership to the first one that catches up.
            timeout += CARETAKER_TIMEOUTS * self.cfg.election_tick
        if self.election_elapsed >= timeout:
            self.election_elapsed = 0
            self._randomize_election_timeout()
            self._campaign("pre" if self.cfg.pre_vote else "elect")

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        self.leader_ticks += 1
        for nid, pr in self.prs.items():
            if pr.state is ProgressState.SNAPSHOT and nid != self.id:
                pr.snapshot_elapsed += 1
                if pr.snapshot_elapsed >= self.cfg.election_tick:
                    pr.become_probe()  # the snapshot (or its answer) was lost: start over
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                active = [n for n, pr in self.prs.items() if pr.recent_active or n == self.id]
                if not quorum.has_quorum(self.conf.voters, active):
                    self.quorum_losses += 1
                    self._become_follower(self.term, None)  # CheckQuorum: step down
                    return
                for nid, pr in self.prs.items():
                    if nid != self.id:
                        pr.recent_active = False
            if self.lead_transferee is not None:
                # The transfer did not finish in time: abort it, and let a priority
                # transfer wait a full election timeout before it tries again.
                self.lead_transferee = None
                self.leader_ticks = 0
        if self.role is not Role.LEADER:
            return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat(self._last_read_ctx())
            self._maybe_transfer_to_priority()

    # == voting ============================================================================

    def _handle_vote_request(self, m: RequestVote) -> None:
        if self._rule_can_grant_vote(m):
            self._send(RequestVoteResponse(self.id, m.frm, m.term, True, pre_vote=m.pre_vote))
            if not m.pre_vote:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(RequestVoteResponse(self.id, m.frm, self.term, False, pre_vote=m.pre_vote))

    def _rule_can_grant_vote(self, m: RequestVote) -> bool:
        """§5.2, §5.4.1: one vote per term, only for a log at least as up to date as ours.
        A pre-vote for a future term is granted on the log check alone (we only get here
        for a higher-term pre-vote when no live leader is known, see step())."""
        can_vote = (
            self.vote == m.frm
            or (self.vote is None and self.lead is None)
            or (m.pre_vote and m.term > self.term)
        )
        return can_vote and self.log.is_up_to_date(m.last_log_index, m.last_log_term)

    # == follower and candidate ============================================================

    def _step_follower(self, m: Message) -> None:
        if isinstance(m, AppendEntries):
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif isinstance(m, Heartbeat):
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif isinstance(m, InstallSnapshot):
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif isinstance(m, TimeoutNow):
            self._campaign("transfer")
        elif isinstance(m, ReadIndexResponse):
            self.read_states.append(ReadState(m.index, m.ctx))
        # RequestVoteResponse (stale), ReadIndexRequest (we are not leader): ignored.

    def _step_candidate(self, m: Message) -> None:
        if isinstance(m, (AppendEntries, Heartbeat, InstallSnapshot)):
            self._become_follower(m.term, m.frm)  # a leader of our term exists
            self._step_follower(m)
        elif isinstance(m, RequestVoteResponse):
            if m.pre_vote != (self.role is Role.PRE_CANDIDATE):
                return
            self.votes.setdefault(m.frm, m.granted)
            result = quorum.vote_result(self.conf.voters, self.votes)
            if result is quorum.VoteResult.WON:
                if self.role is Role.PRE_CANDIDATE:
                    self._campaign("elect")
                else:
                    self._become_leader()
            elif result is quorum.VoteResult.LOST:
                self._become_follower(self.term, None)

    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_log_index < self.log.committed:
            self._send(AppendEntriesResponse(self.id, m.frm, self.term, True, self.log.committed))
            return
        last = self.log.maybe_append(m.prev_log_index, m.prev_log_term, m.commit, m.entries)
        if last is not None:
            self._send(AppendEntriesResponse(self.id, m.frm, self.term, True, last))
        else:
            hint_index, hint_term = self.log.find_conflict_by_term(
                min(m.prev_log_index, self.log.last_index()), m.prev_log_term
            )
            self._send(
                AppendEntriesResponse(
                    self.id, m.frm, self.term, False, m.prev_log_index, hint_index, hint_term
                )
            )

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._send(HeartbeatResponse(self.id, m.frm, self.term, m.ctx, self.report))

    def _handle_snapshot(self, m: InstallSnapshot) -> None:
        meta = m.snapshot.meta
        if meta.index <= self.log.committed:
            self._send(AppendEntriesResponse(self.id, m.frm, self.term, True, self.log.committed))
            return
        if self.log.match_term(meta.index, meta.term):
            # We already hold the snapshot's last entry: no need to throw the log away.
            self.log.commit_to(meta.index)
        else:
            self.log.restore(m.snapshot)
            self.conf = meta.conf
        self._send(AppendEntriesResponse(self.id, m.frm, self.term, True, meta.index))

    # == leader ============================================================================

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee is not None:
            raise ProposalDropped(f"leadership is being transferred to {self.lead_transferee}")
        if self.id not in self.conf.voters:
            raise NotLeader(None)

    def _append_entries(self, ents: list[Entry]) -> None:
        self.log.append(ents)
        self._need_bcast = True

    def _step_leader(self, m: Message) -> None:
        if isinstance(m, ReadIndexRequest):
            if m.frm in self.conf.members:
                self._leader_read_index(m.ctx, m.frm)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if isinstance(m, AppendEntriesResponse):
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif isinstance(m, HeartbeatResponse):
            pr.recent_active = True
            self._handle_heartbeat_response(m, pr)

    def _handle_append_response(self, m: AppendEntriesResponse, pr: Progress) -> None:
        if not m.success:
            hint = m.hint_index
            if m.hint_term > 0:
                hint, _ = self.log.find_conflict_by_term(m.hint_index, m.hint_term)
            if pr.maybe_decr_to(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            self._commit_advanced()
        elif was_paused:
            self._send_append(m.frm)
        while self._send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(TimeoutNow(self.id, m.frm, self.term))

    def _handle_heartbeat_response(self, m: HeartbeatResponse, pr: Progress) -> None:
        pr.report = m.report
        pr.probe_sent = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            pr.inflights.free_first_one()  # acknowledgements were lost: let one more through
        if pr.match < self.log.last_index():
            self._send_append(m.frm)
        if m.ctx:
            self._read_ack(m.ctx, m.frm)

    def _maybe_commit(self) -> bool:
        match = {n: pr.match for n, pr in self.prs.items()}
        index = quorum.committed_index(self.conf.voters, match)
        if index > self.log.committed and self._rule_can_commit(index):
            self.log.commit_to(index)
            self._release_pending_reads()
            return True
        return False

    def _rule_can_commit(self, index: int) -> bool:
        """Figure 8: a leader commits by counting replicas only entries of its own term;
        earlier entries are committed indirectly, by the Log Matching property."""
        return self.log.term(index) == self.term

    def _send_append(self, to: NodeId, send_if_empty: bool = True) -> bool:
        pr = self.prs.get(to)
        if pr is None or to == self.id or pr.is_paused():
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None and prev > self.log.last_index():
            # Our optimistic guess ran past our own log (it was truncated): probe again.
            pr.become_probe()
            prev = pr.next - 1
            prev_term = self.log.term(prev)
        if prev_term is None:
            return self._send_snapshot(to, pr)
        ents = self.log.slice(
            pr.next, self.log.last_index() + 1,
            self.cfg.max_entries_per_msg, self.cfg.max_bytes_per_msg,
        ) if pr.next <= self.log.last_index() else []
        if not ents and not send_if_empty:
            return False
        self._send(
            AppendEntries(self.id, to, self.term, prev, prev_term, tuple(ents), self.log.committed)
        )
        pr.sent_entries(ents[-1].index if ents else None)
        return True

    def _send_snapshot(self, to: NodeId, pr: Progress) -> bool:
        snap = self.log.snapshot
        if snap is None or not pr.recent_active:
            return False
        self._send(InstallSnapshot(self.id, to, self.term, snap))
        pr.become_snapshot(snap.meta.index)
        return True

    def _commit_advanced(self) -> None:
        """Tell the followers about a new commit index: at once (``eager_commit``), or
        only along with entries they have not been sent yet; heartbeats carry it anyway."""
        if self.cfg.eager_commit:
            self._bcast_append()
            return
        for nid in sorted(self.prs):
            if nid != self.id:
                self._send_append(nid, send_if_empty=False)

    def _bcast_append(self) -> None:
        for nid in sorted(self.prs):
            if nid != self.id:
                self._send_append(nid)

    def _bcast_heartbeat(self, ctx: bytes = b"") -> None:
        for nid in sorted(self.prs):
            if nid != self.id:
                pr = self.prs[nid]
                commit = min(pr.match, self.log.committed)
                self._send(Heartbeat(self.id, nid, self.term, commit, ctx))

    def _maybe_transfer_to_priority(self) -> None:
        """Leader priority: hand over to the highest-priority voter that is healthy (heard
        from this round) and fully caught up, if it outranks us. Only once we have led for
        a full election timeout with our own entry committed, so leadership settles. A
        voter in ``unfit`` is never chosen, and an unfit leader is outranked by any fit
        voter that may lead."""
        if not self.cfg.priority_transfer or self.lead_transferee is not None:
            return
        if self.leader_ticks < self.cfg.election_tick or not self._committed_in_term():
            return
        unfit = self.unfit
        mine = -1 if self.id in unfit else self.conf.priority(self.id)
        last = self.log.last_index()
        best, best_prio = None, mine
        for nid in sorted(self.conf.voters):
            pr = self.prs.get(nid)
            p = self.conf.priority(nid)
            if nid == self.id or pr is None or p <= 0 or p <= best_prio or nid in unfit:
                continue
            if pr.recent_active and pr.match == last:
                best, best_prio = nid, p
        if best is not None:
            self.transfer_leadership(best)

    # == reads =============================================================================

    def _committed_in_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    def _leader_read_index(self, ctx: bytes, frm: NodeId) -> None:
        if not self._committed_in_term():
            # A new leader does not know the commit index until an entry of its own term
            # commits: hold the read until then.
            self._pending_reads.append((ctx, frm))
            return
        index = self.log.committed
        if quorum.has_quorum(self.conf.voters, {self.id}):
            self._release_read(ctx, frm, index)
            return
        self._read_only[ctx] = _ReadRequest(index, frm, {self.id})
        self._bcast_heartbeat(ctx)

    def _last_read_ctx(self) -> bytes:
        return next(reversed(self._read_only)) if self._read_only else b""

    def _read_ack(self, ctx: bytes, frm: NodeId) -> None:
        req = self._read_only.get(ctx)
        if req is None:
            return
        req.acks.add(frm)
        if not quorum.has_quorum(self.conf.voters, req.acks):
            return
        # Leadership confirmed as of this round, so also for every read queued before it.
        while self._read_only:
            c, r = self._read_only.popitem(last=False)
            self._release_read(c, r.frm, r.index)
            if c == ctx:
                break

    def _release_read(self, ctx: bytes, frm: NodeId, index: int) -> None:
        if frm == self.id:
            self.read_states.append(ReadState(index, ctx))
        else:
            self._send(ReadIndexResponse(self.id, frm, self.term, ctx, index))

    def _release_pending_reads(self) -> None:
        if self._pending_reads and self._committed_in_term():
            pending, self._pending_reads = self._pending_reads, []
            for ctx, frm in pending:
                self._leader_read_index(ctx, frm)

    # == membership ========================================================================

    def _validate_conf_change(self, cc: ConfChange) -> None:
        conf = self.conf
        op, node = cc.op, cc.node
        if op is ConfChangeOp.BOOTSTRAP:
            raise ConfChangeRejected("bootstrap is only for a new cluster's first entry")
        if op is ConfChangeOp.ADD_LEARNER and node in conf.members:
            raise ConfChangeRejected(f"{node} is already a member")
        if op is ConfChangeOp.ADD_VOTER:
            if node in conf.voters:
                raise ConfChangeRejected(f"{node} is already a voter")
            if node not in conf.learners:
                raise ConfChangeRejected(
                    f"{node} must join as a learner and catch up before it can vote"
                )
            pr = self.prs[node]
            lag = self.log.last_index() - pr.match
            if lag > self.cfg.learner_promotion_lag:
                raise ConfChangeRejected(f"learner {node} is {lag} entries behind; wait")
        if op in (ConfChangeOp.REMOVE, ConfChangeOp.SET_PRIORITY) and node not in conf.members:
            raise ConfChangeRejected(f"{node} is not a member")
        if op is ConfChangeOp.REMOVE and conf.voters == {node}:
            raise ConfChangeRejected("cannot remove the last voter")
        if cc.priority < 0:
            raise ConfChangeRejected("priority must be >= 0")

    def _apply_conf_change(self, cc: ConfChange) -> None:
        self.conf = self.conf.apply(cc)
        last = self.log.last_index()
        for n in self.conf.members:
            if n not in self.prs:
                self.prs[n] = Progress(last + 1, self.cfg.max_inflight)
            self.prs[n].learner = n in self.conf.learners
        for n in list(self.prs):
            if n not in self.conf.members:
                del self.prs[n]
        if self.lead_transferee is not None and self.lead_transferee not in self.conf.voters:
            self.lead_transferee = None
        if self.role is Role.LEADER:
            if self.id not in self.conf.voters:
                self._become_follower(self.term, None)  # we removed ourselves: step down
                return
            if self._maybe_commit():
                self._bcast_append()

    # == plumbing ==========================================================================

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def _soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)
