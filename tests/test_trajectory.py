"""The trajectory wire format: bit-exact round trips, the frame as its docstring specifies it, and the fast
decoders (format 2, the frame; format 1, the msgpack map) agreeing with full validation."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.trajectory import (
    FrameArena,
    MalformedEntry,
    Trajectory,
    TrajectoryGroup,
    decode_group,
    encode_group,
)
from tests.buffer_helpers import wire_v1

ARRAYS = ("prompt_ids", "response_ids", "behaviour_logp", "versions")

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)  # includes -0.0 and subnormals
text = st.text(max_size=12)
meta_value = st.one_of(st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), text)


@st.composite
def trajectories(draw, group_id: str):
    t = draw(st.integers(0, 40))
    base = draw(st.integers(0, 1000))
    versions = draw(st.lists(st.integers(base, base + 3), min_size=t, max_size=t))
    return Trajectory.make(
        group_id=group_id,
        prompt_ids=np.array(draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20)), dtype=np.int32),
        response_ids=np.array(draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=t, max_size=t)), dtype=np.int32),
        behaviour_logp=np.array(draw(st.lists(finite_f32, min_size=t, max_size=t)), dtype=np.float32),
        versions=versions if t else None,
        version=base,
        reward=draw(st.floats(allow_nan=False, allow_infinity=False)),
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
        worker_id=draw(text),
        t_start=draw(st.floats(0, 2e9)),
        meta=draw(st.dictionaries(text, meta_value, max_size=3)),
    )


@st.composite
def groups(draw):
    gid = draw(st.text(min_size=1, max_size=16))
    trajs = draw(st.lists(trajectories(gid), min_size=1, max_size=4))
    return TrajectoryGroup(group_id=gid, trajectories=trajs, slot=draw(st.one_of(st.none(), st.integers(0, 10**6))))


def _same(a: TrajectoryGroup, b: TrajectoryGroup, exclude: frozenset[str] = frozenset()) -> None:
    assert (a.group_id, a.slot, len(a.trajectories)) == (b.group_id, b.slot, len(b.trajectories))
    for x, y in zip(a.trajectories, b.trajectories):
        for name in ARRAYS:
            assert getattr(x, name).tobytes() == getattr(y, name).tobytes()
            assert getattr(y, name).dtype.str in ("<i4", "<f4")
        assert x.model_dump(exclude=set(ARRAYS) | exclude) == y.model_dump(exclude=set(ARRAYS) | exclude)


@settings(max_examples=60, deadline=None)
@given(groups())
def test_wire_round_trip_is_bit_exact(group):
    data = encode_group(group)
    assert bytes(data) == frame(wire_v1(group))  # the frame is what the module docstring says, byte for byte
    decoded = decode_group(bytes(data))
    _same(group, decoded)
    # format 1 of the same group, and pydantic's full validation, build the same group
    payload = wire_v1(group)
    _same(decode_group(msgpack.packb(payload, use_bin_type=True)), decoded)
    del payload["schema"]
    _same(TrajectoryGroup.model_validate(payload), decoded)
    assert encode_group(decoded) == data


@settings(max_examples=30, deadline=None)
@given(st.lists(groups(), min_size=1, max_size=4), st.lists(groups(), min_size=1, max_size=4))
def test_the_arena_writes_encode_groups_bytes_and_reuses_its_block(first, second):
    # (the producer's push path: frames written into reused memory, sent to Redis as memoryviews)
    arena = FrameArena()
    views = arena.encode(first)
    assert [bytes(v) for v in views] == [encode_group(g) for g in first]  # every frame, none overwriting another
    block = arena._block
    views = arena.encode(second)
    assert [bytes(v) for v in views] == [encode_group(g) for g in second]
    if sum(len(encode_group(g)) for g in second) <= block.size:
        assert arena._block is block  # no new memory while the old block holds the batch


def frame(payload: dict) -> bytes:
    """Format 2 built from format 1's map, independently of encode_group: the module docstring's layout."""
    rows, lengths = [], []
    sections: dict[str, list[bytes]] = {name: [] for name in ("prompt_ids", "response_ids", "versions", "behaviour_logp")}
    for t in payload["trajectories"]:
        rows.append({k: v for k, v in t.items() if k not in ARRAYS})
        lengths += [len(t["prompt_ids"]) // 4, len(t["response_ids"]) // 4]
        for name, parts in sections.items():
            parts.append(t[name])
    header = msgpack.packb([payload["group_id"], payload["slot"], rows, lengths], use_bin_type=True)
    pad = b"\0" * (-(8 + len(header)) % 4)
    return b"SFG\x02" + struct.pack("<I", len(header)) + header + pad + b"".join(b"".join(p) for p in sections.values())


def _payload(**traj_changes):
    t = Trajectory.make(group_id="g", prompt_ids=[1, 2], response_ids=[3, 4, 5], behaviour_logp=[-1.0, -2.0, -3.0],
                        version=2, reward=1.0)
    payload = wire_v1(TrajectoryGroup(group_id="g", trajectories=[t]))
    payload["trajectories"][0].update(traj_changes)
    return payload


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"behaviour_logp": np.array([0, np.inf, 0], "<f4").tobytes()}, "non_finite"),
        ({"reward": float("nan")}, "non_finite"),
        ({"versions": np.array([2, 2], "<i4").tobytes()}, "length_mismatch"),
        ({"behaviour_logp": b"\x00" * 5}, "bad_schema"),  # not a whole number of float32
        ({"version_max": 3}, "version_mismatch"),
        ({"version_min": -1, "versions": np.array([-1, -1, -1], "<i4").tobytes(), "version_max": -1},
         "version_mismatch"),
        ({"group_id": "h"}, "group_mismatch"),
        ({"extra_field": 1}, "bad_schema"),
        ({"version_min": 2**64 - 1}, "version_mismatch"),
    ],
)
def test_each_malformed_payload_names_its_reason(changes, reason):
    with pytest.raises(MalformedEntry) as err:
        decode_group(msgpack.packb(_payload(**changes), use_bin_type=True))
    assert err.value.reason == reason
    if "versions" in changes or "behaviour_logp" in changes:
        return  # a frame's sections follow its lengths: an array of another length cannot be written in one
    with pytest.raises(MalformedEntry) as err:
        decode_group(frame(_payload(**changes)))
    assert err.value.reason == ("bad_schema" if "extra_field" in changes else reason)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: f[:-1], "bad_frame"),  # truncated
        (lambda f: f + b"\0" * 4, "bad_frame"),  # more than the header describes
        (lambda f: f[:4] + struct.pack("<I", len(f)) + f[8:], "bad_frame"),  # header past the end
        (lambda f: f[:6], "bad_frame"),
        (lambda f: b"SFG\x09" + f[4:], "unknown_schema"),
        (lambda f: f[:8] + b"\xc1" + f[9:], "bad_msgpack"),
    ],
)
def test_each_damaged_frame_names_its_reason(damage, reason):
    good = bytes(encode_group(TrajectoryGroup(group_id="g", trajectories=[Trajectory.make(
        group_id="g", prompt_ids=[1, 2], response_ids=[3, 4, 5], behaviour_logp=[-1.0, -2.0, -3.0], version=2,
        reward=1.0)])))
    assert decode_group(good).trajectories[0].response_ids.tolist() == [3, 4, 5]
    with pytest.raises(MalformedEntry) as err:
        decode_group(damage(good))
    assert err.value.reason == reason


def _framed(header: list, sections: bytes) -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    return b"SFG\x02" + struct.pack("<I", len(raw)) + raw + b"\0" * (-(8 + len(raw)) % 4) + sections


def test_a_frame_header_that_does_not_describe_its_rows_is_refused():
    row = {k: v for k, v in _payload()["trajectories"][0].items() if k not in ARRAYS}
    sections = np.array([1, 2, 3, 4, 5, 2, 2, 2], "<i4").tobytes() + np.array([-1, -2, -3], "<f4").tobytes()
    assert decode_group(_framed(["g", None, [row], [2, 3]], sections)).trajectories[0].prompt_ids.tolist() == [1, 2]
    cases = {
        "bad_frame": [["g", None, [row], [2]], ["g", None, [row], [2, -3]], ["g", None, [row], [2.0, 3]]],
        "bad_schema": [["g", None, [row]], {"g": 1}, ["g", None, [{**row, "prompt_ids": b""}], [2, 3]],
                       ["g", None, [7], [2, 3]]],
        "empty_group": [["g", None, [], []]],
        "group_mismatch": [["h", None, [row], [2, 3]]],
    }
    for reason, headers in cases.items():
        for header in headers:
            with pytest.raises(MalformedEntry) as err:
                decode_group(_framed(header, b"" if header == ["g", None, [], []] else sections))
            assert err.value.reason == reason, header


def test_plain_lists_are_still_accepted_through_full_validation():
    payload = _payload(response_ids=[3, 4, 5], behaviour_logp=[-1.0, -2.0, -3.0])
    group = decode_group(msgpack.packb(payload, use_bin_type=True))
    assert group.trajectories[0].response_ids.tolist() == [3, 4, 5]


def test_pickles_and_unknown_schemas_are_refused_by_name():
    import pickle

    with pytest.raises(MalformedEntry) as err:
        decode_group(pickle.dumps({"schema": 1}, protocol=5))
    assert err.value.reason == "pickle"
    payload = _payload()
    payload["schema"] = 2
    with pytest.raises(MalformedEntry) as err:
        decode_group(msgpack.packb(payload, use_bin_type=True))
    assert err.value.reason == "unknown_schema"
    with pytest.raises(MalformedEntry) as err:
        decode_group(msgpack.packb([1, 2]))
    assert err.value.reason == "bad_schema"


ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=3),
    st.binary(max_size=9), st.lists(st.integers(-3, 3), max_size=4), st.dictionaries(text, st.integers(), max_size=2),
)
FIELDS = sorted(Trajectory.model_fields) + ["unknown"]


def _agrees_with_full_validation(mutations, delete, encode) -> None:  # noqa: ANN001
    """Mutate a valid trajectory's fields, encode it; decode_group must accept exactly what pydantic accepts."""
    payload = _payload()
    for name, value in mutations:
        if delete:
            payload["trajectories"][0].pop(name, None)
        else:
            payload["trajectories"][0][name] = value
    try:
        data = encode(payload)
    except (OverflowError, TypeError, ValueError):
        return  # not representable in msgpack: cannot arrive on the wire
    wire = msgpack.unpackb(msgpack.packb(payload, use_bin_type=True), raw=False)  # what msgpack gives back
    del wire["schema"]
    try:
        expected = TrajectoryGroup.model_validate(wire)
    except Exception:  # noqa: BLE001 - pydantic says no, for whatever reason: so must decode_group
        expected = None
    if expected is None:
        with pytest.raises(MalformedEntry):
            decode_group(data)
    else:  # a missing id is filled with a fresh random one on both sides
        _same(expected, decode_group(data), exclude=frozenset({"id"} - wire["trajectories"][0].keys()))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), ODD), min_size=1, max_size=3), st.booleans())
def test_the_fast_decoder_accepts_exactly_what_full_validation_accepts(mutations, delete):
    _agrees_with_full_validation(mutations, delete, lambda payload: msgpack.packb(payload, use_bin_type=True))


SCALARS = sorted(set(Trajectory.model_fields) - set(ARRAYS)) + ["unknown"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SCALARS), ODD), min_size=1, max_size=3), st.booleans())
def test_the_frame_decoder_accepts_exactly_what_full_validation_accepts(mutations, delete):
    _agrees_with_full_validation(mutations, delete, frame)


@settings(max_examples=200, deadline=None)
@given(groups(), st.data())
def test_any_damage_to_a_frame_is_a_named_refusal_or_a_valid_group(group, data):
    raw = bytearray(encode_group(group))
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decoded = decode_group(bytes(raw[:cut]))
    except MalformedEntry:
        return
    assert isinstance(decoded, TrajectoryGroup) and decoded.trajectories  # a flipped token id is still a group
