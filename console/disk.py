"""What the console says about the agents' disks (pure): the lines of `raftdeck status`
and the alerts of the console's header, from the ``disk`` part of each agent's status
(``free_bytes``, ``needs_bytes``: room for its next WAL segment and a snapshot beside the
newest; ``low``: free space under twice that). An agent whose disk fills stops (exit 3,
docs/OPERATIONS.md "Disk full"), so this is the warning before it."""

from __future__ import annotations

from typing import Any, Mapping

_MIB = 1 << 20


def low_disks(statuses: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """``(node, free MiB, needs MiB)`` for each answering agent whose disk is low, the
    least free first. ``statuses``: name -> status (anything else for an agent that did
    not answer)."""
    out = []
    for name, st in statuses.items():
        d = st.get("disk") if isinstance(st, Mapping) else None
        if isinstance(d, Mapping) and d.get("low"):
            out.append((name, int(d.get("free_bytes", 0)) // _MIB, int(d.get("needs_bytes", 0)) // _MIB))
    return sorted(out, key=lambda t: (t[1], t[0]))


def disk_lines(statuses: Mapping[str, Any]) -> list[str]:
    """What `raftdeck status` says: one line per node whose disk is low."""
    return [f"disk: WARNING: {name} has {free} MiB free for its data directory, under twice "
            f"the {needs} MiB its log needs next; free space there (it does not lead "
            "meanwhile, and its agent stops when the disk is full)"
            for name, free, needs in low_disks(statuses)]


def disk_alerts(statuses: Mapping[str, Any]) -> list[str]:
    """The header's short form."""
    return [f"{name} {free} MiB free" for name, free, _ in low_disks(statuses)]
