"""`raftdeck up` on an inventory with `tls: on` and no certificates yet: it runs init
(the default cluster is encrypted and authenticated from the first start), then the CLI's
roles: a viewer cannot write, partition or kill; an operator writes but cannot kill or
partition; an admin kills. Each refusal is one line on stderr and exit 1, no traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from console.local import free_ports

pytestmark = pytest.mark.integration


def run(inv: Path, *args, timeout=90):
    p = subprocess.run([sys.executable, "-m", "console.cli", "--inventory", str(inv), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=inv.parent)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout, p.stderr


def pids(folder: Path) -> list[int]:
    out = []
    for f in folder.rglob("*.pid"):
        try:
            out.append(int(f.read_text().split()[0]))
        except (ValueError, IndexError, OSError):
            pass
    return out


def tls_inventory(folder: Path, cluster: str, election_timeout_ms: int = 2000) -> tuple[Path, list[int]]:
    """An inventory of three local nodes with `tls: on` (certificates in .raftdeck/tls)."""
    ports = free_ports(3)
    inv = folder / "inventory.yaml"
    inv.write_text(f"cluster:\n  name: {cluster}\n  tls: on\n  election_timeout_ms: "
                   f"{election_timeout_ms}\nnodes:\n" + "".join(
                       f"  - {{name: n{i + 1}, host: 127.0.0.1, port: {p}, data_dir: .raftdeck/n{i + 1}}}\n"
                       for i, p in enumerate(ports)))
    return inv, ports


def down(inv: Path) -> None:
    """`raftdeck down`, then SIGKILL whatever pid file is left under the folder."""
    subprocess.run([sys.executable, "-m", "console.cli", "--inventory", str(inv), "down",
                    "--grace-s", "5"], capture_output=True, timeout=60, cwd=inv.parent)
    for pid in pids(inv.parent):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_up_inits_tls_and_the_cli_enforces_roles(tmp_path):
    inv, _ = tls_inventory(tmp_path, "sec")
    tls = tmp_path / ".raftdeck" / "tls"
    assert not tls.exists()
    try:
        rc, out, err = run(inv, "up", "--no-console", "--json")
        assert rc == 0, err
        assert (tls / "ca.crt").exists() and (tls / "operators" / "viewer.key").exists()
        assert "operators/admin.crt" in json.loads(out)["tls"]["issued"]  # it said what it made
        rc, out, err = run(inv, "status", "--json")
        assert rc == 0 and json.loads(out[out.index("{"):])["health"]["tls"] is True, out
        assert all(n["cert"]["sha256"] for n in json.loads(out[out.index("{"):])["nodes"]), out
        rc, out, err = run(inv, "status")
        assert re.search(r"(?m)^certificates: the first to expire is n\d's, on \d{4}-\d\d-\d\d "
                         r"\(in 18\d\d days\)$", out), out

        def refused(*args, needs: str):
            rc, out, err = run(inv, *args)
            lines = err.strip().splitlines()
            assert rc == 1 and len(lines) == 1, (args, rc, out, err)
            assert "forbidden" in lines[0] and f"needs the {needs} role" in lines[0], lines

        refused("put", "k", "v", "--role", "viewer", needs="operator")
        refused("partition", "isolate", "n3", "--role", "viewer", needs="admin")
        refused("kill", "n3", "--role", "viewer", needs="admin")
        assert run(inv, "put", "k", "v", "--role", "operator")[0] == 0
        assert run(inv, "get", "k", "--role", "viewer")[1].strip() == "v"
        refused("partition", "isolate", "n3", "--role", "operator", needs="admin")
        refused("kill", "n3", "--role", "operator", needs="admin")
        rc, out, err = run(inv, "status", "--json")
        assert all(n["reachable"] for n in json.loads(out[out.index("{"):])["nodes"]), out
        # reload: the agent rereads its TLS files; a renewed certificate is then in use
        refused("reload", "n1", "--role", "operator", needs="admin")
        rc, out, err = run(inv, "reload", "n1")
        assert rc == 0, err
        assert re.fullmatch(r"n1 reloaded its TLS files \(pid \d+\): certificate [0-9a-f]{16}, "
                            r"valid until \d{4}-\d\d-\d\d \(the same certificate as before\)\n",
                            out), out
        for suffix in (".crt", ".key"):
            (tls / "nodes" / f"n1{suffix}").unlink()
        assert run(inv, "init")[0] == 0
        rc, out, err = run(inv, "reload", "n1", "--json")
        assert rc == 0, err
        reloaded = json.loads(out)
        assert reloaded["changed"] is True and reloaded["action"] == "reload"
        rc, out, err = run(inv, "status", "--json")
        n1 = {n["name"]: n for n in json.loads(out[out.index("{"):])["nodes"]}["n1"]
        assert n1["cert"]["sha256"] == reloaded["sha256"] and n1["cert"]["reloads"] == 2
        good_key = (tls / "nodes" / "n1.key").read_bytes()
        (tls / "nodes" / "n1.key").write_bytes((tls / "nodes" / "n2.key").read_bytes())
        rc, out, err = run(inv, "reload", "n1")
        assert rc == 1 and "n1 refused the TLS files and keeps its certificate: cannot load" in err, err
        (tls / "nodes" / "n1.key").write_bytes(good_key)
        rc, out, err = run(inv, "status")
        assert "n1: the last TLS reload was refused" in out, out
        # A node that answers but whose pid file is gone (started some other way) cannot be
        # signalled: it is named, and the nodes after it are still reloaded.
        pidfile = tmp_path / ".raftdeck" / "n2.pid"
        pidfile.rename(pidfile.with_name("n2.pid.aside"))
        try:
            rc, out, err = run(inv, "reload", "n2", "n1")
        finally:
            pidfile.with_name("n2.pid.aside").rename(pidfile)
        assert rc == 1 and err.startswith("n2: ") and out.startswith("n1 reloaded its TLS files"), (out, err)
        rc, out, err = run(inv, "kill", "n3", "--json")  # admin by default
        assert rc == 0 and json.loads(out)["pid"] > 0, (out, err)
        rc, out, err = run(inv, "status", "--json")
        nodes = {n["name"]: n for n in json.loads(out[out.index("{"):])["nodes"]}
        assert not nodes["n3"]["reachable"] and nodes["n1"]["reachable"], nodes
        # a second init keeps everything
        rc, out, err = run(inv, "init", "--json")
        assert rc == 0 and {f["result"] for f in json.loads(out)["files"]} == {"kept"}
    finally:
        down(inv)
