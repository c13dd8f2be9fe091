"""Outbound peer links: one TCP (TLS) connection from this agent to each peer.

Every agent sends its Raft messages to a peer over its *own* outbound connection and
receives the peer's messages on its listener (``server.py``), which asks this module's
inbound filter (``Transport.accept_incoming``) about each one. So a link here only ever
writes ``raft`` frames; it also reads, to notice an ``error`` frame or the peer closing.

One link task per peer, all in the nursery of ``Transport.run()``:

    connect (fail_after connect_timeout) -> TLS handshake (fail_after) -> hello -> hello_ok
    (fail_after) -> [writer: outbox -> batched send_all | reader: error frame / EOF]
    -> on any failure: close, record ``last_error``, back off (exponential, jittered), retry

Decisions (see also the caveats in each docstring):

* **Bounded outbox, drop-oldest.** ``send()`` never blocks: it encodes the message and
  appends it to that peer's outbox (at most ``outbox_size`` frames and ``outbox_bytes``
  bytes). When full, the *oldest* queued frame is evicted and counted in ``dropped_full``;
  the new one is kept, so ``send()`` still returns True. After an outage the peer gets the
  newest messages (current term and commit) rather than a backlog of stale heartbeats;
  Raft retransmits whatever was lost. Frames taken for a ``send_all`` that fails are lost
  too (``dropped_error``): no acks, no re-send, Raft copes.
* **Batching.** The writer takes every due frame in the outbox (up to ``MAX_BATCH_BYTES``)
  and writes them with one ``send_all``; ``stats()['peers'][p]['batches']`` counts them.
  ``send_batch`` (the driver's call, one per Ready) instead writes a plain TCP link's
  frames from the caller's task, joined, when the writer is idle and no fault rule is in
  force; whatever the kernel does not take is sent by the writer before anything else.
* **Faults.** ``FaultRules`` is pure. A *partition* is enforced at both ends: the sender
  drops in ``send()`` (and ``set_faults()`` drops what is already queued for a peer it
  cuts off), the receiver drops in ``accept_incoming()``. So a
  one-way partition a->b holds if either a or b got the rule, and holding it twice changes
  nothing. *Loss* and *latency* are enforced by the **sender only** (in ``send()`` and in
  the link): applying them at both ends would compound them (two 30% loss filters drop
  51%, two 100 ms delays add 200 ms) whenever the console sends a fault to every agent.
  ``incoming_delay()`` therefore always returns 0.0 and exists for the listener's sake.
  Contract for whoever injects faults: send loss/latency faults to the sending agents
  (every agent is simplest); partitions may go to either end.
* **Latency keeps per-link order and blocks no other link.** A frame is due at
  ``queued_at + delay(me, peer, now)``. The delay is evaluated when the frame is about to
  be written, not when it was queued, so a heal (or an expiring rule) releases a delayed
  backlog at once; since the delay is the same for every frame of a link, due times are
  in queue order and FIFO is preserved. Each link waits for its own head-of-line frame.
* **Clock.** ``clock`` (default ``trio.current_time``) stamps queueing, rule expiry and
  stats; the link's waits are trio sleeps of ``due - clock()``. An injected clock must
  therefore advance with trio's clock (or be frozen only in tests without latency rules).

Nothing here spawns threads; every wait is under ``fail_after`` or a cancel scope.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import random
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

import trio

from .protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    encode,
)
from .tlsstream import TLSStream

__all__ = [
    "FAULT_ACTIONS",
    "MAX_BATCH_BYTES",
    "FaultRule",
    "FaultRules",
    "Transport",
    "backoff_delay",
]

log = logging.getLogger("nodeagent.transport")

FAULT_ACTIONS: Final = ("partition", "latency", "loss")
MAX_BATCH_BYTES: Final = 1 << 20  # one send_all carries at most this much (or one frame)
DEFAULT_OUTBOX_BYTES: Final = 64 << 20
READ_CHUNK: Final = 65536


# -- fault rules (pure) -------------------------------------------------------------------


def _node_set(value: Any, what: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"{what} must be a collection of node names or None, not a string")
    nodes = frozenset(value)
    for n in nodes:
        if type(n) is not str or not n:
            raise ValueError(f"{what}: node names are non-empty strings, got {n!r}")
    return nodes


@dataclasses.dataclass(frozen=True)
class FaultRule:
    """One fault on peer traffic from a node in ``frm`` to a node in ``to`` (None: any node).

    ``action``: ``partition`` (drop everything), ``latency`` (delay by ``ms``), ``loss``
    (drop with probability ``rate``). ``expires_at`` is a time on the transport's clock
    after which the rule no longer applies (None: until healed). ``duration_ms`` is the
    requested lifetime, kept only to report it back when no clock reading is at hand.
    """

    action: str
    frm: frozenset[str] | None = None
    to: frozenset[str] | None = None
    ms: int = 0
    rate: float = 0.0
    expires_at: float | None = None
    duration_ms: int | None = None

    def __post_init__(self) -> None:
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"fault action must be one of {', '.join(FAULT_ACTIONS)}, got {self.action!r}")
        object.__setattr__(self, "frm", _node_set(self.frm, "from"))
        object.__setattr__(self, "to", _node_set(self.to, "to"))
        if not isinstance(self.ms, int) or isinstance(self.ms, bool) or self.ms < 0:
            raise ValueError(f"ms must be an int >= 0, got {self.ms!r}")
        if (
            not isinstance(self.rate, (int, float))
            or isinstance(self.rate, bool)
            or not 0.0 <= self.rate <= 1.0
        ):
            raise ValueError(f"rate must be a number in 0.0..1.0, got {self.rate!r}")
        object.__setattr__(self, "rate", float(self.rate))

    @property
    def key(self) -> tuple[str, frozenset[str] | None, frozenset[str] | None]:
        """Rules with the same key replace each other (re-injecting a fault is idempotent)."""
        return (self.action, self.frm, self.to)

    def active(self, now: float | None) -> bool:
        """False once expired; ``now=None`` does not check expiry."""
        return self.expires_at is None or now is None or now < self.expires_at

    def matches(self, frm: str, to: str, now: float | None = None) -> bool:
        return (
            (self.frm is None or frm in self.frm)
            and (self.to is None or to in self.to)
            and self.active(now)
        )

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any], *, now: float | None = None) -> FaultRule:
        """The rule a ``fault`` message (docs/PROTOCOL.md) describes.

        Takes the request itself (``type`` and ``id`` are ignored) or a map from
        ``to_wire()``. ``duration_ms`` needs ``now`` (the transport's clock) to set
        ``expires_at``. ``action: heal`` is not a rule: use ``FaultRules.with_request``.
        Raises ValueError on a bad field.
        """
        action = msg.get("action")
        if action == "heal":
            raise ValueError("'heal' removes rules; apply it with FaultRules.with_request()")
        duration = msg.get("duration_ms")
        expires_at = None
        if duration is not None:
            if not isinstance(duration, int) or isinstance(duration, bool) or duration < 0:
                raise ValueError(f"duration_ms must be an int >= 0, got {duration!r}")
            if now is None:
                raise ValueError("a fault with duration_ms needs now= (the transport's clock)")
            expires_at = now + duration / 1000.0
        return cls(
            action=action,
            frm=msg.get("from"),
            to=msg.get("to"),
            ms=msg.get("ms", 0) if action == "latency" else 0,
            rate=msg.get("rate", 0.0) if action == "loss" else 0.0,
            expires_at=expires_at,
            duration_ms=duration,
        )

    def to_wire(self, now: float | None = None) -> dict[str, Any]:
        """The ``fault`` message fields (no ``type``/``id``) for this rule.

        With ``now``, ``duration_ms`` is the time left; without, the duration requested.
        ``from``/``to`` are sorted lists (or None); ``ms`` only for latency, ``rate`` only
        for loss. Every value is plain msgpack, ready for a status map.
        """
        out: dict[str, Any] = {
            "action": self.action,
            "from": None if self.frm is None else sorted(self.frm),
            "to": None if self.to is None else sorted(self.to),
        }
        if self.action == "latency":
            out["ms"] = self.ms
        if self.action == "loss":
            out["rate"] = self.rate
        if self.expires_at is not None and now is not None:
            out["duration_ms"] = max(0, round((self.expires_at - now) * 1000))
        elif self.duration_ms is not None:
            out["duration_ms"] = self.duration_ms
        return out


@dataclasses.dataclass(frozen=True)
class FaultRules:
    """The faults one agent enforces: an immutable set of ``FaultRule``.

    Where several rules match a (from, to) pair, the strongest wins: any partition drops;
    the loss rate and the delay are the largest matching ones (so injecting the same
    fault twice, or two overlapping faults, never compounds). Every query takes ``now``
    and ignores rules expired at that time (``now=None``: expiry not checked).
    """

    rules: tuple[FaultRule, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[FaultRule]:
        return iter(self.rules)

    # -- building ------------------------------------------------------------------------

    def add(self, rule: FaultRule) -> FaultRules:
        """These rules plus ``rule``, replacing a rule with the same action, from and to."""
        return FaultRules(tuple(r for r in self.rules if r.key != rule.key) + (rule,))

    def remove(self, frm: Iterable[str] | None, to: Iterable[str] | None) -> FaultRules:
        """Without the rules (of any action) whose from and to are exactly these sets."""
        f, t = _node_set(frm, "from"), _node_set(to, "to")
        return FaultRules(tuple(r for r in self.rules if not (r.frm == f and r.to == t)))

    def with_request(self, msg: Mapping[str, Any], *, now: float | None = None) -> FaultRules:
        """Apply one ``fault`` request: ``heal`` removes the rules with exactly its from/to
        (any action); other actions add (or replace) a rule. ``now`` as in ``from_wire``."""
        if msg.get("action") == "heal":
            return self.remove(msg.get("from"), msg.get("to"))
        return self.add(FaultRule.from_wire(msg, now=now))

    @staticmethod
    def heal() -> FaultRules:
        """No faults."""
        return FaultRules()

    def active(self, now: float) -> FaultRules:
        """Without the rules expired at ``now``."""
        kept = tuple(r for r in self.rules if r.active(now))
        return self if len(kept) == len(self.rules) else FaultRules(kept)

    def next_expiry(self, now: float | None = None) -> float | None:
        """The earliest ``expires_at`` still in the future (None: nothing will expire)."""
        times = [r.expires_at for r in self.rules if r.expires_at is not None and r.active(now)]
        return min(times) if times else None

    # -- queries -------------------------------------------------------------------------

    def partitioned(self, frm: str, to: str, now: float | None = None) -> bool:
        return any(r.action == "partition" and r.matches(frm, to, now) for r in self.rules)

    def loss_rate(self, frm: str, to: str, now: float | None = None) -> float:
        return max((r.rate for r in self.rules if r.action == "loss" and r.matches(frm, to, now)), default=0.0)

    def delay(self, frm: str, to: str, now: float | None = None) -> float:
        """Seconds of latency for a message from -> to (the largest matching rule)."""
        ms = max((r.ms for r in self.rules if r.action == "latency" and r.matches(frm, to, now)), default=0)
        return ms / 1000.0

    def drops(self, frm: str, to: str, rng: random.Random, now: float | None = None) -> bool:
        """Whether a message from -> to is dropped: partitioned, or lost with the matching
        loss rate. Draws from ``rng`` once, and only when a loss rule in (0, 1) matches."""
        if self.partitioned(frm, to, now):
            return True
        rate = self.loss_rate(frm, to, now)
        if rate <= 0.0:
            return False
        return rate >= 1.0 or rng.random() < rate

    # -- wire ----------------------------------------------------------------------------

    @classmethod
    def from_wire(cls, items: Iterable[Mapping[str, Any]], *, now: float | None = None) -> FaultRules:
        """Rules from a list of ``fault`` maps (as ``to_wire`` returns)."""
        rules = FaultRules()
        for item in items:
            rules = rules.with_request(item, now=now)
        return rules

    def to_wire(self, now: float | None = None) -> list[dict[str, Any]]:
        """One ``fault`` map per rule (without rules expired at ``now``)."""
        return [r.to_wire(now) for r in self.rules if r.active(now)]

    to_wire_list = to_wire


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Seconds to wait before reconnect attempt ``attempt`` (1 = after the first failure):
    uniform in ``[lo, min(hi, lo * 2**(attempt-1))]`` ("full jitter" with a floor), so
    retries of many links spread out and never come faster than ``lo`` or slower than ``hi``."""
    cap = min(hi, lo * 2.0 ** min(max(attempt - 1, 0), 60))
    return lo if cap <= lo else rng.uniform(lo, cap)


# -- links ---------------------------------------------------------------------------------


class _PeerError(Exception):
    """The peer said no (an ``error`` frame), closed, or is not who we expected."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# What a broken network or peer raises; anything else out of a link is a bug and propagates.
_LINK_ERRORS: Final = (
    OSError,  # includes ssl.SSLError and socket.gaierror
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ProtocolError,
    _PeerError,
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, (ProtocolError, _PeerError)):
        return str(exc)
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return _describe(exc.__cause__)
    if isinstance(exc, OSError):
        # open_tcp_stream raises "all attempts to connect ... failed" with the real
        # reasons (one per address tried) in an exception group as __cause__.
        causes = getattr(exc.__cause__, "exceptions", None)
        if exc.strerror is None and causes:
            return "; ".join(dict.fromkeys(_describe(c) for c in causes))
        text = exc.strerror or str(exc) or "error"
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _LinkFailure(Exception):
    def __init__(self, phase: str, exc: BaseException) -> None:
        super().__init__(phase, exc)
        self.phase = phase
        self.text = f"{phase}: {_describe(exc)}"
        self.code = exc.code if isinstance(exc, _PeerError) else None  # the peer's error code


_COUNTERS: Final = (
    "connects",
    "connect_failures",
    "disconnects",
    "sent",
    "batches",
    "bytes_sent",
    "dropped_full",
    "dropped_fault",
    "dropped_error",
    "dropped_too_large",
    "dropped_refused",
    "received",
    "dropped_incoming",
)


class _Link:
    """One peer: its address, outbox, counters, and the scopes of its task."""

    def __init__(self, name: str, addr: tuple[str, int]) -> None:
        self.name = name
        self.addr = addr
        self.outbox: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued_bytes = 0
        self.wake = trio.Event()
        self.scope: trio.CancelScope | None = None  # the link task; cancelled on removal
        self.attempt_scope: trio.CancelScope | None = None  # one connection; cancelled on re-address
        self.connected = False
        self.backing_off = False  # waiting out a reconnect delay (see Transport.peer_reached_us)
        # While connected, what send_batch writes to directly when the writer is not
        # writing (``busy``): the socket (plain TCP; its descriptor is looked up per write,
        # so a write after a close fails instead of reaching a reused number) or the
        # TLSStream.
        # ``partial`` is what a plain write left over, which the writer sends first;
        # ``flush``: a TLS write left ciphertext in the stream for the writer to send.
        self.direct_sock: trio.socket.SocketType | None = None
        self.direct_tls: TLSStream | None = None
        # renew_links: the connection being replaced, left open until the next one is up
        # (or failed), so the peer never sees this link end (no early campaign there).
        self.renewing = False
        self.retiring: trio.abc.Stream | None = None
        self.redial_after = 0.0  # drop_links: seconds to wait before connecting again
        self.busy = False
        self.partial = b""
        self.flush = False
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.last_error: str | None = None
        self.last_error_code: str | None = None  # the code of the peer's error frame, if one
        self.last_error_at: float | None = None
        self.last_sent_at: float | None = None
        self.last_connected_at: float | None = None
        self.last_received_at: float | None = None
        self.peer_version: int | None = None
        self.refused = False  # set_refused: nothing is sent to it
        self.plain_hello = False  # the peer just refused data_id: an older agent (Transport._connect)

    @property
    def address(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def notify(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connected": self.connected,
            **self.counts,
            "queued": len(self.outbox),
            "queued_bytes": self.queued_bytes,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_sent_at": self.last_sent_at,
            "last_connected_at": self.last_connected_at,
            "last_received_at": self.last_received_at,
            "peer_version": self.peer_version,
        }


class Transport:
    """This agent's outbound peer links, its fault filters, and their statistics.

    ``peers`` maps node name -> (host, port); an entry for ``node_id`` itself is ignored.
    See the module docstring for the policies; the public methods are:

    * ``await run()`` (``nursery.start``-able): one link task per peer until cancelled.
    * ``send(msg)``: queue a Raft message for ``msg.to``; never blocks.
    * ``set_peers(peers)``: add, remove or re-address links, before or during ``run()``.
    * ``set_faults(rules)`` / ``apply_fault(fault_request)`` / ``faults()``;
      ``accept_incoming(frm)`` / ``incoming_delay(frm)`` for the listener.
    * ``stats()``: counters per peer and in total.
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        peers: Mapping[str, tuple[str, int]],
        *,
        ssl_context: ssl.SSLContext | None = None,
        outbox_size: int = 1024,
        outbox_bytes: int = DEFAULT_OUTBOX_BYTES,
        max_frame: int = DEFAULT_MAX_FRAME,
        rng: random.Random | None = None,
        connect_timeout: float = 2.0,
        send_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.05, 1.0),
        clock: Callable[[], float] = trio.current_time,
        data_id: str | None = None,
    ) -> None:
        if outbox_size < 1 or outbox_bytes < 1:
            raise ValueError("outbox_size and outbox_bytes must be at least 1")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError(f"backoff must be (lo, hi) with 0 < lo <= hi, got {backoff!r}")
        if connect_timeout <= 0 or send_timeout <= 0:
            raise ValueError("connect_timeout and send_timeout must be positive")
        self.node_id = node_id
        self.cluster = cluster
        self._ssl_context = ssl_context
        self._outbox_size = outbox_size
        self._outbox_bytes = outbox_bytes
        self._max_frame = max_frame
        self._rng = rng if rng is not None else random.Random()
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._backoff = (float(backoff[0]), float(backoff[1]))
        self._clock = clock
        # Validates node_id and cluster now, not at the first connection.
        hello = {"type": "hello", "role": "peer", "cluster": cluster, "version": PROTOCOL_VERSION,
                 "node": node_id}
        self._hello_plain = encode(hello)  # for an agent built before data_id (see _connect)
        if data_id is not None:  # which data directory this node runs on (nodeagent/peerids.py)
            hello["data_id"] = data_id
        self._hello = encode(hello)
        self._faults = FaultRules()
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self._dropped_unknown = 0
        self._received_unknown = 0
        self._dropped_incoming_unknown = 0
        self.set_peers(peers)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every link until cancelled; ``task_status.started()`` once they are spawned.
        Connections are closed when it returns. May be run again after it ended."""
        if self._nursery is not None:
            raise RuntimeError("Transport.run() is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for link in self._links.values():
                    self._start_link(link)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _start_link(self, link: _Link) -> None:
        assert self._nursery is not None
        link.scope = trio.CancelScope()
        self._nursery.start_soon(self._link_main, link, name=f"transport link {self.node_id}->{link.name}")

    def set_peers(self, peers: Mapping[str, tuple[str, int]]) -> None:
        """Make the links match ``peers``: start new ones, stop (and forget the outbox and
        counters of) removed ones, and reconnect at once a peer whose address changed
        (its outbox is kept)."""
        wanted: dict[str, tuple[str, int]] = {}
        for name, (host, port) in peers.items():
            if name == self.node_id:
                continue
            port = int(port)
            if not 0 < port < 65536:
                raise ValueError(f"peer {name}: port {port} is out of range")
            wanted[name] = (str(host), port)
        for name in [n for n in self._links if n not in wanted]:
            link = self._links.pop(name)
            link.stop()
            log.info("peer removed", extra=self._fields(link, queued=len(link.outbox)))
        for name, addr in wanted.items():
            link = self._links.get(name)
            if link is None:
                link = self._links[name] = _Link(name, addr)
                log.info("peer added", extra=self._fields(link))
                if self._nursery is not None:
                    self._start_link(link)
            elif link.addr != addr:
                old = link.address
                link.addr = addr
                log.info("peer address changed", extra=self._fields(link, old_addr=old))
                if link.attempt_scope is not None:
                    link.attempt_scope.cancel()

    def peers(self) -> dict[str, tuple[str, int]]:
        return {name: link.addr for name, link in self._links.items()}

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: Any) -> bool:
        """Queue a Raft message (``nodeagent.raft.messages``) for peer ``msg.to``; the
        link's writer task sends it (with whatever else is queued by then).

        Returns False, and counts it, when the peer is unknown (``dropped_unknown`` in the
        totals), the outgoing fault filter drops it (``dropped_fault``), or its frame is
        larger than ``max_frame`` (``dropped_too_large``, logged). Otherwise True; if the
        outbox was full the *oldest* queued frame was evicted (``dropped_full``). An
        invalid message raises ``ProtocolError`` (a bug of the caller).
        """
        link = self._enqueue(msg)
        if link is None:
            return False
        link.notify()
        return True

    def send_batch(self, msgs: Iterable[Any]) -> bool:
        """``send`` each message, then write each peer's queued frames at once where the
        link allows it (``_write_now``), else wake its writer. The driver hands over a
        whole Ready's messages this way. True when every frame went out now (nothing waits
        for a writer task)."""
        touched: list[_Link] = []
        for msg in msgs:
            link = self._enqueue(msg)
            if link is not None and link not in touched:
                touched.append(link)
        done = True
        for link in touched:
            if ((link.direct_sock is not None or link.direct_tls is not None) and not link.busy
                    and not link.partial and not link.flush and not self._faults):
                done = self._write_now(link) and done
            else:
                link.notify()
                done = False
        return done

    def _enqueue(self, msg: Any) -> _Link | None:
        """Filter and encode ``msg`` into its link's outbox (see ``send``); its link, or
        None when it was dropped."""
        to = getattr(msg, "to", None)
        link = self._links.get(to) if isinstance(to, str) else None
        if link is None:
            self._dropped_unknown += 1
            return None
        if link.refused:
            link.counts["dropped_refused"] += 1
            return None
        now = self._clock()
        if self._faults:
            rules = self._rules_at(now)
            if rules.drops(self.node_id, link.name, self._rng, now):
                link.counts["dropped_fault"] += 1
                return None
        try:
            frame = encode({"type": "raft", "group": 0, "msg": msg}, max_frame=self._max_frame)
        except ProtocolError as e:
            if e.code != "frame_too_large":
                raise
            link.counts["dropped_too_large"] += 1
            log.warning("message too large for a frame, dropped", extra=self._fields(link, error=str(e)))
            return None
        link.outbox.append((now, frame))
        link.queued_bytes += len(frame)
        while len(link.outbox) > self._outbox_size or (
            link.queued_bytes > self._outbox_bytes and len(link.outbox) > 1
        ):
            _, old = link.outbox.popleft()
            link.queued_bytes -= len(old)
            link.counts["dropped_full"] += 1
        return link

    def _write_now(self, link: _Link) -> bool:
        """Write a link's queued frames from the caller's task, without the writer task's
        hop (two scheduling passes, a timeout scope and an Event per batch: about a third
        of a follower's trio overhead per write; docs/ARCHITECTURE.md). Never blocks: what
        the kernel does not take now becomes ``link.partial`` (over TLS: stays in the
        stream, ``link.flush``), which the writer sends before anything else. Called only
        while the writer is not inside ``send_all`` and nothing is left from before, so
        frames never interleave. True when the kernel took it all."""
        frames = [frame for _, frame in link.outbox]
        link.outbox.clear()
        link.queued_bytes = 0
        data = b"".join(frames) if len(frames) > 1 else frames[0]
        if link.direct_tls is not None:
            return self._write_now_tls(link, link.direct_tls, frames, data)
        try:
            n = os.write(link.direct_sock.fileno(), data)
        except BlockingIOError:
            n = 0
        except OSError:
            # The connection is broken; the link's reader or writer notices and reconnects.
            link.counts["dropped_error"] += len(frames)
            return True  # nothing left to send
        if n == len(data):
            link.counts["sent"] += len(frames)
            link.counts["batches"] += 1
            link.counts["bytes_sent"] += n
            link.last_sent_at = self._clock()
            return True
        link.counts["sent"] += len(frames) - 1  # the writer counts the unfinished one
        link.counts["bytes_sent"] += n
        link.partial = data[n:]
        link.notify()
        return False

    def _write_now_tls(self, link: _Link, stream: TLSStream, frames: list[bytes], data: bytes) -> bool:
        try:
            done = stream.write_now(data)
        except OSError:  # ssl.SSLError included
            # TLS or the connection is broken; the link's reader or writer notices.
            link.counts["dropped_error"] += len(frames)
            return True
        link.counts["sent"] += len(frames)
        link.counts["batches"] += 1
        link.counts["bytes_sent"] += len(data)
        link.last_sent_at = self._clock()
        if done:
            return True
        link.flush = True  # the writer's send_all sends the rest of the ciphertext
        link.notify()
        return False

    # -- faults --------------------------------------------------------------------------

    def set_faults(self, faults: FaultRules) -> None:
        """Replace the rules this agent enforces (an empty ``FaultRules()`` heals)."""
        if not isinstance(faults, FaultRules):
            raise TypeError(f"set_faults() takes FaultRules, got {type(faults).__name__}")
        self._faults = faults
        log.debug("fault rules set", extra={"node": self.node_id, "rules": faults.to_wire()})
        now = self._clock() if faults else None
        for link in self._links.values():
            if link.outbox and now is not None and faults.partitioned(self.node_id, link.name, now):
                # A partition also cuts what was queued before it (while the peer was down,
                # or delayed by a latency rule): none of it may arrive after the cut.
                link.counts["dropped_fault"] += len(link.outbox)
                link.outbox.clear()
                link.queued_bytes = 0
            link.notify()  # delays are re-evaluated for the queued frames

    def apply_fault(self, msg: Mapping[str, Any]) -> FaultRules:
        """Apply one ``fault`` request (``FaultRules.with_request``) on this transport's
        clock, so ``duration_ms`` expires on the same clock the filters read. Returns the
        rules now in force; raises ValueError on a bad rule."""
        self.set_faults(self.faults().with_request(msg, now=self._clock()))
        return self._faults

    def faults(self) -> FaultRules:
        """The rules in force now (expired ones pruned)."""
        return self._rules_at(self._clock()) if self._faults else self._faults

    def _rules_at(self, now: float) -> FaultRules:
        rules = self._faults
        nxt = rules.next_expiry()
        if nxt is not None and nxt <= now:
            rules = self._faults = rules.active(now)
        return rules

    def peer_reached_us(self, frm: str) -> None:
        """``frm`` connected to our listener, so it is up: if our link to it is waiting
        out a reconnect delay (it was down, say restarting), try now. A restarted agent
        connects to every peer at once, while their links to it back off up to the cap
        (1 s); an election that needs those links (the next failover) waited with them:
        two pre-candidates held their pre-vote answers until a link came back, then
        both stood at once and split the vote (session 10, BENCHMARKS.md)."""
        link = self._links.get(frm)
        if link is not None and link.backing_off and link.attempt_scope is not None:
            link.attempt_scope.cancel()

    def accept_incoming(self, frm: str) -> bool:
        """The listener's filter for each Raft message received from peer ``frm``: False
        (drop it) when a partition rule covers ``frm`` -> this node. Loss and latency are
        the sender's to apply (see the module docstring). Also counts ``received``."""
        link = self._links.get(frm)
        now = self._clock()
        if link is not None:
            link.counts["received"] += 1
            link.last_received_at = now
        else:
            self._received_unknown += 1
        if self.partitioned_from(frm, now):
            if link is not None:
                link.counts["dropped_incoming"] += 1
            else:
                self._dropped_incoming_unknown += 1
            return False
        return True

    def partitioned_from(self, frm: str, now: float | None = None) -> bool:
        """Whether a partition rule covers ``frm`` -> this node now (counts nothing)."""
        if not self._faults:
            return False
        now = self._clock() if now is None else now
        return self._rules_at(now).partitioned(frm, self.node_id, now)

    def incoming_delay(self, frm: str) -> float:
        """Always 0.0: latency is applied once, on the sending side, where per-link order
        is kept (see the module docstring)."""
        return 0.0

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``{"node", "now", "peers": {name: {...}}, "totals": {...}}``; plain values only.

        Per peer: address, connected, the counters (connects, connect_failures, disconnects,
        sent, batches, bytes_sent, dropped_full, dropped_fault, dropped_error,
        dropped_too_large, dropped_refused, received, dropped_incoming), queued, queued_bytes, last_error
        (``"<phase>: <reason>"``, kept after a reconnect; see last_error_at), peer_version,
        and the ``last_*_at`` times on the transport's clock (compare with ``now``). Totals:
        each counter summed, plus peers, connected (how many), queued, queued_bytes,
        dropped_unknown (sends to no known peer), received_unknown.
        """
        peers = {name: link.stats() for name, link in sorted(self._links.items())}
        totals: dict[str, Any] = {
            "peers": len(peers),
            "connected": sum(1 for s in peers.values() if s["connected"]),
        }
        for key in (*_COUNTERS, "queued", "queued_bytes"):
            totals[key] = sum(s[key] for s in peers.values())
        totals["dropped_unknown"] = self._dropped_unknown
        totals["received"] += self._received_unknown
        totals["received_unknown"] = self._received_unknown
        totals["dropped_incoming"] += self._dropped_incoming_unknown
        return {"node": self.node_id, "now": self._clock(), "peers": peers, "totals": totals}

    # -- the link task -------------------------------------------------------------------

    def _fields(self, link: _Link, **more: Any) -> dict[str, Any]:
        return {"node": self.node_id, "peer": link.name, "peer_addr": link.address, **more}

    async def _link_main(self, link: _Link) -> None:
        assert link.scope is not None
        try:
            await self._link_loop(link)
        finally:
            if link.retiring is not None:  # stopped while renewing
                old, link.retiring = link.retiring, None
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(old)

    async def _link_loop(self, link: _Link) -> None:
        assert link.scope is not None
        with link.scope:
            failures = 0
            while True:
                link.attempt_scope = trio.CancelScope()
                with link.attempt_scope:
                    up_for = await self._attempt(link)
                    if up_for is not None and up_for >= self._backoff[1]:
                        failures = 0  # a connection that held resets the back-off
                    failures += 1
                    delay = backoff_delay(failures, *self._backoff, self._rng)
                    fields = self._fields(link, error=link.last_error, attempt=failures, delay_s=round(delay, 3))
                    if up_for is None and failures == 1:  # once per outage, not per retry
                        if link.last_error_code == "data_dir_changed":
                            log.error("refused by a peer: it knew this node on another data "
                                      "directory", extra=fields)
                        else:
                            log.info("peer unreachable", extra=fields)
                    else:
                        log.debug("peer link retrying", extra=fields)
                    link.backing_off = True
                    try:
                        await trio.sleep(delay)
                    finally:
                        link.backing_off = False
                if link.attempt_scope.cancelled_caught:
                    failures = 0  # re-addressed, or the peer reached us: try at once
                    if link.redial_after:  # dropped: let the peer see the end first
                        delay, link.redial_after = link.redial_after, 0.0
                        await trio.sleep(delay)

    async def _attempt(self, link: _Link) -> float | None:
        """One connection: returns how long it was up (None: never got hello_ok). Failures
        are recorded in the link's stats; cancellation passes through."""
        try:
            stream, decoder = await self._connect(link)
        except _LinkFailure as f:
            link.counts["connect_failures"] += 1
            self._record_error(link, f)
            return None
        finally:
            if link.retiring is not None:  # renew_links: the new connection is up, or failed
                old, link.retiring = link.retiring, None
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(old)
        started = self._clock()
        link.connected = True
        if type(stream) is trio.SocketStream:
            link.direct_sock = stream.socket
        elif type(stream) is TLSStream:
            link.direct_tls = stream
        link.counts["connects"] += 1
        link.last_connected_at = started
        log.info("peer connected", extra=self._fields(link, peer_version=link.peer_version,
                                                      queued=len(link.outbox)))
        failure: _LinkFailure | None = None
        try:
            failure = await self._session(link, stream, decoder)
        finally:
            link.connected = False
            link.direct_sock = None
            link.direct_tls = None
            link.partial = b""  # the rest of a frame belongs to this connection only
            link.flush = False
            up_for = self._clock() - started
            if link.renewing:  # closed once the next connection is up (see renew_links)
                link.renewing = False
                link.retiring = stream
            else:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            if failure is not None:
                link.counts["disconnects"] += 1
                self._record_error(link, failure)
                log.info("peer disconnected", extra=self._fields(
                    link, error=failure.text, up_s=round(up_for, 3)))
            else:
                log.debug("peer link closed", extra=self._fields(link, up_s=round(up_for, 3)))
        return up_for

    def _record_error(self, link: _Link, failure: _LinkFailure) -> None:
        link.last_error = failure.text
        link.last_error_code = failure.code
        link.last_error_at = self._clock()

    def set_refused(self, name: str, refused: bool) -> None:
        """Send nothing to ``name`` while ``refused`` (``dropped_refused``): a voter the
        listener refuses (nodeagent/peerids.py) would only be sent heartbeats and, once
        the log is compacted, the whole snapshot again every election timeout."""
        link = self._links.get(name)
        if link is not None:
            link.refused = refused

    def set_ssl_context(self, ctx: ssl.SSLContext | None) -> None:
        """TLS for the links made from now on (a certificate reload); open links keep theirs."""
        self._ssl_context = ctx

    def drop_links(self, redial_after: float = 0.1) -> int:
        """Close every connected link (each connects again after ``redial_after``
        seconds), so each peer's listener sees our link end. A leader that stepped down
        for want of a quorum calls it: peers that still heard it (a leader that could
        send but not receive) then campaign at once (RaftNode.leader_lost) instead of
        after a whole election timeout. Returns how many links were closed."""
        dropped = 0
        for link in self._links.values():
            if link.connected and link.attempt_scope is not None and not link.renewing:
                link.redial_after = redial_after
                link.attempt_scope.cancel()
                dropped += 1
        return dropped

    def renew_links(self, streams: Iterable[Any]) -> list[Any]:
        """Reconnect the links whose open stream is one of ``streams`` with the TLS
        context set now, closing each old connection only once its replacement is up (or
        failed): the peer's listener sees the new link arrive before the old one end, so
        it never takes the end for a crashed leader. Returns the streams taken."""
        wanted = {id(x) for x in streams}
        taken = []
        for link in self._links.values():
            st = link.direct_tls
            if st is not None and id(st) in wanted and link.attempt_scope is not None:
                link.renewing = True
                link.attempt_scope.cancel()
                taken.append(st)
        return taken

    async def _connect(self, link: _Link) -> tuple[trio.abc.Stream, FrameDecoder]:
        host, port = link.addr
        phase = "connect"
        stream: trio.abc.Stream | None = None
        decoder = FrameDecoder(self._max_frame)
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
            if self._ssl_context is not None:
                phase = "tls"
                stream = TLSStream(stream, self._ssl_context, server_hostname=host)
                with trio.fail_after(self._connect_timeout):
                    await stream.do_handshake()
            phase = "hello"
            # Without data_id only right after the peer refused it: every other attempt
            # offers it first (the peer may have been upgraded since).
            plain, link.plain_hello = link.plain_hello, False
            with trio.fail_after(self._connect_timeout):
                await stream.send_all(self._hello_plain if plain else self._hello)
                reply = await self._receive(stream, decoder)
            if reply["type"] == "error":
                if reply["code"] == "bad_field" and "data_id" in reply["message"] and not plain:
                    # An agent built before hello.data_id (its decoder is strict): during a
                    # rolling upgrade, greet it as it expects on the next attempt; it checks
                    # no ids anyway.
                    link.plain_hello = True
                    log.info("peer predates hello.data_id; greeting it without", extra=self._fields(link))
                raise _PeerError(reply["code"], reply["message"])
            if reply["type"] != "hello_ok":
                raise _PeerError("bad_reply", f"expected hello_ok, got {reply['type']}")
            if reply["node"] != link.name:
                raise _PeerError("wrong_node", f"{link.address} is node {reply['node']!r}, expected {link.name!r}")
            link.peer_version = reply["version"]
            return stream, decoder
        except BaseException as exc:
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            if isinstance(exc, _LINK_ERRORS):
                raise _LinkFailure(phase, exc) from exc
            raise

    @staticmethod
    async def _receive(stream: trio.abc.Stream, decoder: FrameDecoder) -> dict[str, Any]:
        """The next message; ``_PeerError("closed")`` at end of stream."""
        while True:
            msg = decoder.next_message()
            if msg is NEED_DATA:
                decoder.receive_data(await stream.receive_some(READ_CHUNK))
            elif msg is CLOSED:
                raise _PeerError("closed", "the peer closed the connection")
            else:
                return msg

    async def _session(self, link: _Link, stream: trio.abc.Stream, decoder: FrameDecoder) -> _LinkFailure | None:
        """Run the writer and the reader until either fails; the first failure ends both."""
        failure: _LinkFailure | None = None

        async def guarded(phase: str, fn: Callable[..., Any]) -> None:
            nonlocal failure
            try:
                await fn(link, stream, decoder)
            except _LINK_ERRORS as exc:
                if failure is None:
                    failure = _LinkFailure(phase, exc)
            finally:
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, "receive", self._reader)
            nursery.start_soon(guarded, "send", self._writer)
        return failure

    async def _reader(self, link: _Link, stream: trio.abc.Stream, decoder: FrameDecoder) -> None:
        """Drain the connection: an ``error`` frame or EOF ends the session. Peers send
        nothing else on our outbound link (they use their own); anything else is ignored."""
        while True:
            msg = await self._receive(stream, decoder)
            if msg["type"] == "error":
                raise _PeerError(msg["code"], msg["message"])
            log.debug("unexpected frame on an outbound link, ignored",
                      extra=self._fields(link, frame_type=msg["type"]))

    async def _writer(self, link: _Link, stream: trio.abc.Stream, decoder: FrameDecoder) -> None:
        while True:
            frames = await self._next_batch(link)
            data = b"".join(frames)
            link.busy = True
            try:
                with trio.fail_after(self._send_timeout):
                    await stream.send_all(data)
            except _LINK_ERRORS:
                link.counts["dropped_error"] += len(frames)
                raise
            finally:
                link.busy = False
            link.counts["sent"] += len(frames)
            link.counts["batches"] += 1
            link.counts["bytes_sent"] += len(data)
            link.last_sent_at = self._clock()

    async def _next_batch(self, link: _Link) -> list[bytes]:
        """Wait until the head of the outbox is due; take every due frame (FIFO, up to
        MAX_BATCH_BYTES, at least one)."""
        while True:
            if link.wake.is_set():
                link.wake = trio.Event()
            if link.partial:  # the rest of a direct write goes first (counted as one frame)
                frames, link.partial = [link.partial], b""
                return frames
            if link.flush:  # the rest of a direct TLS write: send_all(b"") sends it
                link.flush = False
                return []
            timeout = math.inf
            if link.outbox:
                now = self._clock()
                rules = self._rules_at(now) if self._faults else self._faults
                delay = rules.delay(self.node_id, link.name, now) if rules else 0.0
                cutoff = now - delay
                frames: list[bytes] = []
                size = 0
                while link.outbox and link.outbox[0][0] <= cutoff:
                    frame = link.outbox[0][1]
                    if frames and size + len(frame) > MAX_BATCH_BYTES:
                        break
                    link.outbox.popleft()
                    frames.append(frame)
                    size += len(frame)
                if frames:
                    link.queued_bytes -= size
                    return frames
                timeout = link.outbox[0][0] + delay - now
                expiry = rules.next_expiry(now)
                if expiry is not None:
                    timeout = min(timeout, expiry - now)
                timeout = max(timeout, 1e-4)
            with trio.move_on_after(timeout):
                await link.wake.wait()
