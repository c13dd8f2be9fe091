"""Durable Raft storage: WAL segments, the hard state record, snapshots, and recovery.

Plain synchronous file I/O (no trio): the driver calls it directly or from a worker thread.
One ``DiskStorage`` owns one data directory::

    <data_dir>/LOCK                                   flock: one process per data dir
    <data_dir>/hardstate                              term + vote + commit + WAL head, one record
    <data_dir>/data_id                                this directory's random id (text)
    <data_dir>/peer_data_ids.json                     the data id each peer last came with
    <data_dir>/wal/wal-<first index, 20 digits>.log   WAL segments, in write order
    <data_dir>/snap/snap-<index, 20 digits>-<term>.snap   the newest two snapshots

Every file is made of records ``[u32 length][u32 crc32][payload]`` (big-endian, like the
wire protocol). The crc32 covers the 4 length bytes and the payload, so a zeroed header is
never a valid record. Payloads are msgpack.

WAL records are ``[kind, term, index, data]``:

* kind 0 / 1: a log entry (``EntryKind.NORMAL`` / ``EntryKind.CONF_CHANGE``);
* kind 16 (TRUNCATE): "drop every entry with index >= ``index``" (Raft log truncation is an
  append, never a rewrite);
* kind 17 (RESET): "the whole log was replaced by snapshot (``index``, ``term``)": written
  when a snapshot from the leader does not match our log (Raft Figure 13, step 7).

The hard state file holds ``[1, term, vote, commit, wal_head]``; a snapshot file holds
``[1, index, term, voters, learners, [[node, priority], ...], data]``. Both are replaced
atomically (temp file, fsync, rename, directory fsync). ``wal_head`` is the name of the
newest WAL segment when the record was written (0: unknown; records written before it
existed have four fields). The record is rewritten when a new segment is made, so a
directory whose newest segments were deleted is refused at open instead of starting on a
log shorter than what it acknowledged.

A snapshot the application made is stored by ``compact()``, or in two halves so that the
slow one can run in a worker thread while the driver goes on: ``write_snapshot_file()``
(temp file ``*.bg.tmp``, fsync, rename, directory fsync; no lock held, nothing else
changed) then ``finish_compact()`` (under the lock: the log's new base; old snapshot files
and WAL segments are dropped from it). A crash between the two recovers from the new file
and the WAL after it, which is still whole. ``finish_compact(delete=False)`` leaves the
dropped files for ``delete_purged()``, which unlinks them outside the lock, in a worker
thread (unlinking a 100 MB snapshot file and fsyncing its directory held a driver up for
20-80 ms). A crash before that leaves them behind: recovery reads the newest snapshot
and skips the WAL below it, and the next compaction deletes them.

Recovery (``open``): the newest readable snapshot (an unreadable one is skipped with a
warning), then every WAL record in order. A torn tail (the last record of the last segment
incomplete or failing its crc, with nothing valid after it, including trailing zeros) is
cut off. Anything else that does not read back -- a bad record with valid records after
it, damage in an older segment, a gap in the indexes -- raises ``StorageCorruption``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import msgpack

from nodeagent.libc import reserve_blocks
from nodeagent.protocol import bin_header
from nodeagent.raft.messages import (
    ConfState,
    Entry,
    EntryKind,
    HardState,
    PersistentState,
    Snapshot,
    SnapshotMeta,
)

__all__ = ["DiskStorage", "StorageCorruption", "StorageLocked"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")  # length, crc32
_LEN = struct.Struct(">I")
_HEADER_SIZE = _HEADER.size

REC_TRUNCATE = 16
REC_RESET = 17
_ENTRY_KINDS = frozenset(int(k) for k in EntryKind)
_RECORD_KINDS = _ENTRY_KINDS | {REC_TRUNCATE, REC_RESET}

_FORMAT_VERSION = 1
_SEG_RE = re.compile(r"^wal-(\d{20})\.log$")
_SNAP_RE = re.compile(r"^snap-(\d{20})-(\d+)\.snap$")
_DATA_ID_RE = re.compile(r"[0-9a-f]{8,64}")
_NONZERO = re.compile(rb"[^\x00]")
_KEEP_SNAPSHOTS = 2

# fsync latency histogram: upper bounds in milliseconds (non-cumulative counts)
_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


class StorageCorruption(Exception):
    """The data directory does not read back; the node must not start on it.

    ``str()`` names the file and byte offset and says what to do. ``path`` and ``offset``
    carry the same for programs (``offset`` is None when not about one record).
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


class StorageLocked(RuntimeError):
    """Another process has this data directory open."""


class StorageFailed(RuntimeError):
    """A write or fsync under the data directory failed (disk full, an I/O error, a
    filesystem remounted read-only). What reached the disk since the last fsync is unknown,
    so the storage refuses further use and the node must stop: the log up to the last
    successful fsync is intact, and a restart recovers from it (cutting a torn tail).

    ``str()`` says what failed and what to do; ``errno`` is the OS error's number (None
    when the cause was not an OS error)."""

    def __init__(self, data_dir: str, cause: BaseException):
        self.data_dir = data_dir
        self.errno = getattr(cause, "errno", None)
        self.cause = cause
        super().__init__(io_error_advice(data_dir, cause))


def io_error_advice(path: str, exc: BaseException) -> str:
    """One line for an operator: what an OS error under ``path`` means and what to do."""
    code = getattr(exc, "errno", None)
    what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    path = getattr(exc, "filename", None) or path  # the file itself, when the error names it
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full under {path} ({what}): free space there, then start "
                "the agent again")
    if code == errno.EROFS:
        return (f"the filesystem under {path} is read-only ({what}; the kernel may have "
                "remounted it after errors, see dmesg): fix it, then start the agent again")
    if code == errno.EIO:
        return (f"the disk reported an I/O error under {path}: check the disk (dmesg), then "
                "start the agent again; if its data does not read back, replace the node")
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied under {path} ({what}): the agent's user must own the "
                "data directory")
    return f"{what} ({path}): check the path, its permissions and the disk"


def disk_usage(path: str) -> tuple[int, int]:
    """(free bytes an unprivileged writer may use, total bytes) of the filesystem of
    ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


# -- record framing -----------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    n = _LEN.pack(len(payload))
    return n + _LEN.pack(zlib.crc32(payload, zlib.crc32(n))) + payload


def _wal_record(kind: int, term: int, index: int, data: bytes = b"") -> bytes:
    return _frame(msgpack.packb([kind, term, index, data], use_bin_type=True))


def _decode_wal_payload(payload) -> tuple[int, int, int, bytes]:
    obj = msgpack.unpackb(payload, raw=False, use_list=True)
    if not isinstance(obj, list) or len(obj) != 4:
        raise ValueError("not a [kind, term, index, data] record")
    kind, term, index, data = obj
    if type(kind) is not int or kind not in _RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    if type(term) is not int or type(index) is not int or term < 0 or index < 0:
        raise ValueError("bad term or index")
    if not isinstance(data, bytes):
        raise ValueError("data is not bytes")
    if kind in _ENTRY_KINDS and index < 1:
        raise ValueError("entry index < 1")
    return kind, term, index, data


def _parse_at(buf: bytes, pos: int, decode=_decode_wal_payload):
    """One record at ``pos``: (decoded, next_pos), or (None, reason)."""
    end = len(buf)
    if end - pos < _HEADER_SIZE:
        return None, f"incomplete header: {end - pos} of {_HEADER_SIZE} bytes"
    length, crc = _HEADER.unpack_from(buf, pos)
    if length == 0:
        return None, "zero length"
    if pos + _HEADER_SIZE + length > end:
        return None, f"length {length} runs past the end of the file"
    mv = memoryview(buf)
    payload = mv[pos + _HEADER_SIZE : pos + _HEADER_SIZE + length]
    if zlib.crc32(payload, zlib.crc32(mv[pos : pos + 4])) != crc:
        return None, "crc32 mismatch"
    try:
        rec = decode(payload)
    except Exception as exc:  # msgpack raises several types on garbage
        return None, f"undecodable payload: {exc}"
    return rec, pos + _HEADER_SIZE + length


def _valid_record_after(buf: bytes, pos: int) -> int | None:
    """The offset of the first valid record that starts after ``pos``, or None."""
    end = len(buf)
    q = pos + 1
    while q + _HEADER_SIZE < end:
        m = _NONZERO.search(buf, q)
        if m is None:
            return None  # only zeros left: a record's length is never 0
        q = max(q, m.start() - 3)
        rec, _ = _parse_at(buf, q)
        if rec is not None:
            return q
        q += 1
    return None


def _pieces(data) -> tuple:
    """The buffers of a snapshot's data, in order: a SnapshotChunks' parts, or itself."""
    parts = getattr(data, "parts", None)
    return (data,) if parts is None else parts


def _snapshot_payload(snap: Snapshot) -> bytes:
    head, data = _snapshot_payload_parts(snap)
    return b"".join((head, *_pieces(data)))


def _snapshot_payload_parts(snap: Snapshot) -> tuple[bytes, bytes]:
    """The snapshot record's payload as (msgpack of everything up to the data's bytes,
    the data): their concatenation is the payload, so a big snapshot is written without
    copying its data into one more buffer."""
    m = snap.meta
    data = snap.data
    p = msgpack.Packer(use_bin_type=True)
    head = b"".join([
        p.pack_array_header(7),
        p.pack(_FORMAT_VERSION),
        p.pack(m.index),
        p.pack(m.term),
        p.pack(sorted(m.conf.voters)),
        p.pack(sorted(m.conf.learners)),
        p.pack([list(x) for x in m.conf.priorities]),
        bin_header(len(data)),
    ])
    return head, data


def _framed_snapshot_parts(snap: Snapshot) -> tuple[bytes, tuple]:
    """``_frame(_snapshot_payload(snap))`` as (header, the data's buffers): the crc32 runs
    over the data in place (zlib lets go of the GIL for it), a SnapshotChunks' pieces one
    after the other, never joined."""
    head, data = _snapshot_payload_parts(snap)
    n = _LEN.pack(len(head) + len(data))
    crc = zlib.crc32(head, zlib.crc32(n))
    pieces = _pieces(data)
    for p in pieces:
        crc = zlib.crc32(p, crc)
    return n + _LEN.pack(crc) + head, pieces


def _decode_snapshot(payload) -> Snapshot:
    obj = msgpack.unpackb(payload, raw=False, use_list=True)
    if not isinstance(obj, list) or len(obj) != 7 or obj[0] != _FORMAT_VERSION:
        raise ValueError("not a version 1 snapshot record")
    _, index, term, voters, learners, prios, data = obj
    conf = ConfState(frozenset(voters), frozenset(learners), tuple(sorted((str(n), int(p)) for n, p in prios)))
    return Snapshot(SnapshotMeta(int(index), int(term), conf), bytes(data))


class SnapshotFile:
    """A snapshot's data left on disk, for the Raft core to hold instead of the bytes.

    The leader keeps its newest snapshot only to send it to a follower that has fallen
    behind the log, which is rare; holding it in memory doubled the state's footprint
    (docs/BENCHMARKS.md, RSS). ``bytes(x)`` reads the record back and checks its CRC
    (``ValueError`` if it does not read back; ``OSError`` from the disk). The file is
    opened at once and the descriptor kept, so the data stays readable after storage
    deletes the file for a newer snapshot; it is closed with :meth:`close`, or when the
    object is collected (the core drops it when it adopts the next snapshot).
    """

    __slots__ = ("path", "_size", "_fd")

    def __init__(self, path: str, size: int):
        self.path = path
        self._size = size
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        fd = self._fd
        if fd is None:
            raise ValueError(f"{self.path}: closed")
        n = os.fstat(fd).st_size
        buf = os.pread(fd, n, 0)
        rec, nxt = _parse_at(buf, 0, _decode_snapshot)
        if rec is None:
            raise ValueError(f"{self.path}: {nxt}")
        if len(rec.data) != self._size:
            raise ValueError(f"{self.path}: {len(rec.data)} bytes of data, expected {self._size}")
        return rec.data

    def __repr__(self) -> str:
        return f"SnapshotFile({self.path!r}, {self._size} bytes)"

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


def _decode_hardstate(payload) -> tuple[HardState, int]:
    """(hard state, WAL head): the head is 0 in records written before it was kept."""
    obj = msgpack.unpackb(payload, raw=False, use_list=True)
    if not isinstance(obj, list) or len(obj) not in (4, 5) or obj[0] != _FORMAT_VERSION:
        raise ValueError("not a version 1 hard state record")
    _, term, vote, commit = obj[:4]
    head = obj[4] if len(obj) == 5 else 0
    if (type(term) is not int or type(commit) is not int or type(head) is not int
            or not (vote is None or isinstance(vote, str))):
        raise ValueError("bad field types")
    return HardState(term, vote, commit), head


def _read_single_record(path: str, decode):
    """A file that holds exactly one record (hard state, snapshot): (value, None) or (None, (offset, reason))."""
    with open(path, "rb") as f:
        buf = f.read()
    if not buf:
        return None, (0, "empty file")
    rec, nxt = _parse_at(buf, 0, decode)
    if rec is None:
        return None, (0, nxt)
    if nxt != len(buf):
        return None, (nxt, f"{len(buf) - nxt} unexpected bytes after the record")
    return rec, None


def _test_write_delay() -> float:
    """Seconds to pause half-way through a background snapshot write: a crash window for
    tests (``RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY``); 0 unless set."""
    try:
        return max(0.0, float(os.environ.get("RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY", "0")))
    except ValueError:
        return 0.0


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def write_file_durably(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one:
    a temporary file (``mode``, whatever the umask), fsync, rename, directory fsync. For
    files outside a log (certificates, backups); the log's own go through DiskStorage."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- data directory lock (one process per data dir) -----------------------------------------

# realpath -> [fd, holders]. Within one process several instances may hold the same
# directory (a simulator "crashes" a node by dropping its DiskStorage and opening again).
_DIR_LOCKS: dict[str, list[int]] = {}
_DIR_LOCKS_GUARD = threading.Lock()


def _lock_dir(key: str) -> None:
    with _DIR_LOCKS_GUARD:
        held = _DIR_LOCKS.get(key)
        if held is not None:
            held[1] += 1
            return
        fd = os.open(os.path.join(key, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageLocked(
                f"{key} is in use by another process (it holds {os.path.join(key, 'LOCK')}); "
                "stop the other nodeagent or give this one its own data_dir"
            ) from None
        _DIR_LOCKS[key] = [fd, 1]


def _unlock_dir(key: str) -> None:
    with _DIR_LOCKS_GUARD:
        held = _DIR_LOCKS.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _DIR_LOCKS[key]
            os.close(held[0])


# -- recovery -----------------------------------------------------------------------------


@dataclass
class _Segment:
    path: str
    name_index: int  # the index in the file name: the first entry written to it
    max_index: int  # highest entry index recorded in it (0: none)
    size: int


class _Replay:
    """Rebuilds the log after snapshot (base_index, base_term) from WAL records in order."""

    def __init__(self, base_index: int, base_term: int, fail):
        self.base_index = base_index
        self.base_term = base_term
        self.entries: list[Entry] = []
        self.wal_next: int | None = None  # index the next entry record must carry
        self.base_wal_term: int | None = None  # term of the WAL's live entry at base_index
        self.fail = fail  # fail(path, offset, what) -> StorageCorruption

    def record(self, path: str, off: int, kind: int, term: int, index: int, data: bytes) -> None:
        b = self.base_index
        if kind in _ENTRY_KINDS:
            if self.wal_next is not None and index != self.wal_next:
                raise self.fail(path, off, f"entry {index} where entry {self.wal_next} was expected")
            self.wal_next = index + 1
            if index < b:
                return
            if index == b:
                self.base_wal_term = term
                return
            expected = b + len(self.entries) + 1
            if index != expected:
                raise self.fail(
                    path, off, f"entry {index} follows snapshot index {b}: entries {expected}..{index - 1} are missing"
                )
            self.entries.append(Entry(term, index, data, EntryKind(kind)))
        elif kind == REC_TRUNCATE:
            if self.wal_next is not None and index > self.wal_next:
                raise self.fail(path, off, f"truncation at {index} beyond the end of the log ({self.wal_next - 1})")
            self.wal_next = index
            if index <= b:
                self.entries.clear()
                self.base_wal_term = None
            else:
                del self.entries[index - b - 1 :]
        else:  # REC_RESET
            if index > b:
                raise self.fail(
                    path,
                    off,
                    f"the log was replaced here by snapshot {index} (term {term}), "
                    f"but the newest readable snapshot is {b}",
                )
            self.entries.clear()
            self.wal_next = index + 1
            self.base_wal_term = term if index == b else None


# -- storage ------------------------------------------------------------------------------


class DiskStorage:
    """The node's durable state. Create with :meth:`open`.

    Calls are serialised by an internal lock, so the driver may call it from a worker
    thread while another thread reads ``stats()``. One instance per data directory at a
    time; a second process gets ``StorageLocked``.
    """

    # A new segment's blocks are reserved only while this many segments' worth is free.
    RESERVE_FREE_FACTOR = 4
    # ``disk()["low"]``: free space under this many times what the storage writes next.
    LOW_DISK_FACTOR = 2

    def __init__(self, data_dir: str, fsync: bool, segment_bytes: int):
        """Private: use :meth:`DiskStorage.open`."""
        self._dir = data_dir
        self._wal_dir = os.path.join(data_dir, "wal")
        self._snap_dir = os.path.join(data_dir, "snap")
        self._hs_path = os.path.join(data_dir, "hardstate")
        self._fsync_enabled = fsync
        self._segment_bytes = segment_bytes
        self._lock = threading.RLock()
        self._snap_write_lock = threading.Lock()  # one write_snapshot_file at a time
        self._stats_lock = threading.Lock()  # fsync counters: two threads may fsync at once
        self._lock_key: str | None = None
        self._closed = False
        self._failed: BaseException | None = None

        self._base_index = 0
        self._base_term = 0
        self._terms = array("Q")  # terms of entries base+1 .. last
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # active (last) segment, O_APPEND
        self._dirty = False  # written to the active segment since its last fsync
        self._durable_hs = HardState()
        self._pending_hs: HardState | None = None
        self._snapshots: list[tuple[int, int]] = []  # (index, term) of snapshot files, oldest first
        self._purged: list[str] = []  # files dropped from the above, not yet unlinked

        self._syncs = 0
        self._group_fsyncs = 0
        self._fsync_calls = 0
        self._reserved_segments = 0  # segments whose blocks were allocated up front
        self._reservations_skipped = 0  # not reserved: too little free space, or it failed
        self._fsync_hist = [0] * (len(_BUCKETS_MS) + 1)
        self._fsync_sum = 0.0
        self._fsync_max = 0.0
        self._repaired: list[dict] = []
        self._snapshot_fallbacks: list[dict] = []
        self._discarded_entries = 0
        self._recovered = PersistentState()

    # -- public API ---------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: str | os.PathLike, *, fsync: bool = True, segment_bytes: int = 64 << 20) -> "DiskStorage":
        """Open (creating if needed) ``data_dir`` and recover what is on disk.

        Raises StorageCorruption if the directory does not read back, StorageLocked if
        another process has it open.
        """
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        self = cls(os.fspath(data_dir), bool(fsync), int(segment_bytes))
        self._ensure_dir(self._dir)
        self._lock_key = os.path.realpath(self._dir)
        _lock_dir(self._lock_key)
        try:
            if os.path.exists(self._hs_path) and not os.path.lexists(self._wal_dir):
                # Made at the first open, before any hard state, and never removed: the
                # log this node acknowledged is gone (e.g. wal/ deleted by hand).
                raise StorageCorruption(
                    f"{self._wal_dir} is missing, but {self._hs_path} records term and vote: "
                    "the log this node acknowledged is gone, and it must not vote or lead "
                    "without it. " + self._fix_hint(), path=self._wal_dir)
            self._ensure_dir(self._wal_dir)
            self._ensure_dir(self._snap_dir)
            self._recover()
        except BaseException:
            self._close_fds()
            _unlock_dir(self._lock_key)
            raise
        return self

    def recovered(self) -> PersistentState:
        """What :meth:`open` found: hard state, newest snapshot, the entries after it."""
        return self._recovered

    def forget_recovered(self) -> None:
        """Let go of what :meth:`open` recovered (the owner has built its state from it),
        so its entries and snapshot are not held twice for the life of the process."""
        self._recovered = PersistentState()

    def save(self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None) -> None:
        """Write one Ready's worth of state; durable after the next :meth:`sync`.

        ``snapshot`` (from the leader) is written durably at once. If our log holds its
        index with its term, the entries after it are kept, else the whole log is replaced
        (Raft Figure 13). ``entries`` may start at or before our last index: every stored
        entry from ``entries[0].index`` on is discarded first. ``hard_state`` is written
        (as one atomic record) by the next sync().
        """
        with self._lock:
            self._check_usable()
            entries = list(entries)
            for k in range(1, len(entries)):
                if entries[k].index != entries[0].index + k:
                    raise ValueError(f"entries are not contiguous at {entries[k - 1].index} -> {entries[k].index}")
            if entries and entries[0].index < 1:
                raise ValueError("entry index must be >= 1")

            b, last = self._base_index, self._last_index()
            snap_plan = None
            new_base, new_last = b, last
            if snapshot is not None:
                s, st = snapshot.meta.index, snapshot.meta.term
                if s > b:
                    matching = s <= last and self._terms[s - b - 1] == st
                    snap_plan = (s, st, matching)
                    new_base, new_last = s, (last if matching else s)
                else:
                    log.debug("ignoring snapshot %d: not newer than the stored snapshot %d", s, b)
            entries = [e for e in entries if e.index > new_base]
            if entries and entries[0].index > new_last + 1:
                raise ValueError(f"entries start at {entries[0].index} but the log ends at {new_last} (gap)")

            try:
                records: list[tuple[bytes, int]] = []  # (framed record, entry index or 0)
                if snap_plan is not None:
                    s, st, matching = snap_plan
                    self._write_snapshot_file(snapshot)
                    if matching:
                        del self._terms[: s - b]
                    else:
                        records.append((_wal_record(REC_RESET, st, s), 0))
                        self._terms = array("Q")
                    self._base_index, self._base_term = s, st
                    self._purge_snapshots()
                    self._delete_purged_locked()
                if entries:
                    first = entries[0].index
                    if first <= self._last_index():
                        records.append((_wal_record(REC_TRUNCATE, 0, first), 0))
                        del self._terms[first - self._base_index - 1 :]
                    for e in entries:
                        records.append((_wal_record(int(e.kind), e.term, e.index, e.data), e.index))
                    self._terms.extend(e.term for e in entries)
                if records:
                    self._append(records)
            except BaseException as exc:
                self._fail(exc)
            if hard_state is not None:
                self._pending_hs = None if hard_state == self._durable_hs else hard_state

    def sync(self) -> None:
        """Make everything saved so far durable: one group commit.

        fsyncs the active WAL segment (if written), then replaces the hard state file if
        its term or vote changed. Counted once in ``stats()["fsyncs"]`` however many saves
        it covers.

        A change of the commit index alone is not written here: Raft needs term and vote
        durable before a vote or an acknowledgement leaves, never the commit index (a
        restarted node learns it again from the leader; recovery starts at least at the
        snapshot). Rewriting the file for it cost two more fsyncs (file and directory)
        per group commit, most of a write's disk time. It is written with the next term
        or vote change, and by :meth:`close`.
        """
        with self._lock:
            self._sync(with_commit=False)

    def _sync(self, *, with_commit: bool) -> None:
        with self._lock:
            self._check_usable()
            hs, durable = self._pending_hs, self._durable_hs
            write_hs = hs is not None and (
                with_commit or hs.term != durable.term or hs.vote != durable.vote)
            if not self._dirty and not write_hs:
                return
            try:
                if self._dirty:
                    self._fsync_fd(self._fd)
                    self._dirty = False
                if write_hs:
                    self._write_hardstate(hs)
            except BaseException as exc:
                self._fail(exc)
            self._syncs += 1
            if self._fsync_enabled:
                self._group_fsyncs += 1

    def compact(self, snapshot: Snapshot) -> None:
        """The application snapshotted at ``snapshot.meta.index``: store it durably, then
        delete the WAL segments nobody needs any more. The same as
        :meth:`write_snapshot_file` then :meth:`finish_compact`, in the caller's thread.

        The log after the index is kept. Segments are deleted when all their entries are at
        or below the index of the OLDER of the two snapshots kept, so that a damaged newest
        snapshot can still fall back to the older one and replay the WAL from there.
        """
        with self._lock:
            self._check_usable()
            if not self._check_compact(snapshot):
                return
            try:
                self._write_snapshot_file(snapshot)
            except BaseException as exc:
                self._fail(exc)
            self.finish_compact(snapshot)

    def write_snapshot_file(self, snapshot: Snapshot) -> bool:
        """The slow half of :meth:`compact`: write the snapshot's file durably (temp file,
        fsync, rename, directory fsync), changing nothing else. For a worker thread.

        It does not take the storage lock, so ``save()`` and ``sync()`` go on meanwhile
        (the file is not part of the recovered state until it is renamed into place, and
        once it is, the WAL still holds everything after an older snapshot, so a crash at
        any point recovers: from the old snapshot, or from this one, plus the WAL). Only
        one such write runs at a time. Returns False (and writes nothing) if the storage
        already holds a snapshot at or past its index. An ``OSError`` leaves no temp file
        behind and does not make the storage unusable: nothing it relies on was touched.
        """
        m = snapshot.meta
        with self._snap_write_lock:
            self._check_usable()
            if m.index <= self._base_index:
                return False
            path = self._snap_path(m.index, m.term)
            tmp = path + ".bg.tmp"  # not save()'s temp name: that one may be written meanwhile
            head, pieces = _framed_snapshot_parts(snapshot)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    _write_all(fd, head)
                    delay = _test_write_delay()
                    if delay and len(pieces) == 1:
                        mv = memoryview(pieces[0])
                        pieces = (mv[: len(mv) // 2], mv[len(mv) // 2 :])
                    for i, p in enumerate(pieces):
                        if delay and i == len(pieces) // 2:
                            # a test's crash window: half the file written, not yet renamed
                            time.sleep(delay)
                        _write_all(fd, p)  # os.write lets go of the GIL
                    self._fsync_fd(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                self._fsync_dir(self._snap_dir)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            return True

    def finish_compact(self, snapshot: Snapshot, *, delete: bool = True) -> bool:
        """The cheap half of :meth:`compact`, after :meth:`write_snapshot_file`: make the
        written snapshot the base of the log and drop the segments and snapshot files
        nobody needs any more: deleted here, or with ``delete=False`` left for
        :meth:`delete_purged` (in a worker thread). Returns False if the storage has
        moved past the snapshot meanwhile (one from the leader was installed): its file
        is then deleted."""
        with self._lock:
            self._check_usable()
            m = snapshot.meta
            try:
                ok = self._check_compact(snapshot)
            except ValueError:
                self._discard_snapshot_file(m.index, m.term)
                raise
            if not ok:
                self._discard_snapshot_file(m.index, m.term)
                return False
            s, st, b = m.index, m.term, self._base_index
            try:
                key = (s, st)
                if key not in self._snapshots:
                    self._snapshots.append(key)
                    self._snapshots.sort()
                del self._terms[: s - b]
                self._base_index, self._base_term = s, st
                self._purge_snapshots()
                self._purge_segments()
                if delete:
                    self._delete_purged_locked()
            except BaseException as exc:
                self._fail(exc)
            return True

    def delete_purged(self) -> int:
        """Unlink the files :meth:`finish_compact` dropped with ``delete=False``, then
        fsync their directories; the lock is held only to take the list, so the WAL's
        writes and syncs go on meanwhile. Safe in a worker thread. A file that will not
        go is logged and left (it only takes space). Returns how many were deleted."""
        with self._lock:
            purged, self._purged = self._purged, []
        return self._unlink_all(purged, strict=False)

    def _delete_purged_locked(self) -> None:
        purged, self._purged = self._purged, []
        self._unlink_all(purged, strict=True)

    def _unlink_all(self, paths: list[str], *, strict: bool) -> int:
        deleted = 0
        dirs: list[str] = []
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if strict:
                    raise
                log.warning("old log file not deleted", extra={"path": path, "error": repr(exc)})
                continue
            deleted += 1
            d = os.path.dirname(path)
            if d not in dirs:
                dirs.append(d)
        for d in dirs:
            self._fsync_dir(d)
        return deleted

    def discard_snapshot_file(self, snapshot: Snapshot) -> None:
        """Delete the file :meth:`write_snapshot_file` wrote for a snapshot that was
        refused after all (unless it is one the storage keeps)."""
        with self._lock:
            self._discard_snapshot_file(snapshot.meta.index, snapshot.meta.term)

    def _discard_snapshot_file(self, index: int, term: int) -> None:
        if (index, term) in self._snapshots:
            return
        try:
            os.unlink(self._snap_path(index, term))
        except FileNotFoundError:
            pass

    def _check_compact(self, snapshot: Snapshot) -> bool:
        """Whether a snapshot the application made can become the base: False if not
        newer than the stored one; ValueError if the log does not hold its entry."""
        s, st = snapshot.meta.index, snapshot.meta.term
        b, last = self._base_index, self._last_index()
        if s <= b:
            log.debug("compact(%d): not newer than the stored snapshot %d; ignored", s, b)
            return False
        if s > last:
            raise ValueError(f"cannot compact at {s}: the log ends at {last}")
        if self._terms[s - b - 1] != st:
            raise ValueError(f"cannot compact at {s}: entry {s} has term {self._terms[s - b - 1]}, not {st}")
        return True

    def snapshot_file(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` (one this storage holds: recovered, written or installed) with its
        data replaced by a :class:`SnapshotFile` reading it back from its file."""
        m = snapshot.meta
        if isinstance(snapshot.data, SnapshotFile):
            return snapshot
        return Snapshot(m, SnapshotFile(self._snap_path(m.index, m.term), len(snapshot.data)))

    def stats(self) -> dict:
        """Counters for status output (plain JSON-able values).

        Reads without the lock: the driver's worker thread holds it for a whole fsync,
        and a status request must not stall the event loop that long. ``sync`` only
        bumps counters, and everything else that changes these fields runs in the
        caller's thread, so a reading is at worst one fsync out of date.
        """
        hist = {f"{ub:g}": n for ub, n in zip(_BUCKETS_MS, self._fsync_hist)}
        hist["+Inf"] = self._fsync_hist[-1]
        return {
            "data_dir": self._dir,
            "fsync": self._fsync_enabled,
            "segments": len(self._segments),
            "bytes": sum(s.size for s in self._segments),
            "segment_bytes": self._segment_bytes,
            "reserved_segments": self._reserved_segments,
            "reservations_skipped": self._reservations_skipped,
            "first_index": self._base_index + 1,
            "last_index": self._last_index(),
            "snapshot_index": self._base_index,
            "snapshot_term": self._base_term,
            "snapshots": len(self._snapshots),
            "syncs": self._syncs,
            "fsyncs": self._group_fsyncs,
            "fsync_calls": self._fsync_calls,
            "fsync_latency_ms_buckets": hist,
            "fsync_latency_ms_sum": round(self._fsync_sum * 1000, 3),
            "fsync_latency_ms_max": round(self._fsync_max * 1000, 3),
            "unsynced": self._dirty or (self._pending_hs is not None and (
                self._pending_hs.term, self._pending_hs.vote) != (
                self._durable_hs.term, self._durable_hs.vote)),
            "repaired": bool(self._repaired),
            "repairs": [dict(r) for r in self._repaired],
            "snapshot_fallbacks": [dict(r) for r in self._snapshot_fallbacks],
            "discarded_entries": self._discarded_entries,
            "failed": None if self._failed is None else str(self._failed),
        }

    def disk(self) -> dict:
        """The data directory's filesystem: ``free_bytes``, ``total_bytes``, ``needs_bytes``
        (room for what this storage writes next without deleting anything first: a new
        WAL segment, and a snapshot beside the newest one) and ``low`` (free space under
        ``LOW_DISK_FACTOR`` times that). A stat of the filesystem and of one file: for a
        timer, not for every write."""
        free, total = disk_usage(self._dir)
        snap = 0
        if self._snapshots:
            try:
                snap = os.stat(self._snap_path(*self._snapshots[-1])).st_size
            except OSError:
                pass
        needs = self._segment_bytes + snap
        return {"free_bytes": free, "total_bytes": total, "needs_bytes": needs,
                "low": free < self.LOW_DISK_FACTOR * needs}

    def close(self) -> None:
        """Sync what is pending (unless an earlier I/O error made that unsafe) and release
        the data directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._failed is None:
                    self._sync(with_commit=True)
            finally:
                self._closed = True
                self._close_fds()
                if self._lock_key is not None:
                    _unlock_dir(self._lock_key)
                    self._lock_key = None

    def __enter__(self) -> "DiskStorage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- joining ---------------------------------------------------------------------------

    # A node added to a running cluster (``nodeagent run --join``) must not bootstrap the
    # inventory's membership as entry 1 (agent.py). The flag lives on its command line only
    # until the leader's first entries land; a restart in that window without the flag (the
    # console's restart key, `raftdeck restart`, a host's reboot script) would bootstrap.
    # This file keeps the fact in the directory itself until the log holds something.
    JOIN_MARKER = "joining"

    def joining(self) -> bool:
        """Whether this directory was started with ``--join`` and still has no log."""
        return os.path.exists(os.path.join(self._dir, self.JOIN_MARKER))

    def set_joining(self, on: bool) -> None:
        """Write (durably) or remove the joining marker."""
        path = os.path.join(self._dir, self.JOIN_MARKER)
        with self._lock:
            self._check_usable()
            try:
                if on:
                    self._write_atomic(path, b"started with --join: the membership comes from "
                                             b"the leader, not the inventory\n")
                elif os.path.exists(path):
                    os.unlink(path)
                    self._fsync_dir(self._dir)
            except BaseException as exc:
                self._fail(exc)

    # -- identity ---------------------------------------------------------------------------

    # A random id made when the directory is first used (or first opened by a version that
    # had none) and never changed. A voter started again on an empty directory comes back
    # with a new one; its peers, which remember the id each peer came with, can tell it lost
    # its log and votes (nodeagent/peerids.py). Delete the whole directory or nothing: a
    # directory that keeps this file but lost its log cannot be told apart from a whole one.
    DATA_ID = "data_id"
    PEER_DATA_IDS = "peer_data_ids.json"

    def data_id(self) -> str:
        """This directory's id, written (durably) at the first call if there is none."""
        path = os.path.join(self._dir, self.DATA_ID)
        with self._lock:
            self._check_usable()
            try:
                with open(path, "rb") as f:
                    text = f.read(256).decode("ascii", "replace").strip()
                if _DATA_ID_RE.fullmatch(text):
                    return text
                # A damaged id is treated as none: the peers then refuse this node if it was
                # a voter they knew, which is the safe side.
                log.warning("data id file unreadable; making a new one",
                            extra={"path": path, "content": text[:40]})
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._fail(exc)
            new = secrets.token_hex(8)
            try:
                self._write_atomic(path, new.encode() + b"\n")
            except BaseException as exc:
                self._fail(exc)
            return new

    def peer_data_ids(self) -> dict[str, str]:
        """The data id each peer last came with (``{}`` if the file is missing or damaged)."""
        path = os.path.join(self._dir, self.PEER_DATA_IDS)
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("peer data ids unreadable; starting afresh",
                        extra={"path": path, "error": str(exc)})
            return {}
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items()
                if isinstance(k, str) and isinstance(v, str) and _DATA_ID_RE.fullmatch(v)}

    def set_peer_data_ids(self, ids: dict[str, str]) -> None:
        """Replace the peer data ids, durably (temp file, fsync, rename, directory fsync)."""
        path = os.path.join(self._dir, self.PEER_DATA_IDS)
        data = json.dumps(dict(sorted(ids.items())), indent=1).encode() + b"\n"
        with self._lock:
            self._check_usable()
            try:
                self._write_atomic(path, data)
            except BaseException as exc:
                self._fail(exc)

    # -- internals: state ---------------------------------------------------------------

    def _last_index(self) -> int:
        return self._base_index + len(self._terms)

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"storage {self._dir} is closed")
        if self._failed is not None:
            raise self._failed

    def _fail(self, exc: BaseException) -> NoReturn:
        """Record the first failure and raise for ``exc`` (from inside its ``except``): an
        OS error as ``StorageFailed``, as every later call will; anything else (a bug) as
        it is, though the storage is refused from then on too."""
        # After a failed write or fsync the page cache state is unknown (a retried fsync can
        # report success for data that was dropped): refuse further use; restart recovers.
        failed = StorageFailed(self._dir, exc)
        if self._failed is None:
            self._failed = failed
            log.error("storage failed; refusing further writes", extra={
                "data_dir": self._dir, "errno": failed.errno, "error": str(failed)})
        if isinstance(exc, OSError):
            raise failed from exc
        raise exc

    def _close_fds(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    # -- internals: fsync ---------------------------------------------------------------

    def _fsync_fd(self, fd: int) -> None:
        if not self._fsync_enabled:
            return
        t0 = time.perf_counter()
        os.fsync(fd)
        dt = time.perf_counter() - t0
        with self._stats_lock:
            self._fsync_calls += 1
            self._fsync_sum += dt
            self._fsync_max = max(self._fsync_max, dt)
            ms = dt * 1000
            for i, ub in enumerate(_BUCKETS_MS):
                if ms <= ub:
                    self._fsync_hist[i] += 1
                    break
            else:
                self._fsync_hist[-1] += 1

    def _reserve_active(self) -> None:
        # Only worth it when appends are fsynced; a segment may outgrow the reservation
        # (one record larger than what is left), which only means allocating as before.
        if not self._fsync_enabled:
            return
        # Not on a filling disk: the reservation would take space the next snapshot needs
        # (written beside the old one) and bring a disk-full stop closer.
        free, _ = disk_usage(self._wal_dir)
        if free < self.RESERVE_FREE_FACTOR * self._segment_bytes:
            self._reservations_skipped += 1
            return
        if reserve_blocks(self._fd, self._segment_bytes):
            self._reserved_segments += 1
            return
        # ext4 keeps the blocks a failed fallocate did allocate (all the free space, when
        # it failed for want of it); cutting the file to its own length hands them back.
        self._reservations_skipped += 1
        os.ftruncate(self._fd, os.fstat(self._fd).st_size)

    def _fsync_dir(self, path: str) -> None:
        if not self._fsync_enabled:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync_fd(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: str) -> None:
        if os.path.isdir(path):
            return
        os.makedirs(path, exist_ok=True)
        self._fsync_dir(os.path.dirname(os.path.abspath(path)))

    def _write_atomic(self, path: str, data: bytes) -> None:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            self._fsync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir(os.path.dirname(path))

    # -- internals: hard state and snapshots --------------------------------------------

    def _write_hardstate(self, hs: HardState) -> None:
        self._write_hs_record(hs)
        self._durable_hs = hs
        self._pending_hs = None

    def _write_hs_record(self, hs: HardState) -> None:
        head = self._segments[-1].name_index if self._segments else 0
        payload = msgpack.packb([_FORMAT_VERSION, hs.term, hs.vote, hs.commit, head], use_bin_type=True)
        self._write_atomic(self._hs_path, _frame(payload))

    def _snap_path(self, index: int, term: int) -> str:
        return os.path.join(self._snap_dir, f"snap-{index:020d}-{term}.snap")

    def _write_snapshot_file(self, snap: Snapshot) -> None:
        m = snap.meta
        self._write_atomic(self._snap_path(m.index, m.term), _frame(_snapshot_payload(snap)))
        key = (m.index, m.term)
        if key not in self._snapshots:
            self._snapshots.append(key)
            self._snapshots.sort()

    def _purge_snapshots(self) -> None:
        """Drop the snapshot files past the two kept (unlinked by ``_delete_purged_locked``
        or ``delete_purged``)."""
        while len(self._snapshots) > _KEEP_SNAPSHOTS:
            index, term = self._snapshots.pop(0)
            self._purged.append(self._snap_path(index, term))

    def _purge_segments(self) -> None:
        # Keep the WAL back to the oldest snapshot we keep. Delete only a prefix: a later
        # segment's truncation markers refer to entries of earlier ones.
        keep_from = self._snapshots[0][0] if self._snapshots else 0
        while len(self._segments) > 1 and self._segments[0].max_index <= keep_from:
            self._purged.append(self._segments.pop(0).path)

    # -- internals: WAL writing ---------------------------------------------------------

    def _append(self, records: list[tuple[bytes, int]]) -> None:
        seg = self._segments[-1]
        buf = bytearray()
        buf_max = 0
        for rec, index in records:
            used = seg.size + len(buf)
            # Roll over only in front of an entry, so the new segment is named after it
            # (names then increase in write order even after a truncation went backwards).
            if index and used > 0 and used + len(rec) > self._segment_bytes and index > seg.name_index:
                self._write(seg, buf, buf_max)
                buf, buf_max = bytearray(), 0
                seg = self._roll(index)
            buf += rec
            buf_max = max(buf_max, index)
        self._write(seg, buf, buf_max)

    def _write(self, seg: _Segment, buf: bytearray, buf_max: int) -> None:
        if not buf:
            return
        try:
            _write_all(self._fd, buf)
        except OSError:
            try:  # leave no partial record behind (the storage is failed either way)
                os.ftruncate(self._fd, seg.size)
            except OSError:
                pass
            raise
        seg.size += len(buf)
        seg.max_index = max(seg.max_index, buf_max)
        self._dirty = True

    def _roll(self, first_index: int) -> _Segment:
        # The old segment is made durable before the new one exists, so damage anywhere but
        # in the last segment is real corruption, never a torn write.
        if self._dirty:
            self._fsync_fd(self._fd)
            self._dirty = False
        self._close_fds()
        return self._create_segment(first_index)

    def _create_segment(self, first_index: int) -> _Segment:
        path = os.path.join(self._wal_dir, f"wal-{first_index:020d}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._reserve_active()
        self._fsync_dir(self._wal_dir)
        seg = _Segment(path, first_index, 0, 0)
        self._segments.append(seg)
        if os.path.exists(self._hs_path):
            # Record the new head (the term and vote already durable; a pending change
            # still waits for its sync): from now on, losing this segment is detected.
            self._write_hs_record(self._durable_hs)
        return seg

    # -- internals: recovery ------------------------------------------------------------

    def _fix_hint(self) -> str:
        return (
            f"To recover, restore this node from a peer: stop it, move {self._dir} aside, "
            "and re-add it to the cluster (the leader sends it a snapshot)."
        )

    def _record_corruption(self, path: str, offset: int, what: str) -> StorageCorruption:
        note = ""
        if self._snapshot_fallbacks:
            bad = ", ".join(f"{f['file']} ({f['reason']})" for f in self._snapshot_fallbacks)
            note = f" Unreadable snapshots were skipped: {bad}."
        return StorageCorruption(
            f"{path}: corrupt record at byte offset {offset} ({what}). The log before it is intact; "
            f"the records from there on cannot be trusted, so the node will not start on them.{note} "
            + self._fix_hint(),
            path=path,
            offset=offset,
        )

    def _recover(self) -> None:
        # Leftovers of an interrupted atomic replace: the real file is still the old one.
        for d in (self._dir, self._snap_dir):
            for name in os.listdir(d):
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(d, name))

        hs, wal_head = self._load_hardstate()
        snapshot = self._load_newest_snapshot()
        if snapshot is not None:
            self._base_index, self._base_term = snapshot.meta.index, snapshot.meta.term

        replay = _Replay(self._base_index, self._base_term, self._record_corruption)
        torn: tuple[_Segment, int, int, str] | None = None  # segment, offset, file size, reason
        names = sorted((int(m.group(1)), n) for n in os.listdir(self._wal_dir) if (m := _SEG_RE.match(n)))
        if wal_head and (not names or names[-1][0] < wal_head):
            # Segments are made in index order and only the oldest are ever deleted.
            newest = f"wal-{names[-1][0]:020d}.log" if names else "none"
            if self._fsync_enabled:
                raise StorageCorruption(
                    f"{self._wal_dir}: WAL segment wal-{wal_head:020d}.log is missing (the newest "
                    f"segment there is {newest}), but {self._hs_path} records that it was made: "
                    "entries this node acknowledged are gone, and it must not vote or lead "
                    "without them. " + self._fix_hint(), path=self._wal_dir)
            # Without fsync a power loss may keep the record and lose the segment's
            # directory entry: expected there, as with the commit index below.
            log.warning("%s: WAL segment wal-%020d.log is missing (the newest there is %s; fsync "
                        "is off: writes were lost)", self._wal_dir, wal_head, newest)
        for k, (name_index, name) in enumerate(names):
            path = os.path.join(self._wal_dir, name)
            with open(path, "rb") as f:
                buf = f.read()
            seg = _Segment(path, name_index, 0, len(buf))
            pos = 0
            while pos < len(buf):
                rec, nxt = _parse_at(buf, pos)
                if rec is None:
                    reason = nxt
                    if k != len(names) - 1:
                        raise self._record_corruption(path, pos, f"{reason}, in a segment that is not the last")
                    after = _valid_record_after(buf, pos)
                    if after is not None:
                        raise self._record_corruption(path, pos, f"{reason}; a valid record follows at byte {after}")
                    torn = (seg, pos, len(buf), reason)
                    seg.size = pos
                    break
                kind, term, index, data = rec
                replay.record(path, pos, kind, term, index, data)
                if kind in _ENTRY_KINDS:
                    seg.max_index = max(seg.max_index, index)
                pos = nxt
            self._segments.append(seg)

        entries = replay.entries
        if entries and replay.base_wal_term is not None and replay.base_wal_term != self._base_term:
            # The snapshot was installed but the RESET record after it did not reach the disk:
            # the entries after it belong to the history the snapshot replaced (Figure 13).
            log.warning(
                "%s: discarding %d WAL entries after snapshot %d: the log had term %d at that index, "
                "the snapshot term %d (an InstallSnapshot was interrupted)",
                self._wal_dir, len(entries), self._base_index, replay.base_wal_term, self._base_term,
            )
            self._discarded_entries = len(entries)
            entries = []
        last_index = self._base_index + len(entries)

        commit = max(hs.commit, self._base_index)
        if commit > last_index:
            if self._fsync_enabled:
                raise StorageCorruption(
                    f"{self._hs_path}: commit index {hs.commit} is beyond the last log index {last_index}: "
                    "entries that were synced are missing from the WAL. " + self._fix_hint(),
                    path=self._hs_path,
                )
            log.warning(
                "%s: commit %d beyond the last log index %d (fsync is off: writes were lost); using %d",
                self._hs_path, hs.commit, last_index, last_index,
            )
            commit = last_index
        if commit != hs.commit:
            hs = HardState(hs.term, hs.vote, commit)

        # Recovery succeeded: only now change anything on disk.
        if torn is not None:
            seg, offset, size, reason = torn
            fd = os.open(seg.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, offset)
                self._fsync_fd(fd)
            finally:
                os.close(fd)
            log.warning(
                "%s: torn write at the end of the log cut off: %d bytes from byte offset %d (%s)",
                seg.path, size - offset, offset, reason,
            )
            self._repaired.append({"file": seg.path, "offset": offset, "dropped_bytes": size - offset, "reason": reason})
        for fb in self._snapshot_fallbacks:
            bad = fb["file"]
            if os.path.exists(bad):
                os.replace(bad, bad + ".corrupt")
        if self._snapshot_fallbacks:
            self._fsync_dir(self._snap_dir)

        self._terms = array("Q", (e.term for e in entries))
        self._durable_hs = hs
        if self._segments:
            seg = self._segments[-1]
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._reserve_active()
        else:
            self._create_segment(last_index + 1)
        if replay.wal_next is not None and replay.wal_next != last_index + 1:
            # Make the WAL say what recovery decided, so the next entry follows on.
            self._append([(_wal_record(REC_RESET, self._base_term, self._base_index), 0)])
            self._fsync_fd(self._fd)
            self._dirty = False
        self._recovered = PersistentState(hs, snapshot, tuple(entries))

    def _load_hardstate(self) -> tuple[HardState, int]:
        """(hard state, WAL head) from the file; (empty, 0) before the first term."""
        if not os.path.exists(self._hs_path):
            return HardState(), 0
        got, err = _read_single_record(self._hs_path, _decode_hardstate)
        if got is None:
            offset, reason = err
            raise StorageCorruption(
                f"{self._hs_path}: corrupt hard state record at byte offset {offset} ({reason}). "
                "Term and vote cannot be trusted, so the node will not start (it could vote twice). "
                + self._fix_hint(),
                path=self._hs_path,
                offset=offset,
            )
        return got

    def _load_newest_snapshot(self) -> Snapshot | None:
        found = sorted(
            ((int(m.group(1)), int(m.group(2))) for n in os.listdir(self._snap_dir) if (m := _SNAP_RE.match(n))),
            reverse=True,
        )
        self._snapshots = sorted(found)
        for index, term in found:
            path = self._snap_path(index, term)
            snap, err = _read_single_record(path, _decode_snapshot)
            if snap is not None and (snap.meta.index, snap.meta.term) != (index, term):
                snap, err = None, (0, f"holds snapshot {snap.meta.index}/{snap.meta.term}, not the one in its name")
            if snap is not None:
                if self._snapshot_fallbacks:
                    log.warning("%s: recovering from this older snapshot instead", path)
                return snap
            offset, reason = err
            log.warning("%s: unreadable snapshot (byte offset %d: %s); trying an older one", path, offset, reason)
            self._snapshot_fallbacks.append({"file": path, "offset": offset, "reason": reason})
            self._snapshots.remove((index, term))
        return None
