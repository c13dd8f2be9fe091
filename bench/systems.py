"""The clusters ``python -m bench`` drives: raftdeck agents and PySyncObj nodes.

Both expose the same small surface, so every workload in bench/__main__.py runs the same
code against either: start/stop/kill(SIGKILL)/restart by PID, resident memory, a client
with ``put(key, value)`` that follows leader hints and retries within a time budget, and
a status view (who leads, in which term, what is applied).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack

from console.client import ClusterClient, OutcomeUnknown
from console.local import LocalCluster, free_ports, stop_processes
from nodeagent.config import ClusterConfig


def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    """The process's resident memory in KiB (``field="VmHWM"``: its peak so far)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def config_defaults() -> dict:
    """The agent's default timeouts, as an operator gets them without setting any."""
    c = ClusterConfig.__dataclass_fields__
    return {"election_ms": c["election_timeout_ms"].default,
            "heartbeat_ms": c["heartbeat_interval_ms"].default,
            "snapshot_interval": c["snapshot_interval"].default,
            "snapshot_log_percent": c["snapshot_log_percent"].default}


# Whether raftdeck clusters run with mutual TLS (python -m bench --tls).
TLS = False


class Raftdeck:
    """N `nodeagent run` processes (console.local.LocalCluster) with the default timeouts."""

    kind = "raftdeck"

    def __init__(self, tmp: Path, n: int = 3, *, fsync: bool = True,
                 snapshot_interval: int | None = None, timeout: float = 3.0,
                 source: str | None = None, election_ms: int | None = None,
                 heartbeat_ms: int | None = None, env: dict | None = None,
                 tls: bool | None = None):
        """``source``: run the agents from that source tree (PYTHONPATH) instead of this
        one, to compare two versions in one run; its timeouts must then be given.
        ``tls``: mutual TLS between agents and clients (default ``TLS``, off: PySyncObj
        and older source trees speak plain TCP; `python -m bench --tls` turns it on, and
        `python -m bench.ab --tls` for every tree it compares)."""
        d = config_defaults()
        if election_ms is not None:
            d["election_ms"] = election_ms
        if heartbeat_ms is not None:
            d["heartbeat_ms"] = heartbeat_ms
        self.source = source
        self.env = env or {}
        self.fsync = fsync
        self.election_ms, self.heartbeat_ms = d["election_ms"], d["heartbeat_ms"]
        self.snapshot_interval = snapshot_interval or d["snapshot_interval"]
        # An older source tree may predate TLS: only when asked for by name.
        self.tls = tls if tls is not None else (TLS and source is None)
        self.lc = LocalCluster(tmp, n, fsync=fsync, election_ms=self.election_ms,
                               heartbeat_ms=self.heartbeat_ms,
                               snapshot_interval=self.snapshot_interval, name="bench",
                               tls=self.tls)
        self.names = self.lc.names
        self.timeout = timeout
        self.mon: ClusterClient | None = None

    def describe(self) -> dict:
        return {"system": "raftdeck", "nodes": len(self.names), "fsync": self.fsync,
                "tls": self.tls,
                "source": self.source or "this tree",
                "election_timeout_ms": self.election_ms,
                "heartbeat_interval_ms": self.heartbeat_ms,
                "snapshot_interval": self.snapshot_interval,
                "snapshot_log_percent": (config_defaults()["snapshot_log_percent"]
                                         if self.source is None else "the tree's default"),
                "durability": "WAL fsync before a write is acknowledged" if self.fsync else
                              "no fsync: a power loss can lose acknowledged writes"}

    def _env(self):
        """Context: PYTHONPATH for the agents started inside it."""
        import contextlib

        @contextlib.contextmanager
        def env():
            want = dict(self.env)
            if self.source is not None:
                want["PYTHONPATH"] = self.source
            old = {k: os.environ.get(k) for k in want}
            os.environ.update(want)
            try:
                yield
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return env()

    async def start(self) -> None:
        with self._env():
            self.lc.start_all()
        self.mon = self.lc.client(timeout=self.timeout)

    async def stop(self) -> None:
        if self.mon is not None:
            await self.mon.close()
        self.lc.stop_all()

    def client(self) -> ClusterClient:
        return self.lc.client(timeout=self.timeout)

    def pid(self, name: str) -> int:
        return self.lc.procs[name].pid

    def alive(self, name: str) -> bool:
        return self.lc.alive(name)

    def kill(self, name: str) -> None:
        self.lc.signal(name, signal.SIGKILL)

    def reap(self, name: str) -> None:
        self.lc.procs[name].wait(timeout=10)

    def restart(self, name: str) -> None:
        with self._env():
            self.lc.start(name)

    async def status(self, name: str) -> dict | None:
        """{leader, term, applied, commit, role}, or None if it does not answer."""
        if not self.alive(name):
            return None
        try:
            s = await asyncio.wait_for(self.mon.call(name, "status"), 2.0)
        except Exception:
            return None
        return {"leader": s["leader"], "term": s["term"], "applied": s["applied"],
                "commit": s["commit"], "is_leader": s["role"] == "leader",
                "leader_changes_1m": s.get("leader_changes_1m")}

    def warnings(self) -> dict:
        return {n: self.lc.stderr(n)[-1000:] for n in self.names if self.lc.stderr(n).strip()}

    async def wait_leader(self, timeout: float = 60.0, exclude=()) -> str:
        return await self.lc.wait_leader(self.mon, timeout=timeout, exclude=exclude)

    async def wait_converged(self, timeout: float = 60.0) -> None:
        await self.lc.wait_converged(self.mon, timeout=timeout)

    async def wait_snapshots_done(self, timeout: float = 30.0) -> float | None:
        """Wait until no agent is writing a snapshot (status ``snapshots.in_flight``, each
        agent seen idle twice in a row); the seconds waited, or None at the deadline. A
        snapshot in flight holds a copy of the state's table and its serialized bytes.
        An agent that does not report it (an older tree) counts as idle."""
        t0 = time.monotonic()
        quiet = 0
        while time.monotonic() - t0 < timeout:
            busy = False
            for n in self.names:
                if not self.alive(n):
                    continue
                try:
                    s = await asyncio.wait_for(self.mon.call(n, "status"), 2.0)
                except Exception:
                    busy = True  # cannot tell: ask again
                    continue
                busy = busy or bool((s.get("snapshots") or {}).get("in_flight"))
            quiet = 0 if busy else quiet + 1
            if quiet >= 2:
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        return None


# -- PySyncObj ------------------------------------------------------------------------------

_LEN = struct.Struct(">I")


class PsoError(Exception):
    def __init__(self, code: str, leader: str | None = None):
        super().__init__(code)
        self.code = code
        self.leader = leader


class _PsoConn:
    """One TCP connection to one node's benchmark port; many requests in flight."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.waiting: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.task = asyncio.create_task(self._recv())
        self.closed = False

    async def _recv(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(4)
                msg = msgpack.unpackb(await self.reader.readexactly(_LEN.unpack(head)[0]),
                                      raw=False)
                fut = self.waiting.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection lost"))
            self.waiting.clear()

    async def request(self, timeout: float, **req) -> dict:
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        body = msgpack.packb({"id": rid, **req}, use_bin_type=True)
        self.writer.write(_LEN.pack(len(body)) + body)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.waiting.pop(rid, None)

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


class PsoClient:
    """The same retry policy as ClusterClient's leader calls: follow a ``not_leader``
    hint at once, otherwise try the next node with backoff (20 ms doubling, 250 ms cap)
    until ``op_timeout``; a put that may have been applied ends as OutcomeUnknown."""

    def __init__(self, addresses: dict[str, tuple[str, int]], timeout: float = 3.0,
                 op_timeout: float = 15.0):
        self.addresses = addresses
        self.timeout, self.op_timeout = timeout, op_timeout
        self.leader: str | None = None
        self._conns: dict[str, _PsoConn] = {}

    async def _conn(self, name: str) -> _PsoConn:
        c = self._conns.get(name)
        if c is None or c.closed:
            host, port = self.addresses[name]
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
            c = self._conns[name] = _PsoConn(r, w)
        return c

    async def call(self, name: str, **req) -> dict:
        c = await self._conn(name)
        return await c.request(self.timeout, **req)

    async def put(self, key: str, value: bytes) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        names = sorted(self.addresses)
        delay, tried, unknown = 0.02, 0, False
        while True:
            target = self.leader if self.leader is not None else names[tried % len(names)]
            tried += 1
            try:
                rep = await self.call(target, op="put", key=key, value=value)
            except (ConnectionError, OSError, asyncio.TimeoutError) as e:
                if not isinstance(e, (ConnectionRefusedError,)):
                    unknown = True
                self.leader = None
            else:
                if rep["ok"]:
                    self.leader = target
                    return
                hint = rep.get("leader")
                if rep["code"] == "not_leader":
                    self.leader = hint if hint in self.addresses and hint != target else None
                    if self.leader is not None and loop.time() < deadline:
                        continue
                else:
                    unknown = True  # committed-or-not is unknown (leader changed, ...)
                    self.leader = None
            if loop.time() + delay >= deadline:
                if unknown:
                    raise OutcomeUnknown(f"put {key}: outcome unknown")
                raise PsoError("unavailable")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def close(self) -> None:
        for c in self._conns.values():
            await c.close()
        self._conns.clear()


class PySyncObjCluster:
    """Three bench/pysyncobj_node.py processes, each with its journal file on."""

    kind = "pysyncobj"

    def __init__(self, tmp: Path, n: int = 3, *, batch: bool = True, timeout: float = 3.0):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.names = [f"p{i + 1}" for i in range(n)]
        ports = free_ports(2 * n)
        self.nodes = {nm: ("127.0.0.1", ports[i], ports[n + i]) for i, nm in enumerate(self.names)}
        self.batch = batch
        self.timeout = timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.mon: PsoClient | None = None

    def describe(self) -> dict:
        return {"system": "pysyncobj", "nodes": len(self.names),
                "appendEntriesUseBatch": self.batch, "journal_file": True,
                "raft_timeouts_s": "raftMinTimeout 0.4, raftMaxTimeout 1.4 (defaults)",
                "durability": "journal is an mmap never msynced or fsynced before an "
                              "acknowledgement: survives a process kill, not a power loss"}

    def _addresses(self) -> dict[str, tuple[str, int]]:
        return {nm: (h, c) for nm, (h, _, c) in self.nodes.items()}

    def restart(self, name: str) -> None:
        spec = ",".join(f"{nm}={h}:{r}:{c}" for nm, (h, r, c) in self.nodes.items())
        cmd = [sys.executable, str(Path(__file__).with_name("pysyncobj_node.py")),
               "--name", name, "--nodes", spec, "--journal", str(self.tmp / f"{name}.journal")]
        if not self.batch:
            cmd.append("--no-batch")
        err = open(self.tmp / f"{name}.stderr", "ab")
        self.procs[name] = subprocess.Popen(cmd, cwd=self.tmp, stdout=subprocess.DEVNULL,
                                            stderr=err)
        err.close()

    async def start(self) -> None:
        for nm in self.names:
            self.restart(nm)
        self.mon = PsoClient(self._addresses(), timeout=self.timeout)

    async def stop(self) -> None:
        if self.mon is not None:
            await self.mon.close()
        stop_processes(self.procs.values())

    def client(self) -> PsoClient:
        return PsoClient(self._addresses(), timeout=self.timeout)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def kill(self, name: str) -> None:
        if self.alive(name):
            os.kill(self.procs[name].pid, signal.SIGKILL)

    def reap(self, name: str) -> None:
        self.procs[name].wait(timeout=10)

    async def status(self, name: str) -> dict | None:
        if not self.alive(name):
            return None
        try:
            s = await self.mon.call(name, op="status")
        except Exception:
            self.mon._conns.pop(name, None)
            return None
        return {"leader": s["leader"], "term": s["term"], "applied": s["applied"],
                "commit": s["commit"], "is_leader": s["is_leader"]}

    async def wait_leader(self, timeout: float = 60.0, exclude=()) -> str:
        deadline = time.monotonic() + timeout
        names = [n for n in self.names if n not in exclude and self.alive(n)]
        while time.monotonic() < deadline:
            st = {n: await self.status(n) for n in names}
            leaders = {s["leader"] for s in st.values() if s is not None}
            if None not in st.values() and len(leaders) == 1 and None not in leaders:
                ld = leaders.pop()
                if st.get(ld, {}) and st[ld]["is_leader"]:
                    return ld
            await asyncio.sleep(0.05)
        raise AssertionError(f"pysyncobj: no single leader within {timeout}s")

    def warnings(self) -> dict:
        """PySyncObj's own complaints on stderr, counted by kind (e.g. it truncating log
        entries it had already applied: its replicas' state may have diverged)."""
        out: dict = {}
        for n in self.names:
            path = self.tmp / f"{n}.stderr"
            text = path.read_text(errors="replace") if path.exists() else ""
            for line in text.splitlines():
                if "truncating already-applied" in line:
                    key = "truncating already-applied log entries (state may have diverged)"
                elif line.strip() and not line.startswith((" ", "Traceback")):
                    key = line.strip()[:120]
                else:
                    continue
                out.setdefault(n, {}).setdefault(key, 0)
                out[n][key] += 1
        return out

    async def wait_snapshots_done(self, timeout: float = 30.0) -> float | None:
        """PySyncObj reports no snapshot in progress: nothing to wait for."""
        return 0.0

    async def wait_converged(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = [await self.status(n) for n in self.names if self.alive(n)]
            if None not in st and len({s["applied"] for s in st}) == 1:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("pysyncobj: replicas did not converge")
