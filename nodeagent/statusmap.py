"""The compact status map that subscriptions push (pure).

An agent's full status grows with the cluster: per-peer transport counters (about twenty
fields a peer), and on the leader each member's load report and load-table entry. The
console receives a push from every agent several times a second, and decoding those maps
was most of its cost (bench/console.py). ``compact_status`` keeps what the console shows:
per peer only connected, sent, the sum of messages dropped on the way out, and the last
error of a link that is down. A ``status`` request still answers the full map.

A subscription may also ask for deltas (``subscribe`` with ``delta: true``): the first push
is the compact map, each later one only what changed since the previous push
(``status_delta``; the client rebuilds the map with ``apply_delta``). In a large cluster a
follower's push then carries a handful of counters instead of one entry per peer.
"""

from __future__ import annotations

from typing import Any


def keepalive_s(interval_s: float) -> float:
    """How long a subscription may stay silent when nothing changes: the agent pushes its
    status at least this often, so a client can tell a quiet agent from a dead one (the
    console marks an agent unreachable after three keepalives without a push)."""
    return max(1.0, 4.0 * interval_s)


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


# -- deltas: a subscription with ``delta: true`` pushes what changed since its last push --

def status_delta(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What turns ``old`` into ``new``: ``{"set": {key: value}, "sub": {key: delta},
    "del": [key]}``, each part present only when not empty. Nested maps present in both
    get a nested delta; any other changed value (lists included) is replaced whole.
    ``apply_delta(old, status_delta(old, new)) == new``."""
    set_: dict[str, Any] = {}
    sub: dict[str, Any] = {}
    for k, v in new.items():
        if k not in old:
            set_[k] = v
            continue
        was = old[k]
        if was is v:
            continue
        if isinstance(v, dict) and isinstance(was, dict):
            d = status_delta(was, v)
            if d:
                sub[k] = d
        elif type(was) is not type(v) or was != v:
            set_[k] = v
    gone = [k for k in old if k not in new]
    out: dict[str, Any] = {}
    if set_:
        out["set"] = set_
    if sub:
        out["sub"] = sub
    if gone:
        out["del"] = gone
    return out


def apply_delta(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """A new map: ``base`` with ``delta`` applied (``base`` itself is not changed; maps
    that the delta does not touch are shared). A malformed delta raises ValueError."""
    if not isinstance(delta, dict) or not set(delta) <= {"set", "sub", "del"}:
        raise ValueError(f"not a status delta: {sorted(delta) if isinstance(delta, dict) else type(delta).__name__}")
    out = dict(base)
    for k in delta.get("del", ()):
        out.pop(k, None)
    out.update(delta.get("set", {}))
    for k, d in delta.get("sub", {}).items():
        inner = out.get(k)
        if not isinstance(inner, dict):
            raise ValueError(f"status delta changes {k!r} inside, but it is not a map here")
        out[k] = apply_delta(inner, d)
    return out
