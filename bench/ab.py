"""Interleaved A/B of raftdeck variants on a noisy machine (one lever at a time).

    python -m bench.ab --variant base=/path/to/tree --variant new=. [--env new:K=V]
        [--rounds 4] [--writes 300] [--seconds 3] [--fsync on|off] [--tls]

Each round starts a fresh 3-agent cluster per variant, in turn, and runs sequential
puts and 32 writers; the medians over rounds (and their ratios to the first variant)
are printed as JSON. Interleaving spreads the machine's drift over all variants.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.__main__ import VALUE_BYTES, sequential, throughput
from bench.systems import Raftdeck


async def one(tmp: Path, src: str, env: dict, fsync: bool, writes: int, seconds: float,
              et: int | None, hb: int | None, tls: bool = False) -> dict:
    rd = Raftdeck(tmp, 3, fsync=fsync, source=os.path.abspath(src), env=env,
                  election_ms=et, heartbeat_ms=hb, tls=tls)
    await rd.start()
    try:
        await rd.wait_leader(60)
        v = b"v" * VALUE_BYTES
        s = await sequential(rd, writes, v)
        t = await throughput(rd, 32, seconds, v)
    finally:
        await rd.stop()
    return {"seq_p50": s["p50_ms"], "seq_p99": s["p99_ms"], "seq_mean": s["mean_ms"],
            "tp": t["writes_per_s"], "tp_p50": t["p50_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=TREE")
    ap.add_argument("--env", action="append", default=[], help="NAME:KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--fsync", choices=("on", "off"), default="on")
    ap.add_argument("--tls", action="store_true", help="mutual TLS (every tree must support it)")
    a = ap.parse_args()
    variants = [v.split("=", 1) for v in a.variant]
    envs: dict[str, dict] = {}
    for e in a.env:
        name, kv = e.split(":", 1)
        k, v = kv.split("=", 1)
        envs.setdefault(name, {})[k] = v
    rows: dict[str, list[dict]] = {n: [] for n, _ in variants}
    tmp = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    try:
        for r in range(a.rounds):
            for name, src in variants:
                rows[name].append(asyncio.run(one(tmp / f"{name}-{r}", src, envs.get(name, {}),
                                                  a.fsync == "on", a.writes, a.seconds,
                                                  None, None, a.tls)))
                print(name, r, rows[name][-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {n: {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0]}
           for n, rs in rows.items()}
    first = variants[0][0]
    out = {"rounds": a.rounds, "fsync": a.fsync, "tls": a.tls, "loadavg_end": os.getloadavg(),
           "median": med,
           "ratio_to_" + first: {n: {k: round(m[k] / med[first][k], 2) for k in m}
                                 for n, m in med.items()}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
