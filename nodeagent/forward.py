"""Relaying a client's write from a follower to the leader (``forward: true``).

One client connection per leader, shared by concurrent forwarded requests and matched by
request id; it is dropped on any error and reopened on the next use. The relayed request
keeps the client's (client_id, seq), so a retry after an unknown outcome is still applied
at most once.
"""

from __future__ import annotations

import itertools
import logging

import trio

from .driver import RequestFailed
from .protocol import CLOSED, NEED_DATA, PROTOCOL_VERSION, FrameDecoder, ProtocolError, encode

log = logging.getLogger("nodeagent.forward")


class _Link:
    def __init__(self, leader: str, stream: trio.abc.Stream):
        self.leader = leader
        self.stream = stream
        self.decoder = FrameDecoder()
        self.waiters: dict[int, list] = {}  # id -> [trio.Event, reply]
        self.send_lock = trio.Lock()
        self.broken = False

    async def read_loop(self) -> None:
        try:
            while True:
                msg = self.decoder.next_message()
                if msg is NEED_DATA:
                    self.decoder.receive_data(await self.stream.receive_some(65536))
                    continue
                if msg is CLOSED or msg["type"] == "error":
                    break
                if msg["type"] == "reply":
                    w = self.waiters.pop(msg["id"], None)
                    if w is not None:
                        w[1] = msg
                        w[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, OSError):
            pass
        finally:
            self.broken = True
            for w in self.waiters.values():
                w[0].set()
            self.waiters.clear()
            await trio.aclose_forcefully(self.stream)


class Forwarder:
    def __init__(self, agent, nursery: trio.Nursery, timeout: float = 5.0):
        self.agent = agent
        self.nursery = nursery
        self.timeout = timeout
        self._link: _Link | None = None
        self._lock = trio.Lock()
        self._ids = itertools.count(1)
        self.forwarded = 0

    async def _connect(self, leader: str) -> _Link:
        async with self._lock:
            link = self._link
            if link is not None and link.leader == leader and not link.broken:
                return link
            now_leads = self.agent.driver.node.lead
            if link is not None and not link.broken and now_leads == link.leader != leader:
                # A relay that waited its turn for a leader deposed meanwhile: do not tear
                # down the healthy link to the one that leads now (and its relays).
                raise RequestFailed("not_leader", f"{leader} no longer leads", now_leads)
            if link is not None:
                await trio.aclose_forcefully(link.stream)
            host, port = self.agent.addresses[leader]
            # Bounded by forward()'s fail_after, which covers the turn at the lock too.
            stream = await trio.open_tcp_stream(host, port)
            try:
                stream = await self.agent.wrap_client_stream(stream, host)
                await stream.send_all(encode({
                    "type": "hello", "role": "client", "cluster": self.agent.cluster_name,
                    "version": PROTOCOL_VERSION, "client_id": f"forward-{self.agent.node_id}"}))
                link = _Link(leader, stream)
                while True:
                    msg = link.decoder.next_message()
                    if msg is NEED_DATA:
                        link.decoder.receive_data(await stream.receive_some(65536))
                        continue
                    break
                if msg is CLOSED or msg["type"] != "hello_ok":
                    raise RequestFailed("not_leader", f"the leader {leader} refused the relay",
                                        leader)
            except BaseException:  # a failed handshake or a refused hello: close the socket
                await trio.aclose_forcefully(stream)
                raise
            self._link = link
            self.nursery.start_soon(link.read_loop)
            return link

    async def forward(self, leader: str, msg: dict) -> dict:
        """Relay ``msg`` to ``leader``; return its reply. Raises RequestFailed: not_leader
        if the leader cannot be reached (nothing was sent), timeout if the outcome is
        unknown."""
        try:
            # The whole of it, the turn at the lock too: relays queued behind a connect to
            # an unreachable leader give up with it instead of each trying in turn.
            with trio.fail_after(self.timeout):
                link = await self._connect(leader)
        except (OSError, trio.TooSlowError, KeyError, trio.BrokenResourceError):
            raise RequestFailed("not_leader", f"cannot reach the leader {leader}", leader) from None
        rid = next(self._ids)
        relayed = {k: v for k, v in msg.items() if k != "forward"}
        relayed["id"] = rid
        frame = encode(relayed)
        waiter = [trio.Event(), None]
        link.waiters[rid] = waiter
        self.forwarded += 1
        sending = False
        try:
            async with link.send_lock:
                sending = True
                with trio.fail_after(self.timeout):
                    await link.stream.send_all(frame)
                sending = False
        except BaseException as e:
            link.waiters.pop(rid, None)
            if sending:
                # A frame may be half on the wire (a timeout, or a cancel): nothing after it
                # would be read right. Drop the link (its reader ends and fails the other
                # waiters); the next relay opens a new one.
                link.broken = True
                await trio.aclose_forcefully(link.stream)
            if not isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError,
                                  trio.TooSlowError, OSError)):
                raise
            raise RequestFailed("timeout", f"the link to the leader {leader} broke while "
                                           "relaying; the outcome is unknown") from None
        with trio.move_on_after(self.timeout):
            await waiter[0].wait()
        link.waiters.pop(rid, None)
        if waiter[1] is None:
            raise RequestFailed("timeout", f"no answer from the leader {leader}; the outcome "
                                           "is unknown, retry with the same seq")
        return waiter[1]
