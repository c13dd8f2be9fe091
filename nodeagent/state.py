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

    {"op": "submit_task",   "task": <spec>, "ts": int,                    [session]}
    {"op": "submit_tasks",  "tasks": [<spec>, ...] (<= 1000), "ts": int,  [session]}
    {"op": "assign_task",   "id": str, "node": str, "attempt": int, "ts": int,    [session]}
    {"op": "start_task",    "id": str, "node": str, "attempt": int, "ts": int,    [session]}
    {"op": "complete_task", "id": str, "node": str, "attempt": int,
                            "outcome": "succeeded" | "failed" | "timed_out",
                            "exit_code": int | nil, "stdout": bytes, "stderr": bytes,
                            ["error": str], "ts": int,                    [session]}
    {"op": "expire_task",   "id": str, "attempt": int, "reason": str, "ts": int,  [session]}
    {"op": "cancel_task",   "id": str, "ts": int,                         [session]}

    [session] = "client": str, "seq": int >= 1   (both, or neither)
    <spec>    = {"id": str, "kind": "sleep" | "cpu" | "echo" | "shell", "args": map,
                 "timeout_ms": int, "max_attempts": int, ["policy": str], ["key": str]}

``expected = nil`` means "the key must be absent". Unknown fields are rejected. An entry
with empty data is the leader's no-op of a new term: it only advances ``applied_index``.

The operations are a table (:data:`OPS`): an op's name, the fields it takes with their
validators, and its handler.

Tasks
-----
The task commands keep a table of task records (plain data, see :func:`check_task_spec`
and the ``_new_record`` layout) in the ``tasks`` section of the snapshot and the digest.
Time is never read from a clock: ``ts`` (milliseconds since the epoch) is set by the
proposer and copied into the record. A task moves::

    submitted -> assigned -> running -> succeeded | failed | timed_out | cancelled
        ^           |           |
        +-----------+-----------+   expire_task: the attempt is lost (attempts left)

Every attempt-scoped command (start, complete, expire) names the attempt it is about;
one that is not about the current, live attempt gets ``error="stale_attempt"`` and
changes nothing, so a late result of an old attempt can never overwrite the outcome of
a newer one, and a final state never changes. ``assign_task`` is a compare-and-set on
the attempt number (``attempt == task.attempt + 1``), so two proposers racing to place
the same task cannot both win. ``ApplyResult.effects`` tells the replicas what to do
locally: ``("run", node, id, attempt)`` after an assignment and ``("kill", node, id,
attempt)`` after a cancel of a live attempt; only the agent named ``node`` acts on them.
Derived indexes (per state, per node, submission order) serve the reads; they are
rebuilt on restore and are part of neither the snapshot nor the digest.

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

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgpack

from nodeagent.protocol import bin_header
from nodeagent.raft.messages import ConfChange, ConfChangeOp, ConfState, EntryKind

__all__ = [
    "ACTIVE_STATES",
    "ATTEMPT_OUTCOMES",
    "DEFAULT_MAX_SESSIONS",
    "ERR_ALREADY_FINAL",
    "ERR_BAD_COMMAND",
    "ERR_BAD_CONF_CHANGE",
    "ERR_BAD_TASK",
    "ERR_NO_ATTEMPTS_LEFT",
    "ERR_NO_SUCH_TASK",
    "ERR_SESSION_EXPIRED",
    "ERR_STALE_ATTEMPT",
    "ERR_STALE_SEQ",
    "ERR_TASK_BUSY",
    "ERR_TASK_EXISTS",
    "FINAL_STATES",
    "MAX_CLIENT_BYTES",
    "MAX_KEY_BYTES",
    "MAX_TASK_BATCH",
    "MAX_TASK_OUTPUT_BYTES",
    "OPS",
    "TASK_KINDS",
    "TASK_OUTCOMES",
    "TASK_STATES",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
    "ApplyResult",
    "Command",
    "CommandError",
    "Divergence",
    "OpSpec",
    "Session",
    "SnapshotChunks",
    "StateError",
    "StateMachine",
    "StateStatistics",
    "StateView",
    "check_task_spec",
    "decode_command",
    "diff_replicas",
    "encode_command",
    "encode_command_for",
    "serialize_view",
    "serialize_view_chunks",
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
ERR_BAD_TASK = "bad_task"  # a task spec that is not valid (detail names the field)
ERR_TASK_EXISTS = "task_exists"  # a task with this id exists with a different spec
ERR_NO_SUCH_TASK = "no_such_task"  # no task with this id
ERR_STALE_ATTEMPT = "stale_attempt"  # not about the current live attempt; nothing changed
ERR_NO_ATTEMPTS_LEFT = "no_attempts_left"  # the attempt number exceeds max_attempts
ERR_ALREADY_FINAL = "already_final"  # the task has finished; value is its record
ERR_TASK_BUSY = "task_busy"  # assign while the current attempt is still live

# -- task table limits and vocabulary
TASK_KINDS = ("cpu", "echo", "shell", "sleep")
TASK_STATES = ("submitted", "assigned", "running", "succeeded", "failed", "timed_out", "cancelled")
ACTIVE_STATES = frozenset({"assigned", "running"})  # the current attempt is live on a node
FINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
TASK_OUTCOMES = ("succeeded", "failed", "timed_out")  # what complete_task may report
ATTEMPT_OUTCOMES = frozenset({*TASK_OUTCOMES, "lost", "cancelled"})
MAX_TASK_ID_BYTES = 128
MAX_TIMEOUT_MS = 86_400_000
MAX_TASK_ATTEMPTS = 100
MAX_TASK_BATCH = 1000
MAX_SLEEP_MS = 86_400_000
MAX_CPU_MS = 3_600_000
MAX_ECHO_BYTES = 64 * 1024
MAX_SHELL_CMD_BYTES = 4096
MAX_POLICY_BYTES = 64
MAX_REASON_BYTES = 1024
MAX_ERROR_CHARS = 4096
MAX_TASK_OUTPUT_BYTES = 64 * 1024  # stdout and stderr each; the tail is kept
_INT64 = (-(1 << 63), (1 << 63) - 1)

_MOD = 1 << 256
_DIGEST_TAG = "raftdeck-state-digest/1"


class StateError(Exception):
    """A snapshot that cannot be restored: truncated, corrupt, or of another format."""


class CommandError(ValueError):
    """A command that is not well formed (raised by the codec, never by ``apply``)."""


# -- canonical msgpack ----------------------------------------------------------------------


_ATOMS = frozenset({str, bytes, int, bool, float, type(None)})


def _canon(obj: Any) -> Any:
    """The canonical form of plain data: maps with sorted keys, sequences as lists."""
    if type(obj) in _ATOMS:  # most calls (every write hashes a few items): no isinstance
        return obj
    if isinstance(obj, dict):
        return {k: _canon(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canon(x) for x in obj]
    return obj


_packb = msgpack.packb


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


def _bisect(a: list, x: Any) -> int:
    """The leftmost index where ``x`` could be inserted into the sorted list ``a``."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _item_hash(item: Any) -> int:
    return int.from_bytes(hashlib.sha256(_pack(item)).digest(), "big")


def _canonical_item_hash(item: list) -> int:
    """``_item_hash`` of an item already in canonical form (atoms, and maps built with
    sorted keys), without ``_canon``'s walk: the two writes of every put (its pair and
    its session) hash this way. tests/state: incremental digest == full digest."""
    return int.from_bytes(hashlib.sha256(_packb(item, use_bin_type=True)).digest(), "big")


def _pair_hash(key: str, value: bytes) -> int:
    """The hash of a KV pair's item, ``["kv", key, value]``: canonical as it is."""
    return _canonical_item_hash(["kv", key, value])


class _Accumulator:
    """A multiset hash: the sum of the items' hashes modulo 2**256."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def add(self, item: Any) -> int:
        """Add ``item``; returns its hash (for ``remove_hash`` later)."""
        h = _item_hash(item)
        self.value = (self.value + h) % _MOD
        return h

    def add_hash(self, h: int) -> int:
        self.value = (self.value + h) % _MOD
        return h

    def remove(self, item: Any) -> None:
        self.value = (self.value - _item_hash(item)) % _MOD

    def remove_hash(self, h: int) -> None:
        self.value = (self.value - h) % _MOD


def _final_digest(applied_index: int, acc: int) -> str:
    return hashlib.sha256(_pack([_DIGEST_TAG, applied_index, acc.to_bytes(32, "big")])).hexdigest()


# -- commands -------------------------------------------------------------------------------

Check = Callable[[Any], Any]  # returns the normalized value or raises CommandError


def _utf8_len(s: str) -> int:
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise CommandError("is not valid UTF-8") from None


def _check_name(v: Any, max_bytes: int) -> str:
    if type(v) is not str:
        raise CommandError("must be a string")
    if not v:
        raise CommandError("must not be empty")
    if _utf8_len(v) > max_bytes:
        raise CommandError(f"is longer than {max_bytes} bytes")
    return v


def _check_key(v: Any) -> str:
    return _check_name(v, MAX_KEY_BYTES)


def _check_bytes(v: Any) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    raise CommandError("must be bytes")


def _check_opt_bytes(v: Any) -> bytes | None:
    return None if v is None else _check_bytes(v)


def _check_client(v: Any) -> str:
    return _check_name(v, MAX_CLIENT_BYTES)


def _check_seq(v: Any) -> int:
    if type(v) is not int:
        raise CommandError("must be an integer")
    if v < 1:
        raise CommandError("must be >= 1")
    return v


def _check_int_in(v: Any, lo: int, hi: int) -> int:
    if type(v) is not int:
        raise CommandError(f"must be an integer in {lo}..{hi}")
    if not lo <= v <= hi:
        raise CommandError(f"must be in {lo}..{hi}, not {v}")
    return v


def _check_str_bytes(v: Any, hi: int) -> str:
    """A non-empty string of at most ``hi`` bytes of UTF-8."""
    return _check_name(v, hi)


def _check_ts(v: Any) -> int:
    return _check_int_in(v, 0, _INT64[1])


def _check_task_id(v: Any) -> str:
    return _check_str_bytes(v, MAX_TASK_ID_BYTES)


def _check_node(v: Any) -> str:
    return _check_str_bytes(v, MAX_CLIENT_BYTES)


def _check_attempt(v: Any) -> int:
    return _check_int_in(v, 1, MAX_TASK_ATTEMPTS)


def _check_outcome(v: Any) -> str:
    if type(v) is not str or v not in TASK_OUTCOMES:
        raise CommandError(f"must be one of {', '.join(TASK_OUTCOMES)}")
    return v


def _check_exit_code(v: Any) -> int | None:
    return None if v is None else _check_int_in(v, *_INT64)


def _check_reason(v: Any) -> str:
    return _check_str_bytes(v, MAX_REASON_BYTES)


def _check_error_text(v: Any) -> str:
    if type(v) is not str:
        raise CommandError("must be a string")
    _utf8_len(v)
    return v[:MAX_ERROR_CHARS]


def _check_map(v: Any) -> dict:
    """A task spec is checked field by field by the handler (error ``bad_task``), so a
    batch can refuse one task and accept the others; here it only has to be a map."""
    if type(v) is not dict:
        raise CommandError("must be a map")
    return v


def _check_task_list(v: Any) -> list:
    if type(v) is not list:
        raise CommandError("must be a list")
    if len(v) > MAX_TASK_BATCH:
        raise CommandError(f"has more than {MAX_TASK_BATCH} tasks")
    for i, t in enumerate(v):
        if type(t) is not dict:
            raise CommandError(f"[{i}] must be a map")
    return v


def _check_echo_data(v: Any) -> bytes:
    data = _check_bytes(v)
    if len(data) > MAX_ECHO_BYTES:
        raise CommandError(f"is longer than {MAX_ECHO_BYTES} bytes")
    return data


# kind -> {arg: validator}; every arg is required and no other is accepted
_TASK_ARGS: dict[str, dict[str, Check]] = {
    "sleep": {"ms": lambda v: _check_int_in(v, 0, MAX_SLEEP_MS)},
    "cpu": {"ms": lambda v: _check_int_in(v, 0, MAX_CPU_MS)},
    "echo": {"data": _check_echo_data},
    "shell": {"cmd": lambda v: _check_str_bytes(v, MAX_SHELL_CMD_BYTES)},
}
_SPEC_REQUIRED = ("id", "kind", "args", "timeout_ms", "max_attempts")
_SPEC_OPTIONAL = ("policy", "key")
_SPEC_FIELDS = (*_SPEC_REQUIRED, *_SPEC_OPTIONAL)


def _unknown(names: Any) -> str:
    return ", ".join(sorted(repr(n)[:64] for n in names))


def check_task_spec(spec: Any) -> dict[str, Any]:
    """The normalized spec of a task (``policy`` and ``key`` present, ``None`` if absent),
    or ``CommandError`` whose message starts with the offending field::

        task.args.ms: must be in 0..86400000, not -1

    ``apply`` runs the same check (error ``bad_task``); proposers may call it first.
    """
    if type(spec) is not dict:
        raise CommandError("task: must be a map")
    extra = set(spec) - set(_SPEC_FIELDS)
    if extra:
        raise CommandError(f"task: unknown field(s) {_unknown(extra)}"[:200])
    for name in _SPEC_REQUIRED:
        if name not in spec:
            raise CommandError(f"task.{name}: missing")
    out: dict[str, Any] = {}

    def field(label: str, value: Any, check: Check) -> Any:
        try:
            return check(value)
        except CommandError as e:
            raise CommandError(f"task.{label}: {e}") from None

    out["id"] = field("id", spec["id"], _check_task_id)
    kind = spec["kind"]
    if type(kind) is not str or kind not in _TASK_ARGS:
        shown = repr(kind)[:64]
        raise CommandError(f"task.kind: unknown kind {shown} (expected one of {', '.join(TASK_KINDS)})")
    out["kind"] = kind
    args = spec["args"]
    if type(args) is not dict:
        raise CommandError("task.args: must be a map")
    checks = _TASK_ARGS[kind]
    extra = set(args) - set(checks)
    if extra:
        raise CommandError(f"task.args: unknown field(s) {_unknown(extra)} for kind {kind!r}"[:200])
    for name in checks:
        if name not in args:
            raise CommandError(f"task.args.{name}: missing (kind {kind!r} needs {', '.join(sorted(checks))})")
    out["args"] = {name: field(f"args.{name}", args[name], check) for name, check in sorted(checks.items())}
    out["timeout_ms"] = field("timeout_ms", spec["timeout_ms"], lambda v: _check_int_in(v, 1, MAX_TIMEOUT_MS))
    out["max_attempts"] = field("max_attempts", spec["max_attempts"],
                                lambda v: _check_int_in(v, 1, MAX_TASK_ATTEMPTS))
    policy, key = spec.get("policy"), spec.get("key")
    out["policy"] = None if policy is None else field("policy", policy, lambda v: _check_str_bytes(v, MAX_POLICY_BYTES))
    out["key"] = None if key is None else field("key", key, _check_key)
    return out


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
    allowed: frozenset = frozenset()  # every key a command of this op may carry
    checks: tuple = ()  # (field, check, required), required fields first


OPS: dict[str, OpSpec] = {}

_SESSION_FIELDS = ("client", "seq")


def _op(name: str, optional: Mapping[str, Check] | None = None, **required: Check):
    def register(handler: Handler) -> Handler:
        assert name not in OPS, name
        assert not set(required) & set(optional or ()), name
        assert not {"op", *_SESSION_FIELDS} & {*required, *(optional or ())}, name
        opt = dict(optional or {})
        OPS[name] = OpSpec(
            name, handler, MappingProxyType(dict(required)), MappingProxyType(opt),
            frozenset({"op", *_SESSION_FIELDS, *required, *opt}),
            (*((f, c, True) for f, c in required.items()), *((f, c, False) for f, c in opt.items())),
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
    if not spec.allowed.issuperset(obj):
        extra = set(obj) - spec.allowed
        raise CommandError(f"{op}: unknown field(s) {', '.join(sorted(map(repr, extra)))}"[:200])
    args: dict[str, Any] = {}
    for name, check, required in spec.checks:
        if name not in obj:
            if required:
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
    return encode_command_for(op, **fields)[0]


# The types whose msgpack round trip gives back an equal value of the same type (floats
# left out: not worth reasoning about).
_FLAT = frozenset({str, bytes, int, bool, type(None)})


def encode_command_for(op: str, **fields: Any) -> tuple[bytes, Command | None]:
    """``encode_command``, and the Command that ``decode_command`` returns for those bytes
    when that is certain without decoding them: every field of the wire form is a str,
    bytes, int, bool or None (put, delete, cas, ...), which read back as equal values and
    pass the same checks. None otherwise (a task spec: nested maps)."""
    obj = {"op": op, **{k: v for k, v in fields.items() if not (k in _SESSION_FIELDS and v is None)}}
    cmd = _validate(obj)
    wire = cmd.to_wire()
    for v in wire.values():
        if type(v) not in _FLAT:
            return _pack(wire), None
    return _packb(dict(sorted(wire.items())), use_bin_type=True), cmd


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
        """Plain data, as cached in sessions (effects are dropped); canonical."""
        value, prev = self.value, self.prev
        if type(value) in _ATOMS and type(prev) in _ATOMS:  # every KV result: keys in order
            return {"detail": self.detail, "error": self.error, "ok": self.ok, "prev": prev, "value": value}
        return _canon(
            {"ok": self.ok, "value": value, "prev": prev, "error": self.error, "detail": self.detail}
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
    hash: int | None = None  # of item(client), once computed: a write replaces it next

    def item(self, client: str) -> list:
        return ["session", client, self.seq, self.index, self.wire]

    def remove_from(self, acc: "_Accumulator", client: str) -> None:
        if self.hash is None:
            acc.remove(self.item(client))
        else:
            acc.remove_hash(self.hash)


@dataclass(frozen=True, slots=True)
class StateStatistics:
    applied_index: int
    keys: int
    sessions: int
    max_sessions: int
    tasks: int
    conf_index: int


# -- snapshot views -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateView:
    """What a snapshot holds, captured by :meth:`StateMachine.snapshot_view`. Treat it
    as immutable: nothing changes it after the capture."""

    applied_index: int
    max_sessions: int
    kv: Mapping[str, bytes]
    sessions: tuple  # (client, seq, index, cached result), least recently applied first
    tasks: Mapping[str, Any]
    conf_index: int
    voters: tuple
    learners: tuple
    priorities: tuple
    addresses: Mapping[str, str]


# A big map is packed in chunks of this many pairs: each chunk is one short C call, so a
# thread that serializes a snapshot lets the event loop's thread have the GIL between
# chunks (after at most ``sys.getswitchinterval()``), instead of holding it for the
# whole state.
_CHUNK = 4096
# Keys are sorted in buckets above this many: one sorted() of 300,000 keys holds the GIL
# for ~90 ms; buckets split at sampled keys are sorted in a few ms each.
_BUCKET_SORT_ABOVE = 20_000


def _sorted_keys(keys: list[str]) -> list[str]:
    """``sorted(keys)``, without holding the GIL for long on a big list.

    Splitters are every k-th key of a deterministic sample; each key goes to the bucket
    between two splitters; each bucket is sorted on its own, and the buckets in order
    are the sorted list (the splitters only decide where the cuts fall, never the
    order, so the result is exactly ``sorted(keys)``)."""
    n = len(keys)
    if n <= _BUCKET_SORT_ABOVE:
        return sorted(keys)
    nbuckets = n // 4096 + 1
    sample = sorted(keys[:: max(1, n // (nbuckets * 16))])
    splitters = [sample[j * len(sample) // nbuckets] for j in range(1, nbuckets)]
    buckets: list[list[str]] = [[] for _ in range(nbuckets)]
    where = bisect.bisect_right
    for k in keys:  # a Python loop: the GIL changes hands every switch interval
        buckets[where(splitters, k)].append(k)
    out: list[str] = []
    for b in buckets:
        b.sort()
        out += b
    return out


def _pack_map_chunked(packer: msgpack.Packer, parts: list, m: Mapping[str, Any], canon: bool) -> None:
    """Append the canonical msgpack of the str-keyed map ``m`` to ``parts``: byte for
    byte what ``_pack(m)`` gives, packed a chunk of pairs at a time."""
    keys = _sorted_keys(list(m))
    parts.append(packer.pack_map_header(len(keys)))
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        body = msgpack.packb({k: (_canon(m[k]) if canon else m[k]) for k in chunk}, use_bin_type=True)
        # drop the chunk's own map header: the pairs follow the one header above
        parts.append(body[len(packer.pack_map_header(len(chunk))) :])


class SnapshotChunks:
    """A snapshot's bytes as the pieces :func:`serialize_view_chunks` made them, not joined.

    Joining them copied the whole serialized state once more, in one C call holding the
    GIL: at 70,000 keys 8 MB of the snapshot's transient peak, at a million 117 MB.
    Storage writes the pieces one after the other (``parts``); ``len()`` is the joined
    length and ``bytes()`` joins them, for whatever needs one buffer."""

    __slots__ = ("parts", "_size")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = tuple(parts)
        self._size = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"SnapshotChunks({len(self.parts)} parts, {self._size} bytes)"


def serialize_view(view: StateView) -> bytes:
    """The canonical snapshot bytes of a view: a pure function of it, safe to call in a
    worker thread while the machine goes on applying. Equal views give equal bytes, and
    ``serialize_view(sm.snapshot_view()) == sm.snapshot()``."""
    return bytes(serialize_view_chunks(view))


def serialize_view_chunks(view: StateView) -> SnapshotChunks:
    """:func:`serialize_view`'s bytes in pieces, never joined (see SnapshotChunks)."""
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    # The body map, with its keys in sorted order:
    # applied_index, conf, kv, max_sessions, sessions, tasks
    parts: list[bytes] = [packer.pack_map_header(6)]
    parts.append(pack("applied_index"))
    parts.append(pack(view.applied_index))
    parts.append(pack("conf"))
    parts.append(_pack({
        "index": view.conf_index,
        "voters": list(view.voters),
        "learners": list(view.learners),
        "priorities": [list(p) for p in view.priorities],
        "addresses": view.addresses,
    }))
    parts.append(pack("kv"))
    _pack_map_chunked(packer, parts, view.kv, canon=False)  # str -> bytes: already canonical
    parts.append(pack("max_sessions"))
    parts.append(pack(view.max_sessions))
    parts.append(pack("sessions"))
    parts.append(packer.pack_array_header(len(view.sessions)))
    for i in range(0, len(view.sessions), _CHUNK):
        chunk = view.sessions[i : i + _CHUNK]
        body = _pack(list(chunk))
        parts.append(body[len(packer.pack_array_header(len(chunk))) :])
    parts.append(pack("tasks"))
    _pack_map_chunked(packer, parts, view.tasks, canon=True)
    # The outer map {body, format, sha256, version} around the body's parts.
    sha = hashlib.sha256()
    body_len = 0
    for p in parts:
        sha.update(p)  # hashlib lets go of the GIL for big parts
        body_len += len(p)
    head = [packer.pack_map_header(4), pack("body"), bin_header(body_len)]
    tail = [pack("format"), pack(SNAPSHOT_FORMAT), pack("sha256"), pack(sha.digest()),
            pack("version"), pack(SNAPSHOT_VERSION)]
    return SnapshotChunks(head + parts + tail)


# -- the key-value table ---------------------------------------------------------------------

_GONE = object()  # in an overlay: the key was deleted after the freeze
_MISSING = object()


class FreezableKV:
    """The key-value table, which hands out a point-in-time view of itself without a copy.

    Normally a plain dict (``base``). :meth:`freeze` returns ``base`` itself as the view,
    then sends every change to an overlay (``over``: key -> new value, or ``_GONE`` for a
    delete) and leaves ``base`` untouched, so another thread may read the view while the
    machine goes on applying. :meth:`thaw` folds the overlay back in, O(changes since the
    freeze); the caller thaws only once nothing reads the view any more.

    Why: the view was ``dict(kv)``, a copy of the whole table in the event loop at every
    snapshot (10-27 ms at a million keys on an idle machine, 253 ms in the soak's busiest
    second) and a second table's worth of memory while the snapshot was serialized.
    """

    __slots__ = ("base", "over", "_len")

    def __init__(self, base: dict[str, bytes] | None = None) -> None:
        self.base: dict[str, bytes] = {} if base is None else base
        self.over: dict[str, Any] | None = None  # None: not frozen
        self._len = len(self.base)

    def __len__(self) -> int:
        return self._len

    def get(self, key: str) -> bytes | None:
        over = self.over
        if over is not None:
            v = over.get(key, _MISSING)
            if v is not _MISSING:
                return None if v is _GONE else v
        return self.base.get(key)

    def set(self, key: str, value: bytes) -> bytes | None:
        """Store ``value``; returns the value it replaced (None if the key was new)."""
        over = self.over
        if over is None:  # the usual case, on every put: the dict alone
            base = self.base
            prev = base.get(key)
            base[key] = value
        else:
            prev = self.get(key)
            over[key] = value
        if prev is None:
            self._len += 1
        return prev

    def pop(self, key: str) -> bytes | None:
        """Delete ``key``; returns its value (None if it was not there)."""
        over = self.over
        if over is None:
            prev = self.base.pop(key, None)
        else:
            prev = self.get(key)
            if prev is not None:
                over[key] = _GONE
        if prev is not None:
            self._len -= 1
        return prev

    def items(self) -> Iterator[tuple[str, bytes]]:
        over = self.over
        if over is None:
            yield from self.base.items()
            return
        for k, v in self.base.items():
            if k not in over:
                yield k, v
        for k, v in over.items():
            if v is not _GONE:
                yield k, v

    def copy(self) -> dict[str, bytes]:
        return dict(self.base) if self.over is None else dict(self.items())

    def freeze(self) -> Mapping[str, bytes]:
        """The table as it is now, unchanged until :meth:`thaw` is called with it. Only one
        view is frozen at a time: a second call while one is out gets a copy (O(n))."""
        if self.over is not None:
            return self.copy()
        self.over = {}
        return self.base

    def thaw(self, view: Mapping[str, bytes]) -> bool:
        """Nothing reads ``view`` any more: fold the overlay into it if it is the frozen
        table. False (nothing done) for any other mapping, e.g. a copy from
        :meth:`freeze` or a table this machine replaced since (a snapshot installed)."""
        if self.over is None or view is not self.base:
            return False
        base = self.base
        for k, v in self.over.items():
            if v is _GONE:
                base.pop(k, None)
            else:
                base[k] = v
        self.over = None
        return True


# -- the state machine ----------------------------------------------------------------------

_EMPTY_CONF = ConfState(frozenset())


class StateMachine:
    """The replicated state. Feed it committed entries in log order with ``apply()``."""

    def __init__(self, *, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if type(max_sessions) is not int or max_sessions < 1:
            raise ValueError(f"max_sessions must be an integer >= 1, not {max_sessions!r}")
        self._max_sessions = max_sessions
        self._applied = 0
        self._kv = FreezableKV()
        # Ordered by the index of each client's last applied command (oldest first):
        # the first entry is the next to evict.
        self._sessions: OrderedDict[str, _Sess] = OrderedDict()
        self._tasks: dict[str, Any] = {}  # task id -> plain-data record (see _new_record)
        self._conf = _EMPTY_CONF
        self._conf_index = 0
        self._addresses: dict[str, str] = {}  # members added with an address (ConfChange.context)
        self._acc = _Accumulator()
        self._acc.add(self._conf_item())
        self._reindex_tasks()
        # Commands this replica encoded itself (as the leader), by their bytes: apply()
        # takes them from here instead of decoding and checking them again. A proposal
        # that never applies here (a new leader overwrote it) stays until the bound.
        self._decoded: dict[bytes, Command] = {}

    DECODED_MAX = 1024

    def remember(self, data: bytes, cmd: Command) -> None:
        """``cmd`` is what ``decode_command(data)`` returns (``encode_command_for`` made
        both): ``apply`` of an entry with these bytes may use it as it is."""
        if len(self._decoded) >= self.DECODED_MAX:
            self._decoded.clear()
        self._decoded[data] = cmd

    def _reindex_tasks(self) -> None:
        """Rebuild the derived task indexes from ``_tasks`` (not in the snapshot or digest)."""
        self._task_ids_by_state: dict[str, set[str]] = {st: set() for st in TASK_STATES}
        self._task_ids_by_node: dict[str, set[str]] = {}  # node -> ids of its live attempts
        # (submitted_at, id) of every task, sorted: the listing order
        self._task_order: list[tuple[int, str]] = sorted((r["submitted_at"], t) for t, r in self._tasks.items())
        # the same for the tasks waiting to be placed: the leader reads the first few of
        # them every tick, and thousands may wait (late binding)
        self._submitted_order: list[tuple[int, str]] = [
            k for k in self._task_order if self._tasks[k[1]]["state"] == "submitted"]
        for t, r in self._tasks.items():
            self._index_task(t, r, order=False, submitted=False)

    def _index_task(self, task_id: str, record: Any, *, order: bool = True,
                    submitted: bool = True) -> None:
        self._task_ids_by_state[record["state"]].add(task_id)
        if record["state"] in ACTIVE_STATES:
            self._task_ids_by_node.setdefault(record["node"], set()).add(task_id)
        if order:
            key = (record["submitted_at"], task_id)
            self._task_order.insert(_bisect(self._task_order, key), key)
        if submitted and record["state"] == "submitted":
            key = (record["submitted_at"], task_id)
            self._submitted_order.insert(_bisect(self._submitted_order, key), key)

    def _unindex_task(self, task_id: str, record: Any, *, order: bool = True) -> None:
        if record["state"] == "submitted":
            key = (record["submitted_at"], task_id)
            i = _bisect(self._submitted_order, key)
            assert self._submitted_order[i] == key
            del self._submitted_order[i]
        self._task_ids_by_state[record["state"]].discard(task_id)
        if record["state"] in ACTIVE_STATES:
            ids = self._task_ids_by_node[record["node"]]
            ids.discard(task_id)
            if not ids:
                del self._task_ids_by_node[record["node"]]
        if order:
            key = (record["submitted_at"], task_id)
            i = _bisect(self._task_order, key)
            assert self._task_order[i] == key
            del self._task_order[i]

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
        cmd = self._decoded.pop(data, None) if self._decoded else None
        if cmd is not None:
            return self._execute(index, cmd)
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
            old.remove_from(self._acc, client)
        elif len(self._sessions) >= self._max_sessions:
            victim, vs = self._sessions.popitem(last=False)
            vs.remove_from(self._acc, victim)
        new = _Sess(seq, index, result.to_wire())
        self._sessions[client] = new
        new.hash = self._acc.add_hash(_canonical_item_hash(new.item(client)))  # to_wire is canonical

    # -- mutations (the only code that touches the sections; each keeps the digest) -----

    def _kv_set(self, key: str, value: bytes) -> bytes | None:
        prev = self._kv.set(key, value)
        if prev is not None:
            self._acc.remove_hash(_pair_hash(key, prev))
        self._acc.add_hash(_pair_hash(key, value))
        return prev

    def _kv_delete(self, key: str) -> bytes | None:
        prev = self._kv.pop(key)
        if prev is not None:
            self._acc.remove_hash(_pair_hash(key, prev))
        return prev

    def _task_set(self, task_id: str, record: Any) -> None:
        """Insert or replace a record. Callers build the new record as a copy: the stored
        one must stay as it was until here, because its hash leaves the digest."""
        record = _canon(record)
        assert _is_plain(record), "task records are plain data"
        old = self._tasks.pop(task_id, None)
        same_order = old is not None and old["submitted_at"] == record["submitted_at"]
        if old is not None:
            self._acc.remove(["task", task_id, old])
            self._unindex_task(task_id, old, order=not same_order)
        self._tasks[task_id] = record
        self._acc.add(["task", task_id, record])
        self._index_task(task_id, record, order=not same_order)

    def _task_delete(self, task_id: str) -> Any:
        record = self._tasks.pop(task_id, None)
        if record is not None:
            self._acc.remove(["task", task_id, record])
            self._unindex_task(task_id, record)
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
        """The raw task table (read-only view; do not mutate the records)."""
        return MappingProxyType(self._tasks)

    # Task reads for the agent and the console: pure, local (stale unless the caller did
    # ReadIndex first). Records are returned as copies; lists of ids are in submission
    # order, (submitted_at, id).

    def task(self, task_id: str) -> dict[str, Any] | None:
        """A copy of the task's record, or None."""
        record = self._tasks.get(task_id)
        return None if record is None else _canon(record)

    def task_attempt(self, task_id: str) -> tuple[int, str, str | None] | None:
        """(attempt, state, node) of the task, without copying its record; or None."""
        record = self._tasks.get(task_id)
        return None if record is None else (record["attempt"], record["state"], record["node"])

    def _in_order(self, ids: set[str]) -> list[str]:
        tasks = self._tasks
        return sorted(ids, key=lambda t: (tasks[t]["submitted_at"], t))

    def tasks_by_state(self, state: str) -> list[str]:
        """Ids of the tasks in ``state`` (``ValueError`` for an unknown state)."""
        if state not in self._task_ids_by_state:
            raise ValueError(f"unknown task state {state!r} (expected one of {', '.join(TASK_STATES)})")
        if state == "submitted":
            return [t for _, t in self._submitted_order]
        return self._in_order(self._task_ids_by_state[state])

    def first_submitted(self, n: int) -> list[str]:
        """The first ``n`` ids of ``tasks_by_state("submitted")``, in O(n)."""
        return [t for _, t in self._submitted_order[:n]]

    def tasks_on(self, node: str) -> list[str]:
        """Ids of the non-final tasks whose current attempt is on ``node`` (assigned or running)."""
        return self._in_order(self._task_ids_by_node.get(node, set()))

    def finished_tasks(self) -> int:
        """How many tasks are in a final state (succeeded, failed, timed_out, cancelled)."""
        return sum(len(self._task_ids_by_state[st]) for st in FINAL_STATES)

    def task_counts(self) -> dict[str, int]:
        """Number of tasks in each state (every state present, zeros included)."""
        return {st: len(ids) for st, ids in self._task_ids_by_state.items()}

    def node_load(self) -> dict[str, int]:
        """node -> number of tasks assigned to or running on it (nodes with none absent)."""
        return {n: len(self._task_ids_by_node[n]) for n in sorted(self._task_ids_by_node)}

    def list_tasks(
        self, state: str | None = None, node: str | None = None, limit: int = 100, after_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` records (copies) in submission order, (submitted_at, id).

        ``state`` keeps the tasks in that state; ``node`` those whose current (or last)
        attempt is on that node; ``after_id`` starts after that task (a page cursor:
        pass the id of the last record of the previous page). ``KeyError`` for an
        unknown ``after_id``, ``ValueError`` for an unknown state or a bad limit.
        """
        if type(limit) is not int or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, not {limit!r}")
        start: tuple[int, str] | None = None
        if after_id is not None:
            if after_id not in self._tasks:
                raise KeyError(after_id)
            start = (self._tasks[after_id]["submitted_at"], after_id)
        if state is not None:
            candidates = [(self._tasks[t]["submitted_at"], t) for t in self.tasks_by_state(state)]
        else:
            candidates = self._task_order
        i = 0 if start is None else _bisect(candidates, start)
        if start is not None and i < len(candidates) and candidates[i] == start:
            i += 1
        out: list[dict[str, Any]] = []
        while i < len(candidates) and len(out) < limit:
            record = self._tasks[candidates[i][1]]
            if node is None or record["node"] == node:
                out.append(_canon(record))
            i += 1
        return out

    def get(self, key: str) -> bytes | None:
        """The local value (a stale read unless the caller did ReadIndex first)."""
        return self._kv.get(key)

    def keys(self) -> list[str]:
        return sorted(k for k, _ in self._kv.items())

    def dump(self) -> dict[str, bytes]:
        """A copy of the whole key-value store, for the divergence view."""
        return self._kv.copy()

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
        """Canonical bytes of the whole state: equal states give equal bytes.

        The same as ``serialize_view(self.snapshot_view())`` (then ``release_view``);
        the driver calls the halves separately, so that only the cheap capture runs in its
        event loop."""
        view = self.snapshot_view()
        try:
            return serialize_view(view)
        finally:
            self.release_view(view)

    def snapshot_view(self) -> "StateView":
        """A point-in-time view of the state at ``applied_index``, cheap to take.

        The key-value table is not copied: it is frozen (:class:`FreezableKV`) until
        :meth:`release_view`, which the caller must call once nothing reads the view.
        The other sections are shallow copies. The values they share with the machine
        are never changed in place after they are stored: a kv value is ``bytes``; a task record or
        a session's cached result is replaced by a new object on every change (each
        handler builds a copy, see ``_task_set`` and ``_record_session``), which the
        digest already relies on, since the old object's hash leaves the accumulator. So
        the view stays as it was however the machine moves on, and
        :func:`serialize_view` may read it in another thread."""
        c = self._conf
        return StateView(
            applied_index=self._applied,
            max_sessions=self._max_sessions,
            kv=self._kv.freeze(),
            sessions=tuple((cl, s.seq, s.index, s.wire) for cl, s in self._sessions.items()),
            tasks=dict(self._tasks),
            conf_index=self._conf_index,
            voters=tuple(sorted(c.voters)),
            learners=tuple(sorted(c.learners)),
            priorities=tuple(tuple(p) for p in c.priorities),
            addresses=dict(self._addresses),
        )

    def reset_membership(self, conf: ConfState) -> None:
        """Start over with ``conf`` as the membership (no addresses: every member's comes
        from the inventory), as of the applied index. Only for a backup restored into a
        new cluster (console/backup.py): every restored node gets the same result, and the
        core starts from a snapshot carrying the same ``conf``."""
        _check_conf(conf)
        self._acc.remove(self._conf_item())
        self._conf, self._conf_index, self._addresses = conf, self._applied, {}
        self._acc.add(self._conf_item())

    def release_view(self, view: "StateView") -> None:
        """Nothing reads ``view`` any more (its snapshot is written, or failed): the
        key-value table takes the changes made since the capture. A view of a table this
        machine no longer holds (a snapshot was installed since) is simply dropped."""
        self._kv.thaw(view.kv)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's. Raises ``StateError`` if the data
        is not a valid snapshot; the machine is then left unchanged."""
        self.adopt(_parse_snapshot(data))

    def adopt(self, new: "StateMachine") -> None:
        """Take over the whole state of ``new`` (a machine loaded from a snapshot)."""
        self._max_sessions = new._max_sessions
        self._applied = new._applied
        self._kv = new._kv
        self._sessions = new._sessions
        self._tasks = new._tasks
        self._conf = new._conf
        self._conf_index = new._conf_index
        self._addresses = new._addresses
        self._acc = new._acc
        self._task_ids_by_state = new._task_ids_by_state
        self._task_ids_by_node = new._task_ids_by_node
        self._task_order = new._task_order
        self._submitted_order = new._submitted_order
        self._decoded.clear()

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
    sm._kv = FreezableKV(kv)

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
    for task_id, record in tasks.items():
        problem = _record_problem(task_id, record)
        need(problem is None, f"task {task_id[:64]!r}: {problem}")
    sm._tasks = tasks
    sm._reindex_tasks()

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


_RECORD_FIELDS = frozenset({
    *_SPEC_FIELDS, "state", "attempt", "node", "attempts", "submitted_at", "finished_at", "exit_code",
    "stdout", "stderr", "stdout_truncated", "stderr_truncated", "error", "submitted_by",
})
_ATTEMPT_FIELDS = frozenset({"attempt", "node", "assigned_at", "started_at", "finished_at", "outcome"})


def _record_problem(task_id: str, r: Any) -> str | None:
    """Why a snapshot's task record is not one this machine could have written (or None).

    Restore checks records so that no later command can trip over a malformed one."""
    if type(r) is not dict or set(r) != _RECORD_FIELDS:
        return "record does not have the task fields"
    try:
        spec = check_task_spec({k: r[k] for k in _SPEC_FIELDS if r[k] is not None})
    except CommandError as e:
        return str(e)
    if spec != {k: r[k] for k in _SPEC_FIELDS} or r["id"] != task_id:
        return "spec is not normalized or id does not match"

    def opt(v: Any, t: type) -> bool:
        return v is None or type(v) is t

    if r["state"] not in TASK_STATES:
        return "unknown state"
    if not (type(r["submitted_at"]) is int and opt(r["finished_at"], int) and opt(r["exit_code"], int)
            and type(r["stdout"]) is bytes and type(r["stderr"]) is bytes and opt(r["error"], str)
            and opt(r["submitted_by"], str) and opt(r["node"], str)
            and type(r["stdout_truncated"]) is int and type(r["stderr_truncated"]) is int):
        return "field of the wrong type"
    attempts = r["attempts"]
    if type(r["attempt"]) is not int or type(attempts) is not list or len(attempts) != r["attempt"]:
        return "attempt does not count the attempts"
    if r["attempt"] > r["max_attempts"]:
        return "more attempts than max_attempts"
    for i, a in enumerate(attempts, start=1):
        if not (type(a) is dict and set(a) == _ATTEMPT_FIELDS and a["attempt"] == i and type(a["node"]) is str
                and type(a["assigned_at"]) is int and opt(a["started_at"], int) and opt(a["finished_at"], int)
                and (a["outcome"] is None or a["outcome"] in ATTEMPT_OUTCOMES)):
            return f"bad attempt {i}"
        if a["outcome"] is None and (i != len(attempts) or r["state"] not in ACTIVE_STATES):
            return f"attempt {i} is open but not the live one"
    if r["state"] in ACTIVE_STATES and (not attempts or attempts[-1]["outcome"] is not None
                                        or r["node"] != attempts[-1]["node"]):
        return "live task without a live attempt on its node"
    return None


# -- operations (the dispatch table) --------------------------------------------------------
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


# -- task operations ------------------------------------------------------------------------


def _new_record(spec: dict[str, Any], ts: int, client: str | None) -> dict[str, Any]:
    return {
        **spec,  # id, kind, args, timeout_ms, max_attempts, policy, key
        "state": "submitted",
        "attempt": 0,  # number of the current attempt; 0 = never assigned
        "node": None,  # node of the current attempt (None while waiting for one)
        "attempts": [],  # [{attempt, node, assigned_at, started_at, finished_at, outcome}]
        "submitted_at": ts,
        "finished_at": None,
        "exit_code": None,
        "stdout": b"",  # the last MAX_TASK_OUTPUT_BYTES of it
        "stderr": b"",
        "stdout_truncated": 0,  # bytes dropped from the front of stdout
        "stderr_truncated": 0,
        "error": None,
        "submitted_by": client,
    }


def _spec_of(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in _SPEC_FIELDS}


def _submit_one(sm: StateMachine, raw: Any, ts: int, client: str | None) -> ApplyResult:
    try:
        spec = check_task_spec(raw)
    except CommandError as e:
        return ApplyResult(False, error=ERR_BAD_TASK, detail=str(e))
    task_id = spec["id"]
    existing = sm._tasks.get(task_id)
    if existing is not None:
        old = _spec_of(existing)
        if old != spec:
            differs = ", ".join(k for k in _SPEC_FIELDS if old[k] != spec[k])
            return ApplyResult(False, error=ERR_TASK_EXISTS,
                               detail=f"task {task_id!r} exists with a different spec (differs in {differs})")
        return ApplyResult(True, value=_canon(existing), detail="already submitted")
    sm._task_set(task_id, _new_record(spec, ts, client))
    return ApplyResult(True, value=_canon(sm._tasks[task_id]))


@_op("submit_task", task=_check_map, ts=_check_ts)
def _apply_submit_task(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    return _submit_one(sm, cmd.args["task"], cmd.args["ts"], cmd.client)


@_op("submit_tasks", tasks=_check_task_list, ts=_check_ts)
def _apply_submit_tasks(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    """Each task as a submit_task; ok when every one is. value: their results, in order."""
    results = [_submit_one(sm, t, cmd.args["ts"], cmd.client) for t in cmd.args["tasks"]]
    refused = sum(not r.ok for r in results)
    return ApplyResult(refused == 0, value=[r.to_wire() for r in results],
                       detail=f"{refused} of {len(results)} refused" if refused else "")


def _no_such_task(task_id: str) -> ApplyResult:
    return ApplyResult(False, error=ERR_NO_SUCH_TASK, detail=f"no task {task_id!r}")


def _stale(record: Mapping[str, Any], attempt: int, node: str | None) -> ApplyResult | None:
    """``stale_attempt`` unless ``attempt`` (on ``node``, if given) is the task's live attempt."""
    if record["state"] in FINAL_STATES:
        why = f"the task is already {record['state']} (attempt {record['attempt']})"
    elif attempt != record["attempt"]:
        why = f"attempt {attempt} is not the current attempt {record['attempt']}"
    elif record["state"] not in ACTIVE_STATES:
        why = f"attempt {attempt} is no longer live (the task is {record['state']})"
    elif node is not None and node != record["node"]:
        why = f"attempt {attempt} is on node {record['node']!r}, not {node!r}"
    else:
        return None
    return ApplyResult(False, error=ERR_STALE_ATTEMPT, detail=why)


@_op("assign_task", id=_check_task_id, node=_check_node, attempt=_check_attempt, ts=_check_ts)
def _apply_assign_task(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    """Compare-and-set: the next attempt of a task that waits for one goes to ``node``."""
    task_id, node, attempt, ts = (cmd.args[k] for k in ("id", "node", "attempt", "ts"))
    record = sm._tasks.get(task_id)
    if record is None:
        return _no_such_task(task_id)
    if record["state"] in FINAL_STATES:
        return ApplyResult(False, value=_canon(record), error=ERR_ALREADY_FINAL,
                           detail=f"the task is already {record['state']}")
    if attempt > record["max_attempts"]:
        return ApplyResult(False, error=ERR_NO_ATTEMPTS_LEFT,
                           detail=f"attempt {attempt} exceeds max_attempts {record['max_attempts']}")
    if attempt != record["attempt"] + 1:
        return ApplyResult(False, error=ERR_STALE_ATTEMPT,
                           detail=f"attempt {attempt} is not the next attempt {record['attempt'] + 1}")
    if record["state"] != "submitted":
        return ApplyResult(False, error=ERR_TASK_BUSY,
                           detail=f"attempt {record['attempt']} is still {record['state']} on node "
                                  f"{record['node']!r}; expire it first")
    new = _canon(record)
    new.update(state="assigned", attempt=attempt, node=node)
    new["attempts"].append({"attempt": attempt, "node": node, "assigned_at": ts, "started_at": None,
                            "finished_at": None, "outcome": None})
    sm._task_set(task_id, new)
    return ApplyResult(True, value=_canon(sm._tasks[task_id]), effects=(("run", node, task_id, attempt),))


@_op("start_task", id=_check_task_id, node=_check_node, attempt=_check_attempt, ts=_check_ts)
def _apply_start_task(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    """The node began the attempt. A repeat for a running attempt is ok and changes nothing."""
    task_id, node, attempt, ts = (cmd.args[k] for k in ("id", "node", "attempt", "ts"))
    record = sm._tasks.get(task_id)
    if record is None:
        return _no_such_task(task_id)
    stale = _stale(record, attempt, node)
    if stale is not None:
        return stale
    if record["state"] == "running":
        return ApplyResult(True, value=_canon(record), detail="already running")
    new = _canon(record)
    new["state"] = "running"
    new["attempts"][-1]["started_at"] = ts
    sm._task_set(task_id, new)
    return ApplyResult(True, value=_canon(sm._tasks[task_id]))


def _tail(data: bytes) -> tuple[bytes, int]:
    if len(data) <= MAX_TASK_OUTPUT_BYTES:
        return data, 0
    return data[-MAX_TASK_OUTPUT_BYTES:], len(data) - MAX_TASK_OUTPUT_BYTES


@_op(
    "complete_task",
    {"error": _check_error_text},
    id=_check_task_id, node=_check_node, attempt=_check_attempt, outcome=_check_outcome,
    exit_code=_check_exit_code, stdout=_check_bytes, stderr=_check_bytes, ts=_check_ts,
)
def _apply_complete_task(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    """The result of the live attempt; anything else (a late result of an old attempt, a
    result after a cancel or a repeat) is ``stale_attempt`` and changes nothing."""
    a = cmd.args
    record = sm._tasks.get(a["id"])
    if record is None:
        return _no_such_task(a["id"])
    stale = _stale(record, a["attempt"], a["node"])
    if stale is not None:
        return stale
    new = _canon(record)
    new["stdout"], new["stdout_truncated"] = _tail(a["stdout"])
    new["stderr"], new["stderr_truncated"] = _tail(a["stderr"])
    new.update(state=a["outcome"], finished_at=a["ts"], exit_code=a["exit_code"], error=a.get("error"))
    new["attempts"][-1].update(outcome=a["outcome"], finished_at=a["ts"])
    sm._task_set(a["id"], new)
    return ApplyResult(True, value=_canon(sm._tasks[a["id"]]))


@_op("expire_task", id=_check_task_id, attempt=_check_attempt, reason=_check_reason, ts=_check_ts)
def _apply_expire_task(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    """The leader declares the live attempt lost: the task waits for another attempt, or
    fails if that was the last one."""
    task_id, attempt, reason, ts = (cmd.args[k] for k in ("id", "attempt", "reason", "ts"))
    record = sm._tasks.get(task_id)
    if record is None:
        return _no_such_task(task_id)
    stale = _stale(record, attempt, None)
    if stale is not None:
        return stale
    new = _canon(record)
    new["attempts"][-1].update(outcome="lost", finished_at=ts)
    if attempt < record["max_attempts"]:
        new.update(state="submitted", node=None)
    else:
        new.update(state="failed", finished_at=ts, error=f"lost on every attempt ({reason})")
    sm._task_set(task_id, new)
    return ApplyResult(True, value=_canon(sm._tasks[task_id]))


@_op("cancel_task", id=_check_task_id, ts=_check_ts)
def _apply_cancel_task(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    task_id, ts = cmd.args["id"], cmd.args["ts"]
    record = sm._tasks.get(task_id)
    if record is None:
        return _no_such_task(task_id)
    if record["state"] in FINAL_STATES:
        return ApplyResult(False, value=_canon(record), error=ERR_ALREADY_FINAL,
                           detail=f"the task is already {record['state']}")
    new = _canon(record)
    new.update(state="cancelled", finished_at=ts)
    effects: tuple = ()
    if record["state"] in ACTIVE_STATES:
        new["attempts"][-1].update(outcome="cancelled", finished_at=ts)
        effects = (("kill", record["node"], task_id, record["attempt"]),)
    sm._task_set(task_id, new)
    return ApplyResult(True, value=_canon(sm._tasks[task_id]), effects=effects)


def _check_keep(v: Any) -> int:
    return _check_int_in(v, 0, _INT64[1])


@_op("forget_tasks", keep=_check_keep)
def _apply_forget_tasks(sm: StateMachine, cmd: Command, index: int) -> ApplyResult:
    """Retention (proposed by the leader): forget the finished tasks submitted first until
    at most ``keep`` finished tasks remain. Tasks not yet finished are never forgotten.
    The value is how many were forgotten."""
    excess = sm.finished_tasks() - cmd.args["keep"]
    if excess <= 0:
        return ApplyResult(True, value=0)
    doomed: list[str] = []
    tasks = sm._tasks
    for _, task_id in sm._task_order:
        if tasks[task_id]["state"] in FINAL_STATES:
            doomed.append(task_id)
            if len(doomed) == excess:
                break
    for task_id in doomed:
        sm._task_delete(task_id)
    return ApplyResult(True, value=len(doomed))


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
