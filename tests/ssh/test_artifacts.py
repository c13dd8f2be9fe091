"""The pieces of deploy that need no host: wheels rebuilt from installed packages, the
content digest that makes a rerun idempotent, the node config written for a host, the TLS
files chosen for it, and the progress lines."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath

from console.deploy import (DeployProgress, ProgressPrinter, content_digest, layout,
                            node_config_text, repack_installed, tls_sources)
from nodeagent.config import parse_inventory, parse_node_config

INV = """\
cluster:
  name: prod
  election_timeout_ms: 1500
  heartbeat_interval_ms: 150
  fsync: false
  dispatch_policy: round_robin
nodes:
  - {name: a, host: 10.1.0.1, port: 7101, priority: 3, capacity: 4, metrics_port: 9101,
     ssh: {user: ops, install_dir: /opt/raftdeck}}
  - {name: b, host: 10.1.0.2, port: 7101, role: learner, ssh: {}}
  - {name: c, host: 127.0.0.1, port: 7103}
"""


def test_repacked_wheel_is_deterministic_and_matches_its_record(tmp_path):
    a = repack_installed("msgpack", tmp_path / "a")
    b = repack_installed("msgpack", tmp_path / "b")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert a.name.startswith("msgpack-") and "-cp3" in a.name  # a compiled package keeps its tags
    with zipfile.ZipFile(a) as z:
        names = z.namelist()
        record = z.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        for line in record.splitlines():
            path, digest, size = line.rsplit(",", 2)
            if not digest:
                continue
            data = z.read(path)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data)


def _copy_wheel(src: Path, dest: Path, *, date=(2001, 2, 3, 4, 5, 6), change: str | None = None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for name in reversed(zin.namelist()):  # another order too
            data = zin.read(name)
            if name == change:
                data += b"\n# changed\n"
            zout.writestr(zipfile.ZipInfo(name, date), data)
    return dest


def test_content_digest_ignores_timestamps_and_order_but_not_contents(tmp_path):
    w = repack_installed("sniffio", tmp_path)
    same = _copy_wheel(w, tmp_path / "same.whl")
    assert same.read_bytes() != w.read_bytes()
    assert content_digest(same) == content_digest(w)
    changed = _copy_wheel(w, tmp_path / "changed.whl", change="sniffio/__init__.py")
    assert content_digest(changed) != content_digest(w)


def test_node_config_for_a_host_is_valid_and_carries_the_cluster(tmp_path):
    inv = parse_inventory(INV, tmp_path / "inventory.yaml")
    a = inv.node("a")
    lay = layout(a, "/home/ops")
    assert lay.install_dir == PurePosixPath("/opt/raftdeck")
    assert lay.data_dir == PurePosixPath("/opt/raftdeck/.raftdeck/a")
    assert lay.pid_file == PurePosixPath("/opt/raftdeck/.raftdeck/a.pid")
    b_lay = layout(inv.node("b"), "/home/ops")  # default install_dir: under the login directory
    assert b_lay.install_dir == PurePosixPath("/home/ops/raftdeck")
    text = node_config_text(inv, a, lay, None)
    cfg = parse_node_config(text, "/opt/raftdeck/node.yaml")
    assert cfg.cluster.name == "prod" and cfg.cluster.election_timeout_ms == 1500
    assert cfg.cluster.fsync is False and cfg.cluster.dispatch_policy == "round_robin"
    assert cfg.cluster.tls is None
    assert cfg.node.name == "a" and cfg.node.priority == 3 and cfg.node.capacity == 4
    assert cfg.node.metrics_port == 9101
    assert str(cfg.node.data_dir) == "/opt/raftdeck/.raftdeck/a"
    assert [(p.name, p.host, p.port, p.role) for p in cfg.peers] == [
        ("b", "10.1.0.2", 7101, "learner"), ("c", "127.0.0.1", 7103, "voter")]
    assert node_config_text(inv, a, lay, None) == text  # the same inputs, the same bytes


def tls_setting(tls: Path) -> str:
    """cluster.tls for the `raftdeck init` layout in ``tls``: ``{dir: ...}`` where the
    config knows that form, else explicit files (from which deploy finds nodes/<name>)."""
    from nodeagent.config import TLSConfig

    if hasattr(TLSConfig, "for_node"):
        return f"{{dir: {tls}}}"
    return (f"{{ca: {tls}/ca.crt, cert: {tls}/operators/admin.crt, "
            f"key: {tls}/operators/admin.key}}")


def test_tls_material_for_a_node_never_includes_the_ca_key(tmp_path):
    tls = tmp_path / ".raftdeck" / "tls"
    (tls / "nodes").mkdir(parents=True)
    for f in ("ca.crt", "ca.key", "nodes/a.crt", "nodes/a.key"):
        (tls / f).write_text(f)
    text = INV.replace("  dispatch_policy: round_robin\n",
                       f"  dispatch_policy: round_robin\n  tls: {tls_setting(tls)}\n")
    inv = parse_inventory(text, tmp_path / "inventory.yaml")
    src = tls_sources(inv, inv.node("a"))
    assert src == {"ca": tls / "ca.crt", "cert": tls / "nodes" / "a.crt",
                   "key": tls / "nodes" / "a.key"}
    assert parse_inventory(INV, tmp_path / "i.yaml").cluster.tls is None
    assert tls_sources(parse_inventory(INV, tmp_path / "i.yaml"), inv.node("a")) is None
    lay = layout(inv.node("a"), "/home/ops")
    remote = {"ca": "/opt/raftdeck/tls/ca.crt", "cert": "/opt/raftdeck/tls/node.crt",
              "key": "/opt/raftdeck/tls/node.key"}
    cfg = parse_node_config(node_config_text(inv, inv.node("a"), lay, remote), "/x/node.yaml")
    assert str(cfg.cluster.tls.key) == "/opt/raftdeck/tls/node.key"


def test_progress_prints_plain_lines_off_a_terminal():
    p = DeployProgress("deploy")
    p.add("a", "ops@10.1.0.1:22")
    p.add("b", "ops@10.1.0.2:22")
    out = io.StringIO()
    ProgressPrinter(p, out, tty=False)
    p.update("a", step="connect", state="running")
    p.update("a", step="connect", state="running")  # no change, no line
    p.update("b", step="connect", state="running")
    p.update("b", state="failed", message="b (ops@10.1.0.2:22): cannot connect: connection "
             "refused; check ssh.port and that sshd runs on the host")
    p.update("a", state="unchanged", message="unchanged (agent pid 7 answers)")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["a  ops@10.1.0.1:22  connect...", "b  ops@10.1.0.2:22  connect..."]
    assert lines[2] == ("FAILED b (ops@10.1.0.2:22): cannot connect: connection refused; "
                        "check ssh.port and that sshd runs on the host")
    assert lines[3].startswith("a  ops@10.1.0.1:22  unchanged (agent pid 7 answers) (")
    assert len(lines) == 4
    assert [r.name for r in p.failed] == ["b"]
