"""Direct rounds (nodeagent/driver.py ``deliver``): a replication message that meets the
driver parked on an empty inbox is handled, made durable and answered inside
``deliver``, in the delivering task. A real follower driver with real storage on disk;
the leader is this test, handing it AppendEntries as a peer connection would."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio

from nodeagent.driver import Driver, RequestFailed
from nodeagent.raft.core import Config, RaftNode
from nodeagent.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfState,
    Entry,
    EntryKind,
    RequestVote,
)
from nodeagent.state import StateMachine, encode_command
from nodeagent.storage import DiskStorage

pytestmark = pytest.mark.integration


def _append(index: int, commit: int) -> AppendEntries:
    """Entry ``index`` (>= 2: every replica starts with the bootstrap entry at 1, term 1)."""
    data = encode_command("put", key=f"k{index}", value=b"v")
    return AppendEntries("n1", "n2", 1, index - 1, 1, (Entry(1, index, data, EntryKind.NORMAL),), commit)


class Follower:
    def __init__(self, tmp_path, *, sync_in_thread: bool = True):
        self.storage = DiskStorage.open(tmp_path / "n2", fsync=True)
        self.sent: list = []
        node = RaftNode(Config("n2", election_tick=1000, heartbeat_tick=1), self.storage.recovered(),
                        rng=random.Random(2), bootstrap=ConfState(frozenset({"n1", "n2", "n3"})))
        self.driver = Driver(node, self.storage, StateMachine(), self._send, tick_interval=0.05,
                             snapshot_interval=100_000, sync_in_thread=sync_in_thread)

    def _send(self, m) -> bool:
        self.sent.append(m)
        return True

    def acks(self) -> list[int]:
        return [m.index for m in self.sent if type(m) is AppendEntriesResponse and m.success]

    async def until_parked(self) -> None:
        with trio.fail_after(10):
            while not self.driver._parked:
                await trio.sleep(0)

    async def until_acked(self) -> None:
        with trio.fail_after(10):
            while not self.acks():
                await trio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def running(self):
        """The driver running and parked, with fast fsyncs on record; stopped after."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.driver.run)
            await self.until_parked()
            self.driver.sync_ewma = 0.0  # a busy machine's slow fsyncs would route to the inbox
            yield
            nursery.cancel_scope.cancel()
        self.storage.close()


def _run(fn) -> None:
    trio.run(fn)


def test_a_parked_driver_answers_within_deliver(tmp_path):
    f = Follower(tmp_path)

    async def main():
        async with f.running():
            for i in range(2, 22):
                await f.until_parked()
                f.driver.sync_ewma = 0.0
                fsyncs = f.storage.stats()["fsyncs"]
                assert f.driver.deliver(_append(i, i - 1))
                # Durable and acknowledged before deliver returned: no hop to the driver.
                assert f.acks()[-1:] == [i]
                assert f.storage.stats()["fsyncs"] == fsyncs + 1
            assert f.driver.direct_rounds == 20
            assert f.driver.state.applied_index == 20  # commit 20 came with the last one

    _run(main)
    # Durable for real: a restart finds all twenty entries.
    again = DiskStorage.open(tmp_path / "n2", fsync=True)
    assert [e.index for e in again.recovered().entries] == list(range(1, 22))
    again.close()


def test_a_handed_over_event_goes_first(tmp_path):
    # A proposal handed to the parked driver makes it runnable; a message delivered
    # before it runs must queue behind it, not overtake it in a direct round.
    f = Follower(tmp_path)

    async def main():
        async with f.running():
            p = f.driver.submit("propose", encode_command("put", key="a", value=b"1"))
            assert f.driver.deliver(_append(2, 1))
            assert f.driver.direct_rounds == 0 and f.acks() == []  # queued, not run here
            with pytest.raises(RequestFailed, match="not the leader"):
                await p.wait(10)
            await f.until_acked()
            assert f.acks() == [2]

    _run(main)


def test_slow_disk_and_other_messages_take_the_inbox(tmp_path):
    f = Follower(tmp_path)

    async def main():
        async with f.running():
            f.driver.sync_ewma = 0.005  # recent fsyncs were slow: they go to a thread
            assert f.driver.deliver(_append(2, 1))
            assert f.driver.direct_rounds == 0
            await f.until_acked()
            await f.until_parked()
            f.driver.deliver(RequestVote("n3", "n2", 2, 5, 1))  # an election: never direct
            assert f.driver.direct_rounds == 0

    _run(main)


def test_a_failing_direct_round_fails_the_driver(tmp_path):
    f = Follower(tmp_path)

    def broken(m):
        raise RuntimeError("planted")

    async def main():
        async with f.running():
            f.driver.node.step = broken
            assert f.driver.deliver(_append(2, 1))  # the failure does not land here...
            with trio.fail_after(10):
                await trio.sleep_forever()

    with pytest.raises(BaseExceptionGroup) as info:  # ...but ends the driver, as its own would
        _run(main)
    assert info.group_contains(RuntimeError, match="planted")
    f.storage.close()


# -- client requests held over one read-hub wake-up (Driver.hold_requests) -------------------


def _leader(tmp_path):
    from tests.integration.single_voter import single_voter_driver
    storage = DiskStorage.open(tmp_path / "n1", fsync=True)
    node, driver = single_voter_driver(storage, tick_interval=0.05, snapshot_interval=100_000,
                                       sync_in_thread=True)
    return storage, node, driver


def test_held_requests_meeting_a_parked_driver_commit_together_in_the_caller(tmp_path):
    """Three puts submitted while held reach a parked driver as one direct round: one
    fsync for the three, each applied and answered before release_requests returns."""
    from tests.integration.single_voter import start_leading

    async def main():
        storage, node, driver = _leader(tmp_path)
        async with trio.open_nursery() as nursery:
            await start_leading(nursery, driver, node)
            with trio.fail_after(10):
                while not driver._parked:
                    await trio.sleep(0)
            driver.sync_ewma = 0.0
            rounds, syncs = driver.direct_rounds, storage.stats()["fsyncs"]
            driver.hold_requests()
            pend = [driver.submit("propose", encode_command("put", key=f"k{i}", value=b"v"))
                    for i in range(3)]
            assert not any(p.done for p in pend)  # held, not handed over yet
            driver.release_requests()
            assert all(p.done for p in pend)
            assert [p.outcome()[0] for p in pend] == [node.log.committed - 2 + i for i in range(3)]
            assert driver.direct_rounds == rounds + 1
            assert storage.stats()["fsyncs"] == syncs + 1
            assert driver.state.get("k2") == b"v"
            nursery.cancel_scope.cancel()
        storage.close()

    _run(main)


def test_held_requests_go_through_the_inbox_when_the_driver_is_busy(tmp_path):
    from tests.integration.single_voter import start_leading

    async def main():
        storage, node, driver = _leader(tmp_path)
        async with trio.open_nursery() as nursery:
            await start_leading(nursery, driver, node)
            driver.deliver(RequestVote("n9", "n1", 0, 0, 0))  # not direct: the inbox, unparks it
            rounds = driver.direct_rounds
            driver.hold_requests()
            pend = [driver.submit("propose", encode_command("put", key=f"k{i}", value=b"v"))
                    for i in range(2)]
            driver.release_requests()
            assert not any(p.done for p in pend)  # queued behind the vote, in order
            with trio.fail_after(10):
                for p in pend:
                    await p.wait(10)
            assert driver.direct_rounds == rounds
            nursery.cancel_scope.cancel()
        storage.close()

    _run(main)


def test_more_held_requests_than_the_hold_takes_keep_their_order(tmp_path):
    """Past the hold's bound (4,096) the requests still reach the log in the order they
    were submitted: one connection's writes must not overtake each other."""
    from tests.integration.single_voter import start_leading

    async def main():
        storage, node, driver = _leader(tmp_path)
        async with trio.open_nursery() as nursery:
            await start_leading(nursery, driver, node)
            driver.deliver(RequestVote("n9", "n1", 0, 0, 0))  # busy: the inbox path
            driver.hold_requests()
            pend = [driver.submit("propose", encode_command("put", key=f"k{i}", value=b"v"))
                    for i in range(4100)]
            driver.release_requests()
            with trio.fail_after(30):
                for p in pend:
                    await p.wait(30)
            indexes = [p.outcome()[0] for p in pend]
            assert indexes == sorted(indexes)
            nursery.cancel_scope.cancel()
        storage.close()

    _run(main)
