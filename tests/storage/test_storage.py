"""DiskStorage: real files in tmp_path, real fsync (unless a test says otherwise)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.raft.messages import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    PersistentState,
    Snapshot,
    SnapshotMeta,
)
from nodeagent.state import SnapshotChunks
from nodeagent.storage import DiskStorage, StorageCorruption

CONF = ConfState.of(["a", "b", "c"], ["d"], {"a": 3, "b": 0})


def ents(lo: int, hi: int, term: int = 1, tag: str = "e") -> list[Entry]:
    return [Entry(term, i, f"{tag}{i}".encode() * 3) for i in range(lo, hi + 1)]


def snap(index: int, term: int, data: bytes = b"") -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, CONF), data or f"state@{index}".encode())


def segments(d) -> list[str]:
    wal = os.path.join(d, "wal")
    return sorted(os.path.join(wal, n) for n in os.listdir(wal) if n.endswith(".log"))


def snapshots(d) -> list[str]:
    sd = os.path.join(d, "snap")
    return sorted(n for n in os.listdir(sd) if n.endswith(".snap"))


def record_spans(path) -> list[tuple[int, int]]:
    """(start, end) of every record in a WAL segment."""
    with open(path, "rb") as f:
        buf = f.read()
    spans, pos = [], 0
    while pos < len(buf):
        (n,) = struct.unpack_from(">I", buf, pos)
        spans.append((pos, pos + 8 + n))
        pos += 8 + n
    assert pos == len(buf)
    return spans


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def reopen(d, **kw) -> PersistentState:
    s = DiskStorage.open(d, **kw)
    try:
        return s.recovered()
    finally:
        s.close()


# -- round trips --------------------------------------------------------------------------


def test_fresh_dir_recovers_empty_state(tmp_path):
    s = DiskStorage.open(tmp_path / "n1")
    assert s.recovered() == PersistentState()
    assert s.recovered().is_empty()
    st_ = s.stats()
    assert (st_["last_index"], st_["first_index"], st_["segments"], st_["fsync"]) == (0, 1, 1, True)
    s.close()
    assert reopen(tmp_path / "n1") == PersistentState()


def test_round_trip_entries_hardstate_snapshot(tmp_path):
    d = tmp_path / "n1"
    cc = Entry(2, 11, b'{"op":"add_learner"}', EntryKind.CONF_CHANGE)
    with DiskStorage.open(d) as s:
        s.save(HardState(1, "a", 0), ents(1, 10), None)
        s.sync()
        s.save(HardState(2, None, 8), [cc, Entry(2, 12, b"")], None)
        s.sync()
    rec = reopen(d)
    assert rec.hard_state == HardState(2, None, 8)
    assert rec.snapshot is None
    assert rec.entries == (*ents(1, 10), cc, Entry(2, 12, b""))
    assert rec.entries[10].kind is EntryKind.CONF_CHANGE

    with DiskStorage.open(d) as s:
        s.compact(snap(7, 1, b"\x00binary\xffstate"))
        assert s.stats()["first_index"] == 8
    rec = reopen(d)
    assert rec.snapshot == snap(7, 1, b"\x00binary\xffstate")
    assert rec.snapshot.meta.conf == CONF
    assert [e.index for e in rec.entries] == list(range(8, 13))
    assert rec.hard_state == HardState(2, None, 8)


def test_unsynced_hardstate_is_written_by_close_and_commit_never_below_snapshot(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(HardState(3, "b", 2), ents(1, 5, 3), None)
        s.sync()
        s.save(HardState(3, "b", 5), [], None)  # commit-only change, no sync (must_sync False)
        s.compact(snap(5, 3))
    assert reopen(d).hard_state == HardState(3, "b", 5)  # close() synced it
    with DiskStorage.open(d) as s:
        s.save(HardState(4, "c", 1), [], None)  # a commit the file has below the snapshot
    assert reopen(d).hard_state == HardState(4, "c", 5)


# -- truncation and snapshots from the leader ---------------------------------------------


def test_truncation_survives_reopen(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(HardState(1, "a", 3), ents(1, 10, 1), None)
        s.sync()
        s.save(HardState(2, "b", 3), ents(6, 8, 2, "x"), None)  # conflicting suffix replaced
        s.sync()
        assert s.stats()["last_index"] == 8
    rec = reopen(d)
    assert rec.entries == (*ents(1, 5, 1), *ents(6, 8, 2, "x"))
    with DiskStorage.open(d) as s:  # and appending after a recovered truncation works
        s.save(None, ents(9, 9, 2, "y"), None)
        s.save(None, ents(4, 4, 3, "z"), None)
        s.sync()
    assert reopen(d).entries == (*ents(1, 3, 1), *ents(4, 4, 3, "z"))


def test_truncation_back_across_segments(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d, segment_bytes=300) as s:
        s.save(None, ents(1, 60, 1), None)
        n = len(segments(d))
        assert n > 3
        s.save(None, ents(5, 70, 2, "t"), None)  # goes back past several segments
        s.sync()
    names = [int(os.path.basename(p)[4:24]) for p in segments(d)]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert reopen(d, segment_bytes=300).entries == (*ents(1, 4, 1), *ents(5, 70, 2, "t"))


def test_snapshot_from_leader_that_conflicts_replaces_the_whole_log(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(HardState(1, "a", 2), ents(1, 10, 1), None)
        s.sync()
        # the leader's entry 8 has term 3, ours term 1: Figure 13 says discard the whole log
        s.save(HardState(3, None, 8), ents(9, 11, 3, "L"), snap(8, 3))
        s.sync()
        assert s.stats()["snapshot_index"] == 8 and s.stats()["last_index"] == 11
    rec = reopen(d)
    assert rec.snapshot == snap(8, 3)
    assert rec.entries == tuple(ents(9, 11, 3, "L"))
    assert rec.hard_state == HardState(3, None, 8)


def test_snapshot_from_leader_that_matches_keeps_the_log_after_it(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(None, ents(1, 10, 1), None)
        s.save(HardState(1, None, 6), [], snap(6, 1))
        s.sync()
    rec = reopen(d)
    assert rec.snapshot.meta.index == 6
    assert rec.entries == tuple(ents(7, 10, 1))


def test_snapshot_ahead_of_the_log(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(None, ents(1, 3, 1), None)
        s.save(HardState(2, None, 50), [], snap(50, 2))
        s.save(None, ents(51, 52, 2), None)
        s.sync()
    rec = reopen(d)
    assert rec.snapshot.meta.index == 50 and rec.entries == tuple(ents(51, 52, 2))


def test_install_interrupted_before_the_reset_record_drops_the_divergent_suffix(tmp_path, caplog):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(None, ents(1, 10, 1), None)
        s.sync()
        size = os.path.getsize(segments(d)[0])
        s.save(None, [], snap(8, 3))  # snapshot file written, then the RESET record
        s.sync()
    os.truncate(segments(d)[0], size)  # as if we crashed before the RESET record hit the disk
    with caplog.at_level(logging.WARNING, logger="nodeagent.storage"):
        rec = reopen(d)
    assert rec.snapshot.meta.index == 8 and rec.entries == ()
    assert "InstallSnapshot was interrupted" in caplog.text
    with DiskStorage.open(d) as s:  # the WAL was fixed up: the next entries follow on
        assert s.recovered().entries == ()
        s.save(None, ents(9, 9, 3), None)
        s.sync()
    assert reopen(d).entries == tuple(ents(9, 9, 3))


# -- compaction ---------------------------------------------------------------------------


def test_compact_drops_old_segments_and_recovery_yields_the_rest(tmp_path):
    d = tmp_path / "n1"
    s = DiskStorage.open(d, segment_bytes=400)
    s.save(HardState(1, "a", 200), ents(1, 200, 1), None)
    s.sync()
    before = len(segments(d))
    s.compact(snap(100, 1))
    after_first = segments(d)
    assert len(after_first) < before
    # the oldest remaining segment is the one that holds entry 101
    assert int(os.path.basename(after_first[0])[4:24]) <= 101 < int(os.path.basename(after_first[1])[4:24])
    s.close()
    assert [e.index for e in reopen(d, segment_bytes=400).entries] == list(range(101, 201))

    s = DiskStorage.open(d, segment_bytes=400)
    s.compact(snap(150, 1))  # two snapshots now: the WAL is kept back to the older (100)
    assert segments(d) == after_first
    s.compact(snap(190, 1))  # snapshots 150 and 190: segments wholly <= 150 go
    assert len(snapshots(d)) == 2 and snapshots(d)[0].startswith("snap-00000000000000000150")
    remaining = segments(d)
    assert len(remaining) < len(after_first)
    assert s.stats()["segments"] == len(remaining)
    s.save(None, ents(201, 205, 1), None)
    s.sync()
    s.close()
    rec = reopen(d, segment_bytes=400)
    assert rec.snapshot == snap(190, 1)
    assert rec.entries == tuple(ents(191, 205, 1))


# -- torn tails ---------------------------------------------------------------------------


def _build_log(d, n=12, **kw):
    with DiskStorage.open(d, **kw) as s:
        s.save(HardState(1, "a", 0), ents(1, n, 1), None)
        s.sync()
    return segments(d)[-1]


def test_torn_tail_at_every_byte_offset_of_the_last_record_is_repaired(tmp_path):
    orig = tmp_path / "orig"
    seg = _build_log(orig)
    start, end = record_spans(seg)[-1]
    assert end - start > 20
    for cut in range(start, end):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(orig, d)
        os.truncate(segments(d)[-1], cut)
        s = DiskStorage.open(d)
        assert s.recovered().entries == tuple(ents(1, 11, 1)), cut
        assert os.path.getsize(segments(d)[-1]) == start
        st_ = s.stats()
        assert st_["repaired"] == (cut > start)
        if cut > start:
            assert st_["repairs"][0]["offset"] == start
            assert st_["repairs"][0]["dropped_bytes"] == cut - start
        s.save(None, ents(12, 13, 2), None)  # writing goes on after the repair
        s.sync()
        s.close()
        assert reopen(d).entries == (*ents(1, 11, 1), *ents(12, 13, 2)), cut
        shutil.rmtree(d)


def test_bad_crc_anywhere_in_the_last_record_is_a_torn_tail(tmp_path):
    orig = tmp_path / "orig"
    seg = _build_log(orig)
    start, end = record_spans(seg)[-1]
    for off in range(start, end):
        d = tmp_path / f"flip{off}"
        shutil.copytree(orig, d)
        flip(segments(d)[-1], off)
        s = DiskStorage.open(d)
        assert s.recovered().entries == tuple(ents(1, 11, 1)), off
        assert s.stats()["repaired"]
        s.close()
        shutil.rmtree(d)


def test_trailing_zeros_are_a_torn_tail(tmp_path):
    d = tmp_path / "n1"
    seg = _build_log(d)
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(b"\0" * 10000)  # e.g. a file system that extended the file but lost the data
    s = DiskStorage.open(d)
    assert s.recovered().entries == tuple(ents(1, 12, 1))
    assert s.stats()["repairs"][0]["dropped_bytes"] == 10000
    assert os.path.getsize(seg) == size
    s.close()

    start, end = record_spans(seg)[-1]
    with open(seg, "r+b") as f:  # the last record's page never written: zeros in its place
        f.seek(start)
        f.write(b"\0" * (end - start))
    assert reopen(d).entries == tuple(ents(1, 11, 1))


# -- corruption in the middle -------------------------------------------------------------


def test_flipped_byte_in_a_middle_record_raises_naming_file_and_offset(tmp_path):
    orig = tmp_path / "orig"
    seg = _build_log(orig)
    start, end = record_spans(seg)[5]
    for off in range(start, end):
        d = tmp_path / f"flip{off}"
        shutil.copytree(orig, d)
        path = segments(d)[-1]
        size = os.path.getsize(path)
        flip(path, off)
        with pytest.raises(StorageCorruption) as ei:
            DiskStorage.open(d)
        msg = str(ei.value)
        assert msg.startswith(f"{path}: corrupt record at byte offset {start} ("), msg
        assert "restore this node from a peer" in msg and str(d) in msg
        assert (ei.value.path, ei.value.offset) == (path, start)
        assert os.path.getsize(path) == size  # nothing was "repaired"
        shutil.rmtree(d)
    # the directory is not left locked by the failed open
    DiskStorage.open(orig).close()


def test_damage_at_the_end_of_a_non_last_segment_is_corruption(tmp_path):
    d = tmp_path / "n1"
    _build_log(d, n=80, segment_bytes=300)
    segs = segments(d)
    assert len(segs) >= 3
    size = os.path.getsize(segs[1])
    os.truncate(segs[1], size - 3)
    with pytest.raises(StorageCorruption) as ei:
        DiskStorage.open(d, segment_bytes=300)
    assert str(ei.value).startswith(f"{segs[1]}: corrupt record at byte offset {record_spans_prefix(segs[1])}")
    assert "not the last" in str(ei.value)


def record_spans_prefix(path) -> int:
    """Offset of the (now incomplete) last record of a truncated segment."""
    with open(path, "rb") as f:
        buf = f.read()
    pos = 0
    while pos + 8 <= len(buf):
        (n,) = struct.unpack_from(">I", buf, pos)
        if pos + 8 + n > len(buf):
            break
        pos += 8 + n
    return pos


def test_missing_segment_is_a_gap(tmp_path):
    d = tmp_path / "n1"
    _build_log(d, n=80, segment_bytes=300)
    segs = segments(d)
    os.unlink(segs[2])
    with pytest.raises(StorageCorruption, match=r"corrupt record at byte offset 0 \(entry \d+ where entry \d+ was expected"):
        DiskStorage.open(d, segment_bytes=300)


def test_corrupt_hardstate_raises(tmp_path):
    d = tmp_path / "n1"
    _build_log(d)
    flip(d / "hardstate", 9)
    with pytest.raises(StorageCorruption, match=r"hardstate: corrupt hard state record at byte offset 0 \(crc32"):
        DiskStorage.open(d)


def test_a_missing_wal_directory_is_refused_not_made_again(tmp_path):
    """wal/ deleted by hand while the hard state remains: opening it again would give a
    node that kept its term and vote but forgot the entries it acknowledged."""
    d = tmp_path / "n1"
    _build_log(d)
    shutil.rmtree(d / "wal")
    with pytest.raises(StorageCorruption, match=r"wal is missing, but .*hardstate records term "
                                                  r"and vote: the log this node acknowledged is gone"):
        DiskStorage.open(d)
    assert not (d / "wal").exists()  # nothing made again: the next open refuses too
    with DiskStorage.open(tmp_path / "fresh") as s:  # a first start makes it
        assert s.recovered().hard_state.term == 0
    assert (tmp_path / "fresh" / "wal").is_dir()


def test_losing_the_newest_wal_segments_is_refused(tmp_path):
    """Segments deleted from the new end leave a log that reads back whole but is shorter
    than what the node acknowledged. The hard state names the newest segment each time one
    is made (not only when the term or vote changes), so the open refuses."""
    d = tmp_path / "n1"
    _build_log(d, n=20, segment_bytes=300)
    with DiskStorage.open(d, segment_bytes=300) as s:  # rolls with no term or vote change
        s.save(None, ents(21, 80, 1), None)
        s.sync()
    segs = segments(d)
    assert len(segs) >= 4
    for lost in (1, 2, len(segs)):
        c = tmp_path / f"lost{lost}"
        shutil.copytree(d, c)
        for path in segments(c)[-lost:]:
            os.unlink(path)
        newest = os.path.basename(segments(c)[-1]) if lost < len(segs) else "none"
        with pytest.raises(StorageCorruption, match=rf"WAL segment {os.path.basename(segs[-1])} is missing "
                                                     rf"\(the newest segment there is {newest}\)"):
            DiskStorage.open(c, segment_bytes=300)
    assert [e.index for e in reopen(d, segment_bytes=300).entries] == list(range(1, 81))
    # Without fsync (demo mode) a power loss may lose a segment the record names: that
    # loses writes, as such a node says it may, and is not damage.
    c = tmp_path / "nofsync"
    shutil.copytree(d, c)
    os.unlink(segments(c)[-1])
    assert reopen(c, segment_bytes=300, fsync=False).entries[-1].index < 80


def test_a_segment_newer_than_the_recorded_head_opens(tmp_path):
    """A crash after a segment was made but before the hard state named it: the record
    names the one before, which is there; nothing is lost."""
    d = tmp_path / "n1"
    _build_log(d, n=20, segment_bytes=300)
    old_hs = (d / "hardstate").read_bytes()
    with DiskStorage.open(d, segment_bytes=300) as s:
        s.save(None, ents(21, 40, 1), None)
        s.sync()
    (d / "hardstate").write_bytes(old_hs)
    assert [e.index for e in reopen(d, segment_bytes=300).entries] == list(range(1, 41))


def test_a_hard_state_written_before_the_wal_head_was_kept_still_opens(tmp_path):
    """Directories written by earlier agents hold four fields; from their next new
    segment on, the head is kept."""
    import msgpack

    from nodeagent.storage import _frame

    d = tmp_path / "n1"
    _build_log(d, n=20, segment_bytes=300)
    (d / "hardstate").write_bytes(_frame(msgpack.packb([1, 1, "a", 0])))
    os.unlink(segments(d)[-1])  # not detectable yet: the old record names no segment
    with DiskStorage.open(d, segment_bytes=300) as s:
        assert s.recovered().hard_state == HardState(1, "a", 0)
        last = s.recovered().entries[-1].index
        s.save(None, ents(last + 1, last + 40, 1), None)
        s.sync()
    os.unlink(segments(d)[-1])
    with pytest.raises(StorageCorruption, match=r"WAL segment wal-\d+\.log is missing"):
        DiskStorage.open(d, segment_bytes=300)


# -- snapshots ----------------------------------------------------------------------------


def test_corrupt_newest_snapshot_falls_back_to_the_older_one(tmp_path, caplog):
    d = tmp_path / "n1"
    with DiskStorage.open(d, segment_bytes=300) as s:
        s.save(HardState(1, "a", 0), ents(1, 60, 1), None)
        s.sync()
        s.compact(snap(20, 1))
        s.compact(snap(40, 1))
        s.compact(snap(50, 1))  # keeps 40 and 50; deletes 20
        s.save(HardState(1, "a", 50), [], None)
    assert snapshots(d) == ["snap-00000000000000000040-1.snap", "snap-00000000000000000050-1.snap"]
    newest = d / "snap" / "snap-00000000000000000050-1.snap"
    flip(newest, os.path.getsize(newest) - 2)
    with caplog.at_level(logging.WARNING, logger="nodeagent.storage"):
        s = DiskStorage.open(d, segment_bytes=300)
    assert "snap-00000000000000000050-1.snap" in caplog.text and "unreadable snapshot" in caplog.text
    rec = s.recovered()
    assert rec.snapshot == snap(40, 1)
    assert rec.entries == tuple(ents(41, 60, 1))
    assert rec.hard_state == HardState(1, "a", 50)
    assert s.stats()["snapshot_fallbacks"][0]["file"] == str(newest)
    s.close()
    assert os.path.exists(str(newest) + ".corrupt")  # kept aside for a post-mortem
    assert reopen(d).snapshot == snap(40, 1)


def test_only_the_newest_two_snapshots_are_kept(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(None, ents(1, 50, 1), None)
        s.sync()
        for i in (10, 20, 30, 40):
            s.compact(snap(i, 1))
        assert s.stats()["snapshots"] == 2
    assert snapshots(d) == ["snap-00000000000000000030-1.snap", "snap-00000000000000000040-1.snap"]
    assert not [n for n in os.listdir(d / "snap") if n.endswith(".tmp")]


# -- segments -----------------------------------------------------------------------------


def test_segment_rollover_with_small_segments(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d, segment_bytes=256) as s:
        for lo in range(1, 301, 7):
            s.save(None, ents(lo, lo + 6, 1), None)
        s.sync()
        n = s.stats()["segments"]
    segs = segments(d)
    assert n == len(segs) > 20
    for path in segs:  # named after the first entry in it; never over the limit
        assert os.path.getsize(path) <= 256
        with open(path, "rb") as f:
            buf = f.read()
        first_index = int(os.path.basename(path)[4:24])
        assert f"e{first_index}".encode() in buf[:64]
    rec = reopen(d, segment_bytes=256)
    assert rec.entries == tuple(ents(1, 301, 1))


def test_segments_reserve_their_blocks_but_read_back_at_their_length(tmp_path):
    """Each segment's blocks are allocated when it is created (fallocate, keeping the
    length), so appends do not allocate; the file's length is still exactly what was
    written, and recovery reads the same entries as ever."""
    d = tmp_path / "n1"
    with DiskStorage.open(d, segment_bytes=1 << 16) as s:
        s.save(HardState(1, "a", 0), ents(1, 30), None)
        s.sync()
        s.save(None, ents(31, 4000), None)  # rolls over into new segments
        s.sync()
        written = s.stats()["bytes"]
        assert s.stats()["reserved_segments"] == s.stats()["segments"] > 1
    segs = segments(d)
    assert sum(os.path.getsize(p) for p in segs) == written
    last = os.stat(segs[-1])
    assert last.st_size < (1 << 16) <= last.st_blocks * 512  # allocated past its length
    assert reopen(d, segment_bytes=1 << 16).entries == tuple(ents(1, 4000))
    with DiskStorage.open(d, segment_bytes=1 << 16) as s:  # reopened: reserved again
        assert s.stats()["reserved_segments"] == 1
    with DiskStorage.open(tmp_path / "n2", fsync=False) as s:  # no fsync, nothing to gain
        assert s.stats()["reserved_segments"] == 0


# -- fsync accounting ---------------------------------------------------------------------


def test_group_commit_many_saves_one_fsync(tmp_path):
    with DiskStorage.open(tmp_path / "n1") as s:
        s.save(HardState(1, "a", 0), ents(1, 1), None)
        s.sync()
        before = s.stats()
        for i in range(2, 102):
            s.save(None, ents(i, i), None)
        assert s.stats()["fsync_calls"] == before["fsync_calls"]  # save() never fsyncs
        assert s.stats()["unsynced"]
        s.sync()
        after = s.stats()
        assert after["fsyncs"] == before["fsyncs"] + 1
        assert after["fsync_calls"] == before["fsync_calls"] + 1  # the segment only
        assert sum(after["fsync_latency_ms_buckets"].values()) == after["fsync_calls"]

        s.sync()  # nothing pending: no fsync at all
        assert s.stats()["fsync_calls"] == after["fsync_calls"]

        for i in range(102, 120):
            s.save(HardState(2, "b", i - 1), ents(i, i, 2), None)
        s.sync()
        last = s.stats()
        assert last["fsyncs"] == after["fsyncs"] + 1
        # segment + hardstate.tmp + data dir (for the rename)
        assert last["fsync_calls"] == after["fsync_calls"] + 3


def test_fsync_disabled_still_writes(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d, fsync=False, segment_bytes=300) as s:
        s.save(HardState(1, "a", 5), ents(1, 40), None)
        s.sync()
        s.compact(snap(10, 1))
        st_ = s.stats()
        assert st_["fsync"] is False and st_["fsync_calls"] == 0 and st_["fsyncs"] == 0
        assert st_["syncs"] == 1
    rec = reopen(d, fsync=False)
    assert rec.hard_state == HardState(1, "a", 10)
    assert rec.entries == tuple(ents(11, 40))


# -- processes ----------------------------------------------------------------------------


def test_second_process_cannot_open_the_same_dir(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d):
        code = (
            "import sys\nfrom nodeagent.storage import DiskStorage, StorageLocked\n"
            "try:\n    DiskStorage.open(sys.argv[1])\nexcept StorageLocked as e:\n    print('LOCKED', e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=30)
        assert out.stdout.startswith("LOCKED") and str(d) in out.stdout, out.stderr
    DiskStorage.open(d).close()  # released on close
    with pytest.raises(ValueError):
        s = DiskStorage.open(d)
        s.close()
        s.save(None, ents(1, 1), None)


CHILD = textwrap.dedent(
    """
    import random, sys
    from nodeagent.raft.messages import Entry, HardState
    from nodeagent.storage import DiskStorage

    d, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    s = DiskStorage.open(d, segment_bytes=16 << 10)
    rec = s.recovered()
    last = rec.entries[-1].index if rec.entries else 0
    term = rec.entries[-1].term if rec.entries else 1
    print("START", last, flush=True)
    while True:
        if last > 3 and rng.random() < 0.05:  # a new leader overwrites our unsynced-ish tail
            term += 1
            first = last - rng.randint(0, 3)
        else:
            first = last + 1
        n = rng.randint(1, 30)
        batch = [Entry(term, i, b"%d:" % i + b"x" * rng.randint(0, 200)) for i in range(first, first + n)]
        s.save(HardState(term, "n1", max(0, first - 1)), batch, None)
        last = first + n - 1
        if rng.random() < 0.5:
            s.sync()
            print(last, flush=True)
    """
)


def test_sigkill_while_writing_recovers_a_prefix_with_everything_synced(tmp_path):
    d = tmp_path / "n1"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    for round_ in range(4):
        p = subprocess.Popen(
            [sys.executable, str(script), str(d), str(round_)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        synced = []
        try:
            start = p.stdout.readline()
            assert start.startswith("START"), p.stderr.read()
            while len(synced) < 30 + 10 * round_:
                line = p.stdout.readline()
                assert line, p.stderr.read()
                synced.append(int(line))
        finally:
            os.kill(p.pid, signal.SIGKILL)  # mid-loop: the child never stops writing
            p.wait()
        rest = p.stdout.read().split()  # reported before the kill landed
        p.stdout.close()
        p.stderr.close()
        assert p.returncode == -signal.SIGKILL
        durable = max([*synced, *(int(x) for x in rest)])

        s = DiskStorage.open(d, segment_bytes=16 << 10)
        rec = s.recovered()
        idx = [e.index for e in rec.entries]
        assert idx == list(range(1, len(idx) + 1))  # a contiguous prefix
        assert len(idx) >= durable
        for e in rec.entries:
            assert e.data.startswith(b"%d:" % e.index)
        terms = [e.term for e in rec.entries]
        assert terms == sorted(terms)
        assert rec.hard_state.term >= 1 and rec.hard_state.vote == "n1"
        assert rec.hard_state.commit <= len(idx)
        s.close()
    assert len(segments(d)) > 1  # the kills also landed across segment rollovers


# -- a model check --------------------------------------------------------------------------


class Model:
    """What the log must be: the Raft rules, in memory."""

    def __init__(self):
        self.base = (0, 0)
        self.snapshot: Snapshot | None = None
        self.log: list[Entry] = []
        self.term = 1
        self.durable_hs = HardState()
        self.pending_hs: HardState | None = None
        self.n = 0

    def last(self) -> int:
        return self.base[0] + len(self.log)

    def term_at(self, i: int) -> int:
        return self.log[i - self.base[0] - 1].term

    def data(self) -> bytes:
        self.n += 1
        return b"d%d" % self.n

    def expected(self) -> PersistentState:
        hs = self.durable_hs
        return PersistentState(HardState(hs.term, hs.vote, max(hs.commit, self.base[0])), self.snapshot, tuple(self.log))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 6), st.integers(1, 8), st.booleans()),
        st.tuples(st.just("compact"), st.integers(0, 1000)),
        st.tuples(st.just("install"), st.integers(-4, 8), st.booleans()),
        st.tuples(st.just("sync")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("crash")),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_model_random_operations_then_reopen(script):
    d = tempfile.mkdtemp(prefix="storage-model-")
    m = Model()
    kw = dict(fsync=False, segment_bytes=200)
    s = DiskStorage.open(d, **kw)
    try:
        for op in script:
            if op[0] == "append":
                _, back, n, bump = op
                first = max(m.base[0] + 1, m.last() + 1 - back)
                if bump or first <= m.last():
                    m.term += 1
                batch = [Entry(m.term, i, m.data()) for i in range(first, first + n)]
                hs = HardState(m.term, "v", m.base[0])
                s.save(hs, batch, None)
                m.log = m.log[: first - m.base[0] - 1] + batch
                m.pending_hs = None if hs == m.durable_hs else hs
            elif op[0] == "compact":
                if m.last() > m.base[0]:
                    i = m.base[0] + 1 + op[1] % (m.last() - m.base[0])
                    sn = Snapshot(SnapshotMeta(i, m.term_at(i), CONF), m.data())
                    s.compact(sn)
                    m.log = m.log[i - m.base[0] :]
                    m.base, m.snapshot = (i, sn.meta.term), sn
            elif op[0] == "install":
                _, off, match = op
                i = m.last() + off
                if i > m.base[0]:
                    if match and i <= m.last():
                        t = m.term_at(i)
                        m.log = m.log[i - m.base[0] :]
                    else:
                        m.term += 1
                        t = m.term
                        m.log = []
                    sn = Snapshot(SnapshotMeta(i, t, CONF), m.data())
                    s.save(None, [], sn)
                    m.base, m.snapshot = (i, t), sn
            elif op[0] == "sync":
                s.sync()
                # sync() writes the hard state when term or vote changed; a commit-only
                # change waits for close() (or the next term/vote change)
                p = m.pending_hs
                if p is not None and (p.term, p.vote) != (m.durable_hs.term, m.durable_hs.vote):
                    m.durable_hs, m.pending_hs = p, None
            else:
                if op[0] == "reopen":
                    s.close()
                    if m.pending_hs is not None:
                        m.durable_hs, m.pending_hs = m.pending_hs, None
                else:  # crash: nothing more is written; the page cache (our writes) survives
                    s._close_fds()
                    m.pending_hs = None
                s = DiskStorage.open(d, **kw)
                assert s.recovered() == m.expected()
            st_ = s.stats()
            assert (st_["snapshot_index"], st_["last_index"]) == (m.base[0], m.last())
        s.close()
        if m.pending_hs is not None:
            m.durable_hs = m.pending_hs
        s = DiskStorage.open(d, **kw)
        assert s.recovered() == m.expected()
        s.close()
    finally:
        shutil.rmtree(d)


def test_a_commit_only_change_costs_no_hard_state_rewrite(tmp_path):
    """sync() rewrites the hard state file (two more fsyncs) only when term or vote
    changed; a commit-only change waits for the next such change or close()."""
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        s.save(HardState(2, "a", 0), ents(1, 3, 2), None)
        s.sync()
        calls = s.stats()["fsync_calls"]
        s.save(HardState(2, "a", 3), ents(4, 4, 2), None)  # new entry + commit-only change
        s.sync()
        assert s.stats()["fsync_calls"] == calls + 1  # the WAL alone
        assert s.stats()["unsynced"] is False
        s.save(HardState(3, None, 3), [], None)  # a new term must be durable
        s.sync()
        assert s.stats()["fsync_calls"] > calls + 1
        s.save(HardState(3, None, 4), [], None)
        s.sync()
    assert reopen(d).hard_state == HardState(3, None, 4)  # close() wrote the commit


def test_a_crash_keeps_term_and_vote_and_an_older_commit(tmp_path):
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(5, "b", 0), ents(1, 6, 5), None)
    s.sync()
    s.save(HardState(5, "b", 6), [], None)
    s.sync()
    s._close_fds()  # a crash: no close(), the lock goes with the process
    from nodeagent import storage as storage_mod
    storage_mod._unlock_dir(s._lock_key)
    rec = reopen(d)
    assert (rec.hard_state.term, rec.hard_state.vote) == (5, "b")
    assert rec.hard_state.commit <= 6
    assert [e.index for e in rec.entries] == list(range(1, 7))


# -- snapshots written in the background ----------------------------------------------------


def test_background_snapshot_write_then_finish_is_compact(tmp_path):
    """write_snapshot_file (in a worker thread) + finish_compact (under the lock) leave the
    same directory as compact(): the snapshot, the WAL after the older kept snapshot.
    With delete=False, finish_compact moves the base at once but unlinks nothing, and
    delete_purged() (a worker thread's job in the agent) then deletes the same files."""
    dirs = {}
    for how in ("compact", "split", "deferred"):
        d = dirs[how] = tmp_path / how
        s = DiskStorage.open(d, segment_bytes=400)
        s.save(HardState(1, "a", 200), ents(1, 200, 1), None)
        s.sync()
        for i in (100, 150, 190):
            if how == "compact":
                s.compact(snap(i, 1))
                continue
            base = s.stats()["snapshot_index"]
            files = (snapshots(d), segments(d))
            assert s.write_snapshot_file(snap(i, 1))
            assert s.stats()["snapshot_index"] == base  # nothing moved yet
            assert s.finish_compact(snap(i, 1), delete=how == "split")
            assert s.stats()["snapshot_index"] == i
            if how == "deferred":
                assert set(files[0]) <= set(snapshots(d)) and segments(d) == files[1]  # all there
                s.delete_purged()
                assert s.delete_purged() == 0  # nothing twice
        s.save(None, ents(201, 205, 1), None)
        s.sync()
        s.close()
    assert len(snapshots(dirs["compact"])) == 2  # compaction deleted something
    for how in ("split", "deferred"):
        assert snapshots(dirs[how]) == snapshots(dirs["compact"]), how
        assert [os.path.basename(p) for p in segments(dirs[how])] == [
            os.path.basename(p) for p in segments(dirs["compact"])], how
        rec = reopen(dirs[how], segment_bytes=400)
        assert rec.snapshot == snap(190, 1) and rec.entries == tuple(ents(191, 205, 1))


def test_a_crash_between_the_snapshot_write_and_finish_recovers_from_it(tmp_path):
    """The file is in place but the in-memory base and the WAL were not touched: recovery
    starts at the new snapshot and replays the WAL after it; the older snapshot is kept."""
    d = tmp_path / "n1"
    s = DiskStorage.open(d, segment_bytes=400)
    s.save(HardState(1, "a", 120), ents(1, 120, 1), None)
    s.sync()
    s.compact(snap(50, 1))
    assert s.write_snapshot_file(snap(100, 1))
    s.save(None, ents(121, 130, 1), None)  # the node went on meanwhile
    s.sync()
    crashed = tmp_path / "crashed"  # what a crash here leaves on disk: no close, no finish
    shutil.copytree(d, crashed)
    s.close()
    d = crashed
    rec = reopen(d, segment_bytes=400)
    assert rec.snapshot == snap(100, 1)
    assert rec.entries == tuple(ents(101, 130, 1))
    assert snapshots(d) == ["snap-00000000000000000050-1.snap", "snap-00000000000000000100-1.snap"]


def test_a_crash_before_delete_purged_recovers_and_the_next_compaction_deletes(tmp_path):
    """The agent dies after finish_compact(delete=False) and before the worker thread
    unlinked anything: the old snapshot and segments are still on disk. Recovery starts
    at the newest snapshot, and the next compaction deletes the leftovers."""
    d = tmp_path / "n1"
    s = DiskStorage.open(d, segment_bytes=400)
    s.save(HardState(1, "a", 200), ents(1, 200, 1), None)
    s.sync()
    for i in (100, 150):
        s.compact(snap(i, 1))
    kept_segments = segments(d)
    twin = tmp_path / "twin"  # the same history without the crash
    shutil.copytree(d, twin)
    assert s.write_snapshot_file(snap(190, 1))
    assert s.finish_compact(snap(190, 1), delete=False)
    crashed = tmp_path / "crashed"  # no delete_purged, no close
    shutil.copytree(d, crashed)
    s.close()
    assert len(snapshots(crashed)) == 3 and segments(crashed) == [
        p.replace(str(d), str(crashed)) for p in kept_segments]
    s = DiskStorage.open(crashed, segment_bytes=400)
    rec = s.recovered()
    assert rec.snapshot == snap(190, 1) and rec.entries == tuple(ents(191, 200, 1))
    s.save(None, ents(201, 260, 1), None)
    s.sync()
    s.compact(snap(250, 1))  # keeps 190 and 250; everything older goes
    assert snapshots(crashed) == ["snap-00000000000000000190-1.snap",
                                  "snap-00000000000000000250-1.snap"]
    s.close()
    rec = reopen(crashed, segment_bytes=400)
    assert rec.snapshot == snap(250, 1) and rec.entries == tuple(ents(251, 260, 1))
    with DiskStorage.open(twin, segment_bytes=400) as t:
        t.compact(snap(190, 1))
        t.save(None, ents(201, 260, 1), None)
        t.sync()
        t.compact(snap(250, 1))
    assert [os.path.basename(p) for p in segments(crashed)] == [
        os.path.basename(p) for p in segments(twin)]


def test_a_background_snapshot_overtaken_by_the_leaders_is_dropped(tmp_path):
    """While our snapshot at 100 was written, a snapshot from the leader at 300 (another
    history) replaced the log: finish_compact refuses ours and deletes its file."""
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(1, "a", 120), ents(1, 120, 1), None)
    s.sync()
    assert s.write_snapshot_file(snap(100, 1))
    s.save(HardState(3, None, 300), [], snap(300, 3))
    s.sync()
    assert not s.finish_compact(snap(100, 1))
    assert snapshots(d) == ["snap-00000000000000000300-3.snap"]
    assert not s.write_snapshot_file(snap(200, 1))  # behind the base: nothing written
    assert snapshots(d) == ["snap-00000000000000000300-3.snap"]
    s.close()
    rec = reopen(d)
    assert rec.snapshot == snap(300, 3) and rec.entries == ()


def test_save_and_sync_go_on_while_a_snapshot_is_written(tmp_path, monkeypatch):
    """The background write does not hold the storage lock: appends and fsyncs of the
    WAL complete while it is stalled half-way (the test hook's pause)."""
    import threading
    import time

    monkeypatch.setenv("RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY", "3")
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(1, "a", 100), ents(1, 100, 1), None)
    s.sync()
    t = threading.Thread(target=s.write_snapshot_file, args=(snap(100, 1, b"x" * 100_000),))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not any(n.endswith(".bg.tmp") for n in os.listdir(d / "snap")):
            assert time.monotonic() < deadline, "the background write never started"
            time.sleep(0.01)
        t0 = time.monotonic()
        s.save(HardState(1, "a", 110), ents(101, 110, 1), None)
        s.sync()
        assert t.is_alive(), "the write finished before the WAL work: the test proves nothing"
        assert time.monotonic() - t0 < 2.5
    finally:
        t.join(30)
    assert s.finish_compact(snap(100, 1, b"x" * 100_000))
    s.close()
    rec = reopen(d)
    assert rec.snapshot.meta.index == 100 and rec.entries == tuple(ents(101, 110, 1))


@pytest.mark.parametrize("size", [0, 1, 31, 32, 255, 256, 65_535, 65_536, 3_000_000])
def test_a_snapshot_record_written_in_parts_is_the_one_record(size):
    """The background write frames the record as a header plus the data in place; the
    bytes are exactly those of the one-buffer record (msgpack of the whole list)."""
    import msgpack
    import zlib

    from nodeagent import storage as storage_mod

    s = snap(7, 2, bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    m = s.meta
    payload = msgpack.packb([1, m.index, m.term, sorted(m.conf.voters), sorted(m.conf.learners),
                             [list(p) for p in m.conf.priorities], s.data], use_bin_type=True)
    n = struct.pack(">I", len(payload))
    record = n + struct.pack(">I", zlib.crc32(payload, zlib.crc32(n))) + payload
    head, pieces = storage_mod._framed_snapshot_parts(s)
    assert head + b"".join(pieces) == record == storage_mod._frame(storage_mod._snapshot_payload(s))
    # the same data in pieces (a background snapshot's SnapshotChunks): the same record
    n = len(s.data)
    cuts = sorted({0, n // 3, n // 2, n})
    chunked = Snapshot(m, SnapshotChunks([s.data[a:b] for a, b in zip(cuts, cuts[1:])]))
    head2, pieces2 = storage_mod._framed_snapshot_parts(chunked)
    assert head2 + b"".join(pieces2) == record == storage_mod._frame(storage_mod._snapshot_payload(chunked))


class _NeverJoined(SnapshotChunks):
    """Chunks that fail the test if anything joins them into one buffer."""

    __slots__ = ()

    def __bytes__(self) -> bytes:
        raise AssertionError("the snapshot's pieces were joined")


def test_a_background_snapshot_is_written_from_its_pieces_without_joining_them(tmp_path):
    """A snapshot serialized in a worker thread comes as SnapshotChunks (the state's
    packed chunks): storage writes them one after the other. Joining them would hold a
    second copy of the whole serialized state (the snapshot's transient peak)."""
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(1, "a", 100), ents(1, 100), None)
    s.sync()
    parts = [bytes([i]) * (10_000 + i) for i in range(20)]
    chunked = Snapshot(SnapshotMeta(100, 1, CONF), _NeverJoined(parts))
    assert s.write_snapshot_file(chunked)
    assert s.finish_compact(s.snapshot_file(chunked))
    s.close()
    rec = reopen(d)
    assert rec.snapshot.meta.index == 100 and bytes(rec.snapshot.data) == b"".join(parts)


# -- the core holds a snapshot's file, not its bytes ---------------------------------------


def test_snapshot_file_reads_back_even_after_a_newer_snapshot_deletes_it(tmp_path):
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(1, "a", 300), ents(1, 300, 1), None)
    s.sync()
    big = os.urandom(300_000)
    s.compact(snap(100, 1, big))
    held = s.snapshot_file(snap(100, 1, big))
    assert held.meta == snap(100, 1).meta and len(held.data) == len(big)
    assert not isinstance(held.data, bytes)  # nothing held in memory
    assert bytes(held.data) == big
    # Two newer snapshots: storage keeps two files, so 100's is deleted...
    s.compact(snap(200, 1))
    s.compact(snap(250, 1))
    assert not any(n.startswith("snap-00000000000000000100") for n in snapshots(d))
    # ...and whoever still holds it (a send already queued) reads it all the same.
    assert bytes(held.data) == big
    assert s.snapshot_file(held) is held
    held.data.close()
    with pytest.raises(ValueError, match="closed"):
        bytes(held.data)
    s.close()


def test_snapshot_file_damaged_on_disk_does_not_read_back(tmp_path):
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(1, "a", 50), ents(1, 50, 1), None)
    s.sync()
    s.compact(snap(40, 1, b"x" * 5000))
    held = s.snapshot_file(snap(40, 1, b"x" * 5000))
    (path,) = [os.path.join(d, "snap", n) for n in snapshots(d)]
    flip(path, os.path.getsize(path) - 100)  # in the data: the record's CRC no longer holds
    with pytest.raises(ValueError, match="crc|CRC|checksum"):
        bytes(held.data)
    s.close()


def test_recovered_state_is_let_go_once_taken(tmp_path):
    d = tmp_path / "n1"
    s = DiskStorage.open(d)
    s.save(HardState(1, "a", 20), ents(1, 20, 1), None)
    s.sync()
    s.close()
    s = DiskStorage.open(d)
    assert len(s.recovered().entries) == 20
    s.forget_recovered()
    assert s.recovered() == PersistentState()
    s.close()
