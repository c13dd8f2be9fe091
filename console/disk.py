"""What the console says about the agents' disks and data directories (pure): the lines
of `raftdeck status` and the alerts of the console's header, from the ``disk`` part of each
agent's status
(``free_bytes``, ``needs_bytes``: room for its next WAL segment and a snapshot beside the
newest; ``low``: free space under twice that). An agent whose disk fills stops (exit 3,
docs/OPERATIONS.md "Disk full"), so this is the warning before it. And from each agent's
``refused_peers``: the voters that came back on another data directory (nodeagent/peerids.py)."""

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


# -- a voter back on another data directory ---------------------------------------------------

def refused_voters(statuses: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each voter that some answering agent refuses because it came back with another
    data directory (its ``refused_peers``), with the agents that refuse it, sorted."""
    out: dict[str, list[str]] = {}
    for name, st in statuses.items():
        refused = st.get("refused_peers") if isinstance(st, Mapping) else None
        if isinstance(refused, Mapping):
            for peer in refused:
                out.setdefault(str(peer), []).append(name)
    return {p: sorted(by) for p, by in sorted(out.items())}


def refused_lines(statuses: Mapping[str, Any]) -> list[str]:
    """What `raftdeck status` says: one line per refused voter."""
    return [f"data: ERROR: {', '.join(by)} refuse{'s' if len(by) == 1 else ''} {peer}: it is "
            f"a voter that came back with another data directory (emptied or replaced), so "
            f"it lost its log and votes and may not vote. Restore its old data directory, or "
            f"take it out and in again: `raftdeck remove-node {peer}`, empty its data "
            f"directory, `raftdeck add-node {peer}`"
            for peer, by in refused_voters(statuses).items()]


def refused_alerts(statuses: Mapping[str, Any]) -> list[str]:
    """The header's short form."""
    return [f"{peer} (refused by {', '.join(by)})" for peer, by in refused_voters(statuses).items()]
