"""A background snapshot captures the key-value table without copying it (FreezableKV):
the thread serializes the table as it was at the snapshot's index while the driver goes
on applying puts and deletes, and once the thread is done the table takes those changes.
A real driver on a real DiskStorage (one voter); the thread is held half-way through
writing the file (``RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY``) so the changes land meanwhile."""

from __future__ import annotations

import trio

from nodeagent.state import StateMachine, encode_command
from nodeagent.storage import DiskStorage
from tests.integration.single_voter import single_voter_driver, start_leading


def test_changes_during_a_background_snapshot_stay_out_of_it_and_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("RAFTDECK_TEST_SNAPSHOT_WRITE_DELAY", "1.0")
    storage = DiskStorage.open(tmp_path / "n1", fsync=False)
    at_capture: dict[str, bytes] = {}
    final: dict[str, bytes] = {}
    try:
        node, driver = single_voter_driver(storage, tick_interval=0.02, snapshot_interval=20,
                                           snapshot_log_percent=0)

        async def put(key: str, value: bytes) -> None:
            await driver.submit("propose", encode_command("put", key=key, value=value)).wait(30)
            final[key] = value

        async def delete(key: str) -> None:
            await driver.submit("propose", encode_command("delete", key=key)).wait(30)
            final.pop(key, None)

        async def main():
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await start_leading(nursery, driver, node)
                    # entries 1-2: membership and the leader's empty entry; 3-20: these,
                    # so the snapshot at 20 (the interval) holds exactly them
                    for i in range(18):
                        await put(f"k{i:02d}", b"v1")
                    at_capture.update(final)
                    while not driver.status()["snapshots"]["in_flight"]:
                        await trio.sleep(0.005)
                    for i in range(10):
                        await put(f"k{i:02d}", b"v2")  # over captured keys
                    for i in range(10, 15):
                        await delete(f"k{i:02d}")
                    for i in range(10):
                        await put(f"n{i:02d}", b"new")
                    # frozen meanwhile, and still read as the latest writes
                    assert driver.state._kv.over is not None, "the snapshot should still be in flight"
                    assert driver.state.dump() == final and driver.state.get("k00") == b"v2"
                    assert driver.state.get("k10") is None and driver.state.get("n00") == b"new"
                    while driver.status()["snapshots"]["in_flight"]:
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()

        trio.run(main)
        snaps = driver.status()["snapshots"]
        assert snaps["taken"] == 1 and snaps["last_index"] == 20, snaps
        sm = driver.state
        assert sm._kv.over is None  # thawed: the changes folded into the table
        assert sm._kv.base == final == sm.dump() and sm.statistics().keys == len(final)
        assert sm.digest() == sm.digest_full()
    finally:
        storage.close()
    # the snapshot on disk is the table at its index, none of the later changes
    reopened = DiskStorage.open(tmp_path / "n1", fsync=False)
    try:
        snap = reopened.recovered().snapshot
        assert snap is not None and snap.meta.index == 20
        assert StateMachine.load(bytes(snap.data)).dump() == at_capture
    finally:
        reopened.close()
