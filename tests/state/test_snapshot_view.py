"""Snapshots in two halves: a cheap view captured in the event loop, serialized elsewhere.

``serialize_view(sm.snapshot_view())`` must give byte for byte the canonical snapshot the
one-shot code gave (``reference_snapshot`` below is that code, kept verbatim), and a view
must not change when the machine goes on applying after the capture.
"""

from __future__ import annotations

import hashlib
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nodeagent.state as state_mod
from nodeagent.raft.messages import ConfChange, ConfChangeOp, ConfState
from nodeagent.state import StateMachine, encode_command, serialize_view

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_snapshot(sm: StateMachine) -> bytes:
    """The snapshot as the one-shot code built it (before views): one _pack of it all
    (the key-value table read through ``dump()``, a plain dict, since it can be frozen)."""
    pack = state_mod._pack
    c = sm._conf
    body = pack({
        "applied_index": sm._applied,
        "max_sessions": sm._max_sessions,
        "kv": sm.dump(),
        "sessions": [[cl, s.seq, s.index, s.wire] for cl, s in sm._sessions.items()],
        "tasks": sm._tasks,
        "conf": {
            "index": sm._conf_index,
            "voters": sorted(c.voters),
            "learners": sorted(c.learners),
            "priorities": [list(p) for p in c.priorities],
            "addresses": sm._addresses,
        },
    })
    return pack({"format": state_mod.SNAPSHOT_FORMAT, "version": state_mod.SNAPSHOT_VERSION,
                 "body": body, "sha256": hashlib.sha256(body).digest()})


KEYS = st.text(alphabet="abcé\u4e2d/0", min_size=1, max_size=4)
TASK_IDS = st.sampled_from(["t1", "t2", "t3"])
CLIENTS = st.sampled_from([None, "c1", "c2", "c3", "c4"])


@st.composite
def command(draw):
    """(kind, data): a NORMAL entry's bytes, or a conf change."""
    kind = draw(st.sampled_from(["put", "put", "put", "delete", "cas", "submit", "assign", "start",
                                 "complete", "cancel", "conf"]))
    if kind == "conf":
        node = draw(st.sampled_from(["n1", "n2", "n3"]))
        op = draw(st.sampled_from([ConfChangeOp.ADD_VOTER, ConfChangeOp.ADD_LEARNER, ConfChangeOp.REMOVE]))
        return "conf", ConfChange(op, node, context=f"127.0.0.1:{draw(st.integers(1, 9))}").encode()
    client = draw(CLIENTS)
    sess = {} if client is None else {"client": client, "seq": draw(st.integers(1, 4))}
    tid = draw(TASK_IDS)
    ts = draw(st.integers(0, 50))
    if kind == "put":
        return "n", encode_command("put", key=draw(KEYS), value=draw(st.binary(max_size=6)), **sess)
    if kind == "delete":
        return "n", encode_command("delete", key=draw(KEYS), **sess)
    if kind == "cas":
        return "n", encode_command("cas", key=draw(KEYS), expected=draw(st.one_of(st.none(), st.binary(max_size=2))),
                                   value=b"c", **sess)
    if kind == "submit":
        spec = {"id": tid, "kind": "sleep", "args": {"ms": 5}, "timeout_ms": 1000, "max_attempts": 2}
        return "n", encode_command("submit_task", task=spec, ts=ts, **sess)
    attempt = draw(st.integers(1, 2))
    if kind == "assign":
        return "n", encode_command("assign_task", id=tid, node="n1", attempt=attempt, ts=ts, **sess)
    if kind == "start":
        return "n", encode_command("start_task", id=tid, node="n1", attempt=attempt, ts=ts, **sess)
    if kind == "complete":
        return "n", encode_command("complete_task", id=tid, node="n1", attempt=attempt, outcome="succeeded",
                                   exit_code=0, stdout=b"out", stderr=b"", ts=ts, **sess)
    return "n", encode_command("cancel_task", id=tid, ts=ts, **sess)


def apply_all(sm: StateMachine, cmds, start: int) -> None:
    for i, (kind, data) in enumerate(cmds, start=start):
        if kind == "conf":
            sm.apply_conf_change(i, data)
        else:
            sm.apply(i, data)


def bootstrapped(max_sessions: int) -> StateMachine:
    sm = StateMachine(max_sessions=max_sessions)
    bootstrap = ConfChange(ConfChangeOp.BOOTSTRAP, bootstrap=ConfState(frozenset({"n1"})))
    sm.apply_conf_change(1, bootstrap.encode())
    return sm


@FAST
@given(st.lists(command(), max_size=60), st.lists(command(), max_size=30), st.integers(1, 3),
       st.sampled_from([(3, 5), (4096, 20_000)]), st.data())
def test_a_view_serializes_to_the_canonical_snapshot_and_never_changes(before, after, max_sessions, sizes,
                                                                       data):
    """The view's bytes equal the one-shot snapshot's at the capture, however the machine
    moves on after it (puts over captured keys, deletes, task transitions, new sessions
    and evictions, membership changes). With tiny chunk sizes, every map is packed in
    several chunks and the keys are sorted in buckets. Released at some point of the
    changes, the machine folds them in and is the state every change made."""
    chunk, bucket_above = sizes
    release_at = data.draw(st.integers(0, len(after)), label="release_at")
    with mock.patch.object(state_mod, "_CHUNK", chunk), mock.patch.object(state_mod, "_BUCKET_SORT_ABOVE", bucket_above):
        sm = bootstrapped(max_sessions)
        apply_all(sm, before, start=2)
        expected = reference_snapshot(sm)
        view = sm.snapshot_view()
        assert view.applied_index == sm.applied_index
        assert sm.snapshot() == expected  # a second capture meanwhile: a copy
        apply_all(sm, after[:release_at], start=2 + len(before))
        assert sm.snapshot() == reference_snapshot(sm)
        assert serialize_view(view) == expected
        # and the bytes restore to a machine with the same digest as at the capture
        assert StateMachine.load(serialize_view(view)).digest() == StateMachine.load(expected).digest()
        sm.release_view(view)  # the view is not read after this
        apply_all(sm, after[release_at:], start=2 + len(before) + release_at)
        assert sm.snapshot() == reference_snapshot(sm)
        assert sm.digest() == sm.digest_full()
        assert sm.statistics().keys == len(sm.dump()) == len(sm.keys())


def test_a_big_state_sorts_in_buckets_and_gives_the_same_bytes():
    """50,000 keys (above the bucket threshold) in an order far from sorted."""
    sm = StateMachine()
    for i in range(50_000):
        sm._kv_set(f"k{(i * 7919) % 50_000:06d}/{'é' if i % 3 else 'z'}", b"v%d" % i)
    sm._applied = 1
    assert len(sm.dump()) > state_mod._BUCKET_SORT_ABOVE
    assert serialize_view(sm.snapshot_view()) == reference_snapshot(sm)


@pytest.mark.parametrize("keys", [[], ["a"], ["b", "a"], [f"{i:x}" for i in range(20_001)],
                                  ["x" * 5 + str(i % 10) + "y" * (i % 7) for i in range(30_000)]],
                         ids=["empty", "one", "two", "20001", "near-equal"])
def test_sorted_keys_is_sorted(keys):
    keys = list(dict.fromkeys(keys))  # dict keys are distinct
    assert state_mod._sorted_keys(list(reversed(keys))) == sorted(keys)


def test_a_view_that_shared_the_live_dict_would_be_caught():
    """The check above is able to fail: a capture that hands out the live table without
    freezing it (changes still go into it) serializes to the state after the capture."""
    sm = StateMachine()
    sm.apply(1, encode_command("put", key="a", value=b"1"))
    expected = reference_snapshot(sm)
    with mock.patch.object(state_mod.FreezableKV, "freeze", lambda self: self.base):
        planted = sm.snapshot_view()
    sm.apply(2, encode_command("put", key="a", value=b"2"))
    assert serialize_view(planted) != expected
    sm2 = StateMachine()
    sm2.apply(1, encode_command("put", key="a", value=b"1"))
    good = sm2.snapshot_view()
    sm2.apply(2, encode_command("put", key="a", value=b"2"))
    assert serialize_view(good) == expected
