"""The simulator's seeds, run by pytest.

The default run covers SIM_SEEDS seeds (300) of SIM_STEPS events (10,000) each; every seed
draws its own mix of faults. A failure message ends with the one command that replays
the seed. The long run is opt-in:

    pytest -m slow tests/sim            # 10,000 seeds
    python -m tests.sim --seeds 10000   # the same, outside pytest, with a summary
"""

from __future__ import annotations

import os

import pytest

from .simulator import LIVENESS_BOUND_MS, Simulation, SimFailure, run_seed

SIM_SEEDS = int(os.environ.get("RAFTDECK_SIM_SEEDS", "300"))
SIM_STEPS = int(os.environ.get("RAFTDECK_SIM_STEPS", "10000"))
CHUNK = 10


def _run_range(first: int, last: int, steps: int) -> list[str]:
    failures = []
    for seed in range(first, last):
        try:
            run_seed(seed, steps)
        except SimFailure as e:
            failures.append(str(e))
    return failures


@pytest.mark.parametrize("first", range(0, SIM_SEEDS, CHUNK), ids=lambda f: f"seeds{f}")
def test_seeds_keep_every_invariant_and_recover_after_heal(first):
    failures = _run_range(first, min(first + CHUNK, SIM_SEEDS), SIM_STEPS)
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("first", range(0, 10_000, 500), ids=lambda f: f"seeds{f}")
def test_ten_thousand_seeds(first):
    failures = _run_range(first, first + 500, 2000)
    assert not failures, "\n\n".join(failures[:3])


def test_seeds_mix_every_fault_kind():
    """Swarm testing: across a handful of seeds every kind of fault actually happens."""
    totals: dict[str, int] = {}
    for seed in range(40):
        for k, v in run_seed(seed, 2000).items():
            totals[k] = totals.get(k, 0) + v
    for kind in ("crashes", "pauses", "partitions", "conf_changes", "transfers",
                 "snapshots", "fsync_crashes", "reads_ok", "elections"):
        assert totals[kind] > 0, f"no {kind} in 40 seeds: {totals}"


def test_a_seed_replays_exactly():
    a = Simulation(7, 2000)
    sa = a.run()
    b = Simulation(7, 2000)
    sb = b.run()
    assert sa == sb
    assert a.trace == b.trace
    assert a.applied_hash == b.applied_hash


def test_liveness_is_measured_within_the_documented_bound():
    stats = run_seed(3, 2000)
    assert 0 < stats["liveness_ms"] <= LIVENESS_BOUND_MS
