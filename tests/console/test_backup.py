"""`raftdeck backup` and `raftdeck restore` (console/backup.py) on real agents: a backup
taken under a running cluster, every data directory lost, the cluster restored from the
file and serving the same keys and tasks; and every refusal an operator can meet."""

from __future__ import annotations

import asyncio
import json
import shutil

import msgpack
import pytest

from console import backup
from tests.console.test_cli import run, run_json

pytestmark = pytest.mark.integration


@pytest.mark.long(12)  # seconds, roughly: the longest start first
def test_a_cluster_restored_from_a_backup_serves_what_was_committed(make_cluster, tmp_path):
    lc = make_cluster(3, snapshot_interval=200)  # the log is compacted: a snapshot + a tail
    inv = lc.inventory
    # 1.6 MB of values: the backup is fetched in two chunks
    keys = {f"k{i:03d}": (f"v{i}".encode() * 1000)[:4000 + i] for i in range(400)}

    async def fill():
        async with lc.client() as c:
            await lc.wait_leader(c)
            for k, v in keys.items():
                await c.put(k, v)
            for k in list(keys)[:50]:
                await c.delete(k)
                del keys[k]
            ids = [f"t{i}" for i in range(5)]
            await c.submit([{"id": t, "kind": "echo", "args": {"data": t.encode()},
                             "timeout_ms": 30_000} for t in ids])
            done = {r["id"]: r for r in await c.wait(ids, timeout=60)}
            # Running while the backup is taken: after the restore it must still end.
            await c.submit([{"id": "slow", "kind": "sleep", "args": {"ms": 4_000},
                             "timeout_ms": 60_000, "max_attempts": 3}])
            for _ in range(200):
                if (await c.task("slow"))["state"] == "running":
                    break
                await asyncio.sleep(0.05)
            return done

    tasks = asyncio.run(fill())
    assert all(r["state"] == "succeeded" for r in tasks.values()), tasks

    file = tmp_path / "cluster.backup"
    rc, meta, err = run_json(inv, "backup", str(file))
    assert rc == 0, err
    assert meta["index"] > 400 and meta["file"] == str(file) and meta["cluster"] == "test"
    assert meta["size"] > 1 << 20  # more than one chunk
    b = backup.decode(file.read_bytes(), str(file))
    assert b.index == meta["index"] and b.sha256 == meta["sha256"]
    # On a follower: it serializes the state, after the same barrier (so nothing is
    # missing); --stale names the replica whose applied state to save.
    follower = next(n for n in lc.names if n != meta["node"])
    rc, fmeta, err = run_json(inv, "backup", str(tmp_path / "f.backup"), "--node", follower)
    assert rc == 0 and fmeta["node"] == follower and fmeta["index"] >= meta["index"], err
    rc, _, err = run(inv, "backup", str(tmp_path / "s.backup"), "--stale")
    assert rc == 2 and "--stale needs --node" in err, err
    from nodeagent.state import StateMachine

    held = StateMachine()
    held.restore(b.state)
    assert held.get("k399") == keys["k399"] and held.get("k000") is None
    was_running = held.task("slow")["state"] == "running"  # almost always: a 4 s sleep

    # What the file holds, from --check: the counts of the state that was backed up.
    rc, info, err = run_json(inv, "restore", str(file), "--check")
    assert rc == 1 and info["ready"] is False and len(info["problems"]) == 3, (info, err)
    assert info["keys"] == len(keys) and info["index"] == b.index, info
    assert info["voters"] == ["n1", "n2", "n3"] and info["digest"] == held.digest(), info
    assert info["tasks"] == {st: n for st, n in held.task_counts().items() if n}, info
    assert info["tasks"].get("succeeded") == 5 and info["sessions"] >= 1, info

    # Refused while the agents run; then every data directory is lost.
    rc, _, err = run(inv, "restore", str(file))
    assert rc == 1 and "is running" in err and "raftdeck down" in err, err
    lc.stop_all()
    data = lc.tmp / "data"
    rc, _, err = run(inv, "restore", str(file))
    assert rc == 1 and "is not empty: move it aside" in err, err
    shutil.move(data, lc.tmp / "data.lost")
    rc, out, err = run(inv, "restore", str(file), "--check")
    assert rc == 0 and out.splitlines()[-1].startswith("ready: "), (out, err)
    assert f"{len(keys)} keys" in out and not data.exists()  # --check wrote nothing
    rc, out, err = run(inv, "restore", str(file))
    assert rc == 0 and f"restored index {b.index}" in out and "raftdeck up" in out, err
    lc.start_all()

    async def check():
        async with lc.client() as c:
            await lc.wait_leader(c)
            st = await lc.wait_converged(c)
            assert all(s["applied"] >= b.index for s in st.values())
            assert all(sorted(s["voters"]) == lc.names for s in st.values())
            for k, v in keys.items():
                assert await c.get(k) == v, k
            assert await c.get("k000") is None  # deleted before the backup
            for t, r in tasks.items():
                got = await c.task(t)
                assert got["state"] == "succeeded" and got["stdout"] == r["stdout"], got
            if was_running:
                assert (await c.task("slow"))["state"] == "running"  # as it was backed up
            [slow] = await c.wait(["slow"], timeout=120)
            assert slow["state"] == "succeeded", slow
            await c.put("after", b"restore")  # a working cluster: it commits
            assert await c.get("after") == b"restore"
            await lc.wait_converged(c)

    asyncio.run(check())


def test_a_damaged_or_foreign_file_is_refused_before_anything_is_written(tmp_path):
    good = backup.Backup(cluster="c", node="n1", index=5, term=2, taken_at_ms=1, size=3,
                         sha256="0" * 64, state=b"abc")
    cases = {
        "notmsgpack": (b"\xc1\xc1", "not a raftdeck backup"),
        "otherformat": (msgpack.packb({"format": "x"}), "not a raftdeck backup"),
        "newer": (msgpack.packb({"format": backup.FORMAT, "version": 9}), "version 9"),
        "damaged": (backup.encode(good), "damaged"),
        "missing": (msgpack.packb({"format": backup.FORMAT, "version": 1, "cluster": "c"}),
                    "field 'node' missing"),
    }
    for name, (blob, words) in cases.items():
        f = tmp_path / name
        f.write_bytes(blob)
        with pytest.raises(backup.BackupError) as e:
            backup.decode(blob, str(f))
        assert str(f) in str(e.value) and words in str(e.value), (name, e.value)
    # Through the command: exit 2, one line, no data directory touched.
    inv = tmp_path / "inventory.yaml"
    inv.write_text("cluster: {name: c, tls: off}\nnodes:\n"
                   "  - {name: n1, host: 127.0.0.1, port: 1, data_dir: data/n1}\n")
    rc, out, err = run(inv, "restore", str(tmp_path / "damaged"))
    assert rc == 2 and "damaged" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "data").exists()
    rc, out, err = run(inv, "restore", str(tmp_path / "nothing-here"))
    assert rc == 2 and "cannot read" in err, err


def test_an_empty_log_is_no_backup(tmp_path):
    import hashlib

    empty = backup.Backup(cluster="c", node="n1", index=0, term=0, taken_at_ms=1, size=1,
                          sha256=hashlib.sha256(b"x").hexdigest(), state=b"x")
    with pytest.raises(backup.BackupError, match="empty log"):
        backup.decode(backup.encode(empty), "f")
    assert json.dumps(empty.meta())  # the JSON output's fields are plain


def test_the_restored_state_takes_the_inventorys_membership_and_keeps_the_rest():
    """A backup of a 3-node cluster restored under another membership: the state's own
    record of the membership (a snapshot carries it) is the new one, its digest stays
    consistent, and everything else is as it was."""
    import hashlib

    from nodeagent.raft.messages import ConfChange, ConfChangeOp, ConfState
    from nodeagent.state import StateMachine, encode_command

    sm = StateMachine()
    old = ConfState.of(["n1", "n2", "n3"], [], {"n1": 1, "n2": 1, "n3": 1})
    sm.apply_conf_change(1, ConfChange(ConfChangeOp.BOOTSTRAP, bootstrap=old).encode())
    for i in range(2, 40):
        sm.apply(i, encode_command("put", key=f"k{i}", value=b"v%d" % i))
    data = sm.snapshot()
    b = backup.Backup(cluster="c", node="n1", index=sm.applied_index, term=1, taken_at_ms=1,
                      size=len(data), sha256=hashlib.sha256(data).hexdigest(), state=data)
    new = ConfState.of(["a", "b"], ["c"], {"a": 2, "b": 1, "c": 0})
    restored = StateMachine()
    restored.restore(backup.restored_state(b, new))
    assert restored.conf == new and restored.applied_index == b.index
    assert restored.digest() == restored.digest_full()
    assert [restored.get(f"k{i}") for i in range(2, 40)] == [sm.get(f"k{i}") for i in range(2, 40)]
    sm.reset_membership(new)  # in place, the running digest follows the change
    assert sm.digest() == sm.digest_full() == restored.digest()
