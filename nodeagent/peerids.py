"""Which data directory each peer comes with, and whether to let a peer's link in.

A voter whose data directory was emptied (a wiped disk, a replaced host, a mistaken
``rm -rf``) and that is started again has lost its log and the votes it cast, yet looks
like any node on its first start: it bootstraps and answers vote requests. Its vote can
then elect a candidate that lacks an entry the cluster committed with this voter's
acknowledgement, and that entry is lost (the "lost disk" case of Raft's safety argument).

Every data directory has a random id (``DiskStorage.data_id``), sent in the peer
``hello``. Each agent remembers, durably, the id each peer last came with. A peer that
is a voter in this node's membership and comes with another id is refused: its messages
never reach Raft here, so it can neither vote nor acknowledge. A learner or a node that is
not a member has nothing to lose (it never voted or counted towards a commit), so a new
id from it is recorded and let in; that is also how a voter that was removed comes back
(``raftdeck remove-node``, then ``add-node``).

What it cannot catch: a peer that never talked to the voter before it was wiped has no id
on record for it and takes the new one as the first.

Pure: no I/O and no clock. When ``admit`` asks for a new record, the caller makes it
durable before it lets the link in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Admission", "PeerIds"]


@dataclass(frozen=True, slots=True)
class Admission:
    ok: bool
    record: bool = False  # a new id to record: ``known_with`` it must be durable first
    message: str = ""  # why it was refused


class PeerIds:
    def __init__(self, node_id: str, known: Mapping[str, str]):
        self.node_id = node_id
        self.known: dict[str, str] = dict(known)
        # node -> {"known": id on record, "offered": the id it came with, "refusals": n}
        self.refused: dict[str, dict] = {}

    def admit(self, node: str, data_id: str | None, *, voter: bool) -> Admission:
        """Whether ``node``'s link, which came with ``data_id``, may be used; ``voter``:
        whether ``node`` is a voter in this node's membership now. With ``record``, the
        link may be used once ``recorded(node, data_id)`` has been called, after the
        caller made ``known_with(node, data_id)`` durable."""
        if data_id is None:  # a hello without the field: nothing to check against
            return Admission(True)
        had = self.known.get(node)
        if had == data_id:
            self.refused.pop(node, None)
            return Admission(True)
        if had is not None and voter:
            r = self.refused.setdefault(node, {"known": had, "offered": data_id, "refusals": 0})
            r["offered"] = data_id
            r["refusals"] += 1
            return Admission(False, message=(
                f"{self.node_id} refuses {node}: {node} is a voter, and its data directory is "
                f"not the one {self.node_id} knew (data id {had}, now {data_id}). A voter that "
                f"lost its log must not vote. Restore its data directory, or take it out and "
                f"in again: `raftdeck remove-node {node}`, empty its data directory, then "
                f"`raftdeck add-node {node}`"))
        return Admission(True, record=True)

    def known_with(self, node: str, data_id: str) -> dict[str, str]:
        return {**self.known, node: data_id}

    def recorded(self, node: str, data_id: str) -> None:
        self.known[node] = data_id
        self.refused.pop(node, None)
