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
from concurrent.futures import Future, ThreadPoolExecutor
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
    kept: int | None  # versions the registry keeps after this one (pinned ones included); None: not known yet


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

    `background=True` takes the object-store half off the learner's step: `publish` returns once the weights are
    copied into host memory (the only part that must see this version's parameters: the next update changes
    them), and a thread puts the buckets and registers the version while the next update trains. Two host
    copies of the model alternate (one being put while the next is packed); versions register in order, and a
    failure surfaces at the next `publish` or at `flush()`, which also waits for the version in flight (call it
    before anyone must see the newest version: after setup, at the end of training).
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
        background: bool = False,
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
        self.background = background
        # One bucket of host memory, reused by every publish: packing into fresh pages is ~3x slower.
        self._staging = None
        # background: two host copies of the model (one list of bucket arrays each), used in turn
        self._copies: list[list[np.ndarray]] = [[], []]
        self._turn = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="weights-publish") if background else None
        self._in_flight: Future | None = None

    def maybe_publish(self, model: torch.nn.Module, version: int) -> PublishStats | None:
        """Publish if `version` (= optimizer updates so far) is a multiple of publish_every."""
        return self.publish(model, version) if version % self.publish_every == 0 else None

    def flush(self) -> None:
        """Wait for the version being put and registered in the background (if any); raise its failure."""
        if self._in_flight is not None:
            job, self._in_flight = self._in_flight, None
            job.result()

    def publish(self, model: torch.nn.Module, version: int) -> PublishStats | None:
        """Publish `model` (a module or a DeepSpeed engine) as `version`. Returns stats on rank 0, else None
        (background: `kept` is None, the registry answers later).

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

        staging: Any = None
        if rank == 0 and self.background:
            staging = self._copy_alloc(self._copies[self._turn])
            self._turn ^= 1  # the other copy may still be read by the put in flight
        elif rank == 0:
            # A tensor bigger than a bucket travels alone: size the staging buffer for it too.
            sizes = [_numel(p) * travel_dtype(p, self.dtype).itemsize for _, p in named]
            need = max(min(self.bucket_bytes, sum(sizes)), max(sizes, default=0))
            if self._staging is None or self._staging.size < need:
                self._staging = np.empty(need, dtype=np.uint8)
            staging = self._staging
        refs: list[ray.ObjectRef] = []
        packed: list[np.ndarray] = []
        buckets = []
        total = 0
        failure: WeightsError | None = None
        # Ranks > 0 (ZeRO-3) only take part in the gathers: their generator yields no bucket.
        for specs, buf in pack_buckets(tensors, self.bucket_bytes, self.dtype, staging):
            buckets.append(specs)
            total += sum(s.nbytes for s in specs)
            if self.background:
                packed.append(buf)  # put by the thread, after this returns
                continue
            if failure is not None:
                continue  # keep consuming: under ZeRO-3 the other ranks wait for this rank in every gather
            try:
                refs.append(ray.put(buf))  # copies into the store: the staging buffer is free again
            except Exception as exc:  # ObjectStoreFullError (after Ray's retries), a lost raylet, ...
                failure = _put_failed(version, len(refs), buf, exc)
        if rank != 0:
            return None
        if failure is not None:
            raise failure
        dtype_names = {s.dtype for b in buckets for s in b if s.dtype in FLOAT_DTYPES}
        manifest = WeightsManifest(version, buckets, total, ",".join(sorted(dtype_names)) or "none")
        if self.background:
            self.flush()  # the version before goes first (and its failure surfaces here)
            self._in_flight = self._thread.submit(self._put_and_register, manifest, packed, time.perf_counter() - t0)
            return PublishStats(version, time.perf_counter() - t0, total, len(buckets), None)
        # Checked once the gathers are over: under ZeRO-3 leaving early would strand the other ranks. ray.put
        # itself does not hang: a full store raises after its retries.
        if time.perf_counter() - t0 > self.timeout_s:
            raise WeightsTimeout(f"publishing weights version {version}: packing and putting {len(refs)}"
                                 f" buckets took longer than {self.timeout_s}s")
        kept = self._register(manifest, refs, t0)
        stats = PublishStats(version, time.perf_counter() - t0, total, len(buckets), len(kept))
        self._report(stats, {})
        return stats

    def _put_and_register(self, manifest: WeightsManifest, packed: list[np.ndarray], copy_s: float) -> None:
        """background: the object-store half of a publish, on the publish thread."""
        t0 = time.perf_counter()
        refs = []
        for buf in packed:
            try:
                refs.append(ray.put(buf))
            except Exception as exc:
                raise _put_failed(manifest.version, len(refs), buf, exc) from exc
        kept = self._register(manifest, refs, t0)
        stats = PublishStats(manifest.version, copy_s, manifest.total_bytes, len(packed), len(kept))
        self._report(stats, {"weights/put_s": time.perf_counter() - t0})

    def _register(self, manifest: WeightsManifest, refs: list[ray.ObjectRef], t0: float) -> list[int]:
        version = manifest.version
        pinned = list(self.pins()) if self.pins is not None else []
        left = max(self.timeout_s - (time.perf_counter() - t0), 1e-3)
        try:
            # refs travel inside a list, so Ray passes them as references (the registry borrows them).
            return ray.get(self.registry.register.remote(manifest, refs, pinned), timeout=left)
        except ray.exceptions.GetTimeoutError:
            raise WeightsTimeout(f"publishing weights version {version}: the registry did not acknowledge"
                                 f" within {self.timeout_s}s") from None
        except ray.exceptions.RayActorError as exc:
            raise WeightsError(f"publishing weights version {version}: the weight registry actor is gone"
                               f" ({type(exc).__name__})") from exc

    def _report(self, stats: PublishStats, extra: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics(stats.version, {"weights/publish_s": stats.seconds, "weights/bytes": float(stats.bytes),
                                         "weights/version": float(stats.version),
                                         "weights/kept": float(stats.kept or 0), **extra})
        log.debug("published weights v%d: %d bytes in %d buckets, %.3fs", stats.version, stats.bytes, stats.buckets,
                  stats.seconds)

    @staticmethod
    def _copy_alloc(copy: list[np.ndarray]) -> Callable[[int, int], np.ndarray]:
        """Bucket i of one host copy, grown when a bucket outgrows it (kept across publishes: no page faults)."""
        def alloc(i: int, size: int) -> np.ndarray:
            if i == len(copy):
                copy.append(np.empty(size, dtype=np.uint8))
            elif copy[i].size < size:
                copy[i] = np.empty(size, dtype=np.uint8)
            return copy[i]
        return alloc


def _put_failed(version: int, index: int, buf: np.ndarray, exc: Exception) -> WeightsError:
    failure = WeightsError(f"publishing weights version {version}: ray.put of bucket {index} ({buf.nbytes} bytes)"
                           f" failed: {type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure


__all__ = ["PublishStats", "WeightPublisher"]
