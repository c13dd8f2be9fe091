"""Backups of a cluster's state, and restoring one into new data directories.

``raftdeck backup FILE`` asks the leader (or ``--node``) for its whole state at its
applied index (agent request ``backup``: every key, task and client session), after a
read barrier, so that it holds every write acknowledged before it was asked for
(``--stale``: without one, for when no quorum is left), fetches it in 1 MiB chunks,
checks its sha256 and writes FILE durably (temporary file, fsync, rename, directory
fsync). It is what etcd's ``snapshot save`` is: a point-in-time copy of what the
cluster had committed, to start again from when a majority of the data directories is
lost.

``raftdeck restore FILE`` is offline (etcd's ``snapshot restore``): with every local agent
stopped and their data directories empty or absent, it writes into each inventory node's
data directory a Raft snapshot at the backup's index and term, with the *inventory's*
membership (voters, learners, priorities), and a hard state that commits it. Started with
``raftdeck up``, the nodes find a log, do not bootstrap, elect a leader, and serve the
restored keys and tasks. Each directory gets a new data id: this is a new cluster.

``raftdeck restore FILE --check`` writes nothing: it says what the file holds
(``describe``) and whether every node is ready for the restore.

File: one msgpack map ``{"format": "raftdeck-backup", "version": 1, "cluster", "node",
"index", "term", "taken_at_ms", "size", "sha256", "state": bin}``. The pure parts
(``encode``, ``decode``, ``load``, ``restored_state``, ``describe``) have no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

FORMAT = "raftdeck-backup"
VERSION = 1
_META = ("cluster", "node", "index", "term", "taken_at_ms", "size", "sha256")


class BackupError(Exception):
    """A backup file or restore that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Backup:
    cluster: str
    node: str
    index: int
    term: int
    taken_at_ms: int
    size: int
    sha256: str
    state: bytes

    def meta(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _META}


# -- the file (pure) ------------------------------------------------------------------------

def encode(b: Backup) -> bytes:
    return msgpack.packb({"format": FORMAT, "version": VERSION, **b.meta(), "state": b.state},
                         use_bin_type=True)


def decode(blob: bytes, where: str) -> Backup:
    """The backup in ``blob`` (read from ``where``), checked whole: its sha256 and size."""
    try:
        m = msgpack.unpackb(blob, raw=False)
    except Exception as e:
        raise BackupError(f"{where}: not a raftdeck backup (it does not decode: {e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BackupError(f"{where}: not a raftdeck backup (no format {FORMAT!r})")
    if m.get("version") != VERSION:
        raise BackupError(f"{where}: backup format version {m.get('version')!r}; this raftdeck "
                          f"reads version {VERSION}")
    types = {"cluster": str, "node": str, "index": int, "term": int, "taken_at_ms": int,
             "size": int, "sha256": str, "state": bytes}
    for k, t in types.items():
        if not isinstance(m.get(k), t):
            raise BackupError(f"{where}: field {k!r} missing or not {t.__name__}")
    b = Backup(**{k: m[k] for k in types})
    if len(b.state) != b.size or hashlib.sha256(b.state).hexdigest() != b.sha256:
        raise BackupError(f"{where}: damaged: the state's size or sha256 does not match what "
                          f"the backup recorded ({b.size} bytes, sha256 {b.sha256[:16]}...)")
    if b.index < 1 or b.term < 1:
        raise BackupError(f"{where}: a backup of an empty log (index {b.index}): nothing to "
                          "restore")
    return b


def load(b: Backup):
    """The backup's state as a StateMachine, checked: it loads, and it is at the index the
    backup records. Raises BackupError otherwise."""
    from nodeagent.state import StateError, StateMachine

    sm = StateMachine()
    try:
        sm.restore(b.state)
    except StateError as e:
        raise BackupError(f"the backup's state does not load: {e}") from None
    if sm.applied_index != b.index:
        raise BackupError(f"the backup's state is at index {sm.applied_index}, but the backup "
                          f"says {b.index}")
    return sm


def restored_state(b: Backup, conf, sm=None) -> bytes:
    """The backup's state with ``conf`` as its membership: what every restored node's
    snapshot holds. ``sm``: the backup already loaded (``load``; its membership is
    replaced). Raises BackupError if the state does not load."""
    sm = sm if sm is not None else load(b)
    sm.reset_membership(conf)
    return sm.snapshot()


def describe(b: Backup, sm=None) -> dict[str, Any]:
    """What a backup holds (etcd's ``snapshot status``): its metadata, and from its state
    the number of keys, tasks in each state (those with any) and client sessions, the
    membership it was taken under and the state's digest. ``sm``: the backup already
    loaded (``load``). Raises BackupError if the state does not load."""
    sm = sm if sm is not None else load(b)
    st = sm.statistics()
    return {**b.meta(), "keys": st.keys, "sessions": st.sessions,
            "tasks": {k: v for k, v in sm.task_counts().items() if v},
            "voters": sorted(sm.conf.voters), "learners": sorted(sm.conf.learners),
            "digest": sm.digest()}


# -- taking one -----------------------------------------------------------------------------

async def fetch(client, node: str, *, stale: bool = False) -> Backup:
    """Take a backup on ``node`` and fetch it whole. Linearizable unless ``stale``: the
    agent first confirms, with a quorum, that it has applied every acknowledged write.
    A node that answers ``not_leader`` naming a leader is followed there, twice at most
    (the leader found a moment ago may have been deposed since)."""
    from console.client import RequestError

    for _ in range(3):
        try:
            r = await client.call(node, "backup",
                                  consistency="stale" if stale else "linearizable")
            break
        except RequestError as e:
            if e.code not in ("not_leader", "timeout"):
                raise
            if e.code == "timeout" or not e.leader or e.leader == node:
                raise BackupError(f"{node} cannot take a linearizable backup now ({e.message}); "
                                  "`raftdeck status` shows whether there is a leader. With no "
                                  "quorum left, `--node N --stale` saves what N has applied"
                                  ) from None
            if e.leader not in client.addresses:
                raise BackupError(f"{node} says {e.leader} leads, but this inventory has no "
                                  f"{e.leader}: add it to the inventory and run again") from None
            node = e.leader
    else:
        raise BackupError("the leader kept changing; try again")
    bid, size = r["backup"], r["size"]
    parts, got = [r["data"]], len(r["data"])
    while got < size:
        r = await client.call(node, "backup", backup=bid, offset=got)
        if not r["data"]:
            raise BackupError(f"{node} sent an empty chunk at offset {got} of {size}")
        parts.append(r["data"])
        got += len(r["data"])
    state = b"".join(parts)
    if hashlib.sha256(state).hexdigest() != r["sha256"]:
        raise BackupError(f"the backup fetched from {node} does not match its sha256; try again")
    return Backup(cluster=r["cluster"], node=r["node"], index=r["index"], term=r["term"],
                  taken_at_ms=r["taken_at_ms"], size=size, sha256=r["sha256"], state=state)


def write_file(path: Path, blob: bytes) -> None:
    """Write the backup file durably, readable by its owner only."""
    from nodeagent.storage import write_file_durably

    write_file_durably(path, blob, 0o600)


# -- restoring one --------------------------------------------------------------------------

def restore_into(data_dir: Path, b: Backup, conf, state: bytes) -> None:
    """Write the backup into the empty ``data_dir`` as a snapshot the log starts from."""
    from nodeagent.raft.messages import HardState, Snapshot, SnapshotMeta
    from nodeagent.storage import DiskStorage

    with DiskStorage.open(data_dir, fsync=True) as storage:
        storage.save(HardState(term=b.term, vote=None, commit=b.index), [],
                     Snapshot(SnapshotMeta(b.index, b.term, conf), state))
        storage.sync()
        storage.data_id()  # a new one: this is a new cluster
