"""Certificate rotation without a restart (real agents, mutual TLS): SIGHUP makes an agent
read its TLS files again. Connections made afterwards present the new certificate, both
on its port and on its own links to peers; files that do not load leave the certificate
in use in place, with the reason in the log and in status, and the agent running."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import ssl
import time

import pytest

from console.local import LocalCluster
from nodeagent.security import init_tls

from .helpers import ctx_for, log_records, tls_paths_for_node, tls_paths_for_role, wait_for_log

pytestmark = pytest.mark.integration


def served_sha256(lc: LocalCluster, name: str) -> str:
    """The fingerprint of the certificate ``name`` presents to a new connection."""
    ctx = ctx_for(*tls_paths_for_role(lc.tls_dir, "admin"))
    with socket.create_connection(("127.0.0.1", lc.ports[name]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


def file_sha256(path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).hexdigest()


async def wait_cert(lc: LocalCluster, c, name: str, pred, what: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        cert = (await c.call(name, "status"))["security"]["cert"]
        if pred(cert):
            return cert
        assert time.monotonic() < deadline, f"{what}: {cert}"
        await asyncio.sleep(0.1)


def test_sighup_rotates_a_node_certificate_and_keeps_a_bad_one_out(tmp_path):
    lc = LocalCluster(tmp_path, 3)
    try:
        lc.start_all()

        async def main():
            async with lc.client() as c:
                await lc.wait_leader(c, timeout=60)
                _, crt, key = tls_paths_for_node(lc.tls_dir, "n1")
                old = file_sha256(crt)
                assert served_sha256(lc, "n1") == old
                st = await wait_cert(lc, c, "n1", lambda x: x is not None, "no certificate")
                assert st["sha256"] == old and st["reloads"] == 0 and st["reload_error"] is None
                assert st["not_after"] > "2030"

                # A new certificate for n1 from the same CA (as `raftdeck init` issues one
                # whose files were removed), then SIGHUP.
                os.rename(crt, crt.with_suffix(".old"))
                os.rename(key, key.with_suffix(".oldkey"))
                init_tls(lc.tls_dir, lc.cluster, [("n1", "127.0.0.1")])
                new = file_sha256(crt)
                assert new != old
                lc.signal("n1", signal.SIGHUP)
                st = await wait_cert(lc, c, "n1", lambda x: x["reloads"] == 1, "no reload")
                assert st["sha256"] == new and st["reload_error"] is None
                assert served_sha256(lc, "n1") == new
                await wait_for_log(lc.log_path("n1"), lambda r: r.get("msg") == "TLS files reloaded"
                                   and r.get("sha256") == new, what="the reload's log line")

                # n2 restarts: its link to n1 sees n1's new certificate, and n1's new link
                # to n2 presents it (n2 logs the fingerprint each peer presents).
                lc.kill("n2")
                lc.start("n2")
                await wait_for_log(lc.log_path("n2"), lambda r: r.get("msg") == "peer connected"
                                   and r.get("peer") == "n1" and r.get("cert_sha256") == new,
                                   timeout=30, what="n1's link presenting its new certificate")
                await c.put("after-rotation", b"ok")
                await lc.wait_converged(c, timeout=60)

                # Files that do not load: the agent keeps the certificate it has.
                crt.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                               "-----END CERTIFICATE-----\n")
                lc.signal("n1", signal.SIGHUP)
                st = await wait_cert(lc, c, "n1", lambda x: x["reload_error"] is not None,
                                     "the bad files were not refused")
                assert str(crt) in st["reload_error"], st
                assert st["sha256"] == new and st["reloads"] == 1
                assert lc.alive("n1")
                assert served_sha256(lc, "n1") == new
                await c.put("after-a-bad-reload", b"ok")
                rec = await wait_for_log(lc.log_path("n1"),
                                         lambda r: r.get("msg", "").startswith("TLS reload failed"),
                                         what="the failed reload's log line")
                assert "not base64" not in str(rec)
                assert not any("BEGIN" in str(r) for r in log_records(lc.log_path("n1")))

        asyncio.run(main())
    finally:
        lc.stop_all()


def test_sighup_without_tls_changes_nothing_and_the_agent_keeps_running(tmp_path):
    lc = LocalCluster(tmp_path, 1, tls=False)
    try:
        lc.start_all()

        async def main():
            async with lc.client() as c:
                await lc.wait_leader(c, timeout=60)
                lc.signal("n1", signal.SIGHUP)
                await wait_for_log(lc.log_path("n1"),
                                   lambda r: r.get("msg") == "TLS is off: nothing to reload",
                                   what="the SIGHUP's log line")
                assert lc.alive("n1")
                await c.put("k", b"v")
                assert (await c.call("n1", "status"))["security"]["cert"] is None

        asyncio.run(main())
    finally:
        lc.stop_all()


def test_sighup_while_the_agent_starts_is_a_reload_not_its_end(tmp_path, monkeypatch):
    """SIGHUP's default action ends a process: an agent still starting (imports, the
    recovery of a long log) was killed by a reload sent to it then (seen in a chaos run:
    the ca nemesis signalled an agent the kill nemesis had just restarted). It now
    reloads once it is up."""
    monkeypatch.setenv("RAFTDECK_TEST_START_DELAY_S", "2")
    lc = LocalCluster(tmp_path, 1)
    try:
        lc.start("n1")
        deadline = time.monotonic() + 60
        while "starting slowly" not in lc.stderr("n1"):
            assert time.monotonic() < deadline and lc.alive("n1"), lc.stderr("n1")
            time.sleep(0.05)
        lc.signal("n1", signal.SIGHUP)

        async def main():
            async with lc.client() as c:
                await lc.wait_leader(c, timeout=60)
                await wait_cert(lc, c, "n1", lambda x: x["reloads"] == 1, "no reload after the start")
                await c.put("k", b"v")

        asyncio.run(main())
        assert lc.alive("n1")
        assert any(r.get("msg") == "SIGHUP arrived while starting: reloading the TLS files now"
                   for r in log_records(lc.log_path("n1")))
    finally:
        lc.stop_all()


def test_sighup_sent_the_moment_an_agent_is_spawned_waits_for_it(tmp_path):
    """Before the agent's first line runs, only the signal mask it was started with can
    keep a SIGHUP from ending it: LocalCluster (like `raftdeck up` and deploy) starts
    agents with SIGHUP blocked, and the agent takes it once it has a handler."""
    lc = LocalCluster(tmp_path, 1)
    try:
        lc.start("n1")
        lc.signal("n1", signal.SIGHUP)  # within the interpreter's start-up

        async def main():
            async with lc.client() as c:
                await lc.wait_leader(c, timeout=60)
                await wait_cert(lc, c, "n1", lambda x: x["reloads"] == 1, "no reload after the start")

        asyncio.run(main())
        assert lc.alive("n1")
    finally:
        lc.stop_all()
