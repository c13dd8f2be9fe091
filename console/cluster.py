"""The console's model of the cluster, built from the agents' status streams. Pure.

No I/O, no asyncio, no Textual, no clock: every method that needs time takes ``now``
(monotonic seconds, the caller's clock). The console's network tasks call

    model.update(node, status, now)       # a ``status`` / ``status_update`` map arrived
    model.unreachable(node, error, now)   # the connection failed / timed out

and one render timer (2-4 Hz) calls ``model.tick(now)`` and reads the model:
``rows()``/``row()``, ``changed_since(version)``, ``health(now)``, ``new_events(n)``,
``load_history(node)``, ``divergence()``.

Cost. ``update()`` is O(size of the status it is given), never O(number of nodes): every
aggregate the health header needs (reachable count, leader views, leader claimants, the
fault union, digest agreement per applied index) is maintained incrementally. The few
things that touch many rows are caused by a status that is itself that big (the leader's
``progress`` lists every member, so its status updates every member's lag) or are rare
transitions (a new leader: every lag is recomputed; an applied index turning from agreement
to a digest conflict: every node holding that index is re-marked). ``tick()``, ``rows()``
and ``divergence()`` are O(nodes): they run at render rate, not per status. ``stats()``
counts the per-node work so tests can check the update path stays flat as nodes grow.

Versions. ``version`` grows on every change (rows, health, events, load history);
``row_version(name)`` is the ``version`` at which that node's row last changed, and
``changed_since(v)`` the names of the rows changed after ``v`` (O(changed rows)), so a
line-rendered table redraws only those. A status identical to the previous one (the
agents' keep-alive pushes) changes nothing but ``last_seen``, which is not versioned: a
row shows its age with ``NodeRow.age(now)``.

Semantics worth knowing:

* ``leader`` (health): a node that says it is leader (role ``leader`` in its own, fresh
  status) and that more than half of the reachable nodes name as leader in that same term;
  if several qualify (split-brain views), the highest term. Otherwise None.
* ``lag``: how far a replica is behind the detected leader: ``leader commit - match`` when
  the leader's ``progress`` has the replica (the leader's fresh view), else ``leader commit -
  applied`` (the replica's own last status); for the leader itself ``commit - applied``;
  never negative; None when there is no leader or nothing is known.
* ``digest_ok``: each node keeps a small history ``{applied: digest}`` of its recent
  statuses (``digest_history`` entries). At every applied index held by two or more nodes'
  histories the digests are compared. ``False`` if any index in this node's history has
  more than one digest (every node holding that index is marked: the model cannot tell who
  is right; ``divergence()`` shows the groups), ``True`` if at least one index is shared
  with another node and all shared indexes agree, ``None`` if no other node has reported
  any index this node holds.
* Events are emitted once per change: ``leader_elected`` once per term (the first status
  that names a leader for a term newer than any seen; ``leader_changes_1m`` counts these,
  except the first one, which is discovery, not a change); ``term_changed`` when the
  highest term seen rises (not for the first status); ``node_down``/``node_up`` on
  reachability transitions (a node never seen that fails is ``node_down``; its first status
  is not ``node_up``); ``fault_injected``/``fault_healed`` when the first agent reports a
  rule / the last agent stops reporting it (a rule sent to every agent is one fault);
  ``task_failed`` when a node's executor ``failed``/``timed_out`` counters rise (per node:
  each attempt runs on one node), or, for a status without executor counters, when the
  replicated task table's ``failed``/``timed_out`` counts exceed the highest seen
  cluster-wide (every replica reports the same table); ``digest_mismatch`` when an applied
  index gets a second digest and the odd node(s) were not already reported (a diverged
  replica stays diverged, so one divergence gives one event until it agrees again).
* Faults of an unreachable agent stay in the union (its last report) until it reports
  again: a killed agent forgets its rules, and its next status heals them.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, NamedTuple

from nodeagent.state import diff_replicas

__all__ = [
    "COLUMNS",
    "ClusterModel",
    "DivergenceView",
    "Event",
    "EVENT_KINDS",
    "FaultInfo",
    "Health",
    "KeyDiff",
    "NodeInfo",
    "NodeRow",
    "ReplicaDivergence",
    "fault_key",
    "fault_summary",
    "node_infos",
]

EVENT_KINDS = (
    "leader_elected",
    "term_changed",
    "node_down",
    "node_up",
    "fault_injected",
    "fault_healed",
    "task_failed",
    "digest_mismatch",
)

# Executor counters shown per node (NodeRow.tasks), in this order, when present.
_EXEC_KEYS = ("running", "queued", "submitted", "started", "succeeded", "failed",
              "timed_out", "cancelled", "refused")
_EMPTY: Mapping[Any, Any] = MappingProxyType({})

# The state of one applied index across the nodes' digest histories.
_SOLO, _AGREE, _CONFLICT = 0, 1, 2


class NodeInfo(NamedTuple):
    """One inventory entry, as the model needs it."""

    name: str
    address: str
    priority: int = 1
    capacity: int = 1
    local: bool = True
    voter: bool = True  # inventory role "voter" (False: learner)


def node_infos(inventory: Any) -> list[NodeInfo]:
    """``NodeInfo`` for each node of a ``nodeagent.config.Inventory`` (local: no ``ssh:``)."""
    return [
        NodeInfo(n.name, f"{n.host}:{n.port}", n.priority, n.capacity,
                 getattr(n, "ssh", None) is None, getattr(n, "role", "voter") != "learner")
        for n in inventory.nodes
    ]


@dataclass(frozen=True, slots=True)
class Event:
    ts: float
    kind: str
    node: str | None
    text: str


@dataclass(frozen=True, slots=True)
class FaultInfo:
    """One distinct fault rule and how many agents report it."""

    summary: str
    key: tuple
    nodes: int


@dataclass(frozen=True, slots=True)
class Health:
    leader: str | None
    leader_term: int | None
    term: int  # highest term seen
    has_quorum: bool
    voters: tuple[str, ...]
    reachable_voters: int
    quorum: int  # votes needed
    leader_changes_1m: int
    faults: tuple[FaultInfo, ...]
    local: bool  # every node is on this machine
    nodes: int
    reachable: int
    divergent: bool  # some applied index has two digests
    tasks: Mapping[str, int]  # the replicated task table's counts, from the leader


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A snapshot of one node's row; rebuilt only when ``version`` changes."""

    name: str
    address: str
    priority: int
    capacity: int
    local: bool
    voter: bool  # membership: from the node's own status when known, else the inventory
    reachable: bool | None  # None: never heard from and never failed
    error: str | None
    role: str | None
    term: int | None
    leader: str | None  # as this node sees it
    commit: int | None
    applied: int | None
    last_index: int | None
    match: int | None  # the leader's view
    lag: int | None
    digest: str | None
    digest_ok: bool | None
    digest_suspect: bool  # named odd one out by a digest_mismatch, and not agreeing since
    keys: int | None
    running: int | None
    queued: int | None
    load: float | None  # (running + queued) / capacity
    tasks: Mapping[str, int]  # this node's executor counters
    faults: tuple[str, ...]
    last_seen: float | None
    version: int
    changed_at: Mapping[str, float]

    def age(self, now: float) -> float | None:
        """Seconds since the last status, None if never."""
        return None if self.last_seen is None else now - self.last_seen

    def recently_changed(self, name: str, now: float, window: float = 1.5) -> bool:
        t = self.changed_at.get(name)
        return t is not None and now - t < window


COLUMNS = tuple(f.name for f in fields(NodeRow) if f.name != "changed_at")


@dataclass(frozen=True, slots=True)
class ReplicaDivergence:
    name: str
    reachable: bool | None
    applied: int | None
    commit: int | None
    leader_commit: int | None
    match: int | None
    lag: int | None
    digest: str | None
    digest_ok: bool | None
    compared_at: int | None  # newest applied index in its history another node also holds
    agreed_at: int | None  # newest such index where all digests are equal
    conflict_at: int | None  # newest such index with more than one digest
    conflicts_with: tuple[str, ...]  # the nodes with another digest at conflict_at


@dataclass(frozen=True, slots=True)
class DivergenceView:
    leader: str | None
    leader_commit: int | None
    replicas: tuple[ReplicaDivergence, ...]
    conflicts: Mapping[int, Mapping[str, tuple[str, ...]]]  # index -> digest -> nodes


@dataclass(frozen=True, slots=True)
class KeyDiff:
    agreed: int  # keys present on every replica with one value
    differs: Mapping[str, frozenset[str]]  # per replica: keys it holds that are not agreed
    missing: Mapping[str, frozenset[str]]  # per replica: keys others hold and it lacks
    divergent_keys: frozenset[str]
    converged: bool


def fault_key(rule: Mapping[str, Any]) -> tuple:
    """Identity of a fault rule (duration excluded: it may be reported as time left)."""
    frm, to = rule.get("from"), rule.get("to")
    return (
        rule.get("action"),
        None if frm is None else tuple(sorted(frm)),
        None if to is None else tuple(sorted(to)),
        rule.get("ms"),
        rule.get("rate"),
    )


def fault_summary(rule: Mapping[str, Any]) -> str:
    """``"partition n1,n2 -> *"``, ``"latency 200ms * -> n3 (30s)"``, ``"loss 10% n1 -> n2"``."""
    action = rule.get("action", "?")
    frm, to = rule.get("from"), rule.get("to")
    detail = ""
    if action == "latency" and rule.get("ms") is not None:
        detail = f" {rule['ms']}ms"
    elif action == "loss" and rule.get("rate") is not None:
        detail = f" {rule['rate'] * 100:g}%"
    src = ",".join(sorted(frm)) if frm else "*"
    dst = ",".join(sorted(to)) if to else "*"
    dur = rule.get("duration_ms")
    tail = f" ({dur / 1000:g}s)" if dur is not None else ""
    return f"{action}{detail} {src} -> {dst}{tail}"


class _Node:
    __slots__ = (
        "name", "address", "priority", "capacity", "local", "voter",
        "status", "reachable", "error", "last_seen",
        "role", "term", "leader", "commit", "applied", "last_index", "digest", "keys",
        "running", "queued", "load", "tasks", "exec_fail", "faults", "fault_keys",
        "match", "lag", "view",
        "history", "agree_n", "conflict_n", "digest_ok",
        "changed_at", "version", "load_hist", "row", "quorum_losses", "refusing",
    )

    def __init__(self, info: NodeInfo, history_len: int) -> None:
        self.name = info.name
        self.address = info.address
        self.priority = info.priority
        self.capacity = info.capacity
        self.local = bool(info.local)
        self.voter = bool(info.voter)
        self.status: Mapping[str, Any] | None = None
        self.reachable: bool | None = None
        self.error: str | None = None
        self.last_seen: float | None = None
        self.role = self.term = self.leader = self.commit = self.applied = None
        self.last_index = self.digest = self.keys = None
        self.running = self.queued = self.load = None
        self.tasks: Mapping[str, int] = _EMPTY
        self.exec_fail: tuple[int, int] | None = None
        self.faults: tuple[str, ...] = ()
        self.fault_keys: frozenset = frozenset()
        self.match: int | None = None
        self.lag: int | None = None
        self.view: tuple[str, int] | None = None  # (leader, term) counted in _views
        self.history: OrderedDict[int, str] = OrderedDict()
        self.agree_n = 0
        self.conflict_n = 0
        self.digest_ok: bool | None = None
        self.changed_at: dict[str, float] = {}
        self.version = 0
        self.load_hist: deque[float | None] = deque(maxlen=history_len)
        self.row: NodeRow | None = None
        self.quorum_losses: int | None = None  # status quorum_losses, last seen
        self.refusing: frozenset = frozenset()  # status refused_peers' names, last seen


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class ClusterModel:
    """See the module docstring."""

    def __init__(
        self,
        nodes: Iterable[NodeInfo | tuple],
        *,
        stale_after: float = 8.0,
        highlight_s: float = 1.5,
        history_len: int = 60,
        digest_history: int = 16,
        max_events: int = 500,
    ) -> None:
        if stale_after <= 0 or history_len < 1 or digest_history < 1 or max_events < 1:
            raise ValueError("stale_after, history_len, digest_history and max_events must be > 0")
        self.stale_after = float(stale_after)
        self.highlight_s = float(highlight_s)
        self.history_len = int(history_len)
        self.digest_history = int(digest_history)
        self._nodes: dict[str, _Node] = {}
        self._touched: OrderedDict[str, int] = OrderedDict()  # name -> row version, by version
        self._version = 0
        self._v_open = False  # the current operation already bumped the version
        self._now = 0.0
        self._sampled_at: float | None = None  # when tick() last took load samples
        self._ops = 0  # per-node work outside the updated node (see stats())
        self._updates = 0
        self._reachable_n = 0
        self._nonlocal_n = 0
        self._views: Counter[tuple[str, int]] = Counter()  # (leader, term) named by reachable nodes
        self._claimants: dict[str, int] = {}  # reachable nodes whose role is leader -> term
        self._leader: str | None = None
        self._matched: set[str] = set()  # nodes whose match comes from the leader's progress
        self._applied_lag: set[str] = set()  # nodes whose lag is leader commit - applied
        self._max_term = 0
        self._term_known = False
        self._announced_term = -1  # newest term for which leader_elected was emitted
        self._announced_once = False
        self._leader_changes: deque[float] = deque()
        self._voters_seen: tuple[int, tuple[str, ...]] | None = None  # (term, voters)
        self._fault_nodes: dict[tuple, set[str]] = {}
        self._fault_text: dict[tuple, str] = {}
        self._table_fail_hw: tuple[int, int] | None = None  # replicated failed/timed_out high water
        self._at: dict[int, dict[str, set[str]]] = {}  # applied -> digest -> nodes
        self._conflicts = 0  # indexes with more than one digest
        self._reported_odd: set[str] = set()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._events_total = 0
        self._rows_cache: tuple[tuple, list[NodeRow]] | None = None
        for n in nodes:
            self.add_node(n)

    # == inventory ======================================================================

    def add_node(self, info: NodeInfo | tuple) -> None:
        """Add a node (a deploy grew the cluster). Ignored if the name is known."""
        info = info if isinstance(info, NodeInfo) else NodeInfo(*info)
        if info.name in self._nodes:
            return
        self._v_open = False
        st = _Node(info, self.history_len)
        self._nodes[info.name] = st
        if not st.local:
            self._nonlocal_n += 1
        self._bump(st)

    def remove_node(self, name: str, now: float = 0.0) -> None:
        """Forget a node and everything it contributed (O(its history))."""
        st = self._nodes.get(name)
        if st is None:
            return
        self._begin(now)
        if st.reachable is True:
            self._set_unreachable_counts(st)
        self._set_faults(st, [], None, emit=True)
        for i in list(st.history):
            self._remove_entry(st, i)
        self._matched.discard(name)
        self._applied_lag.discard(name)
        self._reported_odd.discard(name)
        if not st.local:
            self._nonlocal_n -= 1
        del self._nodes[name]
        self._touched.pop(name, None)
        self._recompute_leader()
        self._bump_global()

    @property
    def names(self) -> list[str]:
        return list(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    # == versions =======================================================================

    @property
    def version(self) -> int:
        return self._version

    def row_version(self, name: str) -> int:
        return self._nodes[name].version

    def changed_since(self, version: int) -> set[str]:
        out: set[str] = set()
        for name in reversed(self._touched):
            if self._touched[name] <= version:
                break
            out.add(name)
        return out

    def _begin(self, now: float) -> None:
        self._v_open = False
        self._now = now

    def _bump_global(self) -> None:
        if not self._v_open:
            self._version += 1
            self._v_open = True

    def _bump(self, st: _Node) -> None:
        self._bump_global()
        if st.version != self._version:
            st.version = self._version
            st.row = None
            self._touched[st.name] = self._version
            self._touched.move_to_end(st.name)

    def _mark(self, st: _Node, names: Iterable[str]) -> None:
        """Fields of ``st`` changed now: highlight them (not on a node's first status)."""
        if st.status is not None:
            for n in names:
                st.changed_at[n] = self._now
        self._bump(st)

    # == inputs =========================================================================

    def update(self, name: str, status: Mapping[str, Any], now: float) -> None:
        """A status map from ``name`` arrived at ``now``. O(size of the status)."""
        st = self._nodes.get(name)
        if st is None:
            self.add_node(NodeInfo(name, str(status.get("address") or ""),
                                   _int(status.get("priority")) or 0,
                                   _int(status.get("capacity")) or 1, False, False))
            st = self._nodes[name]
        self._begin(now)
        self._updates += 1
        changed: list[str] = []

        if st.reachable is not True:
            was = st.reachable
            st.reachable = True
            st.error = None
            self._reachable_n += 1
            changed.append("reachable")
            if was is False:
                self._event("node_up", name, f"{name} is reachable again")
        st.last_seen = now

        # -- plain fields -----------------------------------------------------------------
        role = status.get("role")
        term = _int(status.get("term"))
        leader = status.get("leader") or None
        commit = _int(status.get("commit"))
        applied = _int(status.get("applied"))
        for attr, val in (("role", role), ("term", term), ("leader", leader), ("commit", commit),
                          ("applied", applied), ("last_index", _int(status.get("last_index"))),
                          ("digest", status.get("digest")), ("keys", _int(status.get("keys")))):
            if getattr(st, attr) != val:
                setattr(st, attr, val)
                changed.append(attr)
        addr = status.get("address")
        if addr and addr != st.address:
            st.address = str(addr)
            changed.append("address")
        prio = _int(status.get("priority"))
        if prio is not None and prio != st.priority:
            st.priority = prio
            changed.append("priority")
        voters = status.get("voters")
        if isinstance(voters, list) and voters:  # 3-7 names; learners may be thousands: not scanned
            voter = name in voters
            if voter != st.voter:
                st.voter = voter
                changed.append("voter")
        if isinstance(voters, list) and voters and term is not None:
            seen = self._voters_seen
            if seen is None or term >= seen[0]:
                self._voters_seen = (term, tuple(voters))

        losses = _int(status.get("quorum_losses"))
        if losses is not None:
            if st.quorum_losses is not None and losses > st.quorum_losses:
                self._event("quorum_lost", name, f"{name} stopped leading: no quorum answered "
                            "it for an election timeout (cut off, or it hears nobody)")
            st.quorum_losses = losses
        refused = status.get("refused_peers")
        refusing = frozenset(refused) if isinstance(refused, Mapping) else frozenset()
        if refusing != st.refusing:
            for peer in sorted(refusing - st.refusing):
                self._event("peer_refused", name, f"{name} refuses {peer}: a voter back with "
                            "another data directory (it lost its log and votes); restore it, or "
                            f"remove-node {peer}, empty its data directory, add-node {peer}")
            st.refusing = refusing

        # -- leader views, claims, terms, elections ----------------------------------------
        if leader is None and role == "leader":
            leader = name  # a leader follows itself, whether or not it says so
        view = (leader, term) if leader is not None and term is not None else None
        if view != st.view:
            if st.view is not None:
                self._unview(st.view)
            if view is not None:
                self._views[view] += 1
            st.view = view
        if role == "leader" and term is not None:
            self._claimants[name] = term
        else:
            self._claimants.pop(name, None)
        if term is not None and (term > self._max_term or not self._term_known):
            old = self._max_term
            self._max_term = term
            if self._term_known:  # not the first term discovered
                self._event("term_changed", name, f"term {old} -> {term} (first seen on {name})")
            self._term_known = True
            self._bump_global()
        if leader is not None and term is not None and term > self._announced_term:
            self._announced_term = term
            if self._announced_once:
                self._leader_changes.append(now)
                text = f"{leader} elected leader in term {term}"
            else:
                text = f"{leader} is leader in term {term}"
            self._announced_once = True
            self._event("leader_elected", leader, text + ("" if leader == name else f" (seen by {name})"))

        # -- load, tasks, faults ----------------------------------------------------------
        load = status.get("load")
        load = load if isinstance(load, Mapping) else _EMPTY
        running, queued = _int(load.get("running")), _int(load.get("queued"))
        cap = _int(load.get("capacity")) or _int(status.get("capacity")) or st.capacity
        if cap != st.capacity:
            st.capacity = cap
            changed.append("capacity")
        frac = None
        if running is not None or queued is not None:
            frac = ((running or 0) + (queued or 0)) / cap if cap else None
        for attr, val in (("running", running), ("queued", queued), ("load", frac)):
            if getattr(st, attr) != val:
                setattr(st, attr, val)
                changed.append(attr)
        tasks = status.get("tasks")
        tasks = tasks if isinstance(tasks, Mapping) else _EMPTY
        ex = tasks.get("executor")
        if isinstance(ex, Mapping):
            counts = {k: ex[k] for k in _EXEC_KEYS if _int(ex.get(k)) is not None}
            if counts != st.tasks:
                st.tasks = MappingProxyType(counts)
                changed.append("tasks")
            self._check_exec_failures(st, counts)
        else:
            self._check_table_failures(st, tasks.get("counts"))
        faults = status.get("faults")
        if isinstance(faults, list):
            if self._set_faults(st, faults, changed, emit=True):
                changed.append("faults")

        # -- digests ----------------------------------------------------------------------
        digest = st.digest
        if applied is not None and isinstance(digest, str) and digest:
            if st.history.get(applied) != digest:
                self._add_entry(st, applied, digest)
            else:
                st.history.move_to_end(applied)

        # -- leader and lag ---------------------------------------------------------------
        if changed:
            self._mark(st, changed)
        st.status = status
        if not self._recompute_leader():
            if name == self._leader:
                self._apply_progress(st)
                self._relag(self._matched)
                self._relag(self._applied_lag)
                self._set_lag(st)
            else:
                self._set_lag(st)
        self._refresh_digest_ok(st)

    def unreachable(self, name: str, error: Any, now: float) -> None:
        """The connection to ``name`` failed (or timed out) at ``now``."""
        st = self._nodes.get(name)
        if st is None:
            return
        self._begin(now)
        text = str(error) if error is not None else "unreachable"
        if st.reachable is not False:
            self._go_down(st, text)
            self._recompute_leader()
        elif st.error != text:
            st.error = text
            self._bump(st)

    def tick(self, now: float) -> None:
        """Render-rate housekeeping: stale nodes become unreachable; one load sample each,
        at most once a second of ``now`` (so a late or repeated tick never shifts the
        sparklines by an extra sample)."""
        self._begin(now)
        down = False
        sample = self._sampled_at is None or now - self._sampled_at >= 0.999
        if sample:
            self._sampled_at = now
        for st in self._nodes.values():
            if st.reachable is True and now - st.last_seen > self.stale_after:
                self._go_down(st, f"no status for {now - st.last_seen:.1f}s")
                down = True
            if sample:
                st.load_hist.append(st.load if st.reachable is True else None)
        if down:
            self._recompute_leader()
        while self._leader_changes and now - self._leader_changes[0] >= 60.0:
            self._leader_changes.popleft()
        if self._nodes and sample:
            self._bump_global()  # the load histories changed

    # == reachability internals =========================================================

    def _go_down(self, st: _Node, error: str) -> None:
        was = st.reachable
        st.reachable = False
        st.error = error
        if was is True:
            self._set_unreachable_counts(st)
        self._mark(st, ("reachable",))
        self._event("node_down", st.name, f"{st.name} unreachable: {error}")

    def _set_unreachable_counts(self, st: _Node) -> None:
        self._reachable_n -= 1
        if st.view is not None:
            self._unview(st.view)
            st.view = None
        self._claimants.pop(st.name, None)

    def _unview(self, view: tuple[str, int]) -> None:
        n = self._views[view] - 1
        if n > 0:
            self._views[view] = n
        else:
            del self._views[view]

    # == leader and lag =================================================================

    def _detect_leader(self) -> str | None:
        best: tuple[int, str] | None = None
        for c, t in self._claimants.items():
            if 2 * self._views.get((c, t), 0) > self._reachable_n:
                if best is None or (t, c) > best:
                    best = (t, c)
        return None if best is None else best[1]

    def _recompute_leader(self) -> bool:
        """Re-detect the leader (O(claimants)); on a change recompute every lag. True if changed."""
        new = self._detect_leader()
        if new == self._leader:
            return False
        self._leader = new
        self._bump_global()
        for n in self._matched:
            self._nodes[n].match = None
        self._matched = set()
        if new is not None:
            self._apply_progress(self._nodes[new])
        self._applied_lag = set()
        self._relag(self._nodes)
        return True

    def _apply_progress(self, leader: _Node) -> None:
        progress = leader.status.get("progress") if leader.status is not None else None
        if not isinstance(progress, Mapping):
            progress = _EMPTY
        old = self._matched
        new: set[str] = set()
        for peer, p in progress.items():
            st = self._nodes.get(peer)
            if st is None or not isinstance(p, Mapping):
                continue
            self._ops += 1
            m = _int(p.get("match"))
            if m is None:
                continue
            new.add(peer)
            if st.match != m:
                st.match = m
                self._mark(st, ("match",))
        self._matched = new
        for peer in old - new:
            st = self._nodes.get(peer)
            if st is not None and st.match is not None:
                st.match = None
                self._mark(st, ("match",))
                self._set_lag(st)

    def _relag(self, names: Iterable[str]) -> None:
        for n in list(names):
            self._ops += 1
            st = self._nodes.get(n)
            if st is not None:
                self._set_lag(st)

    def _set_lag(self, st: _Node) -> None:
        lag = None
        from_applied = False
        ld = self._nodes.get(self._leader) if self._leader is not None else None
        if ld is not None and ld.commit is not None:
            if st is ld:
                if st.applied is not None:
                    lag = max(0, st.commit - st.applied)
            elif st.match is not None:
                lag = max(0, ld.commit - st.match)
            elif st.applied is not None:
                lag = max(0, ld.commit - st.applied)
                from_applied = True
        if from_applied:
            self._applied_lag.add(st.name)
        else:
            self._applied_lag.discard(st.name)
        if lag != st.lag:
            old = st.lag
            st.lag = lag
            if old is None:
                self._bump(st)
            else:
                self._mark(st, ("lag",))

    # == events =========================================================================

    def _event(self, kind: str, node: str | None, text: str) -> None:
        self._events.append(Event(self._now, kind, node, text))
        self._events_total += 1
        self._bump_global()

    def _check_exec_failures(self, st: _Node, counts: Mapping[str, int]) -> None:
        cur = (counts.get("failed", 0), counts.get("timed_out", 0))
        prev = st.exec_fail
        st.exec_fail = cur
        if prev is None or cur[0] < prev[0] or cur[1] < prev[1]:
            return  # first sight, or the agent restarted: a new baseline
        df, dt = cur[0] - prev[0], cur[1] - prev[1]
        if df or dt:
            self._event("task_failed", st.name, f"{st.name}: " + _fail_text(df, dt) + " (attempts run here)")

    def _check_table_failures(self, st: _Node, counts: Any) -> None:
        if not isinstance(counts, Mapping):
            return
        cur = (_int(counts.get("failed")) or 0, _int(counts.get("timed_out")) or 0)
        hw = self._table_fail_hw
        if hw is None:
            self._table_fail_hw = cur
            return
        df, dt = max(0, cur[0] - hw[0]), max(0, cur[1] - hw[1])
        if df or dt:
            self._table_fail_hw = (max(cur[0], hw[0]), max(cur[1], hw[1]))
            self._event("task_failed", st.name, _fail_text(df, dt) + f" (task table, first seen on {st.name})")

    def _set_faults(self, st: _Node, faults: list, changed: list | None, emit: bool) -> bool:
        keys: dict[tuple, str] = {}
        for f in faults:
            if isinstance(f, Mapping):
                keys.setdefault(fault_key(f), fault_summary(f))
        new = frozenset(keys)
        if new == st.fault_keys:
            return False
        for k in st.fault_keys - new:
            holders = self._fault_nodes.get(k)
            if holders is None:
                continue
            holders.discard(st.name)
            if not holders:
                del self._fault_nodes[k]
                text = self._fault_text.pop(k, str(k))
                if emit:
                    self._event("fault_healed", st.name, f"healed: {text}")
        for k in new - st.fault_keys:
            holders = self._fault_nodes.setdefault(k, set())
            if not holders:
                self._fault_text[k] = keys[k]
                if emit:
                    self._event("fault_injected", st.name, f"fault: {keys[k]} (reported by {st.name})")
            holders.add(st.name)
        st.fault_keys = new
        st.faults = tuple(sorted(keys.values()))
        self._bump_global()
        return True

    # == digests ========================================================================

    def _add_entry(self, st: _Node, i: int, d: str) -> None:
        if i in st.history:
            self._remove_entry(st, i)
        while len(st.history) >= self.digest_history:
            self._remove_entry(st, next(iter(st.history)))
        st.history[i] = d
        groups = self._at.setdefault(i, {})
        old = _index_state(groups)
        holders = groups.setdefault(d, set())
        holders.add(st.name)
        new = _index_state(groups)
        if old == new:
            self._contribute(st, new, +1)
        else:
            for g in groups.values():
                for z in g:
                    if z != st.name:
                        self._ops += 1
                        zs = self._nodes[z]
                        self._contribute(zs, old, -1)
                        self._contribute(zs, new, +1)
                        self._refresh_digest_ok(zs)
            self._contribute(st, new, +1)
        if new == _CONFLICT:
            if old != _CONFLICT:
                self._conflicts += 1
                self._mismatch(i, groups, st.name)
            elif st.name not in self._reported_odd:
                mine = len(holders)
                if any(len(g) >= mine for dd, g in groups.items() if dd != d):
                    self._mismatch(i, groups, st.name)  # it is (one of) the odd ones

    def _remove_entry(self, st: _Node, i: int) -> None:
        d = st.history.pop(i)
        groups = self._at.get(i)
        if groups is None:
            return
        old = _index_state(groups)
        g = groups.get(d)
        if g is not None:
            g.discard(st.name)
            if not g:
                del groups[d]
        new = _index_state(groups)
        self._contribute(st, old, -1)
        if old != new:
            for g in groups.values():
                for z in g:
                    self._ops += 1
                    zs = self._nodes[z]
                    self._contribute(zs, old, -1)
                    self._contribute(zs, new, +1)
                    self._refresh_digest_ok(zs)
            if old == _CONFLICT:
                self._conflicts -= 1
        if not groups:
            del self._at[i]

    @staticmethod
    def _contribute(st: _Node, state: int, k: int) -> None:
        if state == _AGREE:
            st.agree_n += k
        elif state == _CONFLICT:
            st.conflict_n += k

    def _refresh_digest_ok(self, st: _Node) -> None:
        ok = False if st.conflict_n > 0 else (True if st.agree_n > 0 else None)
        if ok is True and st.name in self._reported_odd:
            self._reported_odd.discard(st.name)
            self._bump(st)
        if ok != st.digest_ok:
            old = st.digest_ok
            st.digest_ok = ok
            if old is None:
                self._bump(st)
                if ok is False:
                    st.changed_at["digest_ok"] = self._now
            else:
                self._mark(st, ("digest_ok",))

    def _mismatch(self, i: int, groups: Mapping[str, set[str]], by: str) -> None:
        """Index ``i`` has several digests: report the odd nodes not reported yet."""
        sizes = [len(g) for g in groups.values()]
        top = max(sizes)
        if sizes.count(top) > 1:
            odd = {z for g in groups.values() for z in g}
        else:
            odd = {z for g in groups.values() if len(g) < top for z in g}
        self._ops += len(odd)
        fresh = odd - self._reported_odd
        if not fresh:
            return
        for z in odd - self._reported_odd:
            self._reported_odd.add(z)
            self._mark(self._nodes[z], ("digest_suspect",))
        parts = []
        for d, g in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            names = heapq.nsmallest(4, g)
            more = f" +{len(g) - 4}" if len(g) > 4 else ""
            parts.append(f"{','.join(names)}{more}={d[:12]}")
        node = next(iter(fresh)) if len(fresh) == 1 else by
        self._event("digest_mismatch", node, f"digest mismatch at applied {i}: " + "; ".join(parts))

    # == reads ==========================================================================

    def row(self, name: str) -> NodeRow:
        st = self._nodes[name]
        if st.row is None:
            st.row = NodeRow(
                name=st.name, address=st.address, priority=st.priority, capacity=st.capacity,
                local=st.local, voter=st.voter, reachable=st.reachable, error=st.error,
                role=st.role, term=st.term, leader=st.leader, commit=st.commit,
                applied=st.applied, last_index=st.last_index, match=st.match, lag=st.lag,
                digest=st.digest, digest_ok=st.digest_ok,
                digest_suspect=st.name in self._reported_odd, keys=st.keys, running=st.running,
                queued=st.queued, load=st.load, tasks=st.tasks, faults=st.faults,
                last_seen=st.last_seen, version=st.version,
                changed_at=MappingProxyType(dict(st.changed_at)),
            )
        return st.row

    def status(self, name: str) -> Mapping[str, Any] | None:
        """The last status map received from ``name`` (None if none)."""
        return self._nodes[name].status

    def recently_changed(self, name: str, field: str, now: float) -> bool:
        """Whether ``field`` of ``name``'s row changed less than ``highlight_s`` ago."""
        t = self._nodes[name].changed_at.get(field)
        return t is not None and now - t < self.highlight_s

    def load_history(self, name: str) -> list[float | None]:
        """The last ``history_len`` load fractions (one per tick; None: unreachable/unknown)."""
        return list(self._nodes[name].load_hist)

    def rows(self, sort: str = "name", reverse: bool = False, worst_first: bool = False,
             filter: str = "") -> list[NodeRow]:
        """The rows, sorted by column ``sort`` (None values last either way; ties by name).

        ``worst_first``: unreachable (or not yet heard from) nodes first, then by lag
        descending, then by ``sort``. ``filter``: case-insensitive substring of name,
        address or role.
        """
        if sort not in COLUMNS:
            raise ValueError(f"unknown column {sort!r} (one of {', '.join(COLUMNS)})")
        key = (self._version, sort, bool(reverse), bool(worst_first), filter)
        if self._rows_cache is not None and self._rows_cache[0] == key:
            return list(self._rows_cache[1])
        needle = filter.casefold()
        out = []
        for name in self._nodes:
            r = self.row(name)
            if needle and not (needle in r.name.casefold() or needle in r.address.casefold()
                               or needle in (r.role or "").casefold()):
                continue
            out.append(r)
        out.sort(key=lambda r: r.name)
        known = [r for r in out if getattr(r, sort) is not None]
        unknown = [r for r in out if getattr(r, sort) is None]
        known.sort(key=lambda r: _sort_value(getattr(r, sort)), reverse=reverse)
        out = known + unknown
        if worst_first:
            out.sort(key=lambda r: (r.reachable is True, -(r.lag if r.lag is not None else -1)))
        self._rows_cache = (key, out)
        return list(out)

    def health(self, now: float) -> Health:
        ld = self._nodes.get(self._leader) if self._leader is not None else None
        voters: tuple[str, ...] = ()
        if ld is not None and ld.status is not None and isinstance(ld.status.get("voters"), list):
            voters = tuple(ld.status["voters"])
        if not voters and self._voters_seen is not None:
            voters = self._voters_seen[1]
        if not voters:
            voters = tuple(n for n, st in self._nodes.items() if st.voter) or tuple(self._nodes)
        reach = 0
        for v in voters:
            st = self._nodes.get(v)
            if st is not None and st.reachable is True:
                reach += 1
        quorum = len(voters) // 2 + 1
        faults = tuple(sorted(
            (FaultInfo(self._fault_text.get(k, str(k)), k, len(h)) for k, h in self._fault_nodes.items()),
            key=lambda f: f.summary))
        tasks: Mapping[str, int] = _EMPTY
        if ld is not None and ld.status is not None:
            t = ld.status.get("tasks")
            if isinstance(t, Mapping) and isinstance(t.get("counts"), Mapping):
                tasks = MappingProxyType(dict(t["counts"]))
        return Health(
            leader=self._leader,
            leader_term=ld.term if ld is not None else None,
            term=self._max_term,
            has_quorum=reach >= quorum,
            voters=voters,
            reachable_voters=reach,
            quorum=quorum,
            leader_changes_1m=sum(1 for t in self._leader_changes if 0 <= now - t < 60.0),
            faults=faults,
            local=self._nonlocal_n == 0,
            nodes=len(self._nodes),
            reachable=self._reachable_n,
            divergent=self._conflicts > 0,
            tasks=tasks,
        )

    @property
    def leader(self) -> str | None:
        return self._leader

    @property
    def events(self) -> list[Event]:
        """The kept events, oldest first."""
        return list(self._events)

    @property
    def events_total(self) -> int:
        """How many events were ever emitted (a cursor for ``new_events``)."""
        return self._events_total

    def new_events(self, since_total: int) -> list[Event]:
        """Events emitted after the cursor ``since_total`` (those still kept)."""
        n = self._events_total - since_total
        if n <= 0:
            return []
        n = min(n, len(self._events))
        return list(self._events)[-n:]

    def divergence(self) -> DivergenceView:
        """Per replica: applied vs the leader's commit, match, digest comparison. O(N * history)."""
        ld = self._nodes.get(self._leader) if self._leader is not None else None
        lc = ld.commit if ld is not None else None
        reps = []
        for name in sorted(self._nodes):
            st = self._nodes[name]
            compared = agreed = conflict = None
            others: tuple[str, ...] = ()
            for i, d in st.history.items():
                groups = self._at.get(i, {})
                state = _index_state(groups)
                if state == _SOLO:
                    continue
                compared = i if compared is None else max(compared, i)
                if state == _AGREE:
                    agreed = i if agreed is None else max(agreed, i)
                elif conflict is None or i > conflict:
                    conflict = i
                    others = tuple(sorted(z for dd, g in groups.items() if dd != d for z in g))
            reps.append(ReplicaDivergence(
                name=name, reachable=st.reachable, applied=st.applied, commit=st.commit,
                leader_commit=lc, match=st.match, lag=st.lag, digest=st.digest,
                digest_ok=st.digest_ok, compared_at=compared, agreed_at=agreed,
                conflict_at=conflict, conflicts_with=others))
        conflicts = {
            i: MappingProxyType({d: tuple(sorted(g)) for d, g in groups.items()})
            for i, groups in sorted(self._at.items()) if len(groups) > 1
        }
        return DivergenceView(self._leader, lc, tuple(reps), MappingProxyType(conflicts))

    @staticmethod
    def key_diff(dumps: Mapping[str, Mapping[str, bytes]]) -> KeyDiff:
        """Compare replicas' key-value dumps (``nodeagent.state.diff_replicas``)."""
        dv = diff_replicas(dumps)
        return KeyDiff(
            agreed=len(dv.agreed),
            differs=MappingProxyType(dict(dv.differs)),
            missing=MappingProxyType(dict(dv.missing)),
            divergent_keys=dv.divergent_keys,
            converged=dv.converged,
        )

    def stats(self) -> dict[str, int]:
        """Work counters: ``updates``; ``ops``, per-node steps done on behalf of other nodes
        (lags recomputed, progress entries, digest groups re-marked); ``version``; ``events``."""
        return {"updates": self._updates, "ops": self._ops, "version": self._version,
                "events": self._events_total, "nodes": len(self._nodes)}


def _index_state(groups: Mapping[str, set[str]]) -> int:
    if len(groups) > 1:
        return _CONFLICT
    for g in groups.values():
        return _AGREE if len(g) > 1 else _SOLO
    return -1  # empty


def _fail_text(df: int, dt: int) -> str:
    parts = []
    if df:
        parts.append(f"{df} failed")
    if dt:
        parts.append(f"{dt} timed out")
    return " and ".join(parts)


def _sort_value(v: Any) -> Any:
    if isinstance(v, Mapping):
        return sum(x for x in v.values() if isinstance(x, (int, float)))
    if isinstance(v, tuple):
        return len(v)
    return v
