"""Publishing the learner's weights through the Ray object store, one bounded bucket at a time.

Every `publish_every` updates, rank 0 packs the full parameters (in the rollout dtype) into flat uint8 buckets
(buffer/weights.py), `ray.put`s each one as soon as it is packed and frees it, then registers (manifest, refs)
with the weight registry actor, which keeps them alive for the workers. The learner process owns the objects:
if it dies, the versions it published are lost (fetches then fail with a clear WeightsError).

ZeRO: with stages 0-2 every rank holds the full parameters, so only rank 0 does any work. With ZeRO-3 the
parameters are partitioned: every rank must call `publish` (the gathers are collectives); parameters are
gathered a bucket's worth at a time (deepspeed.zero.GatheredParameters), copied out and re-partitioned, so
no rank ever holds more than about one bucket of gathered parameters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from buffer.weights import (
    DTYPES,
    FLOAT_DTYPES,
    WeightsError,
    WeightsManifest,
    WeightsTimeout,
    pack_buckets,
    torch_dtype,
    travel_dtype,
)

log = logging.getLogger(__name__)

MetricsLogger = Callable[[int, Mapping[str, float]], None]


@dataclass(frozen=True)
class PublishStats:
    version: int
    seconds: float
    bytes: int
    buckets: int
    kept: int  # versions the registry keeps after this one (pinned ones included)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 holds only a partition locally


def _is_zero3(params: list[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def zero3_named_params(
    named: list[tuple[str, torch.nn.Parameter]], chunk_bytes: int, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for ZeRO-3 partitioned params, gathering ~chunk_bytes of them at a time.

    The gathered data vanishes when the context exits (re-partition), so each tensor is copied out first, in
    the travel dtype (half the memory of fp32 when publishing bf16). Ranks other than 0 yield nothing but
    take part in every gather.
    """
    import deepspeed  # only ZeRO-3 needs it; stages 0-2 publish plain module parameters

    rank = _rank()
    chunk: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
            copies = []
            if rank == 0:
                for name, p in chunk:
                    copies.append((name, p.detach().to("cpu", travel_dtype(p, dtype), copy=True)))
        yield from copies

    for name, p in named:
        chunk.append((name, p))
        size += _numel(p) * p.element_size()
        if size >= chunk_bytes:
            yield from flush()
            chunk, size = [], 0
    if chunk:
        yield from flush()


class WeightPublisher:
    """Puts the model's weights into the object store and registers them; `maybe_publish` after each update.

    `registry` is the WeightRegistry actor handle (services hands it over); `metrics(step, values)` is the
    run's metrics callback; `pins()` names the older versions the registry must keep (fixed staleness: those
    whose slots are not filled yet, StalenessBuffer.pinned_versions). Only rank 0 talks to Ray; call it on every
    rank (ZeRO-3 needs them all).
    """

    def __init__(
        self,
        registry: Any,
        *,
        publish_every: int = 1,
        bucket_mb: int = 64,
        dtype: str = "auto",
        timeout_s: float = 120.0,
        metrics: MetricsLogger | None = None,
        pins: Callable[[], Iterable[int]] | None = None,
    ):
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"weights dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
        self.registry = registry
        self.publish_every = publish_every
        self.bucket_bytes = bucket_mb << 20
        self.dtype = None if dtype == "auto" else torch_dtype(dtype)  # None: floats keep the model's dtype
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.pins = pins
        # One bucket of host memory, reused by every publish: packing into fresh pages is ~3x slower.
        self._staging = None

    def maybe_publish(self, model: torch.nn.Module, version: int) -> PublishStats | None:
        """Publish if `version` (= optimizer updates so far) is a multiple of publish_every."""
        return self.publish(model, version) if version % self.publish_every == 0 else None

    def publish(self, model: torch.nn.Module, version: int) -> PublishStats | None:
        """Publish `model` (a module or a DeepSpeed engine) as `version`. Returns stats on rank 0, else None.

        Raises WeightsTimeout if it takes longer than timeout_s, WeightsError if the store or registry fails.
        """
        t0 = time.perf_counter()
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the module
        named = list(module.named_parameters())  # shared (tied) parameters appear once
        zero3 = _is_zero3([p for _, p in named])
        rank = _rank()
        if rank != 0 and not zero3:
            return None
        tensors = zero3_named_params(named, self.bucket_bytes, self.dtype) if zero3 else iter(named)

        if rank == 0:
            # A tensor bigger than a bucket travels alone: size the staging buffer for it too.
            sizes = [_numel(p) * travel_dtype(p, self.dtype).itemsize for _, p in named]
            need = max(min(self.bucket_bytes, sum(sizes)), max(sizes, default=0))
            if self._staging is None or self._staging.size < need:
                self._staging = np.empty(need, dtype=np.uint8)
        refs: list[ray.ObjectRef] = []
        buckets = []
        total = 0
        failure: WeightsError | None = None
        # Ranks > 0 (ZeRO-3) only take part in the gathers: their generator yields no bucket.
        for specs, buf in pack_buckets(tensors, self.bucket_bytes, self.dtype, self._staging):
            if failure is not None:
                continue  # keep consuming: under ZeRO-3 the other ranks wait for this rank in every gather
            try:
                refs.append(ray.put(buf))  # copies into the store: the staging buffer is free again
            except Exception as exc:  # ObjectStoreFullError (after Ray's retries), a lost raylet, ...
                failure = WeightsError(f"publishing weights version {version}: ray.put of bucket {len(refs)}"
                                       f" ({buf.nbytes} bytes) failed: {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
            buckets.append(specs)
            total += sum(s.nbytes for s in specs)
        if rank != 0:
            return None
        if failure is not None:
            raise failure
        # Checked once the gathers are over: under ZeRO-3 leaving early would strand the other ranks. ray.put
        # itself does not hang: a full store raises after its retries.
        if time.perf_counter() - t0 > self.timeout_s:
            raise WeightsTimeout(f"publishing weights version {version}: packing and putting {len(refs)}"
                                 f" buckets took longer than {self.timeout_s}s")

        dtype_names = {s.dtype for b in buckets for s in b if s.dtype in FLOAT_DTYPES}
        manifest = WeightsManifest(version, buckets, total, ",".join(sorted(dtype_names)) or "none")
        pinned = list(self.pins()) if self.pins is not None else []
        left = max(self.timeout_s - (time.perf_counter() - t0), 1e-3)
        try:
            # refs travel inside a list, so Ray passes them as references (the registry borrows them).
            kept = ray.get(self.registry.register.remote(manifest, refs, pinned), timeout=left)
        except ray.exceptions.GetTimeoutError:
            raise WeightsTimeout(f"publishing weights version {version}: the registry did not acknowledge"
                                 f" within {self.timeout_s}s") from None
        except ray.exceptions.RayActorError as exc:
            raise WeightsError(f"publishing weights version {version}: the weight registry actor is gone"
                               f" ({type(exc).__name__})") from exc

        stats = PublishStats(version, time.perf_counter() - t0, total, len(buckets), len(kept))
        if self.metrics is not None:
            self.metrics(version, {"weights/publish_s": stats.seconds, "weights/bytes": float(total),
                                   "weights/version": float(version), "weights/kept": float(len(kept))})
        log.debug("published weights v%d: %d bytes in %d buckets, %.3fs", version, total, len(buckets),
                  stats.seconds)
        return stats


__all__ = ["PublishStats", "WeightPublisher"]
