"""Property-based fuzzing of the wire decoder (nodeagent/protocol.py): random bytes and
mutated valid frames, fed in random chunks, only ever give valid messages (each encodes
again) or ProtocolError; never another exception. A decoder with a planted bug (a
KeyError on a message without an id) is caught by the same property."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from nodeagent.protocol import CLOSED, NEED_DATA, FrameDecoder, ProtocolError, encode

from .fuzzing import DECODER_ONLY, SAMPLES, mutate

VALID = SAMPLES + DECODER_ONLY
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_decoder(data: bytes, cuts: list[int], decoder_cls=FrameDecoder, max_frame: int = 1 << 16):
    """Feed ``data`` in pieces; return the messages. Raises only what the decoder raises
    (ProtocolError is the allowed one) or AssertionError for a message that is not valid."""
    dec = decoder_cls(max_frame)
    out = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(points, points[1:])] + [b""]
    for piece in pieces:
        dec.receive_data(piece)
        while True:
            msg = dec.next_message()
            if msg is NEED_DATA or msg is CLOSED:
                break
            encode(msg)  # a message the decoder returns is valid: it encodes again
            out.append(msg)
    return out


def safe(data: bytes, cuts: list[int], decoder_cls=FrameDecoder) -> bool:
    try:
        run_decoder(data, cuts, decoder_cls)
    except ProtocolError as e:
        assert e.code and e.message  # a refusal always says why
    return True


mutated_frames = st.builds(
    lambda seed, picks: b"".join(mutate(random.Random(seed * 1000 + i), VALID[p % len(VALID)])
                                 for i, p in enumerate(picks)),
    st.integers(0, 2**32), st.lists(st.integers(0, 1000), min_size=1, max_size=4))
mixed = st.one_of(
    st.binary(max_size=600),
    mutated_frames,
    st.builds(lambda good, bad: good + bad, st.sampled_from([encode(m) for m in VALID]), mutated_frames),
)


@SETTINGS
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_random_bytes_give_only_protocol_errors_or_valid_messages(data, cuts):
    assert safe(data, cuts)


@SETTINGS
@given(mixed, st.lists(st.integers(0, 5000), max_size=8))
def test_mutated_frames_give_only_protocol_errors_or_valid_messages(data, cuts):
    assert safe(data, cuts)


def test_every_valid_sample_decodes_back():
    data = b"".join(encode(m) for m in VALID)
    got = run_decoder(data, list(range(0, len(data), 7)))
    assert [m["type"] for m in got] == [m["type"] for m in VALID]


class PlantedBugDecoder(FrameDecoder):
    """Reads ``id`` from every message: a KeyError for hello, raft, ... (our bug)."""

    def next_message(self):
        msg = super().next_message()
        if isinstance(msg, dict):
            msg["id"] + 0
        return msg


def test_the_property_catches_a_planted_bug():
    def fails(data: bytes) -> bool:
        try:
            safe(data, [], PlantedBugDecoder)
        except (KeyError, TypeError):
            return True
        return False

    bad = find(mixed, fails, settings=settings(max_examples=2000, deadline=None,
                                               suppress_health_check=list(HealthCheck)))
    with pytest.raises((KeyError, TypeError)):
        safe(bad, [], PlantedBugDecoder)
    assert safe(bad, [])  # the real decoder is fine with it
