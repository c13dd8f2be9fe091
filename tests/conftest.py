"""Fixtures shared by the process-level tests."""

from __future__ import annotations

import pytest

from console.local import LocalCluster


def pytest_report_header(config):
    from tests.ssh.conftest import report_header

    return report_header()  # which mode the deploy tests run in: netns or loopback


def pytest_collection_modifyitems(config, items):
    """The tests marked ``long(seconds)`` run first, longest first. With two xdist
    workers handing out tests in collection order, a 90-second test collected last
    (tests/ssh sorts late) ran on alone after everything else had finished, and the
    default run took 9 minutes and more. Only session-scoped fixtures are shared by these
    tests and their neighbours, so moving them sets nothing up twice."""
    def seconds(item) -> float:
        m = item.get_closest_marker("long")
        return -1 if m is None else (m.args[0] if m.args else 30)

    items.sort(key=seconds, reverse=True)  # stable: the others keep their order


@pytest.fixture
def make_cluster(tmp_path):
    """``make_cluster(n, **options)``: a started LocalCluster of real agent processes;
    every cluster made is stopped (by PID) when the test ends, whatever happened."""
    made: list[LocalCluster] = []

    def make(n: int, **kw) -> LocalCluster:
        lc = LocalCluster(tmp_path / f"c{len(made)}", n, **kw)
        made.append(lc)
        lc.start_all()
        return lc

    yield make
    for lc in made:
        lc.stop_all()


@pytest.fixture
def small_fs():
    """``small_fs.mount(path, mib[, "ext4"])``: a real small filesystem for this test
    (tests/smallfs.py); unmounted when the test ends."""
    from tests.smallfs import Mounts

    m = Mounts()
    try:
        yield m
    finally:
        m.unmount_all()
