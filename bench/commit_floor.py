"""The floor under a replicated, durable write on this machine: what the disk and the
wake-ups cost before any Raft, protocol or event loop does its part.

    python -m bench.commit_floor [--writes 400] [--rounds 3] [--dir DIR]

Three processes, as a 3-node cluster on one host: a "leader" and two "followers", joined
by TCP over 127.0.0.1. Each write: the leader appends 200 bytes to its own file and sends
200 bytes to both followers; each follower appends them to its file and answers with one
byte; the write commits when the leader has the first answer (a majority: the leader and
one follower). Whoever the mode says fsyncs after its append, the leader after sending
(as raftdeck's leader does: its appends leave before its own fsync). Modes:

- ``none``: no fsync anywhere (the floor of PySyncObj, whose journal never fsyncs);
- ``leader``: only the leader fsyncs; ``followers``: only the followers do;
- ``all``: all three do (raftdeck with fsync on).

Every process does nothing else, in a few lines of Python per write: the figures are what
any system on this machine pays at the least for that durability, Raft's and Python's
work not counted. Modes alternate in blocks of ``--writes`` within each of ``--rounds``
rounds, so a noisy minute hits them all. The files go under ``--dir`` (the system's
temporary directory by default: where ``python -m bench`` puts its agents' data). Prints
one JSON object: per mode the commit latency (from the leader's own append of the write
to its first answer) p50 / p90 / p99 and each role's fsync p50, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import tempfile
import time
from pathlib import Path

from bench.kv import percentile

MODES = ("none", "leader", "followers", "all")
RECORD = 200
_QUIT = b"q"


def _p(samples_s: list[float], p: float) -> int | None:
    """Nearest-rank percentile in whole microseconds (None when there are none)."""
    v = percentile(sorted(x * 1e6 for x in samples_s), p)
    return None if v is None else round(v)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


def _follower(listener: socket.socket, path: Path, report_fd: int) -> None:
    """A child's whole life: take writes until told to quit, then report its fsync times."""
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
    syncs: list[float] = []
    try:
        while True:
            head = _recv_exact(conn, 1)
            if head == _QUIT:
                break
            data = _recv_exact(conn, RECORD)
            os.write(fd, data)
            if head == b"s":
                t = time.perf_counter()
                os.fsync(fd)
                syncs.append(time.perf_counter() - t)
            conn.sendall(b"a")
    finally:
        os.close(fd)
        os.write(report_fd, json.dumps(syncs).encode() + b"\n")
        os.close(report_fd)


def _reap(pid: int, grace: float = 10.0) -> None:
    """Wait for a follower we forked to exit (it does once told to quit or its socket
    closes); kill it if it has not within ``grace`` seconds."""
    deadline = time.monotonic() + grace
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.01)
    except ChildProcessError:
        pass


def measure(writes: int, rounds: int, directory: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="commit-floor-", dir=directory))
    children: list[int] = []
    conns: list[socket.socket] = []
    reports: list[int] = []
    try:
        for i in range(2):
            lst = socket.socket()
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the follower process: never returns into the caller's code
                code = 0
                try:
                    os.close(r)
                    _follower(lst, work / f"follower{i}.log", w)
                except BaseException:
                    code = 1
                os._exit(code)
            children.append(pid)
            os.close(w)
            reports.append(r)
            c = socket.create_connection(lst.getsockname(), timeout=30)
            lst.close()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.settimeout(30)
            conns.append(c)
        fd = os.open(work / "leader.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        commit: dict[str, list[float]] = {m: [] for m in MODES}
        leader_sync: dict[str, list[float]] = {m: [] for m in MODES}
        follower_modes: list[str] = []  # the mode of each synced follower write, in order
        payload = b"x" * RECORD
        try:
            for _ in range(rounds):
                for mode in MODES:
                    head = b"s" if mode in ("followers", "all") else b"n"
                    for _ in range(writes):
                        t0 = time.perf_counter()
                        os.write(fd, payload)
                        for c in conns:
                            c.sendall(head + payload)
                        if mode in ("leader", "all"):
                            t = time.perf_counter()
                            os.fsync(fd)
                            leader_sync[mode].append(time.perf_counter() - t)
                        ready, _, _ = select.select(conns, [], [], 30)
                        if not ready:
                            raise TimeoutError("no follower answered within 30 s")
                        commit[mode].append(time.perf_counter() - t0)
                        for c in conns:  # the slower answer too, before the next write
                            _recv_exact(c, 1)
                        if head == b"s":
                            follower_modes.append(mode)
        finally:
            os.close(fd)
            for c in conns:
                try:
                    c.sendall(_QUIT)
                except OSError:
                    pass
        follower_sync: dict[str, list[float]] = {m: [] for m in MODES}
        while reports:  # popped first: the finally below closes only what is left
            with os.fdopen(reports.pop(), "rb") as f:
                line = f.readline()
            for mode, dt in zip(follower_modes, json.loads(line or b"[]")):
                follower_sync[mode].append(dt)
        out = {m: {"commit_p50_us": _p(commit[m], 50), "commit_p90_us": _p(commit[m], 90),
                   "commit_p99_us": _p(commit[m], 99),
                   "leader_fsync_p50_us": _p(leader_sync[m], 50),
                   "follower_fsync_p50_us": _p(follower_sync[m], 50)} for m in MODES}
        return {"writes_per_mode": writes * rounds, "rounds": rounds, "record_bytes": RECORD,
                "dir": str(directory), "modes": out}
    finally:
        for c in conns:
            c.close()
        for r in reports:
            os.close(r)
        for pid in children:
            _reap(pid)
        for p in work.glob("*.log"):
            p.unlink()
        work.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.commit_floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=400, help="writes per mode per round (400)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the four modes (3)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the three files go (the temporary directory)")
    a = ap.parse_args(argv)
    if a.writes < 1 or a.rounds < 1:
        ap.error("--writes and --rounds must be at least 1")
    if not a.dir.is_dir():
        ap.error(f"--dir {a.dir}: not a directory")
    print(json.dumps(measure(a.writes, a.rounds, a.dir), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
