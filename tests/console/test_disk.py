"""The console's disk warnings (console/disk.py): pure rules, `raftdeck status`'s lines,
and the console's header showing a low disk from the agents' statuses and clearing it."""

from __future__ import annotations

import asyncio

from console.demo import demo_app
from console.disk import disk_alerts, disk_lines, low_disks, refused_alerts, refused_lines
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


def test_a_refused_voter_is_named_with_who_refuses_it_and_the_way_out():
    r = {"known": "a" * 16, "offered": "b" * 16, "refusals": 3}
    sts = {"n1": {"refused_peers": {"n2": r}}, "n3": {"refused_peers": {"n2": r}},
           "n4": {"refused_peers": {}}, "n5": "no answer", "n6": {}}
    assert refused_alerts(sts) == ["n2 (refused by n1, n3)"]
    [line] = refused_lines(sts)
    assert line.startswith("data: ERROR: n1, n3 refuse n2: it is a voter"), line
    assert "`raftdeck remove-node n2`" in line and "`raftdeck add-node n2`" in line
    assert refused_lines({"n1": {"refused_peers": {}}}) == []


def test_the_header_shows_a_refused_voter_and_clears_it():
    app = demo_app()
    clock = [app.mono()]
    app.mono = lambda: clock[0]
    m = app.model

    def feed(refused: dict) -> None:
        clock[0] += 2.0
        m.update("n1", {**m.status("n1"), "refused_peers": refused}, clock[0])

    feed({"n2": {"known": "a" * 16, "offered": "b" * 16, "refusals": 1}})

    async def main():
        async with app.run_test(size=(160, 40)) as pilot:
            def header() -> str:
                return str(app.query_one("#health").content)

            await until(pilot, lambda: "DATA LOST: n2 (refused by n1)" in header(), 10,
                        lambda: header())
            feed({})
            await until(pilot, lambda: "DATA LOST" not in header(), 10, lambda: header())

    asyncio.run(main())
