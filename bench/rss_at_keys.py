"""Resident memory of raftdeck agents holding exactly N keys.

    python -m bench.rss_at_keys [--keys 70000] [--rounds 3] [--writers 32]
        [--variant NAME=TREE[:SNAPSHOT_INTERVAL]] ...

The side-by-side run reads RSS after 10 s of 32 writers, so its figure depends on how many
keys the machine managed to write (the target's reading moves with the machine's speed).
This one fixes the count: a fresh 3-agent cluster (fsync on, plain TCP) per round and
variant, N distinct 100-byte puts from ``--writers`` concurrent clients, then each
agent's RSS once no snapshot is in flight (the target's "settled" reading) and its peak
(VmHWM). Variants alternate in order from round to round. A variant is this tree (the
default) or another source tree, with an optional snapshot interval. Every variant's
inventory is written with this tree's defaults for what it does not name (the timeouts,
and the interval when none is given), so give the interval for a tree whose default
differs. Prints one JSON object per round and variant, then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.systems import Raftdeck, config_defaults, rss_kib

VALUE = b"v" * 100


def parse_variant(text: str) -> tuple[str, str | None, int | None]:
    """``NAME=TREE[:SNAPSHOT_INTERVAL]`` (TREE ``.``: this tree) -> (name, source, interval)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=TREE[:SNAPSHOT_INTERVAL]")
    tree, _, si = rest.partition(":")
    try:
        interval = int(si) if si else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the snapshot interval must be an integer") from None
    return name, (None if tree == "." else tree), interval


async def one_round(tmp: Path, source: str | None, interval: int | None, keys: int,
                    writers: int) -> dict:
    kw: dict = {"snapshot_interval": interval}
    if source is not None:
        d = config_defaults()
        kw.update(source=source, election_ms=d["election_ms"], heartbeat_ms=d["heartbeat_ms"])
    rd = Raftdeck(tmp, 3, **kw)
    await rd.start()
    try:
        await rd.wait_leader(60)
        clients = [rd.client() for _ in range(writers)]
        t0 = time.perf_counter()

        async def writer(w: int) -> None:
            for i in range(w, keys, writers):
                await clients[w].put(f"k-{i:08d}", VALUE)

        try:
            await asyncio.gather(*(writer(w) for w in range(writers)))
        finally:
            for c in clients:
                await c.close()
        wall = time.perf_counter() - t0
        waited = await rd.wait_snapshots_done(30.0)
        settled = {n: rss_kib(rd.pid(n)) for n in rd.names}
        peak = {n: rss_kib(rd.pid(n), "VmHWM") for n in rd.names}
    finally:
        await rd.stop()
    return {"keys": keys, "writes_per_s": round(keys / wall, 1),
            "rss_kib_max_settled": max(v or 0 for v in settled.values()),
            "rss_kib_max_peak": max(v or 0 for v in peak.values()),
            "settled_after_s": None if waited is None else round(waited, 3),
            "snapshot_interval": rd.snapshot_interval}


async def run(a: argparse.Namespace) -> dict:
    variants = a.variant or [("this", None, None)]
    results: dict[str, list[dict]] = {v[0]: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="raftdeck-rss-") as tmp:
        for r in range(a.rounds):
            for name, source, interval in (variants if r % 2 == 0 else variants[::-1]):
                row = await one_round(Path(tmp) / f"{name}-{r}", source, interval, a.keys, a.writers)
                results[name].append(row)
                print(json.dumps({"round": r + 1, "variant": name, **row}), flush=True)
    return {name: {"rss_kib_max_settled_median": statistics.median(x["rss_kib_max_settled"] for x in rows),
                   "rss_kib_max_peak_median": statistics.median(x["rss_kib_max_peak"] for x in rows),
                   "rounds": rows}
            for name, rows in results.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rss_at_keys",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=70_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writers", type=int, default=32)
    p.add_argument("--variant", type=parse_variant, action="append",
                   help="NAME=TREE[:SNAPSHOT_INTERVAL]; TREE '.' is this tree (repeatable)")
    a = p.parse_args(argv)
    if a.keys < 1 or a.rounds < 1 or a.writers < 1:
        p.error("--keys, --rounds and --writers must be at least 1")
    print(json.dumps({"medians": {k: {kk: vv for kk, vv in v.items() if kk != "rounds"}
                                  for k, v in asyncio.run(run(a)).items()}}, indent=2))


if __name__ == "__main__":
    main()
