"""The leader's shortcut: a command it encoded itself is applied from the Command it
validated, without decoding the entry again (StateMachine.remember). Safe only if that
Command is exactly what decode_command would return for the bytes, which these tests
check for every op with flat fields; the replicas' digests must not tell the difference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nodeagent.state as state_mod
from nodeagent.state import (
    StateMachine,
    _pack,
    _validate,
    decode_command,
    encode_command,
    encode_command_for,
)

SPEC = {"id": "t1", "kind": "echo", "args": {"text": "hi"}, "timeout_ms": 1000, "max_attempts": 1}

# One valid command per op, flat ones first.
FLAT = [
    ("noop", {}),
    ("put", {"key": "k", "value": b"v", "client": "c", "seq": 3}),
    ("delete", {"key": "k"}),
    ("cas", {"key": "k", "expected": None, "value": b"v"}),
    ("cas", {"key": "k", "expected": b"old", "value": b"new", "client": "c", "seq": 1}),
    ("assign_task", {"id": "t1", "node": "n1", "attempt": 1, "ts": 5}),
    ("start_task", {"id": "t1", "node": "n1", "attempt": 1, "ts": 6}),
    ("complete_task", {"id": "t1", "node": "n1", "attempt": 1, "outcome": "succeeded",
                       "exit_code": 0, "stdout": b"out", "stderr": b"", "ts": 7}),
    ("expire_task", {"id": "t1", "attempt": 1, "reason": "timeout", "ts": 8}),
    ("cancel_task", {"id": "t1", "ts": 9}),
    ("forget_tasks", {"keep": 10}),
]
NESTED = [("submit_task", {"task": SPEC, "ts": 1}), ("submit_tasks", {"tasks": [SPEC], "ts": 1})]


def _old_encoding(op: str, fields: dict) -> bytes:
    obj = {"op": op, **{k: v for k, v in fields.items() if v is not None or k not in ("client", "seq")}}
    return _pack(_validate(obj).to_wire())


@pytest.mark.parametrize("op,fields", FLAT)
def test_flat_commands_come_with_what_decoding_gives(op, fields):
    data, cmd = encode_command_for(op, **fields)
    assert cmd is not None
    assert cmd == decode_command(data)
    assert data == encode_command(op, **fields) == _old_encoding(op, fields)  # same bytes


@pytest.mark.parametrize("op,fields", NESTED)
def test_nested_commands_are_decoded_as_before(op, fields):
    data, cmd = encode_command_for(op, **fields)
    assert cmd is None
    assert data == _old_encoding(op, fields)


names = st.text(min_size=1, max_size=40)
blobs = st.binary(max_size=300)


@settings(max_examples=300, deadline=None)
@given(key=names, value=blobs, expected=st.none() | blobs, client=st.none() | names,
       seq=st.integers(1, 2**63 - 1), which=st.sampled_from(["put", "delete", "cas"]))
def test_kv_commands_read_back_as_remembered(key, value, expected, client, seq, which):
    fields = {"key": key, "client": client, "seq": seq if client is not None else None}
    if which != "delete":
        fields["value"] = value
    if which == "cas":
        fields["expected"] = expected
    data, cmd = encode_command_for(which, **fields)
    assert cmd == decode_command(data)
    assert data == _old_encoding(which, fields)


def test_apply_takes_the_remembered_command_and_replicas_agree(monkeypatch):
    entries = [encode_command_for(op, **f) for op, f in FLAT]
    entries.append(encode_command_for("submit_task", task=SPEC, ts=1))
    follower = StateMachine()
    follower_results = [follower.apply(i + 1, data) for i, (data, _) in enumerate(entries)]

    leader = StateMachine()
    for data, cmd in entries:
        if cmd is not None:
            leader.remember(data, cmd)
    real = decode_command
    decoded = []

    def counting(data):
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(state_mod, "decode_command", counting)
    leader_results = [leader.apply(i + 1, data) for i, (data, _) in enumerate(entries)]
    assert leader_results == follower_results
    assert leader.digest() == follower.digest()
    assert decoded == [entries[-1][0]]  # only the nested one was decoded
    assert leader._decoded == {}  # each taken once


def test_remembered_commands_are_bounded_and_dropped_on_restore():
    sm = StateMachine()
    for i in range(StateMachine.DECODED_MAX + 5):
        sm.remember(*encode_command_for("put", key=f"k{i}", value=b"v"))
    assert len(sm._decoded) <= StateMachine.DECODED_MAX
    sm.remember(*encode_command_for("put", key="x", value=b"v"))
    other = StateMachine()
    other.apply(1, encode_command("put", key="y", value=b"w"))
    sm.adopt(other)
    assert sm._decoded == {}
