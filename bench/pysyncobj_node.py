"""One PySyncObj node for the side-by-side benchmark (``python -m bench``).

A process that replicates a dict (``pysyncobj.batteries.ReplDict``) with two other such
processes and serves the benchmark's client protocol on its own TCP port:

    frame   = [u32 big-endian length][msgpack map]
    request = {"id": int, "op": "put", "key": str, "value": bytes}
            | {"id": int, "op": "status"}
    reply   = {"id": int, "ok": true, ...}
            | {"id": int, "ok": false, "code": str, "leader": name | None}

A put is acknowledged once PySyncObj reports it applied (committed on a majority). A
follower does not forward puts: it answers ``not_leader`` with the leader's name, so the
client talks to the leader, as it does with raftdeck. Durability, honestly: PySyncObj's
journal file is an mmap that it never msyncs or fsyncs before acknowledging, and its
vote/term file is written without fsync, so an acknowledged write survives a process
kill but not a power loss.

    python bench/pysyncobj_node.py --name n1 --nodes n1=127.0.0.1:R1:C1,n2=...
        --journal DIR/n1.journal [--no-batch]

``R`` is the Raft port, ``C`` the client port. Runs until SIGTERM or SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
import sys

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.batteries import ReplDict

_LEN = struct.Struct(">I")


def parse_nodes(spec: str) -> dict[str, tuple[str, int, int]]:
    out = {}
    for item in spec.split(","):
        name, addr = item.split("=", 1)
        host, raft, client = addr.rsplit(":", 2)
        out[name] = (host, int(raft), int(client))
    return out


class Node:
    def __init__(self, name: str, nodes: dict[str, tuple[str, int, int]], journal: str,
                 batch: bool):
        self.name = name
        self.nodes = nodes
        self.by_raft = {f"{h}:{r}": n for n, (h, r, _) in nodes.items()}
        me = nodes[name]
        others = [f"{h}:{r}" for n, (h, r, _) in nodes.items() if n != name]
        conf = SyncObjConf(journalFile=journal, appendEntriesUseBatch=batch)
        self.dict = ReplDict()
        self.sync = SyncObj(f"{me[0]}:{me[1]}", others, conf=conf, consumers=[self.dict])

    def leader_name(self) -> str | None:
        ld = self.sync._getLeader()
        return None if ld is None else self.by_raft.get(str(getattr(ld, "id", ld)))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()

        def reply(msg: dict) -> None:
            if writer.is_closing():
                return
            body = msgpack.packb(msg, use_bin_type=True)
            writer.write(_LEN.pack(len(body)) + body)

        try:
            while True:
                head = await reader.readexactly(4)
                req = msgpack.unpackb(await reader.readexactly(_LEN.unpack(head)[0]), raw=False)
                rid, op = req.get("id"), req.get("op")
                if op == "status":
                    st = self.sync.getStatus()
                    reply({"id": rid, "ok": True, "leader": self.leader_name(),
                           "is_leader": self.sync._isLeader(), "term": st["raft_term"],
                           "commit": st["commit_idx"], "applied": st["last_applied"],
                           "log_len": st["log_len"], "pid": os.getpid()})
                elif op == "put":
                    if not self.sync._isLeader():
                        reply({"id": rid, "ok": False, "code": "not_leader",
                               "leader": self.leader_name()})
                        continue

                    def done(result, error, rid=rid):
                        if error == FAIL_REASON.SUCCESS:
                            msg = {"id": rid, "ok": True}
                        else:
                            msg = {"id": rid, "ok": False, "code": f"fail_{int(error)}",
                                   "leader": self.leader_name()}
                        loop.call_soon_threadsafe(reply, msg)

                    self.dict.set(req["key"], req["value"], callback=done)
                else:
                    reply({"id": rid, "ok": False, "code": "bad_request", "leader": None})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def run(self) -> None:
        host, _, client_port = self.nodes[self.name]
        server = await asyncio.start_server(self.serve, host, client_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()
        self.sync.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--nodes", required=True, help="name=host:raft_port:client_port,...")
    ap.add_argument("--journal", required=True, help="PySyncObj journal file")
    ap.add_argument("--no-batch", action="store_true", help="appendEntriesUseBatch=False")
    a = ap.parse_args()
    nodes = parse_nodes(a.nodes)
    if a.name not in nodes:
        sys.exit(f"--name {a.name} is not in --nodes")
    asyncio.run(Node(a.name, nodes, a.journal, not a.no_batch).run())


if __name__ == "__main__":
    main()
