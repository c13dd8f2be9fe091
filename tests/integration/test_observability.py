"""What an operator watches: the Prometheus endpoint, the status subscription, JSON logs."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from console.client import AgentConnection
from console.local import LocalCluster
from nodeagent.storage import disk_usage
from nodeagent.statusmap import compact_status

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_subscription_and_logs_on_a_real_cluster(tmp_path):
    lc = LocalCluster(tmp_path, 3, metrics=True)
    lc.start_all()

    async def main():
        async with lc.client() as c:
            leader = await lc.wait_leader(c)
            for i in range(50):
                await c.put(f"k{i}", b"x")
            await lc.wait_converged(c)

            m = await asyncio.to_thread(scrape, lc.metrics_ports[leader])
            assert m["raftdeck_is_leader"] == 1
            assert m["raftdeck_term"] >= 1
            assert m["raftdeck_commit_index"] >= 50
            assert m["raftdeck_apply_lag"] == 0
            assert m["raftdeck_fsync_seconds_count"] >= 1  # fsync on: every batch synced
            assert m["raftdeck_messages_sent_total"] > 0
            assert m['raftdeck_client_request_seconds_count{type="put",ok="true"}'] >= 50
            # TLS is on: the certificate's expiry (5 years from `raftdeck init`) and no reloads.
            assert 4 * 365 * 86400 < m["raftdeck_tls_cert_expiry_timestamp_seconds"] - time.time() \
                < 6 * 365 * 86400
            assert m["raftdeck_tls_reloads_total"] == 0 == m["raftdeck_tls_reload_failures_total"]
            assert m["raftdeck_tls_trusted_cas"] == 1 and m["raftdeck_tls_untrusted_closed_total"] == 0
            assert m["raftdeck_task_reports_resent_total"] == 0
            # The data directory's filesystem, as statvfs sees it (give or take what the
            # tests beside this one wrote or deleted since the agent looked: up to 0.5 s
            # ago), and what the log needs next: one 64 MiB segment.
            free, _ = disk_usage(str(lc.tmp))
            assert 0 < m["raftdeck_disk_free_bytes"] and \
                abs(m["raftdeck_disk_free_bytes"] - free) < 2 << 30, (m["raftdeck_disk_free_bytes"], free)
            assert m["raftdeck_disk_needed_bytes"] >= 64 << 20
            follower = next(n for n in lc.names if n != leader)
            fm = await asyncio.to_thread(scrape, lc.metrics_ports[follower])
            assert fm["raftdeck_is_leader"] == 0 and fm["raftdeck_term"] == m["raftdeck_term"]

            # The subscription pushes a fresh status after a change, no more often than
            # every 100 ms however fast the cluster changes.
            conn = AgentConnection(follower, "127.0.0.1", lc.ports[follower], lc.cluster,
                                   ssl=lc.ssl_context())
            await conn.connect()
            stream = conn.subscribe(interval_ms=10)  # asks for 10 ms; the agent clamps
            first = await asyncio.wait_for(stream.__anext__(), 5)
            stop = asyncio.Event()

            async def writer():
                i = 0
                while not stop.is_set():
                    await c.put(f"w{i}", b"y")
                    i += 1

            w = asyncio.create_task(writer())
            stamps, applied = [], []
            for _ in range(8):
                st = await asyncio.wait_for(stream.__anext__(), 5)
                stamps.append(time.monotonic())
                applied.append(st["applied"])
            stop.set()
            await w
            # The pushes are deltas after the first (the default); the maps they rebuild
            # match what a status request says once the cluster is quiet.
            # (The follower may still be applying the last writes: compare once both
            # views agree on where it is.)
            deadline = time.monotonic() + 20
            while True:
                st = await asyncio.wait_for(stream.__anext__(), 5)
                want = compact_status(await c.call(follower, "status"))
                if (st["applied"], st["digest"]) == (want["applied"], want["digest"]):
                    break
                assert time.monotonic() < deadline, (st["applied"], want["applied"])
            assert set(st) == set(want)
            assert {k: st[k] for k in ("role", "term", "leader", "commit")} == \
                {k: want[k] for k in ("role", "term", "leader", "commit")}
            assert set(st["transport"]["peers"]) == set(want["transport"]["peers"])
            await conn.close()
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            assert min(gaps) >= 0.05, gaps  # 100 ms, with slack for delivery jitter
            assert applied[-1] > first["applied"]
            assert first["node"] == follower and "digest" in first and "progress" in first

    try:
        asyncio.run(main())
    finally:
        lc.stop_all()
    # Logs: one JSON object per line, with the node's name.
    lines = lc.log_path("n1").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and all(r["node"] == "n1" for r in records)
    assert any(r["msg"] == "started" for r in records)
    assert any(r["msg"] == "role change" for r in records)
