"""DiskStorage on a filesystem that fills up: a real, small one mounted for the test.

tmpfs (any root) for running out of space; ext4 on a loop device for what ext4 does with a
block reservation that fails. Both need root, as CI has; elsewhere they are skipped.
"""

from __future__ import annotations

import errno
import os

import pytest

from nodeagent.raft.messages import Entry, HardState
from nodeagent.storage import DiskStorage, StorageFailed, disk_usage
from tests.smallfs import fill

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")


def test_a_full_disk_fails_the_storage_and_loses_nothing_synced(small_fs, tmp_path):
    fs = small_fs.mount(tmp_path / "fs", 8)
    fill(fs, 1 << 20)
    s = DiskStorage.open(fs / "data", fsync=True, segment_bytes=4 << 20)
    synced: list[Entry] = []
    value = b"v" * 20_000
    index = 0
    with pytest.raises(StorageFailed) as info:
        for _ in range(10_000):
            batch = [Entry(1, index + k, value) for k in (1, 2)]
            s.save(HardState(1, "a", 0), batch, None)
            s.sync()
            synced += batch
            index += 2
    err = info.value
    assert err.errno == errno.ENOSPC
    assert "the disk is full under" in str(err) and str(fs / "data") in str(err)
    assert "free space there" in str(err)
    assert len(synced) > 10  # the megabyte left held some
    # Refused from then on, with the same explanation; stats say why.
    with pytest.raises(StorageFailed, match="the disk is full"):
        s.save(None, [Entry(1, index + 1, b"x")], None)
    with pytest.raises(StorageFailed):
        s.sync()
    assert "the disk is full" in s.stats()["failed"]
    s.close()
    # The operator frees space; the node starts again with every synced entry.
    os.unlink(fs / "ballast")
    s2 = DiskStorage.open(fs / "data", fsync=True, segment_bytes=4 << 20)
    got = s2.recovered().entries
    assert [e.index for e in got[: len(synced)]] == [e.index for e in synced]
    assert all(e.data == value for e in got)
    assert len(got) - len(synced) <= 2  # at most the batch whose sync failed, whole
    s2.save(None, [Entry(1, len(got) + 1, b"after")], None)
    s2.sync()
    s2.close()


def test_no_block_reservation_on_a_filling_disk(small_fs, tmp_path):
    fs = small_fs.mount(tmp_path / "fs", 64)
    s = DiskStorage.open(fs / "roomy", fsync=True, segment_bytes=4 << 20)
    st = s.stats()
    assert st["reserved_segments"] == 1 and st["reservations_skipped"] == 0
    s.close()
    fill(fs, 12 << 20)  # three segments' worth: under the reservation's four
    free0, _ = disk_usage(str(fs))
    s = DiskStorage.open(fs / "tight", fsync=True, segment_bytes=4 << 20)
    st = s.stats()
    assert st["reserved_segments"] == 0 and st["reservations_skipped"] == 1
    assert free0 - disk_usage(str(fs))[0] < 1 << 20  # a few blocks of metadata, no segment
    d = s.disk()
    assert d["needs_bytes"] == 4 << 20 and d["low"] is False  # 12 MiB free >= 2 x 4
    fill(fs, 6 << 20, name="ballast2")
    assert s.disk()["low"] is True
    s.close()


def test_a_failed_reservation_on_ext4_gives_its_blocks_back(small_fs, tmp_path, monkeypatch):
    """ext4 keeps whatever a failed fallocate allocated (all the free space, when it
    failed for want of it); the storage must hand it back, or the next write fails."""
    fs = small_fs.mount(tmp_path / "fs", 48, "ext4")
    free0, _ = disk_usage(str(fs))
    # Past the free-space check, so the reservation is tried and fails.
    monkeypatch.setattr(DiskStorage, "RESERVE_FREE_FACTOR", 0)
    s = DiskStorage.open(fs / "data", fsync=True, segment_bytes=free0 + (16 << 20))
    assert s.stats()["reservations_skipped"] == 1
    assert disk_usage(str(fs))[0] > free0 - (2 << 20)
    s.save(HardState(1, "a", 0), [Entry(1, i, b"y" * 4096) for i in range(1, 200)], None)
    s.sync()
    s.close()
