"""Mutual TLS and roles against a real 3-agent cluster (LocalCluster: TLS on by default).

* Refused, and each refusal logged by the agent with the connection's address: a plain TCP
  client, a TLS client without a certificate, one with a certificate of another CA, a node
  certificate of another cluster; and, past TLS, an operator certificate saying it is a peer
  and one node's certificate claiming to be another node.
* Roles: a viewer reads but cannot write or inject a fault; an operator writes but cannot
  inject a fault; an admin can, and its actions are in the node's audit log. A write
  relayed by a follower keeps the client's role: the leader refuses a relayed viewer.
"""

from __future__ import annotations

import asyncio

import pytest

from console.client import AgentConnection, RequestError
from console.local import LocalCluster

from .helpers import (attempt, client_context, ctx_for, hello, log_records, other_cluster,
                      tls_paths_for_node, tls_paths_for_role, wait_for_log)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lc = LocalCluster(tmp_path_factory.mktemp("tls"), 3, election_ms=2000)
    try:
        lc.start_all()

        async def settle():
            async with lc.client() as c:
                await lc.wait_leader(c, timeout=60)

        asyncio.run(settle())
        yield lc
    finally:
        lc.stop_all()


def test_unauthenticated_connections_are_refused_and_logged(cluster, tmp_path):
    lc = cluster
    target = "n2"
    port = lc.ports[target]
    ca = lc.tls_dir / "ca.crt"
    other = other_cluster(tmp_path)

    cases = {  # what: (first bytes, client context, a word OpenSSL's reason must contain)
        "plain tcp": (hello(lc.cluster), None, ""),
        "tls without a certificate": (hello(lc.cluster), ctx_for(ca), "CERTIFICATE"),
        "certificate of another CA": (hello(lc.cluster),
                                      ctx_for(ca, *tls_paths_for_role(other, "admin")[1:]), "VERIFY"),
        "node certificate of another cluster": (hello(lc.cluster, "peer", "n1"),
                                                ctx_for(ca, *tls_paths_for_node(other, "n1")[1:]),
                                                "VERIFY"),
    }

    async def main():
        async with lc.client() as c:
            leader_before = await lc.wait_leader(c)
            term = (await c.status(leader_before))["term"]
            for what, (payload, ctx, word) in cases.items():
                frames, end, local = await attempt(port, payload, ctx)
                assert not any(f["type"] == "hello_ok" for f in frames), (what, frames)
                assert end != "open", f"{what}: the agent kept the connection open"
                if local == -1:
                    # refused before our side finished: find the line by code and time
                    await wait_for_log(lc.log_path(target), lambda r: r.get("msg") == "connection refused"
                                       and r.get("code") == "tls" and word in r["reason"].upper(),
                                       what=what)
                    continue
                rec = await wait_for_log(
                    lc.log_path(target),
                    lambda r: r.get("msg") == "connection refused" and
                    r.get("remote") == f"127.0.0.1:{local}", what=f"the refusal of {what}")
                assert rec["code"] == "tls" and rec["level"] == "warning", (what, rec)
                assert "TLS handshake failed" in rec["reason"], rec
                assert word in rec["reason"].upper(), (what, rec)
            reasons = [r["reason"] for r in log_records(lc.log_path(target))
                       if r.get("msg") == "connection refused"]
            assert any("certificate" in r.lower() for r in reasons), reasons
            # nothing of that disturbed the cluster
            assert await lc.wait_leader(c) == leader_before
            assert (await c.status(leader_before))["term"] == term
            await c.put("after-refusals", b"ok")
            assert all(lc.alive(n) for n in lc.names)

    asyncio.run(main())


def test_a_peer_must_be_the_node_its_certificate_names(cluster):
    lc = cluster
    port = lc.ports["n3"]
    ca = lc.tls_dir / "ca.crt"

    async def main():
        # An operator (admin!) certificate cannot open a peer link.
        frames, end, local = await attempt(port, hello(lc.cluster, "peer", "n1"),
                                           ctx_for(ca, *tls_paths_for_role(lc.tls_dir, "admin")[1:]))
        assert [f["code"] for f in frames] == ["forbidden"], frames
        assert "node certificate" in frames[0]["message"]
        rec = await wait_for_log(lc.log_path("n3"), lambda r: r.get("remote") == f"127.0.0.1:{local}"
                                 and r.get("msg") == "connection refused")
        assert rec["code"] == "forbidden"
        # n1's certificate cannot speak for n2.
        frames, end, local = await attempt(port, hello(lc.cluster, "peer", "n2"),
                                           ctx_for(ca, *tls_paths_for_node(lc.tls_dir, "n1")[1:]))
        assert [f["code"] for f in frames] == ["forbidden"], frames
        assert "'n1'" in frames[0]["message"] and "'n2'" in frames[0]["message"]
        # ... but may speak for itself (the hello is answered)
        frames, end, _ = await attempt(port, hello(lc.cluster, "peer", "n1"),
                                       ctx_for(ca, *tls_paths_for_node(lc.tls_dir, "n1")[1:]), timeout=1.0)
        assert frames and frames[0]["type"] == "hello_ok", frames

    asyncio.run(main())


def test_roles_viewer_operator_admin_and_the_audit_log(cluster):
    lc = cluster

    async def expect_forbidden(coro, need: str):
        with pytest.raises(RequestError) as e:
            await coro
        assert e.value.code == "forbidden" and f"needs the {need} role" in e.value.message, e.value

    async def main():
        async with lc.client() as admin, lc.client(role="operator") as op, \
                lc.client(role="viewer") as viewer:
            leader = await lc.wait_leader(admin)
            follower = next(n for n in lc.names if n != leader)
            await admin.put("shared", b"1")
            assert (await viewer.call(leader, "whoami"))["role"] == "viewer"
            # viewer: reads, status; no writes, no faults, no transfer
            assert await viewer.get("shared") == b"1"
            assert (await viewer.status(follower))["node"] == follower
            await expect_forbidden(viewer.call(leader, "put", key="k", value=b"v",
                                               client_id="v1", seq=1), "operator")
            await expect_forbidden(viewer.call(leader, "register", client_id="v1"), "operator")
            # Through the client library the refusal names the write asked for, not the
            # session registration it starts with.
            with pytest.raises(RequestError) as e:
                await viewer.put("k", b"v")
            assert e.value.code == "forbidden" and e.value.message.startswith("put needs the operator role")
            await expect_forbidden(viewer.call(follower, "put", key="k", value=b"v", client_id="v1",
                                               seq=2, forward=True), "operator")
            await expect_forbidden(viewer.fault(follower, action="partition", **{"from": [follower]}),
                                   "admin")
            await expect_forbidden(viewer.transfer(follower), "admin")
            # operator: writes and tasks; no faults, no membership
            await op.put("shared", b"2")
            await expect_forbidden(op.fault(follower, action="partition", **{"from": [follower]}),
                                   "admin")
            await expect_forbidden(op.call(leader, "remove_node", node=follower), "admin")
            await expect_forbidden(op.call(leader, "submit", client_id="o.x", seq=2, tasks=[
                {"id": "sh", "kind": "shell", "args": {"cmd": "true"}, "timeout_ms": 1000}]), "admin")
            # admin: a fault on the follower, then heal; both audited on that node
            await admin.fault(follower, action="latency", ms=1, **{"to": [leader]})
            assert (await admin.status(follower))["faults"]
            await admin.heal(follower)
            assert not (await admin.status(follower))["faults"]
        audit = log_records(lc.tmp / "data" / follower / "audit.log")
        got = [(r["request"], r["role"], r["ok"], r["error"]) for r in audit]
        assert ("fault", "viewer", False, "forbidden") in got
        assert ("fault", "operator", False, "forbidden") in got
        assert ("fault", "admin", True, None) in got and ("heal", "admin", True, None) in got
        assert all(r["node"] == follower and r["remote"].startswith("127.0.0.1:") for r in audit)
        # and the agent's own log says who was refused what
        assert any(r.get("msg") == "request forbidden" and r.get("role") == "viewer"
                   for r in log_records(lc.log_path(follower)))

    asyncio.run(main())


def test_a_relay_keeps_the_clients_role(cluster):
    """A follower relays writes to the leader over its node certificate; the leader honours
    the role the follower states, only downwards."""
    lc = cluster

    async def main():
        async with lc.client() as admin, lc.client(role="operator") as op:
            leader = await lc.wait_leader(admin)
            follower = next(n for n in lc.names if n != leader)
            # an operator's write sent to a follower with forward: true is relayed and applied
            await op.call(follower, "register", client_id="relay.1", forward=True)
            r = await op.call(follower, "put", key="relayed", value=b"x", client_id="relay.1",
                              seq=2, forward=True)
            assert r["index"] > 0 and await admin.get("relayed") == b"x"
            # what the leader sees from a relay: a node certificate stating a role
            ca, crt, key = tls_paths_for_node(lc.tls_dir, follower)
            node = AgentConnection(leader, "127.0.0.1", lc.ports[leader], lc.cluster,
                                   ssl=client_context(ca, crt, key))
            await node.connect()
            try:
                assert (await node.request("whoami"))["kind"] == "node"
                with pytest.raises(RequestError) as e:
                    await node.request("put", key="k", value=b"v", client_id="relay.1", seq=3,
                                       as_role="viewer")
                assert e.value.code == "forbidden"
                await node.request("put", key="k", value=b"v", client_id="relay.1", seq=3,
                                   as_role="operator")
                with pytest.raises(RequestError) as e:  # a node link is not an admin
                    await node.request("heal")
                assert e.value.code == "forbidden"
            finally:
                await node.close()
            # an operator cannot raise itself by stating a role
            conn = await op.connection(leader)
            await conn.request("put", key="k", value=b"v", client_id="relay.1", seq=4,
                               as_role="admin")  # allowed, as the operator it is
            with pytest.raises(RequestError) as e:
                await conn.request("submit", client_id="relay.1", seq=5, as_role="admin", tasks=[
                    {"id": "sh2", "kind": "shell", "args": {"cmd": "true"}, "timeout_ms": 1000}])
            assert e.value.code == "forbidden"

    asyncio.run(main())
