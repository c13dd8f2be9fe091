"""KV writes over real processes: a 3-agent cluster on 127.0.0.1, fsync on.

Starts its own cluster (``console.local.LocalCluster``: election 1000 ms, heartbeat
100 ms, fsync on) in a temporary directory, drives it with the asyncio ``ClusterClient``
and always stops it. Four measurements, in this order:

- sequential: one client, one put at a time (100-byte values, distinct keys);
- throughput: W concurrent writers for D seconds, each with its own ClusterClient (its
  own connection to each agent): on this code that is about twice as fast as W writers
  sharing one ClusterClient (one connection, a pooled session per concurrent write),
  which is measured next for comparison unless ``--client-mode`` says otherwise;
- rss_kib: each agent's resident memory after the throughput run;
- failover: with one writer running, SIGKILL the leader; the time from the kill to the
  first write acknowledged by another node (and, polled separately, to the moment the
  surviving nodes agree on a new leader); then restart the node and wait until all three
  replicas converged before the next run.

    python -m bench.kv [--writes 2000] [--writers 32] [--seconds 10] [--failovers 5]

Prints one JSON object. Latencies are client-side (``time.perf_counter``) in ms,
percentiles by nearest rank over the sorted samples. Client and agents share this
machine's CPUs, so every figure includes the client's cost and its competition for CPU.
Storage figures come from each agent's ``status`` (``storage.fsyncs`` counts group
commits; ``fsync_latency_ms_sum`` sums every fsync call: WAL, hard state file and its
directory), taken as differences over each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from console.client import ClusterClient, RequestError
from console.local import LocalCluster

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- small helpers ----------------------------------------------------------------------


def percentile(sorted_ms: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_ms:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_ms)))
    return round(sorted_ms[rank - 1], 3)


def latency_summary(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {
        "p50_ms": percentile(s, 50),
        "p90_ms": percentile(s, 90),
        "p99_ms": percentile(s, 99),
        "max_ms": round(s[-1], 3) if s else None,
        "mean_ms": round(statistics.fmean(s), 3) if s else None,
    }


def error_name(e: BaseException) -> str:
    if isinstance(e, RequestError):
        return f"RequestError:{e.code}"
    return type(e).__name__


def count(d: dict, key: str) -> None:
    d[key] = d.get(key, 0) + 1


class AckWriter:
    """One client putting new keys (``prefix-0000000``...) one at a time until ``stop``:
    ``acks`` holds (ack time, the node that answered), ``errors`` counts failures by kind
    (``err_times``: when each gave up), ``flowing`` is set after 20 acks. The failover
    runs of bench.kv and of ``python -m bench`` both kill a leader under it."""

    def __init__(self, client, prefix: str, value: bytes):
        self.client = client
        self.prefix = prefix
        self.value = value
        self.acks: list[tuple[float, str | None]] = []
        self.errors: dict[str, int] = {}
        self.err_times: list[float] = []
        self.stop = asyncio.Event()
        self.flowing = asyncio.Event()

    async def run(self) -> None:
        c, i = self.client, 0
        while not self.stop.is_set():
            try:
                await c.put(f"{self.prefix}-{i:07d}", self.value)
            except Exception as e:
                count(self.errors, error_name(e))
                self.err_times.append(time.perf_counter())
                await asyncio.sleep(0.01)
            else:
                self.acks.append((time.perf_counter(), c.leader))  # c.leader: who answered
                if len(self.acks) >= 20:
                    self.flowing.set()
            i += 1

    def first_ack(self, since: int, after: float, not_from: str) -> float | None:
        """The first ack among ``acks[since:]`` later than ``after`` from another node."""
        return next((t for t, node in self.acks[since:] if node != not_from and t > after), None)


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def fs_type(path: str) -> str | None:
    """The filesystem type holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    best, kind = "", None
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


class Meter:
    """Per-phase differences of agent storage counters and CPU, and of client CPU."""

    def __init__(self, lc: LocalCluster, c: ClusterClient):
        self.lc, self.c = lc, c

    async def snapshot(self) -> dict:
        st = await self.lc.statuses(self.c)
        agents = {}
        for n in self.lc.names:
            s = st.get(n, {}).get("storage", {})
            agents[n] = {
                "fsyncs": s.get("fsyncs"),
                "fsync_ms_sum": s.get("fsync_latency_ms_sum"),
                "fsync_ms_max": s.get("fsync_latency_ms_max"),
                "cpu_s": proc_cpu_s(self.lc.procs[n].pid) if self.lc.alive(n) else None,
                "role": st.get(n, {}).get("role"),
            }
        return {"t": time.perf_counter(), "client_cpu_s": time.process_time(), "agents": agents}

    @staticmethod
    def diff(a: dict, b: dict, acked: int) -> dict:
        wall = b["t"] - a["t"]
        out = {"wall_s": round(wall, 3),
               "client_cpu_s": round(b["client_cpu_s"] - a["client_cpu_s"], 3),
               "agents": {}}
        total_cpu = out["client_cpu_s"]
        for n, sb in b["agents"].items():
            sa = a["agents"][n]
            row: dict = {"role": sb["role"]}
            if None not in (sa["fsyncs"], sb["fsyncs"], sa["fsync_ms_sum"], sb["fsync_ms_sum"]):
                nf = sb["fsyncs"] - sa["fsyncs"]
                ms = sb["fsync_ms_sum"] - sa["fsync_ms_sum"]
                row.update({
                    "group_commits": nf,
                    "fsync_ms_sum": round(ms, 3),
                    "fsync_ms_per_group_commit": round(ms / nf, 3) if nf else None,
                    "group_commits_per_acked_write": round(nf / acked, 3) if acked else None,
                    "fsync_ms_max_since_start": sb["fsync_ms_max"],
                })
            if sa["cpu_s"] is not None and sb["cpu_s"] is not None:
                row["cpu_s"] = round(sb["cpu_s"] - sa["cpu_s"], 3)
                total_cpu += row["cpu_s"]
            out["agents"][n] = row
        out["cpu_s_all_processes"] = round(total_cpu, 3)
        out["cpu_cores_busy"] = round(total_cpu / wall, 2) if wall > 0 else None
        return out


def fsync_mean(phase: dict) -> float | None:
    """Mean fsync time per group commit over all agents in one phase (all fsync calls of
    a group commit summed: WAL, and the hard state file and its directory when written)."""
    rows = [r for r in phase["resources"]["agents"].values() if r.get("group_commits")]
    n = sum(r["group_commits"] for r in rows)
    return round(sum(r["fsync_ms_sum"] for r in rows) / n, 3) if n else None


# -- the phases -------------------------------------------------------------------------


async def sequential(c: ClusterClient, meter: Meter, writes: int, value: bytes) -> dict:
    await c.put("seq-warmup", value)  # registers the session and finds the leader
    before = await meter.snapshot()
    lat: list[float] = []
    errors: dict[str, int] = {}
    t_start = time.perf_counter()
    for i in range(writes):
        t0 = time.perf_counter()
        try:
            await c.put(f"seq-{i:07d}", value)
        except Exception as e:  # counted, never fatal
            count(errors, error_name(e))
            continue
        lat.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - t_start
    after = await meter.snapshot()
    return {
        "writes": writes,
        "acked": len(lat),
        "errors": errors,
        "outcome_unknown": errors.get("OutcomeUnknown", 0),
        **latency_summary(lat),
        "writes_per_s": round(len(lat) / wall, 1) if wall > 0 else None,
        "wall_s": round(wall, 3),
        "resources": Meter.diff(before, after, len(lat)),
    }


async def throughput(lc: LocalCluster, meter: Meter, shared: ClusterClient, writers: int,
                     seconds: float, value: bytes, mode: str, timeout: float) -> dict:
    clients = [shared] * writers if mode == "shared" else \
        [lc.client(timeout=timeout) for _ in range(writers)]
    try:
        # Warm-up: one put per writer, concurrently, so each writer's session is registered
        # (and, per-writer, its connections are open) before the clock starts.
        await asyncio.gather(*(cl.put(f"tp-warmup-{w}", value) for w, cl in enumerate(clients)),
                             return_exceptions=True)
        before = await meter.snapshot()
        lat: list[float] = []
        errors: dict[str, int] = {}
        t_start = time.perf_counter()
        deadline = t_start + seconds

        async def writer(w: int, cl: ClusterClient) -> None:
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await cl.put(f"tp-{w:03d}-{i:07d}", value)
                except Exception as e:
                    count(errors, error_name(e))
                    await asyncio.sleep(0.01)  # no hot loop on a persistent error
                else:
                    lat.append((time.perf_counter() - t0) * 1000)
                i += 1

        await asyncio.gather(*(writer(w, cl) for w, cl in enumerate(clients)))
        wall = time.perf_counter() - t_start
        after = await meter.snapshot()
    finally:
        if mode != "shared":
            for cl in clients:
                await cl.close()
    s = latency_summary(lat)
    return {
        "writers": writers,
        "seconds": seconds,
        "client_mode": mode,
        "acked": len(lat),
        "writes_per_s": round(len(lat) / wall, 1) if wall > 0 else None,
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "p90_ms": s["p90_ms"],
        "max_ms": s["max_ms"],
        "outcome_unknown": errors.get("OutcomeUnknown", 0),
        "errors_total": sum(errors.values()),
        "errors": errors,
        "wall_s": round(wall, 3),
        "resources": Meter.diff(before, after, len(lat)),
    }


async def one_failover(lc: LocalCluster, mon: ClusterClient, run: int, value: bytes,
                       timeout: float, limit_s: float) -> dict:
    leader = await lc.wait_leader(mon)
    c = lc.client(timeout=timeout)
    w = AckWriter(c, f"fo-{run}", value)
    task = asyncio.create_task(w.run())
    row: dict = {"run": run, "killed": leader}
    try:
        await asyncio.wait_for(w.flowing.wait(), 30)
        w.errors.clear()
        w.err_times.clear()
        n_before = len(w.acks)
        t_kill = time.perf_counter()
        lc.signal(leader, 9)  # SIGKILL, sent now; reaped below
        elected_at: float | None = None
        new_leader: str | None = None
        others = [n for n in lc.names if n != leader]
        await asyncio.to_thread(lc.procs[leader].wait, 10)
        # Poll the survivors for a leader they agree on (a separate client), and wait for
        # the writer's first ack from a node other than the killed one.
        first_ack: float | None = None
        end = t_kill + limit_s
        while time.perf_counter() < end:
            first_ack = w.first_ack(n_before, t_kill, leader)
            if elected_at is None:
                st = await lc.statuses(mon, others)
                ls = {s["leader"] for s in st.values()}
                if len(st) == len(others) and len(ls) == 1 and None not in ls and leader not in ls:
                    elected_at, new_leader = time.perf_counter(), ls.pop()
            if first_ack is not None and elected_at is not None:
                break
            await asyncio.sleep(0.01)
        old_acks_after_kill = sum(1 for t, node in w.acks[n_before:] if node == leader and t > t_kill)
        w.stop.set()
        await task
        row.update({
            "new_leader": new_leader,
            "kill_to_next_ack_ms": round((first_ack - t_kill) * 1000, 1) if first_ack else None,
            "kill_to_leader_seen_ms": round((elected_at - t_kill) * 1000, 1) if elected_at else None,
            "acks_from_killed_node_after_kill": old_acks_after_kill,
            "errors": dict(w.errors),
            # when each failed put gave up, relative to the kill
            "error_at_ms": [round((t - t_kill) * 1000, 1) for t in w.err_times],
        })
    finally:
        w.stop.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await c.close()
    # Restart the killed node and wait until all three replicas converged.
    t0 = time.perf_counter()
    if not lc.alive(leader):
        lc.start(leader)
    await lc.wait_leader(mon, timeout=60)
    await lc.wait_converged(mon, timeout=60)
    row["restart_to_converged_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return row


async def failover(lc: LocalCluster, mon: ClusterClient, runs: int, value: bytes,
                   timeout: float) -> dict:
    rows = []
    for r in range(1, runs + 1):
        rows.append(await one_failover(lc, mon, r, value, timeout, limit_s=60))
    acks = [r["kill_to_next_ack_ms"] for r in rows if r["kill_to_next_ack_ms"] is not None]
    seen = [r["kill_to_leader_seen_ms"] for r in rows if r["kill_to_leader_seen_ms"] is not None]
    return {
        "runs": rows,
        "median_kill_to_next_ack_ms": round(statistics.median(acks), 1) if acks else None,
        "median_kill_to_leader_seen_ms": round(statistics.median(seen), 1) if seen else None,
        "failed_runs": sum(1 for r in rows if r["kill_to_next_ack_ms"] is None),
    }


# -- main -------------------------------------------------------------------------------


async def bench(a: argparse.Namespace, lc: LocalCluster) -> dict:
    value = b"v" * a.size
    out: dict = {}
    async with lc.client(timeout=a.timeout) as mon, lc.client(timeout=a.timeout) as c:
        t0 = time.perf_counter()
        await lc.wait_leader(mon, timeout=60)
        out["startup_to_leader_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        meter = Meter(lc, mon)
        out["sequential"] = await sequential(c, meter, a.writes, value)
        modes = ["per-writer", "shared"] if a.client_mode == "both" else [a.client_mode]
        out["throughput"] = await throughput(lc, meter, c, a.writers, a.seconds, value,
                                             modes[0], a.timeout)
        if len(modes) > 1:
            # The same load through one shared ClusterClient (one connection per agent,
            # a pooled session per concurrent write), for comparison.
            out["throughput_shared_client"] = await throughput(
                lc, meter, c, a.writers, a.seconds, value, modes[1], a.timeout)
        out["rss_kib"] = {n: lc.rss_kib(n) for n in lc.names}  # after the throughput run(s)
        out["fsync_ms_per_group_commit"] = {
            phase: fsync_mean(out[phase]) for phase in
            ("sequential", "throughput", "throughput_shared_client") if phase in out}
        await c.close()
        out["failover"] = await failover(lc, mon, a.failovers, value, a.timeout)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=2000, help="sequential puts")
    ap.add_argument("--writers", type=int, default=32, help="concurrent writers")
    ap.add_argument("--seconds", type=float, default=10.0, help="throughput duration")
    ap.add_argument("--failovers", type=int, default=5, help="leader kills")
    ap.add_argument("--size", type=int, default=100, help="value bytes")
    ap.add_argument("--client-mode", choices=("per-writer", "shared", "both"), default="both",
                    help="throughput: one ClusterClient per writer (the faster; reported as "
                         "'throughput'), one shared by all writers, or both (the shared run "
                         "then follows as 'throughput_shared_client')")
    ap.add_argument("--timeout", type=float, default=3.0, help="client request timeout (s)")
    ap.add_argument("--tmp", default=None, help="parent directory for the cluster's files")
    a = ap.parse_args(argv)
    args = sys.argv[1:] if argv is None else argv

    tmp = tempfile.mkdtemp(prefix="bench-kv-", dir=a.tmp)
    lc = LocalCluster(Path(tmp), 3, fsync=True, name="bench-kv")
    result: dict = {
        "bench": "kv",
        "nodes": 3,
        "fsync": True,
        "election_ms": 1000,
        "heartbeat_ms": 100,
        "value_bytes": a.size,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench.kv", *args]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "data_fs": fs_type(tmp),
        },
        "note": "client and the 3 agents share this machine's CPUs; latencies are "
                "client-side and include the client's own CPU time",
    }
    try:
        lc.start_all()
        result.update(asyncio.run(bench(a, lc)))
    finally:
        lc.stop_all()
        failed = {n: lc.stderr(n)[-2000:] for n in lc.names if lc.stderr(n).strip()}
        shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        result["agent_stderr"] = failed
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
