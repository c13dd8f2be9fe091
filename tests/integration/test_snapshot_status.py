"""The status says when a snapshot is in flight (``snapshots.in_flight``): from the
capture, while the worker thread serializes and writes it, until the loop adopts it.
`python -m bench` waits on it before its settled RSS reading. A real driver on a real
DiskStorage; the worker's file write is held at a gate so the test sees it mid-way."""

from __future__ import annotations

import threading

import trio

from nodeagent.state import encode_command
from nodeagent.storage import DiskStorage
from tests.integration.single_voter import single_voter_driver, start_leading


def test_in_flight_from_capture_to_adoption(tmp_path):
    storage = DiskStorage.open(tmp_path / "n1", fsync=False)
    gate, entered = threading.Event(), threading.Event()
    real_write = storage.write_snapshot_file

    def write_snapshot_file(snap):
        entered.set()
        assert gate.wait(30), "the test never opened the gate"
        return real_write(snap)

    storage.write_snapshot_file = write_snapshot_file
    try:
        node, driver = single_voter_driver(storage, tick_interval=0.02, snapshot_interval=30)

        def snaps() -> dict:
            return driver.status()["snapshots"]

        async def main():
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await start_leading(nursery, driver, node)
                    assert snaps()["in_flight"] is False and snaps()["taken"] == 0
                    for i in range(40):  # past the interval: a snapshot starts
                        p = driver.submit("propose", encode_command("put", key=f"k{i}", value=b"x"))
                        await p.wait(30)
                    while not entered.is_set():
                        await trio.sleep(0.01)
                    try:
                        assert snaps()["in_flight"] is True and snaps()["taken"] == 0
                    finally:
                        gate.set()  # a failure must not leave the worker thread waiting
                    while snaps()["in_flight"]:
                        await trio.sleep(0.01)
                    assert snaps()["taken"] == 1
                    nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        gate.set()
        storage.close()
