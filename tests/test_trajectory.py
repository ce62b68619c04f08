"""The trajectory wire format: bit-exact round trips, and the fast decoder agreeing with full validation."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.trajectory import (
    MalformedEntry,
    Trajectory,
    TrajectoryGroup,
    decode_group,
    encode_group,
)

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
    decoded = decode_group(data)
    _same(group, decoded)
    # the fast path and pydantic's full validation build the same group
    payload = msgpack.unpackb(data, raw=False)
    del payload["schema"]
    _same(TrajectoryGroup.model_validate(payload), decoded)
    assert encode_group(decoded) == data


def _payload(**traj_changes):
    t = Trajectory.make(group_id="g", prompt_ids=[1, 2], response_ids=[3, 4, 5], behaviour_logp=[-1.0, -2.0, -3.0],
                        version=2, reward=1.0)
    payload = msgpack.unpackb(encode_group(TrajectoryGroup(group_id="g", trajectories=[t])), raw=False)
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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), ODD), min_size=1, max_size=3), st.booleans())
def test_the_fast_decoder_accepts_exactly_what_full_validation_accepts(mutations, delete):
    payload = _payload()
    for name, value in mutations:
        if delete:
            payload["trajectories"][0].pop(name, None)
        else:
            payload["trajectories"][0][name] = value
    try:
        data = msgpack.packb(payload, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return  # not representable in msgpack: cannot arrive on the wire
    wire = msgpack.unpackb(data, raw=False)
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
