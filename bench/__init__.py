"""raftdeck benchmarks. Each module prints JSON; results are recorded in docs/BENCHMARKS.md."""
