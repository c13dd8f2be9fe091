"""Tasks over real processes: end-to-end dispatch throughput, and the makespan of a skewed
workload under two placement policies against what a perfect scheduler could do.

Each phase starts its own 3-agent cluster (``console.local.LocalCluster``: fsync on,
election 1000 ms, heartbeat 100 ms, so the leader places new tasks on its 100 ms tick) in
a temporary directory, drives it with the asyncio ``ClusterClient`` and always stops it.
Before a phase is timed, a few warm-up echo tasks run until every agent has run one: the
leader has then heard every agent's load report, and the interpreter the task runner uses
is in the page cache. The warm-up count is a multiple of 3, so round_robin's cursor is back
at the first node afterwards.

- throughput: no-op tasks (``echo`` with empty data, or ``sleep 0`` with ``--kind sleep``),
  3 agents of capacity 4, the default policy (least_loaded). One client submits N tasks in
  batches (each batch is one ``submit`` request, awaited before the next), then waits with
  ``ClusterClient.wait`` until every result is committed. tasks/s is N over the client's
  wall time from the first submit until ``wait`` returned. Per-task latency comes from the
  records: ``submitted_at`` (leader's clock, when it took the request) to ``finished_at``
  (the running node's clock, when the task process ended; every clock here is this
  machine's). It is split into stages from the attempt: queue (submitted -> assigned by the
  leader's tick), start (assigned -> the node took a slot: commit, apply, wait for a slot)
  and run (slot taken -> process ended: spawning a Python task runner dominates).
- makespan: M ``sleep`` tasks with heavy-tailed durations (Pareto, alpha 1.5, scale 50 ms,
  capped at 2 s, rounded to whole ms; a fixed seed), 3 agents of capacity 2 (6 slots),
  once under least_loaded and once under round_robin, each on a fresh cluster, the same
  durations in the same order. All M tasks go in ONE submit request. The leader gives each
  node at most ``capacity * (1 + task_queue_per_slot)`` tasks (default: one queued per
  slot); the rest wait in the table and are placed, on a leader tick, as slots free (late
  binding), and a node runs what it was given FIFO. Submitting in several waves would add
  the gaps between the waves to the makespan. The measured (wall) makespan is
  ``max(finished_at) - min(submitted_at)``. It is compared with pure figures computed from
  the same durations and slots (``nodeagent.dispatch``): ``lpt_makespan`` (longest task
  first, each onto the slot that frees first: what a scheduler knowing every duration
  achieves) and ``makespan_lower_bound`` (``max(longest, total / slots)``: no schedule does
  better). More figures separate placement from overhead: ``placement_makespan`` replays
  the placement the cluster actually made (each node runs its tasks FIFO, in the order it
  started them, on its own slots) with the requested durations and zero overhead;
  ``global_queue_makespan`` is one shared FIFO queue over all 6 slots in submission order
  (what placing a task when a slot frees would give, still blind to durations). The
  ``*_held`` figures redo the bound, LPT and the replay with the time each task really held
  its slot (``started_at`` to ``finished_at``: the sleep plus spawning and reaping a Python
  task runner), so ``wall - placement_makespan_held`` is what the cluster's own latencies
  (placement tick, commits, refilling a freed slot) added.

    python -m bench.dispatch [--tasks 500] [--batch 100] [--makespan-tasks 120] [--seed 1]

Prints one JSON object. Percentiles by nearest rank. Client, agents and task processes
share this machine's CPUs; on a small machine the cost of spawning one Python process per
task is a large part of every figure (see ``cpu``: ``children_cpu_s`` is the CPU of the
task processes each agent reaped).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import heapq
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.kv import fs_type, latency_summary, percentile
from console.client import ClusterClient
from console.local import LocalCluster
from nodeagent.dispatch import lpt_makespan, makespan_lower_bound

_CLK_TCK = os.sysconf("SC_CLK_TCK")
FINAL_OK = "succeeded"
NODES = 3


# -- small helpers ----------------------------------------------------------------------


def summary(samples: list[float]) -> dict:
    return latency_summary(samples)


def proc_times(pid: int) -> tuple[float, float] | None:
    """(own utime+stime, reaped children's cutime+cstime) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return ((int(fields[11]) + int(fields[12])) / _CLK_TCK,
                (int(fields[13]) + int(fields[14])) / _CLK_TCK)
    except (OSError, IndexError, ValueError):
        return None


def cpu_snapshot(lc: LocalCluster) -> dict:
    return {"t": time.perf_counter(), "client": time.process_time(),
            "agents": {n: proc_times(lc.procs[n].pid) if lc.alive(n) else None for n in lc.names}}


def cpu_diff(a: dict, b: dict, tasks: int) -> dict:
    wall = b["t"] - a["t"]
    agents = {}
    own_total = child_total = 0.0
    for n, tb in b["agents"].items():
        ta = a["agents"].get(n)
        if ta is None or tb is None:
            agents[n] = None
            continue
        own, child = tb[0] - ta[0], tb[1] - ta[1]
        own_total += own
        child_total += child
        agents[n] = {"cpu_s": round(own, 2), "children_cpu_s": round(child, 2)}
    client = b["client"] - a["client"]
    total = own_total + child_total + client
    return {
        "agents": agents,
        "client_cpu_s": round(client, 2),
        "agents_cpu_s": round(own_total, 2),
        "task_processes_cpu_s": round(child_total, 2),
        "cpu_ms_per_task_agents": round(own_total * 1000 / tasks, 2) if tasks else None,
        "cpu_ms_per_task_processes": round(child_total * 1000 / tasks, 2) if tasks else None,
        "cpu_cores_busy": round(total / wall, 2) if wall > 0 else None,
    }


def pareto_durations(n: int, seed: int, alpha: float, scale_ms: float, cap_ms: int) -> list[int]:
    """``n`` durations in whole ms: ``scale * Pareto(alpha)`` (so >= scale), capped at ``cap``."""
    rng = random.Random(seed)
    return [min(cap_ms, max(1, round(scale_ms * rng.paretovariate(alpha)))) for _ in range(n)]


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of running ``durations`` in the given order, each on the slot that frees
    first (Graham's list scheduling; a single FIFO queue feeding ``slots`` workers)."""
    if not durations:
        return 0.0
    finish = [0.0] * min(slots, len(durations))
    for d in durations:
        heapq.heapreplace(finish, finish[0] + d)
    return max(finish)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# -- the cluster ------------------------------------------------------------------------


class Cluster:
    """A LocalCluster in its own directory, started on enter and always stopped on exit."""

    def __init__(self, parent: str, label: str, capacity: int, policy: str):
        self.dir = Path(parent) / label
        self.lc = LocalCluster(self.dir, NODES, fsync=True, name=f"bench-dispatch-{label}",
                               capacities={f"n{i + 1}": capacity for i in range(NODES)},
                               dispatch_policy=policy)
        self.stderr: dict[str, str] = {}

    def __enter__(self) -> LocalCluster:
        self.lc.start_all()
        return self.lc

    def __exit__(self, *exc) -> None:
        self.lc.stop_all()
        self.stderr = {n: self.lc.stderr(n)[-2000:] for n in self.lc.names if self.lc.stderr(n).strip()}


async def ready(lc: LocalCluster, c: ClusterClient, prefix: str, wait_s: float = 60.0) -> dict:
    """Wait for a leader, then run warm-up echo tasks (3 at a time) until every agent has
    run one. Returns what it took."""
    t0 = time.perf_counter()
    leader = await lc.wait_leader(c, timeout=wait_s)
    seen: set[str] = set()
    rounds = 0
    while seen != set(lc.names):
        if rounds >= 20:
            raise RuntimeError(f"warm-up: only {sorted(seen)} ran tasks after {rounds} rounds")
        specs = [{"id": f"{prefix}-warm-{rounds:02d}-{i}", "kind": "echo", "args": {"data": b""},
                  "timeout_ms": 30_000} for i in range(NODES)]
        await c.submit(specs)
        recs = await c.wait([s["id"] for s in specs], timeout=wait_s)
        seen |= {r["node"] for r in recs}
        rounds += 1
    return {"leader": leader, "warmup_tasks": rounds * NODES,
            "ready_s": round(time.perf_counter() - t0, 3)}


def check_submit(r: dict, n: int) -> None:
    bad = [x for x in r["results"] if not x["ok"]]
    if len(r["results"]) != n or bad:
        raise RuntimeError(f"submit refused {len(bad)} of {n} tasks: {bad[:3]}")


def stage_times(recs: list[dict]) -> dict:
    """Per-task stage durations in ms from the records (last attempt)."""
    total, queue, start, run = [], [], [], []
    for r in recs:
        a = r["attempts"][-1] if r["attempts"] else None
        if r["finished_at"] is not None:
            total.append(r["finished_at"] - r["submitted_at"])
        if a is None:
            continue
        queue.append(a["assigned_at"] - r["submitted_at"])
        if a["started_at"] is not None:
            start.append(a["started_at"] - a["assigned_at"])
            if a["finished_at"] is not None:
                run.append(a["finished_at"] - a["started_at"])
    return {"total": total, "queue": queue, "start": start, "run": run}


def outcome_counts(recs: list[dict]) -> dict:
    return dict(sorted(collections.Counter(r["state"] for r in recs).items()))


# -- phase 1: throughput ----------------------------------------------------------------


async def throughput(lc: LocalCluster, a: argparse.Namespace) -> dict:
    async with lc.client(timeout=a.timeout) as c:
        warm = await ready(lc, c, "tp")
        args = {"data": b""} if a.kind == "echo" else {"ms": 0}
        specs = [{"id": f"tp-{i:06d}", "kind": a.kind, "args": args, "timeout_ms": 60_000}
                 for i in range(a.tasks)]
        ids = [s["id"] for s in specs]
        before = cpu_snapshot(lc)
        t_start = time.perf_counter()
        for i in range(0, len(specs), a.batch):
            chunk = specs[i:i + a.batch]
            check_submit(await c.submit(chunk), len(chunk))
        t_submitted = time.perf_counter()
        recs = await c.wait(ids, timeout=max(120.0, a.tasks * 0.5))
        t_done = time.perf_counter()
        after = cpu_snapshot(lc)
    wall = t_done - t_start
    stages = stage_times(recs)
    first_sub = min(r["submitted_at"] for r in recs)
    last_fin = max(r["finished_at"] for r in recs if r["finished_at"] is not None)
    return {
        "nodes": NODES,
        "capacity_per_node": a.tp_capacity,
        "policy": "least_loaded",
        "kind": a.kind,
        "tasks": a.tasks,
        "batch": a.batch,
        **warm,
        "outcomes": outcome_counts(recs),
        "retried_tasks": sum(1 for r in recs if r["attempt"] > 1),
        "per_node": dict(sorted(collections.Counter(r["node"] for r in recs).items())),
        "wall_s": round(wall, 3),
        "tasks_per_s": round(a.tasks / wall, 1) if wall > 0 else None,
        "submit_s": round(t_submitted - t_start, 3),
        "first_submit_to_last_finish_s": round((last_fin - first_sub) / 1000, 3),
        "latency": summary(stages["total"]),
        "stages_p50_ms": {k: percentile(sorted(v), 50) for k, v in stages.items() if k != "total"},
        "stages_p99_ms": {k: percentile(sorted(v), 99) for k, v in stages.items() if k != "total"},
        "cpu": cpu_diff(before, after, a.tasks),
    }


# -- phase 2: makespan ------------------------------------------------------------------


async def makespan_run(lc: LocalCluster, a: argparse.Namespace, policy: str,
                       durations: list[int]) -> dict:
    async with lc.client(timeout=a.timeout) as c:
        warm = await ready(lc, c, f"ms-{policy}")
        specs = [{"id": f"ms-{i:05d}", "kind": "sleep", "args": {"ms": d},
                  "timeout_ms": 60_000} for i, d in enumerate(durations)]
        ids = [s["id"] for s in specs]
        before = cpu_snapshot(lc)
        t_start = time.perf_counter()
        check_submit(await c.submit(specs), len(specs))  # all at once: one request
        recs = await c.wait(ids, timeout=max(120.0, sum(durations) / 1000 * 2))
        t_done = time.perf_counter()
        after = cpu_snapshot(lc)
    bad = [r for r in recs if r["state"] != FINAL_OK or r["attempts"][-1]["started_at"] is None]
    if bad:
        raise RuntimeError(f"makespan {policy}: {len(bad)} tasks did not succeed: {bad[0]}")
    first_sub = min(r["submitted_at"] for r in recs)
    last_fin = max(r["finished_at"] for r in recs if r["finished_at"] is not None)
    wall_ms = last_fin - first_sub

    # The placement actually made, replayed: each node runs its tasks in the order it
    # started them (FIFO) on its own slots, once with the requested durations (zero
    # overhead) and once with the time each task really held its slot (started_at to
    # finished_at: the sleep plus spawning and reaping the task runner).
    by_node: dict[str, list[tuple[int, str, int, int]]] = collections.defaultdict(list)
    held: list[int] = []
    for r, d in zip(recs, durations):
        at = r["attempts"][-1]
        h = at["finished_at"] - at["started_at"]
        held.append(h)
        by_node[r["node"]].append((at["started_at"], r["id"], d, h))
    per_node = {}
    placement = placement_held = 0.0
    for n in sorted(by_node):
        rows = sorted(by_node[n])
        ds = [d for _, _, d, _ in rows]
        hs = [h for _, _, _, h in rows]
        m, mh = list_schedule(ds, a.ms_capacity), list_schedule(hs, a.ms_capacity)
        placement, placement_held = max(placement, m), max(placement_held, mh)
        per_node[n] = {
            "tasks": len(ds),
            "work_ms": sum(ds),
            "longest_ms": max(ds),
            "fifo_makespan_ms": round(m, 1),
            "held_ms": sum(hs),
            "fifo_makespan_held_ms": round(mh, 1),
            "last_finish_ms": max(r["finished_at"] for r in recs if r["node"] == n) - first_sub,
        }
    stages = stage_times(recs)
    overhead = [h - d for h, d in zip(held, durations)]
    first_start = min(r["attempts"][-1]["started_at"] for r in recs)
    caps = [a.ms_capacity] * NODES
    return {
        "policy": policy,
        **warm,
        "outcomes": outcome_counts(recs),
        "retried_tasks": sum(1 for r in recs if r["attempt"] > 1),
        "wall_makespan_ms": wall_ms,
        "client_wall_ms": round((t_done - t_start) * 1000, 1),
        "placement_makespan_ms": round(placement, 1),
        "placement_makespan_held_ms": round(placement_held, 1),
        "lower_bound_held_ms": round(makespan_lower_bound(held, caps), 1),
        "lpt_makespan_held_ms": round(lpt_makespan(held, caps), 1),
        "per_node": per_node,
        "first_start_after_submit_ms": first_start - first_sub,
        "queue_p50_ms": percentile(sorted(stages["queue"]), 50),
        "slot_overhead_ms": summary(overhead),
        "cpu": cpu_diff(before, after, len(recs)),
        "_nodes": [r["node"] for r in recs],
    }


async def makespan(tmp: str, a: argparse.Namespace, stderr: dict) -> dict:
    durations = pareto_durations(a.makespan_tasks, a.seed, a.alpha, a.scale_ms, a.cap_ms)
    caps = [a.ms_capacity] * NODES
    slots = sum(caps)
    lpt = lpt_makespan(durations, caps)
    lb = makespan_lower_bound(durations, caps)
    gq = list_schedule([float(d) for d in durations], slots)
    out: dict = {
        "tasks": a.makespan_tasks,
        "nodes": NODES,
        "capacity_per_node": a.ms_capacity,
        "slots": slots,
        "durations": {
            "distribution": f"min({a.cap_ms}, round({a.scale_ms:g} ms * Pareto(alpha={a.alpha:g})))",
            "seed": a.seed,
            "total_ms": sum(durations),
            "mean_ms": round(statistics.fmean(durations), 1),
            "median_ms": statistics.median(durations),
            "max_ms": max(durations),
            "capped": sum(1 for d in durations if d >= a.cap_ms),
            "top5_ms": sorted(durations, reverse=True)[:5],
        },
        "lower_bound_ms": round(lb, 1),
        "lpt_makespan_ms": round(lpt, 1),
        "lpt_over_lower_bound": ratio(lpt, lb),
        "global_queue_makespan_ms": round(gq, 1),
        "global_queue_over_lower_bound": ratio(gq, lb),
        "submission": "all tasks in one submit request (the leader places them as slots free)",
        "runs": {},
    }
    placements = {}
    for policy in a.policies:
        cl = Cluster(tmp, f"makespan-{policy}", a.ms_capacity, policy)
        try:
            with cl as lc:
                run = await makespan_run(lc, a, policy, durations)
        finally:
            if cl.stderr:
                stderr[f"makespan-{policy}"] = cl.stderr
        placements[policy] = run.pop("_nodes")
        run["makespan_over_lower_bound"] = ratio(run["wall_makespan_ms"], lb)
        run["makespan_over_lpt"] = ratio(run["wall_makespan_ms"], lpt)
        run["placement_makespan_over_lower_bound"] = ratio(run["placement_makespan_ms"], lb)
        run["makespan_over_lower_bound_held"] = ratio(run["wall_makespan_ms"], run["lower_bound_held_ms"])
        out["runs"][policy] = run
    if len(placements) == 2:
        p, q = placements.values()
        out["same_node_fraction"] = round(sum(x == y for x, y in zip(p, q)) / len(p), 3)
    out["ratios"] = {p: r["makespan_over_lower_bound"] for p, r in out["runs"].items()}
    return out


# -- main -------------------------------------------------------------------------------


async def bench(a: argparse.Namespace, tmp: str, stderr: dict) -> dict:
    out: dict = {}
    if "throughput" in a.phases:
        cl = Cluster(tmp, "throughput", a.tp_capacity, "least_loaded")
        try:
            with cl as lc:
                out["throughput"] = await throughput(lc, a)
        finally:
            if cl.stderr:
                stderr["throughput"] = cl.stderr
    if "makespan" in a.phases:
        out["makespan"] = await makespan(tmp, a, stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=500, help="throughput: no-op tasks")
    ap.add_argument("--batch", type=int, default=100, help="throughput: tasks per submit request")
    ap.add_argument("--kind", choices=("echo", "sleep"), default="echo",
                    help="throughput: echo with empty data, or sleep 0 ms")
    ap.add_argument("--tp-capacity", type=int, default=4, help="throughput: slots per agent")
    ap.add_argument("--makespan-tasks", type=int, default=120, help="makespan: sleep tasks")
    ap.add_argument("--ms-capacity", type=int, default=2, help="makespan: slots per agent")
    ap.add_argument("--seed", type=int, default=1, help="makespan: seed of the durations")
    ap.add_argument("--alpha", type=float, default=1.5, help="makespan: Pareto shape")
    ap.add_argument("--scale-ms", type=float, default=50.0, help="makespan: Pareto scale (minimum)")
    ap.add_argument("--cap-ms", type=int, default=2000, help="makespan: longest duration")
    ap.add_argument("--policies", default="least_loaded,round_robin",
                    help="makespan: comma-separated policies, one fresh cluster each")
    ap.add_argument("--phases", default="throughput,makespan",
                    help="comma-separated subset of: throughput, makespan")
    ap.add_argument("--timeout", type=float, default=3.0, help="client request timeout (s)")
    ap.add_argument("--tmp", default=None, help="parent directory for the clusters' files")
    a = ap.parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    a.phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    a.policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    for p in a.phases:
        if p not in ("throughput", "makespan"):
            ap.error(f"unknown phase {p!r}")
    if a.tasks < 1 or a.batch < 1 or a.makespan_tasks < 1 or a.batch > 1000:
        ap.error("--tasks, --batch (<= 1000) and --makespan-tasks must be >= 1")
    if a.alpha <= 0 or a.scale_ms <= 0 or a.cap_ms < 1:
        ap.error("--alpha and --scale-ms must be > 0, --cap-ms >= 1")

    tmp = tempfile.mkdtemp(prefix="bench-dispatch-", dir=a.tmp)
    result: dict = {
        "bench": "dispatch",
        "nodes": NODES,
        "fsync": True,
        "election_ms": 1000,
        "heartbeat_ms": 100,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.dispatch", *args]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "data_fs": fs_type(tmp),
        },
        "note": "client, the 3 agents and every task process share this machine's CPUs; "
                "the leader gives a node up to capacity * (1 + task_queue_per_slot) tasks and "
                "places the rest as slots free; a node runs its tasks FIFO",
    }
    stderr: dict = {}
    try:
        result.update(asyncio.run(bench(a, tmp, stderr)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stderr:
        result["agent_stderr"] = stderr
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
