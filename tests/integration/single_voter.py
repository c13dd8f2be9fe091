"""A real Driver over a real DiskStorage with one voter, for tests of the driver's own
loop (no transport: the node is its own majority)."""

from __future__ import annotations

import random

import trio

from nodeagent.driver import Driver
from nodeagent.raft.core import Config, RaftNode
from nodeagent.raft.messages import ConfState, Role
from nodeagent.state import StateMachine


def single_voter_driver(storage, **driver_kw) -> tuple[RaftNode, Driver]:
    """Node n1, the only voter, and its driver (``driver_kw``: tick_interval, ...)."""
    node = RaftNode(Config("n1", election_tick=10, heartbeat_tick=1), storage.recovered(),
                    rng=random.Random(1), bootstrap=ConfState(frozenset({"n1"})))
    return node, Driver(node, storage, StateMachine(), lambda m: True, **driver_kw)


async def start_leading(nursery: trio.Nursery, driver: Driver, node: RaftNode,
                        poll: float = 0.02) -> None:
    """Run the driver in ``nursery`` and return once the node leads."""
    await nursery.start(driver.run)
    while node.role is not Role.LEADER:
        await trio.sleep(poll)
