"""Tests of the task table of the replicated state machine (nodeagent/state.py)."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import nodeagent.state as state_mod
from nodeagent.state import (
    ERR_ALREADY_FINAL,
    ERR_BAD_COMMAND,
    ERR_BAD_TASK,
    ERR_NO_ATTEMPTS_LEFT,
    ERR_NO_SUCH_TASK,
    ERR_STALE_ATTEMPT,
    ERR_TASK_BUSY,
    ERR_TASK_EXISTS,
    FINAL_STATES,
    MAX_TASK_OUTPUT_BYTES,
    TASK_OUTCOMES,
    TASK_STATES,
    CommandError,
    StateError,
    StateMachine,
    check_task_spec,
    encode_command,
)


def spec(task_id="t1", kind="sleep", args=None, **over):
    s = {"id": task_id, "kind": kind, "args": {"ms": 5} if args is None else args,
         "timeout_ms": 1000, "max_attempts": 3}
    s.update(over)
    return s


class M:
    """A machine fed commands at consecutive indexes."""

    def __init__(self, sm: StateMachine | None = None):
        self.sm = sm or StateMachine()
        self.index = self.sm.applied_index

    def raw(self, data: bytes):
        self.index += 1
        return self.sm.apply(self.index, data)

    def __call__(self, op, **fields):
        fields.setdefault("ts", 1000 + self.index)
        return self.raw(encode_command(op, **fields))

    def submit(self, task_id="t1", ts=None, **kw):
        return self("submit_task", task=spec(task_id, **kw), **({} if ts is None else {"ts": ts}))

    def assign(self, task_id="t1", node="n1", attempt=1, **kw):
        return self("assign_task", id=task_id, node=node, attempt=attempt, **kw)

    def start(self, task_id="t1", node="n1", attempt=1, **kw):
        return self("start_task", id=task_id, node=node, attempt=attempt, **kw)

    def complete(self, task_id="t1", node="n1", attempt=1, outcome="succeeded", exit_code=0,
                 stdout=b"out", stderr=b"", **kw):
        return self("complete_task", id=task_id, node=node, attempt=attempt, outcome=outcome,
                    exit_code=exit_code, stdout=stdout, stderr=stderr, **kw)

    def expire(self, task_id="t1", attempt=1, reason="node died", **kw):
        return self("expire_task", id=task_id, attempt=attempt, reason=reason, **kw)

    def cancel(self, task_id="t1", **kw):
        return self("cancel_task", id=task_id, **kw)

    def noop_digest(self) -> str:
        """The digest this machine would have if the next entry changed nothing."""
        twin = StateMachine.load(self.sm.snapshot())
        twin.apply(self.index + 1, b"")
        return twin.digest()


def check_consistent(sm: StateMachine) -> None:
    """Digest, derived indexes and record shape agree with a recount from the records."""
    assert sm.digest() == sm.digest_full()
    tasks = sm.tasks
    load: dict[str, int] = {}
    on: dict[str, list] = {}
    for t, r in tasks.items():
        assert state_mod._record_problem(t, r) is None
        if r["state"] in ("assigned", "running"):
            load[r["node"]] = load.get(r["node"], 0) + 1
            on.setdefault(r["node"], []).append(t)
    assert sm.node_load() == load
    for n, ids in on.items():
        assert sorted(sm.tasks_on(n)) == sorted(ids)
    assert sm.task_counts() == {s: sum(r["state"] == s for r in tasks.values()) for s in TASK_STATES}
    order = sorted(tasks, key=lambda t: (tasks[t]["submitted_at"], t))
    assert [r["id"] for r in sm.list_tasks(limit=10**6)] == order
    for s in TASK_STATES:
        assert sm.tasks_by_state(s) == [t for t in order if tasks[t]["state"] == s]
    waiting = [t for t in order if tasks[t]["state"] == "submitted"]
    assert sm.first_submitted(3) == waiting[:3] and sm.first_submitted(10**6) == waiting


# -- submit ---------------------------------------------------------------------------------


def test_submit_creates_a_submitted_record():
    m = M()
    res = m.submit("t1", ts=5000, policy="least-loaded", key="k")
    assert res.ok and res.error is None and res.effects == ()
    rec = m.sm.task("t1")
    assert res.value == rec
    assert rec == {
        "id": "t1", "kind": "sleep", "args": {"ms": 5}, "timeout_ms": 1000, "max_attempts": 3,
        "policy": "least-loaded", "key": "k", "state": "submitted", "attempt": 0, "node": None,
        "attempts": [], "submitted_at": 5000, "finished_at": None, "exit_code": None, "stdout": b"",
        "stderr": b"", "stdout_truncated": 0, "stderr_truncated": 0, "error": None, "submitted_by": None,
    }
    assert m.sm.tasks_by_state("submitted") == ["t1"]
    assert m.sm.task_counts()["submitted"] == 1 and m.sm.node_load() == {}
    assert m.sm.task("nope") is None
    check_consistent(m.sm)


def test_submit_records_the_client_and_a_retry_returns_the_cached_result():
    m = M()
    first = m("submit_task", task=spec("t1"), ts=10, client="console-1", seq=1)
    assert first.ok and m.sm.task("t1")["submitted_by"] == "console-1"
    m.assign("t1")
    before = m.sm.task("t1")
    retry = m("submit_task", task=spec("t1"), ts=99, client="console-1", seq=1)
    assert retry == first  # cached: the record as it was at submission, not re-applied
    assert retry.value["state"] == "submitted"
    assert m.sm.task("t1") == before


def test_submit_is_idempotent_by_id():
    m = M()
    m.submit("t1", ts=10)
    digest = m.noop_digest()
    again = m.submit("t1", ts=20)
    assert again.ok and again.detail == "already submitted"
    assert again.value == m.sm.task("t1") and again.value["submitted_at"] == 10
    assert m.sm.digest() == digest  # no change
    # absent policy/key is the same spec as explicit None
    assert m("submit_task", task={**spec("t1"), "policy": None, "key": None}).ok
    diff = m.submit("t1", kind="cpu", args={"ms": 5}, timeout_ms=7)
    assert not diff.ok and diff.error == ERR_TASK_EXISTS
    assert "kind" in diff.detail and "timeout_ms" in diff.detail and "args" not in diff.detail
    assert m.submit("t1", key="other").error == ERR_TASK_EXISTS
    assert m.sm.task("t1")["kind"] == "sleep"
    check_consistent(m.sm)


def test_every_kind_is_accepted_with_its_args():
    m = M()
    for task_id, kind, args in [("a", "sleep", {"ms": 0}), ("b", "cpu", {"ms": 3_600_000}),
                                ("c", "echo", {"data": b"x" * 65536}), ("d", "shell", {"cmd": "echo hi"})]:
        res = m.submit(task_id, kind=kind, args=args)
        assert res.ok, res
        assert m.sm.task(task_id)["args"] == args
    check_consistent(m.sm)


BAD_SPECS = [
    ({"kind": "frobnicate"}, "task.kind"),
    ({"kind": 7}, "task.kind"),
    ({"id": ""}, "task.id"),
    ({"id": "x" * 129}, "task.id"),
    ({"id": 5}, "task.id"),
    ({"args": []}, "task.args"),
    ({"args": {}}, "task.args.ms"),
    ({"args": {"ms": -1}}, "task.args.ms"),
    ({"args": {"ms": 86_400_001}}, "task.args.ms"),
    ({"args": {"ms": True}}, "task.args.ms"),
    ({"args": {"ms": "5"}}, "task.args.ms"),
    ({"args": {"ms": 1, "extra": 2}}, "task.args"),
    ({"kind": "cpu", "args": {"ms": 3_600_001}}, "task.args.ms"),
    ({"kind": "echo", "args": {"data": "text"}}, "task.args.data"),
    ({"kind": "echo", "args": {"data": b"x" * 65537}}, "task.args.data"),
    ({"kind": "echo", "args": {"ms": 5}}, "task.args"),
    ({"kind": "shell", "args": {"cmd": ""}}, "task.args.cmd"),
    ({"kind": "shell", "args": {"cmd": "x" * 4097}}, "task.args.cmd"),
    ({"timeout_ms": 0}, "task.timeout_ms"),
    ({"timeout_ms": 86_400_001}, "task.timeout_ms"),
    ({"max_attempts": 0}, "task.max_attempts"),
    ({"max_attempts": 101}, "task.max_attempts"),
    ({"policy": ""}, "task.policy"),
    ({"policy": 3}, "task.policy"),
    ({"key": ""}, "task.key"),
    ({"key": b"bytes"}, "task.key"),
    ({"priority": 1}, "task: unknown field"),
]


@pytest.mark.parametrize("over, field", BAD_SPECS)
def test_bad_task_specs_give_an_error_naming_the_field(over, field):
    m = M()
    res = m("submit_task", task={**spec("t1"), **over})
    assert not res.ok and res.error == ERR_BAD_TASK
    assert res.detail.startswith(field), res.detail
    assert m.sm.tasks == {}
    with pytest.raises(CommandError, match="^" + field):
        check_task_spec({**spec("t1"), **over})


@pytest.mark.parametrize("missing", ["id", "kind", "args", "timeout_ms", "max_attempts"])
def test_missing_spec_fields_are_named(missing):
    s = spec("t1")
    del s[missing]
    res = M()("submit_task", task=s)
    assert res.error == ERR_BAD_TASK and res.detail == f"task.{missing}: missing"


def test_malformed_task_commands_are_bad_command_results():
    m = M()
    for op, fields in [
        ("submit_task", {"task": "not a map", "ts": 1}),
        ("submit_task", {"task": spec()}),  # no ts
        ("submit_task", {"task": spec(), "ts": -1}),
        ("submit_tasks", {"tasks": [spec(), 3], "ts": 1}),
        ("submit_tasks", {"tasks": [spec(f"t{i}") for i in range(1001)], "ts": 1}),
        ("assign_task", {"id": "t1", "node": "", "attempt": 1, "ts": 1}),
        ("assign_task", {"id": "t1", "node": "n1", "attempt": 0, "ts": 1}),
        ("start_task", {"id": "", "node": "n1", "attempt": 1, "ts": 1}),
        ("complete_task", {"id": "t1", "node": "n1", "attempt": 1, "outcome": "lost", "exit_code": 0,
                           "stdout": b"", "stderr": b"", "ts": 1}),
        ("complete_task", {"id": "t1", "node": "n1", "attempt": 1, "outcome": "failed", "exit_code": "1",
                           "stdout": b"", "stderr": b"", "ts": 1}),
        ("complete_task", {"id": "t1", "node": "n1", "attempt": 1, "outcome": "failed", "exit_code": 1,
                           "stdout": "text", "stderr": b"", "ts": 1}),
        ("expire_task", {"id": "t1", "attempt": 1, "reason": "", "ts": 1}),
        ("cancel_task", {"id": "t1"}),
    ]:
        with pytest.raises(CommandError):
            encode_command(op, **fields)
        res = m.raw(msgpack.packb({"op": op, **fields}, use_bin_type=True))
        assert not res.ok and res.error == ERR_BAD_COMMAND, (op, fields)
        assert res.detail.startswith(op), res.detail
    assert m.sm.tasks == {}
    check_consistent(m.sm)


def test_submit_tasks_applies_each_and_returns_per_task_results():
    m = M()
    m.submit("t0", kind="cpu")
    res = m("submit_tasks", tasks=[spec("t1"), spec("t2", kind="nope"), spec("t0", kind="cpu"),
                                   spec("t0"), spec("t1")], ts=77)
    assert not res.ok and res.error is None and res.detail == "2 of 5 refused"
    assert [(r["ok"], r["error"]) for r in res.value] == [
        (True, None), (False, ERR_BAD_TASK), (True, None), (False, ERR_TASK_EXISTS), (True, None)]
    assert res.value[0]["value"]["submitted_at"] == 77
    assert res.value[4]["detail"] == "already submitted"
    assert sorted(m.sm.tasks) == ["t0", "t1"]
    ok = m("submit_tasks", tasks=[spec(f"b{i}") for i in range(1000)], ts=78)
    assert ok.ok and len(ok.value) == 1000 and ok.detail == ""
    assert m("submit_tasks", tasks=[], ts=79).ok
    assert m.sm.task_counts()["submitted"] == 1002
    check_consistent(m.sm)


# -- transitions ----------------------------------------------------------------------------


def test_lifecycle_submit_assign_start_complete():
    m = M()
    m.submit("t1", ts=100)
    res = m.assign("t1", "n2", 1, ts=200)
    assert res.ok and res.effects == (("run", "n2", "t1", 1),)
    rec = m.sm.task("t1")
    assert (rec["state"], rec["attempt"], rec["node"]) == ("assigned", 1, "n2")
    assert rec["attempts"] == [{"attempt": 1, "node": "n2", "assigned_at": 200, "started_at": None,
                                "finished_at": None, "outcome": None}]
    assert m.sm.tasks_on("n2") == ["t1"] and m.sm.node_load() == {"n2": 1}
    assert m.sm.task_attempt("t1") == (1, "assigned", "n2") and m.sm.task_attempt("t9") is None
    assert m.start("t1", "n2", 1, ts=300).ok
    assert m.sm.task_attempt("t1") == (1, "running", "n2")
    rec = m.sm.task("t1")
    assert rec["state"] == "running" and rec["attempts"][0]["started_at"] == 300
    assert m.sm.node_load() == {"n2": 1} and m.sm.tasks_by_state("running") == ["t1"]
    res = m.complete("t1", "n2", 1, "succeeded", 0, b"hello", b"warn", ts=400)
    assert res.ok and res.effects == ()
    rec = m.sm.task("t1")
    assert res.value == rec
    assert (rec["state"], rec["finished_at"], rec["exit_code"], rec["stdout"], rec["stderr"], rec["error"]) == (
        "succeeded", 400, 0, b"hello", b"warn", None)
    assert rec["attempts"][0]["outcome"] == "succeeded" and rec["attempts"][0]["finished_at"] == 400
    assert m.sm.tasks_on("n2") == [] and m.sm.node_load() == {}
    assert m.sm.task_attempt("t1") == (1, "succeeded", "n2")
    check_consistent(m.sm)


@pytest.mark.parametrize("outcome, exit_code, error", [("failed", 2, "exit status 2"), ("timed_out", None, None)])
def test_complete_with_failed_and_timed_out(outcome, exit_code, error):
    m = M()
    m.submit()
    m.assign()
    m.start()
    extra = {} if error is None else {"error": error}
    assert m.complete(outcome=outcome, exit_code=exit_code, **extra).ok
    rec = m.sm.task("t1")
    assert (rec["state"], rec["exit_code"], rec["error"]) == (outcome, exit_code, error)
    assert rec["attempts"][-1]["outcome"] == outcome


def test_complete_straight_from_assigned_is_accepted():
    m = M()
    m.submit()
    m.assign()
    assert m.complete().ok  # the start_task proposal may have been lost; the result still counts
    assert m.sm.task("t1")["attempts"][0]["started_at"] is None


def test_outputs_are_truncated_keeping_the_tail():
    m = M()
    m.submit()
    m.assign()
    out = bytes(range(256)) * 300  # 76800 bytes
    assert m.complete(stdout=out, stderr=b"e" * 10, error="x" * 10_000).ok
    rec = m.sm.task("t1")
    assert rec["stdout"] == out[-MAX_TASK_OUTPUT_BYTES:] and rec["stdout_truncated"] == len(out) - 65536
    assert rec["stderr"] == b"e" * 10 and rec["stderr_truncated"] == 0
    assert len(rec["error"]) == 4096
    check_consistent(m.sm)


def test_assign_is_a_compare_and_set_on_the_attempt():
    m = M()
    assert m.assign("ghost").error == ERR_NO_SUCH_TASK
    m.submit("t1", max_attempts=2)
    assert m.assign(attempt=2).error == ERR_STALE_ATTEMPT  # must be the next attempt (1)
    assert m.assign(attempt=3).error == ERR_NO_ATTEMPTS_LEFT
    assert m.assign("t1", "n1", 1).ok
    busy = m.assign("t1", "n2", 2)  # attempt 1 is still live: expire it first
    assert busy.error == ERR_TASK_BUSY and "expire" in busy.detail
    racing = m.assign("t1", "n3", 1)  # a second proposer placing the same attempt loses
    assert racing.error == ERR_STALE_ATTEMPT and racing.effects == ()
    assert m.sm.task("t1")["node"] == "n1" and m.sm.node_load() == {"n1": 1}
    m.complete()
    final = m.assign("t1", "n1", 2)
    assert final.error == ERR_ALREADY_FINAL and final.value == m.sm.task("t1")
    check_consistent(m.sm)


def test_start_rules():
    m = M()
    assert m.start("ghost").error == ERR_NO_SUCH_TASK
    m.submit()
    assert m.start().error == ERR_STALE_ATTEMPT  # never assigned
    m.assign("t1", "n1", 1)
    assert m.start("t1", "n2", 1).error == ERR_STALE_ATTEMPT  # wrong node
    assert m.start("t1", "n1", 2).error == ERR_STALE_ATTEMPT  # wrong attempt
    assert m.sm.task("t1")["state"] == "assigned"
    assert m.start("t1", "n1", 1, ts=50).ok
    digest = m.noop_digest()
    again = m.start("t1", "n1", 1, ts=60)  # a repeat: ok, nothing changes
    assert again.ok and again.detail == "already running" and m.sm.digest() == digest
    assert m.sm.task("t1")["attempts"][0]["started_at"] == 50
    m.complete()
    assert m.start("t1", "n1", 1).error == ERR_STALE_ATTEMPT  # final
    check_consistent(m.sm)


def test_complete_rules():
    m = M()
    assert m.complete("ghost").error == ERR_NO_SUCH_TASK
    m.submit()
    assert m.complete().error == ERR_STALE_ATTEMPT  # never assigned
    m.assign("t1", "n1", 1)
    m.start("t1", "n1", 1)
    before = m.sm.task("t1")
    assert m.complete("t1", "n2", 1).error == ERR_STALE_ATTEMPT
    assert m.complete("t1", "n1", 2).error == ERR_STALE_ATTEMPT
    assert m.sm.task("t1") == before
    assert m.complete("t1", "n1", 1, "failed", 1).ok
    final = m.sm.task("t1")
    digest = m.noop_digest()
    repeat = m.complete("t1", "n1", 1, "succeeded", 0, b"other")  # a duplicate or a contradiction
    assert repeat.error == ERR_STALE_ATTEMPT and "already failed" in repeat.detail
    assert m.sm.task("t1") == final and m.sm.digest() == digest


def test_late_result_of_an_old_attempt_is_ignored():
    """The key invariant: after expire + reassign, a result of the old attempt arrives;
    it changes nothing, and the task ends with exactly one final result: the new one's."""
    m = M()
    m.submit("t1", max_attempts=3)
    m.assign("t1", "n1", 1)
    m.start("t1", "n1", 1)
    assert m.expire("t1", 1, "lease of n1 expired").ok
    assert m.assign("t1", "n2", 2).effects == (("run", "n2", "t1", 2),)
    m.start("t1", "n2", 2)
    before, digest = m.sm.task("t1"), m.noop_digest()
    late = m.complete("t1", "n1", 1, "succeeded", 0, b"old result")
    assert not late.ok and late.error == ERR_STALE_ATTEMPT
    assert m.sm.task("t1") == before and m.sm.digest() == digest
    assert m.sm.task("t1")["state"] == "running" and m.sm.tasks_on("n1") == []
    assert m.complete("t1", "n2", 2, "failed", 3, b"new result").ok
    # the old attempt's result arrives once more, after the end
    assert m.complete("t1", "n1", 1, "succeeded", 0, b"old result").error == ERR_STALE_ATTEMPT
    rec = m.sm.task("t1")
    assert (rec["state"], rec["exit_code"], rec["stdout"]) == ("failed", 3, b"new result")
    assert [a["outcome"] for a in rec["attempts"]] == ["lost", "failed"]
    assert sum(a["outcome"] in TASK_OUTCOMES for a in rec["attempts"]) == 1
    check_consistent(m.sm)


def test_expire_until_max_attempts_then_failed():
    m = M()
    m.submit("t1", max_attempts=3)
    for attempt, node in [(1, "n1"), (2, "n2"), (3, "n3")]:
        assert m.assign("t1", node, attempt).ok
        if attempt == 2:
            m.start("t1", node, attempt)
        res = m.expire("t1", attempt, f"{node} down", ts=900 + attempt)
        assert res.ok
        rec = m.sm.task("t1")
        assert rec["attempts"][-1]["outcome"] == "lost" and rec["attempts"][-1]["finished_at"] == 900 + attempt
        if attempt < 3:
            assert (rec["state"], rec["node"], rec["finished_at"]) == ("submitted", None, None)
            assert m.sm.tasks_by_state("submitted") == ["t1"] and m.sm.node_load() == {}
    rec = m.sm.task("t1")
    assert rec["state"] == "failed" and rec["error"] == "lost on every attempt (n3 down)"
    assert rec["finished_at"] == 903 and rec["attempt"] == 3
    assert [a["node"] for a in rec["attempts"]] == ["n1", "n2", "n3"]
    assert m.assign("t1", "n1", 4).error == ERR_ALREADY_FINAL
    check_consistent(m.sm)


def test_expire_rules():
    m = M()
    assert m.expire("ghost").error == ERR_NO_SUCH_TASK
    m.submit()
    assert m.expire("t1", 1).error == ERR_STALE_ATTEMPT  # never assigned
    m.assign("t1", "n1", 1)
    assert m.expire("t1", 2).error == ERR_STALE_ATTEMPT
    assert m.expire("t1", 1).ok
    assert m.expire("t1", 1).error == ERR_STALE_ATTEMPT  # already expired
    m.assign("t1", "n2", 2)
    assert m.expire("t1", 1).error == ERR_STALE_ATTEMPT  # an old attempt
    assert m.sm.task("t1")["state"] == "assigned"
    m.complete("t1", "n2", 2)
    assert m.expire("t1", 2).error == ERR_STALE_ATTEMPT  # final


def test_cancel_of_a_queued_task():
    m = M()
    assert m.cancel("ghost").error == ERR_NO_SUCH_TASK
    m.submit()
    res = m.cancel("t1", ts=555)
    assert res.ok and res.effects == ()
    rec = m.sm.task("t1")
    assert (rec["state"], rec["finished_at"], rec["attempts"]) == ("cancelled", 555, [])
    assert m.assign().error == ERR_ALREADY_FINAL
    check_consistent(m.sm)


@pytest.mark.parametrize("running", [False, True])
def test_cancel_of_a_live_task_emits_kill(running):
    m = M()
    m.submit()
    m.assign("t1", "n3", 1)
    if running:
        m.start("t1", "n3", 1)
    res = m.cancel("t1", ts=700)
    assert res.ok and res.effects == (("kill", "n3", "t1", 1),)
    rec = m.sm.task("t1")
    assert rec["state"] == "cancelled" and rec["attempts"][-1]["outcome"] == "cancelled"
    assert m.sm.tasks_on("n3") == [] and m.sm.node_load() == {}
    # the killed process reports: too late, ignored
    assert m.complete("t1", "n3", 1, "failed", -9).error == ERR_STALE_ATTEMPT
    again = m.cancel("t1")
    assert again.error == ERR_ALREADY_FINAL and again.value == m.sm.task("t1")
    check_consistent(m.sm)


def test_effects_are_not_replayed_from_the_session_cache():
    m = M()
    m.submit()
    first = m("assign_task", id="t1", node="n1", attempt=1, ts=5, client="leader", seq=1)
    retry = m("assign_task", id="t1", node="n1", attempt=1, ts=5, client="leader", seq=1)
    assert first.effects == (("run", "n1", "t1", 1),)
    assert retry.ok and retry.effects == () and retry.value == first.value
    assert len(m.sm.task("t1")["attempts"]) == 1


# -- reads ----------------------------------------------------------------------------------


def test_list_tasks_order_filters_and_paging():
    m = M()
    # submission timestamps need not increase (different proposers)
    for task_id, ts in [("c", 30), ("a", 10), ("b", 30), ("d", 20), ("e", 10)]:
        m.submit(task_id, ts=ts)
    order = ["a", "e", "d", "b", "c"]
    assert [r["id"] for r in m.sm.list_tasks()] == order
    assert [r["id"] for r in m.sm.list_tasks(limit=2)] == ["a", "e"]
    assert [r["id"] for r in m.sm.list_tasks(limit=2, after_id="e")] == ["d", "b"]
    assert [r["id"] for r in m.sm.list_tasks(after_id="c")] == []
    assert m.sm.list_tasks(limit=0) == []
    m.assign("d", "n1", 1)
    m.assign("c", "n1", 1)
    m.assign("a", "n2", 1)
    m.start("a", "n2", 1)
    m.complete("c", "n1", 1)
    assert m.sm.tasks_by_state("submitted") == ["e", "b"]
    assert [r["id"] for r in m.sm.list_tasks(state="submitted")] == ["e", "b"]
    assert [r["id"] for r in m.sm.list_tasks(state="submitted", after_id="a")] == ["e", "b"]
    assert [r["id"] for r in m.sm.list_tasks(state="submitted", after_id="e")] == ["b"]
    assert [r["id"] for r in m.sm.list_tasks(node="n1")] == ["d", "c"]  # c finished there
    assert [r["id"] for r in m.sm.list_tasks(node="n1", state="assigned")] == ["d"]
    assert m.sm.tasks_on("n1") == ["d"] and m.sm.tasks_on("n2") == ["a"] and m.sm.tasks_on("n9") == []
    assert m.sm.node_load() == {"n1": 1, "n2": 1}
    assert m.sm.task_counts() == {"submitted": 2, "assigned": 1, "running": 1, "succeeded": 1,
                                  "failed": 0, "timed_out": 0, "cancelled": 0}
    with pytest.raises(KeyError):
        m.sm.list_tasks(after_id="zzz")
    with pytest.raises(ValueError):
        m.sm.list_tasks(state="sleeping")
    with pytest.raises(ValueError):
        m.sm.tasks_by_state("done")
    with pytest.raises(ValueError):
        m.sm.list_tasks(limit=-1)
    check_consistent(m.sm)


def test_reads_return_copies():
    m = M()
    m.submit()
    m.assign()
    m.sm.task("t1")["attempts"][0]["node"] = "evil"
    m.sm.list_tasks()[0]["state"] = "succeeded"
    res = m.start()
    res.value["attempts"].clear()
    rec = m.sm.task("t1")
    assert rec["attempts"][0]["node"] == "n1" and rec["state"] == "running"
    check_consistent(m.sm)  # the digest still matches the records


# -- snapshot and digest --------------------------------------------------------------------


def _busy_machine() -> M:
    m = M()
    m("submit_tasks", tasks=[spec(f"t{i}") for i in range(6)], ts=10)
    m.assign("t0", "n1", 1)
    m.assign("t1", "n1", 1)
    m.start("t1", "n1", 1)
    m.assign("t2", "n2", 1)
    m.complete("t2", "n2", 1, stdout=b"x" * 70_000)
    m.assign("t3", "n2", 1)
    m.expire("t3", 1)
    m.cancel("t4")
    return m


def test_snapshot_holds_the_tasks_and_restore_rebuilds_the_indexes():
    m = _busy_machine()
    body = msgpack.unpackb(msgpack.unpackb(m.sm.snapshot(), raw=False)["body"], raw=False)
    assert set(body) == {"applied_index", "max_sessions", "kv", "sessions", "tasks", "conf"}
    assert body["tasks"] == dict(m.sm.tasks)
    restored = StateMachine.load(m.sm.snapshot())
    assert restored.digest() == m.sm.digest() and restored.snapshot() == m.sm.snapshot()
    assert restored.node_load() == m.sm.node_load() == {"n1": 2}
    assert restored.tasks_on("n1") == m.sm.tasks_on("n1") == ["t0", "t1"]
    assert restored.task_counts() == m.sm.task_counts()
    assert restored.list_tasks() == m.sm.list_tasks()
    check_consistent(restored)
    # restore() in place replaces the indexes too
    other = _busy_machine()
    other.assign("t5", "n7", 1)
    other.sm.restore(m.sm.snapshot())
    assert other.sm.node_load() == {"n1": 2} and other.sm.tasks_on("n7") == []
    # and the restored machine goes on like the original
    a, b = M(restored), m
    for mm in (a, b):
        mm.complete("t1", "n1", 1)
        mm.assign("t3", "n3", 2)
    assert a.sm.snapshot() == b.sm.snapshot()


def _resnap(sm: StateMachine, mutate) -> bytes:
    outer = msgpack.unpackb(sm.snapshot(), raw=False)
    body = msgpack.unpackb(outer["body"], raw=False)
    mutate(body["tasks"])
    packed = state_mod._pack(body)
    return state_mod._pack({"format": outer["format"], "version": outer["version"], "body": packed,
                            "sha256": hashlib.sha256(packed).digest()})


@pytest.mark.parametrize("mutate", [
    lambda t: t["t0"].pop("stdout"),
    lambda t: t["t0"].update(state="done"),
    lambda t: t["t0"].update(kind="nope"),
    lambda t: t["t0"].update(id="other"),
    lambda t: t["t0"].update(attempt=2),
    lambda t: t["t0"].update(node="n9"),
    lambda t: t["t0"].update(state="submitted"),  # a live attempt in a waiting task
    lambda t: t["t1"]["attempts"][0].update(outcome="maybe"),
    lambda t: t["t2"].update(state="running"),  # closed attempt, live state
    lambda t: t["t2"].update(submitted_at="yesterday"),
])
def test_restore_rejects_malformed_task_records(mutate):
    m = _busy_machine()
    StateMachine.load(_resnap(m.sm, lambda t: None))  # the re-encoding itself is fine
    with pytest.raises(StateError, match="task"):
        StateMachine.load(_resnap(m.sm, mutate))


def test_digest_changes_on_every_effective_transition_and_only_then():
    m = M()
    steps = [
        (lambda: m.submit("t1", max_attempts=2), True),
        (lambda: m.submit("t1", max_attempts=2), False),  # idempotent
        (lambda: m.assign("t1", "n1", 1), True),
        (lambda: m.assign("t1", "n1", 1), False),
        (lambda: m.start("t1", "n1", 1), True),
        (lambda: m.start("t1", "n1", 1), False),
        (lambda: m.expire("t1", 1), True),
        (lambda: m.complete("t1", "n1", 1), False),
        (lambda: m.assign("t1", "n2", 2), True),
        (lambda: m.complete("t1", "n2", 2), True),
        (lambda: m.cancel("t1"), False),
        (lambda: m.submit("t2"), True),
        (lambda: m.cancel("t2"), True),
    ]
    for i, (step, effective) in enumerate(steps):
        unchanged = m.noop_digest()
        step()
        assert (m.sm.digest() != unchanged) == effective, i
        assert m.sm.digest() == m.sm.digest_full()


def test_task_ops_keep_the_digest_incremental(monkeypatch):
    m = _busy_machine()

    def walk(self):
        raise AssertionError("full walk")

    monkeypatch.setattr(StateMachine, "_items", walk)
    m.submit("new")
    m.assign("new", "n1", 1)
    m.start("new", "n1", 1)
    m.complete("new", "n1", 1)
    m.cancel("t5")
    m.sm.digest()


# -- random histories -----------------------------------------------------------------------

NODES = ["n1", "n2", "n3"]
IDS = ["t0", "t1", "t2", "t3"]  # submitted at the start; more arrive later
LIVE = ("assigned", "running")


def expected_ok(op: str, f: dict, before: dict | None) -> bool:
    """A reference model of which task commands take effect."""
    if op == "submit_task":
        fields = ("id", "kind", "args", "timeout_ms", "max_attempts", "policy", "key")
        return before is None or check_task_spec(f["task"]) == {k: before[k] for k in fields}
    if before is None:
        return False
    state, attempt, node = before["state"], before["attempt"], before["node"]
    if op == "assign_task":
        return state == "submitted" and f["attempt"] == attempt + 1 <= before["max_attempts"]
    if op == "start_task":  # a repeat for the running attempt is ok (no change)
        return state in LIVE and (f["attempt"], f["node"]) == (attempt, node)
    if op == "complete_task":
        return state in LIVE and (f["attempt"], f["node"]) == (attempt, node)
    if op == "expire_task":
        return state in LIVE and f["attempt"] == attempt
    if op == "cancel_task":
        return state not in FINAL_STATES
    raise AssertionError(op)


def expected_state(op: str, f: dict, before: dict | None) -> str:
    """The state a task command that took effect leaves the task in."""
    if op == "expire_task":
        return "submitted" if f["attempt"] < before["max_attempts"] else "failed"
    if op == "complete_task":
        return f["outcome"]
    return {"submit_task": "submitted", "assign_task": "assigned", "start_task": "running",
            "cancel_task": "cancelled"}[op]


class TaskTable(RuleBasedStateMachine):
    """A leader and several nodes drive tasks forward, while stale, late, duplicated and
    misdirected commands arrive in between. A twin machine applies the same entries and
    is never snapshotted; the main machine is replaced by a restore of its own snapshot
    now and then."""

    @initialize(max_attempts=st.lists(st.integers(1, 3), min_size=len(IDS), max_size=len(IDS)))
    def setup(self, max_attempts):
        self.m = M()
        self.twin = M()
        self.finals: dict[str, dict] = {}
        self.attempts: dict[str, int] = {}
        for task_id, n in zip(IDS, max_attempts):
            assert self.do("submit_task", task=spec(task_id, max_attempts=n)).ok

    def do(self, op, **fields):
        task_id = fields["id"] if "id" in fields else fields["task"]["id"]
        before = self.m.sm.task(task_id)
        unchanged = self.m.noop_digest()
        res = self.m(op, **fields)
        assert res == self.twin(op, **fields)
        assert res.ok == expected_ok(op, fields, before), (op, fields, before and before["state"], res)
        after = self.m.sm.task(task_id)
        changed = after != before
        # the digest changes exactly when the state does
        assert (self.m.sm.digest() != unchanged) == changed
        if changed:
            assert res.ok and res.value == after
            assert after["state"] == expected_state(op, fields, before)
        if before is not None and before["state"] in FINAL_STATES:
            assert not changed
        # effects: exactly what the transition calls for
        if op == "assign_task" and res.ok:
            assert res.effects == (("run", fields["node"], task_id, fields["attempt"]),)
        elif op == "cancel_task" and res.ok and before["state"] in LIVE:
            assert res.effects == (("kill", before["node"], task_id, before["attempt"]),)
        else:
            assert res.effects == ()
        return res

    def rec(self, task_id):
        return self.m.sm.task(task_id)

    def pick(self, data, *states):
        """A task in one of ``states`` if there is one (else any: the command is then stale)."""
        ids = [t for s in states for t in self.m.sm.tasks_by_state(s)] or IDS
        return data.draw(st.sampled_from(sorted(ids)))

    # the leader and the nodes doing their jobs

    @rule(data=st.data(), node=st.sampled_from(NODES))
    def leader_assigns(self, data, node):
        task_id = self.pick(data, "submitted")
        self.do("assign_task", id=task_id, node=node, attempt=self.rec(task_id)["attempt"] + 1)

    @rule(data=st.data())
    def node_starts(self, data):
        task_id = self.pick(data, "assigned", "running")
        r = self.rec(task_id)
        self.do("start_task", id=task_id, node=r["node"] or "n1", attempt=max(1, r["attempt"]))

    @rule(data=st.data(), outcome=st.sampled_from(TASK_OUTCOMES), out=st.sampled_from([b"", b"ok", b"z" * 70_000]))
    def node_completes(self, data, outcome, out):
        task_id = self.pick(data, "assigned", "running")
        r = self.rec(task_id)
        self.do("complete_task", id=task_id, node=r["node"] or "n1", attempt=max(1, r["attempt"]), outcome=outcome,
                exit_code=None if outcome == "timed_out" else 0, stdout=out, stderr=b"")

    @rule(data=st.data())
    def leader_expires(self, data):
        task_id = self.pick(data, "assigned", "running")
        self.do("expire_task", id=task_id, attempt=max(1, self.rec(task_id)["attempt"]), reason="lease")

    @rule(task_id=st.sampled_from(IDS), go=st.sampled_from([True, False, False, False, False]))
    def operator_cancels(self, task_id, go):
        if go:
            self.do("cancel_task", id=task_id)

    # what goes wrong in a distributed system

    @rule(task_id=st.sampled_from(IDS), data=st.data(), outcome=st.sampled_from(TASK_OUTCOMES))
    def late_result_of_an_old_attempt(self, task_id, data, outcome):
        old = self.rec(task_id)["attempts"]
        if old:
            a = data.draw(st.sampled_from(old))
            self.do("complete_task", id=task_id, node=a["node"], attempt=a["attempt"], outcome=outcome,
                    exit_code=1, stdout=b"late", stderr=b"")

    @rule(op=st.sampled_from(["assign_task", "start_task", "complete_task", "expire_task"]),
          task_id=st.sampled_from([*IDS, "ghost"]), node=st.sampled_from(NODES), attempt=st.integers(1, 4))
    def noise(self, op, task_id, node, attempt):
        fields = {"id": task_id, "attempt": attempt}
        if op == "expire_task":
            fields["reason"] = "noise"
        else:
            fields["node"] = node
        if op == "complete_task":
            fields.update(outcome="failed", exit_code=9, stdout=b"noise", stderr=b"")
        self.do(op, **fields)

    @rule(task_id=st.sampled_from([*IDS, "t4", "t5", "t6", "t7"]), max_attempts=st.integers(1, 3),
          ts=st.integers(0, 50))
    def client_submits(self, task_id, max_attempts, ts):
        self.do("submit_task", task=spec(task_id, max_attempts=max_attempts), ts=ts)

    @rule()
    def snapshot_and_restore(self):
        restored = StateMachine.load(self.m.sm.snapshot())
        assert restored.digest() == self.m.sm.digest()
        for read in ("node_load", "task_counts", "list_tasks"):
            assert getattr(restored, read)() == getattr(self.m.sm, read)()
        self.m = M(restored)

    @invariant()
    def invariants(self):
        sm = self.m.sm
        assert sm.digest() == self.twin.sm.digest()
        check_consistent(sm)
        for task_id, rec in sm.tasks.items():
            attempts = rec["attempts"]
            # attempt numbers are 1..n and never go back
            assert [a["attempt"] for a in attempts] == list(range(1, rec["attempt"] + 1))
            assert rec["attempt"] >= self.attempts.get(task_id, 0)
            self.attempts[task_id] = rec["attempt"]
            assert rec["attempt"] <= rec["max_attempts"]
            if rec["state"] == "submitted":  # a waiting task can always get another attempt
                assert rec["attempt"] < rec["max_attempts"] and rec["node"] is None
            # at most one live attempt: the current one, exactly when the task is assigned/running
            live = [a for a in attempts if a["outcome"] is None]
            assert len(live) <= 1
            assert bool(live) == (rec["state"] in LIVE)
            if live:
                assert live[0] == attempts[-1] and rec["node"] == live[0]["node"]
            # at most one final result, and it is the task's
            results = [a["outcome"] for a in attempts if a["outcome"] in TASK_OUTCOMES]
            assert len(results) <= 1
            if results:
                assert attempts[-1]["outcome"] == results[0] == rec["state"]
            # final states never change
            if task_id in self.finals:
                assert rec == self.finals[task_id]
            elif rec["state"] in FINAL_STATES:
                self.finals[task_id] = sm.task(task_id)


TaskTable.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_histories_keep_the_invariants = TaskTable.TestCase


# -- retention: forget_tasks ------------------------------------------------------------------


def test_forget_tasks_forgets_the_first_submitted_finished_tasks_only():
    m = M()
    for i in range(10):
        m.submit(f"t{i}", ts=100 + i)
    for i in (0, 1, 2, 4, 6, 8):  # finished: t0 t1 t2 t4 t6 t8 (t3 running, the rest waiting)
        m.assign(f"t{i}")
        m.start(f"t{i}")
        m.complete(f"t{i}")
    m.assign("t3")
    m.start("t3")
    m.cancel("t5")  # finished too, without running
    assert m.sm.finished_tasks() == 7

    r = m.raw(encode_command("forget_tasks", keep=3))
    assert r.ok and r.value == 4
    # the four finished ones submitted first are gone; running and waiting ones stay
    assert [t for t in (f"t{i}" for i in range(10)) if m.sm.task(t) is None] == ["t0", "t1", "t2", "t4"]
    assert m.sm.finished_tasks() == 3
    assert m.sm.task("t3")["state"] == "running" and m.sm.task("t9")["state"] == "submitted"
    assert m.sm.task("t8")["stdout"] == b"out"  # kept ones keep their results
    # nothing more to forget: a no-op that still applies
    r = m.raw(encode_command("forget_tasks", keep=3))
    assert r.ok and r.value == 0
    # a forgotten id is unknown: resubmitting it is a new task
    assert m.submit("t0", ts=500).ok and m.sm.task("t0")["state"] == "submitted"


def test_forget_tasks_leaves_replicas_and_snapshots_equal():
    a, b = M(), M()
    for m in (a, b):
        for i in range(6):
            m.submit(f"t{i}", ts=10 + i)
            m.cancel(f"t{i}")
        m.raw(encode_command("forget_tasks", keep=2))
    assert a.sm.digest() == b.sm.digest()
    restored = StateMachine.load(a.sm.snapshot())
    assert restored.digest() == a.sm.digest()
    assert sorted(restored.tasks) == ["t4", "t5"]
    assert restored.task_counts()["cancelled"] == 2


def test_forget_tasks_command_is_validated():
    with pytest.raises(CommandError, match="keep"):
        encode_command("forget_tasks", keep=-1)
    with pytest.raises(CommandError):
        encode_command("forget_tasks")
