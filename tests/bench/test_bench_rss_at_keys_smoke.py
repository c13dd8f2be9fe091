"""Smoke test of bench/rss_at_keys.py: a tiny run over real agent processes writes the
keys asked for and reads each agent's settled and peak RSS."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rss_at_keys import parse_variant

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_variants_parse():
    assert parse_variant("new=.") == ("new", None, None)
    assert parse_variant("old=/tmp/tree:10000") == ("old", "/tmp/tree", 10000)
    for bad in ("x", "=.", "x=", "x=.:many"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def test_a_tiny_run_reads_settled_and_peak_rss(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.rss_at_keys", "--keys", "300", "--rounds", "1",
                        "--writers", "4"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = p.stdout.splitlines()
    row = json.loads(lines[0])
    assert row["round"] == 1 and row["variant"] == "this" and row["keys"] == 300
    # an agent is tens of MB; its peak is at least what it holds now
    assert 10_000 < row["rss_kib_max_settled"] <= row["rss_kib_max_peak"] < 1_000_000
    assert row["writes_per_s"] > 0
    medians = json.loads("\n".join(lines[1:]))["medians"]["this"]
    assert medians["rss_kib_max_settled_median"] == row["rss_kib_max_settled"]
