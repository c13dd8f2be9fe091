"""The side-by-side summary's arithmetic (bench/__main__.py), on made-up figures: no
processes. The targets read medians over rounds of per-round ratios."""

from __future__ import annotations

from bench.__main__ import summarize


def _sys(rounds: list[dict], *, failover_ms: float = 80.0) -> dict:
    first = rounds[0]
    return {
        "sequential": {"p50_ms": first["sequential_p50_ms"], "p99_ms": first["sequential_p99_ms"]},
        "throughput": {"writes_per_s": first["throughput_32_writes_per_s"], "p50_ms": 5.0},
        "failover": {"median_ms": failover_ms},
        "rss_kib": {"a": first["rss_kib_max"]},
        "rounds": rounds,
    }


def _r(p50: float, p99: float, tp: float, rss: int, at_once: int | None = None) -> dict:
    """One round; ``rss`` is the settled reading (no snapshot in flight), ``at_once`` the
    one taken right after the run (the same unless given)."""
    return {"sequential_p50_ms": p50, "sequential_p99_ms": p99,
            "throughput_32_writes_per_s": tp, "rss_kib_max": at_once or rss,
            "rss_kib_max_settled": rss, "rss_kib_max_peak": (at_once or rss) + 5000,
            "rss_after_writes": 1}


def test_targets_are_medians_of_per_round_ratios():
    # PySyncObj's better configuration changes from round to round: each round's ratio
    # is against that round's better one.
    sbs = {
        "raftdeck_fsync": _sys([_r(1.0, 1.6, 6000, 52000), _r(1.1, 1.4, 5000, 49000),
                                _r(0.9, 1.5, 6300, 50000)]),
        "pysyncobj_batch": _sys([_r(100, 101, 300, 38000), _r(100, 101, 5000, 38000),
                                 _r(100, 101, 300, 38000)], failover_ms=2600),
        "pysyncobj_nobatch": _sys([_r(0.5, 0.9, 4000, 54000), _r(0.55, 0.9, 3000, 54000),
                                   _r(0.6, 0.9, 4500, 54000)], failover_ms=2500),
    }
    s = summarize({"side_by_side": sbs})
    t = s["targets"]
    tp = t["throughput_32_at_least_1.5x_pysyncobj_best"]
    # per round: 6000/4000, 5000/5000 (batch was better that round), 6300/4500
    assert tp["rounds"] == [1.5, 1.0, 1.4]
    assert tp["value"] == 1.4 and tp["met"] is False
    p50 = t["sequential_p50_at_most_pysyncobj_best"]
    assert p50["rounds"] == [2.0, 2.0, 1.5] and p50["value"] == 2.0 and p50["met"] is False
    p99 = t["sequential_p99_at_most_1.5_ms"]
    assert p99["rounds"] == [1.6, 1.4, 1.5] and p99["value"] == 1.5 and p99["met"] is True
    rss = t["rss_under_50_mib"]
    assert rss["rounds"] == [52000, 49000, 50000] and rss["value"] == 50000 and rss["met"] is True
    fo = t["failover_median_under_500_ms"]
    assert fo["value"] == 80.0 and fo["met"] is True and "rounds" not in fo
    # round 1 alone stays in "rows", as before rounds existed
    assert s["rows"]["throughput_32_writes_per_s"]["raftdeck_fsync_over_pysyncobj_best"] == 1.5


def test_a_failed_round_is_left_out_of_the_median():
    sbs = {
        "raftdeck_fsync": _sys([_r(1.0, 1.2, 6000, 40000), {"error": "OSError: boom"},
                                _r(1.0, 1.2, 7000, 40000)]),
        "pysyncobj_nobatch": _sys([_r(0.5, 0.9, 4000, 54000), _r(0.5, 0.9, 4000, 54000),
                                   _r(0.5, 0.9, 4000, 54000)]),
    }
    tp = summarize({"side_by_side": sbs})["targets"]["throughput_32_at_least_1.5x_pysyncobj_best"]
    assert tp["rounds"] == [1.5, None, 1.75]
    assert tp["value"] == 1.625 and tp["met"] is True


def test_one_round_gives_round_one_figures():
    sbs = {
        "raftdeck_fsync": _sys([_r(1.0, 1.7, 6000, 52000)]),
        "pysyncobj_nobatch": _sys([_r(0.5, 0.9, 4000, 54000)]),
    }
    s = summarize({"side_by_side": sbs})
    t = s["targets"]
    assert t["throughput_32_at_least_1.5x_pysyncobj_best"]["value"] == \
        s["rows"]["throughput_32_writes_per_s"]["raftdeck_fsync_over_pysyncobj_best"] == 1.5
    assert t["sequential_p99_at_most_1.5_ms"]["value"] == 1.7
    assert t["sequential_p99_at_most_1.5_ms"]["met"] is False


def test_the_rss_target_reads_the_settled_rss_and_shows_the_other_readings():
    """A round that ended during a background snapshot reads high at once; the target
    takes the reading with no snapshot in flight, and keeps the other two beside it."""
    sbs = {
        "raftdeck_fsync": _sys([_r(1.0, 1.4, 6000, 50000, at_once=73000), _r(1.0, 1.4, 6000, 51000),
                                _r(1.0, 1.4, 6000, 50500, at_once=64000)]),
        "pysyncobj_nobatch": _sys([_r(0.5, 0.9, 4000, 54000)] * 3),
    }
    rss = summarize({"side_by_side": sbs})["targets"]["rss_under_50_mib"]
    assert rss["rounds"] == [50000, 51000, 50500] and rss["value"] == 50500
    assert rss["met"] is True
    assert rss["at_once"]["rounds"] == [73000, 51000, 64000] and rss["at_once"]["median"] == 64000
    assert rss["peak"]["median"] == 69000


def test_results_without_a_settled_reading_fall_back_to_the_one_at_once():
    old = [{k: v for k, v in _r(1.0, 1.4, 6000, 52000).items() if k != "rss_kib_max_settled"}]
    sbs = {"raftdeck_fsync": _sys(old), "pysyncobj_nobatch": _sys([_r(0.5, 0.9, 4000, 54000)])}
    rss = summarize({"side_by_side": sbs})["targets"]["rss_under_50_mib"]
    assert rss["value"] == 52000 and rss["met"] is False


def test_above_the_floor_subtracts_the_floor_of_the_same_durability():
    # raftdeck (fsync) against the floor with every fsync, PySyncObj (no fsync) against
    # the floor with none; PySyncObj's better configuration by its median p50.
    sbs = {
        "raftdeck_fsync": _sys([_r(1.4, 2.0, 6000, 40000), _r(1.2, 2.0, 6000, 40000),
                                _r(1.3, 2.0, 6000, 40000)]),
        "pysyncobj_batch": _sys([_r(100, 101, 300, 38000)] * 3),
        "pysyncobj_nobatch": _sys([_r(0.9, 1.5, 4000, 54000), _r(0.8, 1.5, 4000, 54000),
                                   _r(0.85, 1.5, 4000, 54000)]),
    }
    floor = {"modes": {"all": {"commit_p50_us": 300}, "none": {"commit_p50_us": 50},
                       "leader": {"commit_p50_us": 200}, "followers": {"commit_p50_us": 280}}}
    af = summarize({"side_by_side": sbs, "commit_floor": floor})["above_floor"]
    assert af["raftdeck_fsync_ms"] == 1.0  # median 1.3 - 0.3 (not 1.3 - 0.05)
    assert af["pysyncobj_nobatch_ms"] == 0.8  # median 0.85 - 0.05
    assert af["ratio"] == 1.25
    # no floor measured (or it failed): nothing to say
    assert summarize({"side_by_side": sbs})["above_floor"] is None
    assert summarize({"side_by_side": sbs, "commit_floor": {"error": "x"}})["above_floor"] is None
