"""The compact status map that subscriptions push (pure).

An agent's full status grows with the cluster: per-peer transport counters (about twenty
fields a peer), and on the leader each member's load report and load-table entry. The
console receives a push from every agent several times a second, and decoding those maps
was most of its cost (bench/console.py). ``compact_status`` keeps what the console shows:
per peer only connected, sent, the sum of messages dropped on the way out, and the last
error of a link that is down. A ``status`` request still answers the full map.
"""

from __future__ import annotations

from typing import Any


def compact_status(full: dict[str, Any]) -> dict[str, Any]:
    out = dict(full)
    tr = full.get("transport") or {}
    peers = {}
    for name, p in (tr.get("peers") or {}).items():
        c = {"connected": p.get("connected"), "sent": p.get("sent", 0),
             "dropped_out": sum(v for k, v in p.items()
                                if k.startswith("dropped_") and k != "dropped_incoming"
                                and isinstance(v, int))}
        if not p.get("connected") and p.get("last_error"):
            c["last_error"] = p["last_error"]
        peers[name] = c
    out["transport"] = {"peers": peers, "totals": tr.get("totals", {})}
    out.pop("peer_reports", None)
    if isinstance(full.get("tasks"), dict):
        out["tasks"] = {k: v for k, v in full["tasks"].items() if k != "loads"}
    return out
