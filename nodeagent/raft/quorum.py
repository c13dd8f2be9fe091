"""Majority arithmetic. Pure functions over sets of voters; no node state."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(n_voters: int) -> int:
    """The smallest number of voters that forms a quorum."""
    return n_voters // 2 + 1


def committed_index(voters: Iterable[str], match: Mapping[str, int]) -> int:
    """The largest index held by a majority of ``voters`` (0 for an empty configuration).

    Sort the voters' match indexes from high to low; the one at position majority-1 is
    present on at least a majority.
    """
    idx = sorted((match.get(v, 0) for v in voters), reverse=True)
    if not idx:
        return 0
    return idx[majority(len(idx)) - 1]


def vote_result(voters: Iterable[str], votes: Mapping[str, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant."""
    voters = list(voters)
    if not voters:
        return VoteResult.WON
    need = majority(len(voters))
    granted = sum(1 for v in voters if votes.get(v) is True)
    missing = sum(1 for v in voters if v not in votes)
    if granted >= need:
        return VoteResult.WON
    if granted + missing >= need:
        return VoteResult.PENDING
    return VoteResult.LOST


def has_quorum(voters: Iterable[str], present: Iterable[str]) -> bool:
    voters = set(voters)
    return len(voters & set(present)) >= majority(len(voters)) if voters else True
