"""Fetching published weights on a rollout worker: ask the registry, then stream the buckets from the object
store.

    fetcher = WeightsFetcher(registry, timeout_s=cfg.weights.timeout_s, metrics=log_metrics)
    if fetcher.latest_version() > engine.version:
        fetched = fetcher.fetch()                                  # newest; fetch(version=v) in fixed mode
        engine.update_weights(fetched.tensors(), fetched.version)  # consumes (name, tensor) bucket by bucket

The rollout worker hands `fetched.refs()` to its engine instead: the references travel to each of the engine's
processes (one, or tensor_parallel_size of them), and each pulls the buckets itself (WeightRefs.tensors()).
`tensors()` yields zero-copy, read-only views over the object-store buffers, one bucket at a time: only the
bucket being loaded (plus the next one, prefetched) is held, never a second full copy of the model. The
consumer must copy each tensor (load it) and not keep or write to it. Every Ray wait has a timeout, so a
dead registry or a lost object raises WeightsError/WeightsTimeout naming the version and the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from buffer.weights import WeightsError, WeightsManifest, WeightsTimeout, unpack_bucket

MetricsLogger = Callable[[int, Mapping[str, float]], None]


def _ask(call: Any, what: str, timeout_s: float) -> Any:
    """ray.get on a registry call, with its failures turned into our errors."""
    try:
        return ray.get(call, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise WeightsTimeout(f"{what}: the weight registry did not answer within {timeout_s}s") from None
    except ray.exceptions.RayActorError as exc:
        raise WeightsError(f"{what}: the weight registry actor is gone ({type(exc).__name__})") from exc


@dataclass
class WeightRefs:
    """A version's manifest and bucket references: what travels to the engine's processes, not the bytes. Each
    process that iterates `tensors()` pulls the buckets from its own node's object store (Ray moves an object to a
    node once, however many processes there read it): a tensor-parallel engine's processes each load their shard
    from the same local copy."""

    manifest: WeightsManifest
    refs: list[ray.ObjectRef]
    timeout_s: float

    @property
    def version(self) -> int:
        return self.manifest.version

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, bucket by bucket, in the publisher's order; iterate once."""
        refs, self.refs = self.refs, []  # drop our refs as we go, so loaded buckets can be freed
        if not refs and self.manifest.buckets:
            raise WeightsError(f"weights version {self.version}: tensors() can be iterated only once")
        n = len(refs)
        for i in range(n):
            if i + 1 < n:
                # Start pulling the next bucket to this node while the caller loads this one (no-op if local).
                ray.wait([refs[i + 1]], timeout=0, fetch_local=True)
            buf = self._get(refs[i], i, n)
            refs[i] = None
            expected = self.manifest.bucket_nbytes(i)
            if buf.nbytes != expected:
                raise WeightsError(f"weights version {self.version}: bucket {i} has {buf.nbytes} bytes, the"
                                   f" manifest says {expected}")
            yield from unpack_bucket(self.manifest.buckets[i], buf)
            del buf

    def _get(self, ref: ray.ObjectRef, i: int, n: int) -> np.ndarray:
        what = f"weights version {self.version}, bucket {i + 1}/{n}"
        try:
            buf = ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WeightsTimeout(f"fetching {what}: not available within {self.timeout_s}s") from None
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            raise WeightsError(f"fetching {what}: the object is lost (was the learner that published it"
                               f" restarted?): {type(exc).__name__}") from exc
        except ray.exceptions.RayError as exc:
            raise WeightsError(f"fetching {what}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(buf, np.ndarray):
            raise WeightsError(f"fetching {what}: expected a numpy uint8 array, got {type(buf).__name__}")
        return buf


class FetchedWeights:
    """One version on its way in: `manifest` now; then either `refs()`, the references to hand to an engine
    whose processes pull the buckets themselves (the rollout worker's path), or `tensors()` here. Once."""

    def __init__(self, manifest: WeightsManifest, refs: list[ray.ObjectRef], timeout_s: float,
                 metrics: MetricsLogger | None):
        self.manifest = manifest
        self.version = manifest.version
        self._refs: WeightRefs | None = WeightRefs(manifest, refs, timeout_s)
        self._metrics = metrics
        self.seconds: float | None = None  # fetch + load time, set when tensors() is exhausted

    def refs(self) -> WeightRefs:
        if self._refs is None:
            raise WeightsError(f"weights version {self.version}: already handed out")
        refs, self._refs = self._refs, None
        return refs

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, bucket by bucket, in the publisher's order."""
        t0 = time.perf_counter()
        yield from self.refs().tensors()
        self.seconds = time.perf_counter() - t0
        if self._metrics is not None:
            self._metrics(self.version, {"weights/fetch_s": self.seconds,
                                         "weights/bytes": float(self.manifest.total_bytes),
                                         "weights/version": float(self.version)})


class WeightsFetcher:
    """A rollout worker's view of the weight registry. `registry` is the WeightRegistry actor handle."""

    def __init__(self, registry: Any, *, timeout_s: float = 120.0, metrics: MetricsLogger | None = None):
        self.registry = registry
        self.timeout_s = timeout_s
        self.metrics = metrics

    def latest_version(self) -> int:
        """The newest published version, -1 if none yet (one tiny actor call)."""
        return _ask(self.registry.latest_version.remote(), "asking for the latest weights", self.timeout_s)

    def fetch(self, version: int | None = None) -> FetchedWeights:
        """The given version (None: the newest). WeightsError if it was never published or is evicted."""
        label = "the newest weights" if version is None else f"weights version {version}"
        entry = _ask(self.registry.get.remote(version), f"fetching {label}", self.timeout_s)
        if entry is None:
            kept = _ask(self.registry.versions.remote(), f"fetching {label}", self.timeout_s)
            if version is None:
                raise WeightsError("fetching the newest weights: nothing has been published yet")
            raise WeightsError(f"fetching weights version {version}: not available (evicted or never"
                               f" published); the registry keeps versions {kept}")
        manifest, refs = entry
        return FetchedWeights(manifest, list(refs), self.timeout_s, self.metrics)


__all__ = ["FetchedWeights", "WeightRefs", "WeightsFetcher"]
