"""The host side of `raftdeck restore` over SSH (console/remote.py ``datadir`` and
``adopt``), run as the hosts run it: the program text on stdin of ``python3 -``, one JSON
argument, one JSON line back. The upload is checked file by file before it becomes the
node's data directory, and nothing replaces a directory in use or an agent's running one."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = (Path(__file__).resolve().parents[2] / "console" / "remote.py").read_text()


def op(name: str, **fields) -> dict:
    arg = json.dumps({"op": name, **{k: str(v) if isinstance(v, Path) else v
                                     for k, v in fields.items()}})
    r = subprocess.run([sys.executable, "-", arg], input=PROGRAM, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def manifest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): [p.stat().st_size,
                                             hashlib.sha256(p.read_bytes()).hexdigest()]
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def upload(tmp_path):
    """A node's layout with an uploaded, not yet adopted, data directory."""
    staging = tmp_path / ".raftdeck" / "n1.restoring"
    (staging / "snap").mkdir(parents=True)
    (staging / "wal").mkdir()
    (staging / "data_id").write_text("f" * 32)
    (staging / "hardstate").write_bytes(b"\x94\x01\x05\xc0\x18")
    (staging / "snap" / "snap-00000000000000000024-5.snap").write_bytes(os.urandom(5000))
    return {"staging": staging, "data_dir": tmp_path / ".raftdeck" / "n1",
            "pid_file": tmp_path / ".raftdeck" / "n1.pid", "config": tmp_path / "node.yaml",
            "files": manifest(staging)}


def adopt(u: dict, **over) -> dict:
    return op("adopt", **{**u, **over})


def test_an_upload_that_matches_becomes_the_data_directory(upload):
    assert op("datadir", **upload) == {"ok": True, "state": "stopped", "pid": None,
                                       "data": "absent"}
    files = upload["files"]
    r = adopt(upload)
    assert r == {"ok": True, "files": 3}, r
    d = upload["data_dir"]
    assert not upload["staging"].exists() and manifest(d) == files
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "snap").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in d.rglob("*") if p.is_file())
    assert op("datadir", **upload)["data"] == "used"


def test_an_empty_data_directory_is_replaced(upload):
    upload["data_dir"].mkdir()
    assert op("datadir", **upload)["data"] == "empty"
    assert adopt(upload)["ok"] is True
    assert (upload["data_dir"] / "data_id").read_text() == "f" * 32


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing", "extra"])
def test_a_damaged_upload_is_refused_and_nothing_is_adopted(upload, damage):
    s = upload["staging"]
    snap = next((s / "snap").iterdir())
    if damage == "flipped":  # same size, one byte changed
        data = bytearray(snap.read_bytes())
        data[100] ^= 1
        snap.write_bytes(bytes(data))
    elif damage == "truncated":
        snap.write_bytes(snap.read_bytes()[:-1])
    elif damage == "missing":
        (s / "hardstate").unlink()
    else:
        (s / "wal" / "00000001.wal").write_bytes(b"x")
    r = adopt(upload)
    assert r["ok"] is False and r["kind"] == "damaged", r
    assert not upload["data_dir"].exists()


def test_a_used_data_directory_is_never_replaced(upload):
    d = upload["data_dir"]
    d.mkdir()
    (d / "data_id").write_text("old")
    r = adopt(upload)
    assert r["ok"] is False and r["kind"] == "not_empty", r
    assert (d / "data_id").read_text() == "old" and upload["staging"].exists()


def test_a_running_agent_keeps_its_directory(upload):
    # A process that looks like the node's agent (nodeagent and its config on its command
    # line), recorded in the pid file as the host's start op records it.
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "nodeagent",
                          str(upload["config"])])
    try:
        ticks = int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        upload["pid_file"].write_text(json.dumps({"pid": p.pid, "start_ticks": ticks}) + "\n")
        st = op("datadir", **upload)
        assert st["state"] == "running" and st["pid"] == p.pid, st
        r = adopt(upload)
        assert r["ok"] is False and r["kind"] == "running" and r["pid"] == p.pid, r
        assert not upload["data_dir"].exists()
    finally:
        p.kill()
        p.wait()
