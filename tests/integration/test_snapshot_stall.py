"""A snapshot of a big state must not stall the agent's event loop (issue 9).

The old path (serialize + sha256 + write + fsync, all in the driver
task) held the loop for ~220 ms at 100k keys and ~620 ms at 300k on this 2-core machine
(``python -m bench.snapshot_stall``, docs/BENCHMARKS.md): longer than the 250 ms election
timeout, so followers started elections (``inline`` below is that path, with today's
faster serializer: ~450 ms at 300k keys). In the background the longest gap between a
5 ms sampler's wake-ups stayed at 30-45 ms, and writes kept being acknowledged while the
snapshot was written.
"""

from __future__ import annotations

import trio

from bench.snapshot_stall import measure

ELECTION_TIMEOUT_MS = 250  # the default: a stall this long lets followers start elections


def test_a_background_snapshot_of_300k_keys_leaves_the_loop_running(tmp_path):
    inline = trio.run(measure, 300_000, False, tmp_path / "inline")
    # The machine is shared and noisy: compare within this run, and give the background
    # path three tries (noise only ever lengthens a gap).
    threads = []
    for attempt in range(3):
        threads.append(trio.run(measure, 300_000, True, tmp_path / f"thread{attempt}"))
        if threads[-1]["max_gap_ms"] * 2 < inline["max_gap_ms"]:
            break
    thread = min(threads, key=lambda r: r["max_gap_ms"])
    # The same snapshot taken in the loop stalls it at least twice as long...
    assert thread["max_gap_ms"] * 2 < inline["max_gap_ms"], (inline, threads)
    # ... the background one stays under the election timeout ...
    assert thread["max_gap_ms"] < ELECTION_TIMEOUT_MS, threads
    # ... and the driver went on committing writes while the snapshot was in flight.
    assert thread["writes_acked_while_snapshotting"] > 0, thread
    assert inline["writes_acked_while_snapshotting"] == 0, inline
    assert thread["snapshot_bytes"] > 30_000_000
