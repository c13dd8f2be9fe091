"""The local process manager: `nodeagent run` subprocesses on this machine.

``LocalCluster`` writes an inventory for N agents on 127.0.0.1 with free ports, starts,
kills (SIGKILL), pauses (SIGSTOP/SIGCONT) and stops them by PID, and waits on cluster
conditions (one leader, converged replicas) with deadlines, never fixed sleeps. The
process-level tests and the benchmarks use it; `raftdeck up` will build on it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from console.client import ClusterClient

def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def stop_processes(procs, grace_s: float = 10.0) -> None:
    """SIGTERM every process still running, wait up to ``grace_s`` for them all, SIGKILL
    (and reap) whichever is left."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


class LocalCluster:
    def __init__(self, tmp: Path, n: int = 3, *, priorities: dict[str, int] | None = None,
                 election_ms: int = 1000, heartbeat_ms: int = 100,
                 snapshot_interval: int = 10000, fsync: bool = True, name: str = "test",
                 metrics: bool = False, capacities: dict[str, int] | None = None,
                 task_lease_ms: int = 5000, allow_shell: bool = False,
                 dispatch_policy: str = "least_loaded", roles: dict[str, str] | None = None,
                 tls: bool = True, cluster_extra: dict[str, object] | None = None):
        """``tls`` (default on): a CA and certificates made with ``raftdeck init``'s code in
        ``<tmp>/tls``, and ``cluster.tls: {dir: tls}``; ``client()`` presents the admin
        certificate (``client(role=...)`` another). ``cluster_extra``: more ``cluster:``
        settings, written as given (e.g. ``{"max_connections": 50}``)."""
        # Absolute: the agents run with this folder as their working directory, so a
        # relative path (``raftdeck chaos --out runs/x``) would name another place for them.
        self.tmp = Path(tmp).resolve()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.tls_dir = self.tmp / "tls"
        self.names = [f"n{i + 1}" for i in range(n)]
        ports = free_ports(2 * n if metrics else n)
        self.ports = dict(zip(self.names, ports[:n]))
        self.metrics_ports = dict(zip(self.names, ports[n:])) if metrics else {}
        self.priorities = priorities or {}
        self.cluster = name
        self.procs: dict[str, subprocess.Popen] = {}
        self._stderr_at: dict[str, int] = {}  # where each agent's last start began writing
        self.inventory = self.tmp / "inventory.yaml"
        lines = [
            "cluster:",
            f"  name: {name}",
            f"  election_timeout_ms: {election_ms}",
            f"  heartbeat_interval_ms: {heartbeat_ms}",
            f"  snapshot_interval: {snapshot_interval}",
            f"  fsync: {'true' if fsync else 'false'}",
            f"  task_lease_ms: {task_lease_ms}",
            f"  dispatch_policy: {dispatch_policy}",
            "  tls: {dir: tls}" if tls else "  tls: off",
            *(f"  {k}: {v}" for k, v in (cluster_extra or {}).items()),
            "nodes:",
        ]
        if tls:
            from nodeagent.security import init_tls

            init_tls(self.tls_dir, name, [(nm, "127.0.0.1") for nm in self.names])
        for nm in self.names:
            extra = f", metrics_port: {self.metrics_ports[nm]}" if metrics else ""
            extra += f", capacity: {(capacities or {}).get(nm, 1)}"
            extra += f", role: {(roles or {}).get(nm, 'voter')}"
            if allow_shell:
                extra += ", allow_shell: true"
            lines.append(
                f"  - {{name: {nm}, host: 127.0.0.1, port: {self.ports[nm]}, "
                f"priority: {self.priorities.get(nm, 1)}, data_dir: data/{nm}{extra}}}"
            )
        self.inventory.write_text("\n".join(lines) + "\n")

    # -- processes --

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, name: str, *, join: bool = False) -> None:
        """Start ``name``'s agent; ``join``: with ``--join`` (added to a running cluster)."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} runs"
        from console.procs import sighup_held

        err = open(self.tmp / f"{name}.stderr", "ab")
        self._stderr_at[name] = err.tell()
        with sighup_held():
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "nodeagent.cli", "run", "--inventory", str(self.inventory),
                 "--name", name, "--log-file", str(self.log_path(name)),
                 *(["--join"] if join else [])],
                cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=err,
            )
        err.close()

    def start_all(self) -> None:
        for n in self.names:
            self.start(n)

    def signal(self, name: str, sig: int) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, sig)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def pause(self, name: str) -> None:
        self.signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.signal(name, signal.SIGCONT)

    def rss_kib(self, name: str) -> int:
        """Resident memory of the agent process, from /proc."""
        with open(f"/proc/{self.procs[name].pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with _suppress():
                    os.kill(p.pid, signal.SIGCONT)  # a paused agent cannot handle SIGTERM
        stop_processes(self.procs.values())

    def stderr(self, name: str) -> str:
        path = self.tmp / f"{name}.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def last_words(self, name: str) -> str:
        """The last line an agent that is not running wrote to stderr since its last
        start ("" while it runs, or when it was killed and said nothing)."""
        if self.alive(name):
            return ""
        lines = self.stderr(name)[self._stderr_at.get(name, 0):].strip().splitlines()
        return lines[-1].strip()[:500] if lines else ""

    # -- clients --

    def ssl_context(self, role: str = "admin"):
        """The console-side SSL context of an operator role (None when TLS is off)."""
        if not self.tls:
            return None
        from console.client import followed_context
        from nodeagent.security import tls_paths_for_role

        return followed_context(*tls_paths_for_role(self.tls_dir, role))

    def client(self, role: str = "admin", **kw) -> ClusterClient:
        kw.setdefault("timeout", 3.0)
        kw.setdefault("ssl", self.ssl_context(role))
        return ClusterClient({n: ("127.0.0.1", p) for n, p in self.ports.items()},
                             self.cluster, **kw)

    async def statuses(self, c: ClusterClient, names=None) -> dict[str, dict]:
        out = {}
        for n in names or self.names:
            if not self.alive(n):
                continue
            try:
                out[n] = await asyncio.wait_for(c.call(n, "status"), 3.0)
            except Exception:
                pass
        return out

    async def wait_leader(self, c: ClusterClient, timeout: float = 30.0, among=None,
                          exclude=()) -> str:
        """The node that every live member (of ``among``) agrees leads, with a term."""
        deadline = time.monotonic() + timeout
        names = [n for n in (among or self.names) if n not in exclude]
        while time.monotonic() < deadline:
            st = await self.statuses(c, names)
            leaders = {n for n, s in st.items() if s["role"] == "leader"}
            if len(leaders) == 1:
                ld = leaders.pop()
                term = st[ld]["term"]
                if all(s["leader"] == ld and s["term"] == term for s in st.values()) and \
                        len(st) == len([n for n in names if self.alive(n)]):
                    return ld
            if names and not any(self.alive(n) for n in names):
                break  # nothing left to wait for
            await asyncio.sleep(0.05)
        seen = {n: (s['role'], s['term'], s['leader'])
                for n, s in (await self.statuses(c, names)).items()}
        raise AssertionError(f"no single leader among {names} within {timeout}s: {seen}"
                             f"{self.exited_report(names)}")

    def exited_report(self, names) -> str:
        """For an error message: each named agent that has exited, its exit code and the
        end of its stderr (why a cluster never came up)."""
        lines = []
        for n in names:
            p = self.procs.get(n)
            if p is not None and p.poll() is not None:
                tail = self.stderr(n).strip().splitlines()[-3:]
                lines.append(f"{n} exited with code {p.returncode}: " + (" | ".join(tail) or "no stderr"))
        return ("; " + "; ".join(lines)) if lines else ""

    async def wait_converged(self, c: ClusterClient, timeout: float = 30.0, names=None) -> dict:
        """Wait until every named live node has applied the same index with the same digest."""
        deadline = time.monotonic() + timeout
        st = {}
        while time.monotonic() < deadline:
            st = await self.statuses(c, names)
            applied = {s["applied"] for s in st.values()}
            digests = {s["digest"] for s in st.values()}
            want = len([n for n in (names or self.names) if self.alive(n)])
            if len(st) == want and len(applied) == 1 and len(digests) == 1:
                return st
            await asyncio.sleep(0.05)
        raise AssertionError("replicas did not converge: " + str(
            {n: (s["applied"], s["digest"][:12]) for n, s in st.items()}))


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
