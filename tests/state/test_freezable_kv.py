"""FreezableKV (nodeagent/state.py), the key-value table that hands out a point-in-time
view without copying: checked against a plain dict, with freezes and thaws anywhere
among the changes. A frozen view must read as the table did at the freeze until it is
thawed, whatever changes meanwhile; the table itself must always read as the dict."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.state import FreezableKV

KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
OPS = st.one_of(
    st.tuples(st.just("set"), KEYS, st.binary(max_size=3)),
    st.tuples(st.just("pop"), KEYS),
    st.tuples(st.just("freeze")),
    st.tuples(st.just("thaw")),
    st.tuples(st.just("thaw_other")),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, st.binary(max_size=3)), st.lists(OPS, max_size=60))
def test_the_table_reads_as_a_dict_and_a_frozen_view_as_it_was(start, ops):
    kv = FreezableKV(dict(start))
    model = dict(start)
    frozen = None  # (view, what it held at the freeze)
    copies = []  # (copy handed out by a second freeze, what it held)
    for op in ops:
        if op[0] == "set":
            assert kv.set(op[1], op[2]) == model.get(op[1])
            model[op[1]] = op[2]
        elif op[0] == "pop":
            assert kv.pop(op[1]) == model.pop(op[1], None)
        elif op[0] == "freeze":
            view = kv.freeze()
            if frozen is None:
                frozen = (view, dict(model))
            else:  # one frozen at a time: the second is a copy, and thaws nothing
                copies.append((view, dict(model)))
                assert kv.thaw(view) is False
        elif op[0] == "thaw":
            if frozen is not None:
                assert dict(frozen[0]) == frozen[1]  # unchanged until this moment
                assert kv.thaw(frozen[0]) is True
                frozen = None
            else:
                assert kv.thaw({}) is False
        else:
            assert kv.thaw(dict(model)) is False  # an equal mapping is not the frozen one
        assert len(kv) == len(model)
        assert dict(kv.items()) == model == kv.copy()
        assert all(kv.get(k) == model.get(k) for k in "abcde")
        if frozen is not None:
            assert dict(frozen[0]) == frozen[1]
        for view, held in copies:
            assert dict(view) == held
    if frozen is not None:
        assert kv.thaw(frozen[0]) is True
    assert kv.over is None and kv.base == model


@pytest.mark.parametrize("bug", ["thaw drops the overlay", "set writes the frozen table",
                                 "pop forgets the length"])
def test_planted_bugs_are_caught(monkeypatch, bug):
    """The check above can fail: each planted bug makes it find a counterexample."""
    if bug == "thaw drops the overlay":  # loses the writes made while a snapshot ran
        def thaw(self, view):
            if self.over is None or view is not self.base:
                return False
            self.over = None
            return True
        monkeypatch.setattr(FreezableKV, "thaw", thaw)
    elif bug == "set writes the frozen table":  # the view changes under the serializer
        def set_(self, key, value):
            prev = self.get(key)
            self.base[key] = value
            if self.over is not None:
                self.over[key] = value
            if prev is None:
                self._len += 1
            return prev
        monkeypatch.setattr(FreezableKV, "set", set_)
    else:
        real_pop = FreezableKV.pop

        def pop(self, key):
            n = self._len
            prev = real_pop(self, key)
            self._len = n
            return prev
        monkeypatch.setattr(FreezableKV, "pop", pop)
    # (hypothesis raises a group when it finds more than one distinct failure)
    with pytest.raises((AssertionError, ExceptionGroup)) as caught:
        test_the_table_reads_as_a_dict_and_a_frozen_view_as_it_was()
    if isinstance(caught.value, ExceptionGroup):
        assert caught.value.subgroup(AssertionError) is not None
