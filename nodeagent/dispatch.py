"""Placement policies: which node runs a submitted task.

Pure: no I/O, no clocks, no global random, no iteration over unordered containers where the
order could leak into a result. The leader calls :func:`place` (or :func:`place_many` for a
batch) with the candidate nodes, then commits the assignment through Raft, so a failover
keeps what was decided. The same inputs and the same :class:`PolicyState` give the same
answer on every run and every machine.

Inputs
------
A candidate is a :class:`NodeLoad`: its name, its ``capacity`` (parallel task slots, from the
inventory, >= 1), ``assigned`` (tasks assigned to it or running there according to the
replicated task table) and ``alive`` (its load report is within the lease, see
:mod:`nodeagent.loads`). A node with ``alive=False`` is never chosen. The order of the
candidates does not matter: every policy sorts or hashes by name.

A candidate may carry a ``limit``: the most tasks it may hold (assigned, queued or
running). A node at its limit is not chosen; a task no node can take now gets None and
waits (the leader places it once a slot frees: late binding, so a task does not queue
behind a long one on a busy node while another node idles). Under ``hash`` a keyed task
whose node is full waits for that node: its affinity is the point of the policy.

Policies (:data:`POLICIES`)
---------------------------
``least_loaded`` (the default)
    The alive node with the smallest ``assigned / capacity`` (compared exactly, as
    fractions); ties by fewer ``assigned``, then by name.
``round_robin``
    The alive nodes sorted by name, in turn. The cursor (the name of the last node chosen)
    lives in :class:`PolicyState`; because it is a name and not an index, a node joining,
    leaving or dying does not make the rotation skip or repeat the others.
``weighted``
    Smooth weighted round-robin (the nginx upstream algorithm) with ``capacity`` as the
    weight: each pick adds every alive node's weight to its current weight, chooses the
    largest current weight (ties by name) and subtracts the total weight from it. Capacities
    1:2:4 receive exactly 1:2:4 of every 7 consecutive tasks, interleaved rather than bunched.
    Like round_robin it ignores ``assigned``.
``hash``
    Consistent hashing on the task's key: a ring of :data:`VNODES_PER_SLOT` virtual nodes per
    unit of capacity, positioned with BLAKE2b (never Python's per-process randomized
    ``hash()``), over the alive nodes. A key goes to the first virtual node clockwise from the
    key's point. Removing (or losing) a node moves only the keys that were on it; adding one
    moves only keys onto it. A task without a key falls back to ``least_loaded``. The ring
    layout is part of the contract: changing it moves keys across an upgrade.

A batch (:func:`place_many`) is placed one task at a time, each placement counted into
the chosen node's ``assigned`` before the next, so 100 tasks spread over the cluster
instead of all landing on the node that was least loaded when the batch began. Placing a
batch is exactly the same as calling :func:`place` once per task and adding one to the
chosen node's ``assigned`` between calls.

Makespan
--------
:func:`lpt_makespan` and :func:`makespan_lower_bound` measure a schedule of known task
durations on nodes with ``capacity`` identical slots each (used by ``bench/dispatch.py``).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: an agent that places no task loads neither it nor decimal
    from fractions import Fraction

__all__ = [
    "POLICIES",
    "DEFAULT_POLICY",
    "VNODES_PER_SLOT",
    "NodeLoad",
    "TaskHint",
    "PolicyState",
    "place",
    "place_many",
    "ring_point",
    "lpt_makespan",
    "makespan_lower_bound",
]

POLICIES: tuple[str, ...] = ("least_loaded", "round_robin", "weighted", "hash")
DEFAULT_POLICY = "least_loaded"

#: Virtual nodes on the hash ring per unit of capacity.
VNODES_PER_SLOT = 64


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """One candidate node as the leader sees it at placement time."""

    name: str
    capacity: int = 1
    assigned: int = 0
    alive: bool = True
    limit: int | None = None  # the most tasks it may hold; None: no limit

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"NodeLoad.name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.capacity) or self.capacity < 1:
            raise ValueError(f"NodeLoad {self.name!r}: capacity must be an int >= 1, got {self.capacity!r}")
        if not _is_int(self.assigned) or self.assigned < 0:
            raise ValueError(f"NodeLoad {self.name!r}: assigned must be an int >= 0, got {self.assigned!r}")
        if not isinstance(self.alive, bool):
            raise ValueError(f"NodeLoad {self.name!r}: alive must be a bool, got {self.alive!r}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 0):
            raise ValueError(f"NodeLoad {self.name!r}: limit must be an int >= 0 or None, got {self.limit!r}")

    @property
    def utilization(self) -> Fraction:
        """``assigned / capacity``, exactly."""
        from fractions import Fraction

        return Fraction(self.assigned, self.capacity)


@dataclass(frozen=True, slots=True)
class TaskHint:
    """What a policy may know about a task before placing it. ``key``: the hash policy's key."""

    key: str | None = None

    def __post_init__(self) -> None:
        if self.key is not None and not isinstance(self.key, str):
            raise ValueError(f"TaskHint.key must be a string or None, got {self.key!r}")


@dataclass
class PolicyState:
    """The little memory some policies keep between placements; one per leader.

    A new leader starts with a fresh one: round-robin and weighted rotations restart, which
    changes fairness for a moment and never correctness. ``least_loaded`` keeps nothing here;
    ``hash`` only caches its ring (rebuilt whenever the alive nodes or capacities change).
    """

    rr_last: str | None = None  # round_robin: the name of the node chosen last
    current: dict[str, int] = field(default_factory=dict)  # weighted: current weight per node
    _ring_id: tuple[tuple[str, int], ...] | None = field(default=None, repr=False, compare=False)
    _ring_points: list[int] = field(default_factory=list, repr=False, compare=False)
    _ring_names: list[str] = field(default_factory=list, repr=False, compare=False)


# -- the hash ring ---------------------------------------------------------------------------


def ring_point(data: str) -> int:
    """A 64-bit position on the ring: BLAKE2b-64 of the UTF-8 bytes, big-endian."""
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "big")


def _ring(state: PolicyState, eligible: Sequence[NodeLoad]) -> tuple[list[int], list[str]]:
    ring_id = tuple(sorted((n.name, n.capacity) for n in eligible))
    if state._ring_id != ring_id:
        # Virtual node i of a node sits at blake2b("<name>#<i>"): a node's points depend only
        # on its own name, and raising its capacity only adds points.
        pts = sorted(
            (ring_point(f"{name}#{i}"), name)
            for name, cap in ring_id
            for i in range(VNODES_PER_SLOT * cap)
        )
        state._ring_id = ring_id
        state._ring_points = [p for p, _ in pts]
        state._ring_names = [n for _, n in pts]
    return state._ring_points, state._ring_names


def _ring_lookup(points: list[int], names: list[str], key: str) -> str:
    i = bisect.bisect_left(points, ring_point(key))
    return names[i if i < len(points) else 0]


# -- placement -------------------------------------------------------------------------------


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown dispatch policy {policy!r}; known policies: {', '.join(POLICIES)}")


class _Batch:
    """The eligible nodes of one batch, their running counts, and the per-policy cursors."""

    def __init__(self, policy: str, nodes: Sequence[NodeLoad], state: PolicyState):
        seen: set[str] = set()
        for n in nodes:
            if not isinstance(n, NodeLoad):
                raise TypeError(f"expected NodeLoad, got {type(n).__name__}")
            if n.name in seen:
                raise ValueError(f"duplicate node {n.name!r} among the candidates")
            seen.add(n.name)
        self.policy = policy
        self.state = state
        self.eligible = sorted((n for n in nodes if n.alive), key=lambda n: n.name)
        self.cap = {n.name: n.capacity for n in self.eligible}
        self.assigned = {n.name: n.assigned for n in self.eligible}
        self.limit = {n.name: n.limit for n in self.eligible if n.limit is not None}
        self._heap: list[tuple[Fraction, int, str]] | None = None

    def full(self, name: str) -> bool:
        lim = self.limit.get(name)
        return lim is not None and self.assigned[name] >= lim

    # least_loaded: a heap with lazy invalidation (an entry is current iff its count is);
    # a full node's entry is dropped for good (counts only grow within a batch)
    def least_loaded(self) -> str | None:
        if self._heap is None:
            from fractions import Fraction

            self._heap = [(Fraction(a, self.cap[n]), a, n) for n, a in self.assigned.items()]
            heapq.heapify(self._heap)
        heap = self._heap
        while heap and (heap[0][1] != self.assigned[heap[0][2]] or self.full(heap[0][2])):
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def round_robin(self) -> str | None:
        names = [n.name for n in self.eligible]
        last = self.state.rr_last
        i = 0 if last is None else bisect.bisect_right(names, last)
        for k in range(len(names)):  # from the cursor on, the first node with room
            name = names[(i + k) % len(names)]
            if not self.full(name):
                return name
        return None

    def weighted(self) -> str | None:
        cur = self.state.current
        for name in [k for k in cur if k not in self.cap]:
            del cur[name]  # a node that left or died restarts from 0 when it returns
        room = [n for n in self.eligible if not self.full(n.name)]
        if not room:
            return None  # nothing chosen: the weights stay as they are
        total = 0
        best: str | None = None
        for n in room:  # sorted by name: ties go to the first name
            w = cur.get(n.name, 0) + n.capacity
            cur[n.name] = w
            total += n.capacity
            if best is None or w > cur[best]:
                best = n.name
        assert best is not None
        cur[best] -= total
        return best

    def hash(self, key: str | None) -> str | None:
        if key is None:
            return self.least_loaded()
        points, names = _ring(self.state, self.eligible)
        name = _ring_lookup(points, names, key)
        return None if self.full(name) else name  # wait for the key's own node

    def choose(self, key: str | None) -> str | None:
        if not self.eligible:
            return None
        p = self.policy
        if p == "least_loaded":
            name = self.least_loaded()
        elif p == "round_robin":
            name = self.round_robin()
            if name is not None:
                self.state.rr_last = name
        elif p == "weighted":
            name = self.weighted()
        else:
            name = self.hash(key)
        if name is None:
            return None
        a = self.assigned[name] + 1
        self.assigned[name] = a
        if self._heap is not None:
            from fractions import Fraction

            heapq.heappush(self._heap, (Fraction(a, self.cap[name]), a, name))
        return name


def place(
    policy: str,
    nodes: Sequence[NodeLoad],
    *,
    key: str | None = None,
    state: PolicyState,
) -> str | None:
    """The node to run one task, or None when no candidate is alive or has room (``limit``).

    Raises ValueError for an unknown policy (naming the known ones) or duplicate node names.
    ``state`` is updated by round_robin and weighted (and hash caches its ring there).
    """
    return place_many(policy, nodes, [TaskHint(key)], state)[0]


def place_many(
    policy: str,
    nodes: Sequence[NodeLoad],
    tasks: Sequence[TaskHint],
    state: PolicyState,
) -> list[str | None]:
    """Place ``tasks`` in order, one at a time; each placement counts into the next's load.

    Returns one node name per task (None for a task no alive node has room for). Equivalent to
    calling :func:`place` per task with the chosen node's ``assigned`` raised by one after
    each call. Cost: O((n + t) log n) for least_loaded and round_robin, O(n * t) for weighted,
    and one ring build per change of the alive set for hash.
    """
    _check_policy(policy)
    batch = _Batch(policy, nodes, state)
    out: list[str | None] = []
    for t in tasks:
        if not isinstance(t, TaskHint):
            raise TypeError(f"expected TaskHint, got {type(t).__name__}")
        out.append(batch.choose(t.key))
    return out


# -- makespan --------------------------------------------------------------------------------


def _check_schedule_input(durations: Iterable[float], capacities: Iterable[int]) -> tuple[list[float], int]:
    ds = [float(d) for d in durations]
    for d in ds:
        if not math.isfinite(d) or d < 0:
            raise ValueError(f"durations must be finite and >= 0, got {d!r}")
    caps = list(capacities)
    for c in caps:
        if not _is_int(c) or c < 1:
            raise ValueError(f"capacities must be ints >= 1, got {c!r}")
    slots = sum(caps)
    if ds and slots == 0:
        raise ValueError("no slots to run the tasks on (capacities is empty)")
    return ds, slots


def lpt_makespan(durations: Iterable[float], capacities: Iterable[int]) -> float:
    """Makespan of the LPT schedule: tasks longest first, each onto the slot that frees first.

    Every node offers ``capacity`` identical parallel slots. LPT is within
    ``4/3 - 1/(3m)`` of the optimum on ``m`` slots (Graham 1969). 0.0 for no tasks.
    """
    ds, slots = _check_schedule_input(durations, capacities)
    if not ds:
        return 0.0
    m = min(slots, len(ds))  # more slots than tasks: the extra ones stay idle
    finish = [0.0] * m
    for d in sorted(ds, reverse=True):
        heapq.heapreplace(finish, finish[0] + d)
    return max(finish)


def makespan_lower_bound(durations: Iterable[float], capacities: Iterable[int]) -> float:
    """No schedule finishes before ``max(longest task, total work / total slots)``. 0.0 for no tasks."""
    ds, slots = _check_schedule_input(durations, capacities)
    if not ds:
        return 0.0
    return max(max(ds), math.fsum(ds) / slots)
