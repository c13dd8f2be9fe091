"""Where a leader and a follower spend their time under a write load (py-spy).

    python -m bench.profile [--writers 1] [--seconds 15] [--no-fsync] [--out DIR] [--top 25]

Starts 3 agents (bench/systems.py Raftdeck, the default timeouts), waits for a leader,
runs ``--writers`` clients each putting 100-byte values under new keys, and meanwhile
records the leader and one follower with ``py-spy record --format raw`` (200 Hz,
non-blocking). Prints one JSON object: writes/s, RSS of the three agents afterwards,
and per profiled process the functions with the largest share of samples, by self time
and by inclusive time (percent of that process's samples). The raw stacks stay in
``--out`` for a flame graph. Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.systems import Raftdeck, rss_kib

_LOCATION = re.compile(r" \((?:/[^)]*/)?([^/)]*)\)")


def summarize(raw: Path, top: int) -> dict:
    """Self and inclusive shares of a py-spy raw file (``frame;frame;... count`` lines)."""
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LOCATION.sub(r" (\1)", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def pct(c: collections.Counter) -> list[list]:
        return [[name, round(100 * v / total, 1)] for name, v in c.most_common(top)] if total else []

    return {"samples": total, "self_pct": pct(own), "inclusive_pct": pct(incl)}


async def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="rd-profile-"))
    out = Path(args.out) if args.out else tmp / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    rd = Raftdeck(tmp / "cluster", 3, fsync=not args.no_fsync)
    await rd.start()
    spies: list[subprocess.Popen] = []
    try:
        leader = await rd.wait_leader()
        follower = next(n for n in rd.names if n != leader)
        raws = {}
        for role, name in (("leader", leader), ("follower", follower)):
            raws[role] = out / f"{role}.txt"
            spies.append(subprocess.Popen(
                ["py-spy", "record", "-p", str(rd.pid(name)), "-d", str(int(args.seconds)),
                 "-r", "200", "-f", "raw", "-o", str(raws[role]), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        value = b"v" * 100
        done = 0
        end = time.monotonic() + args.seconds + 1

        async def writer(w: int) -> None:
            nonlocal done
            c = rd.client()
            try:
                i = 0
                while time.monotonic() < end:
                    await c.put(f"p{w}-{i}", value)
                    i += 1
                    done += 1
            finally:
                await c.close()

        t0 = time.monotonic()
        await asyncio.gather(*(writer(w) for w in range(args.writers)))
        wall = time.monotonic() - t0
        for p in spies:
            p.wait(timeout=args.seconds + 30)
        return {
            "writers": args.writers, "fsync": not args.no_fsync, "seconds": round(wall, 2),
            "writes_per_s": round(done / wall, 1),
            "rss_kib": {n: rss_kib(rd.pid(n)) for n in rd.names},
            "raw": {role: str(p) for role, p in raws.items()},
            "profiles": {role: summarize(p, args.top) for role, p in raws.items() if p.exists()},
        }
    finally:
        for p in spies:
            if p.poll() is None:
                p.kill()
                p.wait()
        await rd.stop()
        shutil.rmtree(tmp / "cluster", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--no-fsync", action="store_true", help="agents without fsync")
    ap.add_argument("--out", help="keep the raw py-spy stacks here (default: a temp dir)")
    ap.add_argument("--top", type=int, default=25, help="functions listed per process")
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("python -m bench.profile: py-spy is not installed; `pip install py-spy`",
              file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
