"""The history of a chaos run: one completed operation per JSON line (pure; no I/O).

Each line is::

    {"client": 3, "call": <ns>, "return": <ns>, "op": "get|put|cas|delete", "key": "k1",
     "value": ..., "expected": ..., "output": ..., "status": "ok|fail|info"}

``call`` and ``return`` come from one monotonic clock (``time.monotonic_ns()`` of the
recording process). ``status`` is ``ok`` (the cluster answered), ``fail`` (the operation
certainly had no effect: a definite refusal before anything applied, or a read that got
no answer - reads have no effect) or ``info`` (a write whose outcome is unknown: a timeout
or a lost connection after it was sent). An ``info`` operation's ``return`` is when the
client gave up; it may still take effect at any later time, or never.

Values are strings (the workload writes unique ASCII strings) or null (absent). ``output``
is the read value for ``get``, ``{"swapped": bool, "value": str | null}`` for ``cas`` and
the commit index for ``put`` / ``delete``; null for ``fail`` and ``info``.

Task checks (``check_tasks``) are set arithmetic over what the clients were told and the
task records every replica holds at the end.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

OPS = ("get", "put", "cas", "delete")
STATUSES = ("ok", "fail", "info")
FINAL_TASK_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


class HistoryError(ValueError):
    """A history line that is not a valid operation (names the line and field)."""


@dataclass(frozen=True)
class Op:
    """One completed operation. ``id`` is its position in the history (0-based)."""

    id: int
    client: int
    call: int
    ret: int
    op: str
    key: str
    value: Any = None
    expected: Any = None
    output: Any = None
    status: str = "ok"

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "call": self.call, "return": self.ret, "op": self.op,
                "key": self.key, "value": self.value, "expected": self.expected,
                "output": self.output, "status": self.status}

    def describe(self) -> str:
        """One line for a report: ``c3 cas k1 'a'->'b' => swapped ok [t0..t1 ms]``."""
        if self.op == "get":
            what = f"get {self.key}"
        elif self.op == "put":
            what = f"put {self.key}={self.value!r}"
        elif self.op == "delete":
            what = f"delete {self.key}"
        else:
            what = f"cas {self.key} {self.expected!r}->{self.value!r}"
        out = "" if self.status != "ok" or self.op in ("put", "delete") else f" => {self.output!r}"
        return f"c{self.client} {what}{out} {self.status}"


def op_from_json(obj: Mapping[str, Any], id: int, *, where: str = "") -> Op:
    """An ``Op`` from one decoded history line; HistoryError names the field."""
    loc = f"{where}: " if where else ""
    if not isinstance(obj, Mapping):
        raise HistoryError(f"{loc}a history line must be a JSON object")
    for f in ("client", "call", "return", "op", "key", "status"):
        if f not in obj:
            raise HistoryError(f"{loc}missing field {f!r}")
    if obj["op"] not in OPS:
        raise HistoryError(f"{loc}field 'op' must be one of {', '.join(OPS)}, got {obj['op']!r}")
    if obj["status"] not in STATUSES:
        raise HistoryError(f"{loc}field 'status' must be one of {', '.join(STATUSES)}, "
                           f"got {obj['status']!r}")
    for f in ("client", "call", "return"):
        if type(obj[f]) is not int:
            raise HistoryError(f"{loc}field {f!r} must be an integer, got {obj[f]!r}")
    if obj["return"] < obj["call"]:
        raise HistoryError(f"{loc}'return' ({obj['return']}) is before 'call' ({obj['call']})")
    if not isinstance(obj["key"], str):
        raise HistoryError(f"{loc}field 'key' must be a string")
    output = obj.get("output")
    if obj["op"] == "cas" and obj["status"] == "ok":
        if not (isinstance(output, Mapping) and isinstance(output.get("swapped"), bool)):
            raise HistoryError(f"{loc}an ok cas needs output {{\"swapped\": bool, \"value\": ...}}")
        output = {"swapped": output["swapped"], "value": output.get("value")}
    return Op(id=id, client=obj["client"], call=obj["call"], ret=obj["return"], op=obj["op"],
              key=obj["key"], value=obj.get("value"), expected=obj.get("expected"),
              output=output, status=obj["status"])


def parse_lines(lines: Iterable[str], *, name: str = "history") -> list[Op]:
    ops: list[Op] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HistoryError(f"{name}:{n}: not JSON ({e.msg})") from None
        ops.append(op_from_json(obj, len(ops), where=f"{name}:{n}"))
    return ops


def dump_line(op: Op) -> str:
    return json.dumps(op.to_json(), separators=(",", ":"), sort_keys=True)


def renumber(ops: Iterable[Op]) -> list[Op]:
    """The same operations with ids 0..n-1 (in the given order)."""
    from dataclasses import replace

    return [replace(o, id=i) for i, o in enumerate(ops)]


# -- latency -------------------------------------------------------------------------------


def latency_stats(ops: Iterable[Op]) -> dict[str, dict[str, Any]]:
    """Per op kind and status: count and latency percentiles in milliseconds."""
    groups: dict[str, list[int]] = {}
    for o in ops:
        groups.setdefault(f"{o.op}:{o.status}", []).append(o.ret - o.call)
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(groups):
        xs = sorted(groups[k])

        def pct(p: float) -> float:
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] / 1e6, 2)

        out[k] = {"count": len(xs), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                  "max_ms": round(xs[-1] / 1e6, 2)}
    return out


# -- tasks ---------------------------------------------------------------------------------


@dataclass
class TaskCheck:
    """The result of ``check_tasks``; ``ok`` when no list holds anything."""

    acknowledged: int = 0
    unknown: int = 0
    final: int = 0
    missing_result: list[str] = field(default_factory=list)    # acked, not final everywhere
    unexpected: list[str] = field(default_factory=list)        # a record nobody submitted
    divergent: list[str] = field(default_factory=list)         # replicas disagree on the result
    stale_attempt: list[str] = field(default_factory=list)     # result not from the newest attempt
    wrong_result: list[str] = field(default_factory=list)      # output is not this task's

    @property
    def ok(self) -> bool:
        return not (self.missing_result or self.unexpected or self.divergent
                    or self.stale_attempt or self.wrong_result)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        for k in ("missing_result", "unexpected", "divergent", "stale_attempt", "wrong_result"):
            d[k] = d[k][:50]
        return d


_RESULT_FIELDS = ("state", "attempt", "node", "exit_code", "stdout", "error", "finished_at")


def check_tasks(submitted: Mapping[str, str], expected_stdout: Mapping[str, Any],
                records: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> TaskCheck:
    """Task checks by set arithmetic.

    ``submitted``: task id -> the status the client saw for the submit (``ok``, ``fail``,
    ``info``); ``expected_stdout``: task id -> the stdout its echo must produce;
    ``records``: replica name -> task id -> that replica's record at the end (after
    convergence). Checks: every acknowledged task is final with exactly one result, the
    same on every replica; no replica holds a task that was never submitted (``fail``
    submits must not exist); the final result comes from the newest attempt and every
    older attempt ended without a result (``lost``); an echo's output is its own.
    """
    res = TaskCheck()
    acked = {t for t, s in submitted.items() if s == "ok"}
    maybe = {t for t, s in submitted.items() if s == "info"}
    res.acknowledged, res.unknown = len(acked), len(maybe)
    allowed = acked | maybe
    seen: set[str] = set()
    for node in sorted(records):
        for tid in sorted(records[node]):
            seen.add(tid)
            if tid not in allowed and tid not in res.unexpected:
                res.unexpected.append(tid)
    for tid in sorted(seen | acked):
        per_node = {n: recs.get(tid) for n, recs in records.items()}
        finals = {n: r for n, r in per_node.items() if r is not None and r["state"] in FINAL_TASK_STATES}
        if tid in acked and len(finals) != len(per_node):
            res.missing_result.append(tid)
            continue
        if not finals:
            continue
        views = {json.dumps({k: _plain(r.get(k)) for k in _RESULT_FIELDS}, sort_keys=True)
                 for r in finals.values()}
        if len(views) != 1:
            res.divergent.append(tid)
            continue
        rec = next(iter(finals.values()))
        if tid in acked:
            res.final += 1
        attempts = rec.get("attempts") or []
        all_lost = rec["state"] == "failed" and attempts and \
            all(a.get("outcome") == "lost" for a in attempts)
        if rec["state"] != "cancelled" and not all_lost:
            if not attempts or rec["attempt"] != len(attempts) or \
                    attempts[-1].get("outcome") != rec["state"] or \
                    any(a.get("outcome") != "lost" for a in attempts[:-1]):
                res.stale_attempt.append(tid)
                continue
        want = expected_stdout.get(tid)
        if rec["state"] == "succeeded" and want is not None and _plain(rec.get("stdout")) != want:
            res.wrong_result.append(tid)
    return res


def _plain(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    return v
