"""Frames for fuzzing: valid messages of every client-sendable type, and seeded mutations
of them (bit flips, cut or grown bodies, wrong length prefixes, values swapped for others
at any depth, random bytes). Used by the hypothesis tests of the decoder and by the live
fuzz of a running agent."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack

from nodeagent.protocol import PROTOCOL_VERSION, encode
from nodeagent.raft.messages import AppendEntries, Entry, Heartbeat, RequestVote

TASK = {"id": "t1", "kind": "sleep", "args": {"ms": 5}, "timeout_ms": 1000}

# Valid messages; the live fuzz sends them with a fresh id on an operator's connection.
# No task submissions in the live fuzz (a mutated one could be a long cpu task: real load).
SAMPLES: list[dict[str, Any]] = [
    {"type": "hello", "role": "client", "cluster": "test", "version": PROTOCOL_VERSION, "client_id": "f"},
    {"type": "status", "id": 1},
    {"type": "whoami", "id": 1},
    {"type": "subscribe", "id": 1, "interval_ms": 250},
    {"type": "unsubscribe", "id": 1},
    {"type": "get", "id": 1, "key": "fuzz", "consistency": "stale"},
    {"type": "get", "id": 1, "key": "fuzz"},
    {"type": "put", "id": 1, "key": "fuzz", "value": b"v", "client_id": "fz", "seq": 2},
    {"type": "delete", "id": 1, "key": "fuzz", "client_id": "fz", "seq": 3, "forward": True},
    {"type": "register", "id": 1, "client_id": "fz", "as_role": "viewer"},
    {"type": "cas", "id": 1, "key": "fuzz", "expected": None, "value": b"x", "client_id": "fz", "seq": 4},
    {"type": "dump", "id": 1, "limit": 10},
    {"type": "task_get", "id": 1, "task": "t1"},
    {"type": "task_list", "id": 1, "limit": 5},
    {"type": "task_wait", "id": 1, "ids": ["t1"], "timeout_ms": 10},
    {"type": "task_cancel", "id": 1, "task": "t1", "client_id": "fz", "seq": 5},
    {"type": "fault", "id": 1, "action": "partition", "from": ["n1"], "to": ["n2"]},
    {"type": "heal", "id": 1},
    {"type": "transfer", "id": 1, "to": "n2"},
    {"type": "remove_node", "id": 1, "node": "n3"},
    {"type": "task_report", "id": 1, "event": "start", "task": "t1", "attempt": 1, "node": "n1"},
    {"type": "reply", "id": 1, "ok": True, "result": {"a": [1, b"x"]}},
    {"type": "raft", "group": 0, "msg": Heartbeat("n1", "n2", 3, 5)},
    {"type": "raft", "msg": RequestVote("n1", "n2", 4, 10, 3)},
]
DECODER_ONLY = [  # also for the pure tests: submissions and appends
    {"type": "submit", "id": 1, "tasks": [TASK], "client_id": "fz", "seq": 6},
    {"type": "raft", "msg": AppendEntries("n1", "n2", 5, 3, 2, (Entry(2, 4, b"a"), Entry(5, 5)), 4)},
]
ODD_VALUES = [None, True, False, 0, -1, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), "", "x" * 300,
              b"", b"\xff" * 10, [], [1, [2, [3]]], {}, {"k": 1}, {b"bin": 1}, "é"]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _wire(msg: dict) -> Any:
    return msgpack.unpackb(encode(msg)[4:], raw=False)


def _paths(v: Any, path=()):
    yield path
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, path + (i,))


def _replace(v: Any, path, new) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(v, dict):
        out = dict(v)
        out[head] = _replace(v[head], rest, new)
        return out
    out = list(v)
    out[head] = _replace(v[head], rest, new)
    return out


def _drop(v: Any, path) -> Any:
    if len(path) == 1:
        if isinstance(v, dict):
            return {k: x for k, x in v.items() if k != path[0]}
        return [x for i, x in enumerate(v) if i != path[0]]
    head = path[0]
    if isinstance(v, dict):
        return {**v, head: _drop(v[head], path[1:])}
    out = list(v)
    out[head] = _drop(v[head], path[1:])
    return out


def mutate(rng: random.Random, msg: dict, max_body: int = 4096) -> bytes:
    """One mutated frame of ``msg`` (bytes, length prefix included)."""
    wire = _wire(msg)
    how = rng.randrange(9)
    if how == 0:  # a value swapped for an odd one, anywhere
        path = rng.choice(list(_paths(wire)))
        wire = _replace(wire, path, rng.choice(ODD_VALUES))
    elif how == 1:  # a field dropped
        path = rng.choice([p for p in _paths(wire) if p] or [("type",)])
        wire = _drop(wire, path)
    elif how == 2:  # an unknown field
        wire = {**wire, rng.choice(["zz", "type2", "", "id"]): rng.choice(ODD_VALUES)}
    elif how == 3:  # another type's name on these fields
        wire = {**wire, "type": rng.choice([s["type"] for s in SAMPLES] + ["nope", ""])}
    body = msgpack.packb(wire, use_bin_type=True) if not isinstance(wire, bytes) else wire
    if how == 4:  # bit flips
        b = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        body = bytes(b)
    elif how == 5:  # cut short, with a prefix that says so
        body = body[: rng.randrange(len(body))]
    elif how == 6:  # trailing bytes inside the frame
        body = body + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    elif how == 7:  # a lying length prefix (shorter; a longer one would stall until closed)
        return struct.pack(">I", max(0, len(body) - rng.randrange(1, 4))) + body
    elif how == 8:  # random bytes
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    return frame(body[:max_body])


def garbage(rng: random.Random) -> bytes:
    """Bytes for a connection that has not done TLS (or a plain one)."""
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return b"\x16\x03\x01" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 100)))
    if kind == 2:
        return encode(SAMPLES[0])
    return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def randomize(rng: random.Random, msg: dict) -> dict:
    """``msg`` with random but well-formed values: it passes the decoder and reaches the
    request handlers (unknown keys, sessions that do not exist, forbidden actions...)."""
    out = dict(msg)
    for k, v in msg.items():
        if k == "type" or k == "msg":
            continue
        if k in ("key", "task", "client_id", "to", "node") and isinstance(v, str):
            out[k] = "".join(rng.choice("abcxyz019._-é") for _ in range(rng.randrange(1, 40)))
        elif k in ("value",):
            out[k] = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        elif k in ("id", "seq"):
            out[k] = rng.choice([0, 1, 2, rng.randrange(2**63)])
        elif k == "limit":
            out[k] = rng.randrange(1, 50)
        elif k == "forward":
            out[k] = rng.random() < 0.5
    return out
