"""The replicated state machine: a key-value store, a task table, client sessions.

Everything that changes replicated state lives in this file. It is pure: no I/O, no
clocks, no randomness, no iteration over unordered containers where order could leak
into the result. Every replica that applies the same committed entries, in the same
order, from the same snapshot, reaches the same state, returns the same results and
computes the same digest.

Commands
--------
A command is the ``data`` of a NORMAL Raft log entry: one msgpack map, encoded
canonically by :func:`encode_command` (map keys sorted, ``bytes`` as msgpack bin, ``str``
as msgpack str)::

    {"op": "put",    "key": str, "value": bytes,                          [session]}
    {"op": "delete", "key": str,                                          [session]}
    {"op": "cas",    "key": str, "expected": bytes | nil, "value": bytes, [session]}
    {"op": "noop",                                                        [session]}

    [session] = "client": str, "seq": int >= 1   (both, or neither)

``expected = nil`` means "the key must be absent". Unknown fields are rejected. An entry
with empty data is the leader's no-op of a new term: it only advances ``applied_index``.

The operations are a table (:data:`OPS`): an op's name, the fields it takes with their
validators, and its handler. The task-table commands (submit_task, assign_task,
complete_task, fail_task, cancel) are further rows of that table; their records live in
the ``tasks`` section, which is already part of the snapshot and the digest.

Results
-------
``apply()`` never raises for anything found in the log: a malformed command (not msgpack,
unknown op, missing or mistyped field) yields ``ApplyResult(ok=False,
error="bad_command")``, advances ``applied_index`` and changes nothing else, on every
replica alike. It raises ``ValueError`` only for a programming error of the caller: an
index that does not increase.

Client sessions (Raft dissertation, section 6.3)
-----------------------------------------------
For each client the machine keeps the highest ``seq`` applied, the index it was applied
at and its result. A command whose seq equals the last applied one is not applied again;
its cached result is returned. An older seq gets ``error="stale_seq"``. A session is
created by a client's ``seq == 1``; a command with ``seq > 1`` from a client that has no
session (never seen, or evicted) gets ``error="session_expired"`` and is not applied,
because the machine can no longer tell whether it is a retry of something already
applied. At most ``max_sessions`` sessions are kept; making room evicts the session
whose last command was applied at the lowest index. Commands without a session (both
``client`` and ``seq`` absent) are applied every time they appear.

``max_sessions`` changes which sessions survive, so it must be the same on every replica;
it travels in the snapshot and a restore adopts the snapshot's value.

Digest
------
The digest is an order-independent sum, modulo 2**256, of ``sha256`` over every item of
the state (``["kv", key, value]``, ``["session", client, seq, index, result]``,
``["task", id, record]``, ``["conf", ...]``). Insert adds an item's hash, delete subtracts
it, so each apply costs O(size of the command), not O(size of the state).
``digest()`` hashes that sum together with ``applied_index``; ``digest_full()``
recomputes the same value from scratch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack

from nodeagent.raft.messages import ConfChange, ConfChangeOp, ConfState, EntryKind

__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "ERR_BAD_COMMAND",
    "ERR_BAD_CONF_CHANGE",
    "ERR_SESSION_EXPIRED",
    "ERR_STALE_SEQ",
    "MAX_CLIENT_BYTES",
    "MAX_KEY_BYTES",
    "OPS",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
    "ApplyResult",
    "Command",
    "CommandError",
    "Divergence",
    "OpSpec",
    "Session",
    "StateError",
    "StateMachine",
    "StateStatistics",
    "decode_command",
    "diff_replicas",
    "encode_command",
]

DEFAULT_MAX_SESSIONS = 10_000
MAX_KEY_BYTES = 1024  # UTF-8 length of a key
MAX_CLIENT_BYTES = 256  # UTF-8 length of a client id

SNAPSHOT_FORMAT = "raftdeck-state"
SNAPSHOT_VERSION = 1

# Error codes of ApplyResult.error. A CAS whose expectation fails is not an error: it
# is ok=False, error=None, value=<the current value>.
ERR_BAD_COMMAND = "bad_command"  # malformed entry; nothing applied
ERR_BAD_CONF_CHANGE = "bad_conf_change"  # malformed conf-change entry; nothing applied
ERR_STALE_SEQ = "stale_seq"  # seq older than the client's last applied seq
ERR_SESSION_EXPIRED = "session_expired"  # seq > 1 from a client with no session

_MOD = 1 << 256
_DIGEST_TAG = "raftdeck-state-digest/1"


class StateError(Exception):
    """A snapshot that cannot be restored: truncated, corrupt, or of another format."""


class CommandError(ValueError):
    """A command that is not well formed (raised by the codec, never by ``apply``)."""


# -- canonical msgpack ----------------------------------------------------------------------


def _canon(obj: Any) -> Any:
    """The canonical form of plain data: maps with sorted keys, sequences as lists."""
    if isinstance(obj, dict):
        return {k: _canon(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canon(x) for x in obj]
    return obj


def _pack(obj: Any) -> bytes:
    return msgpack.packb(_canon(obj), use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


def _is_plain(obj: Any, depth: int = 0) -> bool:
    """Data that round-trips through canonical msgpack unchanged (no floats, no ext)."""
    if depth > 32:
        return False
    if obj is None or type(obj) in (bool, int, str, bytes):
        return True
    if type(obj) is list:
        return all(_is_plain(x, depth + 1) for x in obj)
    if type(obj) is dict:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in obj.items())
    return False


def _item_hash(item: Any) -> int:
    return int.from_bytes(hashlib.sha256(_pack(item)).digest(), "big")


class _Accumulator:
    """A multiset hash: the sum of the items' hashes modulo 2**256."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def add(self, item: Any) -> None:
        self.value = (self.value + _item_hash(item)) % _MOD

    def remove(self, item: Any) -> None:
        self.value = (self.value - _item_hash(item)) % _MOD


def _final_digest(applied_index: int, acc: int) -> str:
    return hashlib.sha256(_pack([_DIGEST_TAG, applied_index, acc.to_bytes(32, "big")])).hexdigest()


# -- commands -------------------------------------------------------------------------------

Check = Callable[[Any], Any]  # returns the normalized value or raises CommandError


def _utf8_len(s: str) -> int:
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise CommandError("is not valid UTF-8") from None


def _check_key(v: Any) -> str:
    if type(v) is not str:
        raise CommandError("must be a string")
    if not v:
        raise CommandError("must not be empty")
    if _utf8_len(v) > MAX_KEY_BYTES:
        raise CommandError(f"is longer than {MAX_KEY_BYTES} bytes")
    return v


def _check_bytes(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise CommandError("must be bytes")


def _check_opt_bytes(v: Any) -> bytes | None:
    return None if v is None else _check_bytes(v)


def _check_client(v: Any) -> str:
    if type(v) is not str:
        raise CommandError("must be a string")
    if not v:
        raise CommandError("must not be empty")
    if _utf8_len(v) > MAX_CLIENT_BYTES:
        raise CommandError(f"is longer than {MAX_CLIENT_BYTES} bytes")
    return v


def _check_seq(v: Any) -> int:
    if type(v) is not int:
        raise CommandError("must be an integer")
    if v < 1:
        raise CommandError("must be >= 1")
    return v


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded, validated command. ``args`` holds the op's own fields."""

    op: str
    args: Mapping[str, Any]
    client: str | None = None
    seq: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"op": self.op, **self.args}
        if self.client is not None:
            wire["client"] = self.client
            wire["seq"] = self.seq
        return wire


Handler = Callable[["StateMachine", Command, int], "ApplyResult"]


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One row of the dispatch table: the fields an op takes, and what it does.

    ``required`` fields must be present (their validator may still accept ``None``);
    ``optional`` fields may be absent and are then missing from ``Command.args``.
    A handler validates everything it needs before it mutates anything, and must not
    raise for any command its validators accepted.
    """

    name: str
    handler: Handler
    required: Mapping[str, Check]
    optional: Mapping[str, Check]


OPS: dict[str, OpSpec] = {}

_SESSION_FIELDS = ("client", "seq")


def _op(name: str, optional: Mapping[str, Check] | None = None, **required: Check):
    def register(handler: Handler) -> Handler:
        assert name not in OPS, name
        assert not set(required) & set(optional or ()), name
        assert not {"op", *_SESSION_FIELDS} & {*required, *(optional or ())}, name
        OPS[name] = OpSpec(
            name, handler, MappingProxyType(dict(required)), MappingProxyType(dict(optional or {}))
        )
        return handler

    return register


def _validate(obj: Any) -> Command:
    if type(obj) is not dict:
        raise CommandError("command is not a map")
    op = obj.get("op")
    if type(op) is not str:
        raise CommandError("field 'op' is missing or not a string")
    spec = OPS.get(op)
    if spec is None:
        raise CommandError(f"unknown op {op[:64]!r}")
    has_client, has_seq = "client" in obj, "seq" in obj
    if has_client != has_seq:
        raise CommandError(f"{op}: 'client' and 'seq' go together")
    client = seq = None
    if has_client:
        try:
            client = _check_client(obj["client"])
            seq = _check_seq(obj["seq"])
        except CommandError as e:
            which = "client" if client is None else "seq"
            raise CommandError(f"{op}.{which}: {e}") from None
    extra = set(obj) - {"op", *_SESSION_FIELDS, *spec.required, *spec.optional}
    if extra:
        raise CommandError(f"{op}: unknown field(s) {', '.join(sorted(map(repr, extra)))}"[:200])
    args: dict[str, Any] = {}
    for name, check in (*spec.required.items(), *spec.optional.items()):
        if name not in obj:
            if name in spec.required:
                raise CommandError(f"{op}: missing field {name!r}")
            continue
        try:
            args[name] = check(obj[name])
        except CommandError as e:
            raise CommandError(f"{op}.{name}: {e}") from None
    return Command(op, MappingProxyType(args), client, seq)


def encode_command(op: str, **fields: Any) -> bytes:
    """The canonical bytes of a command; raises ``CommandError`` if it is not valid.

    ``client`` and ``seq`` are ordinary keyword fields (``None`` means absent)::

        encode_command("put", key="a", value=b"1", client="console-7f3a", seq=12)
    """
    obj = {"op": op, **{k: v for k, v in fields.items() if not (k in _SESSION_FIELDS and v is None)}}
    return _pack(_validate(obj).to_wire())


def decode_command(data: bytes) -> Command:
    """Parse and validate a command; raises ``CommandError`` (deterministically)."""
    try:
        obj = _unpack(data)
    except Exception:  # msgpack raises many types; any of them means "not one msgpack value"
        raise CommandError("not a single msgpack value") from None
    return _validate(obj)


# -- results and sessions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of applying one entry; identical on every replica.

    ``ok``     the command did what it asked (a failed CAS is ok=False, error=None).
    ``value``  a read-back value (a failed CAS: the current value, None if absent).
    ``prev``   the value before the command (put, delete, successful CAS).
    ``error``  an ``ERR_*`` code when the command was refused; ``detail`` says why.
    ``effects`` local consequences for the replica that applied it (e.g. "run this task
               here"); never cached in sessions, so a retried command has none.
    """

    ok: bool
    value: Any = None
    prev: Any = None
    error: str | None = None
    detail: str = ""
    effects: tuple = ()

    def to_wire(self) -> dict[str, Any]:
        """Plain data, as cached in sessions (effects are dropped)."""
        return _canon(
            {"ok": self.ok, "value": self.value, "prev": self.prev, "error": self.error, "detail": self.detail}
        )

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "ApplyResult":
        return cls(wire["ok"], wire["value"], wire["prev"], wire["error"], wire["detail"])


_OK = ApplyResult(True)


@dataclass(frozen=True, slots=True)
class Session:
    """A client's session: its last applied seq, the index it was applied at, the result."""

    client: str
    seq: int
    index: int
    result: ApplyResult


@dataclass(slots=True)
class _Sess:
    seq: int
    index: int
    wire: dict[str, Any]

    def item(self, client: str) -> list:
        return ["session", client, self.seq, self.index, self.wire]


@dataclass(frozen=True, slots=True)
class StateStatistics:
    applied_index: int
    keys: int
    sessions: int
    max_sessions: int
    tasks: int
    conf_index: int


# -- the state machine ----------------------------------------------------------------------

_EMPTY_CONF = ConfState(frozenset())


class StateMachine:
    """The replicated state. Feed it committed entries in log order with ``apply()``."""

    def __init__(self, *, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if type(max_sessions) is not int or max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, not {max_sessions!r}")
        self._max_sessions = max_sessions
        self._applied = 0
        self._kv: dict[str, bytes] = {}
        # Ordered by the index of each client's last applied command (oldest first):
        # the first entry is the next to evict.
        self._sessions: OrderedDict[str, _Sess] = OrderedDict()
        self._tasks: dict[str, Any] = {}  # task id -> plain-data record (task ops: later)
        self._conf = _EMPTY_CONF
        self._conf_index = 0
        self._addresses: dict[str, str] = {}  # members added with an address (ConfChange.context)
        self._acc = _Accumulator()
        self._acc.add(self._conf_item())

    # -- applying -----------------------------------------------------------------------

    def _advance(self, index: int, data: Any) -> None:
        if type(index) is not int:
            raise TypeError(f"index must be an int, not {type(index).__name__}")
        if index <= self._applied:
            raise ValueError(f"index {index} is not after applied index {self._applied}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"entry data must be bytes, not {type(data).__name__}")
        self._applied = index

    def apply(self, index: int, data: bytes) -> ApplyResult:
        """Apply the NORMAL entry at ``index``. Raises only for a non-increasing index."""
        self._advance(index, data)
        if not data:
            return _OK
        try:
            cmd = decode_command(data)
        except CommandError as e:
            return ApplyResult(False, error=ERR_BAD_COMMAND, detail=str(e))
        return self._execute(index, cmd)

    def apply_conf_change(self, index: int, data: bytes) -> ApplyResult:
        """Record the CONF_CHANGE entry at ``index`` (``ConfChange.encode()`` bytes).

        The machine keeps the membership that results and the index of the last change,
        so a snapshot carries the configuration it was taken under.
        """
        self._advance(index, data)
        try:
            cc = ConfChange.decode(bytes(data))
            new_conf = self._conf.apply(cc)
            _check_conf(new_conf)
            if cc.op is not ConfChangeOp.BOOTSTRAP and not cc.node:
                raise ValueError("no node")
        except Exception as e:  # foreign JSON: any failure means "malformed"
            return ApplyResult(False, error=ERR_BAD_CONF_CHANGE, detail=f"malformed conf change ({type(e).__name__})")
        self._acc.remove(self._conf_item())
        self._conf, self._conf_index = new_conf, index
        if cc.context and cc.op in (ConfChangeOp.ADD_LEARNER, ConfChangeOp.ADD_VOTER):
            self._addresses[cc.node] = cc.context
        for n in [n for n in self._addresses if n not in new_conf.members]:
            del self._addresses[n]
        self._acc.add(self._conf_item())
        return _OK

    def apply_entry(self, entry: Any) -> ApplyResult:
        """Apply a ``nodeagent.raft.messages.Entry`` of either kind."""
        if entry.kind == EntryKind.CONF_CHANGE:
            return self.apply_conf_change(entry.index, entry.data)
        return self.apply(entry.index, entry.data)

    def _execute(self, index: int, cmd: Command) -> ApplyResult:
        spec = OPS[cmd.op]
        if cmd.client is None:
            return spec.handler(self, cmd, index)
        sess = self._sessions.get(cmd.client)
        if sess is None:
            if cmd.seq != 1:
                return ApplyResult(
                    False,
                    error=ERR_SESSION_EXPIRED,
                    detail=f"no session for this client (seq {cmd.seq}); start a new client id at seq 1",
                )
        elif cmd.seq == sess.seq:
            return ApplyResult.from_wire(sess.wire)
        elif cmd.seq < sess.seq:
            return ApplyResult(
                False, error=ERR_STALE_SEQ, detail=f"seq {cmd.seq} is older than the last applied seq {sess.seq}"
            )
        result = spec.handler(self, cmd, index)
        self._record_session(cmd.client, cmd.seq, index, result)
        return result

    def _record_session(self, client: str, seq: int, index: int, result: ApplyResult) -> None:
        old = self._sessions.pop(client, None)
        if old is not None:
            self._acc.remove(old.item(client))
        elif len(self._sessions) >= self._max_sessions:
            victim, vs = self._sessions.popitem(last=False)
            self._acc.remove(vs.item(victim))
        new = _Sess(seq, index, result.to_wire())
        self._sessions[client] = new
        self._acc.add(new.item(client))

    # -- mutations (the only code that touches the sections; each keeps the digest) -----

    def _kv_set(self, key: str, value: bytes) -> bytes | None:
        prev = self._kv.get(key)
        if prev is not None:
            self._acc.remove(["kv", key, prev])
        self._kv[key] = value
        self._acc.add(["kv", key, value])
        return prev

    def _kv_delete(self, key: str) -> bytes | None:
        prev = self._kv.pop(key, None)
        if prev is not None:
            self._acc.remove(["kv", key, prev])
        return prev

    def _task_set(self, task_id: str, record: Any) -> None:
        record = _canon(record)
        assert _is_plain(record), "task records are plain data"
        self._task_delete(task_id)
        self._tasks[task_id] = record
        self._acc.add(["task", task_id, record])

    def _task_delete(self, task_id: str) -> Any:
        record = self._tasks.pop(task_id, None)
        if record is not None:
            self._acc.remove(["task", task_id, record])
        return record

    def _conf_item(self) -> list:
        c = self._conf
        return ["conf", self._conf_index, sorted(c.voters), sorted(c.learners), [list(p) for p in c.priorities],
                sorted(self._addresses.items())]

    # -- reads --------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def max_sessions(self) -> int:
        return self._max_sessions

    @property
    def conf(self) -> ConfState:
        """Membership after the last applied conf change (empty before any)."""
        return self._conf

    @property
    def addresses(self) -> Mapping[str, str]:
        """"host:port" of members that joined through a membership change."""
        return self._addresses

    @property
    def conf_index(self) -> int:
        return self._conf_index

    @property
    def tasks(self) -> Mapping[str, Any]:
        return MappingProxyType(self._tasks)

    def get(self, key: str) -> bytes | None:
        """The local value (a stale read unless the caller did ReadIndex first)."""
        return self._kv.get(key)

    def keys(self) -> list[str]:
        return sorted(self._kv)

    def dump(self) -> dict[str, bytes]:
        """A copy of the whole key-value store, for the divergence view."""
        return dict(self._kv)

    def session(self, client: str) -> Session | None:
        s = self._sessions.get(client)
        return None if s is None else Session(client, s.seq, s.index, ApplyResult.from_wire(s.wire))

    def sessions(self) -> list[Session]:
        """All sessions, least recently applied first (the eviction order)."""
        return [Session(c, s.seq, s.index, ApplyResult.from_wire(s.wire)) for c, s in self._sessions.items()]

    def statistics(self) -> StateStatistics:
        return StateStatistics(
            self._applied, len(self._kv), len(self._sessions), self._max_sessions, len(self._tasks), self._conf_index
        )

    def digest(self) -> str:
        """Hex digest of the whole state and the applied index; O(1)."""
        return _final_digest(self._applied, self._acc.value)

    def _items(self) -> Iterator[Any]:
        yield self._conf_item()
        for k, v in self._kv.items():
            yield ["kv", k, v]
        for c, s in self._sessions.items():
            yield s.item(c)
        for t, r in self._tasks.items():
            yield ["task", t, r]

    def _recompute(self) -> int:
        acc = 0
        for item in self._items():
            acc += _item_hash(item)
        return acc % _MOD

    def digest_full(self) -> str:
        """The digest recomputed from scratch; always equal to ``digest()``."""
        return _final_digest(self._applied, self._recompute())

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Canonical bytes of the whole state: equal states give equal bytes."""
        c = self._conf
        body = _pack(
            {
                "applied_index": self._applied,
                "max_sessions": self._max_sessions,
                "kv": self._kv,
                "sessions": [[cl, s.seq, s.index, s.wire] for cl, s in self._sessions.items()],
                "tasks": self._tasks,
                "conf": {
                    "index": self._conf_index,
                    "voters": sorted(c.voters),
                    "learners": sorted(c.learners),
                    "priorities": [list(p) for p in c.priorities],
                    "addresses": self._addresses,
                },
            }
        )
        return _pack(
            {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "body": body,
                "sha256": hashlib.sha256(body).digest(),
            }
        )

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's. Raises ``StateError`` if the data
        is not a valid snapshot; the machine is then left unchanged."""
        new = _parse_snapshot(data)
        self._max_sessions = new._max_sessions
        self._applied = new._applied
        self._kv = new._kv
        self._sessions = new._sessions
        self._tasks = new._tasks
        self._conf = new._conf
        self._conf_index = new._conf_index
        self._addresses = new._addresses
        self._acc = new._acc

    @classmethod
    def load(cls, data: bytes) -> "StateMachine":
        """A new machine restored from a snapshot (``StateError`` if invalid)."""
        sm = cls()
        sm.restore(data)
        return sm


def _check_conf(conf: ConfState) -> None:
    if not all(type(n) is str and n for n in conf.voters | conf.learners):
        raise ValueError("node ids must be non-empty strings")
    if not all(type(n) is str and type(p) is int for n, p in conf.priorities):
        raise ValueError("bad priorities")


def _parse_snapshot(data: bytes) -> StateMachine:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise StateError(f"snapshot: {what}")

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"snapshot: expected bytes, got {type(data).__name__}")
    try:
        outer = _unpack(data)
    except Exception:
        raise StateError("snapshot: not a msgpack value (truncated or corrupt)") from None
    need(type(outer) is dict, "not a map")
    need(outer.get("format") == SNAPSHOT_FORMAT, f"format is not {SNAPSHOT_FORMAT!r}")
    need(outer.get("version") == SNAPSHOT_VERSION, f"unsupported version {outer.get('version')!r}")
    need(set(outer) == {"format", "version", "body", "sha256"}, "unexpected fields in envelope")
    body, checksum = outer["body"], outer["sha256"]
    need(type(body) is bytes and type(checksum) is bytes, "body or checksum is not bytes")
    need(hashlib.sha256(body).digest() == checksum, "checksum mismatch (corrupt)")
    try:
        st = _unpack(body)
    except Exception:
        raise StateError("snapshot: body is not a msgpack value") from None
    need(type(st) is dict, "body is not a map")
    need(set(st) == {"applied_index", "max_sessions", "kv", "sessions", "tasks", "conf"}, "wrong body fields")

    applied, max_sessions = st["applied_index"], st["max_sessions"]
    need(type(applied) is int and applied >= 0, "applied_index is not an integer >= 0")
    need(type(max_sessions) is int and max_sessions >= 1, "max_sessions is not an integer >= 1")
    sm = StateMachine(max_sessions=max_sessions)
    sm._applied = applied

    kv = st["kv"]
    need(type(kv) is dict, "kv is not a map")
    for k, v in kv.items():
        try:
            _check_key(k)
        except CommandError as e:
            raise StateError(f"snapshot: kv key {k[:64]!r} {e}") from None
        need(type(v) is bytes, f"kv value of {k[:64]!r} is not bytes")
    sm._kv = kv

    sessions = st["sessions"]
    need(type(sessions) is list, "sessions is not a list")
    need(len(sessions) <= max_sessions, "more sessions than max_sessions")
    last_index = 0
    for s in sessions:
        need(type(s) is list and len(s) == 4, "session is not [client, seq, index, result]")
        client, seq, index, wire = s
        need(type(client) is str and bool(client) and client not in sm._sessions, "bad or duplicate session client")
        need(type(seq) is int and seq >= 1, f"session {client[:64]!r}: bad seq")
        need(type(index) is int and last_index < index <= applied, f"session {client[:64]!r}: index out of order")
        need(
            type(wire) is dict
            and set(wire) == {"ok", "value", "prev", "error", "detail"}
            and type(wire["ok"]) is bool
            and (wire["error"] is None or type(wire["error"]) is str)
            and type(wire["detail"]) is str
            and _is_plain(wire),
            f"session {client[:64]!r}: bad cached result",
        )
        last_index = index
        sm._sessions[client] = _Sess(seq, index, wire)

    tasks = st["tasks"]
    need(type(tasks) is dict and _is_plain(tasks), "tasks is not a map of plain data")
    sm._tasks = tasks

    conf = st["conf"]
    need(type(conf) is dict and set(conf) == {"index", "voters", "learners", "priorities", "addresses"},
         "bad conf")
    addresses = conf["addresses"]
    need(type(addresses) is dict and all(type(k) is str and type(v) is str for k, v in addresses.items()),
         "bad conf addresses")
    sm._addresses = addresses
    ci, voters, learners, prios = conf["index"], conf["voters"], conf["learners"], conf["priorities"]
    need(type(ci) is int and 0 <= ci <= applied, "conf index out of range")
    need(type(voters) is list and type(learners) is list and type(prios) is list, "bad conf lists")
    need(all(type(p) is list and len(p) == 2 and type(p[0]) is str for p in prios), "bad conf priorities")
    need(all(a[0] < b[0] for a, b in zip(prios, prios[1:])), "conf priorities not sorted by node")
    try:
        sm._conf = ConfState(frozenset(voters), frozenset(learners), tuple(tuple(p) for p in prios))
        _check_conf(sm._conf)
    except (TypeError, ValueError):
        raise StateError("snapshot: bad conf members") from None
    sm._conf_index = ci

    sm._acc.value = sm._recompute()
    # Canonical form: a snapshot that re-encodes differently was not written by us.
    need(sm.snapshot() == bytes(data), "not in canonical form")
    return sm


# -- operations (the dispatch table) --------------------------------------------------------


@_op("noop")
def _apply_noop(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    return _OK


@_op("put", key=_check_key, value=_check_bytes)
def _apply_put(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    return ApplyResult(True, prev=sm._kv_set(cmd.args["key"], cmd.args["value"]))


@_op("delete", key=_check_key)
def _apply_delete(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    return ApplyResult(True, prev=sm._kv_delete(cmd.args["key"]))


@_op("cas", key=_check_key, expected=_check_opt_bytes, value=_check_bytes)
def _apply_cas(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    key = cmd.args["key"]
    current = sm._kv.get(key)
    if current != cmd.args["expected"]:
        return ApplyResult(False, value=current)
    sm._kv_set(key, cmd.args["value"])
    return ApplyResult(True, prev=current)


# -- replica divergence ---------------------------------------------------------------------

_MISSING = object()


@dataclass(frozen=True, slots=True)
class Divergence:
    """How replicas' key-value stores compare.

    ``agreed``  the keys present on every replica with one equal value (the intersection).
    ``differs`` per replica: the keys it holds that are not agreed.
    ``missing`` per replica: the keys some other replica holds and it does not.
    """

    agreed: Mapping[str, bytes]
    differs: Mapping[str, frozenset[str]]
    missing: Mapping[str, frozenset[str]]

    @property
    def divergent_keys(self) -> frozenset[str]:
        out: set[str] = set()
        for keys in (*self.differs.values(), *self.missing.values()):
            out |= keys
        return frozenset(out)

    @property
    def converged(self) -> bool:
        return not any(self.differs.values()) and not any(self.missing.values())

    def divergent(self, replica: str) -> frozenset[str]:
        """The keys where ``replica`` is not in agreement with all the others."""
        return self.differs[replica] | self.missing[replica]


def diff_replicas(dumps: Mapping[str, Mapping[str, bytes]]) -> Divergence:
    """Compare replicas' ``dump()``s (replica name -> its key-value store)."""
    names = sorted(dumps)
    if not names:
        return Divergence({}, {}, {})
    first, others = dumps[names[0]], [dumps[n] for n in names[1:]]
    agreed = {
        k: v for k, v in sorted(first.items()) if all(d.get(k, _MISSING) == v for d in others)
    }
    every: set[str] = set()
    for n in names:
        every.update(dumps[n])
    divergent = every - agreed.keys()
    differs = {n: frozenset(divergent.intersection(dumps[n])) for n in names}
    missing = {n: frozenset(divergent.difference(dumps[n])) for n in names}
    return Divergence(MappingProxyType(agreed), MappingProxyType(differs), MappingProxyType(missing))
