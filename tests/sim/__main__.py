"""Run simulator seeds from the command line.

    python -m tests.sim --seed 42               # replay one seed (prints its stats)
    python -m tests.sim --seeds 10000 --jobs 2  # a long run: seeds 0..9999
    python -m tests.sim --seeds 500 --start 7000 --steps 4000 --nodes 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

from .simulator import SimFailure, run_seed


def _one(args: tuple[int, int, int | None]) -> tuple[int, str | None, dict]:
    seed, steps, nodes = args
    try:
        return seed, None, run_seed(seed, steps, nodes=nodes)
    except SimFailure as e:
        return seed, str(e), {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, help="run exactly this seed")
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--steps", type=int, default=2000, help="events per seed (default 2000)")
    ap.add_argument("--nodes", type=int, choices=[3, 5, 7], help="force a cluster size")
    ap.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    seeds = [a.seed] if a.seed is not None else list(range(a.start, a.start + a.seeds))
    t0 = time.perf_counter()
    work = [(s, a.steps, a.nodes) for s in seeds]
    failures: list[tuple[int, str]] = []
    worst_liveness = 0
    totals: dict[str, int] = {}
    if a.jobs > 1 and len(seeds) > 1:
        with multiprocessing.Pool(a.jobs) as pool:
            results = pool.imap_unordered(_one, work, chunksize=4)
            outcomes = list(results)
    else:
        outcomes = [_one(w) for w in work]
    for seed, err, stats in sorted(outcomes):
        if err:
            failures.append((seed, err))
        for k, v in stats.items():
            if k in ("max_commit", "liveness_ms"):
                continue
            totals[k] = totals.get(k, 0) + v
        worst_liveness = max(worst_liveness, stats.get("liveness_ms", 0))
        if a.seed is not None and stats:
            print(json.dumps({"seed": seed, **stats}))
    summary = {
        "seeds": len(seeds),
        "failed": len(failures),
        "failed_seeds": [s for s, _ in failures][:50],
        "seconds": round(time.perf_counter() - t0, 1),
        "worst_liveness_ms": worst_liveness,
        "totals": totals,
    }
    for seed, err in failures[:3]:
        print(err, file=sys.stderr)
        print("-" * 60, file=sys.stderr)
    print(json.dumps(summary) if a.json else
          f"{summary['seeds']} seeds, {summary['failed']} failed, {summary['seconds']}s, "
          f"worst liveness {worst_liveness} ms; totals {totals}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
