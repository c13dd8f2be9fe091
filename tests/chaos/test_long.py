"""The long chaos runs (opt in: ``pytest -m slow tests/chaos``): 5 nodes, every nemesis
kind, for 60 seconds and for 10 minutes. ``raftdeck chaos --nodes 5 --duration 600`` is
the same run by hand."""

from __future__ import annotations

import asyncio

import pytest

from console.chaos import NEMESES, ChaosConfig, run_chaos, summary

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("duration,seed", [(60.0, 1), (600.0, 2)])
def test_long_chaos_run_five_nodes_every_nemesis(tmp_path, duration, seed):
    cfg = ChaosConfig(nodes=5, duration=duration, nemesis=NEMESES, seed=seed,
                      out=tmp_path / "out", checker_seconds=300.0)
    report = asyncio.run(run_chaos(cfg))
    assert report["ok"], summary(report)
    kinds = {f["kind"] for f in report["faults"] if f["event"] == "start"}
    assert kinds == set(NEMESES)
