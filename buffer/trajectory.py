"""The trajectory contract between rollout workers and the learner, and its wire format.

A `Trajectory` is one sampled response; a `TrajectoryGroup` is the n responses to one prompt (a GRPO group),
the unit producers push and the learner consumes. On the wire a group is one frame (format 2):

    b"SFG\x02" | header length H (uint32 LE) | header: msgpack [group_id, slot, rows, lengths] | zero pad to 4
    | prompt_ids int32[sum P] | response_ids int32[sum T] | versions int32[sum T] | behaviour_logp float32[sum T]

`rows` holds each trajectory's scalar fields (a map: id, group_id, version_min, ..., meta) and `lengths` its
[P_i, T_i] pairs; the token arrays of all n responses lie back to back, little-endian. Decoding reads the small
header and takes numpy views of the four sections: no per-array object, no copy, and the checks (finite
log-probs, per-token versions against version_min/max) run once over the whole group, vectorised.

Format 1, a msgpack map {"schema": 1, "group_id", "slot", "trajectories": [maps with the arrays as bytes]}, is
still read (an entry written by an older build, or by hand): it goes through the same checks. Decoding never
unpickles anything; any malformed payload raises `MalformedEntry` with a short machine-readable `reason` that
the buffer dead-letters under.
"""

from __future__ import annotations

import math
import operator
import struct
import time
import uuid
from typing import Annotated, Any

import msgpack
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1  # the msgpack-map format (still read)
FRAME_MAGIC = b"SFG\x02"  # format 2, the frame encode_group writes
_HEAD = 8  # magic + header length


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
        if not len(self.prompt_ids):  # the learner scores response token k from the tokens before it
            raise ValueError("empty_prompt: a trajectory needs at least one prompt token")
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
        """Format 1's map for this response (arrays as bytes)."""
        d = self._row()
        for name in _ARRAYS:
            d[name] = getattr(self, name).tobytes()
        return d

    def _row(self) -> dict[str, Any]:
        # Built by hand, not with model_dump: this runs for every response pushed and model_dump is ~10x slower.
        d: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS}
        d["meta"] = dict(self.meta)
        return d


_ARRAYS = ("prompt_ids", "response_ids", "behaviour_logp", "versions")
_SCALARS = tuple(n for n in Trajectory.model_fields if n not in _ARRAYS and n != "meta")
_ARRAY_DTYPES = {name: np.dtype("<f4" if name == "behaviour_logp" else "<i4") for name in _ARRAYS}
_TYPED_FIELDS = ("id", "group_id", "finish_reason", "worker_id", "reward", "t_start", "t_end", "version_min",
                 "version_max", "meta")
_TYPES = (str, str, str, str, float, float, float, int, int, dict)
_META_TYPES = (str, int, float, bool, type(None))
_FIELDS = Trajectory.model_fields.keys()


_ROW_FIELDS = _FIELDS - set(_ARRAYS)  # a frame row: the scalar fields


def _scalars_ok(d: Any, keys: Any) -> bool:
    """Is `d` a map of exactly `keys`, with the exact scalar types `_row` writes? (Else full validation runs.)"""
    if type(d) is not dict or d.keys() != keys:
        return False
    # one pass in C over the typed fields: exact types (a bool is not an int here, nor an int a float)
    if tuple(map(type, map(d.__getitem__, _TYPED_FIELDS))) != _TYPES:
        return False
    return not d["meta"] or all(type(k) is str and type(v) in _META_TYPES for k, v in d["meta"].items())


def _fast_fields(d: Any) -> dict[str, Any] | None:
    """Format 1: the map's fields with arrays as numpy views, or None unless it is exactly what `to_wire` writes
    (every field, exact types); then the full pydantic validation runs instead and names any error."""
    if not _scalars_ok(d, _FIELDS):
        return None
    fields = dict(d)
    for name, dtype in _ARRAY_DTYPES.items():
        value = d[name]
        if type(value) is not bytes or len(value) % 4:
            return None
        fields[name] = np.frombuffer(value, dtype=dtype)
    return fields


def _fast_group(payload: dict[str, Any]) -> TrajectoryGroup | None:
    """Format 1 without pydantic's per-field machinery; None on anything unusual (full validation then runs)."""
    if not payload.keys() <= {"schema", "group_id", "slot", "trajectories"}:
        return None
    gid, slot, raw = payload.get("group_id"), payload.get("slot"), payload.get("trajectories")
    if type(raw) is not list:
        return None
    rows = [_fast_fields(d) for d in raw]
    if any(f is None for f in rows):
        return None
    lengths = np.array([len(f["response_ids"]) for f in rows])
    if any(len(f["behaviour_logp"]) != t or len(f["versions"]) != t for f, t in zip(rows, lengths)):
        return None
    logp = np.concatenate([f["behaviour_logp"] for f in rows]) if rows else np.zeros(0, np.float32)
    versions = np.concatenate([f["versions"] for f in rows]) if rows else np.zeros(0, np.int32)
    return _checked_group(gid, slot, rows, logp, versions, lengths)


def _checked_group(gid: Any, slot: Any, rows: list[dict[str, Any]], logp: np.ndarray, versions: np.ndarray,
                   lengths: np.ndarray) -> TrajectoryGroup | None:
    """`Trajectory._consistent`'s and `TrajectoryGroup._nonempty`'s checks, once over the whole group: `logp` and
    `versions` are every response's back to back, `lengths` their sizes. The group, or None if any check fails
    (full validation then names it). Accepts nothing the full validation refuses."""
    if type(gid) is not str or not (slot is None or type(slot) is int) or not rows:
        return None
    gids, vmin, vmax, rewards, prompts = zip(*map(_CHECKED_COLUMNS, rows))  # one tuple per column
    if gids.count(gid) != len(gids) or not all(map(len, prompts)):
        return None
    if not (all(map(math.isfinite, rewards)) and min(vmin) >= 0 and all(map(operator.le, vmin, vmax))):
        return None
    if not np.isfinite(logp).all():
        return None
    nonempty = lengths > 0
    if nonempty.any():
        starts = (np.cumsum(lengths) - lengths)[nonempty]
        if (np.minimum.reduceat(versions, starts) != np.array(vmin)[nonempty]).any():
            return None
        if (np.maximum.reduceat(versions, starts) != np.array(vmax)[nonempty]).any():
            return None
    trajectories = [_trusted(Trajectory, f) for f in rows]
    return _trusted(TrajectoryGroup, {"group_id": gid, "trajectories": trajectories, "slot": slot})


_CHECKED_COLUMNS = operator.itemgetter("group_id", "version_min", "version_max", "reward", "prompt_ids")


def _trusted(cls: type[BaseModel], values: dict[str, Any]) -> Any:
    """`cls.model_construct(**values)` for already-checked values: when every field is present this does only
    model_construct's final assignments (its per-field alias/default loop is most of the decode time)."""
    if values.keys() != cls.__pydantic_fields__.keys():
        return cls.model_construct(**values)
    obj = cls.__new__(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


_set = object.__setattr__


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
    """The group as one format-2 frame (module docstring), as bytes of its own. Pushes use a `FrameArena`."""
    return bytes(FrameArena().encode([group])[0])


def _frame_head(group: TrajectoryGroup) -> bytes:
    """Magic, header length, header (msgpack [group_id, slot, rows, lengths]) and the padding to 4 bytes."""
    trajs = group.trajectories
    header = msgpack.packb(
        [group.group_id, group.slot, [t._row() for t in trajs],
         [n for t in trajs for n in (len(t.prompt_ids), len(t.response_ids))]],
        use_bin_type=True,
    )
    return b"".join([FRAME_MAGIC, struct.pack("<I", len(header)), header,
                     b"\0" * (_aligned(_HEAD + len(header)) - _HEAD - len(header))])


class FrameArena:
    """Encodes groups into one block of memory reused call after call; returns a memoryview per frame.

    Why not fresh bytes per frame: a ~100 KB block freed and allocated again is handed back to the OS and
    page-faulted in anew every time (glibc's trim threshold), which made encoding twice as slow as its copy; and
    redis-py sends a memoryview as it is, where it copies bytes once more into its packed command. Each section
    is one concatenate straight into the block. The views are valid until the next `encode` on the same arena:
    one arena per thread, used within one push.
    """

    def __init__(self) -> None:
        self._block = np.empty(0, dtype=np.uint8)

    def encode(self, groups: list[TrajectoryGroup]) -> list[memoryview]:
        heads = [_frame_head(g) for g in groups]
        tokens = [sum(len(t.prompt_ids) + 3 * len(t.response_ids) for t in g.trajectories) for g in groups]
        total = sum(len(h) for h in heads) + 4 * sum(tokens)
        if self._block.size < total:  # a new block (views still held elsewhere keep the old one alive), with
            # room for batches a little larger: the memory held stays ~ the largest batch pushed
            self._block = np.empty(total + total // 4, dtype=np.uint8)
        block, view = self._block, memoryview(self._block)
        out, end = [], 0
        for group, head in zip(groups, heads):
            start = end
            block[end : end + len(head)] = np.frombuffer(head, np.uint8)
            end += len(head)
            for name in _SECTIONS:
                arrays = [getattr(t, name) for t in group.trajectories]
                n = sum(len(a) for a in arrays)
                np.concatenate(arrays, out=block[end : end + 4 * n].view(_ARRAY_DTYPES[name]))
                end += 4 * n
            out.append(view[start:end])
        return out


_SECTIONS = ("prompt_ids", "response_ids", "versions", "behaviour_logp")


def _aligned(n: int) -> int:
    return (n + 3) // 4 * 4


def _decode_frame(data: bytes) -> TrajectoryGroup:
    """Format 2: views over `data`, checks over whole sections; full validation only to name what is wrong."""
    if len(data) < _HEAD:
        raise MalformedEntry("bad_frame", f"{len(data)} bytes: shorter than a frame header")
    (hlen,) = struct.unpack_from("<I", data, 4)
    if _HEAD + hlen > len(data):
        raise MalformedEntry("bad_frame", f"header of {hlen} bytes runs past the frame's {len(data)}")
    try:
        header = msgpack.unpackb(memoryview(data)[_HEAD : _HEAD + hlen], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedEntry("bad_msgpack", type(exc).__name__) from None
    if type(header) is not list or len(header) != 4:
        raise MalformedEntry("bad_schema", "frame header is not [group_id, slot, rows, lengths]")
    gid, slot, rows, lengths = header
    if (type(rows) is not list or type(lengths) is not list or len(lengths) != 2 * len(rows)
            or not all(type(n) is int and 0 <= n < 2**31 for n in lengths)):
        raise MalformedEntry("bad_frame", "lengths are not a [prompt, response] pair of sizes per row")
    if any(type(r) is dict and not r.keys().isdisjoint(_ARRAYS) for r in rows):
        raise MalformedEntry("bad_schema", "a row carries a token array: arrays live in the frame's sections")
    sizes = np.array(lengths, dtype=np.int64).reshape(-1, 2)
    n_prompt, n_resp = (int(x) for x in sizes.sum(axis=0)) if len(sizes) else (0, 0)
    start = _aligned(_HEAD + hlen)
    if len(data) != start + 4 * (n_prompt + 3 * n_resp):
        raise MalformedEntry("bad_frame", f"{len(data)} bytes where the header describes "
                                          f"{start + 4 * (n_prompt + 3 * n_resp)}")
    ints = np.frombuffer(data, "<i4", n_prompt + 2 * n_resp, start)
    logp = np.frombuffer(data, "<f4", n_resp, start + 4 * (n_prompt + 2 * n_resp))
    prompts, responses, versions = ints[:n_prompt], ints[n_prompt : n_prompt + n_resp], ints[n_prompt + n_resp :]
    p_end, r_end = np.cumsum(sizes[:, 0]).tolist(), np.cumsum(sizes[:, 1]).tolist()
    fast_ok = all(_scalars_ok(r, _ROW_FIELDS) for r in rows)  # before the arrays join the rows
    for row, p1, p0, r1, r0 in zip(rows, p_end, [0, *p_end], r_end, [0, *r_end]):
        if type(row) is dict:  # (anything else: full validation names it) the header is ours: fill it in place
            row["prompt_ids"], row["response_ids"] = prompts[p0:p1], responses[r0:r1]
            row["versions"], row["behaviour_logp"] = versions[r0:r1], logp[r0:r1]
    if fast_ok:
        try:
            fast = _checked_group(gid, slot, rows, logp, versions, sizes[:, 1])
        except (ValueError, TypeError, OverflowError):  # e.g. a version past int64: let pydantic say why
            fast = None
        if fast is not None:
            return fast
    return _validated({"group_id": gid, "slot": slot, "trajectories": rows})


_REASONS = ("length_mismatch", "non_finite", "version_mismatch", "empty_group", "group_mismatch", "empty_prompt")


def _validated(payload: dict[str, Any]) -> TrajectoryGroup:
    """Pydantic's full validation: the group, or MalformedEntry naming the first thing wrong."""
    try:
        return TrajectoryGroup.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        msg = str(first.get("ctx", {}).get("error", first["msg"]))
        reason = next((r for r in _REASONS if r in msg), "bad_schema")
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedEntry(reason, f"{where}: {msg}"[:300]) from None


def decode_group(data: bytes) -> TrajectoryGroup:
    """Bytes from Redis to a validated group, or MalformedEntry(reason). Never unpickles."""
    # A pickle (protocol 2-5) starts with PROTO 0x80 n; no valid group does (0x80 is an empty msgpack map).
    # Named apart so that an operator sees someone is sending pickles; it is never loaded.
    if len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5:
        raise MalformedEntry("pickle", f"pickle protocol {data[1]} payload refused")
    if data[:4] == FRAME_MAGIC:
        return _decode_frame(data)
    if data[:3] == FRAME_MAGIC[:3]:
        raise MalformedEntry("unknown_schema", f"frame format {data[3:4].hex()}, this build reads 02 (and schema 1)")
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
        fast = _fast_group(payload)
    except (ValueError, TypeError, OverflowError):  # anything odd the fast path trips on: let pydantic say why
        fast = None
    if fast is not None:
        return fast
    return _validated({k: v for k, v in payload.items() if k != "schema"})
