"""The asyncio client library: one connection per agent, requests, status streams, and a
cluster client with leader discovery, retries and honest outcomes.

Used by the console and by scripts:

    async with ClusterClient.from_inventory("inventory.yaml") as c:
        await c.put("k", b"v")
        print(await c.get("k"))

Outcomes. A write either succeeds, fails (``RequestError``: it certainly had no effect),
or raises ``OutcomeUnknown`` (it may or may not have been applied: a timeout or a lost
connection after the request was sent, and no later attempt settled it). Retries of a
write reuse its (client_id, seq), so the cluster applies it at most once. A request the
protocol's encoder refuses (too large, a bad field) is ``InvalidRequest``, a
``RequestError``: nothing was sent.

Sessions. The state machine remembers, per client id, the last applied seq. A client id
is registered (its seq 1 is a no-op, retried until it is known to have applied) before it
carries writes, and one client id carries one write at a time; the cluster client keeps
a pool of client ids so concurrent writes each get their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from nodeagent.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    encode,
)
from nodeagent.statusmap import apply_delta

# "internal": the agent failed while handling the request; the outcome is unknown.
# Error codes after which a write certainly had no effect and may be retried elsewhere.
_DEFINITE_RETRY = {"not_leader", "busy", "dropped"}
# Error codes that are final answers about the request itself.
_FINAL = {"rejected", "forbidden", "unknown_node", "bad_command", "stale_seq"}


def tls_context(tls, role: str = "admin", cert: str | os.PathLike | None = None,
                key: str | os.PathLike | None = None):
    """The console's SSL context for a cluster's ``TLSConfig`` (None: TLS off): the
    operator certificate of ``role`` from the ``raftdeck init`` layout, or ``cert``/``key``.
    Raises nodeagent.security.TLSError (one line) if the files are missing."""
    if tls is None:
        return None
    from pathlib import Path

    from nodeagent.security import ROLES, TLSError, client_context

    if role not in ROLES:
        raise TLSError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    if (cert is None) != (key is None):
        raise TLSError("give both --tls-cert and --tls-key, or neither")
    t = tls.for_role(role)
    if cert is None and t.dir is None:
        raise TLSError("cluster.tls names one agent's files, not an init directory: give the "
                       "console an operator certificate with --tls-cert and --tls-key")
    return followed_context(t.ca, Path(cert) if cert else t.cert, Path(key) if key else t.key)


class _TLSFiles:
    """The files an operator context was made from, so that a console running for days
    follows a renewed certificate or a CA replacement (`raftdeck init --rotate-ca`: its
    last step ends the connections made with the old CA's certificates, and the old
    certificate is no longer accepted). Looked at when a connection is made, at most once
    a second; files that do not load (half copied) leave the context in use."""

    def __init__(self, paths: tuple, ctx) -> None:
        self.paths = paths
        self.ctx = ctx
        self.stamp = self._stamp()
        self.checked = time.monotonic()

    def _stamp(self):
        try:
            return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, self.paths))
        except OSError:
            return None

    def current(self):
        now = time.monotonic()
        if now - self.checked < 1.0:
            return self.ctx
        self.checked = now
        stamp = self._stamp()
        if stamp is None or stamp == self.stamp:
            return self.ctx
        from nodeagent.security import TLSError, client_context

        try:
            ctx = client_context(*self.paths)
        except TLSError:
            return self.ctx  # tried again on a later connection
        ctx.raftdeck_files = self
        self.ctx, self.stamp = ctx, stamp
        return ctx


def followed_context(ca, cert, key):
    """``client_context(ca, cert, key)`` that ``current_context`` keeps up with its files."""
    from nodeagent.security import client_context

    ctx = client_context(ca, cert, key)
    ctx.raftdeck_files = _TLSFiles((ca, cert, key), ctx)
    return ctx


def current_context(ctx):
    """The context to make a connection with: ``ctx``, or the one made from its files
    since they changed (see ``_TLSFiles``)."""
    files = getattr(ctx, "raftdeck_files", None)
    return ctx if files is None else files.current()


class RequestError(Exception):
    """The agent answered ``ok: false``: the request had no effect."""

    def __init__(self, code: str, message: str, leader: str | None = None, node: str | None = None):
        super().__init__(f"{code}: {message}" + (f" (from {node})" if node else ""))
        self.code = code
        self.message = message
        self.leader = leader
        self.node = node


class InvalidRequest(RequestError):
    """The protocol's encoder refused the request here (too large, a bad field): nothing
    was sent."""


class OutcomeUnknown(Exception):
    """The request was sent but no answer settled whether it took effect."""


class ConnectionFailed(Exception):
    """Could not reach the agent (nothing was sent)."""


class _Wire(asyncio.Protocol):
    """An AgentConnection's socket: bytes go to the connection as they arrive (no reader
    task, no stream buffer between the socket and the frame decoder)."""

    def __init__(self, conn: "AgentConnection"):
        self.conn = conn
        self.paused = False
        self.resumed: asyncio.Future | None = None

    def data_received(self, data: bytes) -> None:
        self.conn._feed(data)

    def eof_received(self) -> bool:
        self.conn._feed(b"")  # the decoder sees EOF (a frame cut short is an error)
        return False  # and the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._lost()
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)
        self.resumed = None

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        while self.paused and not self.conn._closed.is_set():
            if self.resumed is None or self.resumed.done():  # done: a waiter was cancelled
                self.resumed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.resumed)  # one waiter's timeout leaves the others be


class AgentConnection:
    """One connection to one agent. Requests may run concurrently; replies are matched
    by id. ``status_update`` pushes go to the queue returned by ``subscribe()``.

    The socket is read by an asyncio protocol (``_Wire``) that decodes frames as they
    arrive and resolves the waiting request right there: a reply costs one pass of the
    event loop before its caller runs, not three (stream buffer, reader task, caller)."""

    def __init__(self, name: str, host: str, port: int, cluster: str, *,
                 client_id: str | None = None, ssl=None, connect_timeout: float = 3.0):
        self.name = name
        self.host = host
        self.port = port
        self.cluster = cluster
        self.client_id = client_id or f"client-{os.getpid()}"
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.hello: dict | None = None
        self._transport: asyncio.Transport | None = None
        self._wire: _Wire | None = None
        self._decoder = FrameDecoder()
        self._hello_fut: asyncio.Future | None = None  # until the agent answers the hello
        self._waiters: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._updates: asyncio.Queue | None = None
        self._pushed: dict | None = None  # the newest pushed status map (deltas apply to it)
        self._closed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._closed.is_set()

    async def connect(self) -> dict:
        loop = asyncio.get_running_loop()
        self._hello_fut = loop.create_future()
        ssl = current_context(self.ssl)
        try:
            self._transport, self._wire = await asyncio.wait_for(
                loop.create_connection(lambda: _Wire(self), self.host, self.port, ssl=ssl,
                                       server_hostname=self.host if ssl else None),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectionFailed(f"{self.name} ({self.host}:{self.port}): "
                                   f"{getattr(e, 'strerror', None) or e or 'timed out'}") from None
        self._transport.write(encode({"type": "hello", "role": "client", "cluster": self.cluster,
                                      "version": PROTOCOL_VERSION,
                                      "client_id": self.client_id[:128]}))
        try:
            msg = await asyncio.wait_for(self._hello_fut, self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ProtocolError) as e:
            await self.close()
            raise ConnectionFailed(f"{self.name}: no hello answer ({e or 'timed out'})") from None
        if msg is None or msg["type"] == "error":
            await self.close()
            why = f"{msg['code']}: {msg['message']}" if msg else "connection closed"
            raise ConnectionFailed(f"{self.name}: refused: {why}")
        self.hello = msg
        return msg

    def _feed(self, data: bytes) -> None:
        """Bytes from the socket (b"" at EOF): decode every whole frame and deliver it."""
        if self._closed.is_set():
            return
        decoder = self._decoder
        try:
            decoder.receive_data(data)
            while True:
                msg = decoder.next_message()
                if msg is NEED_DATA:
                    return
                if msg is CLOSED or not self._deliver(msg):
                    break
        except ProtocolError as e:
            hello = self._hello_fut
            if hello is not None and not hello.done():
                hello.set_exception(e)  # connect() reports the hello as unanswered, and why
        except (ValueError, TypeError, AttributeError, KeyError):
            pass  # a status delta that does not fit the map it follows: end the connection
        self._transport.close()  # connection_lost then fails whatever still waits

    def _deliver(self, msg: dict) -> bool:
        """Hand one message to whoever waits for it; False ends the connection."""
        hello = self._hello_fut
        if hello is not None:
            self._hello_fut = None
            if not hello.done():
                hello.set_result(msg)
            return msg["type"] != "error"
        t = msg["type"]
        if t == "reply":
            fut = self._waiters.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif t == "status_update":
            if self._updates is not None:
                # Deltas are applied here, in order, before any push is dropped.
                if msg.get("delta"):
                    if self._pushed is None:
                        return False  # a delta with no map before it: a broken stream
                    self._pushed = apply_delta(self._pushed, msg["status"])
                else:
                    self._pushed = msg["status"]
                if self._updates.full():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        self._updates.get_nowait()  # keep only the newest
                self._updates.put_nowait(self._pushed)
        elif t == "error":
            return False
        return True

    def _lost(self) -> None:
        """The connection ended (either side): every request still waiting has an
        unknown outcome, and a subscription ends. Once: the first call does it."""
        if self._closed.is_set():
            return
        self._closed.set()
        hello = self._hello_fut
        if hello is not None and not hello.done():
            hello.set_result(None)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(OutcomeUnknown(f"{self.name}: connection lost"))
                # Its caller may have gone (cancelled); do not warn about it then.
                fut.add_done_callback(lambda f: f.exception())
        self._waiters.clear()
        if self._updates is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._updates.put_nowait(None)

    async def request(self, type_: str, /, *, timeout: float = 5.0, **fields) -> Any:
        """Send one request and return its result; RequestError on ok=false;
        OutcomeUnknown if the connection died or the answer did not come in time."""
        if not self.connected:
            raise ConnectionFailed(f"{self.name}: not connected")
        rid = next(self._ids)
        try:
            frame = encode({"type": type_, "id": rid, **fields})
        except ProtocolError as e:  # too large, or a field the protocol refuses: not sent
            raise InvalidRequest(e.code, f"{e.message} (nothing was sent; send fewer or "
                                 "smaller items)", None, self.name) from None
        fut = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            self._transport.write(frame)
            if self._wire.paused:  # the agent reads slowly, or not at all: bounded too
                async with asyncio.timeout(timeout):
                    await self._wire.drain()
        except TimeoutError:  # before OSError: it is one
            self._waiters.pop(rid, None)
            raise OutcomeUnknown(f"{self.name}: the agent took nothing for {timeout:g}s "
                                 "(it reads slowly or not at all)") from None
        except (OSError, ConnectionError):
            self._waiters.pop(rid, None)
            raise OutcomeUnknown(f"{self.name}: connection lost while sending") from None
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the future in a new
            # task per request (measurable on the write path).
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError:
            self._waiters.pop(rid, None)
            raise OutcomeUnknown(f"{self.name}: no reply within {timeout:g}s") from None
        if not reply["ok"]:
            err = reply.get("error") or {"code": "unknown", "message": ""}
            raise RequestError(err["code"], err["message"], reply.get("leader"), self.name)
        return reply.get("result")

    async def subscribe(self, interval_ms: int = 250, *, delta: bool = True,
                        silence_s: float | None = None) -> AsyncIterator[dict]:
        """Status maps pushed by the agent; ends when the connection closes. With ``delta``
        the agent sends only what changed after its first push; the maps yielded here are
        whole either way (and must not be mutated: they share unchanged parts).
        ``silence_s``: raise ConnectionFailed when nothing came for that long (the agent
        pushes a keepalive at least every max(1 s, 4 x interval)): a connection whose end
        never reached us (a host powered off, a dropped NAT entry) is given up."""
        self._updates = asyncio.Queue(maxsize=4)
        self._pushed = None
        await self.request("subscribe", interval_ms=interval_ms, delta=delta)
        while True:
            try:
                async with asyncio.timeout(silence_s):
                    st = await self._updates.get()
            except TimeoutError:
                raise ConnectionFailed(f"{self.name}: no status for {silence_s:g}s") from None
            if st is None:
                return
            yield st

    async def close(self) -> None:
        if self._transport is not None and not self._closed.is_set():
            self._transport.close()  # flushes what is buffered (and TLS says goodbye) first
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 1.0)
            if not self._closed.is_set():
                self._transport.abort()  # a peer that does not take the goodbye
        self._lost()


@dataclass
class _Session:
    client_id: str
    next_seq: int


class ClusterClient:
    """Talks to a whole cluster: finds the leader, retries, reports honest outcomes."""

    def __init__(self, addresses: Mapping[str, tuple[str, int]], cluster: str, *,
                 client_id: str | None = None, timeout: float = 5.0, op_timeout: float = 15.0,
                 ssl=None, rng: random.Random | None = None):
        self.addresses = dict(addresses)
        self.cluster = cluster
        self.base_id = client_id or f"c-{uuid.uuid4().hex[:12]}"
        self.timeout = timeout
        self.op_timeout = op_timeout  # total time one operation may take, retries included
        self.ssl = ssl
        self.rng = rng or random.Random()
        self.leader: str | None = None
        self._conns: dict[str, AgentConnection] = {}
        self._free: list[_Session] = []
        self._session_ids = itertools.count(1)
        self._connect_locks: dict[str, asyncio.Lock] = {}

    # The longest pause between attempts while no leader answers: an election takes a few
    # hundred ms, so polling every ~50 ms finds the new leader soon after it is elected
    # (a 250 ms cap added up to that much to a failover as clients saw it).
    search_delay_max = 0.05

    @classmethod
    def from_inventory(cls, path: str, *, role: str = "admin", cert: str | None = None,
                       key: str | None = None, **kw) -> "ClusterClient":
        """A client for the inventory's cluster; with ``cluster.tls`` it presents the
        operator certificate of ``role`` (or ``cert``/``key``)."""
        from nodeagent.config import load_inventory

        inv = load_inventory(path)
        kw.setdefault("ssl", tls_context(inv.cluster.tls, role, cert, key))
        return cls({n.name: (n.host, n.port) for n in inv.nodes}, inv.cluster.name, **kw)

    async def __aenter__(self) -> "ClusterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for c in list(self._conns.values()):
            await c.close()
        self._conns.clear()

    # -- connections --

    async def connection(self, name: str) -> AgentConnection:
        c = self._conns.get(name)
        if c is not None and c.connected:
            return c
        lock = self._connect_locks.setdefault(name, asyncio.Lock())
        async with lock:
            c = self._conns.get(name)
            if c is not None and c.connected:
                return c
            host, port = self.addresses[name]
            c = AgentConnection(name, host, port, self.cluster, client_id=self.base_id,
                                ssl=self.ssl, connect_timeout=min(self.timeout, 3.0))
            await c.connect()
            self._conns[name] = c
            if c.hello and c.hello.get("leader"):
                self.leader = c.hello["leader"]
            return c

    def _candidates(self, attempt: int) -> list[str]:
        names = sorted(self.addresses)
        if self.leader in self.addresses:
            names.remove(self.leader)
            names.insert(0, self.leader)
        return names

    async def call(self, node: str, type_: str, /, **fields) -> Any:
        """One request to one named agent, no retries."""
        conn = await self.connection(node)
        return await conn.request(type_, timeout=self.timeout, **fields)

    async def _leader_call(self, type_: str, /, *, changes_state: bool, **fields) -> Any:
        """Send to the leader, following not_leader hints, retrying on other nodes until
        ``op_timeout`` runs out. Every request we send is safe to repeat (writes carry
        their (client_id, seq)). For a request that changes state, an attempt that may
        have applied turns the final failure into OutcomeUnknown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        unknown: Exception | None = None
        last: Exception | None = None
        delay = 0.02
        tried = 0
        while True:
            cap = self.search_delay_max  # looking for a leader: poll often
            names = self._candidates(tried)
            if not names:
                break
            # Once the known leader failed, walk the others in turn.
            target = names[tried % len(names)] if self.leader is None else names[0]
            tried += 1
            try:
                result = await self.call(target, type_, **fields)
                self.leader = target
                return result
            except ConnectionFailed as e:
                last = e
                if self.leader == target:
                    self.leader = None
            except OutcomeUnknown as e:
                unknown = e
                if self.leader == target:
                    self.leader = None
            except RequestError as e:
                last = e
                if e.code == "not_leader":
                    hint = e.leader if e.leader in self.addresses and e.leader != target else None
                    self.leader = hint
                    if hint is not None and loop.time() < deadline:
                        continue  # go straight to the leader it named
                elif e.code in _DEFINITE_RETRY or e.code in ("timeout", "internal"):
                    if e.code in ("timeout", "internal"):
                        unknown = e
                    if e.code != "busy":
                        self.leader = None
                    else:
                        cap = 0.25  # an overloaded leader: back off further
                else:
                    if unknown is not None and changes_state:
                        # An earlier attempt may have applied: a refusal of this one says
                        # nothing about that one (found by the chaos tests).
                        raise OutcomeUnknown(f"{type_}: {unknown}; a retry was refused: {e}") from e
                    raise
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, cap)
        if unknown is not None and changes_state:
            raise OutcomeUnknown(f"{type_}: {unknown}")
        if isinstance(last, RequestError) and last.code == "not_leader":
            # What the operator needs is not which node said so last, but that none leads.
            asked = f" (the last asked: {last.node})" if last.node else ""
            raise RequestError("not_leader", f"no node led within {self.op_timeout:g}s{asked}; is "
                               "a majority of the voters down or cut off? `raftdeck status` "
                               "shows who answers") from last
        raise last or unknown or ConnectionFailed("no agent reachable")

    # -- sessions --

    async def _session(self) -> _Session:
        if self._free:
            return self._free.pop()
        s = _Session(f"{self.base_id}.{next(self._session_ids)}", 1)
        # Register: seq 1 is a no-op, retried with the same seq until it certainly applied,
        # within one op_timeout in all (each try may take that long against an agent that
        # answers nothing, and eight of them were eight times the time promised).
        try:
            async with asyncio.timeout(self.op_timeout):
                for _ in range(8):
                    try:
                        await self._leader_call("register", changes_state=True,
                                                client_id=s.client_id)
                        s.next_seq = 2
                        return s
                    except OutcomeUnknown:
                        continue
        except TimeoutError:
            pass
        raise OutcomeUnknown(f"could not register a client session within {self.op_timeout:g}s")

    async def _write(self, type_: str, **fields) -> Any:
        try:
            s = await self._session()
        except RequestError as e:
            if e.code == "forbidden" and e.message.startswith("register "):
                # The session is ours, the write is what the operator asked for: name it.
                raise RequestError(e.code, type_ + e.message[len("register"):], e.leader,
                                   e.node) from None
            raise
        seq = s.next_seq
        s.next_seq += 1
        try:
            result = await self._leader_call(type_, changes_state=True, client_id=s.client_id,
                                             seq=seq, **fields)
        except RequestError as e:
            if e.code != "session_expired":
                self._free.append(s)
            raise
        except BaseException:
            self._free.append(s)
            raise
        self._free.append(s)
        return result

    # -- the KV API --

    async def put(self, key: str, value: bytes) -> int:
        return (await self._write("put", key=key, value=value))["index"]

    async def delete(self, key: str) -> int:
        return (await self._write("delete", key=key))["index"]

    async def cas(self, key: str, expected: bytes | None, value: bytes) -> tuple[bool, bytes | None]:
        r = await self._write("cas", key=key, expected=expected, value=value)
        return r["swapped"], r["value"]

    async def get(self, key: str, consistency: str = "linearizable", node: str | None = None):
        if node is not None:
            return await self.call(node, "get", key=key, consistency=consistency)
        return await self._leader_call("get", changes_state=False, key=key, consistency=consistency)

    async def dump(self, node: str, limit: int = 20000, prefix: str = "",
                   after: str | None = None) -> dict:
        """``node``'s pairs in key order: ``{"applied", "kv", "truncated"}`` (what it
        has applied; compare replicas at equal ``applied``): only keys starting with
        ``prefix``, and after ``after`` (paging: the last key of the page before)."""
        fields: dict[str, Any] = {"limit": limit}
        if prefix:
            fields["prefix"] = prefix  # sent only when used: agents before it refuse it
        if after is not None:
            fields["after"] = after
        return await self.call(node, "dump", **fields)

    # -- tasks --

    async def submit(self, tasks: list[dict]) -> dict:
        """Submit tasks (each a spec with a client-chosen ``id``; see docs/PROTOCOL.md).
        Resubmitting an id with the same spec is a no-op, so a retry is safe."""
        out = {"index": 0, "results": []}
        for i in range(0, len(tasks), 1000):
            r = await self._write("submit", tasks=tasks[i:i + 1000])
            out["index"] = r["index"]
            out["results"] += r["results"]
        return out

    async def task(self, task_id: str, node: str | None = None) -> dict | None:
        if node is not None:
            return await self.call(node, "task_get", task=task_id)
        return await self._leader_call("task_get", changes_state=False, task=task_id)

    async def tasks(self, state: str | None = None, node: str | None = None,
                    limit: int = 100, after: str | None = None) -> list[dict]:
        return await self._leader_call("task_list", changes_state=False, state=state,
                                       node=node, limit=limit, after=after)

    async def wait(self, ids: list[str], timeout: float = 60.0) -> list[dict]:
        """Wait until every task is final; returns their records (raises TimeoutError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        records: dict[str, dict] = {}
        pending = list(ids)
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} of {len(ids)} tasks not final after {timeout:g}s")
            chunk = pending[:1000]
            r = await self._leader_call("task_wait", changes_state=False, ids=chunk,
                                        timeout_ms=int(min(left, self.timeout * 0.8) * 1000))
            for rec in r["tasks"]:
                if rec is not None and rec["state"] in ("succeeded", "failed", "timed_out",
                                                        "cancelled"):
                    records[rec["id"]] = rec
            pending = [i for i in pending if i not in records]
        return [records[i] for i in ids]

    async def cancel(self, task_id: str) -> dict:
        return await self._write("task_cancel", task=task_id)

    # -- admin --

    async def status(self, node: str) -> dict:
        return await self.call(node, "status")

    async def statuses(self) -> dict[str, dict | Exception]:
        async def one(n: str):
            try:
                return n, await self.call(n, "status")
            except Exception as e:  # one dead agent must not hide the others
                return n, e

        return dict(await asyncio.gather(*(one(n) for n in sorted(self.addresses))))

    async def find_leader(self) -> str | None:
        for n, st in (await self.statuses()).items():
            if isinstance(st, dict) and st.get("role") == "leader":
                self.leader = n
                return n
        return None

    async def transfer(self, to: str) -> None:
        await self._leader_call("transfer", changes_state=False, to=to)

    async def fault(self, node: str, **fields) -> None:
        await self.call(node, "fault", **fields)

    async def heal(self, node: str | None = None) -> None:
        for n in [node] if node else sorted(self.addresses):
            with contextlib.suppress(ConnectionFailed, OutcomeUnknown):
                await self.call(n, "heal")
