"""`raftdeck chaos`: a Jepsen-style run against real agents.

Starts a cluster of real agent processes (``console.local.LocalCluster``), or attaches to
the inventory's running local agents (``--inventory``), and for ``duration`` seconds:

* **clients** (one ``ClusterClient`` each, asyncio) do get / put / cas / delete on a
  small key set and submit echo tasks, and record every completed operation in a history
  (``console.history``): call and return from ``time.monotonic_ns()``, ``ok`` when the
  cluster answered, ``fail`` when the operation certainly had no effect (a definite
  refusal, ``ConnectionFailed`` before anything was sent, or any read that got no answer),
  ``info`` when a write's outcome is unknown (``OutcomeUnknown``: a timeout or a lost
  connection after sending, or anything unexpected);
* a **nemesis** (seeded ``random.Random``) injects one fault at a time for a few seconds,
  then heals it and rests: ``kill`` (SIGKILL, restart), ``pause`` (SIGSTOP, SIGCONT),
  ``partition`` (random halves, isolate the leader, a bridge - through the agents'
  transport filters, docs/PROTOCOL.md ``fault``), ``latency`` (the same filters).

Then it heals everything, waits for a leader (the liveness bound), reads every key,
waits for every acknowledged task to finish and the replicas to converge, and checks:
linearizability (``console.linearizability``), the task table (``check_tasks``), replica
convergence and liveness. The history (``history.jsonl``) and a JSON report
(``report.json``: verdict, fault timeline, latencies, and on failure the smallest failing
sub-history) go to ``--out``. Exit 0 only if every check passed.

With ``backup_every_s`` (``--backup-every S``) a backup reader takes a backup of the
cluster every S seconds while the clients and the nemesis run (``raftdeck backup``'s
code) and records what it holds as reads (client -1): one ``get`` per shared key, and one
per key written once whose put was acknowledged before the backup was asked for (the
newest ``BACKUP_NEWEST`` of them, which a stale backup would lack, and ``BACKUP_SAMPLE``
older ones at random, so a long run's checks do not grow with the square of its length),
all spanning the backup's call and return. The linearizability check then holds a backup to
what a linearizable read of every key at one moment would have returned.

``planted`` (tests and demos only) makes the *harness* lie: ``stale-reads`` serves each
get from a random replica's local state (``consistency: stale``) while recording it as a
linearizable read, so a correct cluster produces a history the checker must reject;
``stale-backups`` takes each backup from a random follower without its read barrier
(``--stale``). No agent code changes; nothing of it is reachable without asking for it
explicitly.
"""

from __future__ import annotations

import asyncio
import json
import os
import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from console import linearizability as lin
from console.argtypes import int_range, positive_float
from console.client import ClusterClient, ConnectionFailed, OutcomeUnknown, RequestError
from console.history import Op, check_tasks, dump_line, latency_stats

NEMESES = ("kill", "pause", "partition", "latency")
# Opt-in kinds (not in the default): "ca" takes the next step of replacing the CA
# (`raftdeck init --rotate-ca`) and sends every agent SIGHUP; a started TLS cluster only.
# "disk" fills a node's disk until the agent stops itself, then frees it and starts the
# agent again; a started cluster, as root (each agent's data directory is a small tmpfs).
# "member" removes a follower from the membership and stops it, then adds it back (a
# learner, started with its data directory as it was, then a voter). "oneway" cuts one
# node's links in one direction only (half the time the leader's): it hears nobody
# ("deaf": its own messages still arrive) or nobody hears it ("mute"). "wipe" kills a
# voter (half the time the leader), empties its data directory and starts it again: every
# agent that counts it a voter must refuse it (it lost its log and votes), until it is
# removed, emptied again and added back with --join; a cluster the run starts.
KINDS = NEMESES + ("ca", "disk", "member", "oneway", "wipe")
PLANTED = ("stale-reads", "stale-backups")
BACKUP_CLIENT = -1  # the history's client id of the backups' reads (0: the final reads)
BACKUP_NEWEST = 256  # per backup: the newest keys written once that it must hold ...
BACKUP_SAMPLE = 256  # ... and this many older ones, at random
CA_NEMESIS_NEEDS = ("the ca nemesis replaces the CA of a cluster the run starts with TLS; "
                    "drop --no-tls and --attach, or the ca kind")
# After the nemesis stops and everything is healed, a leader must be elected within this
# many seconds (docs/OPERATIONS.md "Chaos"): generous for a loaded 2-core machine.
LIVENESS_BOUND_S = 20.0
WIPE_NEMESIS_NEEDS = ("the wipe nemesis empties the data directories of a cluster the run "
                      "starts: drop --attach, or the wipe kind")
# A voter started on an emptied data directory must be refused by every agent that counts
# it a voter within this many seconds (the wiped_refused check).
WIPE_REFUSED_S = 20.0
DISK_NEMESIS_NEEDS = ("the disk nemesis mounts a small filesystem (tmpfs) under each agent's "
                      "data directory of a cluster the run starts: run it as root, without "
                      "--attach")
# Each agent's tmpfs with the disk nemesis (memory only as it is written). Under four WAL
# segments (4 x 64 MiB), so the agent does not reserve a segment's blocks up front: with
# 64 MiB reserved, the log would outlast any fault.
DISK_FS_MIB = 192
DISK_LEFT_BYTES = 64 << 10  # what a filled disk leaves: some hundred log records


@dataclass
class ChaosConfig:
    nodes: int = 5
    duration: float = 60.0
    nemesis: tuple[str, ...] = NEMESES
    seed: int = 0
    clients: int = 6
    keys: int = 5
    tasks: bool = True
    out: Path | None = None
    inventory: str | None = None     # attach to these running local agents
    fault_s: tuple[float, float] = (1.5, 4.0)   # how long one fault lasts
    rest_s: tuple[float, float] = (0.5, 2.0)    # healthy time between faults
    request_timeout: float = 1.0   # one attempt
    op_timeout: float = 3.0        # one operation, retries included; then fail or info
    checker_seconds: float = 60.0
    election_ms: int = 1000
    heartbeat_ms: int = 100
    snapshot_interval: int = 300
    planted: str | None = None
    priorities: dict[str, int] | None = None  # leader priorities of a started cluster
    unique_writes: float = 0.1   # share of puts that write a fresh key (lost-write detection)
    tls: bool = True  # a started cluster: mutual TLS (the default) or plain TCP
    task_share: float = 0.05     # share of operations that submit a task
    backup_every_s: float = 0.0  # a backup every this many seconds, read back as gets (0: none)
    # A fault script to run instead of the random nemesis (scenario tests):
    # ``async def script(run, admin, stop)``; see the tests/chaos scenarios.
    nemesis_script: Callable[..., Awaitable[None]] | None = None
    log: Callable[[str], None] = print


# == the cluster under test ====================================================================


class _Target:
    """Process control and clients for the nodes under test."""

    names: list[str]

    def client(self, **kw) -> ClusterClient: ...
    def address(self, name: str) -> tuple[str, int]: ...
    def rotate_ca(self, down: set[str]) -> str: ...
    def kill(self, name: str) -> None: ...
    def start(self, name: str, join: bool = False) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def alive(self, name: str) -> bool: ...
    def close(self) -> None: ...

    def exited_report(self) -> str:
        """For an error message: why agents this run started have exited ("" if none)."""
        return ""


class _Owned(_Target):
    """A LocalCluster this run starts and stops."""

    def __init__(self, cfg: ChaosConfig, workdir: Path):
        from console.local import LocalCluster

        self.lc = LocalCluster(workdir / "cluster", cfg.nodes, election_ms=cfg.election_ms,
                               heartbeat_ms=cfg.heartbeat_ms,
                               snapshot_interval=cfg.snapshot_interval, name="chaos",
                               task_lease_ms=3000, priorities=cfg.priorities, tls=cfg.tls)
        self.names = list(self.lc.names)
        self.mounts: list[Path] = []
        try:
            if "disk" in cfg.nemesis:
                for n in self.names:
                    self._mount(self.lc.tmp / "data" / n)
            self.lc.start_all()
        except BaseException:
            self.close()
            raise

    def _mount(self, where: Path) -> None:
        import subprocess

        where.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_FS_MIB}m", "tmpfs",
                              str(where)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"chaos: cannot mount a tmpfs on {where}: "
                               f"{res.stderr.strip() or res.returncode}; {DISK_NEMESIS_NEEDS}")
        self.mounts.append(where)

    def fill_disk(self, name: str) -> None:
        """Take all but ``DISK_LEFT_BYTES`` of the node's filesystem with one file."""
        from nodeagent.storage import disk_usage

        data = self.lc.tmp / "data" / name
        free, _ = disk_usage(str(data))
        with open(data / "ballast", "wb") as f:
            if free > DISK_LEFT_BYTES:
                os.posix_fallocate(f.fileno(), 0, free - DISK_LEFT_BYTES)

    def free_disk(self, name: str) -> None:
        try:
            os.unlink(self.lc.tmp / "data" / name / "ballast")
        except FileNotFoundError:
            pass

    def stopped_by_itself(self, name: str) -> dict:
        """How an agent that exited on its own ended: its exit code and whether it said
        so as an operator should read it (exit 3, the disk named, no traceback)."""
        code = self.lc.procs[name].wait(timeout=30)
        err = self.lc.stderr(name)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return {"exit_code": code, "clean": code == 3 and "Traceback" not in err
                and "the disk is full under" in last, "said": last[-300:]}

    def client(self, **kw):
        return self.lc.client(**kw)

    def address(self, name):
        return "127.0.0.1", self.lc.ports[name]

    def rotate_ca(self, down: set[str]) -> str:
        """The next step of replacing the CA, then SIGHUP to every agent not in ``down``
        (a killed one reads the files when it starts; a paused one handles the signal when
        resumed). The clients' contexts follow the files (console.client.current_context)."""
        import signal

        from nodeagent.security import rotate_ca

        step, _ = rotate_ca(self.lc.tls_dir, self.lc.cluster, [(n, "127.0.0.1") for n in self.names])
        for n in self.names:
            if n not in down:
                self.lc.signal(n, signal.SIGHUP)
        return step

    def exited_report(self) -> str:
        return self.lc.exited_report(self.names)

    def kill(self, name):
        self.lc.kill(name)

    def start(self, name, join=False):
        self.lc.start(name, join=join)

    def wipe(self, name: str) -> None:
        """Empty the node's data directory (its contents: it may be a mount point)."""
        import shutil

        data = self.lc.tmp / "data" / name
        for p in data.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def pause(self, name):
        self.lc.pause(name)

    def resume(self, name):
        self.lc.resume(name)

    def alive(self, name):
        return self.lc.alive(name)

    def close(self):
        import subprocess

        self.lc.stop_all()
        for where in self.mounts:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        self.mounts.clear()


class _Attached(_Target):
    """The inventory's running local agents (``raftdeck up``), controlled by pid file."""

    def __init__(self, inventory_path: str):
        from console.procs import LocalProcesses
        from nodeagent.config import load_inventory

        self.inv = load_inventory(inventory_path)
        self.procs = LocalProcesses(self.inv)
        self.names = [n.name for n in self.inv.nodes]
        for n in self.inv.nodes:
            self.procs.local_node(n.name)  # refuses remote nodes with a one-line error

    def client(self, **kw):
        from console.client import tls_context

        kw.setdefault("timeout", 3.0)
        # With TLS (an inventory's default), the admin certificate of its init directory:
        # the nemesis' faults are admin requests.
        kw.setdefault("ssl", tls_context(self.inv.cluster.tls))
        return ClusterClient({n.name: (n.host, n.port) for n in self.inv.nodes},
                             self.inv.cluster.name, **kw)

    def address(self, name):
        n = self.procs.node(name)
        return n.host, n.port

    def kill(self, name):
        self.procs.kill(name)

    def start(self, name, join=False):
        self.procs.start(self.procs.node(name), join=join)

    def pause(self, name):
        self.procs.pause(name)

    def resume(self, name):
        self.procs.resume(name)

    def alive(self, name):
        return self.procs.process(self.procs.node(name)).alive

    def close(self):
        pass


# == the run ==================================================================================


@dataclass
class _Run:
    cfg: ChaosConfig
    target: _Target
    prefix: str
    t0: int = field(default_factory=time.monotonic_ns)
    ops: list[Op] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    tasks_submitted: dict[str, str] = field(default_factory=dict)
    tasks_stdout: dict[str, str] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    paused: set[str] = field(default_factory=set)
    disk_stops: list[dict] = field(default_factory=list)  # agents the disk nemesis stopped
    member_changes: list[dict] = field(default_factory=list)  # the member nemesis' round trips
    oneway_leaders: list[dict] = field(default_factory=list)  # leaders the oneway nemesis cut
    wipes: list[dict] = field(default_factory=list)  # voters the wipe nemesis emptied
    backups: dict[str, int] = field(default_factory=lambda: {"taken": 0, "failed": 0, "reads": 0})
    notes: dict[str, Any] = field(default_factory=dict)  # what a script wants in the report

    def record(self, client: int, call: int, op: str, key: str, status: str, *,
               value=None, expected=None, output=None) -> None:
        self.ops.append(Op(len(self.ops), client, call, time.monotonic_ns(), op, key,
                           value=value, expected=expected, output=output, status=status))

    def t(self) -> float:
        return round((time.monotonic_ns() - self.t0) / 1e9, 3)

    def fault_event(self, event: str, kind: str, **detail) -> None:
        ev = {"t": self.t(), "event": event, "kind": kind, **detail}
        self.faults.append(ev)
        self.cfg.log(f"  {ev['t']:7.2f}s {event:5} {kind} "
                     + " ".join(f"{k}={v}" for k, v in detail.items()))


    # -- fault actions for nemesis scripts (each is logged in the fault timeline) --

    async def kill(self, name: str, **detail) -> None:
        self.fault_event("start", "kill", node=name, **detail)
        await asyncio.get_running_loop().run_in_executor(None, self.target.kill, name)
        self.killed.add(name)

    def restart(self, name: str) -> None:
        self.target.start(name)
        self.killed.discard(name)
        self.fault_event("end", "kill", node=name, action="restarted")

    def pause(self, name: str, **detail) -> None:
        self.fault_event("start", "pause", node=name, **detail)
        self.target.pause(name)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        self.target.resume(name)
        self.paused.discard(name)
        self.fault_event("end", "pause", node=name, action="resumed")

    async def leader(self, admin: ClusterClient) -> str | None:
        return await _leader(self, admin)

    async def isolate(self, admin: ClusterClient, nodes: list[str]) -> None:
        self.fault_event("start", "partition", shape="isolate", isolated=sorted(nodes))
        for rule in _split(list(self.target.names), nodes):
            await _fault_all(self, admin, **rule)

    async def heal(self, admin: ClusterClient) -> None:
        await _heal_all(self, admin)
        self.fault_event("end", "partition", action="healed")


ChaosRun = _Run


def _s(v: bytes | None) -> str | None:
    return None if v is None else bytes(v).decode("utf-8", "replace")


async def _client_loop(run: _Run, idx: int, stop: asyncio.Event) -> None:
    cfg = run.cfg
    rng = random.Random(f"{cfg.seed}-client-{idx}")
    keys = [f"{run.prefix}k{i}" for i in range(cfg.keys)]
    seen: dict[str, str | None] = {}
    n = 0
    async with run.target.client(timeout=cfg.request_timeout, op_timeout=cfg.op_timeout,
                                 client_id=f"{run.prefix}c{idx}", rng=rng) as c:
        while not stop.is_set():
            n += 1
            key = rng.choice(keys)
            r = rng.random()
            call = time.monotonic_ns()
            if r < 0.40:
                try:
                    if cfg.planted == "stale-reads":
                        node = rng.choice(run.target.names)
                        got = await c.get(key, consistency="stale", node=node)
                    else:
                        got = await c.get(key)
                    run.record(idx, call, "get", key, "ok", output=_s(got))
                    seen[key] = _s(got)
                except Exception:
                    # A read has no effect: whatever went wrong, it certainly did nothing.
                    run.record(idx, call, "get", key, "fail")
                continue
            if cfg.tasks and r >= 1.0 - cfg.task_share:
                await _submit_one(run, c, idx, n)
                continue
            value = f"{idx}-{n}"
            if r < 0.65:
                if rng.random() < cfg.unique_writes:
                    key = f"{run.prefix}u{idx}-{n}"  # written once: a lost write shows at the end
                op, expected, coro = "put", None, c.put(key, value.encode())
            elif r < 0.90:
                op = "cas"
                expected = seen.get(key) if rng.random() < 0.8 else None
                coro = c.cas(key, None if expected is None else expected.encode(), value.encode())
            else:
                op, expected, value, coro = "delete", None, None, c.delete(key)
            try:
                res = await coro
            except RequestError:
                # A definite refusal: the client raises it only when no attempt may have
                # applied (otherwise OutcomeUnknown).
                run.record(idx, call, op, key, "fail", value=value, expected=expected)
                continue
            except ConnectionFailed:
                run.record(idx, call, op, key, "fail", value=value, expected=expected)
                continue
            except (OutcomeUnknown, Exception):
                run.record(idx, call, op, key, "info", value=value, expected=expected)
                continue
            if op == "cas":
                swapped, now = res
                out = {"swapped": bool(swapped), "value": _s(now)}
                seen[key] = _s(now)
            else:
                out = res
                seen[key] = value
            run.record(idx, call, op, key, "ok", value=value, expected=expected, output=out)


async def _backup_loop(run: _Run, stop: asyncio.Event) -> None:
    """Every ``backup_every_s``: a backup of the cluster, recorded as reads (client -1) of
    every shared key and of keys written once whose puts were acknowledged before the
    backup was asked for (the newest, and a sample of the rest). A backup that fails
    observes nothing and is only counted."""
    from console import backup

    cfg = run.cfg
    rng = random.Random(f"{cfg.seed}-backups")
    shared = [f"{run.prefix}k{i}" for i in range(cfg.keys)]
    unique: list[str] = []  # acknowledged puts of keys written once, in the order recorded
    seen_ops = 0
    loop = asyncio.get_running_loop()
    async with run.target.client(timeout=cfg.request_timeout * 3, op_timeout=cfg.op_timeout,
                                 client_id=f"{run.prefix}backups", rng=rng) as c:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), cfg.backup_every_s)
                return
            except asyncio.TimeoutError:
                pass
            call = time.monotonic_ns()
            for o in run.ops[seen_ops:]:
                if (o.op == "put" and o.status == "ok" and o.client > 0
                        and o.key.startswith(f"{run.prefix}u")):
                    unique.append(o.key)
            seen_ops = len(run.ops)
            older = unique[:-BACKUP_NEWEST]
            keys = (shared + unique[-BACKUP_NEWEST:]
                    + rng.sample(older, min(BACKUP_SAMPLE, len(older))))
            try:
                # Any node that says it leads (a deposed one may not know yet): a backup
                # from it must still hold every acknowledged write.
                st = await c.statuses()
                leaders = [n for n, v in st.items() if isinstance(v, dict) and v.get("role") == "leader"]
                if cfg.planted == "stale-backups":
                    node = rng.choice([n for n in run.target.names if n not in leaders])
                    b = await asyncio.wait_for(backup.fetch(c, node, stale=True), cfg.op_timeout)
                else:
                    if not leaders:
                        raise backup.BackupError("no leader")
                    b = await asyncio.wait_for(backup.fetch(c, rng.choice(leaders)),
                                               cfg.op_timeout)
                sm = await loop.run_in_executor(None, backup.load, b)
            except Exception:  # no backup now (no leader, a fault): nothing observed
                run.backups["failed"] += 1
                continue
            run.backups["taken"] += 1
            for key in keys:
                run.record(BACKUP_CLIENT, call, "get", key, "ok", output=_s(sm.get(key)))
            run.backups["reads"] += len(keys)


async def _submit_one(run: _Run, c: ClusterClient, idx: int, n: int) -> None:
    tid = f"{run.prefix}t{idx}-{n}"
    spec = {"id": tid, "kind": "echo", "args": {"data": tid.encode()}, "timeout_ms": 10_000,
            "max_attempts": 5}
    run.tasks_stdout[tid] = tid
    try:
        r = await c.submit([spec])
    except (RequestError, ConnectionFailed):
        run.tasks_submitted[tid] = "fail"
        return
    except Exception:
        run.tasks_submitted[tid] = "info"
        return
    run.tasks_submitted[tid] = "ok" if r["results"] and r["results"][0]["ok"] else "fail"


# -- nemesis -----------------------------------------------------------------------------------


async def _leader(run: _Run, admin: ClusterClient) -> str | None:
    st = await admin.statuses()
    leaders = sorted(n for n, s in st.items() if isinstance(s, dict) and s.get("role") == "leader")
    if not leaders:
        return None
    # The one with the highest term (a deposed leader may not know yet).
    return max(leaders, key=lambda n: st[n]["term"])


async def _fault_all(run: _Run, admin: ClusterClient, **fault) -> None:
    async def one(n):
        try:
            await admin.call(n, "fault", **fault)
        except Exception:
            pass  # a dead or paused node cannot enforce it: it is not talking anyway
    await asyncio.gather(*(one(n) for n in run.target.names if n not in run.killed))


async def _heal_all(run: _Run, admin: ClusterClient) -> None:
    async def one(n):
        try:
            await admin.call(n, "heal")
        except Exception:
            pass
    await asyncio.gather(*(one(n) for n in run.target.names if n not in run.killed))


def _split(names: list[str], a: list[str]) -> list[dict]:
    b = [n for n in names if n not in a]
    return [{"action": "partition", "from": a, "to": b}, {"action": "partition", "from": b, "to": a}]


async def _nemesis(run: _Run, admin: ClusterClient, stop: asyncio.Event) -> None:
    cfg = run.cfg
    rng = random.Random(f"{cfg.seed}-nemesis")
    names = list(run.target.names)

    async def rest(lo_hi):
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*lo_hi))
        except asyncio.TimeoutError:
            pass

    await rest(cfg.rest_s)
    kinds: list[str] = []
    # Every enabled kind once per round, in a seeded order; a round in progress when the
    # duration ends is completed (its faults then last no time), so every kind runs.
    while not stop.is_set() or kinds:
        if not kinds:
            kinds = list(cfg.nemesis)
            rng.shuffle(kinds)
        kind = kinds.pop()
        leader = await _leader(run, admin)
        target = leader if (leader and rng.random() < 0.5) else rng.choice(names)
        loop = asyncio.get_running_loop()
        if kind == "kill":
            run.fault_event("start", "kill", node=target, leader=target == leader)
            await loop.run_in_executor(None, run.target.kill, target)
            run.killed.add(target)
            await rest(cfg.fault_s)
            run.target.start(target)
            run.killed.discard(target)
            run.fault_event("end", "kill", node=target, action="restarted")
        elif kind == "pause":
            run.fault_event("start", "pause", node=target, leader=target == leader)
            run.target.pause(target)
            run.paused.add(target)
            await rest(cfg.fault_s)
            run.target.resume(target)
            run.paused.discard(target)
            run.fault_event("end", "pause", node=target, action="resumed")
        elif kind == "partition":
            shape = rng.choice(["halves", "isolate-leader", "bridge"])
            shuffled = names[:]
            rng.shuffle(shuffled)
            if shape == "isolate-leader" and leader:
                rules = _split(names, [leader])
                detail = {"isolated": leader}
            elif shape == "bridge" and len(names) >= 3:
                # Two sides that cannot talk; the bridge node talks to both.
                bridge, rest_nodes = shuffled[0], shuffled[1:]
                half = len(rest_nodes) // 2
                a, b = rest_nodes[:half], rest_nodes[half:]
                rules = [{"action": "partition", "from": a, "to": b},
                         {"action": "partition", "from": b, "to": a}]
                detail = {"bridge": bridge, "sides": [sorted(a), sorted(b)]}
                shape = "bridge"
            else:
                minority = shuffled[: (len(names) - 1) // 2 or 1]
                rules = _split(names, minority)
                detail = {"minority": sorted(minority)}
                shape = "halves"
            run.fault_event("start", "partition", shape=shape, **detail)
            for rule in rules:
                await _fault_all(run, admin, **rule)
            await rest(cfg.fault_s)
            await _heal_all(run, admin)
            run.fault_event("end", "partition", shape=shape)
        elif kind == "oneway":
            # An asymmetric partition. A deaf leader's heartbeats still reach the others
            # and keep them from campaigning, so it must step down on its own (it hears
            # no answers: CheckQuorum); a mute one is replaced as if gone, but still hears
            # the new leader. A deaf follower's campaigns reach everyone (pre-vote must
            # keep them from disrupting the leader); a mute one just lags.
            way = rng.choice(["deaf", "mute"])
            others = [n for n in names if n != target]
            rule = ({"action": "partition", "from": others, "to": [target]} if way == "deaf"
                    else {"action": "partition", "from": [target], "to": others})
            run.fault_event("start", "oneway", node=target, way=way, leader=target == leader)
            t0 = time.monotonic()
            await _fault_all(run, admin, **rule)
            if target != leader:
                await rest(cfg.fault_s)
            else:  # held until another leads, too (the oneway_leaders check)
                watch = asyncio.ensure_future(_oneway_replaced(run, admin, target, way, t0))
                try:
                    await rest(cfg.fault_s)
                    await watch
                finally:
                    watch.cancel()
            await _heal_all(run, admin)
            run.fault_event("end", "oneway", node=target, way=way)
        elif kind == "disk":
            await _fill_disk(run, target, leader, rest)
        elif kind == "member":
            await _member_out_and_in(run, admin, rng, rest)
        elif kind == "wipe":
            await _wipe_voter(run, admin, rng, rest)
        elif kind == "ca":
            step = run.target.rotate_ca(run.killed)
            run.fault_event("start", "ca", step=step)
            await rest(cfg.fault_s)  # the reloads and the connections they end settle
            run.fault_event("end", "ca", step=step)
        elif kind == "latency":
            ms = rng.choice([50, 100, 200, 400])
            run.fault_event("start", "latency", ms=ms)
            await _fault_all(run, admin, action="latency", ms=ms)
            await rest(cfg.fault_s)
            await _heal_all(run, admin)
            run.fault_event("end", "latency", ms=ms)
        await rest(cfg.rest_s)


ONEWAY_REPLACE_S = 20.0  # a leader cut one way must be replaced within this


async def _oneway_replaced(run: _Run, admin: ClusterClient, cut: str, way: str,
                           t0: float) -> None:
    """Watch from the cut on until a node other than ``cut`` leads, or the bound passes
    (even past the run's duration), and record how long that took."""
    deadline = t0 + ONEWAY_REPLACE_S
    by = None
    while time.monotonic() < deadline:
        by = await _leader(run, admin)
        if by is not None and by != cut:
            break
        by = None
        await asyncio.sleep(0.1)
    run.oneway_leaders.append({"node": cut, "way": way, "t": run.t(), "replaced_by": by,
                               "after_s": round(time.monotonic() - t0, 2)})


async def _fill_disk(run: _Run, target: str, leader: str | None, rest) -> None:
    """Fill ``target``'s disk; once its agent has stopped itself (or the fault's time is
    up: an agent cut off from the log writes nothing), free the disk and start it again.
    How it stopped is kept for the ``disk_stops`` check."""
    cfg = run.cfg
    loop = asyncio.get_running_loop()
    run.fault_event("start", "disk", node=target, leader=target == leader)
    await loop.run_in_executor(None, run.target.fill_disk, target)
    run.killed.add(target)  # ends the fault by a start if the run ends meanwhile
    deadline = loop.time() + cfg.fault_s[1] * 3
    while run.target.alive(target) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await rest(cfg.fault_s)  # down for a while, as a killed node is
    run.target.free_disk(target)
    if run.target.alive(target):
        run.killed.discard(target)
        run.fault_event("end", "disk", node=target, action="freed", stopped=False)
        return
    how = await loop.run_in_executor(None, run.target.stopped_by_itself, target)
    run.disk_stops.append({"node": target, "t": run.t(), **how})
    run.target.start(target)
    run.killed.discard(target)
    run.fault_event("end", "disk", node=target, action="freed and restarted", stopped=True,
                    exit_code=how["exit_code"])


async def _leader_status(run: _Run, admin: ClusterClient) -> tuple[str | None, dict | None]:
    """The leader and its status, or (leader or None, None) when either is not to be had."""
    leader = await _leader(run, admin)
    if leader is None:
        return None, None
    try:
        return leader, await admin.call(leader, "status")
    except Exception:
        return leader, None


def _leader_caller(run: _Run, admin: ClusterClient, avoid: str | None = None):
    """``await call(type_, **fields) -> bool``: the request sent to whoever leads at the
    time (never ``avoid``), again until it is taken or the membership nemeses' deadline
    (30 s, or ten fault times) passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(30.0, run.cfg.fault_s[1] * 10)

    async def call(type_: str, **fields) -> bool:
        while loop.time() < deadline:
            ld = await _leader(run, admin)
            if ld is not None and ld != avoid:
                try:
                    await admin.call(ld, type_, **fields)
                    return True
                except Exception:
                    pass
            await asyncio.sleep(0.2)
        return False

    return call


async def _member_out_and_in(run: _Run, admin: ClusterClient, rng: random.Random, rest) -> None:
    """Remove a follower (a voter) from the membership and stop its agent; after the
    fault's time add it back as a learner, start it with its data directory as it was, and
    make it a voter again once the leader takes it (refused while it lags). Each request
    goes to whoever leads at the time, and is tried again until the deadline."""
    cfg = run.cfg
    loop = asyncio.get_running_loop()
    leader, st = await _leader_status(run, admin)
    if st is None:
        return
    voters = [n for n in st.get("voters") or () if n != leader and n not in run.killed]
    if not voters:
        return
    victim = rng.choice(sorted(voters))
    try:  # its leader priority, to add it back with (a node's own status says it)
        priority = int((await admin.call(victim, "status")).get("priority", 1))
    except Exception:
        priority = 1
    host, port = run.target.address(victim)
    leader_call = _leader_caller(run, admin)
    run.fault_event("start", "member", node=victim)
    if not await leader_call("remove_node", node=victim):
        run.fault_event("end", "member", node=victim, action="removal refused")
        return
    await loop.run_in_executor(None, run.target.kill, victim)
    run.killed.add(victim)
    await rest(cfg.fault_s)
    added = await leader_call("add_node", node=victim, host=host, port=port,
                              priority=priority, learner=True)
    run.target.start(victim)  # its data directory holds its log: nothing to bootstrap
    run.killed.discard(victim)
    voter = added and await leader_call("add_node", node=victim, host=host, port=port,
                                        priority=priority, learner=False)
    run.member_changes.append({"node": victim, "t": run.t(), "readded": added, "voter": voter})
    run.fault_event("end", "member", node=victim,
                    action="back as a voter" if voter else "NOT BACK as a voter")


async def _wipe_voter(run: _Run, admin: ClusterClient, rng: random.Random, rest) -> None:
    """Kill a voter (the leader half the time), empty its data directory and start it:
    it bootstraps as if new. Every other agent that counts it a voter must refuse it (the
    wiped_refused check). After the fault's time, the documented way back: the leader
    removes it, it is stopped and emptied again, added as a learner, started with
    --join, and made a voter once caught up."""
    cfg = run.cfg
    loop = asyncio.get_running_loop()
    leader, st = await _leader_status(run, admin)
    if st is None:
        return
    try:
        voters = [n for n in st.get("voters") or () if n not in run.killed]
        victim = leader if rng.random() < 0.5 else rng.choice(sorted(voters))
        priority = int((await admin.call(victim, "status")).get("priority", 1))
    except Exception:
        return
    if len(st.get("voters") or ()) < 3:
        return  # with one or two voters the rest has no quorum without it
    host, port = run.target.address(victim)
    run.fault_event("start", "wipe", node=victim, leader=victim == leader)
    await loop.run_in_executor(None, run.target.kill, victim)
    await loop.run_in_executor(None, run.target.wipe, victim)
    run.target.start(victim)
    t0 = time.monotonic()
    others = [n for n in run.target.names if n != victim]
    refused_by: list[str] = []
    owed: list[str] = others
    while time.monotonic() < t0 + WIPE_REFUSED_S:
        # Each other agent that counts it a voter must refuse it (one that does not, a
        # lagging one that has not applied its promotion yet, owes nothing): it says so,
        # and the wiped node's own link to it is down with the reason.
        owed, refused_by = [], []
        try:
            links = (await asyncio.wait_for(admin.call(victim, "status"), 3.0))["transport"]["peers"]
        except Exception:
            links = {}
        for n in others:
            try:
                s = await asyncio.wait_for(admin.call(n, "status"), 3.0)
            except Exception:
                owed.append(n)  # not answering: not judged yet
                continue
            link = links.get(n) or {"connected": True}
            if (victim in (s.get("refused_peers") or {}) and not link["connected"]
                    and "data_dir_changed" in (link.get("last_error") or "")):
                refused_by.append(n)
            elif victim in (s.get("voters") or ()):
                owed.append(n)
        if not owed:
            break
        await asyncio.sleep(0.2)
    entry = {"node": victim, "t": run.t(), "refused_by": refused_by, "owed": owed,
             "after_s": round(time.monotonic() - t0, 2)}
    await rest(cfg.fault_s)

    leader_call = _leader_caller(run, admin, avoid=victim)
    removed = await leader_call("remove_node", node=victim)
    await loop.run_in_executor(None, run.target.kill, victim)
    await loop.run_in_executor(None, run.target.wipe, victim)
    added = removed and await leader_call("add_node", node=victim, host=host, port=port,
                                          priority=priority, learner=True)
    run.target.start(victim, join=True)
    voter = added and await leader_call("add_node", node=victim, host=host, port=port,
                                        priority=priority, learner=False)
    entry["voter"] = voter
    run.wipes.append(entry)
    run.fault_event("end", "wipe", node=victim, refused_by=refused_by,
                    action="back as a voter" if voter else "NOT BACK as a voter")


async def _heal_everything(run: _Run, admin: ClusterClient) -> None:
    for n in sorted(run.paused):
        run.target.resume(n)
    run.paused.clear()
    for n in sorted(run.killed):
        run.target.start(n)
    run.killed.clear()
    await _heal_all(run, admin)


# -- after the run -----------------------------------------------------------------------------


async def _wait_leader(run: _Run, admin: ClusterClient, timeout: float) -> tuple[str | None, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = await admin.statuses()
        live = {n: s for n, s in st.items() if isinstance(s, dict)}
        leaders = {n for n, s in live.items() if s["role"] == "leader"}
        if len(leaders) == 1:
            ld = next(iter(leaders))
            if sum(1 for s in live.values() if s["leader"] == ld and s["term"] == live[ld]["term"]) \
                    > len(run.target.names) // 2:
                return ld, time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None, time.monotonic() - t0


async def _final_reads(run: _Run, c: ClusterClient, deadline: float) -> list[str]:
    """One linearizable read of every key the history touched (client 0)."""
    keys = [f"{run.prefix}k{i}" for i in range(run.cfg.keys)]
    keys += sorted({o.key for o in run.ops} - set(keys))
    missing: list[str] = []
    sem = asyncio.Semaphore(16)

    async def one(key: str) -> None:
        async with sem:
            while True:
                call = time.monotonic_ns()
                try:
                    got = await c.get(key)
                    run.record(0, call, "get", key, "ok", output=_s(got))
                    return
                except Exception:
                    run.record(0, call, "get", key, "fail")
                    if time.monotonic() > deadline:
                        missing.append(key)
                        return
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(one(k) for k in keys))
    return sorted(missing)


async def _converged(run: _Run, admin: ClusterClient, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    last = {}
    while time.monotonic() - t0 < timeout:
        st = await admin.statuses()
        last = {n: (s["applied"], s["digest"]) if isinstance(s, dict) else None for n, s in st.items()}
        if all(v is not None for v in last.values()) and len(set(last.values())) == 1:
            return {"ok": True, "seconds": round(time.monotonic() - t0, 2),
                    "applied": next(iter(last.values()))[0]}
        await asyncio.sleep(0.2)
    return {"ok": False, "replicas": {n: (v[0], v[1][:12]) if v else "unreachable"
                                      for n, v in last.items()}}


async def _task_records(run: _Run, admin: ClusterClient, ids: list[str]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for n in run.target.names:
        recs: dict[str, dict] = {}
        after = None
        while True:  # every task this replica holds with our prefix (unsubmitted ones too)
            page = await admin.call(n, "task_list", limit=1000, after=after)
            for r in page:
                if r["id"].startswith(run.prefix):
                    recs[r["id"]] = r
            if len(page) < 1000:
                break
            after = page[-1]["id"]
        out[n] = recs
    return out


# == entry point ================================================================================


async def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    """One chaos run; returns the report (also written to ``cfg.out``)."""
    for k in cfg.nemesis:
        if k not in KINDS:
            raise ValueError(f"unknown nemesis {k!r}: choose from {', '.join(KINDS)}")
    if "ca" in cfg.nemesis and (cfg.inventory or not cfg.tls):
        raise ValueError(CA_NEMESIS_NEEDS)
    if "disk" in cfg.nemesis and (cfg.inventory or os.geteuid() != 0):
        raise ValueError(DISK_NEMESIS_NEEDS)
    if "wipe" in cfg.nemesis and cfg.inventory:
        raise ValueError(WIPE_NEMESIS_NEEDS)
    if cfg.planted is not None and cfg.planted not in PLANTED:
        raise ValueError(f"unknown planted bug {cfg.planted!r}: choose from {', '.join(PLANTED)}")
    out = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="raftdeck-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    target: _Target = _Attached(cfg.inventory) if cfg.inventory else _Owned(cfg, out)
    prefix = f"chaos-{cfg.seed}-{os.getpid()}-{int(time.time())}/"
    run = _Run(cfg, target, prefix)
    cfg.log(f"chaos: {len(target.names)} nodes, {cfg.duration:g}s, nemesis "
            f"{','.join(cfg.nemesis) or 'none'}, seed {cfg.seed}, {cfg.clients} clients, "
            f"out {out}")
    report: dict[str, Any] = {"seed": cfg.seed, "nodes": len(target.names),
                              "duration_s": cfg.duration, "nemesis": list(cfg.nemesis),
                              "clients": cfg.clients, "keys": cfg.keys, "planted": cfg.planted,
                              "tls": None if cfg.inventory else cfg.tls, "out": str(out)}
    try:
        async with target.client(timeout=2.0) as admin:
            ld, _ = await _wait_leader(run, admin, 60.0)
            if ld is None:
                raise TimeoutError("the cluster elected no leader within 60 s before the run; "
                                   "see `raftdeck status` and the agents' logs"
                                   + target.exited_report())
            # ``stop`` tells the nemesis the duration is over; the clients go on until the
            # nemesis has finished (a script may run longer than ``duration``).
            stop, clients_stop = asyncio.Event(), asyncio.Event()
            workers = [asyncio.create_task(_client_loop(run, i + 1, clients_stop))
                       for i in range(cfg.clients)]
            if cfg.backup_every_s > 0:
                workers.append(asyncio.create_task(_backup_loop(run, clients_stop)))
            script = cfg.nemesis_script or (_nemesis if cfg.nemesis else None)
            nem = asyncio.create_task(script(run, admin, stop)) if script else None
            await asyncio.sleep(cfg.duration)
            stop.set()
            if nem is not None:
                await nem
            clients_stop.set()
            await _heal_everything(run, admin)
            run.fault_event("end", "all", action="healed")
            # Every client finishes its operation in flight (bounded by op_timeout).
            await asyncio.wait_for(asyncio.gather(*workers), cfg.op_timeout * 3 + 30)
            leader, took = await _wait_leader(run, admin, LIVENESS_BOUND_S)
            report["liveness"] = {"ok": leader is not None, "leader": leader,
                                  "seconds": round(took, 2), "bound_s": LIVENESS_BOUND_S}
            async with target.client(timeout=2.0, op_timeout=10.0) as c:
                unread = await _final_reads(run, c, time.monotonic() + 60)
                acked = sorted(t for t, s in run.tasks_submitted.items() if s == "ok")
                tasks_done = True
                if acked:
                    try:
                        await c.wait(acked, timeout=60.0)
                    except Exception:
                        tasks_done = False
            conv = await _converged(run, admin, 30.0)
            report["convergence"] = conv
            records = await _task_records(run, admin, sorted(run.tasks_submitted))
    finally:
        target.close()

    ops = run.ops
    with open(out / "history.jsonl", "w") as f:
        for o in ops:
            f.write(dump_line(o) + "\n")
    counts = {s: sum(1 for o in ops if o.status == s) for s in ("ok", "fail", "info")}
    report["ops"] = {"total": len(ops), **counts}
    report["faults"] = run.faults
    report["notes"] = run.notes
    report["latency"] = latency_stats([o for o in ops if o.client != BACKUP_CLIENT])
    report["final_reads"] = {"ok": not unread, "unread": unread}
    report["disk_stops"] = run.disk_stops
    report["member_changes"] = run.member_changes
    report["oneway_leaders"] = run.oneway_leaders
    report["wipes"] = run.wipes
    if cfg.backup_every_s > 0:
        report["backups"] = dict(run.backups, every_s=cfg.backup_every_s)
    result = lin.check(ops, seconds=cfg.checker_seconds)
    report["linearizability"] = result.to_json()
    if result.verdict == lin.NON_LINEARIZABLE:
        key = result.failing_keys[0]
        key_ops = [o for o in ops if o.key == key]
        small = lin.shrink(key_ops, seconds=30.0)
        report["failure"] = {"key": key, "ops": len(key_ops),
                             "smallest": [dict(o.to_json(), line=o.id + 1) for o in small],
                             "described": [o.describe() for o in small]}
    tasks = check_tasks(run.tasks_submitted, run.tasks_stdout, records)
    report["tasks"] = dict(tasks.to_json(), all_final_in_time=tasks_done)
    checks = {
        "linearizable": result.verdict == lin.LINEARIZABLE,
        "tasks": tasks.ok and tasks_done,
        "converged": conv["ok"],
        "liveness": report["liveness"]["ok"],
        "final_reads": not unread,
    }
    if "disk" in cfg.nemesis:  # every agent the full disk stopped said so, and nothing else
        checks["disk_stops"] = all(d["clean"] for d in run.disk_stops)
    if "member" in cfg.nemesis:  # every node taken out came back as a voter
        checks["members_back"] = all(m["voter"] for m in run.member_changes)
    if "oneway" in cfg.nemesis:  # a leader that hears nobody, or nobody hears, gives way
        checks["oneway_leaders"] = all(o["replaced_by"] for o in run.oneway_leaders)
    if "wipe" in cfg.nemesis:  # refused by every agent that counted it a voter; back again
        checks["wiped_refused"] = all(not w["owed"] and w["voter"] for w in run.wipes)
    if cfg.backup_every_s > 0:  # the backups' reads are in the linearizability check
        checks["backups_taken"] = run.backups["taken"] > 0
    report["checks"] = checks
    report["ok"] = all(checks.values())
    report["verdict"] = ("pass" if report["ok"] else
                         "unknown" if result.verdict == lin.UNKNOWN and
                         all(v for k, v in checks.items() if k != "linearizable") else "fail")
    report["history"] = str(out / "history.jsonl")
    with open(out / "report.json", "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    return report


def summary(report: dict[str, Any]) -> str:
    """The human-readable end of a run (the CLI prints it)."""
    o = report["ops"]
    lines = [
        f"ops {o['total']}: ok {o['ok']}, fail {o['fail']}, info {o['info']}; "
        f"faults {sum(1 for f in report['faults'] if f['event'] == 'start')}",
        f"linearizability: {report['linearizability']['verdict']} "
        f"({report['linearizability']['seconds']:.2f}s, "
        f"{len(report['linearizability']['keys'])} keys)",
        f"tasks: {report['tasks']['acknowledged']} acknowledged, {report['tasks']['final']} "
        f"with one final result, {report['tasks']['unknown']} unknown; "
        + ("ok" if report["checks"]["tasks"] else "FAILED " + json.dumps(
            {k: v for k, v in report["tasks"].items() if isinstance(v, list) and v})),
        f"liveness: leader {report['liveness']['leader']} "
        f"{report['liveness']['seconds']:.1f}s after heal (bound {report['liveness']['bound_s']:g}s)",
        f"convergence: {'ok' if report['convergence']['ok'] else report['convergence']}",
    ]
    if "members_back" in report["checks"]:
        changes = report["member_changes"]
        lines.append(f"member: {len(changes)} nodes taken out of the membership and back, "
                     + ("each a voter again" if report["checks"]["members_back"] else
                        "NOT ALL BACK: " + json.dumps([m for m in changes if not m["voter"]])))
    if "oneway_leaders" in report["checks"]:
        cut = report["oneway_leaders"]
        slow = [o for o in cut if not o["replaced_by"]]
        if not cut:
            lines.append("oneway: only followers were cut one way (no leader to replace)")
        else:
            lines.append(f"oneway: {len(cut)} leaders cut one way, "
                         + (f"each replaced (within {max(o['after_s'] for o in cut):g}s)"
                            if not slow else f"NOT REPLACED within {ONEWAY_REPLACE_S:g}s: "
                            + json.dumps(slow)))
    if "wiped_refused" in report["checks"]:
        wipes = report["wipes"]
        bad = [w for w in wipes if w["owed"] or not w["voter"]]
        lines.append(f"wipe: {len(wipes)} voters emptied and started, "
                     + (f"each refused (within {max((w['after_s'] for w in wipes), default=0):g}s)"
                        " and back as a voter" if not bad else "NOT AS EXPECTED: "
                        + json.dumps(bad)))
    if "backups_taken" in report["checks"]:
        b = report["backups"]
        lines.append(f"backups: {b['taken']} taken every {b['every_s']:g}s ({b['failed']} "
                     f"failed), read back as {b['reads']} gets, in the linearizability check")
    if "disk_stops" in report["checks"]:
        stops = report["disk_stops"]
        bad = [d for d in stops if not d["clean"]]
        lines.append(f"disk: {len(stops)} agents stopped by a full disk, "
                     + ("each with exit 3 and the disk named" if not bad else
                        "NOT AS EXPECTED: " + json.dumps(bad)))
    for k, v in sorted(report["latency"].items()):
        lines.append(f"  {k:12} n={v['count']:<6} p50 {v['p50_ms']}ms p99 {v['p99_ms']}ms max {v['max_ms']}ms")
    if "failure" in report:
        f = report["failure"]
        lines.append(f"smallest failing sub-history of key {f['key']} ({len(f['smallest'])} of {f['ops']} ops):")
        for d, op in zip(f["described"], f["smallest"]):
            lines.append(f"  line {op['line']}: {d}  [{op['call']}..{op['return']}]")
    lines.append(f"verdict: {report['verdict'].upper()}")
    lines.append(f"history: {report['history']}")
    lines.append(f"report: {Path(report['history']).with_name('report.json')}")
    return "\n".join(lines)


# == the command line (console/cli.py adds the subparser and calls these) ===================


def add_arguments(p: argparse.ArgumentParser) -> None:
    def nemesis_list(text: str) -> tuple[str, ...]:
        kinds = tuple(k for k in text.split(",") if k) if text != "none" else ()
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown nemesis {bad[0]!r}: use a comma list of {', '.join(KINDS)} (or none)")
        return kinds

    count, seconds = int_range, positive_float

    p.add_argument("--nodes", type=count(1, 15), default=5, help="agents to start (default 5)")
    p.add_argument("--duration", type=seconds, default=60.0, metavar="S",
                   help="seconds of workload and faults (default 60)")
    p.add_argument("--nemesis", type=nemesis_list, default=NEMESES, metavar="KINDS",
                   help="comma list of kill,pause,partition,latency,ca,disk,member,oneway,wipe, "
                        "or none (default: all but ca, which replaces the CA step by step, as "
                        "`raftdeck init --rotate-ca` does, and needs TLS and a cluster the run "
                        "starts; disk, which fills a node's disk until its agent stops, "
                        "then frees it and starts it again, and needs root and a cluster the "
                        "run starts; member, which removes a follower from the membership "
                        "and stops it, then adds it back, a learner and then a voter; and "
                        "oneway, which cuts one node's links in one direction: it hears "
                        "nobody, or nobody hears it; and wipe, which kills a voter, empties its "
                        "data directory and starts it: the others must refuse it until it is "
                        "removed and added back; a cluster the run starts)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the workload and the fault schedule (default: random, printed)")
    p.add_argument("--clients", type=count(1, 64), default=6, help="concurrent clients (default 6)")
    p.add_argument("--keys", type=count(1, 1000), default=5, help="keys they share (default 5)")
    p.add_argument("--no-tasks", action="store_true", help="do not submit tasks")
    p.add_argument("--backup-every", type=seconds, default=None, metavar="S",
                   help="take a backup every S seconds during the run and check what it holds "
                        "as linearizable reads: every shared key, and the newest 256 and 256 "
                        "older keys written once (default: no backups)")
    p.add_argument("--no-tls", action="store_true",
                   help="start the cluster with plain TCP instead of mutual TLS (its agents "
                        "then write frames on the socket without a writer task: test that path)")
    p.add_argument("--out", metavar="DIR", help="where history.jsonl and report.json go "
                   "(default: a new temporary directory, printed)")
    p.add_argument("--attach", action="store_true",
                   help="run against the inventory's running local agents (--inventory) instead "
                        "of starting a fresh cluster; kill/pause act on their pid files")
    p.add_argument("--checker-s", type=seconds, default=60.0, metavar="S",
                   help="time budget of the linearizability check; past it the verdict is "
                        "unknown (default 60)")
    p.add_argument("--planted-bug", choices=PLANTED, default=None,
                   help=argparse.SUPPRESS)  # tests and demos: the harness lies on purpose


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    if args.attach and args.no_tls:
        from console.cli import EXIT_USAGE, CliError

        raise CliError("chaos: --no-tls chooses how a cluster it starts talks; with --attach "
                       "the inventory's own tls settings apply (drop one of the two)", EXIT_USAGE)
    if "ca" in args.nemesis and (args.attach or args.no_tls):
        from console.cli import EXIT_USAGE, CliError

        raise CliError(f"chaos: {CA_NEMESIS_NEEDS}", EXIT_USAGE)
    if "disk" in args.nemesis and (args.attach or os.geteuid() != 0):
        from console.cli import EXIT_USAGE, CliError

        raise CliError(f"chaos: {DISK_NEMESIS_NEEDS}", EXIT_USAGE)
    if "wipe" in args.nemesis and args.attach:
        from console.cli import EXIT_USAGE, CliError

        raise CliError(f"chaos: {WIPE_NEMESIS_NEEDS}", EXIT_USAGE)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    return ChaosConfig(nodes=args.nodes, duration=args.duration, nemesis=tuple(args.nemesis),
                       seed=seed, clients=args.clients, keys=args.keys, tasks=not args.no_tasks,
                       out=Path(args.out) if args.out else None,
                       inventory=args.inventory if args.attach else None,
                       checker_seconds=args.checker_s, planted=args.planted_bug,
                       backup_every_s=args.backup_every or 0.0,
                       tls=not args.no_tls,
                       log=lambda line: print(line, flush=True,
                                              file=sys.stderr if args.json else sys.stdout))


async def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report = await run_chaos(cfg)
    if getattr(args, "json", False):
        print(json.dumps(report, sort_keys=True))
    else:
        print(summary(report), flush=True)
    return 0 if report["ok"] else 1
