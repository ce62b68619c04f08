"""The trajectory contract between rollout workers and the learner, and its msgpack wire format.

A `Trajectory` is one sampled response; a `TrajectoryGroup` is the n responses to one prompt (a GRPO group),
the unit producers push and the learner consumes. On the wire a group is one msgpack map:

    {"schema": 1, "group_id": str, "slot": int | None, "trajectories": [ {...}, ... ]}

with every numeric array packed as little-endian bytes (int32 token ids and versions, float32 log-probs), so a
1,024-token response costs 12 KiB, not 1,024 msgpack floats. Decoding never unpickles anything; any malformed
payload raises `MalformedEntry` with a short machine-readable `reason` that the buffer dead-letters under.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import msgpack
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1


class MalformedEntry(ValueError):
    """A buffer entry that cannot be a valid group. `reason` is one of a small fixed set (metric label)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _array(dtype: str):
    np_dtype = np.dtype(dtype).newbyteorder("<")

    def convert(value: Any) -> np.ndarray:
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) % np_dtype.itemsize:
                raise ValueError(f"{len(value)} bytes is not a whole number of {np_dtype.name}")
            return np.frombuffer(value, dtype=np_dtype)
        arr = np.asarray(value)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-d array, got shape {arr.shape}")
        if arr.size and not np.can_cast(arr.dtype, np_dtype, casting="same_kind"):
            raise ValueError(f"cannot hold {arr.dtype} values as {np_dtype.name}")
        return arr.astype(np_dtype, copy=False)

    return Annotated[np.ndarray, BeforeValidator(convert)]


Int32Array = _array("int32")
Float32Array = _array("float32")


class Trajectory(BaseModel):
    """One response to one prompt, with what the learner needs to correct for its staleness."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    group_id: str
    prompt_ids: Int32Array  # [P]
    response_ids: Int32Array  # [T]
    behaviour_logp: Float32Array  # [T] log-prob of each sampled token under the generating policy
    versions: Int32Array  # [T] policy version that generated each token (a rollout may span an update)
    version_min: int  # = versions.min(); carried because an empty response has no per-token versions
    version_max: int
    reward: float
    finish_reason: str = "stop"  # "stop" | "length" | "abort"
    worker_id: str = ""
    t_start: float = 0.0  # wall clock when generation began / ended (seconds since epoch)
    t_end: float = 0.0
    meta: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Trajectory:
        t = len(self.response_ids)
        if len(self.behaviour_logp) != t:
            raise ValueError(f"length_mismatch: {t} response tokens but {len(self.behaviour_logp)} log-probs")
        if len(self.versions) != t:
            raise ValueError(f"length_mismatch: {t} response tokens but {len(self.versions)} versions")
        if not np.isfinite(self.behaviour_logp).all():
            raise ValueError("non_finite: behaviour log-probs contain NaN or inf")
        if not np.isfinite(self.reward):
            raise ValueError("non_finite: reward is NaN or inf")
        if t and (int(self.versions.min()) != self.version_min or int(self.versions.max()) != self.version_max):
            raise ValueError("version_mismatch: version_min/max disagree with the per-token versions")
        if self.version_min < 0 or self.version_max < self.version_min:
            raise ValueError(f"version_mismatch: bad range [{self.version_min}, {self.version_max}]")
        return self

    @classmethod
    def make(cls, *, versions: Any = None, version: int | None = None, **fields: Any) -> Trajectory:
        """Build from arrays, filling per-token versions from one `version` and min/max from the tokens."""
        n = len(fields["response_ids"])
        if versions is None:
            versions = np.full(n, version, dtype=np.int32)
        versions = np.asarray(versions, dtype=np.int32)
        lo = int(versions.min()) if n else int(version if version is not None else 0)
        hi = int(versions.max()) if n else lo
        fields.setdefault("t_end", time.time())
        return cls(versions=versions, version_min=lo, version_max=hi, **fields)

    def to_wire(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"prompt_ids", "response_ids", "behaviour_logp", "versions"})
        d["prompt_ids"] = self.prompt_ids.tobytes()
        d["response_ids"] = self.response_ids.tobytes()
        d["behaviour_logp"] = self.behaviour_logp.tobytes()
        d["versions"] = self.versions.tobytes()
        return d


class TrajectoryGroup(BaseModel):
    """The n responses to one prompt. `slot` is the admission ticket it was generated under (see staleness)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    group_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    trajectories: list[Trajectory]
    slot: int | None = None

    @model_validator(mode="after")
    def _nonempty(self) -> TrajectoryGroup:
        if not self.trajectories:
            raise ValueError("empty_group: a group needs at least one trajectory")
        for t in self.trajectories:
            if t.group_id != self.group_id:
                raise ValueError(f"group_mismatch: trajectory {t.id} belongs to group {t.group_id}")
        return self

    @property
    def version_min(self) -> int:
        """The oldest policy version in the group: staleness is measured from it."""
        return min(t.version_min for t in self.trajectories)

    @property
    def version_max(self) -> int:
        return max(t.version_max for t in self.trajectories)

    @property
    def num_tokens(self) -> int:
        return sum(len(t.prompt_ids) + len(t.response_ids) for t in self.trajectories)


def encode_group(group: TrajectoryGroup) -> bytes:
    payload = {
        "schema": SCHEMA_VERSION,
        "group_id": group.group_id,
        "slot": group.slot,
        "trajectories": [t.to_wire() for t in group.trajectories],
    }
    return msgpack.packb(payload, use_bin_type=True)


_REASONS = ("length_mismatch", "non_finite", "version_mismatch", "empty_group", "group_mismatch")


def decode_group(data: bytes) -> TrajectoryGroup:
    """Bytes from Redis to a validated group, or MalformedEntry(reason). Never unpickles."""
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedEntry("bad_msgpack", type(exc).__name__) from None
    if not isinstance(payload, dict):
        raise MalformedEntry("bad_schema", f"top level is {type(payload).__name__}, not a map")
    schema = payload.get("schema")
    if schema != SCHEMA_VERSION:
        raise MalformedEntry("unknown_schema", f"schema version {schema!r}, this build reads {SCHEMA_VERSION}")
    try:
        return TrajectoryGroup.model_validate({k: v for k, v in payload.items() if k != "schema"})
    except ValidationError as err:
        first = err.errors()[0]
        msg = str(first.get("ctx", {}).get("error", first["msg"]))
        reason = next((r for r in _REASONS if r in msg), "bad_schema")
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedEntry(reason, f"{where}: {msg}"[:300]) from None
