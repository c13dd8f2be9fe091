"""No private key reaches a log, a status, an audit record, CLI output or an error: every
private key's PEM (and each line of its base64 body) is searched for in everything a TLS
cluster and the CLI wrote, after normal work, refusals, faults and broken TLS set-ups."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from console.client import RequestError
from console.local import LocalCluster

pytestmark = pytest.mark.integration


def secrets_in(tls_dir) -> list[str]:
    out = []
    for key in sorted(tls_dir.rglob("*.key")):
        pem = key.read_text()
        out.append(pem.strip())
        out += [ln for ln in pem.splitlines() if len(ln) >= 16 and "-----" not in ln]
    return out


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s[:12] + "..." for s in secrets if s in text]


def cli(lc, *args, env=None):
    p = subprocess.run([sys.executable, "-m", "console.cli", "--inventory", str(lc.inventory), *args],
                       capture_output=True, text=True, timeout=60, cwd=lc.tmp)
    return p.returncode, p.stdout, p.stderr


def test_no_key_in_logs_status_audit_cli_output_or_errors(tmp_path):
    lc = LocalCluster(tmp_path, 3)
    secrets = secrets_in(lc.tls_dir)
    assert len(secrets) >= 7 * 2
    # the search works: it finds the keys where they are
    assert leaks((lc.tls_dir / "nodes" / "n1.key").read_text(), secrets)
    texts: dict[str, str] = {}
    lc.start_all()
    try:
        async def work():
            async with lc.client() as admin, lc.client(role="viewer") as viewer:
                leader = await lc.wait_leader(admin, timeout=60)
                await admin.put("k", b"v")
                with pytest.raises(RequestError):
                    await viewer.put("k", b"w")
                await admin.fault(leader, action="latency", ms=1)
                await admin.heal(leader)
                for n in lc.names:
                    texts[f"status {n}"] = json.dumps(await admin.status(n), default=str)
                    texts[f"whoami {n}"] = json.dumps(await admin.call(n, "whoami"))

        asyncio.run(work())
        for args in (["status"], ["status", "--json"], ["put", "a", "b", "--role", "viewer"],
                     ["partition", "isolate", "n1", "--role", "operator"],
                     ["kill", "n1", "--role", "viewer"], ["init", "--json"], ["init"],
                     ["status", "--tls-cert", str(lc.tls_dir / "nodes" / "n1.crt"),
                      "--tls-key", str(lc.tls_dir / "operators" / "admin.key")]):
            rc, out, err = cli(lc, *args)
            texts[f"raftdeck {' '.join(args[:2])}"] = out + err
            assert "Traceback" not in err, (args, err)
        # the mismatched pair is one line, exit 2
        rc, out, err = cli(lc, "status", "--tls-cert", str(lc.tls_dir / "nodes" / "n1.crt"),
                           "--tls-key", str(lc.tls_dir / "operators" / "admin.key"))
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "key matches" in err, err
    finally:
        lc.stop_all()
    # an agent whose key does not match its certificate: one line, exit 2, no key
    broken = tmp_path / "broken"
    shutil.copytree(lc.tls_dir, broken / "tls")
    shutil.copy(lc.tls_dir / "nodes" / "n2.key", broken / "tls" / "nodes" / "n1.key")
    (broken / "inventory.yaml").write_text(lc.inventory.read_text())
    p = subprocess.run([sys.executable, "-m", "nodeagent.cli", "run", "--inventory",
                        str(broken / "inventory.yaml"), "--name", "n1"],
                       capture_output=True, text=True, timeout=60, cwd=broken)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "node n1" in p.stderr and "Traceback" not in p.stderr
    texts["nodeagent run (mismatched key)"] = p.stdout + p.stderr

    for n in lc.names:
        texts[f"log {n}"] = lc.log_path(n).read_text()
        texts[f"stderr {n}"] = lc.stderr(n)
        audit = lc.tmp / "data" / n / "audit.log"
        texts[f"audit {n}"] = audit.read_text() if audit.exists() else ""
    assert any(texts[f"audit {n}"] for n in lc.names)  # there was something to search
    found = {where: leaks(t, secrets) for where, t in texts.items()}
    assert not any(found.values()), {w: f for w, f in found.items() if f}
