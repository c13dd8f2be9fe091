"""The consensus core's ceiling: a 3-node cluster in memory, no I/O at all.

Drives three RaftNode instances with an in-memory storage and a message queue, through
the real process_ready(), and measures how many proposals per second commit (on all
three nodes) and the core CPU time per proposal. Every later layer (storage, transport,
client protocol) is measured against this figure.

    python -m bench.core [--proposals 20000] [--window 1,64] [--size 100]

Prints one JSON object. "window" is the number of proposals outstanding at once: 1 is a
strictly sequential client, 64 lets batching and pipelining work.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import deque

from nodeagent.raft.core import Config, RaftNode
from nodeagent.raft.messages import ConfState, Role
from nodeagent.raft.ready import process_ready


class MemStorage:
    def __init__(self) -> None:
        self.entries: list = []
        self.hard_state = None

    def save(self, hard_state, entries, snapshot) -> None:
        if entries:
            first = entries[0].index
            del self.entries[first - 1 :]
            self.entries.extend(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def sync(self) -> None:
        pass


class Queue:
    def __init__(self, q: deque):
        self.q = q

    def send(self, messages) -> None:
        self.q.extend(messages)


class Applier:
    def __init__(self) -> None:
        self.applied = 0

    def restore(self, snapshot) -> None:
        self.applied = snapshot.meta.index

    def apply(self, entry) -> None:
        self.applied = entry.index


def build(n: int = 3):
    ids = [f"n{i + 1}" for i in range(n)]
    conf = ConfState.of(ids, priorities={ids[0]: 2})
    q: deque = deque()
    nodes = {
        i: RaftNode(Config(i, max_inflight=256, max_entries_per_msg=512), rng=random.Random(k),
                    bootstrap=conf)
        for k, i in enumerate(ids)
    }
    env = {i: (MemStorage(), Queue(q), Applier()) for i in ids}
    return nodes, env, q


def pump(nodes, env, q) -> None:
    while True:
        for i, node in nodes.items():
            s, o, a = env[i]
            process_ready(node, s, o, a)
        if not q:
            return
        while q:
            m = q.popleft()
            nodes[m.to].step(m)


def elect(nodes, env, q):
    for _ in range(200):
        for node in nodes.values():
            node.tick()
        pump(nodes, env, q)
        leaders = [n for n in nodes.values() if n.role is Role.LEADER]
        if leaders and leaders[0].log.committed == leaders[0].log.last_index():
            return leaders[0]
    raise RuntimeError("no leader")


def run(proposals: int, window: int, size: int) -> dict:
    nodes, env, q = build()
    leader = elect(nodes, env, q)
    payload = b"x" * size
    appliers = [env[i][2] for i in nodes]
    start_index = leader.log.last_index()
    target = start_index + proposals
    proposed = 0
    ticks = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while min(a.applied for a in appliers) < target:
        outstanding = leader.log.last_index() - min(a.applied for a in appliers)
        room = min(window - outstanding, proposals - proposed)
        if room > 0:
            leader.propose_many([payload] * room)
            proposed += room
        pump(nodes, env, q)
        # Followers learn the final commit index from the next heartbeat.
        if proposed == proposals:
            for node in nodes.values():
                node.tick()
            ticks += 1
            pump(nodes, env, q)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "window": window,
        "proposals": proposals,
        "payload_bytes": size,
        "committed_per_s": round(proposals / wall),
        "cpu_us_per_proposal": round(cpu / proposals * 1e6, 2),
        "wall_s": round(wall, 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proposals", type=int, default=20000)
    ap.add_argument("--window", default="1,64", help="comma-separated windows")
    ap.add_argument("--size", type=int, default=100, help="payload bytes")
    a = ap.parse_args(argv)
    results = [run(a.proposals, int(w), a.size) for w in a.window.split(",")]
    print(json.dumps({
        "bench": "core",
        "nodes": 3,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
