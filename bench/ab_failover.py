"""Failover as a client sees it, A/B of the client's leader-search pause cap (0.25 s, the
old one, against 0.05 s), interleaved on one 3-agent cluster (fsync on, default timeouts):
`python -m bench.ab_failover [ROUNDS]`. Prints JSON: each cap's kill -> next ack times."""

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from bench.__main__ import one_failover
from bench.systems import Raftdeck
from console.client import ClusterClient

async def main(rounds):
    tmp = Path(tempfile.mkdtemp(prefix="abfo-"))
    sys_ = Raftdeck(tmp / "rd", 3, fsync=True)
    await sys_.start()
    res = {0.25: [], 0.05: []}
    try:
        for r in range(rounds):
            for cap in (0.25, 0.05) if r % 2 == 0 else (0.05, 0.25):
                ClusterClient.search_delay_max = cap
                row = await one_failover(sys_, len(res[cap]) + 100 * r, b"v" * 100)
                res[cap].append(row["kill_to_next_ack_ms"])
    finally:
        await sys_.stop()
    print(json.dumps({str(k): {"runs": v, "median": statistics.median([x for x in v if x is not None])} for k, v in res.items()}))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.ab_failover", description=__doc__)
    ap.add_argument("rounds", nargs="?", type=int, default=5,
                    help="rounds, each kills the leader once per cap (default 5)")
    asyncio.run(main(ap.parse_args().rounds))
