"""Smoke test of bench/dispatch.py: a tiny run over real agent processes prints one JSON
object with every field, and the figures are sane. (The full run is in docs/BENCHMARKS.md.)"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.dispatch import list_schedule, pareto_durations
from nodeagent.dispatch import lpt_makespan, makespan_lower_bound

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _ordered(d: dict) -> None:
    assert 0 <= d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"] <= d["max_ms"] < 60_000


def test_pure_helpers():
    ds = pareto_durations(200, 3, 1.5, 50, 2000)
    assert ds == pareto_durations(200, 3, 1.5, 50, 2000)  # the seed fixes them
    assert all(50 <= d <= 2000 for d in ds) and max(ds) > 150
    # LPT and one FIFO queue are list schedules: within total/m + (1 - 1/m) * longest,
    # so within (2 - 1/m) of the lower bound
    lb = makespan_lower_bound(ds, [2, 2, 2])
    assert lb <= lpt_makespan(ds, [2, 2, 2]) <= (2 - 1 / 6) * lb + 1e-6
    assert lb <= list_schedule(ds, 6) <= (2 - 1 / 6) * lb + 1e-6
    assert list_schedule([3, 1, 1, 1], 2) == 3 and list_schedule([], 4) == 0


def test_bench_dispatch_tiny_run_prints_every_field(tmp_path):
    argv = ["--tasks", "24", "--batch", "10", "--makespan-tasks", "12", "--tmp", str(tmp_path)]
    p = subprocess.run([sys.executable, "-m", "bench.dispatch", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=55)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout)

    assert r["bench"] == "dispatch" and r["nodes"] == 3 and r["fsync"] is True
    assert r["command"] == shlex.join(["python", "-m", "bench.dispatch", *argv])
    assert r["date"][:2] == "20"
    m = r["machine"]
    assert m["cpu_count"] >= 1 and m["platform"] and m["python"].startswith("3.")
    assert "share" in r["note"] and "as slots free" in r["note"]
    assert "agent_stderr" not in r, r.get("agent_stderr")
    assert list(tmp_path.iterdir()) == []  # the clusters' files were removed

    t = r["throughput"]
    assert t["tasks"] == 24 and t["batch"] == 10 and t["capacity_per_node"] == 4
    assert t["kind"] == "echo" and t["policy"] == "least_loaded"
    assert t["outcomes"] == {"succeeded": 24}
    assert sum(t["per_node"].values()) == 24 and set(t["per_node"]) <= {"n1", "n2", "n3"}
    assert t["warmup_tasks"] % 3 == 0 and t["warmup_tasks"] >= 3
    assert 0 < t["tasks_per_s"] < 100_000
    assert 0 < t["submit_s"] <= t["wall_s"] < 60
    assert 0 < t["first_submit_to_last_finish_s"] <= t["wall_s"] + 0.5
    _ordered(t["latency"])
    assert t["latency"]["max_ms"] <= t["first_submit_to_last_finish_s"] * 1000
    assert set(t["stages_p50_ms"]) == {"queue", "start", "run"}
    assert all(v is not None and v >= 0 for v in t["stages_p50_ms"].values())
    cpu = t["cpu"]
    assert set(cpu["agents"]) == {"n1", "n2", "n3"}
    assert cpu["task_processes_cpu_s"] > 0 and cpu["cpu_ms_per_task_processes"] > 0

    ms = r["makespan"]
    assert ms["tasks"] == 12 and ms["slots"] == 6 and ms["capacity_per_node"] == 2
    d = ms["durations"]
    assert d["seed"] == 1 and 12 * 50 <= d["total_ms"] <= 12 * 2000 and d["max_ms"] <= 2000
    lb, lpt, gq = ms["lower_bound_ms"], ms["lpt_makespan_ms"], ms["global_queue_makespan_ms"]
    assert 0 < lb <= lpt and lb <= gq
    assert lb == max(d["max_ms"], round(d["total_ms"] / 6, 1))
    assert ms["lpt_over_lower_bound"] >= 1
    assert set(ms["runs"]) == {"least_loaded", "round_robin"}
    for policy, run in ms["runs"].items():
        assert run["policy"] == policy and run["outcomes"] == {"succeeded": 12}
        assert sum(n["tasks"] for n in run["per_node"].values()) == 12
        assert sum(n["work_ms"] for n in run["per_node"].values()) == d["total_ms"]
        # nothing finishes before the work allows
        assert lb <= run["placement_makespan_ms"] and lb <= run["wall_makespan_ms"] < 60_000
        assert run["wall_makespan_ms"] <= run["client_wall_ms"] + 500
        assert run["makespan_over_lower_bound"] == round(run["wall_makespan_ms"] / lb, 3)
        assert run["makespan_over_lower_bound"] >= 1
        assert ms["ratios"][policy] == run["makespan_over_lower_bound"]
        assert run["slot_overhead_ms"]["p50_ms"] >= -2  # a slot is held at least the sleep
        assert run["lower_bound_held_ms"] >= lb - 2
        assert run["lower_bound_held_ms"] <= run["lpt_makespan_held_ms"]
        assert run["lower_bound_held_ms"] <= run["placement_makespan_held_ms"]
        assert run["placement_makespan_held_ms"] <= run["wall_makespan_ms"] + 2
        for n in run["per_node"].values():
            assert n["held_ms"] >= n["work_ms"] - 2 * n["tasks"]
            assert n["fifo_makespan_held_ms"] <= n["last_finish_ms"] + 2
    assert 0 <= ms["same_node_fraction"] <= 1
