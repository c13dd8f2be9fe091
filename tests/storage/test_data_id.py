"""A data directory's id and the peers' ids it keeps (DiskStorage.data_id,
peer_data_ids): stable while the directory lives, new when it is emptied, durable."""

from __future__ import annotations

import shutil

from nodeagent.storage import DiskStorage


def test_the_id_lasts_as_long_as_the_directory(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        first = s.data_id()
        assert s.data_id() == first and len(first) == 16
    with DiskStorage.open(d) as s:
        assert s.data_id() == first
    shutil.rmtree(d)
    with DiskStorage.open(d) as s:
        assert s.data_id() != first


def test_a_damaged_id_is_replaced_by_a_new_one(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        first = s.data_id()
    (d / DiskStorage.DATA_ID).write_text("not an id\n")
    with DiskStorage.open(d) as s:
        new = s.data_id()
        assert new != first and s.data_id() == new


def test_peer_ids_round_trip_and_bad_files_read_as_none(tmp_path):
    d = tmp_path / "n1"
    with DiskStorage.open(d) as s:
        assert s.peer_data_ids() == {}
        s.set_peer_data_ids({"n3": "c" * 16, "n2": "b" * 16})
    with DiskStorage.open(d) as s:
        assert s.peer_data_ids() == {"n2": "b" * 16, "n3": "c" * 16}
    path = d / DiskStorage.PEER_DATA_IDS
    for bad in ('{"n2": "not hex", "n3": "' + "c" * 16 + '"}', "[1, 2]", "{trunc"):
        path.write_text(bad)
        with DiskStorage.open(d) as s:
            got = s.peer_data_ids()
        assert got == ({"n3": "c" * 16} if bad.startswith('{"n2"') else {}), (bad, got)
