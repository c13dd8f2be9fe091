"""The compact status pushed to subscribers keeps what the console shows, drops what
grows with the cluster."""

from nodeagent.statusmap import compact_status


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
