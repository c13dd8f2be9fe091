"""The one trio task that owns the RaftNode.

Everything that touches the Raft core or the state machine happens here, in one task,
so neither needs a lock. Other tasks (peer connections, client connections) talk to the
driver through a bounded inbox: raft messages are dropped when it is full (Raft
retransmits); client requests get ``busy``.

The loop: wait for inbox events until the next tick is due, handle every event that is
ready (so a burst of proposals becomes one Ready, one fsync and one append per peer),
tick when due, then carry out Readies (``raft/ready.py``) until the node has nothing left
to do. With fsync on, the leader's appends leave before its own fsync; the fsync runs in
this task while the disk is fast, in a worker thread while it is slow (``_sync``), and new
events wait in the inbox to join the next round (group commit). Snapshots, too, are
serialized and written in a worker thread (see ``_start_snapshot``): this task only
captures the state and, later, adopts the snapshot.

A direct round (``deliver``): when this task is parked on an empty inbox and the disk is
fast, a replication message is handled and its Ready carried out right in the delivering
task, which then goes on reading. No await happens in between, so no other task runs
meanwhile and the one-owner rule holds; the hop to this task (a channel send, a
scheduling pass, a wake-up) was a tenth of a sequential write's time. Client writes take
it as a batch: the requests one read hub wake-up submits are held
(``hold_requests``) and handed over together (``release_requests``), so they still make
one Ready and one fsync.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import msgpack
import trio

from .libc import release_free_memory
from .raft.core import RaftNode
from .raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeRejected,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    NotLeader,
    ProposalDropped,
    RaftError,
    Snapshot,
    SnapshotMeta,
)
from .raft.ready import begin_ready, finish_ready
from .state import StateError, StateMachine, StateView, serialize_view_chunks

log = logging.getLogger("nodeagent.driver")

# The byte rule (snapshot_log_percent) waits at most this many intervals: with small
# commands and a big state, the log it lets grow costs memory (about 100 bytes an entry
# besides the command) and replay time on restart. 100,000 entries at the default
# interval, etcd's default --snapshot-count.
SNAPSHOT_MAX_INTERVALS = 20

_TICK = ("tick",)
_FAILED = ("failed",)
# What a direct round takes: the steady traffic of replication. Elections, snapshots and
# the rest go through the inbox.
_DIRECT = frozenset({AppendEntries, AppendEntriesResponse, Heartbeat, HeartbeatResponse})
# Requests held over one read hub wake-up (Driver.hold_requests) before they are handed
# over early, in order.
_HOLD_MAX = 4096


class RequestFailed(Exception):
    """A client request that the agent answers with ``ok: false``."""

    def __init__(self, code: str, message: str, leader: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.leader = leader


class Pending:
    """A one-shot result slot: a client handler waits on it (``wait``), or it calls
    ``on_done(pending)`` when answered (the server's write path, without a task per
    request). ``on_done`` runs inside the driver's task: it must be quick, and an
    exception from it is logged, never raised into the driver."""

    __slots__ = ("event", "result", "error", "done", "on_done")

    def __init__(self, on_done: Callable[["Pending"], None] | None = None) -> None:
        self.event: trio.Event | None = None  # made only when somebody waits
        self.result: Any = None
        self.error: RequestFailed | None = None
        self.done = False
        self.on_done = on_done

    def set(self, result: Any) -> None:
        if not self.done:
            self.result = result
            self._finish()

    def fail(self, code: str, message: str, leader: str | None = None) -> None:
        if not self.done:
            self.error = RequestFailed(code, message, leader)
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if self.event is not None:
            self.event.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:
                log.exception("a request's completion callback failed")

    def outcome(self) -> Any:
        """The result of a finished request, or its RequestFailed raised."""
        if self.error is not None:
            raise self.error
        return self.result

    async def wait(self, timeout: float) -> Any:
        if not self.done:
            self.event = trio.Event()
            with trio.move_on_after(timeout):
                await self.event.wait()
        if not self.done:
            raise RequestFailed("timeout", f"no answer within {timeout:g}s; the outcome is unknown")
        return self.outcome()


@dataclass
class _Proposal:
    term: int
    pending: Pending
    started: float


@dataclass(order=True)
class _Read:
    index: int
    seq: int
    key: str = field(compare=False)
    pending: Pending = field(compare=False)


class Driver:
    def __init__(
        self,
        node: RaftNode,
        storage,
        state: StateMachine,
        send: Callable[[Any], bool],
        *,
        tick_interval: float,
        snapshot_interval: int,
        snapshot_log_percent: int = 0,
        inbox_size: int = 8192,
        on_apply_conf: Callable[[ConfChange], None] | None = None,
        metrics=None,
        sync_in_thread: bool = False,
        snapshot_in_thread: bool = True,
        send_batch: Callable[[list], bool] | None = None,
    ):
        self.node = node
        self.storage = storage
        self.state = state
        self._send = send
        # All of one Ready's messages at once (the transport writes each peer's share in
        # one go; True: all of it went out now); without it, ``send`` one by one.
        self._send_batch = send_batch
        self._sends_waiting = False  # this Ready left messages for writer tasks to send
        self.tick_interval = tick_interval
        # A snapshot is due when both hold: ``snapshot_interval`` entries applied since
        # the last one, and their commands' bytes at least ``snapshot_log_percent`` % of
        # the last snapshot's size (or SNAPSHOT_MAX_INTERVALS intervals have passed).
        # Serializing costs O(state); the second rule keeps that work proportional to the
        # writes once the state is big (docs/ARCHITECTURE.md, "When to snapshot").
        self.snapshot_interval = snapshot_interval
        self.snapshot_log_percent = snapshot_log_percent
        self._inbox_send, self._inbox_recv = trio.open_memory_channel(inbox_size)
        self._proposals: dict[int, _Proposal] = {}
        self._reads_by_ctx: dict[bytes, tuple] = {}  # ctx -> (key, pending, term, leader, asked)
        self._reads_swept_at = time.monotonic()
        self._reads_ready: list[_Read] = []  # heap by index: confirmed, waiting for apply
        self._ctx = itertools.count(1)
        self._read_seq = itertools.count()
        self._on_apply_conf = on_apply_conf
        self.metrics = metrics
        # fsync may run in a worker thread (when it really waits for the disk), so the
        # event loop sends the leader's appends and answers clients meanwhile; see _sync
        self.sync_in_thread = sync_in_thread
        self.sync_ewma = 0.0  # seconds, recent fsyncs (exponentially weighted)
        self.syncs_inline = 0
        self.syncs_threaded = 0
        self.changed = trio.Event()  # set when the status changed (subscriptions wait on it)
        self.version = 0
        self.leader_changes: list[float] = []
        self.last_snapshot_index = node.log.snapshot_index()
        snap = node.log.snapshot
        self.last_snapshot_bytes = len(snap.data) if snap is not None else 0
        self.log_bytes = 0  # commands' bytes applied since the last snapshot's index
        self._snap_log_bytes = 0  # log_bytes when the one in flight was captured
        # Snapshots: the state is captured here (a few shallow copies), serialized and
        # written in a worker thread while this task goes on, and adopted back here. False:
        # the old way, all of it in this task (for comparisons in tests and benchmarks).
        self.snapshot_in_thread = snapshot_in_thread
        self.snapshots_taken = 0
        self.snapshots_dropped = 0
        self.snapshots_sent = 0  # InstallSnapshot messages handed to the transport
        self.snapshots_installed = 0  # snapshots from the leader restored here
        self.snapshots_refused = 0  # snapshots from the leader that did not load
        self._incoming: tuple[SnapshotMeta, StateMachine] | None = None  # loaded, not yet restored
        self._nursery: trio.Nursery | None = None
        self._snap_inflight = False
        self._snap_done: tuple | None = None  # (Snapshot, written, started, loop seconds so far)
        self._snap_not_before = 0.0  # trio time: back off after a failed write
        self._tick_due = False
        # True only while this task waits on an empty inbox with nothing handed to it:
        # every send to the inbox clears it (see deliver).
        self._parked = False
        self._held: list | None = None  # requests held by hold_requests
        self._failure: BaseException | None = None  # from a direct round, raised here
        self.direct_rounds = 0
        self.early_campaigns = 0  # leader_lost notices that made this node campaign early
        self.reads_lost = 0  # ReadIndex requests never confirmed, swept after READ_LOST_S
        self._quorum_losses_seen = node.quorum_losses  # RaftNode.quorum_losses, last looked at
        self.dropped_inbox = 0
        self.messages_in = 0
        self.messages_out = 0
        self._seen = (None, None, None)  # (role, leader, term) last logged
        # Hooks run inside this task (they may touch the core and the state): on every
        # tick, and after every round that applied entries.
        self.on_tick: Callable[[], None] | None = None
        self.after_apply: Callable[[], None] | None = None
        # Called when this node stopped leading for want of a quorum (RaftNode.quorum_losses).
        self.on_quorum_lost: Callable[[], None] | None = None

    # == entry points for other tasks =====================================================

    def deliver(self, msg) -> bool:
        """A Raft message from a peer. Non-blocking; dropped when the inbox is full.
        Replication traffic meeting an idle driver is handled here and now (a direct
        round: see the module docstring)."""
        if self._parked and type(msg) in _DIRECT and self._sync_is_fast():
            self._direct_round(msg)
            return True
        if self._enqueue(("raft", msg)):
            return True
        self.dropped_inbox += 1
        return False

    def _enqueue(self, ev: tuple) -> bool:
        """Hand ``ev`` to the driver task; False when the inbox is full."""
        self._parked = False
        try:
            self._inbox_send.send_nowait(ev)
            return True
        except trio.WouldBlock:
            return False

    def peer_lost(self, peer: str) -> None:
        """The connection from ``peer`` ended (end of stream or reset; server.py). If it
        was our leader, the core campaigns early (RaftNode.leader_lost). Queued like a
        message, so it is handled in order with what that peer sent before."""
        self._enqueue(("lost", peer))  # full: the election timeout still notices a dead leader

    def submit(self, kind: str, *args, on_done: Callable[[Pending], None] | None = None) -> Pending:
        """A client request for the driver; the returned Pending is answered by it
        (``on_done``: see Pending; a full inbox calls it at once, from here)."""
        p = Pending(on_done)
        held = self._held
        if held is not None:
            if len(held) >= _HOLD_MAX:  # hand these over first, so the order is kept
                self._held = []
                self._enqueue_requests(held)
            self._held.append((kind, p, *args))
        elif not self._enqueue((kind, p, *args)):
            p.fail("busy", "the agent's inbox is full; retry with backoff")
        return p

    def hold_requests(self) -> None:
        """Keep the requests submitted from now until ``release_requests`` (the read
        hub's wake-up: every request that arrived together) to hand over at once."""
        self._held = []

    def release_requests(self) -> None:
        """Hand over the held requests: when this task is parked on an empty inbox and
        the disk is fast, as one direct round in the caller's task (no hop; they still
        make one Ready and one fsync together); else through the inbox, in order."""
        held, self._held = self._held, None
        if not held:
            return
        if self._parked and self._sync_is_fast():
            self._direct(held)
            return
        self._enqueue_requests(held)

    def _enqueue_requests(self, events: list) -> None:
        for ev in events:
            if not self._enqueue(ev):
                ev[1].fail("busy", "the agent's inbox is full; retry with backoff")

    # == the loop ===========================================================================

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:  # background snapshots run in it
            self._nursery = nursery
            try:
                await self._run(task_status)
            finally:
                self._nursery = None

    async def _run(self, task_status) -> None:
        await self._process()
        task_status.started()
        self._nursery.start_soon(self._ticker)
        recv = self._inbox_recv
        while True:
            try:
                ev = recv.receive_nowait()
            except trio.WouldBlock:
                self._parked = True
                ev = await recv.receive()  # whoever hands an event over clears _parked
            else:
                await trio.lowlevel.checkpoint()  # a busy inbox must not starve the rest
            self._handle(ev)
            # Everything already queued joins this round: one Ready, one fsync.
            for _ in range(4096):
                try:
                    ev = recv.receive_nowait()
                except trio.WouldBlock:
                    break
                self._handle(ev)
            if self._tick_due:
                self._tick_due = False
                self.node.tick()
                if self.on_tick is not None:
                    self.on_tick()
                self._sweep_lost_reads()
            if self._snap_done is not None:
                self._finish_snapshot()
            await self._process()

    async def _ticker(self) -> None:
        """Raft's clock: every tick_interval, mark a tick due and wake the loop. (A task
        of its own, so the loop waits on its inbox alone: a deadline per wait cost a
        cancel scope per event.) A full inbox needs no wake-up: the loop is busy and sees
        the mark on its next round."""
        interval = self.tick_interval
        next_tick = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_tick)
            self._tick_due = True
            self._parked = False
            try:
                self._inbox_send.send_nowait(_TICK)
            except trio.WouldBlock:
                pass
            now = trio.current_time()
            next_tick += interval
            if next_tick < now:  # we fell far behind (a stall): do not burst ticks
                next_tick = now + interval

    def _direct_round(self, msg) -> None:
        self._direct((("raft", msg),))

    def _direct(self, events) -> None:
        """One round of the loop for ``events``, in the caller's task, every fsync inline;
        only while this task is parked on an empty inbox. A failure is handed to this
        task to raise, as if its own round had failed."""
        self.direct_rounds += 1
        try:
            for ev in events:
                self._handle(ev)
            if self._snap_done is not None:
                self._finish_snapshot()
            for _ in self._rounds():
                self._sync_here()
        except Exception as exc:
            self._failure = exc
            self._parked = False
            self._inbox_send.send_nowait(_FAILED)  # it was empty: this cannot block

    def _handle(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "tick":
            return  # the loop ticks after handling the round's events
        if kind == "failed":
            raise self._failure
        if kind == "lost":
            if self.node.leader_lost(ev[1]):
                self.early_campaigns += 1
                log.info("the connection from the leader ended; campaigning early",
                         extra={"leader": ev[1], "term": self.node.term})
            return
        if kind == "raft":
            self.messages_in += 1
            m = ev[1]
            if type(m) is InstallSnapshot:
                if not self._check_incoming_snapshot(m):
                    return
                self.node.step(m)
                if self.node.log.pending_snapshot is None:
                    self._incoming = None  # not taken (stale): do not hold it
                return
            self.node.step(m)
            return
        pending: Pending = ev[1]
        try:
            getattr(self, f"_req_{kind}")(pending, *ev[2:])
        except NotLeader as e:
            pending.fail("not_leader", "this node is not the leader", e.leader)
        except ProposalDropped as e:
            # Not taken now (a transfer or a membership change in progress), certainly
            # not applied: the client may retry it.
            pending.fail("dropped", str(e), self.node.lead)
        except ConfChangeRejected as e:
            pending.fail("rejected", str(e))
        except RaftError as e:
            pending.fail("rejected", str(e))

    # -- requests --

    def _req_propose(self, pending: Pending, data: bytes) -> None:
        index = self.node.propose(data)
        self._proposals[index] = _Proposal(self.node.term, pending, time.monotonic())

    def _req_conf_change(self, pending: Pending, cc: ConfChange) -> None:
        index = self.node.propose_conf_change(cc)
        self._proposals[index] = _Proposal(self.node.term, pending, time.monotonic())

    def _req_read(self, pending: Pending, key: str | None) -> None:
        """A linearizable read of ``key``; of None, a read barrier: answered with the
        applied index once this node has applied every write acknowledged before."""
        ctx = next(self._ctx).to_bytes(8, "big")
        self.node.read_index(ctx)
        self._reads_by_ctx[ctx] = (key, pending, self.node.term, self.node.lead, time.monotonic())

    def _req_transfer(self, pending: Pending, to: str) -> None:
        self.node.transfer_leadership(to)
        pending.set(None)

    # == Ready processing ===================================================================

    async def _process(self) -> None:
        for _ in self._rounds():
            await self._sync()

    def _rounds(self):
        """Carry out Readies until there are none; yields where one must be made durable
        before it goes on (the caller fsyncs: ``_process`` as it sees fit, a direct round
        inline)."""
        node = self.node
        prev_role, prev_lead, prev_term = self._seen
        progressed = False
        while node.has_ready():
            # raft/ready.py: persist, send the leader's appends, apply what was durable,
            # fsync, send the rest, apply, advance. Nothing steps the node while the
            # fsync runs (inline, or awaited in a worker thread: only the owner of this
            # loop steps it), so the leader counts itself towards a commit only after its
            # own fsync.
            self._sends_waiting = False
            rd = begin_ready(node, self.storage, self, self)
            if rd is None:
                break
            if rd.must_sync:
                yield
            finish_ready(node, rd, self, self)
            progressed = True
            if rd.snapshot is not None:
                # Installed and restored: the core holds its bytes, the state machine
                # what they describe. Keep the file instead (read back to send it on).
                node.hold_snapshot_as(self._snapshot_file(node.log.snapshot))
            for rs in rd.read_states:
                entry = self._reads_by_ctx.pop(rs.ctx, None)
                if entry is not None:
                    key, pending = entry[:2]
                    heapq.heappush(self._reads_ready, _Read(rs.index, next(self._read_seq), key, pending))
        self._serve_reads()
        if node.role is not prev_role or node.lead != prev_lead or node.term != prev_term:
            self._seen = (node.role, node.lead, node.term)
            self._fail_orphaned_reads()
            if node.quorum_losses != self._quorum_losses_seen:
                self._quorum_losses_seen = node.quorum_losses
                if self.on_quorum_lost is not None:
                    self.on_quorum_lost()
            if node.lead != prev_lead and node.lead is not None:
                self.leader_changes.append(time.monotonic())
                del self.leader_changes[:-64]
            log.info("role change", extra={"role": node.role.value, "term": node.term,
                                            "leader": node.lead})
        if progressed:
            if self.after_apply is not None and node.log.applied == node.log.committed:
                self.after_apply()
            self._maybe_snapshot()
            self.version += 1
            self.changed.set()
            self.changed = trio.Event()

    # A fast fsync (this machine's: 0.1-0.3 ms) runs right here: handing it to a worker
    # thread and back costs more CPU than it saves (a futex wake each way, the thread's
    # naming, the trio token's wake-up socket) and adds two hops to every write's path.
    # A slow one (a busy or rotating disk: milliseconds) goes to the thread, so the loop
    # keeps sending and answering meanwhile. Which: by the recent fsyncs, each timed where
    # it ran (the thread times its own), so a disk that gets fast again is noticed.
    INLINE_SYNC_S = 0.001
    SYNC_EWMA_WEIGHT = 0.2

    def _sync_is_fast(self) -> bool:
        """Whether the next fsync runs in this task (``_sync_here``) rather than a thread."""
        return not self.sync_in_thread or self.sync_ewma < self.INLINE_SYNC_S

    async def _sync(self) -> None:
        if self._sync_is_fast():
            # Let what this Ready left to writer tasks (appends under fault rules, or
            # behind a full socket) leave first, then block on the disk. Written at once
            # (the usual case, plain TCP or TLS), they already left: no scheduling pass.
            if self._sends_waiting:
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._sync_here()
            return
        # Not cancellable half-way: the thread finishes its fsync before we go on or
        # unwind (a cancelled driver ends the agent anyway).
        took = await trio.to_thread.run_sync(self._timed_sync)
        self.syncs_threaded += 1
        self.sync_ewma += self.SYNC_EWMA_WEIGHT * (took - self.sync_ewma)

    def _sync_here(self) -> None:
        if not self.sync_in_thread:
            self.storage.sync()
            return
        took = self._timed_sync()
        self.syncs_inline += 1
        self.sync_ewma += self.SYNC_EWMA_WEIGHT * (took - self.sync_ewma)

    def _timed_sync(self) -> float:
        t0 = time.perf_counter()
        self.storage.sync()
        return time.perf_counter() - t0

    def _serve_reads(self) -> None:
        applied = self.state.applied_index
        heap = self._reads_ready
        while heap and heap[0].index <= applied:
            r = heapq.heappop(heap)
            r.pending.set(applied if r.key is None else self.state.get(r.key))

    def _fail_orphaned_reads(self) -> None:
        """Reads asked under another term or leader cannot be confirmed any more: a
        deposed leader's heartbeats go unanswered, a follower's request went to a node
        that no longer leads. Answer them ``not_leader`` now, so the client tries the
        leader at once instead of waiting out the request's timeout."""
        node = self.node
        for ctx in [ctx for ctx, r in self._reads_by_ctx.items()
                    if r[2] != node.term or r[3] != node.lead]:
            pending = self._reads_by_ctx.pop(ctx)[1]
            pending.fail("not_leader", "leadership changed before the read was confirmed; "
                         "retry at the leader", node.lead)

    # A ReadIndex request or its answer can be lost (a loss fault, a full inbox) and the
    # core does not resend it; its client gave up long before this (its request timeout,
    # 10 s at most), so the entry only holds memory until a leader change. Swept here.
    READ_LOST_S = 30.0

    def _sweep_lost_reads(self) -> None:
        now = time.monotonic()
        if now - self._reads_swept_at < 1.0:
            return
        self._reads_swept_at = now
        for ctx in [ctx for ctx, r in self._reads_by_ctx.items() if now - r[4] > self.READ_LOST_S]:
            self._reads_by_ctx.pop(ctx)[1].fail(
                "timeout", f"the read was not confirmed within {self.READ_LOST_S:g}s")
            self.reads_lost += 1

    def _maybe_snapshot(self) -> None:
        applied = self.state.applied_index
        since = applied - self.last_snapshot_index
        if since < self.snapshot_interval:
            return
        if (since < SNAPSHOT_MAX_INTERVALS * self.snapshot_interval
                and self.log_bytes * 100 < self.snapshot_log_percent * self.last_snapshot_bytes):
            return
        if self.node.log.applied != applied:
            return
        if self.snapshot_in_thread and self._nursery is not None:
            if not self._snap_inflight and trio.current_time() >= self._snap_not_before:
                self._start_snapshot()
            return
        t0 = time.perf_counter()
        snap = self.node.create_snapshot(self.state.snapshot())
        self.storage.compact(snap)
        self.last_snapshot_index = snap.meta.index
        self.last_snapshot_bytes = len(snap.data)
        self.log_bytes = 0
        self.snapshots_taken += 1
        ms = round((time.perf_counter() - t0) * 1000, 1)
        log.info("snapshot", extra={"index": snap.meta.index, "bytes": len(snap.data), "ms": ms,
                                    "total_ms": ms, "background": False})

    # Snapshots in the background. The loop must keep ticking (heartbeats) and stepping
    # while a big state is serialized and fsynced: that took 380-950 ms at 100k-300k keys,
    # longer than the election timeout. Here: capture a view at A = applied (in this task;
    # the key-value table frozen, not copied, until the thread is done with it; the rest
    # shallow copies), serialize it and write its file in a worker thread (the storage
    # lock is not held meanwhile, so the WAL's save/sync go on), then, back in this task,
    # the core adopts it at A if it has not moved past A, and storage purges the WAL.
    # At most one in flight.

    def _start_snapshot(self) -> None:
        t0 = time.perf_counter()
        index = self.state.applied_index
        term = self.node.log.term(index)
        assert term is not None, "applied entries are in the log"
        # The core applies membership changes when their entries apply, so its conf now is
        # the one at ``index``; a change applied before the snapshot is adopted makes the
        # core refuse it (create_snapshot).
        meta = SnapshotMeta(index, term, self.node.conf)
        view = self.state.snapshot_view()  # released by _snapshot_in_background
        try:
            self._nursery.start_soon(self._snapshot_in_background, view, meta, t0,
                                     time.perf_counter() - t0)
        except BaseException:
            self.state.release_view(view)
            raise
        self._snap_inflight = True
        self._snap_log_bytes = self.log_bytes

    async def _snapshot_in_background(self, view: StateView, meta: SnapshotMeta, t0: float,
                                      loop_s: float) -> None:
        storage = self.storage

        def work() -> tuple[Snapshot, bool]:
            # in pieces: storage writes them one by one, never joined (SnapshotChunks)
            snap = Snapshot(meta, serialize_view_chunks(view))
            return snap, storage.write_snapshot_file(snap)

        try:
            # Not abandoned on cancel: the thread finishes (and cleans up its temp file).
            snap, written = await trio.to_thread.run_sync(work)
        except (OSError, ValueError, RuntimeError) as exc:
            # The WAL was not touched: the node is as safe as before. Try again later.
            self._snap_inflight = False
            self._snap_not_before = trio.current_time() + 5.0
            log.warning("snapshot failed", extra={"index": meta.index, "error": repr(exc)})
            return
        finally:
            # The thread is done with the view, however it ended: the key-value table
            # takes the changes made since the capture (O(those changes), in this task).
            t1 = time.perf_counter()
            self.state.release_view(view)
            release_s = time.perf_counter() - t1
        self._snap_done = (snap, written, t0, loop_s, release_s)

    async def _delete_purged(self) -> None:
        try:
            await trio.to_thread.run_sync(self.storage.delete_purged)
        except OSError as exc:  # a directory fsync failed: the files are gone, or left
            log.warning("old log files not deleted", extra={"error": repr(exc)})

    def _finish_snapshot(self) -> None:
        snap, written, t0, loop_s, release_s = self._snap_done
        self._snap_done = None
        self._snap_inflight = False
        t1 = time.perf_counter()
        index = snap.meta.index
        adopted = None
        if written:
            # The core holds the file, not the bytes (storage.SnapshotFile): the leader
            # needs them only to send to a follower that fell behind the log.
            data = self._snapshot_file(snap).data
            adopted = self.node.create_snapshot(data, index=index)
        if adopted is None:
            # The node moved past ``index`` (a snapshot from the leader, or a membership
            # change after it): this one is stale.
            if written:
                self.storage.discard_snapshot_file(snap)
            self.snapshots_dropped += 1
            log.info("snapshot dropped", extra={"index": index, "snapshot_index": self.node.log.snapshot_index()})
            return
        assert adopted.meta == snap.meta, (adopted.meta, snap.meta)
        # The old files go in a worker thread: unlinking a snapshot file of 100 MB and
        # fsyncing the directories took 20-80 ms here at 750k keys.
        self.storage.finish_compact(adopted, delete=False)
        self._nursery.start_soon(self._delete_purged)
        size = len(snap.data)
        del snap  # the serialized bytes: the core holds the file now
        release_free_memory()
        if index > self.last_snapshot_index:
            self.last_snapshot_index = index
            self.last_snapshot_bytes = size
            self.log_bytes = max(0, self.log_bytes - self._snap_log_bytes)
        self.snapshots_taken += 1
        now = time.perf_counter()
        # ms: how long the loop was held up by it (capture + release + adopt); total_ms:
        # from the capture to the adoption, mostly in the worker thread.
        log.info("snapshot", extra={"index": index, "bytes": size,
                                    "ms": round((loop_s + release_s + now - t1) * 1000, 1),
                                    "capture_ms": round(loop_s * 1000, 1),
                                    "release_ms": round(release_s * 1000, 1),
                                    "adopt_ms": round((now - t1) * 1000, 1),
                                    "total_ms": round((now - t0) * 1000, 1), "background": True})

    # -- the Outbox and StateMachine protocols used by process_ready --

    def send(self, messages) -> None:
        out = []
        for m in messages:
            if type(m) is InstallSnapshot:
                if not isinstance(m.snapshot.data, bytes):
                    m = self._read_snapshot(m)
                    if m is None:
                        continue
                self.snapshots_sent += 1
                log.info("snapshot sent", extra={"to": m.to, "index": m.snapshot.meta.index,
                                                 "bytes": len(m.snapshot.data)})
            out.append(m)
        self.messages_out += len(out)
        if self._send_batch is not None:
            if not self._send_batch(out):
                self._sends_waiting = True
        else:
            for m in out:
                self._send(m)
            self._sends_waiting = True

    def _snapshot_held(self) -> str | None:
        """Where the core's current snapshot lives: "file" (read back when sent),
        "memory" (its bytes), None (no snapshot yet)."""
        snap = self.node.log.snapshot
        if snap is None:
            return None
        return "memory" if isinstance(snap.data, (bytes, bytearray)) else "file"

    def _snapshot_file(self, snap: Snapshot) -> Snapshot:
        """``snap`` with its data left in its file, or as it is if that cannot be done."""
        try:
            return self.storage.snapshot_file(snap)
        except OSError as exc:  # the file cannot be opened: keep the bytes instead
            log.warning("snapshot kept in memory", extra={"index": snap.meta.index,
                                                          "error": repr(exc)})
            if not isinstance(snap.data, (bytes, bytearray)):  # SnapshotChunks: one buffer
                snap = Snapshot(snap.meta, bytes(snap.data))
            return snap

    def _read_snapshot(self, m: InstallSnapshot) -> InstallSnapshot | None:
        """The message with its snapshot's bytes read back from disk; None (the message is
        dropped: the core sends the snapshot again after an election timeout) if they do
        not read back."""
        snap = m.snapshot
        try:
            data = bytes(snap.data)
        except (OSError, ValueError) as exc:
            log.error("snapshot does not read back; not sent", extra={
                "index": snap.meta.index, "to": m.to, "error": repr(exc)})
            return None
        return replace(m, snapshot=Snapshot(snap.meta, data))

    def _check_incoming_snapshot(self, m: InstallSnapshot) -> bool:
        """Load a leader's snapshot before the core sees it: one that does not load is
        refused here (logged, counted; the node stays as it was and the leader tries again
        after an election timeout), instead of being stored and then failing to restore.
        The loaded machine is kept for ``restore``, so the work is not done twice."""
        try:
            loaded = StateMachine.load(m.snapshot.data)
        except StateError as exc:
            self.snapshots_refused += 1
            log.error("snapshot from the leader refused", extra={
                "leader": m.frm, "index": m.snapshot.meta.index, "error": str(exc)})
            return False
        self._incoming = (m.snapshot.meta, loaded)
        return True

    def restore(self, snapshot: Snapshot) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None and incoming[0] == snapshot.meta:
            self.state.adopt(incoming[1])
        else:
            self.state.restore(snapshot.data)
        self.last_snapshot_index = snapshot.meta.index
        self.last_snapshot_bytes = len(snapshot.data)
        self.log_bytes = 0
        self.snapshots_installed += 1
        log.info("snapshot installed", extra={"index": snapshot.meta.index, "bytes": len(snapshot.data),
                                              "leader": self.node.lead})
        # Every proposal at or below the snapshot is decided, but we cannot tell how:
        # its outcome is unknown to us.
        for index in [i for i in self._proposals if i <= snapshot.meta.index]:
            p = self._proposals.pop(index)
            p.pending.fail("timeout", "replaced by a snapshot before it applied here; "
                                      "the outcome is unknown, retry with the same seq")

    def apply(self, entry: Entry) -> None:
        if entry.index <= self.state.applied_index:
            return  # already in the restored snapshot
        self.log_bytes += len(entry.data)
        result = self.state.apply_entry(entry)
        if entry.kind is EntryKind.CONF_CHANGE and self._on_apply_conf is not None:
            try:
                self._on_apply_conf(ConfChange.decode(entry.data))
            except Exception:  # a bad conf change entry is reported by the state machine
                log.exception("applying a membership change to the transport failed")
        p = self._proposals.pop(entry.index, None)
        if p is None:
            return
        if p.term != entry.term:
            # Another leader's entry took the slot: our command was never applied.
            p.pending.fail("dropped", "the proposal was overwritten by a new leader; "
                                      "it was not applied; retry with the same seq",
                           self.node.lead)
        else:
            p.pending.set((entry.index, result))
            if self.metrics is not None:
                self.metrics.observe_commit(time.monotonic() - p.started)

    # == status ==============================================================================

    def status(self) -> dict[str, Any]:
        st = self.node.status()
        progress = {
            peer: {"match": p.match, "next": p.next, "state": p.state,
                   "active": p.recent_active, "learner": p.learner, "inflight": p.inflight}
            for peer, p in st["progress"].items()
        }
        reports = {}
        for peer, p in st["progress"].items():
            if p.report:
                try:
                    reports[peer] = msgpack.unpackb(p.report, raw=False)
                except Exception:
                    pass
        now = time.monotonic()
        return {
            "role": st["role"],
            "term": st["term"],
            "vote": st["vote"],
            "leader": st["leader"],
            "commit": st["commit"],
            "applied": self.state.applied_index,
            "last_index": st["last_index"],
            "first_index": st["first_index"],
            "snapshot_index": st["snapshot_index"],
            "voters": st["voters"],
            "learners": st["learners"],
            "priority": st["priority"],
            "transferee": st["transferee"],
            "unfit": st["unfit"],
            "progress": progress,
            "peer_reports": reports,
            "digest": self.state.digest(),
            "keys": self.state.statistics().keys,  # a count: keys() sorts them all
            "leader_changes_1m": sum(1 for t in self.leader_changes if now - t < 60),
            "snapshots": {"taken": self.snapshots_taken, "dropped": self.snapshots_dropped,
                          "sent": self.snapshots_sent, "installed": self.snapshots_installed,
                          "refused": self.snapshots_refused, "held": self._snapshot_held(),
                          "in_flight": self._snap_inflight,
                          "last_index": self.last_snapshot_index,
                          "last_bytes": self.last_snapshot_bytes,
                          "log_entries_since": self.state.applied_index - self.last_snapshot_index,
                          "log_bytes_since": self.log_bytes},
            "fsync": {"inline": self.syncs_inline, "threaded": self.syncs_threaded,
                      "recent_ms": round(self.sync_ewma * 1000, 3)},
            "direct_rounds": self.direct_rounds,
            "early_campaigns": self.early_campaigns,
            "quorum_losses": self.node.quorum_losses,
            "pending_proposals": len(self._proposals),
            "pending_reads": len(self._reads_by_ctx) + len(self._reads_ready),
            "reads_lost": self.reads_lost,
            "inbox_dropped": self.dropped_inbox,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "pid": os.getpid(),
        }
