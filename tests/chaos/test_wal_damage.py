"""torn-tail-and-corruption: damage a real agent's WAL (written by a real cluster with
fsync) at random offsets. A damaged tail loses exactly the records from the damage on;
corruption in the middle is refused with file and offset, and that node stays out of
the cluster instead of rejoining as a voter with a damaged log."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import time
from pathlib import Path

import pytest

from nodeagent.raft.messages import Entry
from nodeagent.storage import DiskStorage, StorageCorruption

pytestmark = pytest.mark.integration


def spans(path: Path) -> list[tuple[int, int]]:
    buf = path.read_bytes()
    out, pos = [], 0
    while pos < len(buf):
        (n,) = struct.unpack_from(">I", buf, pos)
        out.append((pos, pos + 8 + n))
        pos += 8 + n
    assert pos == len(buf)
    return out


def recover(d: Path):
    s = DiskStorage.open(d)
    try:
        r = s.recovered()
        return [(e.index, e.term, bytes(e.data)) for e in r.entries]
    finally:
        s.close()


def last_segment(d: Path) -> Path:
    return sorted((d / "wal").glob("wal-*.log"))[-1]


def append_unsynced(d: Path, n: int = 30) -> int:
    """Append ``n`` entries past the commit index (what a crash mid-append leaves: records
    the leader sent but that never committed); returns the old last index. A torn tail can
    only hit such records: everything up to the commit index was fsynced before it
    counted, and losing any of it is refused as corruption (see the third test)."""
    s = DiskStorage.open(d)
    try:
        r = s.recovered()
        last = r.entries[-1]
        s.save(None, [Entry(last.term, last.index + 1 + i, b"") for i in range(n)], None)
        s.sync()
        return last.index
    finally:
        s.close()


def _fill(lc, n=80):
    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            for i in range(n):
                await c.put(f"k{i}", b"v%d" % i)
            await lc.wait_converged(c)
    asyncio.run(main())


def test_torn_tail_at_fifty_random_offsets_keeps_every_record_before_it(make_cluster, tmp_path):
    lc = make_cluster(3)
    _fill(lc)
    lc.stop_all()
    data = tmp_path / "n1"
    shutil.copytree(lc.tmp / "data" / "n1", data)
    committed = len(recover(data))
    append_unsynced(data)
    full = recover(data)
    seg = last_segment(data)
    sp = spans(seg)
    orig = seg.read_bytes()
    size = len(orig)
    first_unsynced = len(sp) - 30
    rng = random.Random(8)
    for case in range(50):
        d = tmp_path / f"case{case}"
        shutil.copytree(data, d)
        path = last_segment(d)
        j = rng.randrange(first_unsynced, len(sp))  # a record past the commit index
        start, end = sp[j]
        mode = rng.choice(["truncate", "zeros", "flip-last"])
        if mode == "truncate":
            off = rng.randrange(start, end)
            os.truncate(path, off)
        elif mode == "zeros":
            off = rng.randrange(start, end)
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(b"\0" * (size - off))
        else:  # a flipped byte in the very last record: a torn tail, not mid-log damage
            j = len(sp) - 1
            start, end = sp[j]
            off = rng.randrange(start, end)
            with open(path, "r+b") as f:
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0x5A]))
        # The first byte that really changed (zeros over a zero byte change nothing) and
        # the record holding it; what the records before it hold is the same directory
        # cut at that record's start.
        damaged = path.read_bytes()
        changed = next((i for i, (a, b) in enumerate(zip(orig, damaged)) if a != b),
                       min(len(orig), len(damaged)))
        j = next((k for k, (a, b) in enumerate(sp) if a <= changed < b), len(sp))
        ref_dir = tmp_path / f"ref{case}"
        shutil.copytree(data, ref_dir)
        if j < len(sp):
            os.truncate(last_segment(ref_dir), sp[j][0])
        want = recover(ref_dir)
        got = recover(d)
        assert got == want, (case, mode, j, off)
        assert got == full[:len(got)]  # a prefix of what was written
        assert len(got) >= committed + (j - first_unsynced)  # every record before the damage
        shutil.rmtree(d)
        shutil.rmtree(ref_dir)


def test_torn_tail_node_rejoins_and_catches_up(make_cluster):
    lc = make_cluster(3)
    _fill(lc)
    lc.stop_all()
    append_unsynced(lc.tmp / "data" / "n2")
    seg = last_segment(lc.tmp / "data" / "n2")
    sp = spans(seg)
    start, end = sp[-20]
    os.truncate(seg, random.Random(3).randrange(start, end))
    lc.start_all()

    async def main():
        async with lc.client() as c:
            await lc.wait_leader(c)
            await c.put("after", b"1")
            await lc.wait_converged(c)
            for i in (0, 40, 79):
                assert await c.get(f"k{i}", consistency="stale", node="n2") == b"v%d" % i
    asyncio.run(main())


def test_corruption_in_the_middle_is_refused_and_the_node_stays_out(make_cluster, tmp_path):
    lc = make_cluster(3)
    _fill(lc)
    lc.stop_all()
    data = lc.tmp / "data" / "n3"
    seg = last_segment(data)
    sp = spans(seg)
    start, end = sp[len(sp) // 2]
    off = random.Random(5).randrange(start + 8, end)  # inside the payload: a bad crc
    with open(seg, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(StorageCorruption) as ei:
        DiskStorage.open(data)
    assert (ei.value.path, ei.value.offset) == (str(seg), start)
    # Losing synced (committed) records from the end is refused too, never taken as a torn tail.
    cut = tmp_path / "cut"
    shutil.copytree(lc.tmp / "data" / "n2", cut)
    os.truncate(last_segment(cut), spans(last_segment(cut))[-3][0])
    with pytest.raises(StorageCorruption, match="commit index"):
        DiskStorage.open(cut)
    lc.start_all()

    async def main():
        async with lc.client(timeout=1.0) as c:
            deadline = time.monotonic() + 30
            while lc.alive("n3"):
                assert time.monotonic() < deadline, "n3 started on a corrupt log"
                await asyncio.sleep(0.05)
            assert lc.procs["n3"].returncode != 0
            err = lc.stderr("n3")
            assert str(seg) in err and f"offset {start}" in err, err
            # The other two carry on without it; n3 is not a member anyone hears from.
            ld = await lc.wait_leader(c, among=["n1", "n2"])
            await c.put("without-n3", b"1")
            st = await c.status(ld)
            assert st["progress"]["n3"]["match"] < st["commit"], st["progress"]
    asyncio.run(main())
