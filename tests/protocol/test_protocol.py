"""Tests of the sans-I/O wire codec (nodeagent/protocol.py).

Unit tests pin every error a peer can cause; property tests show that valid messages
round-trip and that arbitrary or mutated bytes only ever yield messages, NEED_DATA,
CLOSED or ProtocolError.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from nodeagent import protocol as p
from nodeagent.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    MESSAGE_SCHEMAS,
    NEED_DATA,
    FrameDecoder,
    ProtocolError,
    encode,
    raft_from_wire,
    raft_to_wire,
)
from nodeagent.raft import messages as rm

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ------------------------------------------------------------------------------


def frame(obj: Any) -> bytes:
    """A frame around any msgpack value, bypassing encode()'s validation."""
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def drain(dec: FrameDecoder) -> list[Any]:
    """Every message the decoder has, then the signal that stopped it."""
    out = []
    while True:
        msg = dec.next_message()
        out.append(msg)
        if msg is NEED_DATA or msg is CLOSED:
            return out


def decode_all(data: bytes, chunks: list[int] | None = None, max_frame: int = DEFAULT_MAX_FRAME) -> list[Any]:
    """Feed ``data`` (split at ``chunks`` offsets), then EOF; return messages (no signals)."""
    dec = FrameDecoder(max_frame=max_frame)
    cuts = sorted(set(c for c in (chunks or []) if 0 < c < len(data)))
    msgs: list[Any] = []
    for a, b in zip([0, *cuts], [*cuts, len(data)]):
        dec.receive_data(data[a:b])
        msgs += [m for m in drain(dec) if not isinstance(m, p.Signal)]
    dec.receive_data(b"")
    rest = drain(dec)
    assert rest[-1] is CLOSED
    return msgs + rest[:-1]


def raises_code(code: str, data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_all(data, max_frame=max_frame)
    assert info.value.code == code, info.value
    return info.value


PUT = {"type": "put", "id": 7, "key": "k", "value": b"v", "client_id": "c1", "seq": 3, "forward": False}


# -- framing ------------------------------------------------------------------------------


def test_encode_layout_is_length_then_msgpack_map():
    data = encode({"type": "status", "id": 1})
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    assert msgpack.unpackb(data[4:], raw=False) == {"type": "status", "id": 1}


def test_several_frames_in_one_chunk():
    msgs = [{"type": "status", "id": i} for i in range(5)]
    data = b"".join(encode(m) for m in msgs)
    dec = FrameDecoder()
    dec.receive_data(data)
    assert drain(dec) == [*msgs, NEED_DATA]
    dec.receive_data(b"")
    assert dec.next_message() is CLOSED
    assert dec.next_message() is CLOSED


def test_frames_split_at_every_byte_boundary():
    msgs = [PUT, {"type": "status", "id": 2}, {"type": "raft", "group": 0, "msg": rm.TimeoutNow("a", "b", 4)}]
    data = b"".join(encode(m) for m in msgs)
    for cut in range(len(data) + 1):
        assert decode_all(data, [cut]) == msgs, cut


def test_byte_by_byte():
    msgs = [PUT, {"type": "unsubscribe", "id": 9}]
    data = b"".join(encode(m) for m in msgs)
    assert decode_all(data, list(range(len(data)))) == msgs


def test_need_data_until_frame_complete():
    data = encode(PUT)
    dec = FrameDecoder()
    assert dec.next_message() is NEED_DATA
    dec.receive_data(data[:3])
    assert dec.next_message() is NEED_DATA
    dec.receive_data(data[3:-1])
    assert dec.next_message() is NEED_DATA
    assert dec.buffered == len(data) - 1
    dec.receive_data(data[-1:])
    assert dec.next_message() == PUT
    assert dec.buffered == 0


def test_oversized_length_prefix_rejected_after_four_bytes():
    dec = FrameDecoder(max_frame=100)
    dec.receive_data(struct.pack(">I", 101))
    with pytest.raises(ProtocolError) as info:
        dec.next_message()
    assert info.value.code == "frame_too_large"
    assert "101" in info.value.message and "100" in info.value.message


def test_default_limit_is_four_mib():
    dec = FrameDecoder()
    dec.receive_data(struct.pack(">I", 4 * 1024 * 1024))
    assert dec.next_message() is NEED_DATA  # exactly the limit: waits for the body
    dec = FrameDecoder()
    dec.receive_data(struct.pack(">I", 4 * 1024 * 1024 + 1))
    with pytest.raises(ProtocolError, match="frame_too_large"):
        dec.next_message()


def test_max_frame_can_be_raised_between_frames():
    big = {"type": "put", **{k: v for k, v in PUT.items() if k != "type"}, "value": b"x" * 200}
    dec = FrameDecoder(max_frame=100)
    dec.max_frame = 1000
    dec.receive_data(encode(big))
    assert dec.next_message() == big
    with pytest.raises(ValueError):
        dec.max_frame = 0
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=2**32)


def test_zero_length_frame_is_an_error():
    raises_code("empty_frame", b"\x00\x00\x00\x00")


def test_half_frame_then_eof():
    data = encode(PUT)
    err = raises_code("truncated", data[:-3])
    assert f"of {len(data) - 4} body bytes" in err.message
    raises_code("truncated", data[:2])


def test_clean_eof_is_closed():
    dec = FrameDecoder()
    dec.receive_data(b"")
    assert dec.eof
    assert dec.next_message() is CLOSED
    dec.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(RuntimeError):
        dec.receive_data(b"more")


def test_garbage_is_bad_msgpack():
    raises_code("bad_msgpack", struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    raises_code("bad_msgpack", struct.pack(">I", 6) + b"GARBAG")


def test_trailing_bytes_in_body_are_bad_msgpack():
    body = msgpack.packb({"type": "status", "id": 1}) + b"\xc0"
    raises_code("bad_msgpack", struct.pack(">I", len(body)) + body)


def test_invalid_utf8_is_bad_msgpack():
    body = b"\x81\xa4type\xa2\xff\xfe"
    raises_code("bad_msgpack", struct.pack(">I", len(body)) + body)


def test_ext_types_are_rejected():
    ts = msgpack.packb({"type": "status", "id": msgpack.Timestamp(1)}, datetime=False)
    raises_code("bad_msgpack", struct.pack(">I", len(ts)) + ts)
    empty_ext = b"\x82\xa4type\xa6status\xa2id\xc7\x00\x05"
    raises_code("bad_msgpack", struct.pack(">I", len(empty_ext)) + empty_ext)


def test_non_string_map_keys_are_bad_msgpack():
    raises_code("bad_msgpack", frame({1: 2}))


def test_body_not_a_map():
    err = raises_code("not_a_map", frame([1, 2, 3]))
    assert "list" in err.message


def test_error_is_sticky_and_earlier_frames_still_arrive():
    dec = FrameDecoder()
    dec.receive_data(encode(PUT) + frame({"type": "nope"}) + encode(PUT))
    assert dec.next_message() == PUT
    with pytest.raises(ProtocolError) as first:
        dec.next_message()
    with pytest.raises(ProtocolError) as again:
        dec.next_message()
    assert again.value is first.value
    with pytest.raises(ProtocolError):
        dec.receive_data(b"x")


# -- message validation -------------------------------------------------------------------


def test_unknown_type_names_it():
    err = raises_code("unknown_type", frame({"type": "launch_missiles", "id": 1}))
    assert "launch_missiles" in err.message and "put" in err.message


def test_missing_or_non_string_type():
    assert "type" in raises_code("bad_field", frame({"id": 1})).message
    raises_code("bad_field", frame({"type": 5}))


def test_missing_field_names_type_and_field():
    msg = {k: v for k, v in PUT.items() if k != "seq"}
    err = raises_code("bad_field", frame(msg))
    assert err.message.startswith("put:") and "'seq'" in err.message


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("seq", "3", "put.seq: expected int"),
        ("seq", True, "got bool"),
        ("seq", -1, "out of range"),
        ("value", "text", "put.value: expected bytes"),
        ("key", "", "put.key"),
        ("key", "k" * 1025, "1025 characters"),
        ("client_id", None, "put.client_id"),
    ],
)
def test_wrong_field_type(field, value, words):
    err = raises_code("bad_field", frame({**PUT, field: value}))
    assert words in err.message


def test_uint64_beyond_int64_is_rejected():
    err = raises_code("bad_field", frame({**PUT, "seq": 2**64 - 1}))
    assert "put.seq" in err.message


def test_unknown_field_is_rejected():
    err = raises_code("bad_field", frame({**PUT, "ttl": 5}))
    assert "unknown field" in err.message and "ttl" in err.message


def test_hello_peer_requires_node():
    hello = {"type": "hello", "role": "peer", "cluster": "c", "version": p.PROTOCOL_VERSION}
    assert "'node'" in raises_code("bad_field", frame(hello)).message
    assert decode_all(encode({**hello, "node": "n1"}))[0]["node"] == "n1"
    assert decode_all(encode({**hello, "role": "client"}))[0]["role"] == "client"
    assert "hello.role" in raises_code("bad_field", frame({**hello, "role": "boss"})).message


def test_reply_failure_requires_error():
    raises_code("bad_field", frame({"type": "reply", "id": 1, "ok": False}))
    msg = {"type": "reply", "id": 1, "ok": False, "error": {"code": "not_leader", "message": "ask n2"}, "leader": "n2"}
    assert decode_all(encode(msg)) == [msg]
    bad_error = {**msg, "error": {"code": "x", "message": "y", "extra": 1}}
    assert "reply.error" in raises_code("bad_field", frame(bad_error)).message


def test_fault_rules_and_defaults():
    raises_code("bad_field", frame({"type": "fault", "id": 1, "action": "latency"}))
    raises_code("bad_field", frame({"type": "fault", "id": 1, "action": "loss"}))
    raises_code("bad_field", frame({"type": "fault", "id": 1, "action": "loss", "rate": 1.5}))
    [got] = decode_all(frame({"type": "fault", "id": 1, "action": "loss", "rate": 1}))
    assert got == {"type": "fault", "id": 1, "action": "loss", "from": None, "to": None, "ms": 0, "rate": 1.0}
    assert type(got["rate"]) is float


def test_defaults_are_filled_in():
    [get] = decode_all(frame({"type": "get", "id": 1, "key": "k"}))
    assert get["consistency"] == "linearizable"
    [raft] = decode_all(frame({"type": "raft", "msg": raft_to_wire(rm.TimeoutNow("a", "b", 1))}))
    assert raft["group"] == 0


def test_status_update_depth_limit():
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    err = raises_code("bad_field", frame({"type": "status_update", "status": {"x": deep}}))
    assert "nested" in err.message
    raises_code("bad_field", frame({"type": "status_update", "status": [1]}))


def test_encode_validates():
    with pytest.raises(ProtocolError, match="bad_field"):
        encode({**PUT, "seq": 2**63})
    with pytest.raises(ProtocolError, match="unknown_type"):
        encode({"type": "bogus"})
    with pytest.raises(ProtocolError, match="not_a_map"):
        encode([("type", "status")])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="bad_field"):
        encode({**PUT, "key": "\ud800"})  # cannot be UTF-8 encoded
    with pytest.raises(ProtocolError, match="bad_field"):
        encode({"type": "reply", "id": 1, "ok": True, "result": {1: 2}})  # peer could not decode it
    with pytest.raises(ProtocolError, match="bad_field"):
        encode({"type": "reply", "id": 1, "ok": True, "result": 10**30})
    with pytest.raises(ProtocolError, match="frame_too_large"):
        encode({**PUT, "value": b"x" * 100}, max_frame=64)


@given(st.dictionaries(st.text(max_size=5), st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**65), st.floats(allow_nan=False),
    st.binary(max_size=8), st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.integers(), st.integers(), max_size=1)), max_size=4),
    st.integers(min_value=-1, max_value=2**64))
@example({}, -1)
@example({}, 2**63)
@example({"index": 2**64}, 1)
@example({"x": [1]}, 1)
@example({"x": {1: 2}}, 1)
def test_a_write_reply_encodes_as_the_schema_says(result, rid):
    """An ok reply with a flat result skips the schema walk (``_plain_ok_reply``): it
    must accept exactly what the walk accepts, and decode to the same message."""
    msg = {"type": "reply", "id": rid, "ok": True, "result": result}
    try:
        expected = p._validate(msg, encoding=True)
        body = msgpack.packb(expected, use_bin_type=True)
    except (ProtocolError, ValueError, TypeError, OverflowError):
        with pytest.raises(ProtocolError):
            encode(msg)
        return
    assert decode_all(encode(msg)) == decode_all(p._HEADER.pack(len(body)) + body)


def test_encode_accepts_bytearray_and_tuples():
    msg = {**PUT, "value": bytearray(b"v")}
    assert decode_all(encode(msg)) == [PUT]
    fault = {"type": "fault", "id": 1, "action": "partition", "from": ("a",), "to": ("b", "c")}
    [got] = decode_all(encode(fault))
    assert got["from"] == ["a"] and got["to"] == ["b", "c"]


def test_protocol_error_to_message_is_a_valid_error():
    err = ProtocolError("bad_field", "put.seq: expected int")
    expected = {"type": "error", "code": "bad_field", "message": "put.seq: expected int", "id": 4}
    assert decode_all(encode(err.to_message(id=4))) == [expected]


def test_every_request_has_an_id_and_a_role():
    for name, spec in MESSAGE_SCHEMAS.items():
        if spec.category == "request":
            assert spec.fields["id"].required, name
            assert spec.role in ("viewer", "operator", "admin"), name


def test_every_message_type_is_documented():
    text = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    for name in MESSAGE_SCHEMAS:
        assert f"`{name}`" in text, name
    for tag in p.RAFT_KINDS:
        assert f"`{tag}`" in text, tag


# -- Raft messages ------------------------------------------------------------------------


def test_every_raft_dataclass_has_a_complete_record():
    records = {rec.cls: rec for rec in p.RAFT_KINDS.values()}
    assert set(records) == set(rm.MESSAGE_TYPES)
    nested = [rm.Snapshot, rm.SnapshotMeta, rm.ConfState]
    for cls in rm.MESSAGE_TYPES:
        attrs = {f.attr for f in records[cls].fields.values()}
        assert attrs == {f.name for f in dataclasses.fields(cls)}, cls
    for rec, cls in zip([p._SNAPSHOT, p._SNAPSHOT.fields["m"].kind, p._CONF], nested):
        assert {f.attr for f in rec.fields.values()} == {f.name for f in dataclasses.fields(cls)}


def test_raft_wire_is_compact():
    wire = raft_to_wire(rm.RequestVote("n1", "n2", 5, 10, 4))
    assert wire == {"k": "rv", "f": "n1", "to": "n2", "t": 5, "li": 10, "lt": 4}
    ae = rm.AppendEntries("n1", "n2", 3, 0, 0, (rm.Entry(1, 1, b"a"), rm.Entry(3, 2, b"", rm.EntryKind.CONF_CHANGE)), 1)
    assert raft_to_wire(ae)["e"] == [[1, 1, 0, b"a"], [3, 2, 1, b""]]


def _ae(**over: Any) -> dict[str, Any]:
    wire = raft_to_wire(rm.AppendEntries("a", "b", 5, 3, 2, (rm.Entry(2, 4), rm.Entry(5, 5)), 4))
    return {**wire, **over}


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (_ae(e=[[2, 4, 0, b""], [5, 6, 0, b""]]), "does not follow 4"),
        (_ae(e=[[1, 4, 0, b""]]), "below the previous entry's term"),
        (_ae(e=[[6, 4, 0, b""]]), "above the message's term"),
        (_ae(e=[[2, 4, 0]]), "[term, index, kind, data]"),
        (_ae(e=[[2, 4, 9, b""]]), "not a known EntryKind"),
        (_ae(e=[[2, 4, 0, "text"]]), "entries[0].data"),
        (_ae(t=-1), "raft.msg(AppendEntries).term"),
        (_ae(c=True), "got bool"),
        (_ae(zz=1), "unknown field"),
        ({**_ae(), "k": "zz"}, "unknown Raft message kind"),
        ({"f": "a"}, "unknown Raft message kind"),
        ({"k": "tn", "f": "a", "to": "b"}, "missing required field 't'"),
        ({"k": "tn", "f": "", "to": "b", "t": 1}, "raft.msg(TimeoutNow).frm"),
    ],
)
def test_raft_decode_errors(wire, words):
    with pytest.raises(ProtocolError) as info:
        raft_from_wire(wire)
    assert info.value.code == "bad_field" and words in info.value.message
    err = raises_code("bad_field", frame({"type": "raft", "msg": wire}))
    assert words in err.message


def _snapshot_wire(conf: dict[str, Any]) -> dict[str, Any]:
    return {"k": "is", "f": "a", "to": "b", "t": 2, "s": {"m": {"i": 5, "t": 1, "c": conf}, "d": b""}}


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        ({"v": ["a", "a"]}, "listed twice"),
        ({"v": ["a"], "l": ["a"]}, "both a voter and a learner"),
        ({"v": ["a"], "p": [["a", 1], ["a", 2]]}, "two priorities"),
        ({"v": ["a"], "p": [["a", -1]]}, "out of range"),
        ({"v": ["a"], "p": [["a"]]}, "[node, priority]"),
        ({}, "missing required field 'v'"),
    ],
)
def test_conf_state_errors(conf, words):
    with pytest.raises(ProtocolError, match="bad_field") as info:
        raft_from_wire(_snapshot_wire(conf))
    assert words in info.value.message


def test_raft_to_wire_rejects_invalid_dataclasses():
    with pytest.raises(ProtocolError):
        raft_to_wire(rm.AppendEntries("a", "b", 1, 0, 0, (rm.Entry(1, 5),), 0))
    with pytest.raises(ProtocolError):
        raft_to_wire(rm.RequestVote("a", "b", -1, 0, 0))
    with pytest.raises(ProtocolError):
        raft_to_wire(rm.AppendEntries("a", "b", 1, 0, 0, ("junk",), 0))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        raft_to_wire(rm.HardState())  # type: ignore[arg-type]


def test_raft_frame_accepts_wire_map_and_revalidates_it():
    msg = rm.Heartbeat("a", "b", 3, 2, b"ctx")
    assert decode_all(encode({"type": "raft", "msg": raft_to_wire(msg)}))[0]["msg"] == msg
    with pytest.raises(ProtocolError):
        encode({"type": "raft", "msg": {**raft_to_wire(msg), "t": "x"}})


# -- strategies ---------------------------------------------------------------------------

nodes = st.text(min_size=1, max_size=10)
uints = st.one_of(st.integers(0, 50), st.integers(0, p.INT64_MAX))
small_bytes = st.binary(max_size=40)


@st.composite
def conf_states(draw) -> rm.ConfState:
    members = draw(st.lists(nodes, min_size=1, max_size=6, unique=True))
    split = draw(st.integers(0, len(members)))
    prios = draw(st.dictionaries(st.sampled_from(members), st.integers(0, 10)))
    return rm.ConfState.of(members[:split], members[split:], prios)


snapshots = st.builds(
    rm.Snapshot,
    st.builds(rm.SnapshotMeta, uints, uints, conf_states()),
    small_bytes,
)
entry_kinds = st.sampled_from(list(rm.EntryKind))


@st.composite
def append_entries(draw) -> rm.AppendEntries:
    term = draw(st.integers(0, 1000))
    prev_term = draw(st.integers(0, term))
    prev_index = draw(uints.filter(lambda i: i < p.INT64_MAX - 10))
    entries, t = [], prev_term
    for i in range(draw(st.integers(0, 5))):
        t = draw(st.integers(t, term))
        entries.append(rm.Entry(t, prev_index + 1 + i, draw(small_bytes), draw(entry_kinds)))
    return rm.AppendEntries(draw(nodes), draw(nodes), term, prev_index, prev_term, tuple(entries), draw(uints))


raft_messages = st.one_of(
    st.builds(rm.RequestVote, nodes, nodes, uints, uints, uints, st.booleans(), st.booleans()),
    st.builds(rm.RequestVoteResponse, nodes, nodes, uints, st.booleans(), st.booleans()),
    append_entries(),
    st.builds(rm.AppendEntriesResponse, nodes, nodes, uints, st.booleans(), uints, uints, uints),
    st.builds(rm.InstallSnapshot, nodes, nodes, uints, snapshots),
    st.builds(rm.Heartbeat, nodes, nodes, uints, uints, small_bytes),
    st.builds(rm.HeartbeatResponse, nodes, nodes, uints, small_bytes, small_bytes),
    st.builds(rm.TimeoutNow, nodes, nodes, uints),
    st.builds(rm.ReadIndexRequest, nodes, nodes, uints, small_bytes),
    st.builds(rm.ReadIndexResponse, nodes, nodes, uints, small_bytes, uints),
)

plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(p.INT64_MIN, p.UINT64_MAX)
    | st.floats(allow_nan=False) | st.text(max_size=10) | small_bytes,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def from_kind(kind: p.Kind) -> st.SearchStrategy:
    """A strategy of valid Python values for one field kind of the schema table."""
    if isinstance(kind, p.Bool):
        return st.booleans()
    if isinstance(kind, p.Int):
        return st.integers(kind.lo, kind.hi)
    if isinstance(kind, p.Float):
        return st.floats(kind.lo, kind.hi)
    if isinstance(kind, p.Str):
        if kind.choices:
            return st.sampled_from(kind.choices)
        return st.text(min_size=kind.min_len, max_size=min(kind.max_len, 12))
    if isinstance(kind, p.Bytes):
        return small_bytes
    if isinstance(kind, p.Nullable):
        return st.none() | from_kind(kind.inner)
    if isinstance(kind, p.ListOf):
        return st.lists(from_kind(kind.item), max_size=4)
    if isinstance(kind, p.AnyValue):
        return st.dictionaries(st.text(max_size=6), plain_values, max_size=4) if kind.map_only else plain_values
    if isinstance(kind, p.Struct):
        return fields_of(kind.fields)
    if isinstance(kind, p._RaftKind):
        return raft_messages
    raise AssertionError(f"no strategy for {kind!r}")


def fields_of(fields: dict[str, p.Field]) -> st.SearchStrategy:
    required = {k: from_kind(f.kind) for k, f in fields.items() if f.required}
    optional = {k: from_kind(f.kind) for k, f in fields.items() if not f.required}
    return st.fixed_dictionaries(required, optional=optional)


def satisfies_rules(msg: dict[str, Any]) -> bool:
    spec = MESSAGE_SCHEMAS[msg["type"]]
    return all(msg.get(f) != v or all(n in msg for n in needed) for f, v, needed in spec.required_when)


@st.composite
def messages(draw) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(MESSAGE_SCHEMAS)))
    body = draw(fields_of(MESSAGE_SCHEMAS[name].fields))
    msg = {"type": name, **body}
    assume(satisfies_rules(msg))
    return msg


def with_defaults(msg: dict[str, Any]) -> dict[str, Any]:
    """What the decoder should return for ``msg``: absent optional fields get defaults."""
    spec = MESSAGE_SCHEMAS[msg["type"]]
    out = dict(msg)
    for key, f in spec.fields.items():
        if key not in out and f.default is not p._ABSENT:
            out[key] = f.default
    return out


def only_allowed_outcomes(data: bytes, cuts: list[int], max_frame: int = DEFAULT_MAX_FRAME) -> list[dict]:
    """Decode ``data``; anything but messages, signals or ProtocolError fails the test.
    Every decoded message must re-encode (what we accept, we could have sent)."""
    try:
        msgs = decode_all(data, cuts, max_frame=max_frame)
    except ProtocolError as e:
        assert e.code in p.ERROR_CODES
        return []
    for m in msgs:
        assert isinstance(m, dict) and m["type"] in MESSAGE_SCHEMAS
        encode(m)
    return msgs


# -- properties ---------------------------------------------------------------------------


@FAST
@given(raft_messages)
def test_raft_round_trip(msg):
    wire = raft_to_wire(msg)
    assert raft_from_wire(wire) == msg
    assert raft_from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True), raw=False)) == msg


@FAST
@given(st.lists(messages(), min_size=1, max_size=4), st.lists(st.integers(0, 2000), max_size=6))
def test_message_round_trip(msgs, cuts):
    data = b"".join(encode(m) for m in msgs)
    assert decode_all(data, cuts) == [with_defaults(m) for m in msgs]


@FAST
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=4))
def test_arbitrary_bytes_only_raise_protocol_error(data, cuts):
    only_allowed_outcomes(data, cuts)


@FAST
@given(st.binary(max_size=200), st.integers(1, 300))
def test_arbitrary_bodies_only_raise_protocol_error(body, max_frame):
    only_allowed_outcomes(struct.pack(">I", len(body)) + body if body else b"", [], max_frame=max_frame)


@FAST
@given(
    st.sampled_from(sorted(MESSAGE_SCHEMAS)),
    st.dictionaries(
        st.sampled_from(sorted({k for s in MESSAGE_SCHEMAS.values() for k in s.fields} | {"k", "zz"})),
        plain_values,
        max_size=6,
    ),
)
def test_arbitrary_maps_only_raise_protocol_error(name, fields):
    only_allowed_outcomes(frame({"type": name, **fields}), [])


def _mutations() -> st.SearchStrategy:
    flip = st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255))
    insert = st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255))
    delete = st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0))
    return st.lists(flip | insert | delete, min_size=1, max_size=4)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, at, val in edits:
        i = at % (len(buf) + 1)
        if op == "insert":
            buf.insert(i, val)
        elif buf and i < len(buf):
            if op == "flip":
                buf[i] ^= val
            else:
                del buf[i]
    return bytes(buf)


@FAST
@given(st.lists(messages(), min_size=1, max_size=3), _mutations())
def test_mutated_frames_only_raise_protocol_error(msgs, edits):
    data = b"".join(encode(m) for m in msgs)
    only_allowed_outcomes(_mutate(data, edits), [])


def _locations(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every place inside a decoded wire map: paths of dict keys and list indexes."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _locations(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _locations(v, (*path, i))
    return out


tricky_values = st.sampled_from(
    [None, True, 0, -1, 2**63, 2**64 - 1, 1.5, float("inf"), "", "x", b"", b"x", [], [1], [[1, 2]], {}, {"k": 1}]
)


def _mutate_at(wire: dict, path: tuple, op: str, value: Any) -> None:
    *parents, last = path
    container = wire
    for step in parents:
        container = container[step]
    if op == "drop":
        del container[last]
    elif op == "replace":
        container[last] = value
    elif isinstance(container[last], list):
        container[last].append(value)
    elif isinstance(container[last], dict):
        container[last]["extra"] = value
    else:
        container[last] = value


any_frame_message = st.one_of(messages(), st.builds(lambda m: {"type": "raft", "msg": m}, raft_messages))


@FAST
@given(any_frame_message, st.data())
def test_mutated_fields_only_raise_protocol_error(msg, data):
    """Structure-aware mutation: at any depth, replace, drop or grow one to three values."""
    wire = msgpack.unpackb(encode(msg)[4:], raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        places = _locations(wire)[1:]
        if not places:
            break
        path = data.draw(st.sampled_from(places))
        op = data.draw(st.sampled_from(["replace", "drop", "grow"]))
        _mutate_at(wire, path, op, copy.deepcopy(data.draw(tricky_values | plain_values)))
    only_allowed_outcomes(frame(wire), [])


_RAFT_STRATEGIES = [append_entries(), st.builds(rm.InstallSnapshot, nodes, nodes, uints, snapshots), raft_messages]
nested_raft = st.sampled_from(range(len(_RAFT_STRATEGIES))).flatmap(lambda i: _RAFT_STRATEGIES[i])


@FAST
@given(nested_raft, st.data())
def test_mutated_raft_maps_only_raise_protocol_error(msg, data):
    """raft_from_wire on a mutated map: a Raft message that re-encodes, or ProtocolError."""
    wire = {"m": msgpack.unpackb(msgpack.packb(raft_to_wire(msg), use_bin_type=True), raw=False)}
    for _ in range(data.draw(st.integers(1, 3))):
        places = _locations(wire)[2:]
        if not places:
            break
        path = data.draw(st.sampled_from(places))
        op = data.draw(st.sampled_from(["replace", "drop", "grow"]))
        _mutate_at(wire, path, op, copy.deepcopy(data.draw(tricky_values | plain_values)))
    try:
        got = raft_from_wire(wire["m"])
    except ProtocolError as e:
        assert e.code == "bad_field"
        return
    raft_to_wire(got)


# -- exhaustive single mutations of one full sample per type ------------------------------

CONF = rm.ConfState.of(["a", "b"], ["c"], {"a": 3})
RAFT_SAMPLES: list[rm.Message] = [
    rm.RequestVote("a", "b", 5, 10, 4, pre_vote=True, transfer=True),
    rm.RequestVoteResponse("b", "a", 5, True, pre_vote=True),
    rm.AppendEntries("a", "b", 5, 3, 2, (rm.Entry(2, 4, b"x"), rm.Entry(5, 5, b"", rm.EntryKind.CONF_CHANGE)), 4),
    rm.AppendEntriesResponse("b", "a", 5, False, 3, hint_index=2, hint_term=1),
    rm.InstallSnapshot("a", "b", 5, rm.Snapshot(rm.SnapshotMeta(9, 4, CONF), b"state")),
    rm.Heartbeat("a", "b", 5, 4, b"ctx"),
    rm.HeartbeatResponse("b", "a", 5, b"ctx", b"load"),
    rm.TimeoutNow("a", "b", 5),
    rm.ReadIndexRequest("b", "a", 5, b"ctx"),
    rm.ReadIndexResponse("a", "b", 5, b"ctx", 9),
]
ERR = {"code": "not_leader", "message": "leader is n2"}
SAMPLES: list[dict[str, Any]] = [
    {"type": "hello", "role": "peer", "cluster": "c", "version": 1, "node": "n1", "client_id": "x"},
    {"type": "hello_ok", "node": "n1", "version": 1, "leader": "n2"},
    {"type": "error", "code": "bad_field", "message": "m", "id": 3},
    *({"type": "raft", "group": 0, "msg": m} for m in RAFT_SAMPLES),
    {"type": "status", "id": 1},
    {"type": "subscribe", "id": 1, "interval_ms": 250},
    {"type": "subscribe", "id": 2, "interval_ms": 250, "delta": True},
    {"type": "unsubscribe", "id": 1},
    {"type": "get", "id": 1, "key": "k", "consistency": "stale"},
    PUT,
    {"type": "delete", "id": 1, "key": "k", "client_id": "c", "seq": 2, "forward": True},
    {"type": "register", "id": 1, "client_id": "c", "forward": False, "as_role": "viewer"},
    {"type": "whoami", "id": 1},
    {"type": "cas", "id": 1, "key": "k", "expected": b"a", "value": b"b", "client_id": "c", "seq": 2, "forward": False},
    {"type": "transfer", "id": 1, "to": "n2"},
    {"type": "add_node", "id": 1, "node": "n6", "host": "10.0.0.6", "port": 7400, "priority": 1, "learner": True},
    {"type": "remove_node", "id": 1, "node": "n6"},
    {"type": "fault", "id": 1, "action": "loss", "from": ["a"], "to": ["b"], "ms": 5, "rate": 0.5, "duration_ms": 1000},
    {"type": "heal", "id": 1},
    {"type": "submit", "id": 1, "client_id": "c", "seq": 2, "forward": False,
     "tasks": [{"id": "t1", "kind": "sleep", "args": {"ms": 5}, "timeout_ms": 1000,
                "max_attempts": 3, "policy": "hash", "key": "k"}]},
    {"type": "task_get", "id": 1, "task": "t1"},
    {"type": "dump", "id": 1, "limit": 10, "prefix": "user/", "after": "user/0042"},
    {"type": "backup", "id": 1, "backup": "a1b2", "offset": 1048576, "consistency": "linearizable"},
    {"type": "task_list", "id": 1, "state": "running", "node": "n1", "limit": 10, "after": "t0"},
    {"type": "task_wait", "id": 1, "ids": ["t1", "t2"], "timeout_ms": 500},
    {"type": "task_cancel", "id": 1, "task": "t1", "client_id": "c", "seq": 3, "forward": True},
    {"type": "task_report", "id": 1, "event": "complete", "task": "t1", "attempt": 1, "node": "n2",
     "outcome": "failed", "exit_code": 3, "stdout": b"o", "stderr": b"e", "error": "x", "ts": 5},
    {"type": "reply", "id": 1, "ok": False, "result": {"a": [1, b"x"]}, "error": ERR, "leader": "n2"},
    {"type": "status_update", "status": {"node": "n1", "peers": [{"match": 3}]}, "id": 1},
    {"type": "status_update", "status": {"set": {"commit": 4}}, "id": 2, "delta": True},
]
MUTANTS = [None, True, 0, -1, 2**63, 2**64 - 1, 1.5, "", "x", b"", b"x", [], [1], [[1, 2]], {}, {"k": 1}]


def test_samples_cover_every_type():
    assert {m["type"] for m in SAMPLES} == set(MESSAGE_SCHEMAS)
    assert {type(m) for m in RAFT_SAMPLES} == set(rm.MESSAGE_TYPES)
    for m in SAMPLES:
        assert decode_all(encode(m)) == [m]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda m: m["type"] + "/" + type(m.get("msg")).__name__)
def test_every_single_mutation_only_raises_protocol_error(sample):
    """Drop, grow, or replace (with each of MUTANTS) every value at every depth."""
    wire = msgpack.unpackb(encode(sample)[4:], raw=False)
    for path in _locations(wire)[1:]:
        variants = [("drop", None), ("grow", 1)] + [("replace", v) for v in MUTANTS]
        for op, value in variants:
            mutated = copy.deepcopy(wire)
            _mutate_at(mutated, path, op, copy.deepcopy(value))
            only_allowed_outcomes(frame(mutated), [])


# -- the fast paths agree with the checks they skip ------------------------------------------


def _all_kinds() -> list[p.Kind]:
    """Every field kind of the message and Raft tables, nested ones included."""
    seen: list[p.Kind] = []
    todo: list[p.Kind] = [f.kind for spec in MESSAGE_SCHEMAS.values() for f in spec.fields.values()]
    todo += list(p.RAFT_KINDS.values())
    while todo:
        k = todo.pop()
        if any(k is s for s in seen):
            continue
        seen.append(k)
        if isinstance(k, (p.Struct, p._Record)):
            todo += [f.kind for f in k.fields.values()]
        elif isinstance(k, p.Nullable):
            todo.append(k.inner)
        elif isinstance(k, p.ListOf):
            todo.append(k.item)
    return seen


_KINDS = _all_kinds()
EDGES = [None, True, False, 0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**63) - 1,
         0.0, 1.5, 1e300, float("inf"), float("nan"), "", "x", "running", "nope", "a" * 128, "a" * 129,
         "a" * 1024, "a" * 1025, b"", b"x", b"x" * 4096, b"x" * 4097, bytearray(b"x"), memoryview(b"x"),
         rm.EntryKind.NORMAL, [], [1], {}, {"k": 1}]


def _check_same(kind: p.Kind, value: Any) -> None:
    if not kind.same(value):
        return
    for fn in (kind.decode, kind.encode):
        got = fn(value, "f")
        assert type(got) is type(value) and got == value, (kind, value, got)


def test_a_kind_says_same_only_for_values_decode_and_encode_keep():
    """``Kind.same(v)`` lets ``_check_map`` skip decode/encode: it must hold only where
    both would return ``v`` unchanged (same value, same type) without raising. Every kind
    of the tables against every edge value."""
    for kind in _KINDS:
        for value in EDGES:
            _check_same(kind, value)
    for kind in _KINDS:  # and each kind's own choices and bounds
        for attr in ("choices",):
            for c in getattr(kind, attr, ()):
                _check_same(kind, c)
                _check_same(kind, c + "x")


@FAST
@given(st.sampled_from(range(len(_KINDS))), tricky_values | plain_values)
def test_a_kind_says_same_only_for_values_decode_and_encode_keep_random(i, value):
    _check_same(_KINDS[i], value)


def test_same_is_used_for_the_scalars_of_hot_messages():
    """The fast path is live: the fields of an append response and a put are all scalars
    whose ``same`` holds (so a bug that made it always False would show here)."""
    aer = p.RAFT_KINDS["aer"]
    wire = raft_to_wire(rm.AppendEntriesResponse(frm="a", to="b", term=2, success=True, index=9))
    assert all(aer.fields[k].kind.same(v) for k, v in wire.items() if k != "k")
    put = MESSAGE_SCHEMAS["put"].fields
    req = {"id": 1, "key": "k", "value": b"v", "client_id": "c", "seq": 2}
    assert all(put[k].kind.same(v) for k, v in req.items())


def _check_entry(entry: Any) -> None:
    kind = p._EntriesKind()
    try:
        want = (kind._entry(entry, "e[0]"),)
    except ProtocolError as e:
        with pytest.raises(ProtocolError) as got:
            kind.decode([entry], "e")
        assert got.value.message == e.message
        return
    got = kind.decode([entry], "e")
    assert got == want and type(got[0].kind) is rm.EntryKind
    # and back: the inline encoder gives the wire form the full one would
    assert kind.encode(got, "e") == [[want[0].term, want[0].index, int(want[0].kind), want[0].data]]


def test_the_inline_entry_check_agrees_with_the_full_one():
    """``_EntriesKind.decode`` checks a well-formed entry inline and sends everything else
    to ``_entry``: the result (or the error) must be the one ``_entry`` gives. Every
    combination of edge values per position."""
    terms = [0, 5, -1, 2**63 - 1, 2**63, True, 1.5]
    indexes = [0, 1, -1, 2**63 - 1, 2**63, True, 2.0]
    kinds = [0, 1, 2, 99, -1, True, "0", rm.EntryKind.NORMAL]
    datas = [b"", b"x", "x", bytearray(b"x"), None]
    for e in itertools.product(terms, indexes, kinds, datas):
        _check_entry(list(e))
    for e in ([1, 1, 0], [1, 1, 0, b"", b""], (1, 1, 0, b""), None, b"x"):
        _check_entry(e)


@FAST
@given(st.lists(tricky_values | plain_values, min_size=4, max_size=4) | tricky_values)
def test_the_inline_entry_check_agrees_with_the_full_one_random(entry):
    _check_entry(entry)
