"""A linearizability checker for key-value histories (pure: no I/O, no clocks but a budget).

The model is one register per key (``None`` = absent) with get, put, delete and cas. The
search is Wing & Gong's, with Lowe's just-in-time linearization and memoization, as
Porcupine and Knossos do it:

* **P-compositionality.** Linearizability is local (Herlihy & Wing): a history is
  linearizable iff each key's sub-history is. Each key is checked on its own.
* **Events in a linked list.** Every operation contributes a call event and a return event,
  sorted by time (at equal times calls come first, so touching operations count as
  concurrent: the checker never reports a violation that depends on a clock tie).
  The search walks the list: at a call it tries to linearize that operation now (the
  model accepts it from the current state), lifting its call and return out of the list;
  at a return whose operation is not yet linearized it backtracks - that operation had to
  take effect before it returned.
* **Memoization.** A set of (linearized-operations bitset, register value) pairs already
  explored; reaching one again cannot lead anywhere new.
* **Unknown outcomes.** A ``fail`` operation certainly had no effect and is left out. An
  ``info`` write may take effect at any point after its call, or never: its return is at
  infinity, and the search succeeds once only ``info`` operations are left. An ``info`` get
  observed nothing and is left out. An ``info`` write whose value nobody ever observed is
  left out too (it can never be needed to explain an observation), which keeps histories
  with many timeouts tractable.
* **Budget.** The search counts steps and gives up with ``unknown`` when the step budget
  or the time budget (``time.monotonic`` read every few thousand steps; the only clock
  read here) runs out, rather than hang.

``shrink`` turns a failing key's history into a small one that still fails and is still
a witness: it only drops reads, and writes that no remaining operation can have observed
(nothing observes the value; for a delete, also when every operation that read "absent"
ended before it began or is separated from it in real time by another certain write) - dropping those cannot turn a
linearizable history into a non-linearizable one, so the small history failing proves the
big one failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from console.history import Op, renumber

LINEARIZABLE = "linearizable"
NON_LINEARIZABLE = "non-linearizable"
UNKNOWN = "unknown"

_INF = float("inf")
_ABSENT = None


def step(state: Any, o: Op) -> tuple[bool, Any]:
    """The register model: whether ``o`` (with its observed output) may happen in
    ``state``, and the state after it. ``info`` operations have no output to match."""
    if o.op == "get":
        return o.output == state, state
    if o.op == "put":
        return True, o.value
    if o.op == "delete":
        return True, _ABSENT
    # cas
    if o.status == "info":
        return True, (o.value if state == o.expected else state)
    out = o.output or {}
    if out.get("swapped"):
        return state == o.expected, o.value
    # Not swapped: the stored value differed from expected, and the reply says what it was.
    return state != o.expected and out.get("value") == state, state


def _relevant(ops: Iterable[Op]) -> list[Op]:
    """The operations the search must place: no ``fail``, no ``info`` read, no ``info``
    write whose value nobody observed."""
    ops = [o for o in ops if o.status != "fail" and not (o.op == "get" and o.status != "ok")]
    observed: set[Any] = set()
    for o in ops:
        if o.status != "ok":
            if o.op == "cas":
                observed.add(o.expected)  # it swaps only from that value
            continue
        if o.op == "get":
            observed.add(o.output)
        elif o.op == "cas":
            observed.add(o.expected)
            if o.output is not None:
                observed.add(o.output.get("value"))
    return [o for o in ops if o.status == "ok" or o.op == "delete" or o.value in observed]


@dataclass
class KeyResult:
    key: str
    verdict: str
    ops: int  # operations the search placed
    steps: int
    # On failure: the longest prefix of operations the search managed to linearize (ids).
    best: list[int] = field(default_factory=list)


class _OutOfBudget(Exception):
    pass


class _Budget:
    def __init__(self, seconds: float | None, steps: int | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.steps_left = steps
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1
        if self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left < 0:
                raise _OutOfBudget
        if self.deadline is not None and self.steps & 0xFFF == 0 and time.monotonic() > self.deadline:
            raise _OutOfBudget


def _search(ops: Sequence[Op], init: Any, budget: _Budget) -> tuple[bool, list[int]]:
    """Lowe's just-in-time linearization over one key's operations. Returns (ok, the
    longest linearized sequence of op indexes seen)."""
    n = len(ops)
    if n == 0:
        return True, []
    # Events: (time, kind, i) with kind 0 = call, 1 = return; info returns at infinity.
    events = []
    for i, o in enumerate(ops):
        events.append((o.call, 0, i))
        events.append((_INF if o.status == "info" else o.ret, 1, i))
    events.sort()
    m = len(events)
    # Doubly linked list over event slots 1..m; slot 0 is the head sentinel.
    nxt = list(range(1, m + 2))
    prv = list(range(-1, m))
    nxt[m] = -1
    kind = [0] * (m + 1)
    opi = [0] * (m + 1)
    info_ret = [False] * (m + 1)
    ret_slot = [0] * n
    for s, (t, k, i) in enumerate(events, start=1):
        kind[s], opi[s] = k, i
        if k == 1:
            ret_slot[i] = s
            info_ret[s] = t == _INF

    def lift(s: int) -> None:
        prv_s, nxt_s = prv[s], nxt[s]
        nxt[prv_s] = nxt_s
        if nxt_s != -1:
            prv[nxt_s] = prv_s
        r = ret_slot[opi[s]]
        prv_r, nxt_r = prv[r], nxt[r]
        nxt[prv_r] = nxt_r
        if nxt_r != -1:
            prv[nxt_r] = prv_r

    def unlift(s: int) -> None:
        r = ret_slot[opi[s]]
        prv_r, nxt_r = prv[r], nxt[r]
        nxt[prv_r] = r
        if nxt_r != -1:
            prv[nxt_r] = r
        prv_s, nxt_s = prv[s], nxt[s]
        nxt[prv_s] = s
        if nxt_s != -1:
            prv[nxt_s] = s

    seen: set[tuple[int, Any]] = set()
    stack: list[tuple[int, Any]] = []
    bits = 0
    state = init
    best: list[int] = []
    s = nxt[0]
    while s != -1:
        budget.tick()
        if kind[s] == 0:
            i = opi[s]
            ok, new_state = step(state, ops[i])
            if ok:
                new_bits = bits | (1 << i)
                memo = (new_bits, new_state)
                if memo not in seen:
                    seen.add(memo)
                    stack.append((s, state))
                    bits, state = new_bits, new_state
                    lift(s)
                    s = nxt[0]
                    continue
            s = nxt[s]
        else:
            if info_ret[s]:
                return True, [opi[x] for x, _ in stack]
            if len(stack) > len(best):  # the longest prefix seen, for the report (copied
                best = [opi[x] for x, _ in stack]  # only here: backtracks are rare)
            if not stack:
                return False, best
            s, state = stack.pop()
            bits &= ~(1 << opi[s])
            unlift(s)
            s = nxt[s]
    return True, [opi[x] for x, _ in stack]


def check_key(ops: Sequence[Op], *, init: Any = None, seconds: float | None = 10.0,
              steps: int | None = None) -> KeyResult:
    """Check one key's operations (all with the same key)."""
    key = ops[0].key if ops else ""
    rel = _relevant(ops)
    budget = _Budget(seconds, steps)
    try:
        ok, best = _search(rel, init, budget)
    except _OutOfBudget:
        return KeyResult(key, UNKNOWN, len(rel), budget.steps)
    return KeyResult(key, LINEARIZABLE if ok else NON_LINEARIZABLE, len(rel), budget.steps,
                     [] if ok else [rel[i].id for i in best])


@dataclass
class Result:
    verdict: str
    keys: dict[str, KeyResult]
    seconds: float

    @property
    def failing_keys(self) -> list[str]:
        return sorted(k for k, r in self.keys.items() if r.verdict == NON_LINEARIZABLE)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "seconds": round(self.seconds, 3),
                "keys": {k: {"verdict": r.verdict, "ops": r.ops, "steps": r.steps}
                         for k, r in sorted(self.keys.items())}}


def by_key(ops: Iterable[Op]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = {}
    for o in ops:
        out.setdefault(o.key, []).append(o)
    return out


def check(ops: Iterable[Op], *, init: dict[str, Any] | None = None,
          seconds: float = 60.0) -> Result:
    """Check a whole history, key by key, within ``seconds`` in total. The verdict is
    non-linearizable if any key is, else unknown if any key ran out of budget."""
    t0 = time.monotonic()
    keys: dict[str, KeyResult] = {}
    groups = by_key(ops)
    for k in sorted(groups):
        left = max(0.05, seconds - (time.monotonic() - t0))
        keys[k] = check_key(groups[k], init=(init or {}).get(k), seconds=left)
    verdicts = {r.verdict for r in keys.values()}
    verdict = (NON_LINEARIZABLE if NON_LINEARIZABLE in verdicts
               else UNKNOWN if UNKNOWN in verdicts else LINEARIZABLE)
    return Result(verdict, keys, time.monotonic() - t0)


def _observes(o: Op) -> set[Any]:
    if o.status != "ok":
        return {o.expected} if o.op == "cas" else set()
    if o.op == "get":
        return {o.output}
    if o.op == "cas":
        return {o.expected, (o.output or {}).get("value")}
    return set()


def _writes(o: Op) -> bool:
    """Whether ``o`` certainly wrote (an ok put, delete, or cas that swapped)."""
    return o.status == "ok" and (o.op in ("put", "delete") or
                                 (o.op == "cas" and bool((o.output or {}).get("swapped"))))


def _needed(w: Op, rest: list[Op]) -> bool:
    """Whether the write ``w`` may be the write some operation in ``rest`` observes: an
    operation that observes w's value, does not end before w was called, and is not
    separated from w by another certain write (w returned before it was called, and it
    returned before the observer was called - then the observer cannot see w)."""
    val = None if w.op == "delete" else w.value
    sep = _INF
    # Separation only for deletes: a value written once stays in the witness while anyone
    # observes it (so a stale read shows with the write it saw, not as a read of nothing),
    # but of the many deletes only those that can explain an absent read are kept. An info
    # write may take effect after its return: no separation for it.
    if w.status == "ok" and w.op == "delete":
        for x in rest:
            if x is not w and _writes(x) and x.call > w.ret and x.ret < sep:
                sep = x.ret
    for p in rest:
        if p is w or val not in _observes(p):
            continue
        p_ret = _INF if p.status == "info" else p.ret
        if p_ret <= w.call or sep < p.call:
            continue
        return True
    return False


def _is_read(o: Op) -> bool:
    return o.op == "get" or (o.op == "cas" and o.status == "ok" and not (o.output or {}).get("swapped"))


def _observed(ops: Iterable[Op]) -> set[Any]:
    out: set[Any] = set()
    for o in ops:
        out |= _observes(o)
    return out


def _prefix(ops: list[Op], t: float) -> list[Op] | None:
    """The operations called by ``t``, without the reads still running at ``t``; None if
    a write called after ``t`` may be what a kept operation observed (then cutting there
    is not sound)."""
    keep = [o for o in ops if o.call <= t and not (_is_read(o) and o.ret > t)]
    cut = [o for o in ops if o.call > t and not _is_read(o)]
    if not cut:
        return keep
    seen = _observed(keep)
    late_absent = any(None in _observes(o) and (o.status == "info" or o.ret > t) for o in keep)
    for w in cut:
        if w.op == "delete":
            if late_absent:
                return None
        elif w.value in seen:
            return None
    return keep


def _still_needed(part: list[Op], rest: list[Op]) -> list[Op]:
    """The writes of ``part`` that dropping ``part`` from ``rest + part`` must keep: those
    some kept operation may observe, closed over what kept writes observe themselves (a
    cas observes its expected value). Everything else in ``part`` goes soundly."""
    writes = [o for o in part if not _is_read(o)]
    kept: list[Op] = []
    kept_ids: set[int] = set()
    seen = _observed(rest)
    changed = True
    while changed:
        changed = False
        for w in writes:
            if w.id in kept_ids:
                continue
            if w.op == "delete" or w.status != "ok":
                need = _needed(w, rest + kept)
            else:
                need = w.value in seen
            if need:
                kept.append(w)
                kept_ids.add(w.id)
                seen |= _observes(w)
                changed = True
    return kept


def shrink(ops: Sequence[Op], *, init: Any = None, seconds: float = 10.0,
           max_checks: int = 2000) -> list[Op]:
    """A small failing sub-history of one key's failing history (see the module doc for
    what may be dropped). First the shortest failing prefix in time (binary search), then
    greedy: try dropping halves, then quarters, ..., then single operations (reads first)
    until nothing more goes, keeping each drop that still fails. Stops at ``seconds`` or
    ``max_checks``; returns the input unchanged if it does not fail within the budget."""
    deadline = time.monotonic() + seconds
    cur = sorted(_relevant(ops), key=lambda o: (o.call, o.id))
    checks = 0

    def fails(cand: list[Op], cap: float = 2.0) -> bool:
        nonlocal checks
        checks += 1
        left = max(0.01, min(cap, deadline - time.monotonic()))
        return check_key(renumber(cand), init=init, seconds=left).verdict == NON_LINEARIZABLE

    def droppable(o: Op, rest: list[Op], seen: set[Any]) -> bool:
        if _is_read(o):
            return True
        if o.op == "delete" or o.status != "ok":
            return not _needed(o, rest)
        return o.value not in seen

    if not fails(cur, cap=seconds):
        return list(ops)
    # The shortest failing prefix: bisect over the return times.
    times = sorted({o.ret for o in cur if o.status == "ok"})
    lo, hi = 0, len(times) - 1
    while lo < hi and checks < max_checks and time.monotonic() < deadline:
        mid = (lo + hi) // 2
        cand = _prefix(cur, times[mid])
        if cand is not None and cand and fails(cand, cap=max(2.0, seconds / 4)):
            hi = mid
            cur = cand
        else:
            lo = mid + 1
    chunk = max(1, len(cur) // 2)
    while chunk >= 1 and checks < max_checks and time.monotonic() < deadline:
        i = 0
        progressed = False
        while i < len(cur) and checks < max_checks and time.monotonic() < deadline:
            part = cur[i:i + chunk]
            rest = cur[:i] + cur[i + chunk:]
            kept = _still_needed(part, rest)
            cand = sorted(rest + kept, key=lambda o: (o.call, o.id)) if kept else rest
            if len(cand) < len(cur) and fails(cand):
                cur = cand
                progressed = True
                i += len(kept)
            else:
                i += chunk
        if not progressed:
            chunk //= 2
    # Single operations until nothing more goes: reads first (dropping a read can make a
    # write unobserved, and so droppable, in the next pass).
    progressed = True
    while progressed and checks < max_checks and time.monotonic() < deadline:
        progressed = False
        for o in sorted(cur, key=lambda o: (not _is_read(o), o.call)):
            if checks >= max_checks or time.monotonic() >= deadline:
                break
            rest = [p for p in cur if p is not o]
            if droppable(o, rest, _observed(rest)) and fails(rest):
                cur = rest
                progressed = True
    return sorted(cur, key=lambda o: (o.call, o.id))
