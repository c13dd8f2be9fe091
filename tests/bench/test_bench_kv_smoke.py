"""Smoke test of bench/kv.py: a tiny run over real agent processes prints one JSON object
with every field, and the figures are sane. (The full run is in docs/BENCHMARKS.md.)"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _ordered_latencies(d: dict) -> None:
    assert 0 < d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"] <= d["max_ms"] < 30_000


def test_bench_kv_tiny_run_prints_every_field(tmp_path):
    argv = ["--writes", "30", "--writers", "4", "--seconds", "1", "--failovers", "1",
            "--tmp", str(tmp_path)]
    p = subprocess.run([sys.executable, "-m", "bench.kv", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=38)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout)

    assert r["bench"] == "kv" and r["nodes"] == 3 and r["fsync"] is True
    assert r["command"] == shlex.join(["python", "-m", "bench.kv", *argv])
    assert r["date"][:2] == "20"
    m = r["machine"]
    assert m["cpu_count"] >= 1 and m["platform"] and m["python"].startswith("3.")
    assert "share" in r["note"]
    assert "agent_stderr" not in r, r.get("agent_stderr")

    seq = r["sequential"]
    assert seq["writes"] == 30 and seq["acked"] + sum(seq["errors"].values()) == 30
    assert seq["acked"] >= 25 and seq["writes_per_s"] > 0
    _ordered_latencies(seq)

    for key, mode in (("throughput", "per-writer"), ("throughput_shared_client", "shared")):
        t = r[key]
        assert t["client_mode"] == mode and t["writers"] == 4
        assert t["acked"] > 0 and t["writes_per_s"] > 0
        assert isinstance(t["outcome_unknown"], int) and t["errors_total"] >= t["outcome_unknown"]
        _ordered_latencies(t)
        agents = t["resources"]["agents"]
        assert set(agents) == {"n1", "n2", "n3"}
        assert sum(a["role"] == "leader" for a in agents.values()) == 1
        assert all(a["group_commits"] > 0 for a in agents.values())

    assert set(r["rss_kib"]) == {"n1", "n2", "n3"}
    assert all(5_000 < v < 2_000_000 for v in r["rss_kib"].values())
    fs = r["fsync_ms_per_group_commit"]
    assert set(fs) == {"sequential", "throughput", "throughput_shared_client"}
    assert all(v is not None and v >= 0 for v in fs.values())

    fo = r["failover"]
    assert len(fo["runs"]) == 1 and fo["failed_runs"] == 0
    run = fo["runs"][0]
    assert run["killed"] in {"n1", "n2", "n3"} and run["new_leader"] not in (None, run["killed"])
    assert 0 < run["kill_to_leader_seen_ms"] < 30_000
    assert 0 < run["kill_to_next_ack_ms"] < 30_000
    assert fo["median_kill_to_next_ack_ms"] == run["kill_to_next_ack_ms"]
    assert run["restart_to_converged_ms"] > 0
