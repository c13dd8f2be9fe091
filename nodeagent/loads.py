"""The leader's table of load reports, with staleness.

Each agent reports its load on every heartbeat response (running and queued tasks, its
capacity from the inventory, its 1-minute load average); the leader records its own load
in the same table. A node whose latest report is older than the lease is not alive for
placement: its tasks are reassigned when their lease expires (see DESIGN.md, "Dispatch
and execution").

Pure: no I/O and no clock. ``now`` is whatever monotonic clock the caller uses, in seconds,
passed in; the table only compares the numbers it is given. A table belongs to one leader;
a new leader starts with an empty one and fills it within a heartbeat.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from nodeagent.dispatch import NodeLoad

__all__ = ["LoadReport", "LoadTable"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One node's latest load report, stamped with the leader's time of receipt ``at``."""

    node: str
    at: float
    running: int
    queued: int
    capacity: int
    load1: float

    def age(self, now: float) -> float:
        """Seconds since the report (negative if ``now`` is before it)."""
        return now - self.at

    def is_alive(self, now: float, lease: float) -> bool:
        """Whether the report is less than ``lease`` seconds old."""
        return now - self.at < lease

    @property
    def pending(self) -> int:
        """Running plus queued tasks."""
        return self.running + self.queued


class LoadTable:
    """Latest :class:`LoadReport` per node."""

    __slots__ = ("_reports",)

    def __init__(self) -> None:
        self._reports: dict[str, LoadReport] = {}

    def report(
        self,
        node: str,
        now: float,
        running: int,
        queued: int,
        capacity: int,
        load1: float,
    ) -> LoadReport:
        """Record a report received at ``now``; return the report the table now holds.

        A report older than the one held (``now`` before its ``at``) is ignored and the held
        one returned: the table never goes back in time. Raises ValueError for a bad field
        (empty name, negative or non-int counts, capacity < 1, non-finite numbers).
        """
        if not isinstance(node, str) or not node:
            raise ValueError(f"node must be a non-empty string, got {node!r}")
        if not _is_real(now):
            raise ValueError(f"{node}: now must be a finite number, got {now!r}")
        for field_name, v in (("running", running), ("queued", queued)):
            if not _is_int(v) or v < 0:
                raise ValueError(f"{node}: {field_name} must be an int >= 0, got {v!r}")
        if not _is_int(capacity) or capacity < 1:
            raise ValueError(f"{node}: capacity must be an int >= 1, got {capacity!r}")
        if not _is_real(load1) or load1 < 0:
            raise ValueError(f"{node}: load1 must be a finite number >= 0, got {load1!r}")
        held = self._reports.get(node)
        if held is not None and now < held.at:
            return held
        rep = LoadReport(node, float(now), running, queued, capacity, float(load1))
        self._reports[node] = rep
        return rep

    def forget(self, node: str) -> bool:
        """Drop a node's report (it left the cluster). True if there was one."""
        return self._reports.pop(node, None) is not None

    def get(self, node: str) -> LoadReport | None:
        """The node's latest report, or None if it never reported (or was forgotten)."""
        return self._reports.get(node)

    def alive(self, now: float, lease: float) -> set[str]:
        """Nodes whose latest report is less than ``lease`` seconds old at ``now``."""
        if not _is_real(lease) or lease <= 0:
            raise ValueError(f"lease must be a finite number > 0, got {lease!r}")
        return {n for n, r in self._reports.items() if r.is_alive(now, lease)}

    def snapshot(self, now: float, lease: float | None = None) -> dict[str, dict]:
        """Plain data for status, ordered by node name.

        ``{node: {"at", "age", "running", "queued", "capacity", "load1"}}``, plus ``"alive"``
        when a ``lease`` is given. Only builtins, so it msgpack- and JSON-encodes as is.
        """
        if lease is not None and (not _is_real(lease) or lease <= 0):
            raise ValueError(f"lease must be a finite number > 0, got {lease!r}")
        out: dict[str, dict] = {}
        for name in sorted(self._reports):
            r = self._reports[name]
            row = {
                "at": r.at,
                "age": r.age(now),
                "running": r.running,
                "queued": r.queued,
                "capacity": r.capacity,
                "load1": r.load1,
            }
            if lease is not None:
                row["alive"] = r.is_alive(now, lease)
            out[name] = row
        return out

    def candidates(self, now: float, lease: float, assigned: Mapping[str, int]) -> list[NodeLoad]:
        """The reported nodes as placement candidates for :mod:`nodeagent.dispatch`, by name.

        ``capacity`` comes from each node's report, ``alive`` from the lease, and
        ``assigned`` from the caller's count of the replicated task table (0 if absent):
        the task table is authoritative, it already counts assignments the node has not
        reported yet. A node that never reported is not a candidate.
        """
        live = self.alive(now, lease)
        return [
            NodeLoad(name, capacity=r.capacity, assigned=assigned.get(name, 0), alive=name in live)
            for name, r in sorted(self._reports.items())
        ]

    def __len__(self) -> int:
        return len(self._reports)

    def __contains__(self, node: object) -> bool:
        return node in self._reports

    def __iter__(self) -> Iterator[str]:
        """Node names, sorted."""
        return iter(sorted(self._reports))
