"""The agent's Prometheus metrics: what they are and where each value comes from.

Values the driver already keeps (indexes, message totals) are read at scrape time, so the
hot path pays nothing; latencies are observed into histograms where they happen.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .metrics import (
    FSYNC_BUCKETS,
    REQUEST_BUCKETS,
    CallbackCounter,
    Gauge,
    Histogram,
    Registry,
)

if TYPE_CHECKING:
    from .agent import Agent


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = r = Registry()
        self.fsync = Histogram("raftdeck_fsync_seconds", "Time of one group commit (fsync) of the log",
                               buckets=FSYNC_BUCKETS, registry=r)
        self.commit = Histogram("raftdeck_commit_seconds",
                                "From proposal on the leader to applied there",
                                buckets=REQUEST_BUCKETS, registry=r)
        self.requests = Histogram("raftdeck_client_request_seconds",
                                  "Client request latency by type and outcome",
                                  ("type", "ok"), buckets=REQUEST_BUCKETS, registry=r)
        self._request_children: dict[tuple[str, bool], Any] = {}

    def bind(self, agent: "Agent") -> None:
        r = self.registry
        d = agent.driver

        def gauge(name: str, doc: str, fn) -> None:
            Gauge(name, doc, registry=r).set_function(fn)

        gauge("raftdeck_term", "Current Raft term", lambda: d.node.term)
        gauge("raftdeck_is_leader", "1 if this node is the leader", lambda: float(d.node.role.value == "leader"))
        gauge("raftdeck_commit_index", "Highest log index known committed", lambda: d.node.log.committed)
        gauge("raftdeck_applied_index", "Highest log index applied", lambda: d.state.applied_index)
        gauge("raftdeck_apply_lag", "Committed but not yet applied entries",
              lambda: d.node.log.committed - d.state.applied_index)
        gauge("raftdeck_last_index", "Last log index", lambda: d.node.log.last_index())
        gauge("raftdeck_snapshot_index", "Index of the newest snapshot", lambda: d.node.log.snapshot_index())
        CallbackCounter("raftdeck_messages_sent_total", "Raft messages handed to the transport",
                        lambda: d.messages_out, registry=r)
        CallbackCounter("raftdeck_messages_received_total", "Raft messages stepped into the core",
                        lambda: d.messages_in, registry=r)
        CallbackCounter("raftdeck_inbox_dropped_total", "Raft messages dropped: driver inbox full",
                        lambda: d.dropped_inbox, registry=r)
        gauge("raftdeck_disk_free_bytes",
              "Free space on the data directory's filesystem (refreshed twice a second)",
              lambda: float((agent.disk or {}).get("free_bytes", 0)))
        gauge("raftdeck_disk_needed_bytes",
              "Room the log needs next: a new WAL segment and a snapshot beside the newest",
              lambda: float((agent.disk or {}).get("needs_bytes", 0)))
        tm = agent.tasks
        CallbackCounter("raftdeck_task_reports_lost_total",
                        "Task reports dropped at a full report queue (sent again later)",
                        lambda: tm.reports_lost, registry=r)
        CallbackCounter("raftdeck_task_reports_resent_total",
                        "Task reports sent again for attempts still open in the table",
                        lambda: tm.reports_resent, registry=r)
        if agent.tls_cert is not None:
            gauge("raftdeck_tls_cert_expiry_timestamp_seconds",
                  "When the certificate this agent presents expires (Unix time; 0 if unknown)",
                  lambda: float((agent.tls_cert or {}).get("not_after_unix", 0)))
            CallbackCounter("raftdeck_tls_reloads_total", "TLS files reloaded (SIGHUP)",
                            lambda: agent.tls_reloads, registry=r)
            CallbackCounter("raftdeck_tls_reload_failures_total",
                            "SIGHUP reloads refused (the old certificate stays in use)",
                            lambda: agent.tls_reload_failures, registry=r)
            gauge("raftdeck_tls_trusted_cas",
                  "CAs this agent trusts (2 while the CA is being replaced)",
                  lambda: float(len(agent.tls_trust)))
            CallbackCounter("raftdeck_tls_untrusted_closed_total",
                            "Connections ended because a reload stopped trusting their CA",
                            lambda: agent.tls_cut, registry=r)

    # hooks called by the driver and the server
    def observe_commit(self, seconds: float) -> None:
        self.commit.observe(seconds)

    def observe_request(self, kind: str, seconds: float, ok: bool) -> None:
        # Every write on the leader passes here: the labelled child is looked up once per
        # (type, outcome), not rebuilt from its label strings each time.
        child = self._request_children.get((kind, ok))
        if child is None:
            child = self.requests.labels(type=kind, ok="true" if ok else "false")
            self._request_children[(kind, ok)] = child
        child.observe(seconds)


class TimedStorage:
    """Storage as process_ready sees it, with each fsync timed into the histogram."""

    def __init__(self, storage, histogram: Histogram):
        self._s = storage
        self._h = histogram

    def save(self, hard_state, entries, snapshot) -> None:
        self._s.save(hard_state, entries, snapshot)

    def sync(self) -> None:
        t0 = time.perf_counter()
        self._s.sync()
        self._h.observe(time.perf_counter() - t0)

    def compact(self, snapshot) -> None:
        self._s.compact(snapshot)

    def write_snapshot_file(self, snapshot) -> bool:
        return self._s.write_snapshot_file(snapshot)

    def finish_compact(self, snapshot, *, delete: bool = True) -> bool:
        return self._s.finish_compact(snapshot, delete=delete)

    def delete_purged(self) -> int:
        return self._s.delete_purged()

    def discard_snapshot_file(self, snapshot) -> None:
        self._s.discard_snapshot_file(snapshot)

    def snapshot_file(self, snapshot):
        return self._s.snapshot_file(snapshot)

    def stats(self) -> dict:
        return self._s.stats()
