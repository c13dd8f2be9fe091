"""The agent's listener: one TCP port for peers and clients.

Each connection lives exactly as long as its handler. The first frame must be ``hello``
and arrive within ``hello_timeout``; a peer connection then carries Raft frames into the
driver, a client connection carries requests, each answered by one ``reply``. Any
protocol violation gets an ``error`` frame and a closed connection; the agent, and every
other connection, carry on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from .driver import RequestFailed
from .protocol import CLOSED, NEED_DATA, PROTOCOL_VERSION, FrameDecoder, ProtocolError, encode

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("nodeagent.server")

READ_CHUNK = 65536


class Connection:
    """Frame I/O over one stream: a decoder for input, a lock for output."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int, peer: str):
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)
        self.peer = peer
        self._send_lock = trio.Lock()
        self.closed = False

    async def receive(self) -> dict | None:
        """The next message, or None at a clean end of stream."""
        while True:
            msg = self.decoder.next_message()
            if msg is NEED_DATA:
                data = await self.stream.receive_some(READ_CHUNK)
                self.decoder.receive_data(data)
                continue
            if msg is CLOSED:
                return None
            return msg

    async def send(self, msg: dict[str, Any], timeout: float = 10.0) -> None:
        data = encode(msg)
        async with self._send_lock:
            with trio.fail_after(timeout):
                await self.stream.send_all(data)


class Server:
    def __init__(self, agent: "Agent", *, hello_timeout: float = 5.0,
                 request_timeout: float = 10.0, max_inflight: int = 256):
        self.agent = agent
        self.hello_timeout = hello_timeout
        self.request_timeout = request_timeout
        self.max_inflight = max_inflight
        self.connections = 0
        self.connections_total = 0
        self.protocol_errors = 0
        self.port: int | None = None

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            addr = stream.socket.getpeername()
            peer = f"{addr[0]}:{addr[1]}"
        except OSError:
            peer = "?"
        self.connections += 1
        self.connections_total += 1
        conn = Connection(stream, self.agent.max_frame, peer)
        # except*: an error raised inside the client loop's nursery arrives wrapped in an
        # ExceptionGroup (trio >= 0.25); unhandled, it would end serve_listeners and the agent.
        try:
            await self._converse(conn)
        except* ProtocolError as group:
            e = _first_leaf(group)
            self.protocol_errors += 1
            log.warning("protocol error; closing", extra={"remote": peer, "code": e.code,
                                                          "error": e.message})
            await self._send_error(conn, e.code, e.message)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except* trio.TooSlowError:
            log.info("connection too slow; closing", extra={"remote": peer})
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _send_error(self, conn: Connection, code: str, message: str, id=None) -> None:
        msg: dict[str, Any] = {"type": "error", "code": code, "message": message[:4096]}
        if id is not None:
            msg["id"] = id
        try:
            await conn.send(msg, timeout=2.0)
        except Exception:
            pass

    async def _converse(self, conn: Connection) -> None:
        agent = self.agent
        with trio.fail_after(self.hello_timeout):
            hello = await conn.receive()
        if hello is None:
            return
        if hello["type"] != "hello":
            raise ProtocolError("hello_required", f"the first frame must be hello, not {hello['type']}")
        # Refused handshakes go through _handle like any violation: logged, error, closed.
        if hello["cluster"] != agent.cluster_name:
            raise ProtocolError("wrong_cluster",
                                f"this agent belongs to cluster {agent.cluster_name!r}, "
                                f"not {hello['cluster']!r}")
        if hello["version"] != PROTOCOL_VERSION:
            raise ProtocolError("version_mismatch",
                                f"this agent speaks protocol version {PROTOCOL_VERSION}")
        await conn.send({"type": "hello_ok", "node": agent.node_id, "version": PROTOCOL_VERSION,
                         "leader": agent.driver.node.lead})
        if hello["role"] == "peer":
            await self._peer_loop(conn, hello["node"])
        else:
            await self._client_loop(conn, hello.get("client_id", "?"))

    # -- peers ------------------------------------------------------------------------------

    async def _peer_loop(self, conn: Connection, frm: str) -> None:
        agent = self.agent
        conn.decoder.max_frame = max(agent.max_frame, 64 << 20)  # snapshots travel whole
        # Latency and loss are applied by the sending agent's transport; the receiving
        # side enforces partitions only (so a fault sent to every agent does not compound).
        while True:
            msg = await conn.receive()
            if msg is None:
                return
            if msg["type"] != "raft":
                raise ProtocolError("bad_field", f"a peer connection carries raft frames, not {msg['type']}")
            m = msg["msg"]
            if m.frm != frm or m.to != agent.node_id:
                raise ProtocolError("bad_field",
                                    f"raft message from {m.frm} to {m.to} on the link of "
                                    f"{frm} to {agent.node_id}")
            if agent.transport.accept_incoming(frm):
                agent.driver.deliver(m)

    # -- clients ----------------------------------------------------------------------------

    async def _client_loop(self, conn: Connection, client_id: str) -> None:
        async with trio.open_nursery() as nursery:
            session = ClientSession(conn, nursery, client_id)
            inflight = 0

            async def run_one(msg: dict) -> None:
                nonlocal inflight
                try:
                    reply = await self._answer(session, msg)
                finally:
                    inflight -= 1
                if reply is not None:
                    await conn.send(reply)

            try:
                while True:
                    msg = await conn.receive()
                    if msg is None:
                        return
                    t = msg["type"]
                    if t in ("hello", "raft", "reply", "hello_ok", "status_update", "error"):
                        raise ProtocolError("bad_field", f"a client may not send {t} here")
                    if inflight >= self.max_inflight:
                        await conn.send(_fail(msg["id"], "busy",
                                              f"more than {self.max_inflight} requests in flight"))
                        continue
                    inflight += 1
                    nursery.start_soon(run_one, msg)
            finally:
                nursery.cancel_scope.cancel()

    async def _answer(self, session: "ClientSession", msg: dict) -> dict | None:
        agent = self.agent
        rid = msg["id"]
        t0 = time.monotonic()
        try:
            result, leader = await agent.handle_request(session, msg)
        except RequestFailed as e:
            reply = _fail(rid, e.code, e.message)
            if e.leader is not None or e.code == "not_leader":
                reply["leader"] = e.leader
            agent.observe_request(msg["type"], time.monotonic() - t0, ok=False)
            return reply
        except Exception:
            # Our bug, not the client's: log it, answer, and keep serving everyone else.
            # The request may or may not have taken effect.
            log.exception("request handler failed", extra={"request": msg["type"]})
            agent.observe_request(msg["type"], time.monotonic() - t0, ok=False)
            return _fail(rid, "internal", f"the agent failed while handling {msg['type']}; "
                                          "the outcome is unknown; see the agent's log")
        agent.observe_request(msg["type"], time.monotonic() - t0, ok=True)
        reply = {"type": "reply", "id": rid, "ok": True, "result": result}
        if leader is not None:
            reply["leader"] = leader
        return reply


class ClientSession:
    """One client connection's state: its subscription, if any."""

    def __init__(self, conn: Connection, nursery: trio.Nursery, client_id: str):
        self.conn = conn
        self.nursery = nursery
        self.client_id = client_id
        self._sub_scope: trio.CancelScope | None = None

    def subscribe(self, pusher) -> None:
        """Start ``pusher(cancel_scope)`` as this connection's only subscription."""
        self.unsubscribe()
        scope = trio.CancelScope()
        self._sub_scope = scope

        async def run() -> None:
            with scope:
                await pusher()

        self.nursery.start_soon(run)

    def unsubscribe(self) -> None:
        if self._sub_scope is not None:
            self._sub_scope.cancel()
            self._sub_scope = None


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _fail(rid: int, code: str, message: str) -> dict:
    return {"type": "reply", "id": rid, "ok": False, "error": {"code": code, "message": message[:4096]}}
