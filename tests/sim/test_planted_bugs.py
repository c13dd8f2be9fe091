"""The simulator can fail: each test plants one bug in a copy of the rules and requires
the invariant checks to catch it within a bounded number of seeds.

If one of these tests fails, the simulator has gone blind to that class of bug (a check
was weakened, or the fault mix no longer reaches the corner) — fix the simulator, not
the test.
"""

from __future__ import annotations

import pytest

from . import planted
from .simulator import Profile, Simulation, SimFailure

MAX_SEEDS = 200


def _first_failure(steps: int = 2000, max_seeds: int = MAX_SEEDS, **kw) -> str:
    for seed in range(max_seeds):
        try:
            Simulation(seed, steps, **kw).run()
        except SimFailure as e:
            return str(e)
    pytest.fail(f"planted bug not caught in {max_seeds} seeds")


def test_a_node_that_votes_twice_in_a_term_breaks_election_safety():
    err = _first_failure(node_factory=planted.factory(planted.VotesTwice))
    assert "Election Safety" in err or "Log Matching" in err or "State Machine Safety" in err


def test_voting_without_the_log_check_breaks_leader_completeness():
    err = _first_failure(node_factory=planted.factory(planted.IgnoresLogCheck))
    assert "Leader Completeness" in err or "State Machine Safety" in err


def test_committing_an_earlier_terms_entry_by_counting_replicas_loses_it():
    """Figure 8. Reaching it needs a leader to die half-way through repairing followers,
    so this pins the leader-churn profile on five nodes."""
    err = _first_failure(
        steps=10_000, max_seeds=100, nodes=5, liveness=False,
        node_factory=planted.factory(planted.CommitsPreviousTerm),
        profile=Profile.CHURN,
    )
    assert "Leader Completeness" in err or "State Machine Safety" in err


def test_reads_without_a_quorum_round_are_stale():
    err = _first_failure(node_factory=planted.factory(planted.ReadsWithoutQuorum))
    assert "ReadIndex" in err


def test_sending_before_fsync_is_flagged():
    err = _first_failure(process_ready=planted.sends_before_persisting)
    assert "before syncing" in err


def test_a_failure_names_the_command_that_replays_it():
    err = _first_failure(node_factory=planted.factory(planted.VotesTwice))
    seed = int(err.split(":", 1)[0].removeprefix("seed "))
    assert f"replay: python -m tests.sim --seed {seed} --steps 2000" in err
