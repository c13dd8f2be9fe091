"""With cluster.tls set, deploy writes to the host the CA certificate and that node's own
certificate and key (0600, in a 0700 folder), never the CA key, and points the node config
at them; without it, no TLS files and no tls: in the config. Real sshd, real SFTP."""

from __future__ import annotations

import asyncio
import os
import stat

from console.deploy import (Deployer, SSHOptions, node_config_text, ssh_connect,
                            tls_sources)
from nodeagent.config import parse_inventory, parse_node_config
from tests.ssh.test_artifacts import tls_setting


def test_tls_files_uploaded_with_safe_modes_and_never_the_ca_key(ssh_hosts, tmp_path):
    hs = ssh_hosts(1)
    h = hs.hosts[0]
    hs.trust(h)
    tls = tmp_path / "inv" / ".raftdeck" / "tls"
    (tls / "nodes").mkdir(parents=True)
    secret = os.urandom(24).hex()
    files = {"ca.crt": "CA CERT", "ca.key": f"CA KEY {secret}", "nodes/n1.crt": "N1 CERT",
             "nodes/n1.key": f"N1 KEY {secret[::-1]}"}
    for name, text in files.items():
        (tls / name).write_text(text)
    text = ("cluster:\n  name: tlsup\n"
            f"  tls: {tls_setting(tls)}\n"
            "nodes:\n" + hs.node_yaml("n1", h, 7101))
    inv = parse_inventory(text, tmp_path / "inv" / "inventory.yaml")
    node = inv.node("n1")
    d = Deployer(inv, ssh=SSHOptions(known_hosts=hs.known_hosts))
    lines = []
    d.progress.listeners.append(lambda row: lines.append(d.progress.line(row)))

    async def go():
        conn = await ssh_connect(node, d.opts)
        async with conn:
            lay, _, _ = await d._layout(conn, node)
            remote = {"ca": str(lay.tls / "ca.crt"), "cert": str(lay.tls / "node.crt"),
                      "key": str(lay.tls / "node.key")}
            config = node_config_text(inv, node, lay, remote)
            await d._write_config(conn, node, lay, config, tls_sources(inv, node))
            return lay

    lay = asyncio.run(go())
    t = h.root / "raftdeck" / "tls"
    assert sorted(os.listdir(t)) == ["ca.crt", "node.crt", "node.key"]
    assert (t / "ca.crt").read_text() == "CA CERT" and (t / "node.crt").read_text() == "N1 CERT"
    assert (t / "node.key").read_text() == files["nodes/n1.key"]
    assert stat.S_IMODE((t / "node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(t.stat().st_mode) == 0o700
    cfg_path = h.root / "raftdeck" / "node.yaml"
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
    cfg = parse_node_config(cfg_path.read_text(), str(cfg_path))
    assert str(cfg.cluster.tls.key) == str(lay.tls / "node.key")
    everything = "".join(p.read_text(errors="replace") for p in (h.root / "raftdeck").rglob("*")
                         if p.is_file() and p.name != "node.key")
    assert secret not in everything  # the CA key went nowhere; the node key only to node.key
    assert all(secret not in ln and secret[::-1] not in ln for ln in lines)
