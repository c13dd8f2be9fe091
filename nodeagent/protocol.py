"""The sans-I/O wire codec shared by the agents (trio) and the console (asyncio).

Rules of this module (docs/PROTOCOL.md is the reader's version):

* A frame is a 4-byte big-endian unsigned length followed by that many bytes of msgpack,
  which must decode to a map with a string ``type``. A zero length is an error; a length
  above the decoder's ``max_frame`` is an error as soon as the 4 length bytes are seen,
  before any of the body is waited for.
* Every message type is one entry of ``MESSAGE_SCHEMAS``: its fields, each with a kind
  (the allowed Python/msgpack type and range), whether it is required, and the value used
  when an optional field is absent. Validation reads that table; there is no per-type code.
  Unknown fields are rejected (the codec is strict), ``bool`` is never an ``int``, ints fit
  in 64 bits, strings have a length limit, ``bytes`` fields are msgpack ``bin``.
* Everything a peer can get wrong raises ``ProtocolError(code, message)``; any other
  exception out of ``FrameDecoder`` is a bug in this module. After an error a decoder is
  dead: every later call raises the same error.
* ``encode()`` validates with the same table, so a bad message is caught by its sender.
  It raises ``ProtocolError`` too (with the same codes): there, it is the caller's bug.
* Raft messages (``nodeagent.raft.messages``) travel inside ``raft`` frames as compact
  maps (short keys, entries as ``[term, index, kind, data]``). ``raft_to_wire`` and
  ``raft_from_wire`` convert; decoding checks every field and the AppendEntries entry chain.
* No sockets, clocks, threads, trio or asyncio here: callers move the bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import msgpack

from nodeagent.raft import messages as rm

__all__ = [
    "bin_header",
    "CLOSED",
    "DEFAULT_MAX_FRAME",
    "MESSAGE_SCHEMAS",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "RAFT_KINDS",
    "Field",
    "FrameDecoder",
    "MessageSpec",
    "ProtocolError",
    "Signal",
    "encode",
    "raft_from_wire",
    "raft_to_wire",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 4 * 1024 * 1024
MAX_FRAME_LIMIT: Final = 2**32 - 1  # what a 4-byte length can express
MAX_DEPTH: Final = 32  # nesting limit for free-form (``any``) values
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
UINT64_MAX: Final = 2**64 - 1

_HEADER = struct.Struct(">I")
_COMPACT_AT = 64 * 1024  # decoder drops consumed bytes once this many have piled up


# -- errors and signals -------------------------------------------------------------------


class ProtocolError(Exception):
    """A peer broke the protocol (or, from ``encode()``, the caller built a bad message).

    ``code`` is a short machine-readable word (see ``ERROR_CODES``); ``message`` says what
    was wrong in words an operator can act on, naming the message type and field.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args: the error pickles and compares
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_message(self, id: int | None = None) -> dict[str, Any]:
        """The ``error`` message to send to the peer before closing the connection."""
        msg: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message[:4096]}
        if id is not None:
            msg["id"] = id
        return msg


ERROR_CODES: Final = {
    "empty_frame": "a frame's length prefix is 0",
    "frame_too_large": "a frame's length prefix exceeds the limit",
    "truncated": "the stream ended inside a frame",
    "bad_msgpack": "the frame body is not exactly one valid msgpack value (or uses ext types)",
    "not_a_map": "the frame body is valid msgpack but not a map",
    "unknown_type": "the map's 'type' names no known message",
    "bad_field": "a field is missing, unknown, of the wrong type or out of range",
}


class Signal(enum.Enum):
    """What ``FrameDecoder.next_message()`` returns when it has no message."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    CLOSED = "CLOSED"  # EOF was fed and every frame before it has been returned

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Signal.NEED_DATA
CLOSED: Final = Signal.CLOSED


def _show(value: Any) -> str:
    """A short, safe description of a peer-supplied value for an error message."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:40]) + ("..." if len(value) > 40 else "")
        return f"{type(value).__name__} {text}"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"{type(value).__name__} of {value.bit_length()} bits"
    if isinstance(value, (bool, int, float)) or value is None:
        return f"{type(value).__name__} {repr(value)[:40]}"
    return type(value).__name__


def _bad(path: str, problem: str) -> ProtocolError:
    return ProtocolError("bad_field", f"{path}: {problem}")


def _wrong_type(path: str, kind: Kind, value: Any) -> ProtocolError:
    return _bad(path, f"expected {kind.describe()}, got {_show(value)}")


# -- field kinds --------------------------------------------------------------------------


class Kind:
    """The wire type of one field.

    ``decode(value, path)`` checks a value read from msgpack and returns its Python form;
    ``encode(value, path)`` checks a value about to be sent and returns its wire form.
    Both raise ``ProtocolError("bad_field", ...)`` naming ``path``. For plain kinds the
    two forms are the same value.
    """

    def decode(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def encode(self, value: Any, path: str) -> Any:
        return self.decode(value, path)

    def same(self, value: Any) -> bool:
        """True only when ``decode`` and ``encode`` would both return ``value`` itself
        without raising: the fast path of a valid scalar field (``_check_map`` then
        skips the call, and the error path it would format). False means "ask
        ``decode``/``encode``", never "invalid"."""
        return False

    def describe(self) -> str:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Bool(Kind):
    """True or False; ints are not booleans."""

    def decode(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise _wrong_type(path, self, value)
        return value

    def same(self, value: Any) -> bool:
        return type(value) is bool

    def describe(self) -> str:
        return "bool"


@dataclasses.dataclass(frozen=True)
class Int(Kind):
    """An integer in ``lo..hi`` (inclusive); booleans are rejected."""

    lo: int = INT64_MIN
    hi: int = INT64_MAX

    def decode(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong_type(path, self, value)
        if not self.lo <= value <= self.hi:
            raise _bad(path, f"{_show(value)} is out of range {self._range()}")
        return int(value)

    def same(self, value: Any) -> bool:
        return type(value) is int and self.lo <= value <= self.hi

    def _range(self) -> str:
        names = {INT64_MIN: "-2^63", INT64_MAX: "2^63-1"}
        return f"{names.get(self.lo, self.lo)}..{names.get(self.hi, self.hi)}"

    def describe(self) -> str:
        return f"int {self._range()}"


@dataclasses.dataclass(frozen=True)
class Float(Kind):
    """A finite number in ``lo..hi``; an int is accepted and becomes a float."""

    lo: float
    hi: float

    def decode(self, value: Any, path: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _wrong_type(path, self, value)
        if not (self.lo <= value <= self.hi):  # also rejects NaN
            raise _bad(path, f"{value!r} is out of range {self.lo}..{self.hi}")
        return float(value)

    def same(self, value: Any) -> bool:
        return type(value) is float and self.lo <= value <= self.hi

    def describe(self) -> str:
        return f"float {self.lo}..{self.hi}"


@dataclasses.dataclass(frozen=True)
class Str(Kind):
    """A string of ``min_len..max_len`` characters, optionally one of ``choices``."""

    min_len: int = 0
    max_len: int = 256
    choices: tuple[str, ...] = ()

    def decode(self, value: Any, path: str) -> str:
        if type(value) is not str:
            raise _wrong_type(path, self, value)
        if self.choices:
            if value not in self.choices:
                raise _bad(path, f"{_show(value)} is not one of {', '.join(self.choices)}")
        elif not self.min_len <= len(value) <= self.max_len:
            raise _bad(path, f"string of {len(value)} characters, allowed {self.min_len}..{self.max_len}")
        return value

    def same(self, value: Any) -> bool:
        if type(value) is not str:
            return False
        if self.choices:
            return value in self.choices
        return self.min_len <= len(value) <= self.max_len

    def describe(self) -> str:
        if self.choices:
            return " | ".join(repr(c) for c in self.choices)
        return f"str of {self.min_len}..{self.max_len} characters"


@dataclasses.dataclass(frozen=True)
class Bytes(Kind):
    """Binary data (msgpack bin) of at most ``max_len`` bytes (None: the frame is the limit).

    ``encode`` also takes bytearray and memoryview; ``decode`` always returns bytes.
    """

    max_len: int | None = None

    def decode(self, value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            raise _wrong_type(path, self, value)
        return self._check_len(value, path)

    def encode(self, value: Any, path: str) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _wrong_type(path, self, value)
        return self._check_len(bytes(value), path)

    def same(self, value: Any) -> bool:
        return type(value) is bytes and (self.max_len is None or len(value) <= self.max_len)

    def _check_len(self, value: bytes, path: str) -> bytes:
        if self.max_len is not None and len(value) > self.max_len:
            raise _bad(path, f"{len(value)} bytes, at most {self.max_len} allowed")
        return value

    def describe(self) -> str:
        return "bytes" if self.max_len is None else f"bytes of at most {self.max_len}"


@dataclasses.dataclass(frozen=True)
class Nullable(Kind):
    """``None`` (msgpack nil) or a value of ``inner``."""

    inner: Kind

    def decode(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.decode(value, path)

    def encode(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.encode(value, path)

    def same(self, value: Any) -> bool:
        return value is None or self.inner.same(value)

    def describe(self) -> str:
        return f"{self.inner.describe()} | nil"


@dataclasses.dataclass(frozen=True)
class ListOf(Kind):
    """An array of at most ``max_len`` values of ``item``; ``encode`` also takes tuples."""

    item: Kind
    max_len: int = 1024

    def decode(self, value: Any, path: str) -> list[Any]:
        if type(value) is not list:
            raise _wrong_type(path, self, value)
        return self._items(value, path, self.item.decode)

    def encode(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(path, self, value)
        return self._items(value, path, self.item.encode)

    def _items(self, value: Any, path: str, each: Callable[[Any, str], Any]) -> list[Any]:
        if len(value) > self.max_len:
            raise _bad(path, f"{len(value)} items, at most {self.max_len} allowed")
        return [each(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def describe(self) -> str:
        return f"list of {self.item.describe()}"


@dataclasses.dataclass(frozen=True)
class AnyValue(Kind):
    """Any plain msgpack value: nil, bool, int, float, str, bytes, arrays, and maps with
    str or bytes keys, nested at most ``MAX_DEPTH`` deep. Ext types are never allowed.
    With ``map_only`` the value itself must be a map with str keys.
    """

    map_only: bool = False

    def decode(self, value: Any, path: str) -> Any:
        if self.map_only and (type(value) is not dict or not all(type(k) is str for k in value)):
            raise _wrong_type(path, self, value)
        _check_plain(value, path)
        return value

    def describe(self) -> str:
        return "map with str keys" if self.map_only else "any msgpack value"


_SCALARS: Final = frozenset({type(None), bool, float, str, bytes})
_CONTAINERS: Final = (list, tuple, dict)


def _check_plain(value: Any, path: str) -> None:
    """Walk ``value`` without recursion; reject what msgpack could not carry back as is.

    Hot on the console (status maps of thousands of nodes), so exact scalar types are
    skipped first and only containers are pushed on the stack.
    """
    if not isinstance(value, _CONTAINERS):
        _check_scalar(value, path)
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(path, f"value is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            for k in item:
                if type(k) is not str and type(k) is not bytes:
                    raise _bad(path, f"map key {_show(k)} is not str or bytes")
            item = item.values()
        for v in item:
            t = type(v)
            if t in _SCALARS or (t is int and INT64_MIN <= v <= UINT64_MAX):
                continue
            if isinstance(v, _CONTAINERS):
                stack.append((v, depth + 1))
            else:
                _check_scalar(v, path)


def _check_scalar(value: Any, path: str) -> None:
    if type(value) in _SCALARS:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if not INT64_MIN <= value <= UINT64_MAX:
            raise _bad(path, f"integer {_show(value)} does not fit in 64 bits")
        return
    raise _bad(path, f"{_show(value)} is not a plain msgpack value")


# -- maps with a fixed set of fields ------------------------------------------------------

_ABSENT: Final = object()  # marks "no default: an absent optional field stays absent"


@dataclasses.dataclass(frozen=True)
class Field:
    """One entry of a map: its wire ``key``, ``kind``, whether it is ``required``, and the
    ``default`` filled in when an optional field is absent (``_ABSENT``: left out).
    ``attr`` is the dataclass attribute it maps to (Raft records only)."""

    key: str
    kind: Kind
    required: bool = True
    default: Any = _ABSENT
    attr: str = ""


def req(key: str, kind: Kind) -> Field:
    """A required field."""
    return Field(key, kind)


def opt(key: str, kind: Kind, default: Any = _ABSENT) -> Field:
    """An optional field; ``default`` (if given) is filled in when it is absent."""
    return Field(key, kind, required=False, default=default)


def _check_map(
    obj: Any, fields: Mapping[str, Field], path: str, encoding: bool, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Validate a map against ``fields``: no unknown keys (except ``skip``), every required
    field present, each value of its kind. Returns the values keyed by wire key, defaults
    filled in, in decoded (``encoding=False``) or wire (``encoding=True``) form. Error
    paths name a field's ``attr`` when it has one (Raft records), else its key."""
    if not isinstance(obj, Mapping):
        raise _bad(path, f"expected a map, got {_show(obj)}")
    for key in obj:
        if key not in fields and key not in skip:
            known = ", ".join(fields) or "none"
            raise _bad(path, f"unknown field {_show(key)} (the protocol is strict; known fields: {known})")
    out: dict[str, Any] = {}
    for key, f in fields.items():
        if key in obj:
            value = obj[key]
            if f.kind.same(value):  # a valid scalar, as is: no call, no path
                out[key] = value
                continue
            sub = f"{path}.{f.attr or key}"  # Raft records: name the dataclass attribute
            out[key] = f.kind.encode(value, sub) if encoding else f.kind.decode(value, sub)
        elif f.required:
            what = f"{f.attr}: {f.kind.describe()}" if f.attr else f.kind.describe()
            raise _bad(path, f"missing required field {key!r} ({what})")
        elif f.default is not _ABSENT:
            out[key] = f.default
    return out


@dataclasses.dataclass(frozen=True)
class Struct(Kind):
    """A nested map with fixed fields, decoded to a dict."""

    fields: Mapping[str, Field]

    def decode(self, value: Any, path: str) -> dict[str, Any]:
        return _check_map(value, self.fields, path, encoding=False)

    def encode(self, value: Any, path: str) -> dict[str, Any]:
        return _check_map(value, self.fields, path, encoding=True)

    def describe(self) -> str:
        return "map {" + ", ".join(self.fields) + "}"


# -- message table ------------------------------------------------------------------------

Rule = tuple[str, Any, tuple[str, ...]]  # (field, value, fields required when field == value)


@dataclasses.dataclass(frozen=True)
class MessageSpec:
    """One message type.

    ``category``: "handshake" (hello, hello_ok), "any" (error), "peer" (raft), "request"
    (client to agent, carries ``id``), "reply" (agent to client). ``role`` is the least
    client role allowed to send a request (viewer < operator < admin). ``required_when``
    lists rules (field, value, fields): when ``field == value`` those fields must be present.
    """

    fields: Mapping[str, Field]
    category: str
    role: str | None = None
    required_when: tuple[Rule, ...] = ()
    doc: str = ""


def _spec(
    category: str, *fields: Field, role: str | None = None, when: tuple[Rule, ...] = (), doc: str = ""
) -> MessageSpec:
    """A message type whose fields are ``fields``, in wire order."""
    return MessageSpec({f.key: f for f in fields}, category, role, when, doc)


def _request(role: str, *fields: Field, when: tuple[Rule, ...] = (), doc: str = "") -> MessageSpec:
    """A client request: always carries ``id``, echoed by its reply."""
    return _spec("request", req("id", REQUEST_ID), *fields, role=role, when=when, doc=doc)


class _RaftKind(Kind):
    """The ``msg`` of a ``raft`` frame: a Raft dataclass in Python, a compact map on the wire.

    ``encode`` takes the dataclass (or an already converted map, which it re-validates).
    """

    def decode(self, value: Any, path: str) -> rm.Message:
        return _decode_raft(value, path)

    def encode(self, value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            value = _decode_raft(value, path)
        return _encode_raft(value, path)

    def describe(self) -> str:
        return "Raft message map"


UINT: Final = Int(0, INT64_MAX)
REQUEST_ID: Final = UINT
NODE: Final = Str(1, 128)
NAME: Final = Str(1, 128)
KEY: Final = Str(1, 1024)
CODE: Final = Str(1, 64)
TEXT: Final = Str(0, 4096)
MILLIS: Final = Int(0, 2**31 - 1)
ERROR_BODY: Final = Struct({"code": req("code", CODE), "message": req("message", TEXT)})
NODE_LIST: Final = Nullable(ListOf(NODE, 1024))
TASK_ID: Final = Str(1, 128)
TASK_STATES: Final = ("submitted", "assigned", "running", "succeeded", "failed", "timed_out", "cancelled")
TASK_SPEC: Final = Struct({
    "id": req("id", TASK_ID),
    "kind": req("kind", Str(choices=("sleep", "cpu", "echo", "shell"))),
    "args": req("args", AnyValue(map_only=True)),
    "timeout_ms": req("timeout_ms", Int(1, 86_400_000)),
    "max_attempts": opt("max_attempts", Int(1, 100)),
    "policy": opt("policy", Nullable(Str(choices=("least_loaded", "round_robin", "weighted", "hash")))),
    "key": opt("key", Nullable(Str(1, 1024))),
})

# A relaying follower states the original client's role; the leader honours it only downwards.
AS_ROLE: Final = Str(choices=("viewer", "operator", "admin"))

MESSAGE_SCHEMAS: Final[Mapping[str, MessageSpec]] = {
    # handshake: the first frame each way
    "hello": _spec(
        "handshake",
        req("role", Str(choices=("peer", "client"))),
        req("cluster", NAME),
        req("version", UINT),
        opt("node", NODE),
        opt("client_id", NAME),
        opt("data_id", Str(8, 64)),
        when=(("role", "peer", ("node",)),),
        doc="first frame of every connection, from the side that connected",
    ),
    "hello_ok": _spec(
        "handshake",
        req("node", NODE),
        req("version", UINT),
        req("leader", Nullable(NODE)),
        doc="the accepting agent's answer to a good hello",
    ),
    "error": _spec(
        "any",
        req("code", CODE),
        req("message", TEXT),
        opt("id", REQUEST_ID),
        doc="a fatal problem; the sender closes the connection after it",
    ),
    # peers
    "raft": _spec(
        "peer",
        opt("group", UINT, 0),
        req("msg", _RaftKind()),
        doc="one Raft message; group is reserved for multi-group (always 0 today)",
    ),
    # client requests
    "status": _request("viewer", doc="one status snapshot of the agent"),
    "subscribe": _request("viewer", req("interval_ms", Int(10, 2**31 - 1)), opt("delta", Bool()),
                          doc="status_update every interval_ms; delta: later pushes carry changes only"),
    "unsubscribe": _request("viewer", doc="stop status_update pushes"),
    "whoami": _request("viewer", doc="who this connection is: the certificate's kind, name and role"),
    "get": _request(
        "viewer",
        req("key", KEY),
        opt("consistency", Str(choices=("linearizable", "stale")), "linearizable"),
        doc="read one key",
    ),
    "put": _request(
        "operator",
        req("key", KEY),
        req("value", Bytes()),
        req("client_id", NAME),
        req("seq", UINT),
        opt("forward", Bool(), False), opt("as_role", AS_ROLE),
        doc="write one key (applied once per client_id, seq)",
    ),
    "delete": _request(
        "operator", req("key", KEY), req("client_id", NAME), req("seq", UINT),
        opt("forward", Bool(), False), opt("as_role", AS_ROLE), doc="delete one key"
    ),
    "register": _request(
        "operator", req("client_id", NAME), opt("forward", Bool(), False), opt("as_role", AS_ROLE),
        doc="open a client session (its seq 1, a no-op)"
    ),
    "cas": _request(
        "operator",
        req("key", KEY),
        req("expected", Nullable(Bytes())),
        req("value", Bytes()),
        req("client_id", NAME),
        req("seq", UINT),
        opt("forward", Bool(), False), opt("as_role", AS_ROLE),
        doc="write key only if its value is expected (nil: only if absent)",
    ),
    "transfer": _request("admin", req("to", NODE), doc="move leadership to node 'to'"),
    "add_node": _request(
        "admin",
        req("node", NODE),
        req("host", Str(1, 255)),
        req("port", Int(1, 65535)),
        req("priority", UINT),
        req("learner", Bool()),
        doc="add a member (a learner, or a voter)",
    ),
    "remove_node": _request("admin", req("node", NODE), doc="remove a member"),
    "fault": _request(
        "admin",
        req("action", Str(choices=("partition", "latency", "loss", "heal"))),
        opt("from", NODE_LIST, None),
        opt("to", NODE_LIST, None),
        opt("ms", MILLIS, 0),
        opt("rate", Float(0.0, 1.0), 0.0),
        opt("duration_ms", MILLIS),
        when=(("action", "latency", ("ms",)), ("action", "loss", ("rate",))),
        doc="inject (or heal) a network fault on peer traffic from -> to",
    ),
    "heal": _request("admin", doc="remove every fault this agent enforces"),
    # tasks
    "submit": _request(
        "operator",
        req("tasks", ListOf(TASK_SPEC, 1000)),
        req("client_id", NAME),
        req("seq", UINT),
        opt("forward", Bool(), False), opt("as_role", AS_ROLE),
        doc="submit 1 to 1000 tasks; a task's id makes its submission idempotent",
    ),
    "task_get": _request("viewer", req("task", TASK_ID), doc="one task's record"),
    "dump": _request(
        "viewer", opt("limit", Int(1, 1_000_000), 20_000),
        opt("prefix", Str(0, 1024), ""), opt("after", Nullable(KEY), None),
        doc="this replica's key-value pairs in key order (the divergence view, `raftdeck "
            "keys`): at most limit keys, only those starting with prefix, after a key",
    ),
    "backup": _request(
        "admin",
        opt("backup", Nullable(Str(1, 64)), None),
        opt("offset", UINT, 0),
        opt("consistency", Str(choices=("linearizable", "stale")), "linearizable"),
        doc="this replica's whole state for a backup, taken at the first request (no backup "
            "id) and fetched in chunks by id and offset; linearizable: after a read barrier, "
            "so it holds every write acknowledged before the request",
    ),
    "task_list": _request(
        "viewer",
        opt("state", Nullable(Str(choices=TASK_STATES)), None),
        opt("node", Nullable(NODE), None),
        opt("limit", Int(1, 10_000), 100),
        opt("after", Nullable(TASK_ID), None),
        doc="tasks in submission order, filtered by state and node, paged by id",
    ),
    "task_wait": _request(
        "viewer",
        req("ids", ListOf(TASK_ID, 1000)),
        req("timeout_ms", MILLIS),
        doc="wait until every listed task is final, or the timeout; returns the records",
    ),
    "task_cancel": _request(
        "operator",
        req("task", TASK_ID),
        req("client_id", NAME),
        req("seq", UINT),
        opt("forward", Bool(), False), opt("as_role", AS_ROLE),
        doc="cancel a queued or running task",
    ),
    "task_report": _request(
        "operator",
        req("event", Str(choices=("start", "complete"))),
        req("task", TASK_ID),
        req("attempt", Int(1, 1000)),
        req("node", NODE),
        opt("outcome", Nullable(Str(choices=("succeeded", "failed", "timed_out"))), None),
        opt("exit_code", Nullable(Int(-(2**31), 2**31 - 1)), None),
        opt("stdout", Bytes(), b""),
        opt("stderr", Bytes(), b""),
        opt("error", Nullable(TEXT), None),
        opt("ts", UINT, 0),
        when=(("event", "complete", ("outcome",)),),
        doc="an agent tells the leader it started or finished an attempt (agents only)",
    ),
    # agent to client
    "reply": _spec(
        "reply",
        req("id", REQUEST_ID),
        req("ok", Bool()),
        opt("result", AnyValue()),
        opt("error", ERROR_BODY),
        opt("leader", Nullable(NODE)),
        when=(("ok", False, ("error",)),),
        doc="the answer to one request, matched by id",
    ),
    "status_update": _spec(
        "reply",
        req("status", AnyValue(map_only=True)),
        opt("id", REQUEST_ID),
        opt("delta", Bool()),
        doc="pushed while subscribed; id is the subscribe request's; delta: status holds the "
            "changes since the previous push (nodeagent.statusmap.status_delta)",
    ),
}


def _validate(obj: Any, encoding: bool) -> dict[str, Any]:
    """Check one message against ``MESSAGE_SCHEMAS``; return it with defaults filled in."""
    if not isinstance(obj, Mapping):
        raise ProtocolError("not_a_map", f"a message is a map with a 'type', got {_show(obj)}")
    mtype = obj.get("type")
    if type(mtype) is not str:
        raise ProtocolError("bad_field", f"message.type: every message needs a string 'type', got {_show(mtype)}")
    spec = MESSAGE_SCHEMAS.get(mtype)
    if spec is None:
        known = ", ".join(MESSAGE_SCHEMAS)
        raise ProtocolError("unknown_type", f"unknown message type {_show(mtype)}; known types: {known}")
    out = {"type": mtype}
    out.update(_check_map(obj, spec.fields, mtype, encoding, skip=("type",)))
    _check_rules(obj, spec, mtype)
    return out


def _check_rules(obj: Mapping[str, Any], spec: MessageSpec, mtype: str) -> None:
    for field, value, needed in spec.required_when:
        if obj.get(field) == value:
            for name in needed:
                if name not in obj:
                    raise _bad(mtype, f"field {name!r} is required when {field} is {value!r}")


# -- Raft messages ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EnumKind(Kind):
    """An IntEnum member carried as its int value."""

    enum_type: type[enum.IntEnum]

    def decode(self, value: Any, path: str) -> enum.IntEnum:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong_type(path, self, value)
        try:
            return self.enum_type(value)
        except ValueError:
            raise _bad(path, f"{value} is not a known {self.enum_type.__name__}") from None

    def encode(self, value: Any, path: str) -> int:
        return int(self.decode(value, path))

    def describe(self) -> str:
        return f"{self.enum_type.__name__} ({', '.join(f'{m.value}={m.name}' for m in self.enum_type)})"


class _EntriesKind(Kind):
    """Log entries: a tuple of Entry in Python, an array of [term, index, kind, data]."""

    def decode(self, value: Any, path: str) -> tuple[rm.Entry, ...]:
        if type(value) is not list:
            raise _wrong_type(path, self, value)
        out = []
        for i, e in enumerate(value):
            if type(e) is list and len(e) == 4:  # the common, valid entry, checked inline
                term, index, kind, data = e
                if (type(term) is int and 0 <= term <= INT64_MAX and type(index) is int
                        and 1 <= index <= INT64_MAX and type(data) is bytes and type(kind) is int):
                    member = _ENTRY_KINDS_BY_VALUE.get(kind)
                    if member is not None:
                        out.append(rm.Entry(term, index, data, member))
                        continue
            out.append(self._entry(e, f"{path}[{i}]"))  # anything else: the checks that explain
        return tuple(out)

    @staticmethod
    def _entry(value: Any, path: str) -> rm.Entry:
        if type(value) is not list or len(value) != 4:
            raise _bad(path, f"an entry is [term, index, kind, data], got {_show(value)}")
        term = UINT.decode(value[0], f"{path}.term")
        index = _INDEX.decode(value[1], f"{path}.index")
        kind = _ENTRY_KIND.decode(value[2], f"{path}.kind")
        data = Bytes().decode(value[3], f"{path}.data")
        return rm.Entry(term, index, data, kind)

    def encode(self, value: Any, path: str) -> list[list[Any]]:
        if not isinstance(value, (tuple, list)):
            raise _wrong_type(path, self, value)
        out = []
        for i, e in enumerate(value):
            if (type(e) is rm.Entry and type(e.term) is int and 0 <= e.term <= INT64_MAX
                    and type(e.index) is int and 1 <= e.index <= INT64_MAX
                    and type(e.kind) is rm.EntryKind and type(e.data) is bytes):
                out.append([e.term, e.index, e.kind.value, e.data])
                continue
            sub = f"{path}[{i}]"
            if type(e) is not rm.Entry:
                raise _bad(sub, f"expected Entry, got {_show(e)}")
            out.append([
                UINT.encode(e.term, f"{sub}.term"),
                _INDEX.encode(e.index, f"{sub}.index"),
                _ENTRY_KIND.encode(e.kind, f"{sub}.kind"),
                Bytes().encode(e.data, f"{sub}.data"),
            ])
        return out

    def describe(self) -> str:
        return "list of [term, index, kind, data]"


class _NodeSetKind(Kind):
    """A frozenset of node ids; on the wire a sorted array without duplicates."""

    def decode(self, value: Any, path: str) -> frozenset[str]:
        nodes = ListOf(NODE, 4096).decode(value, path)
        if len(set(nodes)) != len(nodes):
            raise _bad(path, "a node is listed twice")
        return frozenset(nodes)

    def encode(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, (frozenset, set)):
            raise _wrong_type(path, self, value)
        return sorted(ListOf(NODE, 4096).encode(tuple(value), path))

    def describe(self) -> str:
        return "list of distinct node ids"


class _PrioritiesKind(Kind):
    """(node, priority) pairs; on the wire an array of [node, priority], order kept."""

    def decode(self, value: Any, path: str) -> tuple[tuple[str, int], ...]:
        if type(value) is not list:
            raise _wrong_type(path, self, value)
        return self._pairs(value, path, NODE.decode, UINT.decode)

    def encode(self, value: Any, path: str) -> list[list[Any]]:
        if not isinstance(value, (tuple, list)):
            raise _wrong_type(path, self, value)
        return [list(p) for p in self._pairs(value, path, NODE.encode, UINT.encode)]

    def _pairs(self, value: Any, path: str, node: Callable, prio: Callable) -> tuple[tuple[str, int], ...]:
        out = []
        for i, p in enumerate(value):
            sub = f"{path}[{i}]"
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise _bad(sub, f"expected [node, priority], got {_show(p)}")
            out.append((node(p[0], f"{sub}.node"), prio(p[1], f"{sub}.priority")))
        if len({n for n, _ in out}) != len(out):
            raise _bad(path, "a node has two priorities")
        return tuple(out)

    def describe(self) -> str:
        return "list of [node, priority]"


@dataclasses.dataclass(frozen=True)
class _Record(Kind):
    """A frozen dataclass carried as a map with short keys.

    A field is optional on the wire exactly when the dataclass gives it a default; the
    encoder leaves out fields equal to their default. ``check`` states cross-field rules
    on the attribute values and runs in both directions.
    """

    cls: type
    fields: Mapping[str, Field]
    check: Callable[[Mapping[str, Any], str], None] | None = None

    def decode(self, value: Any, path: str, skip: tuple[str, ...] = ()) -> Any:
        by_key = _check_map(value, self.fields, path, encoding=False, skip=skip)
        attrs = {self.fields[k].attr: v for k, v in by_key.items()}
        if self.check is not None:
            self.check(attrs, path)
        return self.cls(**attrs)

    def encode(self, value: Any, path: str) -> dict[str, Any]:
        if type(value) is not self.cls:
            raise _wrong_type(path, self, value)
        attrs = {f.attr: getattr(value, f.attr) for f in self.fields.values()}
        out = {}
        for key, f in self.fields.items():
            v = attrs[f.attr]
            wire = v if f.kind.same(v) else f.kind.encode(v, f"{path}.{f.attr}")
            if f.required or v != f.default:
                out[key] = wire
        if self.check is not None:
            self.check(attrs, path)  # after the kinds: the rules may rely on the types
        return out

    def describe(self) -> str:
        return f"{self.cls.__name__} map"


def _record(cls: type, rows: Iterable[tuple[str, str, Kind]], check: Callable | None = None) -> _Record:
    """Build a record from (wire key, attribute, kind) rows; defaults come from ``cls``."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    fields = {}
    for key, attr, kind in rows:
        default = defaults[attr]
        required = default is dataclasses.MISSING
        fields[key] = Field(key, kind, required, _ABSENT if required else default, attr)
    return _Record(cls, fields, check)


def _check_conf(attrs: Mapping[str, Any], path: str) -> None:
    both = attrs["voters"] & attrs.get("learners", frozenset())
    if both:
        raise _bad(path, f"node {sorted(both)[0]!r} is both a voter and a learner")


def _check_append(attrs: Mapping[str, Any], path: str) -> None:
    """Entries follow prev_log_index one by one; their terms never decrease, start at or
    above prev_log_term, and never exceed the leader's term."""
    index, term = attrs["prev_log_index"], attrs["prev_log_term"]
    for i, e in enumerate(attrs["entries"]):
        sub = f"{path}.entries[{i}]"
        if e.index != index + 1:
            rule = "entries must be consecutive from prev_log_index + 1"
            raise _bad(sub, f"index {e.index} does not follow {index} ({rule})")
        if e.term < term:
            raise _bad(sub, f"term {e.term} is below the previous entry's term {term}")
        if e.term > attrs["term"]:
            raise _bad(sub, f"term {e.term} is above the message's term {attrs['term']}")
        index, term = e.index, e.term


_ENTRY_KIND: Final = _EnumKind(rm.EntryKind)
_ENTRY_KINDS_BY_VALUE: Final = {m.value: m for m in rm.EntryKind}
_INDEX: Final = Int(1, INT64_MAX)  # log indexes of real entries start at 1
_CTX: Final = Bytes(4096)
_CONF: Final = _record(
    rm.ConfState,
    [("v", "voters", _NodeSetKind()), ("l", "learners", _NodeSetKind()), ("p", "priorities", _PrioritiesKind())],
    _check_conf,
)
_SNAPSHOT: Final = _record(
    rm.Snapshot,
    [
        ("m", "meta", _record(rm.SnapshotMeta, [("i", "index", UINT), ("t", "term", UINT), ("c", "conf", _CONF)])),
        ("d", "data", Bytes()),
    ],
)
_HEAD: Final = [("f", "frm", NODE), ("to", "to", NODE), ("t", "term", UINT)]

RAFT_KINDS: Final[Mapping[str, _Record]] = {
    "rv": _record(rm.RequestVote, _HEAD + [
        ("li", "last_log_index", UINT), ("lt", "last_log_term", UINT),
        ("pv", "pre_vote", Bool()), ("tr", "transfer", Bool()),
    ]),
    "rvr": _record(rm.RequestVoteResponse, _HEAD + [("g", "granted", Bool()), ("pv", "pre_vote", Bool())]),
    "ae": _record(rm.AppendEntries, _HEAD + [
        ("pi", "prev_log_index", UINT), ("pt", "prev_log_term", UINT),
        ("e", "entries", _EntriesKind()), ("c", "commit", UINT),
    ], _check_append),
    "aer": _record(rm.AppendEntriesResponse, _HEAD + [
        ("s", "success", Bool()), ("i", "index", UINT),
        ("hi", "hint_index", UINT), ("ht", "hint_term", UINT),
    ]),
    "is": _record(rm.InstallSnapshot, _HEAD + [("s", "snapshot", _SNAPSHOT)]),
    "hb": _record(rm.Heartbeat, _HEAD + [("c", "commit", UINT), ("x", "ctx", _CTX)]),
    "hbr": _record(rm.HeartbeatResponse, _HEAD + [("x", "ctx", _CTX), ("r", "report", Bytes(65536))]),
    "tn": _record(rm.TimeoutNow, _HEAD),
    "ri": _record(rm.ReadIndexRequest, _HEAD + [("x", "ctx", _CTX)]),
    "rir": _record(rm.ReadIndexResponse, _HEAD + [("x", "ctx", _CTX), ("i", "index", UINT)]),
}
"""Raft message kinds: the ``k`` tag on the wire -> the record that maps it."""

_RAFT_TAGS: Final = {rec.cls: tag for tag, rec in RAFT_KINDS.items()}


def _decode_raft(value: Any, path: str) -> rm.Message:
    if not isinstance(value, Mapping):
        raise _bad(path, f"expected a Raft message map, got {_show(value)}")
    tag = value.get("k")
    record = RAFT_KINDS.get(tag) if type(tag) is str else None
    if record is None:
        raise _bad(f"{path}.k", f"unknown Raft message kind {_show(tag)}; known: {', '.join(RAFT_KINDS)}")
    return record.decode(value, f"{path}({record.cls.__name__})", skip=("k",))


def _encode_raft(msg: Any, path: str) -> dict[str, Any]:
    tag = _RAFT_TAGS.get(type(msg))
    if tag is None:
        raise _bad(path, f"expected a Raft message dataclass, got {_show(msg)}")
    return {"k": tag, **RAFT_KINDS[tag].encode(msg, f"{path}({type(msg).__name__})")}


def raft_to_wire(msg: rm.Message) -> dict[str, Any]:
    """The compact map for one Raft message (validated; raises ProtocolError if invalid)."""
    return _encode_raft(msg, "raft.msg")


def raft_from_wire(d: Mapping[str, Any]) -> rm.Message:
    """The Raft message a compact map stands for; raises ProtocolError on any bad field."""
    return _decode_raft(d, "raft.msg")


# -- framing ------------------------------------------------------------------------------


class _ExtNotAllowed(Exception):
    pass


def _reject_ext(code: int, data: bytes) -> Any:
    raise _ExtNotAllowed(code)


def _unpack(body: bytes) -> Any:
    """Exactly one msgpack value, plain types only, limits sized to the body."""
    n = len(body)
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=0,
        )
    except _ExtNotAllowed as e:
        raise ProtocolError("bad_msgpack", f"msgpack ext type {e.args[0]} is not allowed in this protocol") from None
    except Exception as e:  # msgpack reports bad input with many exception types
        detail = str(e)[:200] or "malformed data"
        problem = f"frame body is not one valid msgpack value ({type(e).__name__}: {detail})"
        raise ProtocolError("bad_msgpack", problem) from None


def _decode_body(body: bytes) -> dict[str, Any]:
    obj = _unpack(body)
    if type(obj) is not dict:
        raise ProtocolError("not_a_map", f"frame body is a msgpack {_show(obj)}, expected a map with a 'type'")
    return _validate(obj, encoding=False)


def _check_max_frame(max_frame: int) -> int:
    if not isinstance(max_frame, int) or not 1 <= max_frame <= MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame must be an int in 1..{MAX_FRAME_LIMIT}, got {max_frame!r}")
    return max_frame


_OK_REPLY_KEYS: Final = frozenset({"type", "id", "ok", "result"})


def _plain_ok_reply(msg: Any) -> bool:
    """A successful reply whose result is a flat map of scalars (the answer to every
    write): valid as it is, which ``_validate`` would confirm by walking the schema at
    a few µs per write on the leader (issue 9). Anything else is validated."""
    if type(msg) is not dict or msg.get("type") != "reply" or msg.keys() != _OK_REPLY_KEYS \
            or msg["ok"] is not True:
        return False
    rid, result = msg["id"], msg["result"]
    if type(rid) is not int or not 0 <= rid <= INT64_MAX or type(result) is not dict:
        return False
    for k, v in result.items():
        t = type(v)
        if type(k) is not str or not (t in _SCALARS or (t is int and INT64_MIN <= v <= UINT64_MAX)):
            return False
    return True


def encode(msg: Mapping[str, Any], *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Validate ``msg`` against ``MESSAGE_SCHEMAS`` and return its frame (length + body).

    Raises ``ProtocolError`` (same codes as decoding) if the message is invalid or its body
    is longer than ``max_frame``. A ``raft`` message's ``msg`` is a Raft dataclass.
    """
    wire = msg if _plain_ok_reply(msg) else _validate(msg, encoding=True)
    try:
        body = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. a lone surrogate in a str
        raise ProtocolError("bad_field", f"{wire['type']}: cannot be packed ({type(e).__name__}: {e})") from None
    if len(body) > _check_max_frame(max_frame):
        raise ProtocolError("frame_too_large", f"{wire['type']} message is {len(body)} bytes, limit {max_frame}")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns received bytes into validated messages; does no I/O.

    ``receive_data(data)`` only buffers (``b""`` means the peer closed); ``next_message()``
    returns the next message (a dict, defaults filled in, a ``raft`` frame's ``msg`` as a
    Raft dataclass), ``NEED_DATA`` when a frame is incomplete, or ``CLOSED`` once EOF was
    fed and every complete frame returned. Call ``next_message()`` until it returns a
    signal before reading more from the socket: then the size limit stops an oversized
    frame after its 4 length bytes and the buffer never grows much past ``max_frame``.

    Any protocol violation raises ``ProtocolError``, and so does every later call.
    ``max_frame`` may be changed between calls (e.g. raised once a peer is authenticated).
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max_frame = _check_max_frame(max_frame)
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = _check_max_frame(value)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    @property
    def eof(self) -> bool:
        return self._eof

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; ``b""`` records EOF. Feeding bytes after EOF is a caller bug."""
        if self._error is not None:
            raise self._error
        if self._eof:
            if data:
                raise RuntimeError("receive_data() called with bytes after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_message(self) -> dict[str, Any] | Signal:
        """The next validated message, ``NEED_DATA`` or ``CLOSED``; see the class doc."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as e:
            self._error = e
            self._buf = bytearray()
            self._pos = 0
            raise

    def _next(self) -> dict[str, Any] | Signal:
        avail = len(self._buf) - self._pos
        if avail < _HEADER.size:
            if not self._eof:
                return NEED_DATA
            if avail:
                raise ProtocolError("truncated", f"connection closed inside a frame header ({avail} of 4 bytes)")
            return CLOSED
        (size,) = _HEADER.unpack_from(self._buf, self._pos)
        self._check_size(size)
        if avail < _HEADER.size + size:
            if self._eof:
                got = avail - _HEADER.size
                raise ProtocolError("truncated", f"connection closed inside a frame ({got} of {size} body bytes)")
            return NEED_DATA
        start = self._pos + _HEADER.size
        body = bytes(self._buf[start : start + size])
        self._pos = start + size
        self._compact()
        return _decode_body(body)

    def _check_size(self, size: int) -> None:
        if size == 0:
            raise ProtocolError("empty_frame", "frame length is 0; every frame holds a msgpack map")
        if size > self._max_frame:
            raise ProtocolError(
                "frame_too_large",
                f"frame length {size} bytes exceeds this connection's limit of {self._max_frame} bytes",
            )

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0


def bin_header(n: int) -> bytes:
    """The msgpack bin header for ``n`` bytes (msgpack's Packer has no call for it)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")
