"""Tests of the leader's load table (nodeagent/loads.py)."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.dispatch import NodeLoad, PolicyState, place
from nodeagent.loads import LoadReport, LoadTable


def table() -> LoadTable:
    t = LoadTable()
    t.report("leader", 10.0, running=1, queued=0, capacity=4, load1=0.5)
    t.report("b", 9.0, running=2, queued=3, capacity=2, load1=1.25)
    t.report("a", 7.0, running=0, queued=0, capacity=1, load1=0)
    return t


def test_report_and_get():
    t = table()
    r = t.get("b")
    assert r == LoadReport(node="b", at=9.0, running=2, queued=3, capacity=2, load1=1.25)
    assert r.pending == 5
    assert r.age(12.5) == 3.5
    assert t.get("nobody") is None
    assert len(t) == 3 and "a" in t and "z" not in t
    assert list(t) == ["a", "b", "leader"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.running = 9  # type: ignore[misc]


def test_report_replaces_and_returns_held():
    t = table()
    new = t.report("b", 11.0, running=0, queued=1, capacity=2, load1=0.1)
    assert t.get("b") is new and new.at == 11.0 and new.queued == 1
    assert isinstance(t.get("a").load1, float)


def test_older_report_is_ignored():
    t = table()
    held = t.get("b")
    assert t.report("b", 8.0, running=9, queued=9, capacity=2, load1=9.0) is held
    assert t.get("b") is held


def test_alive_within_lease():
    t = table()
    assert t.alive(10.0, lease=3.5) == {"leader", "b", "a"}
    assert t.alive(11.0, lease=3.0) == {"leader", "b"}  # a is 4 s old
    assert t.alive(11.999, lease=3.0) == {"leader", "b"}
    assert t.alive(12.0, lease=3.0) == {"leader"}  # a report exactly `lease` old has expired
    assert t.alive(13.0, lease=3.0) == set()
    assert t.alive(100.0, lease=3.0) == set()


def test_report_revives_a_stale_node():
    t = table()
    assert "a" not in t.alive(20.0, lease=3.0)
    t.report("a", 20.0, running=0, queued=0, capacity=1, load1=0.0)
    assert "a" in t.alive(20.0, lease=3.0)


def test_forget():
    t = table()
    assert t.forget("b") is True
    assert t.forget("b") is False
    assert t.get("b") is None
    assert "b" not in t.alive(9.0, lease=5.0)


def test_snapshot_plain_sorted_data():
    t = table()
    snap = t.snapshot(11.0)
    assert list(snap) == ["a", "b", "leader"]
    assert snap["b"] == {"at": 9.0, "age": 2.0, "running": 2, "queued": 3, "capacity": 2, "load1": 1.25}
    assert "alive" not in snap["a"]
    with_lease = t.snapshot(11.0, lease=3.0)
    assert [with_lease[n]["alive"] for n in with_lease] == [False, True, True]
    # encodes as is for the status stream and --json
    assert msgpack.unpackb(msgpack.packb(with_lease), raw=False) == with_lease
    assert json.loads(json.dumps(with_lease)) == with_lease
    assert LoadTable().snapshot(0.0) == {}


@pytest.mark.parametrize(
    "args",
    [
        ("", 1.0, 0, 0, 1, 0.0),
        (None, 1.0, 0, 0, 1, 0.0),
        ("a", float("nan"), 0, 0, 1, 0.0),
        ("a", 1.0, -1, 0, 1, 0.0),
        ("a", 1.0, 0, -1, 1, 0.0),
        ("a", 1.0, 1.0, 0, 1, 0.0),
        ("a", 1.0, 0, 0, 0, 0.0),
        ("a", 1.0, 0, 0, True, 0.0),
        ("a", 1.0, 0, 0, 1, -0.1),
        ("a", 1.0, 0, 0, 1, float("inf")),
    ],
)
def test_report_validation(args):
    t = LoadTable()
    with pytest.raises(ValueError):
        t.report(*args)
    assert len(t) == 0


@pytest.mark.parametrize("lease", [0, -1, float("nan")])
def test_lease_validation(lease):
    with pytest.raises(ValueError):
        table().alive(10.0, lease)
    with pytest.raises(ValueError):
        table().snapshot(10.0, lease)


def test_candidates_feed_dispatch():
    t = table()
    cands = t.candidates(11.0, lease=3.0, assigned={"leader": 4, "b": 1, "gone": 7})
    assert cands == [
        NodeLoad("a", capacity=1, assigned=0, alive=False),
        NodeLoad("b", capacity=2, assigned=1, alive=True),
        NodeLoad("leader", capacity=4, assigned=4, alive=True),
    ]
    # b: 1/2 < leader: 4/4, and a is stale
    assert place("least_loaded", cands, state=PolicyState()) == "b"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abcd"), st.floats(0, 100, allow_nan=False), st.booleans()),
        max_size=30,
    ),
    now=st.floats(0, 120, allow_nan=False),
    lease=st.floats(0.1, 50, allow_nan=False),
)
def test_prop_alive_matches_latest_reports(ops, now, lease):
    t = LoadTable()
    latest: dict[str, float] = {}
    for node, at, forget in ops:
        if forget:
            t.forget(node)
            latest.pop(node, None)
        else:
            t.report(node, at, running=0, queued=0, capacity=1, load1=0.0)
            latest[node] = max(at, latest.get(node, at))
    assert {n: r.at for n, r in ((n, t.get(n)) for n in t)} == latest
    assert t.alive(now, lease) == {n for n, at in latest.items() if now - at < lease}
    assert {c.name for c in t.candidates(now, lease, {}) if c.alive} == t.alive(now, lease)
