"""Smoke test of `python -m bench --quick`: raftdeck and PySyncObj, every workload with
tiny counts, real processes. Asserts that the JSON has every field and that the values are
sane; never a timing target (those are in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("pysyncobj", reason="the bench extra is not installed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.long(60)  # seconds, roughly: the longest start first
def test_quick_run_writes_json_with_every_field(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--quick", "--rounds", "2", "--only", "raftdeck_fsync,pysyncobj_nobatch",
            "--json", str(out), "--tmp", str(tmp_path)]
    p = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r == json.loads(p.stdout[: p.stdout.rindex("}") + 1])  # the same JSON printed
    assert r["quick"] is True and r["date"][:2] == "20" and r["command"].startswith("python -m bench")
    assert r["machine"]["cpu_count"] >= 1
    assert "failed" not in r, r.get("failed")

    sbs = r["side_by_side"]
    assert set(sbs) == {"raftdeck_fsync", "pysyncobj_nobatch"}
    assert sbs["raftdeck_fsync"]["config"]["fsync"] is True
    assert sbs["pysyncobj_nobatch"]["config"]["appendEntriesUseBatch"] is False
    assert "fsync" in sbs["pysyncobj_nobatch"]["config"]["durability"]
    for name, s in sbs.items():
        seq = s["sequential"]
        assert seq["acked"] + sum(seq["errors"].values()) == seq["writes"] == 60, name
        assert seq["acked"] >= 50, (name, seq)
        assert 0 < seq["p50_ms"] <= seq["p99_ms"] <= seq["max_ms"] < 30_000, name
        tp = s["throughput"]
        assert tp["writers"] == 32 and tp["acked"] > 0 and tp["writes_per_s"] > 0, name
        assert [c["writers"] for c in s["curve"]] == [4], name
        assert all(0 < (v or 0) < 1 << 21 for v in s["rss_kib"].values()), name
        assert s["rss_after_writes"] == seq["acked"] + tp["acked"], name
        first, second = s["rounds"]  # round 1 is the pass above; round 2 a fresh cluster
        assert first["throughput_32_writes_per_s"] == tp["writes_per_s"], name
        assert first["rss_after_writes"] == s["rss_after_writes"], name
        assert "error" not in second, second
        assert second["throughput_32_writes_per_s"] > 0 and second["sequential_p50_ms"] > 0, name
        assert 0 < second["rss_kib_max"] < 1 << 21, name
        assert 0 < second["rss_kib_max_settled"] < 1 << 21, name
        assert all(0 < (v or 0) < 1 << 21 for v in s["rss_kib_settled"].values()), name
        assert s["rss_settle_s"] is not None, name  # nothing stays in flight for 30 s here
        fo = s["failover"]
        assert len(fo["runs"]) == 1 and fo["failed_runs"] in (0, 1), name
        if fo["median_ms"] is not None:
            assert 0 < fo["median_ms"] < 60_000

    summ = r["summary"]
    row = summ["rows"]["throughput_32_writes_per_s"]
    assert row["pysyncobj_best"] == "pysyncobj_nobatch"
    assert row["raftdeck_fsync_over_pysyncobj_best"] > 0
    assert set(summ["targets"]) == {
        "throughput_32_at_least_1.5x_pysyncobj_best", "sequential_p50_at_most_pysyncobj_best",
        "sequential_p99_at_most_1.5_ms", "failover_median_under_500_ms", "rss_under_50_mib"}
    for t in summ["targets"].values():
        assert t["met"] in (True, False, None) and t["bound"]
    tp_target = summ["targets"]["throughput_32_at_least_1.5x_pysyncobj_best"]
    assert len(tp_target["rounds"]) == 2
    assert tp_target["value"] == summ["rounds"]["throughput_32_writes_per_s"][
        "raftdeck_fsync_over_pysyncobj_best"]["median"]

    floor = r["commit_floor"]
    assert floor["writes_per_mode"] == 20 and floor["dir"] == str(tmp_path / Path(floor["dir"]).name)
    assert set(floor["modes"]) == {"none", "leader", "followers", "all"}
    af = summ["above_floor"]  # the sequential p50 less the floor of the same durability
    assert af["floor_all_fsync_p50_ms"] == floor["modes"]["all"]["commit_p50_us"] / 1000
    assert af["raftdeck_fsync_ms"] == round(summ["rounds"]["sequential_p50_ms"]["raftdeck_fsync"]["median"]
                                            - af["floor_all_fsync_p50_ms"], 3)

    (g,) = r["growth_nodes"]
    assert g["agents"] == 3 and g["throughput_writes_per_s"] > 0 and g["sequential_p50_ms"] > 0
    logs = r["growth_log"]
    assert [x["snapshots"] for x in logs] == [False, True]
    for x in logs:
        assert x["log_entries"] >= 300 and x["recovery_ms"] is not None and x["recovery_ms"] > 0
        assert x["rss_kib_leader"] > 0 and x["rss_kib_leader_settled"] > 0
