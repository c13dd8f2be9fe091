"""Tasks on real agents: placement by load, exactly one final result per task through
node and leader kills, heartbeats unharmed by CPU-heavy tasks, and refused bad input."""

from __future__ import annotations

import asyncio
import collections
import random
import time

import pytest

from console.client import InvalidRequest, RequestError

pytestmark = pytest.mark.integration

FINAL = {"succeeded", "failed", "timed_out", "cancelled"}


def sleep_tasks(prefix: str, durations_ms: list[int], **extra) -> list[dict]:
    return [{"id": f"{prefix}{i}", "kind": "sleep", "args": {"ms": d}, "timeout_ms": 30_000,
             **extra} for i, d in enumerate(durations_ms)]


def check_exactly_once(records: list[dict]) -> None:
    """Each task has one final result, from its last attempt, and no attempt but the last
    one carries a success."""
    for r in records:
        assert r["state"] == "succeeded", r
        outcomes = [a["outcome"] for a in r["attempts"]]
        assert outcomes[-1] == "succeeded" and outcomes.count("succeeded") == 1, r
        assert all(o in ("lost", "cancelled") for o in outcomes[:-1]), r
        assert r["node"] == r["attempts"][-1]["node"]


def run(coro):
    return asyncio.run(coro)


def test_two_hundred_tasks_spread_evenly_and_each_finishes_once(make_cluster):
    lc = make_cluster(5, capacities={n: 2 for n in ("n1", "n2", "n3", "n4", "n5")})

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            rng = random.Random(7)
            specs = sleep_tasks("t", [rng.randint(20, 200) for _ in range(200)])
            await c.submit(specs)
            records = await c.wait([s["id"] for s in specs], timeout=120)
            check_exactly_once(records)
            per_node = collections.Counter(r["node"] for r in records)
            ideal = len(records) / 5
            for node in lc.names:
                assert abs(per_node[node] - ideal) <= 0.2 * ideal, per_node
            # Every replica agrees on the table.
            st = await lc.wait_converged(c)
            assert {s["tasks"]["counts"]["succeeded"] for s in st.values()} == {200}

    run(main())


def test_work_follows_capacities_one_two_four(make_cluster):
    lc = make_cluster(3, capacities={"n1": 1, "n2": 2, "n3": 4})

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            specs = sleep_tasks("w", [30] * 140)
            await c.submit(specs)
            records = await c.wait([s["id"] for s in specs], timeout=120)
            check_exactly_once(records)
            per_node = collections.Counter(r["node"] for r in records)
            for node, cap in (("n1", 1), ("n2", 2), ("n3", 4)):
                share = 140 * cap / 7
                assert abs(per_node[node] - share) <= 0.2 * share, per_node

    run(main())


@pytest.mark.parametrize("victim", ["worker", "leader"])
def test_tasks_survive_the_death_of_their_node_or_of_the_leader(make_cluster, victim):
    lc = make_cluster(3, capacities={"n1": 2, "n2": 2, "n3": 2}, task_lease_ms=2000)

    async def main():
        async with lc.client(timeout=3.0) as c:
            leader = await lc.wait_leader(c)
            specs = sleep_tasks("k", [1500] * 18)
            await c.submit(specs)
            # Wait until some tasks run on the victim, then SIGKILL it.
            target = leader if victim == "leader" else next(n for n in lc.names if n != leader)
            deadline = time.monotonic() + 30
            while True:
                running = await c.tasks(state="running", node=target)
                if running:
                    break
                assert time.monotonic() < deadline, "nothing ever ran on the victim"
                await asyncio.sleep(0.05)
            lc.kill(target)
            records = await c.wait([s["id"] for s in specs], timeout=120)
            check_exactly_once(records)
            moved = [r for r in records if len(r["attempts"]) > 1]
            assert moved, "no task was reassigned after its node died"
            assert all(r["attempts"][0]["node"] == target for r in moved)
            assert all(r["node"] != target for r in moved)
            # The killed node comes back, catches up, and agrees on every result.
            lc.start(target)
            st = await lc.wait_converged(c, timeout=60)
            assert {s["tasks"]["counts"]["succeeded"] for s in st.values()} == {18}

    run(main())


@pytest.mark.long(20)  # seconds, roughly: the longest start first
def test_cpu_heavy_tasks_cause_no_election(make_cluster):
    lc = make_cluster(3, capacities={"n1": 2, "n2": 2, "n3": 2})

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            before = {n: s["term"] for n, s in (await lc.statuses(c)).items()}
            # Six processes burning 5 s of CPU each: both cores busy for 15 s, fifteen
            # election timeouts (10 s each made it the run's heaviest test, and slowed
            # every test beside it for half a minute).
            specs = [{"id": f"cpu{i}", "kind": "cpu", "args": {"ms": 5_000},
                      "timeout_ms": 120_000} for i in range(6)]
            await c.submit(specs)
            records = await c.wait([s["id"] for s in specs], timeout=180)
            assert all(r["state"] == "succeeded" for r in records)
            after = {n: s["term"] for n, s in (await lc.statuses(c)).items()}
            assert after == before, f"terms moved under CPU load: {before} -> {after}"

    run(main())


def test_bad_tasks_are_refused_with_a_clear_error_and_nothing_is_stored(make_cluster):
    lc = make_cluster(3)

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            # Refused by the codec before anything is sent: it names the field.
            for bad, field in (
                ({"id": "b1", "kind": "nope", "args": {}, "timeout_ms": 10}, "kind"),
                ({"id": "b2", "kind": "sleep", "args": {"ms": 1}, "timeout_ms": -5}, "timeout_ms"),
            ):
                with pytest.raises(InvalidRequest) as e:  # a RequestError: no effect
                    await c.submit([bad])
                assert field in str(e.value) and "nothing was sent" in str(e.value)
            # Refused by the agent: an oversized payload, bad args, shell when not allowed.
            for bad, words in (
                ({"id": "b3", "kind": "echo", "args": {"data": b"x" * (65 * 1024)},
                  "timeout_ms": 1000}, "data"),
                ({"id": "b4", "kind": "sleep", "args": {"ms": -1}, "timeout_ms": 1000}, "ms"),
                ({"id": "b5", "kind": "shell", "args": {"cmd": "true"}, "timeout_ms": 1000},
                 "allow_shell"),
            ):
                with pytest.raises(RequestError) as e:
                    await c.submit([bad])
                assert words in e.value.message, e.value.message
            for tid in ("b1", "b2", "b3", "b4", "b5"):
                assert await c.task(tid) is None
            st = await lc.statuses(c)
            assert all(sum(s["tasks"]["counts"].values()) == 0 for s in st.values())

    run(main())


def test_cancel_a_running_task_and_resubmit_is_idempotent(make_cluster):
    lc = make_cluster(3)

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            spec = sleep_tasks("c", [60_000])
            await c.submit(spec)
            await c.submit(spec)  # the same id and spec again: a no-op
            deadline = time.monotonic() + 30
            while (await c.task("c0"))["state"] != "running":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            rec = await c.cancel("c0")
            assert rec["state"] == "cancelled"
            [final] = await c.wait(["c0"], timeout=10)
            assert final["state"] == "cancelled"
            # Its process is gone: no node reports it running.
            deadline = time.monotonic() + 15
            while True:
                st = await lc.statuses(c)
                if all(s["tasks"]["executor"]["running"] == 0 for s in st.values()):
                    break
                assert time.monotonic() < deadline, "the cancelled task kept running"
                await asyncio.sleep(0.1)
            # The same id with another spec is refused, per task, and changes nothing.
            r = await c.submit(sleep_tasks("c", [5]))
            assert r["results"][0]["ok"] is False
            assert r["results"][0]["error"] == "task_exists", r
            assert (await c.task("c0"))["state"] == "cancelled"

    run(main())


def test_learners_take_tasks_like_voters(make_cluster):
    """A cluster of 3 voters and 2 non-voting learners: the learners never vote or lead,
    but they run their share of the work."""
    lc = make_cluster(5, roles={"n4": "learner", "n5": "learner"})

    async def main():
        async with lc.client() as c:
            leader = await lc.wait_leader(c)
            assert leader in ("n1", "n2", "n3")
            st = await c.call(leader, "status")
            assert st["learners"] == ["n4", "n5"] and st["voters"] == ["n1", "n2", "n3"]
            specs = sleep_tasks("l", [20] * 50)
            await c.submit(specs)
            records = await c.wait([s["id"] for s in specs], timeout=120)
            check_exactly_once(records)
            per_node = collections.Counter(r["node"] for r in records)
            assert per_node["n4"] >= 5 and per_node["n5"] >= 5, per_node

    run(main())


def test_finished_tasks_beyond_the_retention_are_forgotten_on_every_replica(make_cluster):
    """task_retention 10: whenever finished tasks exceed it by the slack (100), the leader
    has every replica forget the finished ones submitted first, down to 10. The newest keep
    their results, and every replica agrees (tests/state covers which ones exactly)."""
    lc = make_cluster(3, capacities={n: 4 for n in ("n1", "n2", "n3")},
                      cluster_extra={"task_retention": 10})

    async def main():
        async with lc.client() as c:
            leader = await lc.wait_leader(c)
            ids = [f"r{i:03d}" for i in range(130)]
            await c.submit([{"id": t, "kind": "echo", "args": {"data": t.encode()},
                             "timeout_ms": 30_000} for t in ids])
            deadline = time.monotonic() + 120
            while True:  # all 130 finished (or forgotten): none waiting or running
                st = await lc.statuses(c, [leader])
                counts = st[leader]["tasks"]["counts"]
                live = counts["submitted"] + counts["assigned"] + counts["running"]
                if live == 0 and await c.task(ids[-1]) is not None \
                        and (await c.task(ids[-1]))["state"] in FINAL:
                    break
                assert time.monotonic() < deadline, counts
                await asyncio.sleep(0.2)
            assert st[leader]["tasks"]["retention"] == 10
            assert 10 <= counts["succeeded"] <= 110, counts  # at least one forget happened
            records = await c.tasks(limit=1000)
            kept = [r["id"] for r in records]
            assert all(r["state"] in FINAL for r in records)
            # The first submitted go first, among those finished at the time (a task still
            # running then is kept); the newest are all there.
            assert kept == sorted(kept) and ids[0] not in kept and ids[-10:] == kept[-10:], kept
            assert (await c.task(ids[-1]))["stdout"] == ids[-1].encode()
            assert await c.task(ids[0]) is None
            st = await lc.wait_converged(c)
            assert {s["tasks"]["counts"]["succeeded"] for s in st.values()} == {len(kept)}

    run(main())


def test_a_lost_task_report_is_sent_again_while_its_node_lives(make_cluster, monkeypatch):
    """Every agent drops its first two task reports, as a full report queue would
    (``RAFTDECK_TEST_DROP_REPORTS``). The nodes stay alive, so no lease expires their
    attempts: only the resend pass (nodeagent/tasks.py) gets those results committed.
    With one slot per node, the two dropped are the start and the result of the first
    task each node runs. Each task still ends with one attempt and its own result."""
    monkeypatch.setenv("RAFTDECK_TEST_DROP_REPORTS", "2")
    lc = make_cluster(3, capacities={n: 1 for n in ("n1", "n2", "n3")})

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            ids = [f"e{i}" for i in range(9)]
            await c.submit([{"id": t, "kind": "echo", "args": {"data": t.encode()},
                             "timeout_ms": 30_000} for t in ids])
            records = await c.wait(ids, timeout=60)
            for r in records:
                assert r["state"] == "succeeded", r
                assert r["stdout"] == r["id"].encode(), r
                assert [a["attempt"] for a in r["attempts"]] == [1], r  # never expired
            st = await lc.statuses(c)
            ran = {r["node"] for r in records}
            for name in ran:
                tasks = st[name]["tasks"]
                assert tasks["reports_lost"] == 2, (name, tasks)
                assert tasks["reports_resent"] >= 1, (name, tasks)
                assert tasks["expired_total"] == 0, (name, tasks)

    run(main())


def test_a_lost_start_report_is_sent_again_while_the_task_runs(make_cluster, monkeypatch):
    """The agent drops its first report: the start of a long task. The state would show
    the attempt ``assigned`` for as long as it runs; the resend pass reports the start."""
    monkeypatch.setenv("RAFTDECK_TEST_DROP_REPORTS", "1")
    lc = make_cluster(1)

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            await c.submit(sleep_tasks("s", [60_000]))
            deadline = time.monotonic() + 30
            while (rec := await c.task("s0"))["state"] != "running":
                assert rec["state"] == "assigned" or rec["state"] == "submitted", rec
                assert time.monotonic() < deadline, f"the start was never reported: {rec}"
                await asyncio.sleep(0.1)
            st = await lc.statuses(c)
            assert st["n1"]["tasks"]["reports_lost"] == 1, st["n1"]["tasks"]
            assert st["n1"]["tasks"]["reports_resent"] == 1, st["n1"]["tasks"]
            assert (await c.cancel("s0"))["state"] == "cancelled"

    run(main())


def test_short_tasks_do_not_queue_behind_a_long_one_while_other_nodes_idle(make_cluster):
    """Late binding (task_queue_per_slot 1): a node of one slot holds at most one task
    queued behind the one it runs; the rest wait at the leader and go to whichever node
    frees a slot. Placing everything at submit time put a third of the short tasks behind
    the long one."""
    lc = make_cluster(3, capacities={n: 1 for n in ("n1", "n2", "n3")})

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            await c.submit(sleep_tasks("long", [60_000]))
            deadline = time.monotonic() + 30
            while (rec := await c.task("long0"))["state"] != "running":
                assert time.monotonic() < deadline, rec
                await asyncio.sleep(0.05)
            busy = rec["node"]
            short = sleep_tasks("s", [50] * 30)
            await c.submit(short)
            deadline = time.monotonic() + 90
            while True:
                done = [t for t in await c.tasks(state="succeeded", limit=100)
                        if t["id"].startswith("s")]
                if len(done) >= 29:
                    break
                assert time.monotonic() < deadline, f"{len(done)} of 30 short tasks done"
                await asyncio.sleep(0.1)
            assert (await c.task("long0"))["state"] == "running"  # none waited for it
            await c.cancel("long0")
            records = await c.wait([t["id"] for t in short], timeout=60)
            assert all(r["state"] == "succeeded" for r in records)
            on_busy = [r["id"] for r in records if r["node"] == busy]
            assert len(on_busy) <= 1, (busy, on_busy)
            st = await c.call(lc.names[0], "status")
            assert st["tasks"]["counts"]["submitted"] == 0

    run(main())
