"""The agent's listener: one TCP port for peers and clients.

Each connection lives exactly as long as its handler. With TLS configured, the mutual TLS
handshake and then the ``hello`` must both finish within ``hello_timeout``; the client
certificate says who it is (``nodeagent.security``): a peer must be a node certificate
whose name is the hello's ``node``, a client's role comes from its certificate. A peer
connection then carries Raft frames into the driver, a client connection carries
requests, each checked against the role table and answered by one ``reply``; while a
client connection waits for its next request, the server's ``ReadHub`` (one task for all
of them, ``nodeagent/readhub.py``) reads it and proposes its writes. Any
protocol violation gets an ``error`` frame and a closed connection; the agent, and every
other connection, carry on.

Limits, for clients only (a peer's connection is never limited, so Raft keeps working):
at most ``max_connections`` client connections (up to ``OVERFLOW`` more are accepted
only to find peers among them; beyond that a connection is closed at once), a request
rate per connection (a token bucket: over it, the agent stops reading that connection
for a while), an idle timeout (nothing in flight, no subscription) and a deadline for a
frame that has begun. Refusals are logged (``connection refused``, ``request forbidden``),
at most 50 lines a second per kind, with a count of what was left out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any

import trio

from .driver import RequestFailed
from .protocol import (CLOSED, MESSAGE_SCHEMAS, NEED_DATA, PROTOCOL_VERSION, FrameDecoder,
                       ProtocolError, Signal, encode)
from .security import (ANONYMOUS, NODE, ROLES, AuditLog, Identity, TLSError, TokenBucket,
                       check_request, effective_role, identity_from_cert, required_role)
from .readhub import ReadHub
from .tlsstream import TLSStream, read_nowait, receive_waiting_first

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("nodeagent.server")

READ_CHUNK = 65536


class Connection:
    """Frame I/O over one stream: a decoder for input, a lock for output, and an outbox
    for replies made outside any task of this connection (``push``; ``flush_loop``
    writes whatever has gathered in one send)."""

    def __init__(self, stream: trio.abc.Stream, max_frame: int, peer: str):
        self.stream = stream
        self.decoder = FrameDecoder(max_frame)
        self.peer = peer
        self._send_lock = trio.Lock()
        self.closed = False
        self.kind = "pending"  # "peer" or "client" once its hello is accepted
        self.peer_scope: trio.CancelScope | None = None  # a peer link's reading, to end it
        self.last_activity = trio.current_time()
        self.partial_since: float | None = None  # when the frame now being received began
        self._out: list[bytes] = []
        self._out_lot = trio.lowlevel.ParkingLot()
        self._sending = 0  # tasks between taking frames to send and having sent them

    async def receive(self) -> dict | None:
        """The next message, or None at a clean end of stream."""
        while True:
            msg = self.next_buffered()
            if msg is NEED_DATA:
                if type(self.stream) is trio.SocketStream:
                    data = await receive_waiting_first(self.stream, READ_CHUNK)
                else:
                    data = await self.stream.receive_some(READ_CHUNK)
                self.feed(data)
                continue
            return None if msg is CLOSED else msg

    def next_buffered(self) -> dict | Signal:
        """The next message among the bytes already received, ``NEED_DATA`` or ``CLOSED``
        (``FrameDecoder.next_message``), with the connection's clocks kept."""
        msg = self.decoder.next_message()
        if msg is NEED_DATA or msg is CLOSED:
            return msg
        self.last_activity = trio.current_time()
        self.partial_since = self.last_activity if self.decoder.buffered else None
        return msg

    def feed(self, data: bytes) -> None:
        """Bytes read from the stream (``b""``: its end) for ``next_buffered``."""
        self.decoder.receive_data(data)
        if self.partial_since is None and self.decoder.buffered:
            self.partial_since = trio.current_time()

    def fileno(self) -> int | None:
        """The socket's descriptor for ``ReadHub``, or None when the stream is not one it
        can read without waiting (a plain socket, or our TLS over one)."""
        stream = self.stream
        if type(stream) is TLSStream:
            stream = stream.transport_stream
        if type(stream) is not trio.SocketStream:
            return None
        return stream.socket.fileno()

    def input_pending(self) -> bool:
        """Whether received bytes wait where a poll of the socket does not see them
        (inside TLS: ``TLSStream.input_pending``)."""
        stream = self.stream
        return type(stream) is TLSStream and stream.input_pending()

    def read_nowait(self) -> bool:
        """Read what the stream has now into the decoder; False when it has nothing (the
        read would wait). A broken connection raises ``trio.BrokenResourceError``."""
        stream = self.stream
        if type(stream) is TLSStream:
            data = stream.receive_nowait()
        else:
            data = read_nowait(stream, READ_CHUNK)
        if data is None:
            return False
        self.feed(data)
        return True

    async def send(self, msg: dict[str, Any], timeout: float = 10.0) -> None:
        await self._send_bytes(encode(msg), timeout)

    async def _send_bytes(self, data: bytes, timeout: float) -> None:
        # Counted in _sending from before the lock: push() must not write past it.
        self._sending += 1
        try:
            async with self._send_lock:
                with trio.fail_after(timeout):
                    await self.stream.send_all(data)
        finally:
            self._sending -= 1

    def push(self, msg: dict[str, Any]) -> None:
        """Queue a reply for ``flush_loop``; never waits (the driver's callbacks call it).
        A reply that does not encode (a bug, or a result past the frame limit) is
        answered ``internal`` instead, so the request does not go unanswered."""
        if self.closed:
            return
        try:
            frame = encode(msg)
        except ProtocolError as e:
            log.error("reply not sent", extra={"remote": self.peer, "error": e.message})
            frame = encode(_fail(msg.get("id", 0), "internal", "the agent could not encode "
                                 f"its reply ({e.code}); the outcome is unknown"))
        if not self._out and not self._sending:
            kind = type(self.stream)
            if kind is trio.SocketStream:
                frame = self._write_now(frame)
                if not frame:
                    return
            elif kind is TLSStream:
                frame = self._write_now_tls(frame)
                if frame is None:
                    return
        self._out.append(frame)
        self._out_lot.unpark()

    def _write_now(self, frame: bytes) -> bytes:
        """Write a reply on a plain TCP connection from the caller's task, when nothing
        else is being sent or waits to be (so frames never interleave): no hop to
        ``flush_loop`` and its lock and timeout scope. Never blocks; returns what the
        kernel did not take, for ``flush_loop`` (all of it after an error, which that
        send then reports)."""
        try:
            n = os.write(self.stream.socket.fileno(), frame)
        except OSError:  # BlockingIOError (buffer full) included
            return frame
        return frame[n:]

    def _write_now_tls(self, frame: bytes) -> bytes | None:
        """``_write_now`` over TLS: None when the kernel took it all, else what
        ``flush_loop`` must send: ``b""`` when the rest is ciphertext waiting in the
        stream (its ``send_all`` sends that first), the frame itself when TLS has failed
        (that send then reports it)."""
        try:
            if self.stream.write_now(frame):
                return None
        except ssl.SSLError:
            return frame  # nothing was encrypted
        except OSError:
            pass  # encrypted; the socket failed, which the flush reports
        return b""

    async def flush_loop(self, timeout: float = 10.0) -> None:
        """Send what ``push`` queued, every frame gathered meanwhile in one send; a peer
        that does not take it within ``timeout`` ends the connection (TooSlowError)."""
        while True:
            if not self._out:
                await self._out_lot.park()
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            await self._send_bytes(data, timeout)


class Refused(Exception):
    """A connection the agent will not serve: ``code`` goes into the ``error`` frame."""

    def __init__(self, code: str, message: str, level: int = logging.WARNING):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.level = level


class _RateLog:
    """At most ``per_s`` log lines per second per event; the rest are counted and the
    count rides on the next line written (``suppressed``). A flood of refused connections
    must not turn into a flood of log lines."""

    def __init__(self, per_s: int = 50):
        self.per_s = per_s
        self._window: dict[str, tuple[int, int]] = {}  # event -> (second, lines written)
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, event: str, **fields: Any) -> None:
        sec = int(time.monotonic())
        w_sec, n = self._window.get(event, (sec, 0))
        if w_sec != sec:
            n = 0
        if n >= self.per_s:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            self._window[event] = (sec, n)
            return
        self._window[event] = (sec, n + 1)
        dropped = self._suppressed.pop(event, 0)
        if dropped:
            fields["suppressed"] = dropped
        log.log(level, event, extra=fields)


# Requests answered without a task of their own (Server._write_now).
WRITES = frozenset({"put", "delete", "cas"})
NOT_FROM_CLIENTS = frozenset({"hello", "raft", "reply", "hello_ok", "status_update", "error"})

OVERFLOW = 64  # connections accepted past max_connections, to find the peers among them


class Server:
    def __init__(self, agent: "Agent", *, hello_timeout: float = 5.0,
                 request_timeout: float = 10.0, max_inflight: int = 256,
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 1000,
                 idle_timeout: float = 600.0, requests_per_s: float = 1000.0,
                 frame_timeout: float | None = None, audit: AuditLog | None = None):
        self.agent = agent
        self.hello_timeout = hello_timeout
        self.request_timeout = request_timeout
        self.max_inflight = max_inflight
        self._peer_conns: dict[str, Connection] = {}  # peer -> its newest connection
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        # A frame that has begun must be whole within this: 6 x the handshake deadline
        # (30 s by default), enough for a 4 MiB frame at about 1 Mbit/s.
        self.frame_timeout = frame_timeout if frame_timeout is not None else 6 * hello_timeout
        self.requests_per_s = requests_per_s
        self.audit = audit
        self.connections = 0
        self.connections_total = 0
        self.pending = 0  # accepted, handshake or hello not done yet
        self.clients = 0  # client sessions (after hello_ok)
        self.peers = 0
        self.protocol_errors = 0
        self.refused: dict[str, int] = {}
        self.forbidden = 0
        self.port: int | None = None
        self._rlog = _RateLog()
        # reads the client connections waiting for a request; the writes of one wake-up
        # reach the driver together
        self.hub = ReadHub(agent.driver.hold_requests, agent.driver.release_requests)

    def stats(self) -> dict[str, Any]:
        return {"tls": self.ssl_context is not None, "clients": self.clients, "peers": self.peers,
                "pending": self.pending,
                "max_connections": self.max_connections, "refused": dict(self.refused),
                "forbidden": self.forbidden,
                "audit_records": self.audit.written if self.audit is not None else 0}

    def _count_refusal(self, code: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.hub.run)
            await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            addr = stream.socket.getpeername()
            peer = f"{addr[0]}:{addr[1]}"
        except OSError:
            peer = "?"
        if self.pending + self.clients >= self.max_connections + OVERFLOW:
            # Past the limit and the overflow kept to let peers in: close at once, before
            # any TLS work.
            self._count_refusal("connection_limit")
            self._rlog.log(logging.WARNING, "connection refused", remote=peer,
                           code="too_many_connections",
                           reason=f"{self.clients} clients and {self.pending} handshakes open (limit "
                                  f"{self.max_connections})")
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        self.connections_total += 1
        self.pending += 1
        conn = Connection(stream, self.agent.max_frame, peer)
        # except*: an error raised inside the client loop's nursery arrives wrapped in an
        # ExceptionGroup (trio >= 0.25); unhandled, it would end serve_listeners and the agent.
        try:
            await self._converse(conn)
        except* ProtocolError as group:
            e = _first_leaf(group)
            self.protocol_errors += 1
            self._rlog.log(logging.WARNING, "protocol error; closing", remote=peer, code=e.code,
                           error=e.message)
            await self._send_error(conn, e.code, e.message)
        except* Refused as group:
            e = _first_leaf(group)
            self._count_refusal(e.code)
            self._rlog.log(e.level, "connection refused", remote=peer, code=e.code, reason=e.message)
            await self._send_error(conn, e.code, e.message)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except* trio.TooSlowError:
            self._count_refusal("too_slow")
            self._rlog.log(logging.INFO, "connection too slow; closing", remote=peer)
        finally:
            conn.closed = True
            self.connections -= 1
            if conn.kind == "peer":
                self.peers -= 1
            elif conn.kind == "client":
                self.clients -= 1
            else:
                self.pending -= 1
            await trio.aclose_forcefully(conn.stream)

    async def _send_error(self, conn: Connection, code: str, message: str, id=None) -> None:
        msg: dict[str, Any] = {"type": "error", "code": code, "message": message[:4096]}
        if id is not None:
            msg["id"] = id
        try:
            await conn.send(msg, timeout=2.0)
        except Exception:
            pass

    async def _tls(self, conn: Connection) -> Identity:
        """The TLS handshake (the caller's deadline covers it) and the client's identity."""
        tls = TLSStream(conn.stream, self.ssl_context, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as e:
            cause = e.__cause__
            reason = getattr(cause, "reason", None) or str(cause or e) or type(cause).__name__
            self._count_refusal("tls")
            self._rlog.log(logging.WARNING, "connection refused", remote=conn.peer, code="tls",
                           reason=f"TLS handshake failed: {reason}")
            raise trio.ClosedResourceError from None  # nothing to answer: no TLS channel
        conn.stream = tls
        try:
            return identity_from_cert(tls.getpeercert())
        except TLSError as e:
            raise Refused("forbidden", f"certificate refused: {e}") from None

    async def _converse(self, conn: Connection) -> None:
        agent = self.agent
        with trio.fail_after(self.hello_timeout):
            identity = await self._tls(conn) if self.ssl_context is not None else ANONYMOUS
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
        if hello["role"] == "peer":
            if self.ssl_context is not None:
                if identity.kind != NODE:
                    raise Refused("forbidden", f"a peer must present a node certificate of this "
                                               f"cluster; this is {identity.describe()}")
                if identity.name != hello["node"]:
                    raise Refused("forbidden", f"the certificate is node {identity.name!r}'s, but "
                                               f"the hello says {hello['node']!r}")
            refusal = agent.admit_peer(hello["node"], hello.get("data_id"))
            if refusal is not None:
                raise Refused("data_dir_changed", refusal, level=logging.DEBUG)  # the agent logs it
            self.pending -= 1
            self.peers += 1
            conn.kind = "peer"
            if isinstance(conn.stream, TLSStream):
                # Which certificate the peer presents: what an operator rotating them checks.
                der = conn.stream.getpeercert(True) or b""
                log.info("peer connected", extra={"peer": hello["node"], "remote": conn.peer,
                                                  "cert_sha256": hashlib.sha256(der).hexdigest()})
        elif self.clients >= self.max_connections:
            raise Refused("too_many_connections",
                          f"this agent serves at most {self.max_connections} client "
                          "connections; retry later or close idle ones")
        else:
            self.pending -= 1
            self.clients += 1
            conn.kind = "client"
        await conn.send({"type": "hello_ok", "node": agent.node_id, "version": PROTOCOL_VERSION,
                         "leader": agent.driver.node.lead})
        if hello["role"] == "peer":
            await self._peer_loop(conn, hello["node"])
        else:
            log.debug("client connected", extra={"remote": conn.peer, "client": hello.get("client_id"),
                                                 "identity": identity.name, "role": identity.role})
            await self._client_loop(conn, hello.get("client_id", "?"), identity)

    # -- peers ------------------------------------------------------------------------------

    async def _peer_loop(self, conn: Connection, frm: str) -> None:
        conn.decoder.max_frame = max(self.agent.max_frame, 64 << 20)  # snapshots travel whole
        # Latency and loss are applied by the sending agent's transport; the receiving
        # side enforces partitions only (so a fault sent to every agent does not compound).
        # The newest connection from a peer is its link; when that one ends (the peer's
        # kernel closed it: a crashed or killed process), the driver hears of it. An older
        # one is ended here: the peer has given it up (it reconnected), and one whose end
        # never reached us (a host powered off mid-partition) would otherwise be read
        # forever, holding its socket and a decoder of up to 64 MiB.
        old = self._peer_conns.get(frm)
        if old is not None and old.peer_scope is not None:
            old.peer_scope.cancel()
        self._peer_conns[frm] = conn
        self.agent.transport.peer_reached_us(frm)
        try:
            with trio.CancelScope() as conn.peer_scope:
                while True:
                    try:
                        msg = await conn.receive()
                    except trio.BrokenResourceError:
                        self._peer_ended(conn, frm)
                        raise
                    if msg is None:
                        self._peer_ended(conn, frm)
                        return
                    self._peer_message(frm, msg)
        finally:
            if self._peer_conns.get(frm) is conn:
                del self._peer_conns[frm]

    def _peer_ended(self, conn: Connection, frm: str) -> None:
        if getattr(conn.stream, "was_cut", False):
            return  # we ended it (a CA no longer trusted): the peer is alive and reconnects
        if self._peer_conns.get(frm) is conn and not self.agent.transport.partitioned_from(frm):
            self.agent.driver.peer_lost(frm)

    def _peer_message(self, frm: str, msg: dict) -> None:
        agent = self.agent
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

    async def _client_loop(self, conn: Connection, client_id: str,
                           identity: Identity = ANONYMOUS) -> None:
        async with trio.open_nursery() as nursery:
            session = ClientSession(conn, nursery, client_id, identity)
            bucket = TokenBucket(self.requests_per_s, max(1.0, self.requests_per_s), trio.current_time())
            inflight = 0

            async def run_one(msg: dict) -> None:
                nonlocal inflight
                try:
                    reply = await self._answer(session, msg)
                finally:
                    inflight -= 1
                if reply is not None:
                    await conn.send(reply)
                    conn.last_activity = trio.current_time()

            def finish(reply: dict) -> None:  # the end of a write answered without a task
                nonlocal inflight
                inflight -= 1
                conn.push(reply)
                conn.last_activity = trio.current_time()

            async def watchdog() -> None:
                # Idle: nothing in flight, no subscription, no frame for idle_timeout.
                # Slow: a frame begun and not finished within frame_timeout.
                # Late: a write without an answer past request_timeout.
                # one wake-up a second per connection at the defaults
                tick = max(0.05, min(1.0, self.idle_timeout / 4, self.frame_timeout / 4,
                                     self.request_timeout / 4))
                while True:
                    await trio.sleep(tick)
                    now = trio.current_time()
                    session.expire_writes(now, self.request_timeout)
                    if conn.partial_since is not None and now - conn.partial_since > self.frame_timeout:
                        raise Refused("too_slow", f"a frame took more than {self.frame_timeout:g}s "
                                                  "to arrive", logging.INFO)
                    if inflight == 0 and not session.subscribed and conn.partial_since is None \
                            and now - conn.last_activity > self.idle_timeout:
                        raise Refused("idle_timeout", f"no request for {self.idle_timeout:g}s; "
                                                      "reconnect when needed", logging.INFO)

            wait = 0.0  # the rate limit's delay for the message step() handed over

            def step(msg: dict) -> bool:
                """A request that needs no waiting is answered here (from the read hub's
                task, usually); False hands it to this connection's task, below."""
                nonlocal inflight, wait
                t = msg["type"]
                if t in NOT_FROM_CLIENTS:
                    raise ProtocolError("bad_field", f"a client may not send {t} here")
                wait = bucket.take(trio.current_time())
                if wait > 0 or inflight >= self.max_inflight or t not in WRITES \
                        or msg.get("forward"):
                    return False
                inflight += 1
                self._write_now(session, msg, finish)
                return True

            nursery.start_soon(watchdog)
            nursery.start_soon(conn.flush_loop)
            try:
                while True:
                    msg = await self.hub.take(conn, step)
                    if msg is None:
                        return
                    if wait > 0:  # over its rate: stop reading this connection for a while
                        await trio.sleep(wait)
                    if inflight >= self.max_inflight:
                        await conn.send(_fail(msg["id"], "busy",
                                              f"more than {self.max_inflight} requests in flight"))
                        continue
                    inflight += 1
                    if msg["type"] in WRITES and not msg.get("forward"):
                        self._write_now(session, msg, finish)
                    else:
                        nursery.start_soon(run_one, msg)
            finally:
                nursery.cancel_scope.cancel()

    def _write_now(self, session: "ClientSession", msg: dict, finish) -> None:
        """A put, delete or cas without a task of its own: checked and proposed here, and
        answered by ``finish(reply)`` from the driver when it applies (or fails), or from
        the watchdog after request_timeout. Most of an agent's requests are these; a task,
        a cancel scope and an event each cost more than the write's own work (issue 9).
        Relayed writes (``forward``) take the general path."""
        agent = self.agent
        rid = msg["id"]
        t0 = time.monotonic()
        _, _, refused = self._admit(session, msg, t0)  # a write's role is never admin: no audit
        if refused is not None:
            finish(refused)
            return

        def done(p) -> None:
            session.writes.pop(p, None)
            try:
                result = agent.write_reply(msg, p)
            except Exception:
                finish(self._error_reply(msg, t0))
                return
            agent.observe_request(msg["type"], time.monotonic() - t0, ok=True)
            finish({"type": "reply", "id": rid, "ok": True, "result": result})

        try:
            p = agent.begin_write(msg, on_done=done)
        except Exception:
            finish(self._error_reply(msg, t0))
            return
        if not p.done:
            session.writes[p] = trio.current_time() + self.request_timeout

    def _authorize(self, session: "ClientSession", msg: dict, need: str) -> tuple[str, str | None]:
        """(the role the request runs with, None) or (role, the refusal message). With TLS
        off nobody is authenticated, so nothing is checked: every client is admin."""
        if self.ssl_context is None:
            return "admin", None
        role = effective_role(session.identity, msg.get("as_role"))
        return role, check_request(role, msg["type"], msg, need=need)

    def _admit(self, session: "ClientSession", msg: dict,
               t0: float) -> tuple[str, str, dict | None]:
        """(the role the request needs, the role it runs with, None), or a forbidden
        reply in place of None (logged, counted, audited if it needed admin)."""
        need = required_role(msg["type"], msg)  # once: the check and the audit both use it
        role, refusal = self._authorize(session, msg, need)
        if refusal is not None:
            self.forbidden += 1
            self._rlog.log(logging.WARNING, "request forbidden", remote=session.conn.peer,
                           request=msg["type"], role=role, identity=session.identity.name,
                           reason=refusal)
            if need == "admin" and self.audit is not None:
                self.audit.record(actor=session.identity, role=role, remote=session.conn.peer,
                                  msg=msg, ok=False, error="forbidden")
            self.agent.observe_request(msg["type"], time.monotonic() - t0, ok=False)
            return need, role, _fail(msg["id"], "forbidden", refusal)
        if "as_role" in MESSAGE_SCHEMAS[msg["type"]].fields:
            msg["as_role"] = role if role in ROLES else None  # a relay carries it on
            if msg["as_role"] is None:
                del msg["as_role"]
        return need, role, None

    async def _answer(self, session: "ClientSession", msg: dict) -> dict | None:
        t0 = time.monotonic()
        need, role, refused = self._admit(session, msg, t0)
        if refused is not None:
            return refused
        reply = await self._run(session, msg, t0)
        if need == "admin" and self.audit is not None:
            err = None if reply["ok"] else reply["error"]["code"]
            self.audit.record(actor=session.identity, role=role, remote=session.conn.peer,
                              msg=msg, ok=reply["ok"], error=err)
            log.info("admin action", extra={"audit": True, "request": msg["type"], "role": role,
                                             "identity": session.identity.name, "ok": reply["ok"]})
        return reply

    async def _run(self, session: "ClientSession", msg: dict, t0: float) -> dict:
        agent = self.agent
        try:
            result, leader = await agent.handle_request(session, msg)
        except Exception:
            return self._error_reply(msg, t0)
        agent.observe_request(msg["type"], time.monotonic() - t0, ok=True)
        reply = {"type": "reply", "id": msg["id"], "ok": True, "result": result}
        if leader is not None:
            reply["leader"] = leader
        return reply

    def _error_reply(self, msg: dict, t0: float) -> dict:
        """The failure reply for the exception being handled (call it from ``except``): a
        RequestFailed as its code says (with the leader hint); anything else is our bug,
        not the client's: logged and answered ``internal`` (the request may or may not
        have taken effect), and the agent keeps serving everyone else."""
        e = sys.exc_info()[1]
        if isinstance(e, RequestFailed):
            reply = _fail(msg["id"], e.code, e.message)
            if e.leader is not None or e.code == "not_leader":
                reply["leader"] = e.leader
        else:
            log.exception("request handler failed", extra={"request": msg["type"]})
            reply = _fail(msg["id"], "internal", f"the agent failed while handling {msg['type']}; "
                                                 "the outcome is unknown; see the agent's log")
        self.agent.observe_request(msg["type"], time.monotonic() - t0, ok=False)
        return reply


class ClientSession:
    """One client connection's state: its subscription, if any."""

    def __init__(self, conn: Connection, nursery: trio.Nursery, client_id: str,
                 identity: Identity = ANONYMOUS):
        self.conn = conn
        self.nursery = nursery
        self.client_id = client_id
        self.identity = identity
        self._sub_scope: trio.CancelScope | None = None
        self.writes: dict = {}  # Pending -> trio deadline, writes answered without a task

    def expire_writes(self, now: float, timeout: float) -> None:
        """Answer the writes still unanswered past their deadline: outcome unknown."""
        late = [p for p, deadline in self.writes.items() if deadline <= now]
        for p in late:
            p.fail("timeout", f"no answer within {timeout:g}s; the outcome is unknown")

    @property
    def subscribed(self) -> bool:
        return self._sub_scope is not None

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
