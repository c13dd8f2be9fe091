"""Tests of the placement policies and makespan helpers (nodeagent/dispatch.py)."""

from __future__ import annotations

import ast
import hashlib
import itertools
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nodeagent.dispatch as dispatch_mod
from nodeagent.config import DISPATCH_POLICIES
from nodeagent.dispatch import (
    POLICIES,
    VNODES_PER_SLOT,
    NodeLoad,
    PolicyState,
    TaskHint,
    lpt_makespan,
    makespan_lower_bound,
    place,
    place_many,
    ring_point,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def nodes_of(*specs, **kw) -> list[NodeLoad]:
    """nodes_of("a", "b") or nodes_of(("a", 1), ("b", 2)): names, or (name, capacity)."""
    out = []
    for s in specs:
        if isinstance(s, str):
            out.append(NodeLoad(s, **kw))
        else:
            out.append(NodeLoad(s[0], capacity=s[1], **kw))
    return out


def tasks(n: int, key=None) -> list[TaskHint]:
    return [TaskHint(key if key is None else f"{key}-{i}") for i in range(n)]


def counts(names) -> Counter:
    return Counter(names)


# -- policy names and errors -----------------------------------------------------------------


def test_policies_match_config_choices():
    assert POLICIES == DISPATCH_POLICIES
    assert dispatch_mod.DEFAULT_POLICY == "least_loaded"


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError) as exc:
        place("fastest", nodes_of("a"), state=PolicyState())
    msg = str(exc.value)
    assert "fastest" in msg
    for p in POLICIES:
        assert p in msg
    # checked even when there is nothing to place on
    with pytest.raises(ValueError):
        place_many("fastest", [], [], PolicyState())


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        place("least_loaded", [NodeLoad("a"), NodeLoad("a", capacity=2)], state=PolicyState())


@pytest.mark.parametrize(
    "kw",
    [
        {"name": ""},
        {"name": "a", "capacity": 0},
        {"name": "a", "capacity": True},
        {"name": "a", "capacity": 1.5},
        {"name": "a", "assigned": -1},
        {"name": "a", "alive": 1},
        {"name": "a", "limit": -1},
        {"name": "a", "limit": 2.0},
    ],
)
def test_nodeload_validation(kw):
    with pytest.raises(ValueError):
        NodeLoad(**kw)


def test_taskhint_key_must_be_str():
    with pytest.raises(ValueError):
        TaskHint(key=7)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", POLICIES)
def test_no_candidates_gives_none(policy):
    st_ = PolicyState()
    assert place(policy, [], key="k", state=st_) is None
    assert place(policy, nodes_of("a", "b", alive=False), key="k", state=st_) is None
    assert place_many(policy, nodes_of("a", alive=False), tasks(3, "k"), st_) == [None] * 3
    assert place_many(policy, nodes_of("a"), [], st_) == []
    assert st_ == PolicyState()  # nothing placed, nothing remembered


@pytest.mark.parametrize("policy", POLICIES)
def test_dead_nodes_never_chosen(policy):
    nodes = [
        NodeLoad("a", capacity=4, assigned=0, alive=False),  # the best by far, but dead
        NodeLoad("b", capacity=1, assigned=3),
        NodeLoad("c", capacity=2, assigned=5),
        NodeLoad("d", capacity=8, alive=False),
    ]
    got = place_many(policy, nodes, tasks(300, "k") + tasks(20), PolicyState())
    assert set(got) <= {"b", "c"}
    assert None not in got


# -- least_loaded ----------------------------------------------------------------------------


def test_least_loaded_picks_lowest_ratio():
    nodes = [NodeLoad("a", 1, 1), NodeLoad("b", 4, 3), NodeLoad("c", 2, 1)]  # 1, 3/4, 1/2
    assert place("least_loaded", nodes, state=PolicyState()) == "c"


def test_least_loaded_ties_by_assigned_then_name():
    # equal ratios 1/2 and 2/4: fewer assigned wins
    assert place("least_loaded", [NodeLoad("a", 4, 2), NodeLoad("b", 2, 1)], state=PolicyState()) == "b"
    # fully equal: the first name
    assert place("least_loaded", [NodeLoad("z"), NodeLoad("m"), NodeLoad("q")], state=PolicyState()) == "m"


def test_least_loaded_exact_ratio_comparison():
    # 1/3 < 33333333/99999998 by a hair; floats would still order these, fractions certainly do
    nodes = [NodeLoad("a", 99999998, 33333333), NodeLoad("b", 3, 1)]
    assert place("least_loaded", nodes, state=PolicyState()) == "b"


@pytest.mark.parametrize("n_nodes", [2, 3, 5, 7])
def test_least_loaded_equal_capacity_spreads_200_within_one(n_nodes):
    names = [f"n{i}" for i in range(n_nodes)]
    got = counts(place_many("least_loaded", nodes_of(*names), tasks(200), PolicyState()))
    assert set(got) == set(names)
    assert max(got.values()) - min(got.values()) <= 1


def test_least_loaded_batch_fills_the_gaps_first():
    nodes = [NodeLoad("a", assigned=10), NodeLoad("b", assigned=4), NodeLoad("c", assigned=0)]
    got = place_many("least_loaded", nodes, tasks(16), PolicyState())
    assert got[:4] == ["c"] * 4  # c catches up to b ...
    final = {n.name: n.assigned + got.count(n.name) for n in nodes}
    assert final == {"a": 10, "b": 10, "c": 10}


def test_least_loaded_batch_does_not_pile_onto_one_node():
    nodes = nodes_of("a", "b", "c", "d")
    got = counts(place_many("least_loaded", nodes, tasks(100), PolicyState()))
    assert got == {"a": 25, "b": 25, "c": 25, "d": 25}


@pytest.mark.parametrize("policy", ["least_loaded", "weighted"])
def test_shares_proportional_to_capacity(policy):
    nodes = nodes_of(("a", 1), ("b", 2), ("c", 4))
    n = 700
    got = counts(place_many(policy, nodes, tasks(n), PolicyState()))
    for node in nodes:
        share = got[node.name] / n
        assert abs(share - node.capacity / 7) < 0.01, (node.name, got)


def test_shares_proportional_to_capacity_for_odd_batch_sizes():
    nodes = nodes_of(("a", 1), ("b", 2), ("c", 4))
    for policy in ("least_loaded", "weighted"):
        for n in (1, 6, 13, 50, 99):
            got = counts(place_many(policy, nodes, tasks(n), PolicyState()))
            for node in nodes:
                # never more than one task away from its exact share
                assert abs(got[node.name] - n * node.capacity / 7) <= 1.0 + 1e-9, (policy, n, got)


# -- round_robin -----------------------------------------------------------------------------


def test_round_robin_cycles_in_name_order():
    nodes = nodes_of("c", "a", "b")
    s = PolicyState()
    assert [place("round_robin", nodes, state=s) for _ in range(7)] == list("abcabca")
    assert s.rr_last == "a"


def test_round_robin_ignores_load():
    nodes = [NodeLoad("a", assigned=100), NodeLoad("b", capacity=8)]
    assert place_many("round_robin", nodes, tasks(4), PolicyState()) == ["a", "b", "a", "b"]


def test_round_robin_fair():
    names = [f"n{i:02d}" for i in range(5)]
    s = PolicyState()
    got = counts(place("round_robin", nodes_of(*names), state=s) for _ in range(100))
    assert got == {n: 20 for n in names}
    # a batch continues the same rotation
    got2 = counts(place_many("round_robin", nodes_of(*names), tasks(103), s))
    assert max(got2.values()) - min(got2.values()) <= 1


def test_round_robin_cursor_survives_membership_changes():
    s = PolicyState()
    assert place_many("round_robin", nodes_of("a", "b", "c", "d"), tasks(2), s) == ["a", "b"]
    # b leaves, c dies: the rotation goes on after "b" by name, without restarting at a
    nodes = [NodeLoad("a"), NodeLoad("c", alive=False), NodeLoad("d")]
    assert place("round_robin", nodes, state=s) == "d"
    # a newcomer that sorts after the cursor gets its turn at once
    nodes = nodes_of("a", "b", "c", "d", "e")
    assert place_many("round_robin", nodes, tasks(3), s) == ["e", "a", "b"]


def test_round_robin_fresh_state_starts_over():
    nodes = nodes_of("a", "b", "c")
    s = PolicyState()
    place_many("round_robin", nodes, tasks(2), s)
    assert place("round_robin", nodes, state=PolicyState()) == "a"


# -- weighted --------------------------------------------------------------------------------


def test_weighted_is_smooth_nginx_sequence():
    nodes = nodes_of(("a", 1), ("b", 2), ("c", 4))
    got = place_many("weighted", nodes, tasks(14), PolicyState())
    # nginx's smooth weighted round-robin for weights 1, 2, 4 (ties by name)
    assert got == list("cbcacbc") * 2


def test_weighted_exact_per_cycle_and_interleaved():
    nodes = nodes_of(("a", 1), ("b", 2), ("c", 4))
    s = PolicyState()
    got = [place("weighted", nodes, state=s) for _ in range(70)]
    for i in range(0, 70, 7):
        assert counts(got[i : i + 7]) == {"a": 1, "b": 2, "c": 4}
    # smooth: the heaviest node never runs 3 in a row
    assert "ccc" not in "".join(got)


def test_weighted_equal_capacities_is_round_robin():
    nodes = nodes_of("a", "b", "c")
    assert place_many("weighted", nodes, tasks(6), PolicyState()) == list("abcabc")


def test_weighted_dead_node_state_dropped_and_rest_keeps_ratio():
    nodes = nodes_of(("a", 1), ("b", 2), ("c", 4))
    s = PolicyState()
    place_many("weighted", nodes, tasks(3), s)
    dead_c = [NodeLoad("a", 1), NodeLoad("b", 2), NodeLoad("c", 4, alive=False)]
    got = counts(place_many("weighted", dead_c, tasks(300), s))
    assert "c" not in s.current
    assert set(got) == {"a", "b"}
    assert abs(got["b"] - 2 * got["a"]) <= 3


def test_weighted_state_carries_across_single_calls():
    nodes = nodes_of(("a", 1), ("b", 3))
    s = PolicyState()
    singles = [place("weighted", nodes, state=s) for _ in range(8)]
    assert singles == place_many("weighted", nodes, tasks(8), PolicyState())


# -- hash ------------------------------------------------------------------------------------

KEYS = [f"job-{i}" for i in range(4000)]


def hash_map(nodes, keys=KEYS):
    s = PolicyState()
    return dict(zip(keys, place_many("hash", nodes, [TaskHint(k) for k in keys], s)))


def test_hash_same_key_same_node():
    nodes = nodes_of("a", "b", "c", "d", "e")
    s = PolicyState()
    first = [place("hash", nodes, key=k, state=s) for k in KEYS[:200]]
    again = [place("hash", nodes, key=k, state=s) for k in KEYS[:200]]
    fresh = [place("hash", list(reversed(nodes)), key=k, state=PolicyState()) for k in KEYS[:200]]
    assert first == again == fresh


def test_hash_ignores_load():
    busy = [NodeLoad("a", assigned=1000), NodeLoad("b")]
    idle = nodes_of("a", "b")
    assert hash_map(busy, KEYS[:300]) == hash_map(idle, KEYS[:300])


@pytest.mark.parametrize("n_nodes", [3, 5, 8])
def test_hash_removing_a_node_moves_only_its_keys(n_nodes):
    names = [f"node-{i}" for i in range(n_nodes)]
    before = hash_map(nodes_of(*names))
    for gone in names:
        after = hash_map(nodes_of(*[n for n in names if n != gone]))
        moved = {k for k in KEYS if before[k] != after[k]}
        assert moved == {k for k in KEYS if before[k] == gone}
        assert len(moved) / len(KEYS) < 1 / n_nodes + 0.06


def test_hash_dead_node_is_like_a_removed_one():
    names = ["a", "b", "c", "d"]
    removed = hash_map(nodes_of("a", "b", "d"))
    dead = hash_map([NodeLoad(n, alive=(n != "c")) for n in names])
    assert removed == dead


def test_hash_adding_a_node_moves_keys_only_onto_it():
    before = hash_map(nodes_of("a", "b", "c", "d"))
    after = hash_map(nodes_of("a", "b", "c", "d", "e"))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(after[k] == "e" for k in moved)
    assert len(moved) / len(KEYS) < 1 / 5 + 0.06


def test_hash_raising_capacity_moves_keys_only_onto_that_node():
    before = hash_map(nodes_of(("a", 1), ("b", 1), ("c", 1)))
    after = hash_map(nodes_of(("a", 1), ("b", 3), ("c", 1)))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved and all(after[k] == "b" for k in moved)


def test_hash_shares_roughly_proportional_to_capacity():
    got = counts(hash_map(nodes_of(("a", 1), ("b", 2), ("c", 4))).values())
    for name, cap in (("a", 1), ("b", 2), ("c", 4)):
        assert abs(got[name] / len(KEYS) - cap / 7) < 0.06, got


def test_hash_spread_over_equal_nodes():
    names = [f"n{i}" for i in range(5)]
    got = counts(hash_map(nodes_of(*names)).values())
    assert set(got) == set(names)
    for c in got.values():
        assert abs(c / len(KEYS) - 0.2) < 0.07, got


def test_hash_without_key_falls_back_to_least_loaded():
    nodes = [NodeLoad("a", 1, 3), NodeLoad("b", 2, 1), NodeLoad("c", 1, 2)]
    hints = [TaskHint(None)] * 9
    assert place_many("hash", nodes, hints, PolicyState()) == place_many("least_loaded", nodes, hints, PolicyState())
    assert place("hash", nodes, state=PolicyState()) == "b"


def test_hash_keyed_placements_count_toward_the_fallback():
    nodes = nodes_of("a", "b")
    key_on_a = next(k for k in KEYS if hash_map(nodes, [k])[k] == "a")
    got = place_many("hash", nodes, [TaskHint(key_on_a)] * 3 + [TaskHint(None)] * 3, PolicyState())
    assert got == ["a", "a", "a", "b", "b", "b"]


def test_hash_ring_uses_blake2b_and_a_pinned_layout():
    # Python's hash() of str is salted per process; the ring must not be. The layout is part
    # of the contract: changing it moves keys across an upgrade, so pin a few placements.
    assert ring_point("task-0") == int.from_bytes(hashlib.blake2b(b"task-0", digest_size=8).digest(), "big")
    assert ring_point("task-0") == 6592250732523420890
    nodes = nodes_of("a", "b", "c", "d", "e")
    s = PolicyState()
    got = [place("hash", nodes, key=f"task-{i}", state=s) for i in range(10)]
    assert got == ["e", "c", "e", "c", "b", "e", "c", "c", "c", "e"]


def test_hash_ring_size_and_cache():
    s = PolicyState()
    place("hash", nodes_of(("a", 1), ("b", 3)), key="x", state=s)
    assert len(s._ring_points) == VNODES_PER_SLOT * 4
    pts = s._ring_points
    place("hash", nodes_of(("b", 3), ("a", 1)), key="y", state=s)
    assert s._ring_points is pts  # same alive set: not rebuilt
    place("hash", nodes_of(("a", 1), ("b", 3), ("c", 1)), key="y", state=s)
    assert len(s._ring_points) == VNODES_PER_SLOT * 5


# -- determinism and batch semantics ---------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_determinism(policy):
    nodes = [NodeLoad("a", 1, 2), NodeLoad("b", 2, 0), NodeLoad("c", 4, 5), NodeLoad("d", 3, 1, alive=False)]
    hints = [TaskHint(f"k{i}" if i % 3 else None) for i in range(60)]
    one = place_many(policy, nodes, hints, PolicyState())
    two = place_many(policy, list(reversed(nodes)), hints, PolicyState())
    assert one == two


def test_module_is_pure():
    """No I/O, clock, random, threading or trio imports in the module."""
    src = Path(dispatch_mod.__file__).read_text()
    imported = set()
    builtin_hash_calls = 0
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hash":
            builtin_hash_calls += 1
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"os", "time", "random", "socket", "threading", "trio", "asyncio", "io", "pathlib"}
    assert builtin_hash_calls == 0  # Python's hash() of str is salted per process


# -- hypothesis properties -------------------------------------------------------------------

names_st = st.sampled_from([f"n{i}" for i in range(8)])
node_st = st.builds(
    NodeLoad,
    name=names_st,
    capacity=st.integers(1, 6),
    assigned=st.integers(0, 30),
    alive=st.booleans(),
    limit=st.one_of(st.none(), st.integers(0, 40)),
)
nodes_st = st.lists(node_st, max_size=8, unique_by=lambda n: n.name)
hints_st = st.lists(st.builds(TaskHint, key=st.one_of(st.none(), st.text(max_size=6))), max_size=25)
policy_st = st.sampled_from(POLICIES)


@FAST
@given(policy=policy_st, nodes=nodes_st, key=st.one_of(st.none(), st.text(max_size=6)))
def test_prop_place_returns_alive_node_or_none(policy, nodes, key):
    got = place(policy, nodes, key=key, state=PolicyState())
    room = {n.name for n in nodes if n.alive and (n.limit is None or n.assigned < n.limit)}
    if got is not None:
        assert got in room
    elif not (policy == "hash" and key is not None):  # a keyed hash task waits for its node
        assert not room


@FAST
@given(policy=policy_st, nodes=nodes_st, hints=hints_st)
def test_prop_place_many_never_dead_and_counts(policy, nodes, hints):
    got = place_many(policy, nodes, hints, PolicyState())
    assert len(got) == len(hints)
    alive = {n.name for n in nodes if n.alive}
    assert all(g in alive for g in got if g is not None)
    if not alive:
        assert got == [None] * len(hints)
    final = Counter(g for g in got if g is not None)
    for n in nodes:  # no node is given more than its limit allows
        if n.limit is not None:
            assert final[n.name] <= max(0, n.limit - n.assigned), (n, final)
    # A task is left unplaced only when no alive node had room at that point (or, under
    # hash, its key's node had none).
    held = {n.name: n.assigned for n in nodes}
    for h, g in zip(hints, got):
        if g is not None:
            held[g] += 1
            continue
        if policy == "hash" and h.key is not None:
            continue
        assert all(n.limit is not None and held[n.name] >= n.limit for n in nodes if n.alive)


@FAST
@given(policy=policy_st, nodes=nodes_st, hints=hints_st, seed=st.randoms(use_true_random=False))
def test_prop_place_many_equals_repeated_place(policy, nodes, hints, seed):
    batch_state, single_state = PolicyState(), PolicyState()
    batch = place_many(policy, nodes, hints, batch_state)
    cur = {n.name: n for n in nodes}
    order = list(cur)
    singles = []
    for h in hints:
        shuffled = [cur[n] for n in order]
        seed.shuffle(shuffled)  # candidate order must not matter
        g = place(policy, shuffled, key=h.key, state=single_state)
        singles.append(g)
        if g is not None:
            n = cur[g]
            cur[g] = NodeLoad(n.name, n.capacity, n.assigned + 1, n.alive, n.limit)
    assert batch == singles
    assert batch_state.rr_last == single_state.rr_last
    assert batch_state.current == single_state.current


@FAST
@given(nodes=nodes_st, n=st.integers(0, 40))
def test_prop_least_loaded_greedy_is_balanced(nodes, n):
    """After a least_loaded batch, moving the last task elsewhere could not lower its ratio."""
    nodes = [NodeLoad(x.name, x.capacity, x.assigned, x.alive) for x in nodes]  # no limits
    got = place_many("least_loaded", nodes, [TaskHint()] * n, PolicyState())
    alive = [x for x in nodes if x.alive]
    if not alive or not got:
        return
    final = {x.name: x.assigned + got.count(x.name) for x in alive}
    cap = {x.name: x.capacity for x in alive}
    last = got[-1]
    before = (final[last] - 1) / cap[last]
    assert all(before <= final[x] / cap[x] + 1e-12 for x in final if x != last)


# -- limits: late binding --------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_a_full_node_is_passed_over_and_a_full_cluster_places_nothing(policy):
    nodes = [NodeLoad("a", 2, assigned=4, limit=4), NodeLoad("b", 2, assigned=1, limit=4),
             NodeLoad("c", 2, assigned=0, limit=4)]
    got = place_many(policy, nodes, tasks(10), PolicyState())  # no keys: hash falls back
    assert counts(got) == {"b": 3, "c": 4, None: 3}
    assert got[-3:] == [None] * 3  # once every node is full, the rest wait
    assert place(policy, [NodeLoad("a", 1, 1, True, 1)], state=PolicyState()) is None


def test_round_robin_skips_full_nodes_and_keeps_its_cursor():
    st_ = PolicyState()
    nodes = [NodeLoad("a", limit=10), NodeLoad("b", assigned=1, limit=1), NodeLoad("c", limit=10)]
    assert place_many("round_robin", nodes, tasks(4), st_) == ["a", "c", "a", "c"]
    assert st_.rr_last == "c"
    assert place("round_robin", nodes[1:2], state=st_) is None and st_.rr_last == "c"


def test_weighted_shares_among_nodes_with_room():
    nodes = [NodeLoad("a", 1, limit=100), NodeLoad("b", 2, limit=2), NodeLoad("c", 4, limit=100)]
    got = place_many("weighted", nodes, tasks(12), PolicyState())
    assert counts(got)["b"] == 2 and None not in got  # b stops at its limit; a and c go on
    assert counts(got)["c"] > counts(got)["a"]


def test_hash_waits_for_the_keys_own_node_and_does_not_move_keys():
    nodes = nodes_of("a", "b", "c")
    free = place_many("hash", nodes, tasks(60, "k"), PolicyState())
    owner = free[0]
    full = [NodeLoad(n.name, limit=0 if n.name == owner else None) for n in nodes]
    got = place_many("hash", full, tasks(60, "k"), PolicyState())
    for f, g in zip(free, got):
        assert g == (None if f == owner else f)  # the others' keys stay where they were


def test_least_loaded_with_limits_fills_free_slots_by_ratio():
    nodes = [NodeLoad("a", 1, assigned=0, limit=2), NodeLoad("b", 4, assigned=2, limit=8)]
    got = place_many("least_loaded", nodes, tasks(9), PolicyState())
    assert counts(got) == {"a": 2, "b": 6, None: 1}


# -- makespan --------------------------------------------------------------------------------


def test_lpt_examples():
    assert lpt_makespan([], [1]) == 0.0
    assert makespan_lower_bound([], []) == 0.0
    assert lpt_makespan([3, 3, 2, 2, 2], [2]) == 7.0  # Graham's worst case for m=2: OPT is 6
    assert makespan_lower_bound([3, 3, 2, 2, 2], [2]) == 6.0
    assert lpt_makespan([5, 1, 1], [1, 1, 1]) == 5.0
    assert lpt_makespan([1] * 10, [1, 4]) == 2.0
    assert makespan_lower_bound([1] * 10, [1, 4]) == 2.0
    assert lpt_makespan([4.5], [100]) == 4.5


@pytest.mark.parametrize(
    "durations, caps",
    [([1], []), ([-1], [1]), ([float("nan")], [1]), ([1], [0]), ([1], [True]), ([float("inf")], [1])],
)
def test_makespan_rejects_bad_input(durations, caps):
    with pytest.raises(ValueError):
        lpt_makespan(durations, caps)
    with pytest.raises(ValueError):
        makespan_lower_bound(durations, caps)


def brute_force_opt(durations: list[int], m: int) -> int:
    best = sum(durations)
    for assign in itertools.product(range(m), repeat=len(durations)):
        loads = [0] * m
        for d, slot in zip(durations, assign):
            loads[slot] += d
        best = min(best, max(loads))
    return best


@FAST
@given(
    durations=st.lists(st.floats(0, 1000, allow_nan=False, allow_infinity=False), max_size=40),
    caps=st.lists(st.integers(1, 4), min_size=1, max_size=6),
)
def test_prop_lpt_between_bounds(durations, caps):
    lpt = lpt_makespan(durations, caps)
    lb = makespan_lower_bound(durations, caps)
    m = sum(caps)
    eps = 1e-9 * (1 + sum(durations))
    assert lpt >= lb - eps
    # list scheduling (Graham): every task starts by sum/m, so LPT <= sum/m + max * (1 - 1/m)
    if durations:
        assert lpt <= sum(durations) / m + max(durations) * (1 - 1 / m) + eps
        assert lpt <= 4 / 3 * lb + max(durations) + eps  # the brief's loose sanity bound


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    durations=st.lists(st.integers(1, 20), min_size=1, max_size=7),
    caps=st.lists(st.integers(1, 2), min_size=1, max_size=2),
)
def test_prop_lpt_within_graham_bound_of_optimal(durations, caps):
    m = sum(caps)
    opt = brute_force_opt(durations, m)
    lpt = lpt_makespan(durations, caps)
    assert makespan_lower_bound(durations, caps) <= opt <= lpt
    assert lpt <= (4 / 3 - 1 / (3 * m)) * opt + 1e-9
