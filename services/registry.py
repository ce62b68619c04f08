"""The weight registry: a small named Ray actor that knows which policy versions exist and where their bytes
are.

The learner registers (manifest, object refs) after each publish; rollout workers ask `latest_version()` (an
int, cheap to poll) and `get(version)` for the refs, then pull the buckets straight from the object store
(the bytes never pass through this actor). The registry holds the refs, which keeps the objects alive, for the
last `keep_versions` versions and for the versions the publisher pins: under the `fixed` staleness rule those
whose slots are not filled yet (buffer/staleness.py: the paper's FIFO keeps rollouts, not weights). Evicting a
version drops its refs and Ray frees the objects once no worker still reads them.

The learner owns the objects it puts (Ray 2.56 removed `ray.put(..., _owner=)`): if the learner process dies,
its versions are lost and fetching them raises WeightsError; the restarted learner publishes again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection

import ray

from buffer.weights import WeightsError, WeightsManifest

log = logging.getLogger(__name__)

REGISTRY_NAME = "staleflow-weights"


class WeightRegistry:
    """Keeps (manifest, refs) of the last `keep_versions` published versions and of the pinned ones. Run it as a
    Ray actor."""

    def __init__(self, keep_versions: int = 4):
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.keep_versions = keep_versions
        self._versions: OrderedDict[int, tuple[WeightsManifest, list[ray.ObjectRef]]] = OrderedDict()

    def register(self, manifest: WeightsManifest, refs: list[ray.ObjectRef], pinned: Collection[int] = ()) -> list[int]:
        """Add a version. One ref per bucket. A version at or below the latest rewinds history: a learner
        restarted from an older checkpoint publishes again from there, and versions after it are dropped.
        Then evict every version that is neither among the newest `keep_versions` nor `pinned` (still needed by
        a producer). Returns the versions kept, oldest first."""
        if len(refs) != len(manifest.buckets):
            raise WeightsError(
                f"version {manifest.version}: {len(refs)} object refs for {len(manifest.buckets)} buckets"
            )
        if not all(isinstance(r, ray.ObjectRef) for r in refs):
            raise WeightsError(f"version {manifest.version}: refs must be ray.ObjectRef")
        dropped = [v for v in self._versions if v >= manifest.version]
        for v in dropped:
            del self._versions[v]
        if dropped:
            log.warning("weights version %d registered again: dropped versions %s", manifest.version, dropped)
        self._versions[manifest.version] = (manifest, list(refs))
        keep = set(list(self._versions)[-self.keep_versions :]) | set(pinned)
        for v in [v for v in self._versions if v not in keep]:
            del self._versions[v]  # Ray frees its objects once no worker still holds their refs
        return list(self._versions)

    def latest_version(self) -> int:
        """The newest registered version, or -1 if none yet."""
        return next(reversed(self._versions), -1)

    def get(self, version: int | None = None) -> tuple[WeightsManifest, list[ray.ObjectRef]] | None:
        """(manifest, refs) of `version` (None: the newest); None if never published or evicted."""
        if version is None:
            version = self.latest_version()
        return self._versions.get(version)

    def versions(self) -> list[int]:
        """The versions kept, oldest first."""
        return list(self._versions)


def start_registry(keep_versions: int, namespace: str | None = None, name: str = REGISTRY_NAME):
    """The run's registry actor: created (or, if it already runs in `namespace`, joined) under `name`.

    num_cpus=0: it only does bookkeeping and must not take a CPU slot from the learner or a worker. It dies
    with the driver that created it, like the rest of the run.
    """
    actor = ray.remote(num_cpus=0, max_restarts=0)(WeightRegistry)
    return actor.options(name=name, namespace=namespace, get_if_exists=True).remote(keep_versions)


def get_registry(namespace: str | None = None, name: str = REGISTRY_NAME):
    """The handle of a running registry (e.g. from a rollout worker's process); WeightsError if none."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise WeightsError(f"no weight registry actor named {name!r} in namespace {namespace!r}") from None


__all__ = ["REGISTRY_NAME", "WeightRegistry", "get_registry", "start_registry"]
