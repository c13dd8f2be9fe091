"""raftdeck side by side with PySyncObj, and how raftdeck's cost grows.

    python -m bench [--quick] [--rounds N] [--json PATH] [--plot PNG] [--skip-growth]
                    [--soak SECONDS]
    raftdeck bench ...   (the same)

In one run, on this machine, it starts (one at a time, each on its own temporary
directory, always stopped afterwards):

- raftdeck, 3 agents, the inventory's default timeouts, fsync on, then fsync off (both
  plain TCP, as PySyncObj), then fsync on with mutual TLS (as the bundled inventory.yaml
  runs);
- PySyncObj, 3 processes of bench/pysyncobj_node.py replicating a dict, journal file on,
  with its defaults (appendEntriesUseBatch=True) and with appendEntriesUseBatch=False;

and runs the same workloads, with the same client code paths, against each: sequential
writes (1 client, one 100-byte put at a time, distinct keys), 32 concurrent writers for
10 s (one client each), then 4 and 16 writers for 4 s each (the latency/throughput curve),
failover (SIGKILL the leader under one writer; kill until the next write acknowledged by
another node; 5 runs, median), and resident memory per server process after the
throughput run (read at once, the target's reading, and again once no raftdeck agent has
a snapshot in flight, which holds a copy of the state's table). Then more rounds
(``--rounds``: 3 in all by default) of the sequential writes, the 32 writers and the RSS,
each on fresh clusters of every system in turn, the order alternating: the targets read
the median over the rounds (ratios against PySyncObj's better configuration of the same
round), so one slow minute of a shared machine does not decide them. Then, in its own
processes, bench/commit_floor.py: what a durable replicated write costs on this machine
before any system's own work (three processes over TCP appending to files, with every
fsync and with none); the summary reads each system's sequential p50 less the floor of
its own durability. Then, raftdeck only
(fsync on): commit latency and throughput for 3, 5 and 7 agents; recovery of a restarted
agent as its log grows (10k and 100k entries), with and without snapshots; memory per
100k log entries. ``--soak S`` instead runs S seconds of steady load on 3 agents and
counts elections (the target is none).

Prints a table and the JSON, and writes the JSON to ``--json``. Latencies are client-side
(``time.perf_counter``), percentiles by nearest rank. Client and servers share the
machine's CPUs. Compare systems by the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.kv import AckWriter, count, error_name, fs_type, latency_summary, proc_cpu_s
import bench.systems as systems_mod
from bench.systems import PySyncObjCluster, Raftdeck, rss_kib

VALUE_BYTES = 100


class Cfg:
    def __init__(self, quick: bool):
        self.quick = quick
        self.writes = 60 if quick else 2000
        self.writers = 32
        self.seconds = 1.0 if quick else 10.0
        self.curve = [4] if quick else [4, 16]
        self.curve_seconds = 1.0 if quick else 4.0
        self.failovers = 1 if quick else 5
        self.growth_nodes = [3] if quick else [3, 5, 7]
        self.growth_writes = 40 if quick else 500
        self.growth_seconds = 1.0 if quick else 5.0
        self.recovery_sizes = [300] if quick else [10_000, 100_000]
        # Rounds of the figures the targets read (sequential, 32 writers, RSS): round 1 is
        # the full side-by-side pass, each later round a fresh cluster of every system in
        # turn, so a slow minute of this shared machine lands on one round, not on one
        # system.
        self.rounds = 1 if quick else 3


# -- workloads (one code path for both systems) ---------------------------------------------


def cpu_of(sys_, names) -> dict:
    return {n: proc_cpu_s(sys_.pid(n)) for n in names if sys_.alive(n)}


def cpu_per_write(cpu0: dict, cpu1: dict, own0: float, own1: float, writes: int) -> dict:
    """Microseconds of CPU per acknowledged write: each server process, and ``client``
    (every client of the run: this process, ``own0``/``own1``)."""
    n = max(1, writes)
    out = {name: round((cpu1[name] - cpu0[name]) * 1e6 / n) for name in cpu1 if name in cpu0}
    out["client"] = round((own1 - own0) * 1e6 / n)
    return out


async def sequential(sys_, writes: int, value: bytes) -> dict:
    c = sys_.client()
    try:
        await c.put("seq-warmup", value)
        leader = await sys_.wait_leader()
        lat: list[float] = []
        errors: dict[str, int] = {}
        cpu0, own0, t_start = cpu_of(sys_, sys_.names), proc_cpu_s(os.getpid()), time.perf_counter()
        for i in range(writes):
            t0 = time.perf_counter()
            try:
                await c.put(f"seq-{i:07d}", value)
            except Exception as e:
                count(errors, error_name(e))
                continue
            lat.append((time.perf_counter() - t0) * 1000)
        wall = time.perf_counter() - t_start
        cpu1, own1 = cpu_of(sys_, sys_.names), proc_cpu_s(os.getpid())
    finally:
        await c.close()
    return {"writes": writes, "acked": len(lat), "errors": errors, **latency_summary(lat),
            "writes_per_s": round(len(lat) / wall, 1) if wall else None,
            "leader": leader,
            "cpu_us_per_write": cpu_per_write(cpu0, cpu1, own0, own1, len(lat)),
            "server_cpu_ms_per_write": round(sum(cpu1[n] - cpu0[n] for n in cpu1 if n in cpu0)
                                             * 1000 / max(1, len(lat)), 3)}


async def throughput(sys_, writers: int, seconds: float, value: bytes, tag: str = "tp",
                     until_acked: int | None = None, keys: int | None = None) -> dict:
    """``keys``: each writer cycles over that many keys of its own (a bounded state);
    None: every put writes a new key."""
    clients = [sys_.client() for _ in range(writers)]
    try:
        await asyncio.gather(*(cl.put(f"{tag}-warm-{w}", value) for w, cl in enumerate(clients)),
                             return_exceptions=True)
        leader = await sys_.wait_leader()
        lat: list[float] = []
        errors: dict[str, int] = {}
        cpu0, own0, t_start = cpu_of(sys_, sys_.names), proc_cpu_s(os.getpid()), time.perf_counter()
        deadline = t_start + seconds

        def more() -> bool:
            if until_acked is not None:
                return len(lat) < until_acked and time.perf_counter() < deadline
            return time.perf_counter() < deadline

        async def writer(w: int, cl) -> None:
            i = 0
            while more():
                t0 = time.perf_counter()
                try:
                    await cl.put(f"{tag}-{w:03d}-{i if keys is None else i % keys:07d}", value)
                except Exception as e:
                    count(errors, error_name(e))
                    await asyncio.sleep(0.01)
                else:
                    lat.append((time.perf_counter() - t0) * 1000)
                i += 1

        await asyncio.gather(*(writer(w, cl) for w, cl in enumerate(clients)))
        wall = time.perf_counter() - t_start
        cpu1, own1 = cpu_of(sys_, sys_.names), proc_cpu_s(os.getpid())
    finally:
        for cl in clients:
            await cl.close()
    s = latency_summary(lat)
    return {"writers": writers, "seconds": round(wall, 3), "acked": len(lat),
            "writes_per_s": round(len(lat) / wall, 1) if wall else None,
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": errors,
            "leader": leader, "cpu_us_per_write": cpu_per_write(cpu0, cpu1, own0, own1, len(lat)),
            "server_cores_busy": round(sum(cpu1[n] - cpu0[n] for n in cpu1 if n in cpu0)
                                       / wall, 2) if wall else None}


async def one_failover(sys_, run: int, value: bytes) -> dict:
    leader = await sys_.wait_leader(60)
    c = sys_.client()
    w = AckWriter(c, f"fo-{run}", value)
    task = asyncio.create_task(w.run())
    row: dict = {"run": run, "killed": leader}
    try:
        try:
            await asyncio.wait_for(w.flowing.wait(), 30)
        except asyncio.TimeoutError:
            row.update({"kill_to_next_ack_ms": None, "errors": dict(w.errors),
                        "note": f"writes did not flow before the kill ({len(w.acks)} acked in 30 s)"})
            return row
        w.errors.clear()
        n0 = len(w.acks)
        t_kill = time.perf_counter()
        sys_.kill(leader)
        await asyncio.to_thread(sys_.reap, leader)
        first = None
        while time.perf_counter() < t_kill + 60:
            first = w.first_ack(n0, t_kill, leader)
            if first is not None:
                break
            await asyncio.sleep(0.005)
        row["kill_to_next_ack_ms"] = round((first - t_kill) * 1000, 1) if first else None
        row["errors"] = dict(w.errors)
    finally:
        w.stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await c.close()
    sys_.restart(leader)
    await sys_.wait_leader(60)
    try:
        await sys_.wait_converged(30)
        row["converged_after_restart"] = True
    except AssertionError:  # reported, not fatal: PySyncObj's replicas can diverge
        row["converged_after_restart"] = False
    return row


async def failover(sys_, runs: int, value: bytes) -> dict:
    rows = [await one_failover(sys_, r + 1, value) for r in range(runs)]
    ms = [r["kill_to_next_ack_ms"] for r in rows if r["kill_to_next_ack_ms"] is not None]
    return {"runs": rows, "median_ms": round(statistics.median(ms), 1) if ms else None,
            "failed_runs": len(rows) - len(ms)}


async def side_by_side(sys_, cfg: Cfg) -> dict:
    value = b"v" * VALUE_BYTES
    out: dict = {"config": sys_.describe()}
    await sys_.start()
    try:
        t0 = time.perf_counter()
        await sys_.wait_leader(60)
        out["startup_to_leader_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out.update(await round_workloads(sys_, cfg, value))
        out["rounds"] = [round_figures(out)]
        out["curve"] = [await throughput(sys_, w, cfg.curve_seconds, value, tag=f"cv{w}")
                        for w in cfg.curve]
        out["failover"] = await failover(sys_, cfg.failovers, value)
    finally:
        await sys_.stop()
    warn = sys_.warnings()
    if warn:
        out["server_warnings"] = warn
    return out


async def settled_rss(sys_) -> tuple[dict, float | None]:
    """Each server's RSS once no snapshot is in flight (at most 30 s later), and the
    seconds that took (None: still in flight at the deadline, read anyway)."""
    waited = await sys_.wait_snapshots_done(30.0)
    return ({n: rss_kib(sys_.pid(n)) for n in sys_.names},
            None if waited is None else round(waited, 3))


async def round_workloads(sys_, cfg: Cfg, value: bytes) -> dict:
    """The workloads every round runs: the sequential writes, the 32 writers, then RSS."""
    out = {"sequential": await sequential(sys_, cfg.writes, value),
           "throughput": await throughput(sys_, cfg.writers, cfg.seconds, value),
           "rss_kib": {n: rss_kib(sys_.pid(n)) for n in sys_.names}}
    # Every put writes a new key, so the RSS above grows with the writes so far: a
    # faster system holds more keys when it is measured.
    out["rss_after_writes"] = out["sequential"].get("acked", 0) + out["throughput"].get("acked", 0)
    # The reading above is taken at once; the target's once no snapshot is in flight: at
    # once it is a lottery on whether the run ended during a background snapshot (its
    # transient copy added up to 20 MB at 70k keys, session 11). The peak (VmHWM) is
    # kept beside them, snapshots included, for sizing a host.
    out["rss_kib_settled"], out["rss_settle_s"] = await settled_rss(sys_)
    out["rss_kib_peak"] = {n: rss_kib(sys_.pid(n), "VmHWM") for n in sys_.names}
    return out


def round_figures(w: dict) -> dict:
    """What one round's workloads (``round_workloads``) contribute to the targets."""
    seq, tp = w["sequential"], w["throughput"]
    return {"sequential_p50_ms": seq.get("p50_ms"), "sequential_p99_ms": seq.get("p99_ms"),
            "throughput_32_writes_per_s": tp.get("writes_per_s"),
            "rss_kib_max": max((v or 0 for v in w["rss_kib"].values()), default=None),
            "rss_kib_max_settled": max((v or 0 for v in w["rss_kib_settled"].values()), default=None),
            "rss_kib_max_peak": max((v or 0 for v in w.get("rss_kib_peak", {}).values()), default=None),
            "rss_after_writes": w["rss_after_writes"]}


async def another_round(sys_, cfg: Cfg) -> dict:
    """A fresh cluster: the same workloads as round 1, without the curve and failover."""
    await sys_.start()
    try:
        await sys_.wait_leader(60)
        w = await round_workloads(sys_, cfg, b"v" * VALUE_BYTES)
    finally:
        await sys_.stop()
    return round_figures(w)


# -- growth (raftdeck only) -------------------------------------------------------------------


async def growth_nodes(tmp: Path, cfg: Cfg) -> list[dict]:
    value = b"v" * VALUE_BYTES
    rows = []
    for n in cfg.growth_nodes:
        rd = Raftdeck(tmp / f"grow{n}", n)
        await rd.start()
        try:
            await rd.wait_leader(60)
            seq = await sequential(rd, cfg.growth_writes, value)
            tp = await throughput(rd, cfg.writers, cfg.growth_seconds, value)
            rows.append({"agents": n, "sequential_p50_ms": seq["p50_ms"],
                         "sequential_p99_ms": seq["p99_ms"],
                         "throughput_writes_per_s": tp["writes_per_s"],
                         "throughput_p50_ms": tp["p50_ms"],
                         "rss_kib_max": max(rss_kib(rd.pid(x)) or 0 for x in rd.names)})
        finally:
            await rd.stop()
    return rows


async def recover(rd: Raftdeck, name: str, target: int) -> dict:
    """SIGKILL ``name``, restart it, and time until it has applied ``target`` again."""
    rd.kill(name)
    await asyncio.to_thread(rd.reap, name)
    t0 = time.perf_counter()
    rd.restart(name)
    first_answer = None
    while time.perf_counter() < t0 + 300:
        s = await rd.status(name)
        if s is not None:
            first_answer = first_answer or time.perf_counter()
            if s["applied"] >= target:
                break
        await asyncio.sleep(0.02)
    else:
        return {"recovery_ms": None}
    t1 = time.perf_counter()
    return {"answers_after_ms": round((first_answer - t0) * 1000, 1),
            "recovery_ms": round((t1 - t0) * 1000, 1),
            "rss_kib_after_recovery": rss_kib(rd.pid(name))}


async def growth_log(tmp: Path, cfg: Cfg) -> list[dict]:
    """Per snapshot setting: write up to each size, then restart a follower; memory."""
    value = b"v" * VALUE_BYTES
    rows = []
    for snapshots in (False, True):
        rd = Raftdeck(tmp / f"log-{snapshots}", 3,
                      snapshot_interval=None if snapshots else 10**9)
        await rd.start()
        try:
            leader = await rd.wait_leader(60)
            follower = next(n for n in rd.names if n != leader)
            rss0 = {n: rss_kib(rd.pid(n)) for n in rd.names}
            written = 0
            for size in cfg.recovery_sizes:
                t0 = time.perf_counter()
                tp = await throughput(rd, cfg.writers, 600, value, tag=f"lg{size}",
                                      until_acked=size - written)
                written += tp["acked"]
                st = await rd.status(leader)
                rss = {n: rss_kib(rd.pid(n)) for n in rd.names}
                # The fill ends at a multiple of the snapshot interval, so a snapshot is
                # usually in flight at that reading; the settled one waits it out.
                settled, _ = await settled_rss(rd)
                prev = rows[-1] if rows and rows[-1]["snapshots"] == snapshots else None
                base_rss = prev["rss_kib_leader_settled"] if prev else rss0[leader]
                base_n = prev["log_entries"] if prev else 0
                row = {"snapshots": snapshots,
                       "snapshot_interval": rd.snapshot_interval,
                       "log_entries": st["commit"],
                       "fill_s": round(time.perf_counter() - t0, 1),
                       "rss_kib_leader": rss[leader],
                       "rss_kib_leader_settled": settled[leader],
                       # growth since the previous size (or the start), scaled
                       "rss_kib_per_100k_entries_leader": round(
                           (settled[leader] - base_rss) * 100_000 / max(1, st["commit"] - base_n)),
                       **await recover(rd, follower, st["commit"])}
                rows.append(row)
                await rd.wait_leader(60)
        finally:
            await rd.stop()
    return rows


# -- soak ---------------------------------------------------------------------------------------


async def soak(tmp: Path, seconds: float, writers: int, keys: int | None = None) -> dict:
    """Steady load on 3 agents; every change of term or leader is an election."""
    value = b"v" * VALUE_BYTES
    rd = Raftdeck(tmp / "soak", 3)
    await rd.start()
    try:
        leader = await rd.wait_leader(60)
        st0 = {n: await rd.status(n) for n in rd.names}
        term0 = max(s["term"] for s in st0.values() if s)
        changes: list[dict] = []
        stop = asyncio.Event()
        load = asyncio.create_task(throughput(rd, writers, seconds, value, tag="soak", keys=keys))
        t0 = time.perf_counter()
        last = (leader, term0)
        while not load.done():
            for n in rd.names:
                s = await rd.status(n)
                if s and (s["term"], s["leader"]) != (last[1], last[0]) and s["term"] >= last[1]:
                    if s["term"] > last[1] or (s["leader"] and s["leader"] != last[0]):
                        changes.append({"at_s": round(time.perf_counter() - t0, 1), "node": n,
                                        "term": s["term"], "leader": s["leader"]})
                        last = (s["leader"], s["term"])
            await asyncio.sleep(0.5)
        tp = await load
        stop.set()
        st1 = {n: await rd.status(n) for n in rd.names}
        term1 = max(s["term"] for s in st1.values() if s)
    finally:
        await rd.stop()
    return {"seconds": seconds, "writers": writers, "keys_per_writer": keys,
            "config": rd.describe(),
            "term_start": term0, "term_end": term1, "elections": term1 - term0,
            "leader_changes_seen": changes, "load": tp, "agent_events": agent_events(rd)}


def agent_events(rd: Raftdeck) -> dict:
    """From the agents' JSON logs: each snapshot's duration (``ms``: how long it held the
    driver up, split into ``capture_ms``, ``release_ms`` and ``adopt_ms``) and each role
    change, to line elections up with their causes."""
    out = {}
    for n in rd.names:
        snaps, roles = [], []
        try:
            lines = rd.lc.log_path(n).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("msg") == "snapshot":
                snaps.append({"ts": ev.get("ts"), "index": ev.get("index"),
                              "bytes": ev.get("bytes"), "ms": ev.get("ms"),
                              "capture_ms": ev.get("capture_ms"), "release_ms": ev.get("release_ms"),
                              "adopt_ms": ev.get("adopt_ms")})
            elif ev.get("msg") == "role change":
                roles.append({"ts": ev.get("ts"), "role": ev.get("role"),
                              "term": ev.get("term"), "leader": ev.get("leader")})
        out[n] = {"snapshots": snaps, "role_changes": roles,
                  "snapshot_ms_max": max((x["ms"] or 0 for x in snaps), default=None)}
    return out


# -- summary ------------------------------------------------------------------------------------


def best(vals: dict[str, float | None], lower_is_better: bool):
    have = {k: v for k, v in vals.items() if v is not None}
    if not have:
        return None, None
    k = (min if lower_is_better else max)(have, key=have.get)
    return k, have[k]


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def summarize(res: dict) -> dict:
    sbs = res["side_by_side"]
    pso = {k: v for k, v in sbs.items() if k.startswith("pysyncobj")}
    rows = {}
    metrics = [
        ("sequential_p50_ms", lambda r: r["sequential"]["p50_ms"], True),
        ("sequential_p99_ms", lambda r: r["sequential"]["p99_ms"], True),
        ("throughput_32_writes_per_s", lambda r: r["throughput"]["writes_per_s"], False),
        ("throughput_32_p50_ms", lambda r: r["throughput"]["p50_ms"], True),
        ("failover_median_ms", lambda r: r["failover"]["median_ms"], True),
        ("rss_kib_max", lambda r: max(v or 0 for v in r["rss_kib"].values()), True),
    ]
    for name, get, lower in metrics:
        row = {k: get(v) for k, v in sbs.items()}
        bk, bv = best({k: get(v) for k, v in pso.items()}, lower)
        row["pysyncobj_best"] = bk
        for rk in ("raftdeck_fsync", "raftdeck_nofsync", "raftdeck_fsync_tls"):
            if rk in sbs:
                row[f"{rk}_over_pysyncobj_best"] = ratio(row[rk], bv)
        rows[name] = row
    rounds = summarize_rounds(sbs)
    targets = {}
    if "raftdeck_fsync" in sbs:
        # The median over the rounds (round 1 alone with --rounds 1); failover: round 1's
        # five kills.
        tp = rounds["throughput_32_writes_per_s"]["raftdeck_fsync_over_pysyncobj_best"]
        p50 = rounds["sequential_p50_ms"]["raftdeck_fsync_over_pysyncobj_best"]
        p99 = rounds["sequential_p99_ms"]["raftdeck_fsync"]
        # RSS once no snapshot is in flight (see round_workloads); results from before
        # that reading existed fall back to the one taken at once.
        settled = rounds.get("rss_kib_max_settled", {}).get("raftdeck_fsync")
        rss = settled if settled and settled["median"] is not None \
            else rounds["rss_kib_max"]["raftdeck_fsync"]
        targets = {
            "throughput_32_at_least_1.5x_pysyncobj_best": _ok(tp["median"], ">=", 1.5, tp["rounds"]),
            "sequential_p50_at_most_pysyncobj_best": _ok(p50["median"], "<=", 1.0, p50["rounds"]),
            "sequential_p99_at_most_1.5_ms": _ok(p99["median"], "<=", 1.5, p99["rounds"]),
            "failover_median_under_500_ms": _ok(rows["failover_median_ms"]["raftdeck_fsync"], "<", 500),
            "rss_under_50_mib": _ok(rss["median"], "<", 50 * 1024, rss["rounds"]),
        }
        # For reading beside it: the same taken at once, and the peak.
        targets["rss_under_50_mib"]["at_once"] = rounds["rss_kib_max"]["raftdeck_fsync"]
        if "rss_kib_max_peak" in rounds:
            targets["rss_under_50_mib"]["peak"] = rounds["rss_kib_max_peak"]["raftdeck_fsync"]
    return {"rows": rows, "rounds": rounds, "targets": targets,
            "above_floor": above_floor(rounds, res.get("commit_floor", {}))}


def above_floor(rounds: dict, floor: dict) -> dict | None:
    """Sequential p50 (median of the rounds) less the commit floor of the same durability:
    raftdeck with fsync against the floor with every fsync, PySyncObj (its journal never
    fsyncs) against the floor with none. What is left is each system's own work per write."""
    modes = floor.get("modes")
    seq = rounds.get("sequential_p50_ms", {})
    if not modes or "raftdeck_fsync" not in seq:
        return None
    pso = {k: v["median"] for k, v in seq.items() if k.startswith("pysyncobj") and isinstance(v, dict)}
    bk, bv = best(pso, True)
    rd = seq["raftdeck_fsync"]["median"]
    if rd is None or bv is None:
        return None
    rd_own = round(rd - modes["all"]["commit_p50_us"] / 1000, 3)
    pso_own = round(bv - modes["none"]["commit_p50_us"] / 1000, 3)
    return {"raftdeck_fsync_ms": rd_own, f"{bk}_ms": pso_own, "ratio": ratio(rd_own, pso_own),
            "floor_all_fsync_p50_ms": modes["all"]["commit_p50_us"] / 1000,
            "floor_no_fsync_p50_ms": modes["none"]["commit_p50_us"] / 1000}


ROUND_METRICS = [("sequential_p50_ms", True), ("sequential_p99_ms", True),
                 ("throughput_32_writes_per_s", False), ("rss_kib_max", True),
                 ("rss_kib_max_settled", True), ("rss_kib_max_peak", True)]


def _median(vals: list):
    have = [v for v in vals if v is not None]
    return round(statistics.median(have), 3) if have else None


def _in_round(res: dict, i: int, metric: str):
    rounds = res.get("rounds", [])
    return rounds[i].get(metric) if i < len(rounds) else None


def summarize_rounds(sbs: dict) -> dict:
    """Per metric: every system's value in each round and the median; for each raftdeck
    system, its ratio to the better PySyncObj configuration of the same round, per round
    and the median of those ratios."""
    n = max((len(v.get("rounds", [])) for v in sbs.values()), default=0)
    pso = {k: v for k, v in sbs.items() if k.startswith("pysyncobj")}
    out = {}
    for metric, lower in ROUND_METRICS:
        row: dict = {}
        for k, v in sbs.items():
            vals = [_in_round(v, i, metric) for i in range(n)]
            row[k] = {"rounds": vals, "median": _median(vals)}
        for rk in ("raftdeck_fsync", "raftdeck_nofsync", "raftdeck_fsync_tls"):
            if rk not in sbs:
                continue
            ratios = []
            for i in range(n):
                _, bv = best({k: _in_round(v, i, metric) for k, v in pso.items()}, lower)
                ratios.append(ratio(_in_round(sbs[rk], i, metric), bv))
            row[f"{rk}_over_pysyncobj_best"] = {"rounds": ratios, "median": _median(ratios)}
        out[metric] = row
    return out


def _ok(v, op, bound, rounds: list | None = None) -> dict:
    met = None if v is None else {">=": v >= bound, "<=": v <= bound, "<": v < bound}[op]
    out = {"value": v, "bound": f"{op} {bound}", "met": met}
    if rounds is not None:
        out["rounds"] = rounds
    return out


def table(res: dict) -> str:
    s = res["summary"]
    cols = list(res["side_by_side"])
    lines = ["round 1:", "| metric | " + " | ".join(cols) + " | raftdeck (fsync) / PySyncObj best |",
             "| --- |" + " --- |" * (len(cols) + 1)]
    for name, row in s["rows"].items():
        cells = [str(row.get(c)) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {row.get('raftdeck_fsync_over_pysyncobj_best')} ({row['pysyncobj_best']}) |")
    lines.append("")
    for k, t in s["targets"].items():
        each = f" (median of rounds {t['rounds']})" if len(t.get("rounds") or ()) > 1 else ""
        lines.append(f"target {k}: {t['value']} {t['bound']}{each}: {'MET' if t['met'] else 'NOT MET'}")
        for key, what in (("at_once", "read at once, a snapshot perhaps in flight"),
                          ("peak", "peak (VmHWM)")):
            if key in t:
                lines.append(f"  ({what}: {t[key]['median']}, rounds {t[key]['rounds']})")
    floor = res.get("commit_floor", {}).get("modes")
    af = s.get("above_floor")
    if af:
        lines.append(f"sequential p50 above the commit floor (each system's own work per "
                     f"write): raftdeck fsync {af['raftdeck_fsync_ms']} ms, PySyncObj "
                     f"{[v for k, v in af.items() if k.startswith('pysyncobj')][0]} ms "
                     f"({af['ratio']}x)")
    if floor:
        lines.append(f"commit floor on this machine (3 processes, no Raft): p50 / p99 "
                     f"{floor['all']['commit_p50_us']} / {floor['all']['commit_p99_us']} us "
                     f"with every fsync, {floor['none']['commit_p50_us']} / "
                     f"{floor['none']['commit_p99_us']} us with none")
    for g in res.get("growth_nodes", []):
        lines.append(f"growth {g['agents']} agents: seq p50 {g['sequential_p50_ms']} ms, "
                     f"p99 {g['sequential_p99_ms']} ms, 32 writers "
                     f"{g['throughput_writes_per_s']} writes/s")
    for g in res.get("growth_log", []):
        lines.append(f"recovery snapshots={g['snapshots']} entries={g['log_entries']}: "
                     f"{g.get('recovery_ms')} ms; leader RSS {g['rss_kib_leader']} KiB, "
                     f"{g['rss_kib_leader_settled']} KiB with no snapshot in flight "
                     f"({g['rss_kib_per_100k_entries_leader']} KiB per 100k entries)")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in res["side_by_side"].items():
        pts = [(r["sequential"]["writes_per_s"], r["sequential"]["p50_ms"], 1)]
        pts += [(c["writes_per_s"], c["p50_ms"], c["writers"]) for c in r["curve"]]
        pts.append((r["throughput"]["writes_per_s"], r["throughput"]["p50_ms"],
                    r["throughput"]["writers"]))
        pts = [p for p in pts if None not in p]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, w in pts:
            ax.annotate(str(w), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=line.get_color())
    ax.set_xlabel("acknowledged writes/s (labels: concurrent writers)")
    ax.set_ylabel("write latency p50 (ms)")
    ax.set_yscale("log")
    ax.set_title(f"3 nodes, 100-byte puts, one 2-core machine ({res['date'][:10]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main ---------------------------------------------------------------------------------------


def machine(tmp: str) -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "data_fs": fs_type(tmp),
            "loadavg_at_start": load}


def commit_floor(tmp: Path, cfg: Cfg) -> dict:
    """bench/commit_floor.py on the clusters' filesystem, in its own processes (it forks):
    what a durable replicated write costs here before any system's own work."""
    writes, rounds = (20, 1) if cfg.quick else (400, 3)
    try:
        p = subprocess.run([sys.executable, "-m", "bench.commit_floor", "--writes", str(writes),
                            "--rounds", str(rounds), "--dir", str(tmp)],
                           capture_output=True, text=True, timeout=600,
                           cwd=Path(__file__).resolve().parents[1])
        if p.returncode != 0:
            return {"error": p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"]}
        return json.loads(p.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


async def run_all(a, tmp: Path, cfg: Cfg) -> dict:
    res: dict = {"side_by_side": {}}
    # Each factory takes the round's suffix: every round starts from empty directories.
    systems = {
        "raftdeck_fsync": lambda r: Raftdeck(tmp / f"rd-fsync{r}", 3, fsync=True),
        "raftdeck_nofsync": lambda r: Raftdeck(tmp / f"rd-nofsync{r}", 3, fsync=False),
        "raftdeck_fsync_tls": lambda r: Raftdeck(tmp / f"rd-fsync-tls{r}", 3, fsync=True, tls=True),
        "pysyncobj_batch": lambda r: PySyncObjCluster(tmp / f"pso-batch{r}", 3, batch=True),
        "pysyncobj_nobatch": lambda r: PySyncObjCluster(tmp / f"pso-nobatch{r}", 3, batch=False),
    }
    if a.baseline:
        src, _, timeouts = a.baseline.partition(":")
        et, _, hb = timeouts.partition("/")
        systems["raftdeck_fsync_baseline"] = lambda r: Raftdeck(
            tmp / f"rd-base{r}", 3, fsync=True, source=os.path.abspath(src),
            election_ms=int(et or 1000), heartbeat_ms=int(hb or 100))
    only = a.only.split(",") if a.only else list(systems)
    for key in only:
        print(f"bench: {key} ...", file=sys.stderr, flush=True)
        try:
            res["side_by_side"][key] = await side_by_side(systems[key](""), cfg)
        except Exception as e:  # one system failing must not lose the others' figures
            res.setdefault("failed", {})[key] = f"{type(e).__name__}: {e}"
    for rnd in range(2, cfg.rounds + 1):
        # Alternate the order, so no system always runs first or last in a round.
        order = [k for k in (only if rnd % 2 else only[::-1]) if k in res["side_by_side"]]
        for key in order:
            print(f"bench: {key}, round {rnd} of {cfg.rounds} ...", file=sys.stderr, flush=True)
            try:
                fig = await another_round(systems[key](f"-r{rnd}"), cfg)
            except Exception as e:
                fig = {"error": f"{type(e).__name__}: {e}"}
            res["side_by_side"][key]["rounds"].append(fig)
    print("bench: the commit floor (bench/commit_floor.py) ...", file=sys.stderr, flush=True)
    res["commit_floor"] = commit_floor(tmp, cfg)
    if not a.skip_growth:
        print("bench: growth (agents) ...", file=sys.stderr, flush=True)
        res["growth_nodes"] = await growth_nodes(tmp, cfg)
        print("bench: growth (log) ...", file=sys.stderr, flush=True)
        res["growth_log"] = await growth_log(tmp, cfg)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of every workload with tiny counts (seconds)")
    ap.add_argument("--json", default="bench-results.json", help="write the JSON here")
    ap.add_argument("--plot", default=None, help="write a latency/throughput PNG here")
    ap.add_argument("--only", default=None,
                    help="comma-separated: raftdeck_fsync,raftdeck_nofsync,"
                         "raftdeck_fsync_tls,pysyncobj_batch,pysyncobj_nobatch")
    ap.add_argument("--writes", type=int, default=None, help="sequential puts (2000)")
    ap.add_argument("--seconds", type=float, default=None, help="32-writer run length (10)")
    ap.add_argument("--failovers", type=int, default=None, help="leader kills (5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of sequential writes, 32 writers and RSS per system, "
                         "alternating systems; the targets read the median (3; --quick 1)")
    ap.add_argument("--baseline", default=None, metavar="TREE[:ELECTION_MS/HEARTBEAT_MS]",
                    help="also run raftdeck (fsync on) with its agents from another source "
                         "tree, e.g. a worktree of an older commit (timeouts default "
                         "1000/100), as raftdeck_fsync_baseline")
    ap.add_argument("--skip-growth", action="store_true", help="no 3/5/7-agent and log runs")
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                    help="only the no-election soak: steady load for SECONDS on 3 agents")
    ap.add_argument("--soak-writers", type=int, default=4)
    ap.add_argument("--soak-keys", type=int, default=None, metavar="N",
                    help="soak: each writer overwrites N keys of its own (a bounded state); "
                         "default: every put writes a new key, so the state grows")
    ap.add_argument("--tls", action="store_true",
                    help="raftdeck with mutual TLS (as the bundled inventory.yaml runs); off by "
                         "default here, as PySyncObj and baseline trees speak plain TCP")
    ap.add_argument("--tmp", default=None, help="parent directory for the clusters' files")
    ap.add_argument("--keep", action="store_true", help="keep the clusters' files (logs)")
    a = ap.parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    systems_mod.TLS = a.tls
    cfg = Cfg(a.quick)
    if a.rounds is not None and a.rounds < 1:
        ap.error(f"--rounds must be at least 1, not {a.rounds}")
    for k in ("writes", "seconds", "failovers", "rounds"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
    tmp = tempfile.mkdtemp(prefix="bench-", dir=a.tmp)
    res: dict = {"bench": "side_by_side" if a.soak is None else "soak",
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": shlex.join(["python", "-m", "bench", *args]),
                 "quick": a.quick, "machine": machine(tmp), "value_bytes": VALUE_BYTES}
    try:
        if a.soak is not None:
            res["soak"] = asyncio.run(soak(Path(tmp), a.soak, a.soak_writers, a.soak_keys))
            text = (f"soak {a.soak:g} s, {a.soak_writers} writers: elections "
                    f"{res['soak']['elections']} (terms {res['soak']['term_start']} -> "
                    f"{res['soak']['term_end']}), {res['soak']['load']['acked']} writes acked")
        else:
            res.update(asyncio.run(run_all(a, Path(tmp), cfg)))
            res["summary"] = summarize(res)
            text = table(res)
    finally:
        if a.keep:
            print(f"bench: files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    if a.plot and "side_by_side" in res:
        plot(res, a.plot)
    print(json.dumps(res, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
