"""The linearizability checker and the task checks, on hand-made histories (pure)."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from console.history import Op, check_tasks, parse_lines, HistoryError, dump_line
from console.linearizability import (
    LINEARIZABLE,
    NON_LINEARIZABLE,
    UNKNOWN,
    check,
    check_key,
    shrink,
)


def H(*rows):
    """Ops from (client, call, ret, op, value/expected..., output, status) shorthand:
    ("put", c, t0, t1, v) / ("get", c, t0, t1, out) / ("cas", c, t0, t1, exp, v, swapped, now)
    / ("del", c, t0, t1); an optional trailing "info"/"fail" sets the status."""
    ops = []
    for r in rows:
        status = "ok"
        if r[-1] in ("info", "fail"):
            status, r = r[-1], r[:-1]
        kind, c, t0, t1 = r[:4]
        key = "k"
        if kind == "put":
            o = Op(len(ops), c, t0, t1, "put", key, value=r[4], status=status)
        elif kind == "get":
            o = Op(len(ops), c, t0, t1, "get", key, output=r[4] if status == "ok" else None, status=status)
        elif kind == "del":
            o = Op(len(ops), c, t0, t1, "delete", key, status=status)
        else:
            out = {"swapped": r[6], "value": r[7]} if status == "ok" else None
            o = Op(len(ops), c, t0, t1, "cas", key, value=r[5], expected=r[4], output=out, status=status)
        ops.append(o)
    return ops


def verdict(ops, **kw):
    return check(ops, **kw).verdict


# -- known good ---------------------------------------------------------------------------

def test_sequential_register_is_linearizable():
    assert verdict(H(("get", 1, 0, 1, None), ("put", 1, 2, 3, "a"), ("get", 2, 4, 5, "a"),
                     ("cas", 1, 6, 7, "a", "b", True, "b"), ("get", 2, 8, 9, "b"),
                     ("del", 1, 10, 11), ("get", 2, 12, 13, None))) == LINEARIZABLE


def test_concurrent_read_may_see_either_value():
    for seen in ("a", "b"):
        ops = H(("put", 1, 0, 1, "a"), ("put", 2, 2, 10, "b"), ("get", 3, 3, 4, seen))
        assert verdict(ops) == LINEARIZABLE


def test_reads_may_not_flip_back_but_overlapping_ones_may_order_freely():
    # b is written concurrently with two reads that overlap each other: a then b is fine.
    ops = H(("put", 1, 0, 1, "a"), ("put", 2, 2, 20, "b"), ("get", 3, 3, 6, "b"), ("get", 4, 4, 8, "a"))
    assert verdict(ops) == LINEARIZABLE


def test_failed_cas_reports_the_value_it_saw():
    ops = H(("put", 1, 0, 1, "a"), ("cas", 2, 2, 3, "x", "y", False, "a"), ("get", 1, 4, 5, "a"))
    assert verdict(ops) == LINEARIZABLE


def test_info_write_may_take_effect_late():
    # The put timed out at t=3 and took effect after a read at t=4..5, seen at 6..7.
    ops = H(("put", 1, 0, 3, "a", "info"), ("get", 2, 4, 5, None), ("get", 2, 6, 7, "a"))
    assert verdict(ops) == LINEARIZABLE


def test_info_write_may_never_take_effect():
    ops = H(("put", 1, 0, 3, "a", "info"), ("get", 2, 4, 5, None), ("get", 2, 60, 70, None))
    assert verdict(ops) == LINEARIZABLE


def test_info_cas_may_apply_later():
    ops = H(("put", 1, 0, 1, "a"), ("cas", 2, 2, 3, "a", "b", "info"), ("get", 1, 4, 5, "a"),
            ("get", 1, 6, 7, "b"))
    assert verdict(ops) == LINEARIZABLE


def test_failed_ops_are_ignored():
    ops = H(("put", 1, 0, 1, "a"), ("put", 2, 2, 3, "zzz", "fail"), ("get", 1, 4, 5, "a"))
    assert verdict(ops) == LINEARIZABLE


# -- known bad ----------------------------------------------------------------------------

def test_stale_read_is_caught():
    ops = H(("put", 1, 0, 1, "a"), ("put", 1, 2, 3, "b"), ("get", 2, 4, 5, "a"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_lost_write_is_caught():
    ops = H(("put", 1, 0, 1, "a"), ("get", 2, 2, 3, None))
    assert verdict(ops) == NON_LINEARIZABLE


def test_read_of_a_value_never_written_is_caught():
    ops = H(("put", 1, 0, 1, "a"), ("get", 2, 2, 3, "ghost"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_double_applied_cas_is_caught():
    # cas a->b applied once, then a is written again; b reappearing means the cas applied twice.
    ops = H(("put", 1, 0, 1, "a"), ("cas", 2, 2, 3, "a", "b", True, "b"), ("put", 1, 4, 5, "a"),
            ("get", 3, 6, 7, "b"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_two_successful_cas_from_the_same_value_are_caught():
    ops = H(("put", 1, 0, 1, "a"), ("cas", 2, 2, 10, "a", "b", True, "b"),
            ("cas", 3, 2, 10, "a", "c", True, "c"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_failed_cas_that_lies_about_the_value_is_caught():
    ops = H(("put", 1, 0, 1, "a"), ("cas", 2, 2, 3, "a", "b", False, "a"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_info_write_cannot_take_effect_before_its_call():
    ops = H(("get", 2, 0, 1, "a"), ("put", 1, 2, 3, "a", "info"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_info_write_applies_once_not_twice():
    # An info put of a, seen, overwritten by b, then a again: the put cannot apply twice.
    ops = H(("put", 1, 0, 1, "a", "info"), ("get", 2, 2, 3, "a"), ("put", 3, 4, 5, "b"),
            ("get", 2, 6, 7, "a"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_delete_then_stale_read():
    ops = H(("put", 1, 0, 1, "a"), ("del", 1, 2, 3), ("get", 2, 4, 5, "a"))
    assert verdict(ops) == NON_LINEARIZABLE


def test_keys_are_independent_and_the_failing_one_is_named():
    good = [Op(0, 1, 0, 1, "put", "x", value="1"), Op(1, 2, 2, 3, "get", "x", output="1")]
    bad = [Op(2, 1, 0, 1, "put", "y", value="1"), Op(3, 2, 2, 3, "get", "y", output=None)]
    r = check(good + bad)
    assert r.verdict == NON_LINEARIZABLE
    assert r.failing_keys == ["y"]
    assert r.keys["x"].verdict == LINEARIZABLE


# -- budget --------------------------------------------------------------------------------

def test_out_of_budget_is_unknown_not_a_hang():
    # Many fully concurrent writes and reads: the search needs more than 50 steps.
    ops = []
    for i in range(40):
        ops.append(Op(len(ops), i, 0, 100, "put", "k", value=f"v{i}"))
        ops.append(Op(len(ops), 100 + i, 0, 100, "get", "k", output=f"v{(i * 7) % 40}"))
    assert check_key(ops, steps=50).verdict == UNKNOWN


def test_time_budget_returns_unknown_quickly():
    import time
    ops = []
    # A hard instance: 200 concurrent info puts all observed, and many reads that cannot fit.
    for i in range(200):
        ops.append(Op(len(ops), i, 0, 1, "put", "k", value=f"v{i}", status="info"))
    for i in range(200):
        ops.append(Op(len(ops), 1000 + i, 2 + 2 * i, 3 + 2 * i, "get", "k", output=f"v{(i * 37) % 200}"))
    t0 = time.monotonic()
    r = check_key(ops, seconds=0.5)
    assert time.monotonic() - t0 < 5
    assert r.verdict in (UNKNOWN, NON_LINEARIZABLE)


# -- shrink --------------------------------------------------------------------------------

def test_shrink_keeps_a_small_witness():
    rng = random.Random(3)
    ops = []
    t = 0
    last = None
    for i in range(60):
        if rng.random() < 0.5:
            last = f"v{i}"
            ops.append(Op(len(ops), 1, t, t + 1, "put", "k", value=last))
        else:
            ops.append(Op(len(ops), 2, t, t + 1, "get", "k", output=last))
        t += 2
    # One stale read in the middle.
    ops.append(Op(len(ops), 3, t, t + 1, "put", "k", value="new"))
    ops.append(Op(len(ops), 3, t + 2, t + 3, "get", "k", output=last))
    assert check_key(ops).verdict == NON_LINEARIZABLE
    small = shrink(ops)
    assert check_key(small).verdict == NON_LINEARIZABLE
    assert len(small) <= 4, [o.describe() for o in small]
    assert {o.value for o in small if o.op == "put"} >= {"new"}


# -- property: histories made by a real sequential register with random overlaps -----------

@st.composite
def register_histories(draw):
    """Run a real register; each op takes effect at a point inside its [call, ret]."""
    n = draw(st.integers(1, 14))
    state = None
    ops = []
    t = 0
    for i in range(n):
        t += draw(st.integers(1, 3))
        before = draw(st.integers(0, 6))
        after = draw(st.integers(0, 6))
        kind = draw(st.sampled_from(["get", "put", "cas", "delete", "put_info", "cas_info"]))
        call, ret = t - before, t + after
        c = i
        if kind == "get":
            ops.append(Op(i, c, call, ret, "get", "k", output=state))
        elif kind in ("put", "put_info"):
            state = f"v{i}"
            ops.append(Op(i, c, call, ret, "put", "k", value=state,
                          status="info" if kind == "put_info" else "ok"))
        elif kind == "delete":
            state = None
            ops.append(Op(i, c, call, ret, "delete", "k"))
        else:
            exp = draw(st.sampled_from([state, None, f"v{max(0, i - 1)}"]))
            swapped = state == exp
            new = f"v{i}"
            if swapped:
                state = new
            if kind == "cas_info":
                ops.append(Op(i, c, call, ret, "cas", "k", value=new, expected=exp, status="info"))
            else:
                ops.append(Op(i, c, call, ret, "cas", "k", value=new, expected=exp,
                              output={"swapped": swapped, "value": state}))
    return ops


@settings(max_examples=300, deadline=None)
@given(register_histories())
def test_histories_of_a_real_register_are_linearizable(ops):
    assert check_key(ops).verdict == LINEARIZABLE


@settings(max_examples=300, deadline=None)
@given(register_histories(), st.data())
def test_a_read_of_an_unwritten_value_anywhere_is_caught(ops, data):
    i = data.draw(st.integers(0, len(ops) - 1))
    o = ops[i]
    bad = Op(o.id, o.client, o.call, o.ret, "get", "k", output="never-written")
    ops = ops[:i] + [bad] + ops[i + 1:]
    assert check_key(ops).verdict == NON_LINEARIZABLE


@settings(max_examples=200, deadline=None)
@given(register_histories())
def test_a_sequential_stale_read_appended_is_caught(ops):
    # After everything, write a fresh value and then read an older observed one.
    end = max(o.ret for o in ops) + 10
    seen = [o.output for o in ops if o.op == "get" and o.status == "ok"]
    old = seen[0] if seen else None
    ops = ops + [Op(len(ops), 99, end, end + 1, "put", "k", value="fresh"),
                 Op(len(ops) + 1, 98, end + 2, end + 3, "get", "k", output=old)]
    assert check_key(ops).verdict == NON_LINEARIZABLE


# -- history lines --------------------------------------------------------------------------

def test_history_lines_round_trip_and_bad_lines_name_the_field():
    ops = H(("put", 1, 0, 1, "a"), ("cas", 2, 2, 3, "a", "b", True, "b"), ("get", 2, 4, 5, None, "fail"))
    lines = [dump_line(o) for o in ops]
    assert parse_lines(lines) == ops
    assert set(json.loads(lines[1])) == {"client", "call", "return", "op", "key", "value",
                                         "expected", "output", "status"}
    with pytest.raises(HistoryError, match=r"h:2: field 'status'"):
        parse_lines([lines[0], lines[1].replace('"ok"', '"maybe"')], name="h")
    with pytest.raises(HistoryError, match=r"h:1: 'return'"):
        parse_lines(['{"client":1,"call":5,"return":4,"op":"get","key":"k","status":"ok"}'], name="h")


# -- tasks ----------------------------------------------------------------------------------

def _rec(tid, state="succeeded", attempts=("succeeded",), stdout=None):
    return {"id": tid, "state": state, "attempt": len(attempts), "node": "n1", "exit_code": 0,
            "stdout": stdout if stdout is not None else tid.encode(), "error": None, "finished_at": 5,
            "attempts": [{"attempt": i + 1, "outcome": o} for i, o in enumerate(attempts)]}


def test_task_checks_accept_a_clean_run():
    recs = {"t1": _rec("t1"), "t2": _rec("t2", attempts=("lost", "succeeded"))}
    r = check_tasks({"t1": "ok", "t2": "ok", "t3": "fail"}, {"t1": "t1", "t2": "t2"},
                    {"n1": recs, "n2": dict(recs)})
    assert r.ok, r.to_json()
    assert r.final == 2


def test_task_checks_catch_every_kind_of_bad_result():
    recs1 = {"t1": _rec("t1"), "t2": _rec("t2", attempts=("succeeded", "succeeded")),
             "t4": _rec("t4"), "t5": _rec("t5", stdout=b"other"), "t6": _rec("t6")}
    recs2 = dict(recs1)
    recs2["t6"] = _rec("t6", attempts=("lost", "succeeded"))
    del recs2["t1"]  # an acknowledged task missing on one replica
    r = check_tasks({"t1": "ok", "t2": "ok", "t5": "ok", "t6": "ok", "t7": "ok"},
                    {t: t for t in ("t1", "t2", "t5", "t6", "t7")}, {"n1": recs1, "n2": recs2})
    assert not r.ok
    assert r.missing_result == ["t1", "t7"]
    assert r.stale_attempt == ["t2"]
    assert r.unexpected == ["t4"]
    assert r.wrong_result == ["t5"]
    assert r.divergent == ["t6"]


def test_shrink_drops_deletes_a_later_write_separates_from_the_read():
    ops = [Op(i, 1, 10 * i, 10 * i + 1, "delete", "k") for i in range(20)]
    ops.append(Op(20, 2, 300, 301, "put", "k", value="x"))
    ops.append(Op(21, 3, 310, 311, "get", "k", output=None))  # stale: x was written
    ops.append(Op(22, 4, 305, 320, "get", "k", output="x"))
    small = shrink(ops)
    assert check_key(small).verdict == NON_LINEARIZABLE
    assert [o.describe() for o in small] == ["c2 put k='x' ok", "c3 get k => None ok"]


@settings(max_examples=100, deadline=None)
@given(register_histories(), st.data())
def test_shrunk_histories_still_fail_and_keep_what_the_reads_saw(ops, data):
    end = max(o.ret for o in ops) + 10
    seen = [o.output for o in ops if o.op == "get" and o.status == "ok" and o.output is not None]
    if not seen:
        return
    stale = data.draw(st.sampled_from(seen))
    ops = ops + [Op(len(ops), 99, end, end + 1, "put", "k", value="fresh"),
                 Op(len(ops) + 1, 98, end + 2, end + 3, "get", "k", output=stale)]
    small = shrink(ops)
    assert check_key(small).verdict == NON_LINEARIZABLE
    assert {o.id for o in small} <= {o.id for o in ops}
    # Every value a remaining read saw is still written by a remaining op.
    written = {o.value for o in small if o.op in ("put", "cas")}
    assert all(o.output in written for o in small if o.op == "get" and o.output is not None)
