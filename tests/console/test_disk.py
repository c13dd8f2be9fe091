"""The console's disk warnings (console/disk.py): pure rules, `raftdeck status`'s lines,
and the console's header showing a low disk from the agents' statuses and clearing it."""

from __future__ import annotations

import asyncio

from console.demo import demo_app
from console.disk import disk_alerts, disk_lines, low_disks
from console.testing import until

MIB = 1 << 20


def disk(free_mib: int, needs_mib: int = 64) -> dict:
    return {"free_bytes": free_mib * MIB, "total_bytes": 10_000 * MIB,
            "needs_bytes": needs_mib * MIB, "low": free_mib < 2 * needs_mib}


def test_only_low_disks_are_named_least_free_first():
    sts = {"n1": {"disk": disk(5000)}, "n2": {"disk": disk(100)}, "n3": {"disk": disk(20)},
           "n4": "connection refused", "n5": {"disk": None}, "n6": {}}
    assert low_disks(sts) == [("n3", 20, 64), ("n2", 100, 64)]
    assert disk_alerts(sts) == ["n3 20 MiB free", "n2 100 MiB free"]
    lines = disk_lines(sts)
    assert len(lines) == 2 and lines[0].startswith("disk: WARNING: n3 has 20 MiB free")
    assert "64 MiB its log needs next" in lines[0] and "free space there" in lines[0]
    assert disk_lines({"n1": {"disk": disk(5000)}}) == []


def test_the_header_shows_a_low_disk_and_clears_it():
    app = demo_app()
    clock = [app.mono()]
    app.mono = lambda: clock[0]
    m = app.model

    def feed(free: dict[str, int]) -> None:
        clock[0] += 2.0  # past the header's once-a-second look
        for name, mib in free.items():
            m.update(name, {**m.status(name), "disk": disk(mib)}, clock[0])

    feed({"n1": 5000, "n2": 90, "n3": 5000, "n4": 5000})

    async def main():
        async with app.run_test(size=(160, 40)) as pilot:
            def header() -> str:
                return str(app.query_one("#health").content)

            await until(pilot, lambda: "DISK LOW: n2 90 MiB free" in header(), 10, lambda: header())
            feed({"n2": 4000})
            await until(pilot, lambda: "DISK LOW" not in header(), 10, lambda: header())

    asyncio.run(main())
