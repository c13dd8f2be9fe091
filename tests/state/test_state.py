"""Tests of the replicated state machine (nodeagent/state.py)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import nodeagent.state as state_mod
from nodeagent.raft.messages import ConfChange, ConfChangeOp, ConfState, Entry, EntryKind
from nodeagent.state import (
    ERR_BAD_COMMAND,
    ERR_BAD_CONF_CHANGE,
    ERR_SESSION_EXPIRED,
    ERR_STALE_SEQ,
    MAX_KEY_BYTES,
    ApplyResult,
    CommandError,
    StateError,
    StateMachine,
    decode_command,
    diff_replicas,
    encode_command,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def put(key, value, client=None, seq=None):
    return encode_command("put", key=key, value=value, client=client, seq=seq)


def delete(key, client=None, seq=None):
    return encode_command("delete", key=key, client=client, seq=seq)


def cas(key, expected, value, client=None, seq=None):
    return encode_command("cas", key=key, expected=expected, value=value, client=client, seq=seq)


def run(entries, sm=None, start=1):
    """Apply ``entries`` at consecutive indexes; return (machine, results)."""
    sm = sm or StateMachine()
    results = [sm.apply(i, data) for i, data in enumerate(entries, start=start)]
    return sm, results


# -- encoding -----------------------------------------------------------------------------


def test_encoding_is_a_canonical_msgpack_map():
    data = encode_command("put", value=b"v", key="k", seq=3, client="c1")
    assert data == encode_command("put", client="c1", seq=3, key="k", value=b"v")
    assert msgpack.unpackb(data, raw=False) == {"client": "c1", "key": "k", "op": "put", "seq": 3, "value": b"v"}
    # keys in sorted order, bytes as bin, strings as str
    assert data == msgpack.packb(
        {"client": "c1", "key": "k", "op": "put", "seq": 3, "value": b"v"}, use_bin_type=True
    )
    assert list(msgpack.unpackb(data, raw=False)) == ["client", "key", "op", "seq", "value"]
    assert encode_command("noop") == msgpack.packb({"op": "noop"})
    cas_map = {"op": "cas", "key": "k", "expected": None, "value": b"x"}
    assert msgpack.unpackb(cas("k", None, b"x"), raw=False) == cas_map


def test_decode_round_trip():
    cmd = decode_command(cas("k", b"old", b"new", client="c", seq=9))
    assert (cmd.op, cmd.client, cmd.seq) == ("cas", "c", 9)
    assert dict(cmd.args) == {"key": "k", "expected": b"old", "value": b"new"}
    assert decode_command(delete("k")).client is None


@pytest.mark.parametrize(
    "op, fields",
    [
        ("frobnicate", {}),
        ("put", {"key": "k"}),
        ("put", {"key": "k", "value": "not bytes"}),
        ("put", {"key": "", "value": b""}),
        ("put", {"key": "k" * (MAX_KEY_BYTES + 1), "value": b""}),
        ("put", {"key": 7, "value": b""}),
        ("put", {"key": "k", "value": b"", "ttl": 5}),
        ("put", {"key": "k", "value": b"", "client": "c"}),
        ("put", {"key": "k", "value": b"", "seq": 1}),
        ("put", {"key": "k", "value": b"", "client": "c", "seq": 0}),
        ("put", {"key": "k", "value": b"", "client": "c", "seq": True}),
        ("put", {"key": "k", "value": b"", "client": "", "seq": 1}),
        ("cas", {"key": "k", "value": b""}),
        ("delete", {"key": "\udc80"}),
    ],
)
def test_encode_rejects_invalid_commands(op, fields):
    with pytest.raises(CommandError):
        encode_command(op, **fields)


# -- applying -----------------------------------------------------------------------------


def test_put_get_delete_and_results():
    sm, res = run([put("a", b"1"), put("a", b"2"), put("b", b"3"), delete("a"), delete("zz")])
    assert res == [
        ApplyResult(True),
        ApplyResult(True, prev=b"1"),
        ApplyResult(True),
        ApplyResult(True, prev=b"2"),
        ApplyResult(True, prev=None),
    ]
    assert sm.get("a") is None and sm.get("b") == b"3"
    assert sm.keys() == ["b"] and sm.dump() == {"b": b"3"}
    assert sm.applied_index == 5


def test_cas_outcomes_are_results_not_errors():
    sm, res = run(
        [
            cas("k", None, b"1"),  # absent as expected
            cas("k", None, b"2"),  # present: mismatch, returns current
            cas("k", b"x", b"2"),  # wrong expectation
            cas("k", b"1", b"2"),  # right expectation
            cas("gone", b"1", b"2"),  # absent key, expected a value
        ]
    )
    assert res == [
        ApplyResult(True),
        ApplyResult(False, value=b"1"),
        ApplyResult(False, value=b"1"),
        ApplyResult(True, prev=b"1"),
        ApplyResult(False, value=None),
    ]
    assert all(r.error is None for r in res)
    assert sm.dump() == {"k": b"2"}


def test_empty_entry_only_advances_the_index():
    sm, _ = run([put("a", b"1")])
    before = sm.snapshot()
    assert sm.apply(2, b"") == ApplyResult(True)
    assert sm.applied_index == 2
    other, _ = run([put("a", b"1")])
    other.apply(2, encode_command("noop"))
    assert sm.snapshot() == other.snapshot() != before


def test_indexes_must_strictly_increase():
    sm, _ = run([put("a", b"1"), put("a", b"2")])
    snap = sm.snapshot()
    for bad in (2, 1, 0, -1):
        with pytest.raises(ValueError):
            sm.apply(bad, put("a", b"3"))
        with pytest.raises(ValueError):
            sm.apply_conf_change(bad, b"")
    with pytest.raises(TypeError):
        sm.apply(3.0, b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sm.apply(3, "text")  # type: ignore[arg-type]
    assert sm.snapshot() == snap  # a refused call changes nothing
    sm.apply(10, b"")  # gaps are allowed: strictly increasing is the rule
    assert sm.applied_index == 10


def _ext_command():
    return msgpack.packb({"op": "put", "key": "k", "value": msgpack.ExtType(5, b"x")}, use_bin_type=True)


MALFORMED = [
    b"\xc1",  # never-used msgpack byte
    b"\x92\x01",  # truncated array
    encode_command("noop") + b"\x00",  # trailing data
    msgpack.packb([1, 2, 3]),
    msgpack.packb("put"),
    msgpack.packb({"op": "frobnicate"}),
    msgpack.packb({"op": 7}),
    msgpack.packb({"key": "k"}),
    msgpack.packb({"op": "put", "key": "k"}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": "str"}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": b"k", "value": b"v"}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "extra": 1}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", b"bin-key": 1, "zz": 2}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "client": "c"}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "client": "c", "seq": 0}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "client": "c", "seq": -3}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "client": "c", "seq": 1.0}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "client": "c", "seq": True}, use_bin_type=True),
    msgpack.packb({"op": "put", "key": "k", "value": b"v", "client": 5, "seq": 1}, use_bin_type=True),
    msgpack.packb({1: "noop"}, strict_types=False),
    b"\xa2\xff\xfe",  # invalid UTF-8 string
    b"\x91" * 5000,  # deep nesting
    _ext_command(),
]


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_commands_are_deterministic_error_results(data):
    outcomes = []
    for _ in range(2):  # two replicas
        sm, _ = run([put("a", b"1", client="c", seq=1)])
        res = sm.apply(2, data)
        assert res.ok is False and res.error == ERR_BAD_COMMAND and res.detail
        assert sm.applied_index == 2
        outcomes.append((res, sm.snapshot(), sm.digest()))
    assert outcomes[0] == outcomes[1]
    # nothing but the index moved: same state as applying an empty entry
    ref, _ = run([put("a", b"1", client="c", seq=1), b""])
    assert outcomes[0][1] == ref.snapshot()


@FAST
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(data):
    a, b = StateMachine(), StateMachine()
    ra, rb = a.apply(1, data), b.apply(1, data)
    assert ra == rb and a.digest() == b.digest() == a.digest_full()
    assert a.applied_index == 1


# -- client sessions ----------------------------------------------------------------------


def test_retry_of_the_last_seq_returns_the_cached_result_and_applies_once():
    sm, res = run(
        [
            cas("ctr", None, b"1", client="c", seq=1),
            cas("ctr", None, b"1", client="c", seq=1),  # retry: not applied again
        ]
    )
    # a second application would have been a CAS mismatch; the retry sees the first result
    assert res == [ApplyResult(True), ApplyResult(True)]
    sess = sm.session("c")
    assert (sess.seq, sess.index) == (1, 1)  # the retry did not touch the session


def test_retry_after_other_writes_is_not_reapplied():
    sm, res = run(
        [
            put("k", b"a", client="c", seq=1),
            put("k", b"b", client="c", seq=2),
            put("k", b"z", client="other", seq=1),
            put("k", b"b", client="c", seq=2),  # duplicate of the last: cached
            put("k", b"a", client="c", seq=1),  # older: stale
        ]
    )
    assert res[3] == res[1] == ApplyResult(True, prev=b"a")
    assert res[4].ok is False and res[4].error == ERR_STALE_SEQ
    assert sm.get("k") == b"z"
    assert sm.session("c").seq == 2


def test_same_seq_with_different_content_returns_the_cached_result():
    sm, res = run([put("k", b"a", client="c", seq=1), delete("k", client="c", seq=1)])
    assert res[1] == res[0] and sm.get("k") == b"a"


def test_seq_gaps_are_allowed_and_sessionless_commands_always_apply():
    sm, res = run(
        [
            put("k", b"1", client="c", seq=1),
            put("k", b"2", client="c", seq=5),
            put("k", b"3", client="c", seq=3),
            put("n", b"1"),
            put("n", b"1"),
        ]
    )
    assert res[1].ok and res[2].error == ERR_STALE_SEQ
    assert res[4] == ApplyResult(True, prev=b"1")  # applied again
    assert sm.get("k") == b"2"


def test_unknown_client_must_start_at_seq_1():
    sm, res = run([put("k", b"1", client="new", seq=4)])
    assert res[0].error == ERR_SESSION_EXPIRED and sm.get("k") is None
    assert sm.session("new") is None


def test_results_of_malformed_entries_do_not_touch_sessions():
    sm, _ = run([put("k", b"1", client="c", seq=1)])
    bad = msgpack.packb({"op": "put", "key": "k", "client": "c", "seq": 2}, use_bin_type=True)
    assert sm.apply(2, bad).error == ERR_BAD_COMMAND
    assert sm.session("c").seq == 1
    assert sm.apply(3, put("k", b"2", client="c", seq=2)).ok


def test_session_eviction_is_least_recently_applied():
    sm = StateMachine(max_sessions=3)
    run([put("k", b"a", client=c, seq=1) for c in "abc"], sm)  # indexes 1..3
    sm.apply(4, put("k", b"a2", client="a", seq=2))  # a is now the most recent
    sm.apply(5, b"")
    sm.apply(6, put("k", b"d", client="d", seq=1))  # evicts b (index 2)
    assert [s.client for s in sm.sessions()] == ["c", "a", "d"]
    assert [s.index for s in sm.sessions()] == [3, 4, 6]
    assert sm.session("b") is None
    # b lost its session: a later seq can no longer be checked for duplication
    assert sm.apply(7, put("k", b"b2", client="b", seq=2)).error == ERR_SESSION_EXPIRED
    # a duplicate of a live session is not an application and evicts nothing
    assert sm.apply(8, put("k", b"a2", client="a", seq=2)).ok
    assert [s.client for s in sm.sessions()] == ["c", "a", "d"]


session_histories = st.lists(
    st.tuples(st.sampled_from("abcdefg"), st.booleans()), min_size=1, max_size=40
)


@FAST
@given(session_histories, st.integers(1, 4), st.data())
def test_session_eviction_matches_model_and_is_deterministic(history, limit, data):
    """Model: sessions sorted by last applied index, keep the newest ``limit``."""
    cut = data.draw(st.integers(0, len(history)))
    replicas = [StateMachine(max_sessions=limit) for _ in range(2)]
    model: dict[str, tuple[int, int]] = {}  # client -> (seq, index)
    for i, (client, retry) in enumerate(history, start=1):
        if i - 1 == cut:  # one replica goes through a snapshot mid-way
            replicas[1] = StateMachine.load(replicas[1].snapshot())
        if client in model:
            seq = model[client][0] + (0 if retry else 1)
        else:
            seq = 1
        entry = put("k", f"{client}{seq}".encode(), client=client, seq=seq)
        results = [r.apply(i, entry) for r in replicas]
        assert results[0] == results[1]
        if client in model and seq == model[client][0]:
            continue  # duplicate: model unchanged
        model[client] = (seq, i)
        if len(model) > limit:
            del model[min(model, key=lambda c: model[c][1])]
    expected = sorted(model.items(), key=lambda kv: kv[1][1])
    for r in replicas:
        assert [(s.client, (s.seq, s.index)) for s in r.sessions()] == expected
        assert r.digest() == r.digest_full()
    assert replicas[0].snapshot() == replicas[1].snapshot()


# -- random histories ---------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
VALUES = st.sampled_from([b"", b"1", b"2", b"xyz"])
CLIENTS = st.sampled_from([None, "c1", "c2", "c3"])


@st.composite
def entry(draw):
    kind = draw(st.sampled_from(["put", "put", "delete", "cas", "noop", "empty", "junk"]))
    if kind == "empty":
        return b""
    if kind == "junk":
        return draw(st.sampled_from(MALFORMED[:10]))
    client = draw(CLIENTS)
    sess = {} if client is None else {"client": client, "seq": draw(st.integers(1, 4))}
    if kind == "put":
        return encode_command("put", key=draw(KEYS), value=draw(VALUES), **sess)
    if kind == "delete":
        return encode_command("delete", key=draw(KEYS), **sess)
    if kind == "cas":
        expected = draw(st.one_of(st.none(), VALUES))
        return encode_command("cas", key=draw(KEYS), expected=expected, value=draw(VALUES), **sess)
    return encode_command("noop", **sess)


histories = st.lists(entry(), max_size=40)


@FAST
@given(histories, st.integers(1, 3))
def test_incremental_digest_equals_full_digest(history, limit):
    sm = StateMachine(max_sessions=limit)
    for i, data in enumerate(history, start=1):
        sm.apply(i, data)
        assert sm.digest() == sm.digest_full()


@FAST
@given(histories, st.data())
def test_snapshot_then_suffix_equals_never_snapshotting(history, data):
    cut = data.draw(st.integers(0, len(history)))
    whole, whole_results = run(history, StateMachine(max_sessions=2))
    prefix, _ = run(history[:cut], StateMachine(max_sessions=2))
    restored = StateMachine.load(prefix.snapshot())
    assert restored.max_sessions == 2
    assert restored.digest() == prefix.digest()
    _, suffix_results = run(history[cut:], restored, start=cut + 1)
    assert suffix_results == whole_results[cut:]
    assert restored.digest() == whole.digest() == restored.digest_full()
    assert restored.snapshot() == whole.snapshot()
    assert restored.dump() == whole.dump()
    # restore() in place onto a machine with other state gives the same
    other, _ = run([put("zzz", b"junk", client="x", seq=1)] * 3)
    other.restore(whole.snapshot())
    assert other.snapshot() == whole.snapshot() and other.digest() == whole.digest()


@FAST
@given(histories, histories)
def test_digest_equal_iff_state_equal(h1, h2):
    """The digest covers everything in the snapshot (kv, sessions, index): equal digests
    exactly when the states are equal. Catches a digest that ignores deletes, values,
    sessions or the index."""
    n = max(len(h1), len(h2))
    a, _ = run(h1 + [b""] * (n - len(h1)))
    b, _ = run(h2 + [b""] * (n - len(h2)))
    assert (a.digest() == b.digest()) == (a.snapshot() == b.snapshot())


def test_equal_states_reached_in_different_orders_have_equal_snapshots():
    a, _ = run([put("x", b"1"), put("y", b"2"), put("z", b"3"), delete("z")])
    b, _ = run([put("z", b"9"), put("y", b"2"), delete("z"), put("x", b"1")])
    assert a.dump() == b.dump()
    assert a.snapshot() == b.snapshot()
    assert a.digest() == b.digest()


class KVModel(RuleBasedStateMachine):
    """The machine against a dict, with per-client sessions (no eviction)."""

    def __init__(self):
        super().__init__()
        self.sm = StateMachine()
        self.kv: dict[str, bytes] = {}
        self.sessions: dict[str, tuple[int, ApplyResult]] = {}
        self.index = 0

    def _apply(self, data):
        self.index += 1
        return self.sm.apply(self.index, data)

    def _model(self, op, key, value=None, expected=None):
        cur = self.kv.get(key)
        if op == "put":
            self.kv[key] = value
            return ApplyResult(True, prev=cur)
        if op == "delete":
            self.kv.pop(key, None)
            return ApplyResult(True, prev=cur)
        if cur != expected:
            return ApplyResult(False, value=cur)
        self.kv[key] = value
        return ApplyResult(True, prev=cur)

    @rule(op=st.sampled_from(["put", "delete", "cas"]), key=KEYS, value=VALUES,
          expected=st.one_of(st.none(), VALUES), client=CLIENTS, bump=st.integers(-1, 2))
    def command(self, op, key, value, expected, client, bump):
        fields = {"key": key}
        if op != "delete":
            fields["value"] = value
        if op == "cas":
            fields["expected"] = expected
        if client is None:
            res = self._apply(encode_command(op, **fields))
            assert res == self._model(op, key, value, expected)
            return
        last = self.sessions.get(client)
        seq = 1 if last is None else max(1, last[0] + bump)
        res = self._apply(encode_command(op, client=client, seq=seq, **fields))
        if last is not None and seq == last[0]:
            assert res == last[1]
        elif last is not None and seq < last[0]:
            assert res.error == ERR_STALE_SEQ
        else:
            expect = self._model(op, key, value, expected)
            assert res == expect
            self.sessions[client] = (seq, expect)

    @rule(data=st.sampled_from(MALFORMED[:12] + [b""]))
    def junk_or_empty(self, data):
        res = self._apply(data)
        assert res.ok == (data == b"")

    @precondition(lambda self: self.index > 0)
    @rule()
    def snapshot_and_restore(self):
        self.sm = StateMachine.load(self.sm.snapshot())

    @invariant()
    def matches_model(self):
        assert self.sm.dump() == self.kv
        assert self.sm.keys() == sorted(self.kv)
        for k in ("a", "b", "c", "d"):
            assert self.sm.get(k) == self.kv.get(k)
        assert {s.client: (s.seq, s.result) for s in self.sm.sessions()} == self.sessions
        assert self.sm.applied_index == self.index
        assert self.sm.digest() == self.sm.digest_full()


TestKVModel = KVModel.TestCase
TestKVModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# -- the digest -----------------------------------------------------------------------------


def digest_sees_deletes() -> bool:
    """Two states that differ only by a deleted key, at the same applied index."""
    with_delete, _ = run([put("k1", b"v1"), put("k2", b"v2"), delete("k2")])
    without, _ = run([put("k1", b"v1"), put("k2", b"v2"), b""])
    assert with_delete.dump() != without.dump()
    return with_delete.digest() != without.digest()


def digest_is_consistent_after_deletes() -> bool:
    sm, _ = run([put("k1", b"v1"), put("k2", b"v2"), delete("k2"), put("k1", b"v3")])
    return sm.digest() == sm.digest_full()


def test_digest_sees_deletes():
    assert digest_sees_deletes()
    assert digest_is_consistent_after_deletes()


def test_planted_bug_digest_ignoring_deletes_is_caught(monkeypatch):
    """Plant the bug (removing an item from the digest does nothing) and show that the
    checks above fail, i.e. they would catch it."""
    monkeypatch.setattr(state_mod._Accumulator, "remove", lambda self, item: None)
    monkeypatch.setattr(state_mod._Accumulator, "remove_hash", lambda self, h: None)
    assert not digest_sees_deletes()
    assert not digest_is_consistent_after_deletes()


def test_planted_bug_non_canonical_session_result_is_caught(monkeypatch):
    """A put's session and pair are hashed as they are, without ``_canon``: that holds
    only while what they hold is canonical. Plant a result whose keys come out of order
    and the incremental digest no longer equals the one recomputed from scratch."""
    sm, _ = run([put("k1", b"v1", client="c", seq=1), put("k1", b"v2", client="c", seq=2)])
    assert sm.digest() == sm.digest_full()

    def unsorted(self):
        return {"value": self.value, "prev": self.prev, "ok": self.ok, "error": self.error,
                "detail": self.detail}

    monkeypatch.setattr(state_mod.ApplyResult, "to_wire", unsorted)
    sm, _ = run([put("k1", b"v1", client="c", seq=1), put("k1", b"v2", client="c", seq=2)])
    assert sm.digest() != sm.digest_full()


def test_digest_is_incremental(monkeypatch):
    """apply() and digest() never walk the whole state."""
    sm, _ = run([put(f"k{i}", b"v") for i in range(50)])

    def walk(self):
        raise AssertionError("full walk")

    monkeypatch.setattr(StateMachine, "_items", walk)
    sm.apply(51, put("k1", b"w", client="c", seq=1))
    sm.apply(52, delete("k2"))
    sm.digest()
    with pytest.raises(AssertionError):
        sm.digest_full()


def test_digest_depends_on_values_and_index():
    a, _ = run([put("k", b"1")])
    b, _ = run([put("k", b"2")])
    c, _ = run([put("k", b"1"), b""])
    assert len({a.digest(), b.digest(), c.digest()}) == 3
    assert len(a.digest()) == 64 and int(a.digest(), 16) >= 0


# -- snapshots ------------------------------------------------------------------------------


def _sample_machine():
    sm, _ = run(
        [
            put("a", b"1", client="c1", seq=1),
            cas("a", b"nope", b"2", client="c2", seq=1),
            put("b", b"\x00\xff"),
        ]
    )
    sm.apply_conf_change(4, ConfChange(ConfChangeOp.BOOTSTRAP, bootstrap=ConfState.of(["n1", "n2"])).encode())
    return sm


def _envelope(body: dict) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb(
        {"body": packed, "format": "raftdeck-state", "sha256": hashlib.sha256(packed).digest(), "version": 1},
        use_bin_type=True,
    )


def test_snapshot_contains_the_whole_state():
    sm = _sample_machine()
    outer = msgpack.unpackb(sm.snapshot(), raw=False)
    body = msgpack.unpackb(outer["body"], raw=False)
    assert body["applied_index"] == 4
    assert body["kv"] == {"a": b"1", "b": b"\x00\xff"}
    assert body["tasks"] == {}
    assert [s[:3] for s in body["sessions"]] == [["c1", 1, 1], ["c2", 1, 2]]
    assert body["sessions"][1][3]["value"] == b"1"  # the cached CAS-mismatch result
    assert body["conf"]["voters"] == ["n1", "n2"] and body["conf"]["index"] == 4
    restored = StateMachine.load(sm.snapshot())
    assert restored.sessions() == sm.sessions() and restored.conf == sm.conf


def test_restore_rejects_every_truncation_and_bit_flip():
    sm = _sample_machine()
    snap = sm.snapshot()
    target = StateMachine()
    target.apply(1, put("keep", b"me"))
    before = target.snapshot()
    for n in range(len(snap)):
        with pytest.raises(StateError):
            target.restore(snap[:n])
    for i in range(len(snap)):
        for bit in (0x01, 0x80):
            bad = bytearray(snap)
            bad[i] ^= bit
            with pytest.raises(StateError):
                target.restore(bytes(bad))
    assert target.snapshot() == before  # a failed restore changes nothing


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        msgpack.packb({"format": "other", "version": 1}),
        msgpack.packb({"format": "raftdeck-state", "version": 99}),
        _envelope({"applied_index": 1}),
        _envelope({"applied_index": 1, "max_sessions": 5, "kv": {"k": "str"}, "sessions": [], "tasks": {},
                   "conf": {"index": 0, "voters": [], "learners": [], "priorities": []}}),
        _envelope({"applied_index": 1, "max_sessions": 5, "kv": {}, "sessions": [["c", 1, 9, {}]], "tasks": {},
                   "conf": {"index": 0, "voters": [], "learners": [], "priorities": []}}),
        _envelope({"applied_index": 1, "max_sessions": 0, "kv": {}, "sessions": [], "tasks": {},
                   "conf": {"index": 0, "voters": [], "learners": [], "priorities": []}}),
        _envelope({"applied_index": 1, "max_sessions": 5, "kv": {}, "sessions": [], "tasks": {},
                   "conf": {"index": 0, "voters": [7], "learners": [], "priorities": []}}),
    ],
)
def test_restore_of_invalid_snapshots_raises_state_error(data):
    with pytest.raises(StateError, match="snapshot"):
        StateMachine.load(data)


def test_restore_accepts_a_hand_built_canonical_snapshot():
    data = _envelope({"applied_index": 3, "conf": {"addresses": {}, "index": 0, "learners": [], "priorities": [], "voters": []},
                      "kv": {"k": b"v"}, "max_sessions": 7, "sessions": [], "tasks": {}})
    sm = StateMachine.load(data)
    assert sm.dump() == {"k": b"v"} and sm.applied_index == 3 and sm.max_sessions == 7
    assert sm.snapshot() == data


# -- configuration changes ------------------------------------------------------------------


def test_conf_changes_are_recorded_in_state_snapshot_and_digest():
    sm = StateMachine()
    boot = ConfChange(ConfChangeOp.BOOTSTRAP, bootstrap=ConfState.of(["n1", "n2", "n3"])).encode()
    assert sm.apply_entry(Entry(1, 1, boot, EntryKind.CONF_CHANGE)) == ApplyResult(True)
    assert sm.apply_entry(Entry(1, 2, put("k", b"v"))).ok
    d_before = sm.digest()
    learner = ConfChange(ConfChangeOp.ADD_LEARNER, "n4", priority=0).encode()
    assert sm.apply_conf_change(3, learner).ok
    assert sm.conf == ConfState.of(["n1", "n2", "n3"], ["n4"], {"n4": 0}) and sm.conf_index == 3
    assert sm.digest() == sm.digest_full()
    other, _ = run([b"", put("k", b"v"), b""])
    assert sm.dump() == other.dump() and sm.digest() != other.digest()  # the conf is in the digest
    assert sm.digest() != d_before
    restored = StateMachine.load(sm.snapshot())
    assert restored.conf == sm.conf and restored.conf_index == 3 and restored.digest() == sm.digest()


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"op": "explode"}', b'{"op": "add_voter"}', b"\xff"])
def test_malformed_conf_change_is_an_error_result(data):
    sm = StateMachine()
    before = sm.digest()
    res = sm.apply_conf_change(1, data)
    assert res.error == ERR_BAD_CONF_CHANGE and not res.ok
    assert sm.applied_index == 1 and sm.conf_index == 0
    empty = StateMachine()
    empty.apply(1, b"")
    assert sm.digest() == empty.digest() != before


# -- divergence -----------------------------------------------------------------------------


def test_diff_replicas():
    d = diff_replicas(
        {
            "n1": {"same": b"1", "diff": b"a", "only1": b"x", "two": b"t"},
            "n2": {"same": b"1", "diff": b"b", "two": b"t"},
            "n3": {"same": b"1", "diff": b"a"},
        }
    )
    assert dict(d.agreed) == {"same": b"1"}
    assert d.differs == {"n1": {"diff", "only1", "two"}, "n2": {"diff", "two"}, "n3": {"diff"}}
    assert d.missing == {"n1": set(), "n2": {"only1"}, "n3": {"only1", "two"}}
    assert d.divergent_keys == {"diff", "only1", "two"}
    assert d.divergent("n3") == {"diff", "only1", "two"}
    assert not d.converged


def test_diff_replicas_edge_cases():
    assert diff_replicas({}).converged and dict(diff_replicas({}).agreed) == {}
    one = diff_replicas({"n1": {"a": b"1"}})
    assert dict(one.agreed) == {"a": b"1"} and one.converged
    same = diff_replicas({"n1": {"a": b"1"}, "n2": {"a": b"1"}})
    assert same.converged and same.divergent_keys == frozenset()
    empty_one = diff_replicas({"n1": {"a": b"1"}, "n2": {}})
    assert dict(empty_one.agreed) == {} and empty_one.missing["n2"] == {"a"}


dumps = st.dictionaries(
    st.sampled_from(["n1", "n2", "n3", "n4"]),
    st.dictionaries(KEYS, st.sampled_from([b"1", b"2"]), max_size=4),
    max_size=4,
)


@FAST
@given(dumps)
def test_diff_replicas_properties(ds):
    d = diff_replicas(ds)
    every = set().union(*ds.values()) if ds else set()
    assert set(d.agreed) | d.divergent_keys == every
    assert not set(d.agreed) & d.divergent_keys
    for k, v in d.agreed.items():
        assert all(dump.get(k) == v for dump in ds.values())
    for k in d.divergent_keys:
        assert len({dump.get(k) for dump in ds.values()}) > 1
    for name, dump in ds.items():
        assert d.differs[name] == d.divergent_keys & set(dump)
        assert d.missing[name] == d.divergent_keys - set(dump)
    assert d.converged == (len({tuple(sorted(x.items())) for x in ds.values()}) <= 1)


def test_diff_of_real_replicas():
    a, _ = run([put("x", b"1"), put("y", b"2")])
    b, _ = run([put("x", b"1"), put("y", b"3")])
    d = diff_replicas({"a": a.dump(), "b": b.dump()})
    assert dict(d.agreed) == {"x": b"1"} and d.divergent_keys == {"y"}


# -- purity ---------------------------------------------------------------------------------


def test_state_module_is_pure():
    """No I/O, clocks or randomness: only these imports."""
    tree = ast.parse(Path(state_mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    allowed = {"__future__", "bisect", "hashlib", "collections", "collections.abc", "dataclasses", "types", "typing",
               "msgpack", "nodeagent.raft.messages",
               "nodeagent.protocol"}  # the sans-I/O codec (its bin_header)
    assert imported <= allowed, imported - allowed
