"""Smoke test of bench/commit_floor.py: three real processes over TCP, each fsyncing its
own file as the mode says; every mode is measured, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.commit_floor import MODES, _p

ROOT = Path(__file__).resolve().parents[2]


def test_percentiles_are_nearest_rank_in_microseconds():
    secs = [v / 1e6 for v in range(100, 0, -1)]  # unsorted: 100 .. 1 us
    assert (_p(secs, 50), _p(secs, 99)) == (50, 99)
    assert _p([7e-6], 99) == 7 and _p([], 50) is None


def test_a_tiny_run_measures_every_mode_and_cleans_up(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.commit_floor", "--writes", "20", "--rounds", "1",
                        "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout)
    assert out["writes_per_mode"] == 20 and set(out["modes"]) == set(MODES)
    for mode, row in out["modes"].items():
        assert 0 < row["commit_p50_us"] <= row["commit_p90_us"] <= row["commit_p99_us"], (mode, row)
        # each role's fsync is timed exactly when the mode has it fsync
        assert (row["leader_fsync_p50_us"] is not None) == (mode in ("leader", "all")), (mode, row)
        assert (row["follower_fsync_p50_us"] is not None) == (mode in ("followers", "all")), (mode, row)
    assert list(tmp_path.iterdir()) == []  # its files and directory are gone


def test_a_bad_directory_is_named(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.commit_floor", "--dir", str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr
