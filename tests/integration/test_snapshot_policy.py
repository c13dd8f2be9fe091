"""When a snapshot is due: ``snapshot_interval`` entries since the last one, and those
entries' commands at least ``snapshot_log_percent`` % of the last snapshot's bytes.
A real driver on a real DiskStorage (one voter); the sizes are read from its status."""

from __future__ import annotations

import trio

from nodeagent.state import encode_command
from nodeagent.storage import DiskStorage
from tests.integration.single_voter import single_voter_driver, start_leading


def _run(tmp_path, percent: int, check) -> None:
    storage = DiskStorage.open(tmp_path / "n1", fsync=False)
    try:
        node, driver = single_voter_driver(storage, tick_interval=0.02, snapshot_interval=20,
                                           snapshot_log_percent=percent)

        async def put(key: str, value: bytes) -> None:
            p = driver.submit("propose", encode_command("put", key=key, value=value))
            await p.wait(30)

        async def settled() -> dict:
            # a snapshot captured is adopted within a few rounds; wait for none in flight
            while driver.status()["snapshots"]["in_flight"]:
                await trio.sleep(0.01)
            return driver.status()["snapshots"]

        async def main():
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await start_leading(nursery, driver, node)
                    await check(put, settled)
                    nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        storage.close()


async def _big_state_then_small_writes(put, settled) -> tuple[dict, dict]:
    """18 puts of 4 KiB, then 40 puts of 10 bytes. Entries 1 and 2 are the membership
    and the leader's empty entry, so the 18th put is entry 20: the first snapshot (the
    interval is 20) covers them all."""
    for i in range(18):
        await put(f"big{i}", b"b" * 4096)
    for _ in range(200):  # the first snapshot is due at once: nothing came before it
        first = await settled()
        if first["taken"] == 1:
            break
        await trio.sleep(0.01)
    assert first["taken"] == 1 and first["last_bytes"] > 60_000, first
    assert first["last_index"] == 20 and first["log_bytes_since"] == 0, first
    for i in range(40):
        await put(f"small{i}", b"s" * 10)
    return first, await settled()


def test_a_big_state_waits_for_its_share_of_log_bytes(tmp_path):
    async def check(put, settled):
        first, after = await _big_state_then_small_writes(put, settled)
        # 40 entries (twice the interval) of ~40 bytes each: far below 10 % of the snapshot
        assert after["taken"] == 1, after
        assert after["log_entries_since"] >= 40 and after["log_bytes_since"] < first["last_bytes"] // 10
        for i in range(10):  # 10 x 1 KiB more: past 10 % of the snapshot
            await put(f"more{i}", b"m" * 1024)
        for _ in range(200):
            s = await settled()
            if s["taken"] == 2:
                break
            await trio.sleep(0.01)
        assert s["taken"] == 2, s
        # the count starts again from what applied after the new snapshot's index
        assert s["log_bytes_since"] < 1024 * 10, s

    _run(tmp_path, 10, check)


def test_percent_zero_snapshots_by_entries_alone(tmp_path):
    async def check(put, settled):
        _, after = await _big_state_then_small_writes(put, settled)
        assert after["taken"] >= 2, after

    _run(tmp_path, 0, check)


def test_a_restarted_driver_counts_from_its_recovered_snapshot(tmp_path):
    """After a restart the rule goes on where it was: the last snapshot's size comes from
    its file, and the entries replayed after it count towards the next one."""
    seen: dict = {}

    async def first_life(put, settled):
        first, after = await _big_state_then_small_writes(put, settled)
        seen["first"], seen["after"] = first, after

    _run(tmp_path, 10, first_life)
    storage = DiskStorage.open(tmp_path / "n1", fsync=False)
    try:
        node, driver = single_voter_driver(storage, tick_interval=0.02, snapshot_interval=20,
                                           snapshot_log_percent=10)

        async def main():
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await start_leading(nursery, driver, node)
                    # the entries after the snapshot apply again as the log replays
                    while (driver.status()["snapshots"]["log_entries_since"]
                           < seen["after"]["log_entries_since"]):
                        await trio.sleep(0.01)
                    s = driver.status()["snapshots"]
                    assert s["last_index"] == seen["after"]["last_index"]
                    assert s["last_bytes"] == seen["after"]["last_bytes"]
                    # the 40 small puts again (and this life's empty leader entry: no bytes)
                    assert s["log_bytes_since"] == seen["after"]["log_bytes_since"], (s, seen["after"])
                    assert s["taken"] == 0
                    nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        storage.close()


def test_the_byte_rule_waits_at_most_twenty_intervals(tmp_path):
    """Small commands on a big state: the byte rule alone would let the log grow for a
    long time; past SNAPSHOT_MAX_INTERVALS intervals a snapshot is taken anyway."""
    from nodeagent.driver import SNAPSHOT_MAX_INTERVALS

    async def check(put, settled):
        first, after = await _big_state_then_small_writes(put, settled)
        assert after["taken"] == 1, after
        cap = SNAPSHOT_MAX_INTERVALS * 20  # the test's interval is 20
        for i in range(cap):
            await put(f"tiny{i}", b"t")
        s = await settled()
        for _ in range(200):
            if s["taken"] >= 2:
                break
            await trio.sleep(0.01)
            s = await settled()
        assert s["taken"] == 2, s
        # far below the byte rule's share: only the cap can have taken it
        assert s["last_index"] - first["last_index"] >= cap - 1, (first, s)

    _run(tmp_path, 100_000, check)
