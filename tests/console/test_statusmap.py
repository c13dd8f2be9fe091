"""The compact status pushed to subscribers keeps what the console shows, drops what
grows with the cluster."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from nodeagent.protocol import FrameDecoder, encode
from nodeagent.statusmap import apply_delta, compact_status, status_delta


def test_compact_keeps_what_the_console_reads_and_drops_the_rest():
    full = {
        "role": "leader", "term": 3, "digest": "ab", "progress": {"n2": {"match": 5}},
        "peer_reports": {"n2": {"running": 1}},
        "tasks": {"counts": {"running": 1}, "executor": {"running": 1}, "loads": {"n2": {}}},
        "transport": {"totals": {"sent": 9}, "peers": {
            "n2": {"connected": True, "sent": 7, "dropped_full": 1, "dropped_fault": 2,
                   "dropped_incoming": 50, "bytes_sent": 999, "last_error": "old"},
            "n3": {"connected": False, "sent": 2, "dropped_error": 3, "last_error": "refused"},
        }},
    }
    c = compact_status(full)
    assert c["transport"]["peers"] == {
        "n2": {"connected": True, "sent": 7, "dropped_out": 3},
        "n3": {"connected": False, "sent": 2, "dropped_out": 3, "last_error": "refused"},
    }
    assert "peer_reports" not in c and "loads" not in c["tasks"]
    assert c["progress"] == full["progress"] and c["digest"] == "ab"
    assert full["transport"]["peers"]["n2"]["bytes_sent"] == 999  # the full map is untouched


# -- deltas ------------------------------------------------------------------------------

_leaf = hs.one_of(hs.none(), hs.booleans(), hs.integers(-5, 5), hs.text(max_size=3),
                  hs.lists(hs.integers(0, 3), max_size=3))
_maps = hs.recursive(_leaf, lambda inner: hs.dictionaries(hs.sampled_from("abcde"), inner, max_size=4),
                     max_leaves=20).filter(lambda v: isinstance(v, dict))


@settings(max_examples=400, deadline=None)
@given(_maps, _maps)
def test_a_delta_rebuilds_the_new_map_and_leaves_the_old_one_alone(old, new):
    before = copy.deepcopy(old)
    d = status_delta(old, new)
    assert apply_delta(old, d) == new
    assert old == before
    # It survives the wire like any push.
    dec = FrameDecoder(1 << 20)
    dec.receive_data(encode({"type": "status_update", "id": 1, "delta": True, "status": d}))
    assert apply_delta(old, dec.next_message()["status"]) == new


def test_a_follower_delta_is_small_when_one_of_many_peers_changed():
    peers = {f"n{i}": {"connected": True, "sent": i, "dropped_out": 0} for i in range(1000)}
    old = {"role": "follower", "commit": 10, "transport": {"peers": peers, "totals": {"sent": 1}}}
    new = copy.deepcopy(old)
    new["commit"] = 11
    new["transport"]["peers"]["n1"]["sent"] += 1
    d = status_delta(old, new)
    assert d == {"set": {"commit": 11},
                 "sub": {"transport": {"sub": {"peers": {"sub": {"n1": {"set": {"sent": 2}}}}}}}}
    assert status_delta(new, new) == {}
    assert len(encode({"type": "status_update", "delta": True, "status": d})) < 200


def test_type_changes_and_removals_are_carried():
    old = {"a": 1, "b": {"x": 1}, "c": [1], "d": True}
    new = {"a": 1.0, "b": 5, "c": [1]}
    d = status_delta(old, new)
    assert apply_delta(old, d) == new and type(apply_delta(old, d)["a"]) is float
    assert d["del"] == ["d"]


def test_a_delta_that_does_not_fit_is_refused():
    with pytest.raises(ValueError):
        apply_delta({"a": 1}, {"sub": {"a": {"set": {"x": 1}}}})
    with pytest.raises(ValueError):
        apply_delta({"a": 1}, {"bogus": 1})
