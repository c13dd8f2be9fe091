"""Replacing the cluster CA while the cluster runs, as an operator does it: `raftdeck init
--rotate-ca` three times, each followed by `raftdeck reload` of every node. Each step refuses to
start until every agent runs with the files of the step before. Through all three the
leader and its term stay, writes go on, and the last step ends the connections still made
with a certificate of the old CA (a client's, kept open from before) while a new one with
the old CA's certificate is refused."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
from pathlib import Path

import pytest

from console.client import ClusterClient, tls_context
from nodeagent.config import load_inventory
from nodeagent.protocol import PROTOCOL_VERSION, encode

from .test_cli_up_and_roles import down, run, tls_inventory

pytestmark = pytest.mark.integration


def status(inv: Path) -> dict:
    rc, out, err = run(inv, "status", "--json")
    assert rc in (0, 1), err
    return json.loads(out[out.index("{"):])


def client_conn(port: int, ca: Path, crt: Path, key: Path, cluster: str) -> ssl.SSLSocket:
    """A client connection that said hello and got its answer: open until someone closes it."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(crt), str(key))
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(encode({"type": "hello", "role": "client", "cluster": cluster,
                      "version": PROTOCOL_VERSION, "client_id": "old-cert"}))
    assert s.recv(65536), "no hello_ok"
    return s


def closed_by_peer(s: ssl.SSLSocket, timeout: float = 30.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(65536) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    except socket.timeout:
        return False


def test_the_ca_is_replaced_in_three_steps_without_an_election(tmp_path):
    # A long election timeout: only an early campaign (a peer link seen to end) could
    # change the term during the test, and that is what the steps must not cause.
    inv, ports = tls_inventory(tmp_path, "rot", election_timeout_ms=3000)
    tls = tmp_path / ".raftdeck" / "tls"
    try:
        rc, out, err = run(inv, "up", "--no-console", "--json")
        assert rc == 0, err
        before = status(inv)
        leader, term = before["health"]["leader"], before["health"]["term"]
        assert leader and term
        old_ca = (tls / "ca.crt").read_bytes()
        # A console started now: its context is made from today's files and is still what
        # it holds after the replacement (it follows the files when it reconnects).
        early = tls_context(load_inventory(inv).cluster.tls)
        keep = tmp_path / "old-admin"
        keep.mkdir()
        for f in ("admin.crt", "admin.key"):
            shutil.copy(tls / "operators" / f, keep / f)

        def step(n: int, name: str) -> None:
            rc, out, err = run(inv, "init", "--rotate-ca")
            assert rc == 0, (out, err)
            assert f"CA replacement: step {n} of 3 ({name}) done" in out, out
            # At once again: refused, naming the agents that did not load the files yet.
            rc, out2, err2 = run(inv, "init", "--rotate-ca")
            assert rc == 1 and len(err2.strip().splitlines()) == 1, (out2, err2)
            assert "not taking the CA step" in err2 and "n1 " in err2, err2
            # The leader first: its links to the followers are then still the old ones,
            # made with the old certificates (the followers' own reloads would otherwise
            # have made it reconnect them already).
            rc, out, err = run(inv, "reload", leader, *(n for n in ("n1", "n2", "n3") if n != leader))
            assert rc == 0, (out, err)
            assert len(re.findall(r"(?m)^n\d reloaded its TLS files", out)) == 3, out
            assert run(inv, "put", f"after-{name}", "ok")[0] == 0

        # 1. trust: ca.crt lists the old CA and a new one; every certificate stays.
        step(1, "trust")
        st = status(inv)
        assert st["health"]["leader"] == leader and st["health"]["term"] == term, st["health"]
        assert all(len(n["ca"]) == 2 for n in st["nodes"]), st["nodes"]
        assert "CA: a replacement is under way (CAs trusted: n1 2, n2 2, n3 2)" in run(inv, "status")[1]
        assert (tls / "ca.crt").read_bytes().startswith(old_ca)

        # 2. issue: every certificate comes from the new CA; the old one is still trusted.
        step(2, "issue")
        assert (keep / "admin.crt").read_bytes() != (tls / "operators" / "admin.crt").read_bytes()
        # A client with the old CA's certificate still gets in, and stays connected.
        old_conn = client_conn(ports[0], tls / "ca.crt", keep / "admin.crt", keep / "admin.key", "rot")

        # 3. finish: ca.crt lists the new CA only.
        step(3, "finish")
        assert not (tls / "ca-next.crt").exists()
        assert closed_by_peer(old_conn), "a connection made with the old CA's certificate stayed open"
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            client_conn(ports[0], tls / "ca.crt", keep / "admin.crt", keep / "admin.key", "rot")

        st = status(inv)
        assert st["health"]["leader"] == leader and st["health"]["term"] == term, st["health"]
        assert st["health"]["reachable"] == 3 and st["health"]["quorum"], st["health"]
        assert run(inv, "get", "after-trust")[1].strip() == "ok"
        # The agents ended the links made with the old certificates (at the start), which
        # came back with the new ones; every agent trusts the new CA only.
        assert sum(n["untrusted_closed"] for n in st["nodes"]) >= 3, st["nodes"]
        assert all(len(n["ca"]) == 1 for n in st["nodes"]), st["nodes"]
        assert "CA:" not in run(inv, "status")[1]
        assert run(inv, "put", "at-the-end", "ok")[0] == 0

        async def console_started_before():
            async with ClusterClient({f"n{i + 1}": ("127.0.0.1", p) for i, p in enumerate(ports)},
                                     "rot", ssl=early, timeout=5.0) as c:
                await c.put("from-a-console-started-before", b"ok")
                return await c.get("after-finish")

        assert asyncio.run(console_started_before()) == b"ok"
        rc, out, err = run(inv, "init", "--json")  # steady again: a plain init keeps it all
        assert rc == 0 and {f["result"] for f in json.loads(out)["files"]} == {"kept"}, out
    finally:
        down(inv)
