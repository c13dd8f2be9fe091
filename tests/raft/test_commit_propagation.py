"""How a leader tells followers that an index is committed: lazily (the default: with
the next append or heartbeat) or eagerly (an append at once, empty if need be)."""

from harness import Network

from nodeagent.raft.messages import AppendEntries, ReadIndexResponse

IDS = ["a", "b", "c"]


def settled(**config) -> Network:
    net = Network(IDS, **config)
    net.elect("a")
    net.stabilize()
    return net


def test_lazy_commit_rides_on_the_next_heartbeat():
    net = settled(eager_commit=False)
    sent0 = len(net.sent(AppendEntries, frm="a"))
    net.propose("a", b"x")
    net.stabilize()
    # Committed and applied on the leader; one append per follower, none just for the index.
    assert net.apps["a"].values == [b"x"]
    assert len(net.sent(AppendEntries, frm="a")) - sent0 == 2
    assert net.apps["b"].values == [] and net.apps["c"].values == []
    # The next heartbeat carries the commit index.
    net.tick("a", net["a"].cfg.heartbeat_tick)
    net.stabilize()
    assert net.apps["b"].values == [b"x"] and net.apps["c"].values == [b"x"]


def test_lazy_commit_rides_on_the_next_append():
    net = settled(eager_commit=False)
    net.propose("a", b"x")
    net.stabilize()
    net.propose("a", b"y")
    net.stabilize()
    # The append of y carried x's commit: followers applied x, and y waits its turn.
    assert net.apps["b"].values == [b"x"] and net.apps["c"].values == [b"x"]


def test_eager_commit_sends_the_index_at_once():
    net = settled(eager_commit=True)
    sent0 = len(net.sent(AppendEntries, frm="a"))
    net.propose("a", b"x")
    net.stabilize()
    assert net.apps["b"].values == [b"x"] and net.apps["c"].values == [b"x"]
    assert len(net.sent(AppendEntries, frm="a")) - sent0 == 4  # entries, then the index


def test_lazy_follower_read_index_learns_the_commit_with_the_answer():
    """A follower's linearizable read waits until it has applied the read index; with lazy
    propagation it must not also wait for the next tick to learn that index is committed:
    the heartbeat round that confirms the read carries it."""
    net = settled(eager_commit=False)
    net.propose("a", b"x")
    net.stabilize()
    assert net["b"].log.committed < net["a"].log.committed
    net.read_index("b", b"r1")
    net.stabilize()  # no tick: no heartbeat
    (resp,) = net.sent(ReadIndexResponse, to="b")
    rs = net.read_states["b"][-1]
    assert rs.ctx == b"r1" and rs.index == resp.index == net["a"].log.committed
    assert net.apps["b"].applied_index >= rs.index
    assert net.apps["b"].values == [b"x"]
