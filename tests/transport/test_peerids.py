"""The policy that keeps a voter which lost its data directory from voting
(nodeagent/peerids.py): pure, so every case is one call."""

from __future__ import annotations

from nodeagent.peerids import PeerIds

OLD, NEW = "a1" * 8, "b2" * 8


def let_in(ids: PeerIds, node: str, data_id: str, voter: bool) -> bool:
    """What the agent does: admit, and record (after persisting) when asked to."""
    v = ids.admit(node, data_id, voter=voter)
    if v.record:
        ids.recorded(node, data_id)
    return v.ok


def test_the_first_id_seen_is_recorded_and_the_same_one_is_let_in():
    ids = PeerIds("n1", {})
    first = ids.admit("n2", OLD, voter=True)
    assert first.ok and first.record and ids.known == {}  # not before the caller persisted it
    assert ids.known_with("n2", OLD) == {"n2": OLD}
    ids.recorded("n2", OLD)
    again = ids.admit("n2", OLD, voter=True)
    assert again.ok and not again.record


def test_a_voter_with_another_id_is_refused_with_the_way_out():
    ids = PeerIds("n1", {"n2": OLD})
    for n in (1, 2):
        v = ids.admit("n2", NEW, voter=True)
        assert not v.ok and not v.record
        assert ids.refused["n2"] == {"known": OLD, "offered": NEW, "refusals": n}
    assert ids.known == {"n2": OLD}  # the record stays: it is what protects the log
    for words in ("n1 refuses n2", OLD, NEW, "raftdeck remove-node n2", "raftdeck add-node n2"):
        assert words in v.message, v.message


def test_a_learner_or_a_non_member_with_another_id_replaces_the_record():
    """It never voted or counted towards a commit: nothing of it can be lost. This is how
    a removed voter comes back emptied."""
    ids = PeerIds("n1", {"n2": OLD})
    assert not let_in(ids, "n2", NEW, voter=True)
    assert let_in(ids, "n2", NEW, voter=False)
    assert ids.known == {"n2": NEW} and ids.refused == {}
    # Once a voter again, the new id is the one that counts.
    assert let_in(ids, "n2", NEW, voter=True)
    assert not let_in(ids, "n2", OLD, voter=True)


def test_the_old_directory_restored_is_let_in_again():
    ids = PeerIds("n1", {"n2": OLD})
    assert not let_in(ids, "n2", NEW, voter=True)
    v = ids.admit("n2", OLD, voter=True)
    assert v.ok and not v.record and ids.refused == {}


def test_a_hello_without_an_id_is_let_in_unrecorded():
    ids = PeerIds("n1", {"n2": OLD})
    v = ids.admit("n2", None, voter=True)
    assert v.ok and not v.record and ids.known == {"n2": OLD}
