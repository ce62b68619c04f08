"""The weight-transfer contract between the learner (publisher) and the rollout workers (fetchers).

A published policy version is a `WeightsManifest` plus one object-store object per bucket. A bucket is a flat,
contiguous uint8 numpy array holding several tensors back to back; the manifest says where each one lives:

    WeightsManifest(version=7, dtype="bfloat16", total_bytes=..., buckets=[
        [TensorSpec("model.embed_tokens.weight", "bfloat16", (V, H), offset=0, nbytes=2*V*H), ...],  # 0
        [...],                                                                                   # bucket 1
    ])

Why flat uint8 buckets: Ray stores a numpy array with one copy on put and hands it back zero-copy on get,
while a pickled torch state_dict is copied on both sides (~5x slower). uint8 also carries dtypes numpy lacks
(bfloat16): `unpack_bucket` views the bytes as the torch dtype, never converting. Buckets are bounded
(`bucket_bytes`) so that neither side holds two full copies of the model: the publisher packs one bucket,
puts it and frees it; the fetcher gets one bucket, loads it and drops it.

Dependency-free apart from numpy and torch: both the learner and the rollout worker import it. torch is
imported only when packing or unpacking, so the registry actor (which only stores manifests) stays light.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Every tensor starts on a 64-byte boundary: any dtype view is aligned and copies run on whole cache lines.
ALIGN = 64

# The dtypes weights may travel in (torch names), with their element size in bytes.
DTYPES: dict[str, int] = {
    "float32": 4, "bfloat16": 2, "float16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


class WeightsError(RuntimeError):
    """A weights publish or fetch failed: missing/evicted version, lost object, bad bucket, dead registry."""


class WeightsTimeout(WeightsError, TimeoutError):
    """A weights publish or fetch step did not finish in time; the message names the version and the step."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives inside its bucket: bytes [offset, offset + nbytes), C-contiguous."""

    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]
    offset: int
    nbytes: int


BucketSpec = list[TensorSpec]


@dataclass(frozen=True)
class WeightsManifest:
    """One published policy version: the layout of its buckets (bucket i is object ref i in the registry)."""

    version: int
    buckets: list[BucketSpec]
    total_bytes: int  # sum of the tensors' bytes (alignment padding not counted)
    dtype: str  # the floating-point dtype the weights travel in ("bfloat16"; comma-joined if several)

    def bucket_nbytes(self, i: int) -> int:
        """Size of bucket i's array (tensors plus alignment padding)."""
        last = self.buckets[i][-1] if self.buckets[i] else None
        return last.offset + last.nbytes if last else 0


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise WeightsError(f"weights of dtype {dtype} cannot travel (supported: {', '.join(DTYPES)})")
    return name


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in DTYPES:
        raise WeightsError(f"unknown weights dtype {name!r} (supported: {', '.join(DTYPES)})")
    return getattr(torch, name)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def travel_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor travels in: floating-point tensors take the rollout dtype, others keep theirs."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    staging: np.ndarray | Callable[[int, int], np.ndarray] | None = None,
) -> Iterator[tuple[BucketSpec, np.ndarray]]:
    """Pack tensors, in order, into flat uint8 buckets of at most `bucket_bytes` each; yield them one by one.

    Floating-point tensors are converted to `dtype` (None: keep) during the copy into the bucket, so packing
    is the conversion and costs no extra pass. A tensor bigger than `bucket_bytes` gets a bucket of its own.
    Any layout is accepted (non-contiguous, 0-d, empty). At most one bucket plus the pending tensors (their
    references, no copies) are held here; the caller should store each bucket and drop it.

    `staging`: a 1-d uint8 array reused for every bucket that fits in it; such buckets are views of it, valid
    only until the next bucket is requested. Packing into freshly allocated memory pays a page fault per
    4 KiB and runs at about a third of memcpy speed; a staging buffer kept across publishes does not. Or a
    function (bucket index, size) -> a 1-d uint8 array of at least that size, for buckets that must all stay
    valid (a publish that puts them later, on another thread).
    """
    import torch

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    if isinstance(staging, np.ndarray) and (staging.dtype != np.uint8 or staging.ndim != 1):
        raise ValueError(f"staging must be a 1-d uint8 array, got {staging.dtype} {staging.shape}")
    pending: list[tuple[TensorSpec, torch.Tensor]] = []
    used = index = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        out_dtype = travel_dtype(tensor, dtype)
        nbytes = tensor.numel() * out_dtype.itemsize
        offset = _aligned(used)
        if pending and offset + nbytes > bucket_bytes:
            yield _pack(pending, used, staging, index)
            pending, offset, index = [], 0, index + 1
        spec = TensorSpec(name, dtype_name(out_dtype), tuple(tensor.shape), offset, nbytes)
        pending.append((spec, tensor))
        used = offset + nbytes
    if pending:
        yield _pack(pending, used, staging, index)


def _view(raw: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Bytes [offset, offset + nbytes) of a flat uint8 tensor seen as the spec's dtype and shape."""
    if spec.nbytes == 0:  # torch cannot reinterpret an empty byte slice (its stride may be 0)
        return raw.new_empty(spec.shape, dtype=torch_dtype(spec.dtype))
    return raw[spec.offset : spec.offset + spec.nbytes].view(torch_dtype(spec.dtype)).view(spec.shape)


def _pack(
    pending: list[tuple[TensorSpec, torch.Tensor]], size: int, staging: Any, index: int
) -> tuple[BucketSpec, np.ndarray]:
    import torch

    if callable(staging):
        buf = staging(index, size)[:size]
    elif staging is not None and staging.size >= size:
        buf = staging[:size]
    else:
        buf = np.empty(size, dtype=np.uint8)
    raw = torch.from_numpy(buf)
    for spec, tensor in pending:
        _view(raw, spec).copy_(tensor.detach())  # converts dtype, gathers strided layouts, device -> host
    return [spec for spec, _ in pending], buf


def unpack_bucket(specs: Sequence[TensorSpec], buf: np.ndarray) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each spec: zero-copy views over `buf` in the spec's dtype and shape.

    `buf` from the object store is read-only: the views must be copied (loaded) and never written to.
    They keep `buf` alive while referenced. Raises WeightsError if `buf` does not match the specs.
    """
    import torch

    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise WeightsError(f"a weights bucket must be a 1-d uint8 array, got {buf.dtype} {buf.shape}")
    with warnings.catch_warnings():
        # torch warns that the array is not writable; the views are only ever read (see docstring).
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(buf)
    for spec in specs:
        end = spec.offset + spec.nbytes
        if spec.dtype not in DTYPES:
            raise WeightsError(f"{spec.name}: unknown dtype {spec.dtype!r}")
        expected = DTYPES[spec.dtype] * int(np.prod(spec.shape, dtype=np.int64))
        if spec.offset < 0 or end > buf.size or spec.nbytes != expected:
            raise WeightsError(
                f"{spec.name}: bytes [{spec.offset}, {end}) as {spec.dtype}{list(spec.shape)} do not fit a"
                f" bucket of {buf.size} bytes"
            )
        yield spec.name, _view(raw, spec)


__all__ = [
    "ALIGN",
    "DTYPES",
    "FLOAT_DTYPES",
    "BucketSpec",
    "TensorSpec",
    "WeightsError",
    "WeightsManifest",
    "WeightsTimeout",
    "dtype_name",
    "pack_buckets",
    "torch_dtype",
    "travel_dtype",
    "unpack_bucket",
]
