"""Tasks in the agent: the leader's placement and lease expiry, and each node's execution
and result reporting. The rules live in pure modules: the task table in ``state.py``,
placement in ``dispatch.py``, load reports in ``loads.py``. This module moves data
between them, the Raft driver, the executor and the network.

Leader, every tick (inside the driver task, so it may touch the core and the state):
- record the load reports peers attached to their heartbeat responses;
- place every ``submitted`` task on a live node by its policy and propose ``assign_task``
  (a compare-and-set on the attempt number, so two leaders cannot both assign it);
- propose ``expire_task`` for an attempt whose node has been silent for a lease, once this
  leader has itself led for a lease (a new leader first gives every node a chance to report).

Every node, after each round of applied entries (also inside the driver task):
- start (in the executor) every attempt the state assigns to it that it is not running;
- cancel what it runs that the state no longer assigns to it (cancelled, or reassigned).

Results go to the leader as ``complete_task`` commands: proposed directly on the leader, or
relayed as a ``task_report`` request from a follower, and retried until the state shows the
attempt settled (the command is idempotent: a repeat is a stale attempt, ignored).

A report can still be lost while its node stays alive: the report queue was full, or the
cluster had no leader for longer than a report retries (``REPORT_RETRY_S``). The lease does
not settle that (the node keeps answering heartbeats), so every ``RESEND_INTERVAL_S`` each
node compares the state with its executor: an attempt the state still shows open here
whose result the executor holds, or that the state shows ``assigned`` while it runs here,
has its report sent again, unless one is in flight or was sent in the last
``RESEND_AFTER_S``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from . import state as st
from .dispatch import NodeLoad, PolicyState, TaskHint, place_many
from .driver import RequestFailed
from .executor import Executor, TaskResult, TaskSpec
from .loads import LoadTable
from .raft.messages import NotLeader, ProposalDropped, Role

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("nodeagent.tasks")

FINAL = ("succeeded", "failed", "timed_out", "cancelled")

REPORT_RETRY_S = 300.0  # how long one report is retried before it is left to the resend pass
RESEND_INTERVAL_S = 1.0  # how often a node looks for open attempts it has a report for
RESEND_AFTER_S = 2.0  # a report sent this recently is not sent again (it may be applying)


def now_ms() -> int:
    return int(time.time() * 1000)


def read_report(raw: bytes) -> dict:
    """A peer's load report (``TaskManager.load_report``) as a map; empty when it is not
    one (a malformed report says nothing)."""
    try:
        r = msgpack.unpackb(raw, raw=False)
    except Exception:
        return {}
    return r if isinstance(r, dict) else {}


class TaskManager:
    def __init__(self, agent: "Agent"):
        self.agent = agent
        cfg = agent.cfg
        self.node_id = agent.node_id
        self.default_policy = cfg.cluster.dispatch_policy
        self.queue_per_slot = cfg.cluster.task_queue_per_slot
        self.lease = cfg.cluster.task_lease_ms / 1000.0
        self.max_attempts = cfg.cluster.max_attempts
        self.retention = cfg.cluster.task_retention
        self._forget_not_before = 0.0  # one forget_tasks in flight at a time, roughly
        self.executor = Executor(cfg.node.capacity, allow_shell=cfg.node.allow_shell,
                                 on_start=self._on_start, on_result=self._on_result)
        self.loads = LoadTable()
        self.policy_state = PolicyState()
        self._raw_reports: dict[str, bytes] = {}
        self._assigning: dict[str, int] = {}  # task id -> attempt proposed, not yet applied
        self._pending_node: dict[str, str] = {}  # task id -> node of that proposal
        self._pending_since: dict[str, float] = {}
        self._expiring: dict[str, int] = {}
        self._leader_since: float | None = None
        self._leader_term = -1
        self._report_send, self._report_recv = trio.open_memory_channel(10_000)
        self._report_seq = 0
        # (task, attempt, event) of the reports being delivered, and when each report was
        # last handed over (for the resend pass; pruned to the attempts still open here).
        self._in_flight: set[tuple[str, int, str]] = set()
        self._last_sent: dict[tuple[str, int, str], float] = {}
        # Tests only: drop this many reports as if the queue had been full (a lost report).
        self._drop_reports = int(os.environ.get("RAFTDECK_TEST_DROP_REPORTS", "0") or 0)
        self.assigned_total = 0
        self.expired_total = 0
        self.reports_resent = 0
        self.reports_lost = 0

    # == the node's own load report ===========================================================

    def load_report(self) -> bytes:
        ex = self.executor
        self._report_seq += 1
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = 0.0
        return msgpack.packb({"running": ex.running(), "queued": ex.queued(),
                              "capacity": ex.capacity, "shell": ex.allow_shell,
                              "load1": round(load1, 2), "seq": self._report_seq,
                              "disk_low": self.agent.disk_low()})

    # == leader: placement and expiry (called by the driver on every tick) ======================

    def on_tick(self) -> None:
        d = self.agent.driver
        node = d.node
        if node.role is not Role.LEADER:
            self._leader_since = None
            self._assigning.clear()
            self._expiring.clear()
            return
        now = time.monotonic()
        if self._leader_term != node.term or self._leader_since is None:
            self._leader_term = node.term
            self._leader_since = now
            self._assigning.clear()
            self._expiring.clear()
            self.policy_state = PolicyState()
        if node.log.term(node.log.committed) != node.term:
            return  # the state may still change under us: wait for our own entry
        self._collect_reports(now)
        state = d.state
        self._settle_pending(state)
        alive = self._alive(now)
        batch: list[bytes] = []
        # A new leader first hears every live node's load (one heartbeat round, with room
        # to spare), or it would place everything on itself, the only node it knows.
        if now - self._leader_since >= 3 * self.agent.driver.tick_interval:
            batch += self._place(state, alive)
        if now - self._leader_since >= self.lease:
            batch += self._expire(state, alive, now)
        batch += self._retention(state, now)
        if batch:
            try:
                node.propose_many(batch)
            except (NotLeader, ProposalDropped):
                self._assigning.clear()
                self._expiring.clear()

    def _retention(self, state: st.StateMachine, now: float) -> list[bytes]:
        """Keep the table bounded: once the finished tasks exceed ``task_retention`` by a
        tenth (at least 100), forget the oldest down to it (one replicated command, so
        every replica forgets the same ones)."""
        slack = max(100, self.retention // 10)
        if now < self._forget_not_before or state.finished_tasks() <= self.retention + slack:
            return []
        self._forget_not_before = now + 5.0  # until it has applied (or was lost)
        return [st.encode_command("forget_tasks", keep=self.retention)]

    def _collect_reports(self, now: float) -> None:
        node = self.agent.driver.node
        self.loads.report(self.node_id, now, self.executor.running(), self.executor.queued(),
                          self.executor.capacity, 0.0)
        for peer, pr in node.prs.items():
            if peer == self.node_id or not pr.report:
                continue
            if self._raw_reports.get(peer) == pr.report:
                continue  # unchanged: no sign of life (a live node bumps its seq)
            self._raw_reports[peer] = pr.report
            r = read_report(pr.report)
            try:
                self.loads.report(peer, now, int(r["running"]), int(r["queued"]),
                                  max(1, int(r["capacity"])), float(r.get("load1", 0.0)))
            except (KeyError, TypeError, ValueError):
                continue

    def _alive(self, now: float) -> set[str]:
        members = self.agent.driver.node.conf.members
        return {n for n in self.loads.alive(now, self.lease) if n in members}

    def _settle_pending(self, state: st.StateMachine) -> None:
        for tid, attempt in list(self._assigning.items()):
            t = state.task(tid)
            stuck = time.monotonic() - self._pending_since.get(tid, 0) > 10.0
            if t is None or t["attempt"] >= attempt or t["state"] != "submitted" or stuck:
                del self._assigning[tid]
                self._pending_node.pop(tid, None)
                self._pending_since.pop(tid, None)
        for tid, attempt in list(self._expiring.items()):
            t = state.task(tid)
            if t is None or t["attempt"] != attempt or t["state"] in FINAL or t["state"] == "submitted":
                del self._expiring[tid]

    def limit(self, capacity: int) -> int:
        """The most tasks the leader gives a node of ``capacity`` slots at once: a slot's
        worth running plus ``task_queue_per_slot`` queued per slot. The rest wait in the
        table (``submitted``) and go to whichever node frees a slot first (late binding)."""
        return capacity * (1 + self.queue_per_slot)

    def _place(self, state: st.StateMachine, alive: set[str]) -> list[bytes]:
        if state.task_counts()["submitted"] <= len(self._assigning):
            return []  # none waits but those being assigned
        load = dict(state.node_load())
        # Assignments proposed but not applied yet count too, or one tick would pile a
        # whole burst onto the node that looked least loaded before it.
        for tid in self._assigning:
            n = self._pending_node.get(tid)
            if n is not None:
                load[n] = load.get(n, 0) + 1
        room = 0
        for n in alive:
            rep = self.loads.get(n)
            if rep is not None:
                room += max(0, self.limit(rep.capacity) - load.get(n, 0))
        if room == 0:
            return []  # every node is full: the tasks wait for a slot
        out: list[bytes] = []
        ts = now_ms()
        # Group by policy so each policy sees the whole batch (and spreads it). A few more
        # than the room: a hash task whose node is full is passed over.
        by_policy: dict[str, list[dict]] = {}
        scan = min(2000, 4 * room + 16)
        waiting = [tid for tid in state.first_submitted(scan + len(self._assigning))
                   if tid not in self._assigning][:scan]
        for tid in waiting:
            t = state.task(tid)
            by_policy.setdefault(t.get("policy") or self.default_policy, []).append(t)
        for policy, tasks in by_policy.items():
            shell_tasks = [t for t in tasks if t["kind"] == "shell"]
            plain = [t for t in tasks if t["kind"] != "shell"]
            for group, shell_only in ((plain, False), (shell_tasks, True)):
                if not group:
                    continue
                nodes = []
                for n in sorted(alive):
                    rep = self.loads.get(n)
                    if rep is None:
                        continue
                    if shell_only and not self._allows_shell(n):
                        continue
                    nodes.append(NodeLoad(n, rep.capacity, load.get(n, 0), True,
                                          self.limit(rep.capacity)))
                if not nodes:
                    continue
                hints = [TaskHint(t.get("key")) for t in group]
                chosen = place_many(policy, nodes, hints, self.policy_state)
                for t, n in zip(group, chosen):
                    if n is None:
                        continue  # no room now: it waits for a slot
                    load[n] = load.get(n, 0) + 1
                    attempt = t["attempt"] + 1
                    out.append(st.encode_command("assign_task", id=t["id"], node=n,
                                                 attempt=attempt, ts=ts))
                    self._assigning[t["id"]] = attempt
                    self._pending_node[t["id"]] = n
                    self._pending_since[t["id"]] = time.monotonic()
                    self.assigned_total += 1
        return out

    def _allows_shell(self, node: str) -> bool:
        if node == self.node_id:
            return self.executor.allow_shell
        raw = self._raw_reports.get(node)
        return bool(raw) and read_report(raw).get("shell") is True

    def any_shell(self) -> bool:
        members = self.agent.driver.node.conf.members
        return any(self._allows_shell(n) for n in members)

    def _expire(self, state: st.StateMachine, alive: set[str], now: float) -> list[bytes]:
        out = []
        ts = now_ms()
        for s in ("assigned", "running"):
            for tid in state.tasks_by_state(s):
                t = state.task(tid)
                node = t["node"]
                if node in alive or tid in self._expiring:
                    continue
                rep = self.loads.get(node)
                silent = (now - rep.at) if rep is not None else (now - self._leader_since)
                reason = f"node {node} silent for {silent:.1f}s"
                out.append(st.encode_command("expire_task", id=tid, attempt=t["attempt"],
                                             reason=reason, ts=ts))
                self._expiring[tid] = t["attempt"]
                self.expired_total += 1
                log.warning("task attempt lost", extra={"task": tid, "attempt": t["attempt"],
                                                        "on": node, "reason": reason})
        return out

    # == every node: run what is assigned here (called by the driver after applying) ==========

    def reconcile(self) -> None:
        d = self.agent.driver
        state = d.state
        mine = set()
        for tid in state.tasks_on(self.node_id):
            t = state.task(tid)
            if t is None or t["node"] != self.node_id:
                continue
            mine.add(tid)
            spec = TaskSpec(tid, t["attempt"], t["kind"], dict(t["args"]), t["timeout_ms"])
            self.executor.submit(spec)  # idempotent for a (id, attempt) it already has
        for tid in self.executor.active_ids() - mine:
            self.executor.cancel(tid)  # cancelled, or its attempt was given to another node

    # == results: report to the leader =========================================================

    def _on_start(self, spec: TaskSpec) -> None:
        self._queue_report({"event": "start", "task": spec.id, "attempt": spec.attempt,
                            "node": self.node_id, "ts": now_ms()})

    def _on_result(self, r: TaskResult) -> None:
        if r.outcome == "cancelled":
            return  # the state decided it (cancel, or a newer attempt); nothing to report
        self._queue_report(self._complete_report(r))

    def _complete_report(self, r: TaskResult) -> dict:
        return {"event": "complete", "task": r.id, "attempt": r.attempt, "node": self.node_id,
                "outcome": r.outcome, "exit_code": r.exit_code, "stdout": r.stdout,
                "stderr": r.stderr, "error": r.error, "ts": int(r.finished_at * 1000)}

    def _queue_report(self, report: dict) -> bool:
        """Hand ``report`` to ``run`` for delivery; False if one for the same attempt and
        event is in flight, or the queue is full (the resend pass sends it later)."""
        key = (report["task"], report["attempt"], report["event"])
        if key in self._in_flight:
            return False
        self._last_sent[key] = time.monotonic()
        if self._drop_reports > 0:
            self._drop_reports -= 1
            self.reports_lost += 1
            log.warning("task report dropped (RAFTDECK_TEST_DROP_REPORTS)",
                        extra={"task": report["task"], "attempt": report["attempt"],
                               "event": report["event"]})
            return False
        try:
            self._report_send.send_nowait(report)
        except trio.WouldBlock:
            self.reports_lost += 1
            log.warning("report queue full; the report is sent again later",
                        extra={"task": report["task"], "attempt": report["attempt"],
                               "event": report["event"]})
            return False
        self._in_flight.add(key)
        return True

    def unreported(self, now: float) -> list[dict]:
        """Reports to send again: for every attempt the state shows open on this node,
        its result if the executor holds one, or its start if the state still shows it
        ``assigned`` while it runs here; none in flight or sent in the last
        ``RESEND_AFTER_S``. Forgets the send times of attempts no longer open here."""
        state = self.agent.driver.state
        out: list[dict] = []
        keep: dict[tuple[str, int, str], float] = {}
        for tid in state.tasks_on(self.node_id):
            brief = state.task_attempt(tid)
            if brief is None or brief[2] != self.node_id:
                continue
            attempt, task_state, _ = brief
            for event in ("start", "complete"):
                key = (tid, attempt, event)
                if key in self._last_sent:
                    keep[key] = self._last_sent[key]
            r = self.executor.result(tid, attempt)
            if r is not None and r.outcome != "cancelled":
                report = self._complete_report(r)
            elif r is None and task_state == "assigned" and self.executor.started(tid, attempt):
                report = {"event": "start", "task": tid, "attempt": attempt,
                          "node": self.node_id, "ts": now_ms()}
            else:
                continue
            key = (tid, attempt, report["event"])
            if key in self._in_flight or now - keep.get(key, -RESEND_AFTER_S) < RESEND_AFTER_S:
                continue
            out.append(report)
        for key in self._in_flight:
            if key in self._last_sent:
                keep[key] = self._last_sent[key]
        self._last_sent = keep
        return out

    def resend_unreported(self) -> int:
        """Send again what ``unreported`` finds; how many were handed over."""
        sent = 0
        for report in self.unreported(time.monotonic()):
            if self._queue_report(report):
                sent += 1
                self.reports_resent += 1
                log.info("task report sent again", extra={
                    "task": report["task"], "attempt": report["attempt"], "event": report["event"]})
        return sent

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.executor.run)
            nursery.start_soon(self._resend_loop)
            task_status.started()
            async for report in self._report_recv:
                nursery.start_soon(self._deliver_report, report)

    async def _resend_loop(self) -> None:
        while True:
            await trio.sleep(RESEND_INTERVAL_S)
            self.resend_unreported()

    def _settled(self, report: dict) -> bool:
        t = self.agent.driver.state.task(report["task"])
        if t is None or t["attempt"] != report["attempt"] or t["state"] in FINAL:
            return True
        return report["event"] == "start" and t["state"] == "running"

    async def _deliver_report(self, report: dict) -> None:
        try:
            await self._deliver(report)
        finally:
            key = (report["task"], report["attempt"], report["event"])
            self._in_flight.discard(key)
            if key in self._last_sent:  # delivered or given up: wait before sending again
                self._last_sent[key] = time.monotonic()

    async def _deliver(self, report: dict) -> None:
        agent = self.agent
        delay = 0.05
        deadline = trio.current_time() + REPORT_RETRY_S
        while trio.current_time() < deadline:
            if self._settled(report):
                return
            try:
                await agent.propose_report(report)
                return
            except RequestFailed as e:
                if e.code in ("stale_attempt", "no_such_task", "already_final"):
                    return
            except Exception as e:  # a broken relay: try again
                log.debug("report failed", extra={"task": report["task"], "error": repr(e)})
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)


def report_command(report: dict) -> bytes:
    if report["event"] == "start":
        return st.encode_command("start_task", id=report["task"], node=report["node"],
                                 attempt=report["attempt"], ts=report.get("ts") or now_ms())
    fields: dict[str, Any] = dict(
        id=report["task"], node=report["node"], attempt=report["attempt"],
        outcome=report["outcome"], exit_code=report.get("exit_code"),
        stdout=report.get("stdout", b""), stderr=report.get("stderr", b""),
        ts=report.get("ts") or now_ms())
    if report.get("error"):
        fields["error"] = report["error"][:4096]
    return st.encode_command("complete_task", **fields)
