"""The agent: wiring only. Start-up order: recover from disk, build the core, start the
peer transport, listen, start the driver, report started. Shutdown is cancellation of
the one nursery that holds every task.

Request handling lives here too, as a thin translation from protocol messages to driver
requests and back; the rules live in the driver, the core and the state machine.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import dataclasses
import hashlib
import os
import secrets
import random
import time
from typing import Any

import msgpack
import trio

from . import security, tlsstream
from . import state as st
from .config import AgentConfig
from .driver import Driver, RequestFailed
from .forward import Forwarder
from .raft.core import Config as RaftConfig
from .raft.core import RaftNode
from .raft.messages import ConfChange, ConfChangeOp, ConfState, Role
from .metrics import serve_metrics
from .statusmap import compact_status, keepalive_s, status_delta
from .peerids import PeerIds
from .storage import DiskStorage, StorageFailed
from .tasks import TaskManager, now_ms, read_report, report_command
from .telemetry import AgentMetrics, TimedStorage
from .tlsstream import TLSStream
from .transport import FaultRules, Transport

log = logging.getLogger("nodeagent.agent")

VERSION = "0.1.0"
# A backup (request ``backup``) is taken once and fetched in chunks of this size; the
# agent keeps it this long after the last chunk was asked for, and at most two at a time.
BACKUP_CHUNK = 1 << 20
BACKUP_KEEP_S = 60.0
BACKUPS_HELD = 2


class Relayed(Exception):
    """A write relayed to the leader; carries the leader's reply."""

    def __init__(self, reply: dict):
        self.reply = reply


def initial_conf(cfg: AgentConfig) -> ConfState:
    members = [cfg.node.as_peer(), *cfg.peers]
    return ConfState.of(
        [m.name for m in members if m.role == "voter"],
        [m.name for m in members if m.role == "learner"],
        {m.name: m.priority for m in members},
    )


def _reports_disk_low(report: bytes) -> bool:
    """A peer's load report (TaskManager.load_report) says its disk is low."""
    return read_report(report).get("disk_low") is True


class ListenError(Exception):
    """The agent could not listen on one of its addresses (in use, not this host's)."""

    def __init__(self, host: str, port: int, cause: OSError):
        self.host, self.port, self.cause = host, port, cause
        super().__init__(f"cannot listen on {host}:{port}: {cause.strerror or cause}")


class Agent:
    def __init__(self, cfg: AgentConfig, *, rng: random.Random | None = None,
                 metrics=None, join: bool = False):
        """``join``: this node was added to a running cluster; with an empty data
        directory it does not bootstrap the inventory's membership as entry 1 (that entry
        would match the cluster's own entry 1 by index and term, and the node would keep
        a membership the others never had), but learns it from the leader's log. It is
        remembered in the data directory (DiskStorage.set_joining) until the log begins,
        so a restart without the flag in between does not bootstrap either."""
        self.cfg = cfg
        self.join = join
        self.node_id = cfg.node.name
        self.cluster_name = cfg.cluster.name
        self.max_frame = cfg.cluster.max_frame_bytes
        self.started_at = time.time()
        self.rng = rng or random.Random()
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.addresses: dict[str, tuple[str, int]] = {p.name: (p.host, p.port) for p in cfg.peers}
        self.storage: DiskStorage | None = None
        self.driver: Driver = None  # type: ignore[assignment]
        self.transport: Transport = None  # type: ignore[assignment]
        self.server = None
        self.forwarder: Forwarder | None = None
        self.tasks: TaskManager = None  # type: ignore[assignment]
        self._request_counts: dict[str, int] = {}
        self.server_ssl = self.client_ssl = None
        # The certificate in use (security.cert_file_facts), and SIGHUP reloads (reload_tls).
        self.tls_cert: dict[str, Any] | None = None
        self.tls_reloads = 0
        self.tls_reload_failures = 0
        self.tls_reload_error: str | None = None
        # The CAs trusted (security.trusted_cas), and the issuer of the certificate each
        # context made so far presents: a reload that drops a CA ends the connections
        # either side of which it issued (_cut_untrusted).
        self.tls_trust: list[dict[str, Any]] = []
        self._ctx_issuer: dict[int, tuple[Any, str]] = {}
        self.tls_cut = 0
        # The data directory's filesystem (DiskStorage.disk), refreshed by housekeeping.
        self.disk: dict[str, Any] | None = None
        self._backups: dict[str, dict[str, Any]] = {}  # id -> a backup being fetched

    # == start-up =============================================================================

    def recover(self) -> None:
        """Open storage and rebuild the core and state machine from it (raises
        StorageCorruption with file and offset on a damaged log)."""
        cfg = self.cfg
        data_dir = os.fspath(cfg.node.data_dir)
        os.makedirs(data_dir, exist_ok=True)
        self.storage = DiskStorage.open(data_dir, fsync=cfg.cluster.fsync)
        persisted = self.storage.recovered()
        self._check_disk()
        state = st.StateMachine()
        if persisted.snapshot is not None:
            state.restore(persisted.snapshot.data)
            # The core keeps its snapshot only to send it to a lagging follower: it holds
            # the file, not a second copy of the state (storage.SnapshotFile).
            persisted = dataclasses.replace(persisted,
                                            snapshot=self.storage.snapshot_file(persisted.snapshot))
        hb = cfg.cluster.heartbeat_interval_ms
        raft_cfg = RaftConfig(
            self.node_id,
            election_tick=max(2, cfg.cluster.election_timeout_ms // hb),
            heartbeat_tick=1,
        )
        if persisted.is_empty():
            if self.join:
                self.storage.set_joining(True)
            elif self.storage.joining():
                self.join = True  # started with --join before, and nothing has come yet
        elif self.storage.joining():
            self.storage.set_joining(False)  # the log has begun: the marker has done its job
        node = RaftNode(raft_cfg, persisted, rng=self.rng,
                        bootstrap=None if self.join else initial_conf(cfg))
        if self.join and persisted.is_empty():
            log.info("joining: waiting for the leader's log", extra={"peers": sorted(self.addresses)})
        self.storage.forget_recovered()  # the core has the entries now
        self.data_id = self.storage.data_id()
        self.peer_ids = PeerIds(self.node_id, self.storage.peer_data_ids())
        self.server_ssl, self.client_ssl, self.tls_cert = self._tls_contexts()
        self._adopt_contexts()
        self.transport = Transport(self.node_id, self.cluster_name, dict(self.addresses),
                                   max_frame=max(self.max_frame, 64 << 20), rng=self.rng,
                                   ssl_context=self.client_ssl, data_id=self.data_id)
        storage = self.storage
        if self.metrics is not None:
            storage = TimedStorage(self.storage, self.metrics.fsync)
        self.driver = Driver(
            node, storage, state, self.transport.send,
            tick_interval=hb / 1000.0,
            snapshot_interval=cfg.cluster.snapshot_interval,
            snapshot_log_percent=cfg.cluster.snapshot_log_percent,
            on_apply_conf=self._on_conf_change,
            metrics=self.metrics,
            sync_in_thread=cfg.cluster.fsync,
            send_batch=self.transport.send_batch,
        )
        self.tasks = TaskManager(self)
        self.driver.on_tick = self.tasks.on_tick
        self.driver.after_apply = self.tasks.reconcile
        self.driver.on_quorum_lost = self._quorum_lost
        node.report = self._load_report()
        if self.metrics is not None:
            self.metrics.bind(self)
        log.info("recovered", extra={
            "term": node.term, "commit": node.log.committed, "last_index": node.log.last_index(),
            "snapshot_index": node.log.snapshot_index(), "fsync": cfg.cluster.fsync})

    def _tls_contexts(self):
        """(server, client) SSL contexts from cluster.tls and the facts of the certificate
        they present, or (None, None, None) when TLS is off. Raises security.TLSError (one
        line) if the files are missing or do not match."""
        tls = self.cfg.cluster.tls
        if tls is None:
            log.warning("TLS is off: anyone who reaches this port may run any command",
                        extra={"tls": False})
            return None, None, None
        tls = tls.for_node(self.node_id)
        problem = security.key_permission_problem(tls.key)
        if problem:
            log.warning("key file permissions", extra={"problem": problem})
        return (security.server_context(tls.ca, tls.cert, tls.key),
                security.peer_client_context(tls.ca, tls.cert, tls.key),
                security.cert_file_facts(tls.cert))

    async def reload_tls(self) -> bool:
        """Read the TLS files again (SIGHUP): connections made from now on use them, those
        open keep theirs. Files that do not load leave the ones in use in place, with the
        reason in the log and in status (``security.cert.reload_error``)."""
        if self.cfg.cluster.tls is None:
            log.warning("TLS is off: nothing to reload")
            return False
        try:
            server_ssl, client_ssl, cert = await trio.to_thread.run_sync(self._tls_contexts)
        except security.TLSError as e:
            self.tls_reload_error = str(e)
            self.tls_reload_failures += 1
            log.error("TLS reload failed; still using the certificate loaded before",
                      extra={"error": str(e), "sha256": (self.tls_cert or {}).get("sha256")})
            return False
        self.server_ssl, self.client_ssl, self.tls_cert = server_ssl, client_ssl, cert
        self._adopt_contexts()
        if self.server is not None:
            self.server.ssl_context = server_ssl
        self.transport.set_ssl_context(client_ssl)
        self.tls_reloads += 1
        self.tls_reload_error = None
        log.info("TLS files reloaded", extra={"reloads": self.tls_reloads, **cert,
                                              "trusted_cas": [c["subject"] for c in self.tls_trust]})
        self._cut_untrusted()
        return True

    def _adopt_contexts(self) -> None:
        if self.server_ssl is None:
            return
        self.tls_trust = security.trusted_cas(self.server_ssl)
        issuer = (self.tls_cert or {}).get("issuer", "")
        for ctx in (self.server_ssl, self.client_ssl):
            self._ctx_issuer[id(ctx)] = (ctx, issuer)  # the context too: its id stays unique

    def _cut_untrusted(self) -> int:
        """End the open connections on which either certificate was issued by a CA the
        files no longer list (the last step of replacing the CA): they were verified
        against the old trust, and would otherwise live on with it. The links reconnect at
        once with the new files. Returns how many were cut."""
        trusted = {c["subject"] for c in self.tls_trust}
        contexts = [ctx for ctx, _ in self._ctx_issuer.values()]
        cut, stale = [], []
        for stream in tlsstream.open_streams(contexts):
            ours = self._ctx_issuer[id(stream.context)][1]
            peer = stream.getpeercert() or {}
            theirs = security.dn_text(peer.get("issuer", ()))
            if (ours and ours not in trusted) or (theirs and theirs not in trusted):
                cut.append({"ours": ours, "theirs": theirs})
                stale.append(stream)
        # Our links to peers reconnect before the old connection closes; the rest (the
        # listener's connections, the relay) end now and their other side reconnects.
        renewed = {id(x) for x in self.transport.renew_links(stale)}
        for stream in stale:
            if id(stream) not in renewed:
                stream.cut()
        if cut:
            self.tls_cut += len(cut)
            log.warning("connections made with a CA no longer trusted were closed",
                        extra={"closed": len(cut), "issuers": sorted({i for c in cut for i in c.values()
                                                                      if i not in trusted})})
        return len(cut)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .server import Server

        if self.driver is None:
            self.recover()
        c = self.cfg.cluster
        audit = security.AuditLog(os.path.join(os.fspath(self.cfg.node.data_dir), "audit.log"),
                                  self.node_id)
        self.server = Server(self, hello_timeout=c.handshake_timeout_ms / 1000.0,
                             ssl_context=self.server_ssl, max_connections=c.max_connections,
                             idle_timeout=c.idle_timeout_ms / 1000.0,
                             requests_per_s=c.client_requests_per_s, audit=audit)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.transport.run)
                await self._listen(nursery, self.server.serve, self.cfg.node.port)
                await nursery.start(self.tasks.run)
                await nursery.start(self.driver.run)
                self.forwarder = Forwarder(self, nursery)
                nursery.start_soon(self._housekeeping)
                if self.metrics is not None and self.cfg.node.metrics_port is not None:
                    await self._listen(nursery, serve_metrics, self.cfg.node.metrics_port,
                                       self.metrics.registry)
                log.info("started", extra={"host": self.cfg.node.host, "port": self.server.port,
                                           "pid": os.getpid()})
                task_status.started(self.server.port)
        finally:
            if self.storage is not None:
                with trio.CancelScope(shield=True):
                    self.storage.close()

    async def _listen(self, nursery, serve, port: int, *first) -> None:
        """Start a listener; a port that cannot be bound raises ``ListenError``, so the
        command line names the address and no other OS error is taken for it."""
        try:
            await nursery.start(serve, *first, self.cfg.node.host, port)
        except (OSError, BaseExceptionGroup) as exc:
            # A listener with a nursery of its own hands its bind error up in a group.
            err = exc
            while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
                err = err.exceptions[0]
            if not isinstance(err, OSError):
                raise
            raise ListenError(self.cfg.node.host, port, err) from exc

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(0.5)
            self._check_disk()
            self.driver.node.report = self._load_report()
            self._check_unfit()

    def _quorum_lost(self) -> None:
        """This node stopped leading: no quorum answered it for an election timeout. If it
        can still send (it only hears nobody), the others still take it for their leader
        and would wait out their own election timeout; ending our links tells them now."""
        dropped = self.transport.drop_links()
        log.warning("stepped down: no quorum answered; links to the peers closed so they "
                    "elect a leader now", extra={"term": self.driver.node.term, "links": dropped})

    def disk_low(self) -> bool:
        """Whether this node's disk is about to fill (status ``disk.low``)."""
        return bool(self.disk and self.disk.get("low"))

    def _check_unfit(self) -> None:
        """Tell the core which voters should not lead (RaftNode.unfit): this node while
        its disk is low, and on the leader every peer whose latest load report says the
        same. A leader whose disk turns low so hands leadership to a fit voter before its
        disk fills and it stops (a planned handover instead of a failover), and leader
        priority does not hand leadership back until the disk has room again."""
        node = self.driver.node
        unfit = {self.node_id} if self.disk_low() else set()
        if node.role is Role.LEADER:
            for peer, pr in node.prs.items():
                if peer != self.node_id and pr.report and _reports_disk_low(pr.report):
                    unfit.add(peer)
        if unfit != node.unfit:
            log.info("nodes unfit to lead (disk space low)", extra={
                "unfit": sorted(unfit), "was": sorted(node.unfit), "role": node.role.value})
            node.unfit = frozenset(unfit)

    def _check_disk(self) -> None:
        """Refresh ``self.disk`` (status ``disk``); log when free space turns low or
        recovers, once each way."""
        try:
            disk = self.storage.disk()
        except OSError as exc:
            disk = {"error": exc.strerror or str(exc)}
        was_low = bool(self.disk and self.disk.get("low"))
        if disk.get("low") and not was_low:
            log.warning("disk space low", extra={
                "data_dir": str(self.cfg.node.data_dir), "free_mib": disk["free_bytes"] >> 20,
                "needs_mib": disk["needs_bytes"] >> 20})
        elif was_low and disk.get("low") is False:
            log.info("disk space recovered", extra={"free_mib": disk["free_bytes"] >> 20})
        self.disk = disk

    def _load_report(self) -> bytes:
        return self.tasks.load_report()

    def _on_conf_change(self, cc: ConfChange) -> None:
        if cc.op is ConfChangeOp.REMOVE:
            self.addresses.pop(cc.node, None)
            self.peer_ids.refused.pop(cc.node, None)  # no longer a voter: nothing to refuse
            self.transport.set_refused(cc.node, False)
        elif cc.op in (ConfChangeOp.ADD_LEARNER, ConfChangeOp.ADD_VOTER) and cc.context:
            host, _, port = cc.context.rpartition(":")
            if cc.node != self.node_id and host and port.isdigit():
                self.addresses[cc.node] = (host, int(port))
        else:
            return
        self.transport.set_peers({n: a for n, a in self.addresses.items() if n != self.node_id})

    def admit_peer(self, node: str, data_id: str | None) -> str | None:
        """None if ``node``'s link, which came with ``data_id``, may be used; else why not
        (a voter back on another data directory: nodeagent/peerids.py)."""
        first = node not in self.peer_ids.refused
        verdict = self.peer_ids.admit(node, data_id, voter=node in self.driver.node.conf.voters)
        if verdict.record:
            # Durable before the link is used: after a crash this node must still know it.
            try:
                self.storage.set_peer_data_ids(self.peer_ids.known_with(node, data_id))
            except StorageFailed as e:  # the driver's next write stops the agent (exit 3)
                return f"{self.node_id} cannot write its data directory: {e}"
            self.peer_ids.recorded(node, data_id)
        self.transport.set_refused(node, not verdict.ok)  # refused both ways
        if verdict.ok:
            return None
        if first:
            log.error("peer refused: a voter came back with another data directory", extra={
                "peer": node, **self.peer_ids.refused[node], "reason": verdict.message})
        return verdict.message

    # == requests ===============================================================================

    def observe_request(self, kind: str, seconds: float, ok: bool) -> None:
        self._request_counts[kind] = self._request_counts.get(kind, 0) + 1
        if self.metrics is not None:
            self.metrics.observe_request(kind, seconds, ok)

    async def handle_request(self, session, msg: dict) -> tuple[Any, str | None]:
        """Answer one client request: (result, leader hint) or raise RequestFailed."""
        t = msg["type"]
        handler = getattr(self, f"_rq_{t}", None)
        if handler is None:
            raise RequestFailed("rejected", f"{t} is not supported by this agent")
        try:
            return await handler(session, msg)
        except Relayed as r:
            reply = r.reply
            if not reply["ok"]:
                err = reply.get("error") or {"code": "rejected", "message": ""}
                raise RequestFailed(err["code"], err["message"], reply.get("leader")) from None
            return reply.get("result"), reply.get("leader") or self.driver.node.lead

    async def _wait(self, kind: str, *args, timeout: float | None = None):
        pending = self.driver.submit(kind, *args)
        return await pending.wait(timeout or self.server.request_timeout)

    async def wrap_client_stream(self, stream, host: str):
        """TLS for outgoing client connections (the relay): this node's certificate; the
        caller's deadline covers the handshake."""
        if self.client_ssl is None:
            return stream
        tls = TLSStream(stream, self.client_ssl, server_hostname=host)
        await tls.do_handshake()
        return tls

    # Writes. The server answers put/delete/cas without a task per request
    # (Server._write_now: ``begin_write``, then ``write_reply`` from the driver's
    # callback); the handlers below take the same steps for every other path.

    def begin_write(self, msg: dict, on_done=None):
        """Propose ``msg`` (put, delete or cas: the request carries its command's fields)
        to the driver; its Pending. Raises RequestFailed if the command does not encode."""
        spec = st.OPS[msg["type"]]
        fields = {f: msg[f] for f in (*spec.required, *spec.optional) if f in msg}
        return self._propose(msg["type"], msg, msg["seq"], on_done, **fields)

    def _propose(self, op: str, msg: dict, seq: int, on_done=None, **fields):
        try:
            data, cmd = st.encode_command_for(op, client=msg["client_id"], seq=seq, **fields)
        except st.CommandError as e:
            raise RequestFailed("rejected", str(e)) from None
        if cmd is not None and self.driver.node.role is Role.LEADER:
            self.driver.state.remember(data, cmd)  # its apply here need not decode it
        return self.driver.submit("propose", data, on_done=on_done)

    @staticmethod
    def _applied(pending) -> tuple[int, Any]:
        """(index, ApplyResult) of a finished write; RequestFailed if it failed or the
        state machine refused it."""
        index, result = pending.outcome()
        if result.error:
            raise RequestFailed(result.error, result.detail or result.error)
        return index, result

    @classmethod
    def write_reply(cls, msg: dict, pending) -> dict:
        """The ``result`` of a finished put, delete or cas; raises RequestFailed."""
        index, result = cls._applied(pending)
        if msg["type"] == "cas":
            now = msg["value"] if result.ok else result.value
            return {"swapped": bool(result.ok), "value": now, "index": index}
        return {"index": index}

    async def _settle(self, msg: dict, pending):
        """Wait for a proposal; a follower asked to (``forward``) relays it to the leader."""
        try:
            await pending.wait(self.server.request_timeout)
        except RequestFailed as e:
            leader = e.leader
            if e.code != "not_leader" or not msg.get("forward") or leader is None \
                    or leader == self.node_id or leader not in self.addresses:
                raise
            raise Relayed(await self.forwarder.forward(leader, msg)) from None
        return pending

    async def _write(self, op: str, msg: dict, seq: int | None = None, **fields):
        pending = self._propose(op, msg, seq or msg["seq"], **fields)
        return self._applied(await self._settle(msg, pending))

    async def _rq_put(self, session, msg):
        return self.write_reply(msg, await self._settle(msg, self.begin_write(msg))), None

    _rq_delete = _rq_cas = _rq_put

    async def _rq_register(self, session, msg):
        index, _ = await self._write("noop", msg, seq=1)
        return {"index": index}, None

    async def _rq_get(self, session, msg):
        if msg.get("consistency", "linearizable") == "stale":
            return self.driver.state.get(msg["key"]), None
        return await self._wait("read", msg["key"]), None

    async def _rq_status(self, session, msg):
        return self.status(), None

    async def _rq_whoami(self, session, msg):
        ident = session.identity
        return {"kind": ident.kind, "name": ident.name, "role": ident.role,
                "tls": self.server_ssl is not None, "node": self.node_id}, None

    async def _rq_subscribe(self, session, msg):
        interval = max(0.1, msg["interval_ms"] / 1000.0)
        rid = msg["id"]
        deltas = msg.get("delta", False)

        async def pusher() -> None:
            last_version = -1
            pushed: dict | None = None  # the map the client holds (deltas only)
            while True:
                driver = self.driver
                if driver.version != last_version:
                    last_version = driver.version
                    st = self.status(compact=True)
                    if deltas and pushed is not None:
                        out = {"type": "status_update", "id": rid, "delta": True,
                               "status": status_delta(pushed, st)}
                    else:
                        out = {"type": "status_update", "id": rid, "status": st}
                    await session.conn.send(out)
                    if deltas:
                        # A private copy: parts of a status map may be live objects that
                        # change in place, and the next delta must compare against what
                        # the client really holds.
                        pushed = msgpack.unpackb(msgpack.packb(st), raw=False)
                await trio.sleep(interval)
                if driver.version == last_version:
                    # Nothing changed: wait for a change, but still push now and then so a
                    # client sees the agent is alive.
                    with trio.move_on_after(keepalive_s(interval)):
                        await driver.changed.wait()
                    last_version = -1 if driver.version == last_version else last_version

        session.subscribe(pusher)
        return None, None

    async def _rq_unsubscribe(self, session, msg):
        session.unsubscribe()
        return None, None

    async def _rq_backup(self, session, msg):
        """This replica's whole state at its applied index (every key, task and client
        session, and the membership), for `raftdeck backup`: taken at the first request
        (no ``backup`` id) and then handed out ``BACKUP_CHUNK`` bytes at a time. With
        ``consistency: linearizable`` (the default) it is taken after a read barrier, so
        it holds every write acknowledged before the request, even on a follower; a
        deposed leader answers ``not_leader``. ``stale``: what this replica has applied
        (the only way when no quorum is left)."""
        now = time.monotonic()
        for k in [k for k, b in self._backups.items() if now - b["used"] > BACKUP_KEEP_S]:
            del self._backups[k]
        bid = msg.get("backup")
        if bid is None:
            if len(self._backups) >= BACKUPS_HELD:
                raise RequestFailed("busy", f"{len(self._backups)} backups are being fetched "
                                            f"from {self.node_id}; retry in a minute")
            if msg.get("consistency", "linearizable") == "linearizable":
                await self._wait("read", None)  # every acknowledged write applied here
            b = await self._take_backup()
            bid = secrets.token_hex(8)
            self._backups[bid] = b
        else:
            b = self._backups.get(bid)
            if b is None:
                raise RequestFailed("rejected", f"no backup {bid} on {self.node_id}: it was "
                                                "dropped once its final chunk was served or "
                                                f"{BACKUP_KEEP_S:g} s after the last request for "
                                                "it, or the agent restarted; start again")
        b["used"] = now
        off = msg.get("offset", 0)
        data = b["data"]
        chunk = data[off:off + BACKUP_CHUNK]
        if off + len(chunk) >= len(data):
            self._backups.pop(bid, None)  # the last chunk: done with it
        return {"backup": bid, "offset": off, "data": chunk,
                **{k: v for k, v in b.items() if k not in ("data", "used")}}, None

    async def _take_backup(self) -> dict[str, Any]:
        state, node = self.driver.state, self.driver.node
        view = state.snapshot_view()  # cheap here; serialized in a worker thread
        try:
            index = view.applied_index
            term = node.log.term(index) if index else 0
            data = await trio.to_thread.run_sync(st.serialize_view, view)
        finally:
            state.release_view(view)
        log.info("backup taken", extra={"index": index, "term": term, "bytes": len(data)})
        return {"node": self.node_id, "cluster": self.cluster_name, "index": index,
                "term": term or 0, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "taken_at_ms": int(time.time() * 1000), "data": data}

    async def _rq_transfer(self, session, msg):
        await self._wait("transfer", msg["to"])
        return None, None

    async def _rq_add_node(self, session, msg):
        op = ConfChangeOp.ADD_LEARNER if msg["learner"] else ConfChangeOp.ADD_VOTER
        cc = ConfChange(op, msg["node"], msg["priority"], context=f"{msg['host']}:{msg['port']}")
        index, result = await self._wait("conf_change", cc)
        return {"index": index}, None

    async def _rq_remove_node(self, session, msg):
        index, result = await self._wait("conf_change", ConfChange(ConfChangeOp.REMOVE, msg["node"]))
        return {"index": index}, None

    async def _rq_fault(self, session, msg):
        self.transport.apply_fault(msg)
        log.warning("fault injected", extra={"action": msg["action"], "from": msg.get("from"),
                                             "to": msg.get("to"), "ms": msg.get("ms"),
                                             "rate": msg.get("rate")})
        return None, None

    async def _rq_heal(self, session, msg):
        self.transport.set_faults(FaultRules())
        log.warning("faults healed")
        return None, None

    # -- tasks --

    async def propose_report(self, report: dict) -> None:
        """Get a task report committed: directly on the leader, else relayed to it."""
        node = self.driver.node
        if node.role is Role.LEADER:
            _, result = await self._wait("propose", report_command(report))
            if result.error:
                raise RequestFailed(result.error, result.detail or result.error)
            return
        leader = node.lead
        if leader is None or leader not in self.addresses:
            raise RequestFailed("not_leader", "no leader known", None)
        reply = await self.forwarder.forward(leader, {"type": "task_report", "id": 0, **report})
        if not reply["ok"]:
            err = reply.get("error") or {"code": "rejected", "message": ""}
            raise RequestFailed(err["code"], err["message"], reply.get("leader"))

    async def _rq_task_report(self, session, msg):
        report = {k: msg[k] for k in ("event", "task", "attempt", "node", "outcome", "exit_code",
                                      "stdout", "stderr", "error", "ts") if k in msg}
        _, result = await self._wait("propose", report_command(report))
        if result.error:
            raise RequestFailed(result.error, result.detail or result.error)
        return None, None

    async def _rq_submit(self, session, msg):
        specs = []
        for i, t in enumerate(msg["tasks"]):
            spec = dict(t)
            spec.setdefault("max_attempts", self.cfg.cluster.max_attempts)
            try:
                specs.append(st.check_task_spec(spec))
            except st.CommandError as e:
                raise RequestFailed("bad_task", f"tasks[{i}]: {e}") from None
        if self.driver.node.role is Role.LEADER and not self.tasks.any_shell():
            shell = [i for i, t in enumerate(specs) if t["kind"] == "shell"]
            if shell:
                raise RequestFailed("rejected", f"tasks[{shell[0]}]: shell tasks are disabled on "
                                                "every node (allow_shell: false in the inventory)")
        index, result = await self._write("submit_tasks", msg, tasks=specs, ts=now_ms())
        per = [{"ok": r["ok"], "error": r["error"], "detail": r["detail"]} for r in (result.value or [])]
        return {"index": index, "results": per}, None

    async def _rq_dump(self, session, msg):
        state = self.driver.state
        prefix, after = msg.get("prefix", ""), msg.get("after")
        keys = state.keys()  # sorted
        start = bisect.bisect_left(keys, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(keys, after))
        kv, size, truncated = {}, 0, False
        for key in itertools.islice(keys, start, None):
            if not key.startswith(prefix):
                break
            value = state.get(key)
            size += len(key) + len(value) + 8
            if len(kv) >= msg.get("limit", 20_000) or size > 3 << 20:
                truncated = True
                break
            kv[key] = value
        return {"applied": state.applied_index, "kv": kv, "truncated": truncated}, None

    async def _rq_task_get(self, session, msg):
        return self.driver.state.task(msg["task"]), None

    async def _rq_task_list(self, session, msg):
        try:
            return self.driver.state.list_tasks(state=msg.get("state"), node=msg.get("node"),
                                                limit=msg.get("limit", 100),
                                                after_id=msg.get("after")), None
        except KeyError:
            raise RequestFailed("rejected", f"unknown task {msg.get('after')!r} in 'after'") from None

    async def _rq_task_wait(self, session, msg):
        deadline = trio.current_time() + msg["timeout_ms"] / 1000.0
        while True:
            state = self.driver.state
            records = [state.task(i) for i in msg["ids"]]
            done = all(r is not None and r["state"] in ("succeeded", "failed", "timed_out",
                                                        "cancelled") for r in records)
            if done or trio.current_time() >= deadline:
                return {"done": done, "tasks": records}, None
            with trio.move_on_at(deadline):
                await self.driver.changed.wait()

    async def _rq_task_cancel(self, session, msg):
        index, result = await self._write("cancel_task", msg, id=msg["task"], ts=now_ms())
        return result.value, None

    # == status ===================================================================================

    def status(self, compact: bool = False) -> dict[str, Any]:
        """The status map (docs/OPERATIONS.md). ``compact`` is what subscriptions push
        several times a second to every console: per-peer transport counters cut to what
        the console shows (connected, sent, dropped, the error of a down link), and the
        leader's per-node load table and raw load reports left out. Those grow with the
        cluster and dominated the console's decoding cost; a ``status`` request still
        returns everything."""
        full = self._status()
        return compact_status(full) if compact else full

    def _status(self) -> dict[str, Any]:
        s = self.driver.status()
        storage = self.storage.stats() if self.storage is not None else {}
        s.update({
            "node": self.node_id,
            "cluster": self.cluster_name,
            "address": f"{self.cfg.node.host}:{self.cfg.node.port}",
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 1),
            "capacity": self.cfg.node.capacity,
            "load": msgpack.unpackb(self.driver.node.report, raw=False),
            "faults": self.transport.faults().to_wire_list(),
            "data_id": self.data_id,
            "refused_peers": {n: dict(r) for n, r in sorted(self.peer_ids.refused.items())},
            "transport": self.transport.stats(),
            "storage": {k: v for k, v in storage.items() if k in (
                "fsync", "segments", "bytes", "first_index", "last_index", "snapshot_index",
                "syncs", "fsyncs", "fsync_latency_ms_sum", "fsync_latency_ms_max", "repaired",
                "reserved_segments", "reservations_skipped")},
            "disk": self.disk,
            "connections": self.server.connections if self.server else 0,
            "security": {**(self.server.stats() if self.server else {"tls": self.server_ssl is not None}),
                         "cert": None if self.tls_cert is None else {
                             **self.tls_cert, "reloads": self.tls_reloads,
                             "reload_failures": self.tls_reload_failures,
                             "reload_error": self.tls_reload_error},
                         "ca": self.tls_trust, "untrusted_closed": self.tls_cut},
            "requests": dict(self._request_counts),
            "tasks": {"counts": self.driver.state.task_counts(),
                      "executor": {k: v for k, v in self.tasks.executor.stats().items()
                                   if k != "running_tasks"},
                      "assigned_total": self.tasks.assigned_total,
                      "loads": self.tasks.loads.snapshot(time.monotonic(), self.tasks.lease),
                      "expired_total": self.tasks.expired_total,
                      "reports_lost": self.tasks.reports_lost,
                      "reports_resent": self.tasks.reports_resent,
                      "retention": self.tasks.retention},
        })
        return s
