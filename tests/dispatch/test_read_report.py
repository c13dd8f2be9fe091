"""A peer's load report as the leader reads it (nodeagent/tasks.py ``read_report``): a
report that is not a msgpack map says nothing, and never raises into the tick."""

import msgpack

from nodeagent.tasks import read_report


def test_a_report_map_is_read_as_it_is():
    r = {"running": 1, "queued": 0, "capacity": 4, "shell": True, "disk_low": False}
    assert read_report(msgpack.packb(r)) == r


def test_anything_else_reads_as_an_empty_report():
    for raw in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("x"), b"\x81\xa1"):
        assert read_report(raw) == {}, raw
