"""Weights through the Ray object store: the bucket contract, the registry actor, publish -> fetch end to end.

Real Ray (one local instance for the module), a real DeepSpeed ZeRO-2 engine on CPU for the learner side.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from buffer.weights import ALIGN, WeightsError, WeightsManifest, WeightsTimeout, pack_buckets, unpack_bucket
from learner.publisher import WeightPublisher
from rollout_worker.weights import WeightsFetcher
from services.registry import WeightRegistry, get_registry, start_registry
from tests.buffer_helpers import make_group
from tests.ray_actors import kill_actor_and_wait

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "test-weights"


def _odd_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layouts that break naive byte copies: non-contiguous, 0-d, empty, an offset slice, plus an int."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g).to(dtype)
    return {
        "w": torch.randn(7, 5, generator=g).to(dtype),
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],  # non-contiguous with a storage offset
        "scalar": torch.tensor(3.25, dtype=dtype),  # 0-d
        "empty": torch.empty(0, 4, dtype=dtype),
        "ids": torch.arange(5, dtype=torch.int64),  # not floating point: keeps its dtype
    }


def _round_trip(tensors: dict[str, torch.Tensor], bucket_bytes: int, dtype=None, staging=None):
    out = {}
    for specs, buf in pack_buckets(tensors.items(), bucket_bytes, dtype, staging):
        buf = buf.copy()
        buf.setflags(write=False)  # what ray.get hands back
        out.update((n, t.clone()) for n, t in unpack_bucket(specs, buf))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip_is_exact(dtype):
    tensors = _odd_tensors(dtype)
    # one tensor per bucket, a few per bucket, all in one; a staging buffer reused by the buckets that fit
    for bucket_bytes, staging in [(1, None), (96, None), (1 << 20, None), (160, np.empty(160, np.uint8))]:
        out = _round_trip(tensors, bucket_bytes, staging=staging)
        assert list(out) == list(tensors)
        for name, t in tensors.items():
            assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
            assert torch.equal(out[name], t), name


def test_pack_converts_floats_to_the_travel_dtype_only():
    tensors = _odd_tensors(torch.float32)
    out = _round_trip(tensors, 1 << 20, dtype=torch.bfloat16)
    for name, t in tensors.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert out[name].dtype == want.dtype and torch.equal(out[name], want), name


def test_buckets_respect_the_size_bound():
    sizes = [10, 300, 5, 1000, 64, 64, 64, 2000, 1]  # float32 elements
    tensors = [(f"t{i}", torch.full((n,), float(i))) for i, n in enumerate(sizes)]
    bound = 1024
    buckets = list(pack_buckets(tensors, bound))
    assert [s.name for specs, _ in buckets for s in specs] == [n for n, _ in tensors]  # order kept
    for specs, buf in buckets:
        assert buf.dtype == np.uint8 and buf.ndim == 1
        if len(specs) > 1:
            assert buf.nbytes <= bound
        else:  # only a tensor bigger than a bucket may exceed the bound, alone
            assert buf.nbytes == specs[0].nbytes
        for a, b in zip(specs, specs[1:]):
            assert a.offset % ALIGN == 0 and a.offset + a.nbytes <= b.offset
    big = [specs for specs, _ in buckets if specs[0].nbytes > bound]
    assert [[s.name for s in b] for b in big] == [["t1"], ["t3"], ["t7"]]  # 1200, 4000, 8000 bytes: alone


def test_unpack_rejects_a_bucket_that_does_not_match():
    (specs, buf), = pack_buckets([("a", torch.ones(8)), ("b", torch.ones(8))], 1 << 20)
    with pytest.raises(WeightsError, match="b: bytes"):
        list(unpack_bucket(specs, buf[:-4]))


# ------------------------------------------------------------------------------------------- with Ray


_RAYLET_SHARED = """
import sys
from contextlib import ExitStack

import psutil

from services.config import load_config
from services.launcher import start_ray

cfg = load_config([], ["cluster.num_cpus=1", "cluster.object_store_gb=0.25", "cluster.prefault_object_store=" + sys.argv[1]])
with ExitStack() as stack:
    assert start_ray(cfg, stack)
    (raylet,) = [p for p in psutil.Process().children(recursive=True) if p.name() == "raylet"]
    print(raylet.memory_full_info().shared)
"""


@pytest.mark.parametrize("prefault", [True, False])
def test_a_prefaulted_local_object_store_is_resident_from_the_start(prefault):
    """cluster.prefault_object_store: the local Ray's store (in its raylet) is touched at start, so that puts
    do not page-fault (the weights' publish speed, docs/weights.md); without it the store is not resident."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", _RAYLET_SHARED, str(prefault).lower()], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    shared = int(out.stdout.split()[-1])
    assert (shared > 0.9 * 0.25e9) if prefault else (shared < 0.5 * 0.25e9), shared


def test_store_settings_are_refused_for_a_ray_that_is_already_there():
    from services.config import load_config
    from services.errors import NotStarted
    from services.launcher import start_ray

    cfg = load_config([], ["cluster.address=127.0.0.1:1", "cluster.prefault_object_store=true"])
    with pytest.raises(NotStarted, match="RAY_preallocate_plasma_memory=1"):  # before any connection is tried
        start_ray(cfg, contextlib.ExitStack())


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    if started:
        ray.shutdown()


_counter = iter(range(1_000_000))


@pytest.fixture
def registry(ray_local):
    """A fresh registry (keeping 3 versions) under its own name, killed afterwards."""
    name = f"weights-{next(_counter)}"
    handle = start_registry(3, namespace=NAMESPACE, name=name)
    # Up before the test starts: a new actor's process starts slowly on a loaded machine, and the tests' own
    # timeouts are about the calls, not that start.
    ray.get(handle.__ray_ready__.remote(), timeout=600)
    yield handle
    ray.kill(handle)


class Params(torch.nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))


def _fetch_all(fetcher: WeightsFetcher, version=None) -> tuple[int, dict[str, torch.Tensor]]:
    fetched = fetcher.fetch(version)
    return fetched.version, {n: t.clone() for n, t in fetched.tensors()}


@pytest.mark.slow
def test_publish_fetch_round_trip_through_ray(registry):
    fetcher = WeightsFetcher(registry, timeout_s=120)
    for version, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16], start=1):
        tensors = _odd_tensors(dtype)
        tensors["big"] = torch.randn(300_000).to(dtype)  # over the 1 MB bucket in float32: several buckets
        tensors["big2"] = torch.randn(1000, 300).to(dtype).t()
        published, fetched_metrics = [], []
        pub = WeightPublisher(registry, bucket_mb=1, metrics=lambda s, v, out=published: out.append((s, dict(v))))
        fetcher.metrics = lambda step, v, out=fetched_metrics: out.append((step, dict(v)))
        stats = pub.publish(Params(tensors), version=version)
        assert stats.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        assert stats.buckets >= (3 if dtype == torch.float32 else 2)

        assert fetcher.latest_version() == version
        got, out = _fetch_all(fetcher)
        assert got == version and list(out) == list(tensors)
        for name, t in tensors.items():
            assert out[name].dtype == t.dtype and torch.equal(out[name], t), (dtype, name)
        assert published == [(version, {"weights/publish_s": published[0][1]["weights/publish_s"],
                                        "weights/bytes": stats.bytes, "weights/version": version,
                                        "weights/kept": version})]  # keep_versions = 3: 1, 2, 3 kept
        assert [(step, sorted(v)) for step, v in fetched_metrics] == [
            (version, ["weights/bytes", "weights/fetch_s", "weights/version"])]


@pytest.mark.slow
def test_registry_keeps_the_last_k_and_serves_a_specific_version(registry):
    fetcher = WeightsFetcher(registry, timeout_s=120)
    assert fetcher.latest_version() == -1
    with pytest.raises(WeightsError, match="nothing has been published"):
        fetcher.fetch()
    model = Params({"w": torch.zeros(4, 4)})
    pub = WeightPublisher(registry, publish_every=2)
    for version in range(1, 10):
        with torch.no_grad():
            model.w.fill_(version)
        pub.maybe_publish(model, version)  # publishes the even versions only
    assert ray.get(registry.versions.remote()) == [4, 6, 8]  # keep_versions=3
    assert fetcher.latest_version() == 8
    for version in (4, 6, 8):
        got, out = _fetch_all(fetcher, version)
        assert got == version and torch.equal(out["w"], torch.full((4, 4), float(version)))
    with pytest.raises(WeightsError, match=r"version 2: not available.*keeps versions \[4, 6, 8\]"):
        fetcher.fetch(2)
    # A learner restarted from an older checkpoint publishes from there: newer versions are dropped.
    with torch.no_grad():
        model.w.fill_(-1)
    pub.publish(model, 6)
    assert ray.get(registry.versions.remote()) == [4, 6]
    assert torch.equal(_fetch_all(fetcher)[1]["w"], torch.full((4, 4), -1.0))


@pytest.mark.slow
def test_a_background_publish_ships_the_weights_of_its_version_in_order_and_surfaces_failures(registry):
    """publish() returns once the weights are copied to host memory; the put and the registration follow on a
    thread. The update after it may change the parameters at once: every version still ships its own values,
    the two host copies never mixed up, versions registered in order; a failure shows at the next call."""
    fetcher = WeightsFetcher(registry, timeout_s=120)
    model = Params({"a": torch.zeros(1000), "b": torch.zeros(300, 7)})
    reported = []
    pub = WeightPublisher(registry, bucket_mb=1, background=True, metrics=lambda s, v: reported.append((s, dict(v))))
    seen_latest = []
    for version in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(version)
        stats = pub.publish(model, version)
        assert stats.version == version and stats.kept is None  # the registry answers later
        with torch.no_grad():  # the next update, while the put may still run
            for p in model.parameters():
                p.fill_(-1)
        seen_latest.append(fetcher.latest_version())
    pub.flush()
    assert ray.get(registry.versions.remote()) == [3, 4, 5]  # keep_versions=3, registered in order
    # when publish(v) returns, v - 1 is registered (they go in order); v may or may not be yet
    assert all(version - 1 <= latest <= version for version, latest in zip(range(2, 6), seen_latest[1:]))
    for version in (3, 4, 5):
        got, out = _fetch_all(fetcher, version)
        assert got == version and all(torch.equal(t, torch.full_like(t, float(version))) for t in out.values())
    assert [s for s, _ in reported] == [1, 2, 3, 4, 5]
    assert all(v["weights/put_s"] > 0 and v["weights/kept"] == min(s, 3) for s, v in reported)
    kill_actor_and_wait(registry)
    pub.publish(model, 6)  # returns: the put and the registration have not run yet
    with pytest.raises(WeightsError, match="version 6: the weight registry actor is gone"):
        pub.flush()


@pytest.mark.slow
def test_fixed_staleness_keeps_two_weight_versions_whatever_s(ray_local, buffer_factory):
    """The paper's FIFO of rollouts: with s = 64, slot k is generated as soon as r(k) = k - 64 is published and
    waits in Redis until update k. The learner pins only the versions of slots not filled yet and runs update V
    only once the slots of older versions are filled, so the registry (keep_versions = 1) holds the newest version
    and at most the one before it, not s + 2 = 66 of them. A worker that falls behind makes the learner wait; the
    version it owes stays fetchable meanwhile."""
    s, batch = 64, 2
    buf = buffer_factory(policy="fixed", max_staleness=s, batch_groups=batch, capacity_groups=(s + 1) * batch)
    name = f"weights-{next(_counter)}"
    registry = start_registry(1, namespace=NAMESPACE, name=name)
    fetcher = WeightsFetcher(registry, timeout_s=120)
    pub = WeightPublisher(registry, pins=buf.pinned_versions)
    model = Params({"w": torch.zeros(4)})
    kept_per_version, required = {}, {}

    def generate() -> list[int]:  # a worker: every open slot, with the weights the admission names
        versions = []
        while (adm := buf.admit("w", batch)).granted:
            got, out = _fetch_all(fetcher, adm.required_version)
            assert got == adm.required_version and torch.equal(out["w"], torch.full((4,), float(got)))
            versions.append(got)
            for i in range(adm.granted):
                buf.push(make_group(got, slot=adm.slot, seed=1000 * adm.slot + i), "w")
        return versions

    late = s + 2  # the worker generates nothing while the learner is at this version
    try:
        for version in range(s + 8):
            buf.set_version(version)
            with torch.no_grad():
                model.w.fill_(version)
            pub.publish(model, version)
            kept_per_version[version] = ray.get(registry.versions.remote())
            if version == late + 1:  # update late + 1 waits: the slot of version `late` is owed
                assert buf.pull(batch, block_ms=0) == []
            required[version] = [] if version == late else generate()
            got = buf.pull(batch, block_ms=300)
            assert [(e.group.version_min, e.group.version_max) for e in got] == [(max(0, version - s),) * 2] * batch
            buf.ack([e.id for e in got])
    finally:
        ray.kill(registry)
    assert all(kept_per_version[v] == [v] for v in kept_per_version if v != late + 1), kept_per_version
    assert kept_per_version[late + 1] == [late, late + 1]  # the owed slot's version, still there...
    assert required[late + 1] == [late, late + 1]  # ...and generated by it once the worker is back
    assert required[0] == [0] * (s + 1) and required[1] == [1]  # slots 0..s at once, then one slot per version
    assert buf.stats().drops == {} and buf.pinned_versions() == []


def test_registry_rejects_refs_that_do_not_match_the_manifest(ray_local):
    registry = WeightRegistry(keep_versions=2)  # the actor's class, in process
    with pytest.raises(WeightsError, match="1 object refs for 2 buckets"):
        registry.register(WeightsManifest(1, [[], []], 0, "float32"), [ray.put(np.zeros(1, np.uint8))])
    with pytest.raises(WeightsError, match="must be ray.ObjectRef"):
        registry.register(WeightsManifest(1, [[]], 0, "float32"), [np.zeros(1, np.uint8)])
    assert registry.versions() == [] and registry.latest_version() == -1 and registry.get() is None


@ray.remote(num_cpus=0)
def _never_done(seconds: float) -> np.ndarray:
    time.sleep(seconds)
    return np.zeros(1, np.uint8)


@pytest.mark.slow
def test_a_publish_or_fetch_that_takes_too_long_raises(registry):
    pending = _never_done.remote(600)
    manifest = WeightsManifest(3, [[]], 0, "float32")
    ray.get(registry.register.remote(manifest, [pending]), timeout=120)
    fetched = WeightsFetcher(registry, timeout_s=120).fetch()  # the registry answers (however slowly)...
    fetched._refs.timeout_s = 0.5  # ...while the bucket never comes: only that wait is short, and it must time out
    with pytest.raises(WeightsTimeout, match=r"version 3, bucket 1/1: not available within 0.5s"):
        list(fetched.tensors())
    ray.cancel(pending, force=True)
    # A publish slower than its timeout is an error too, and registers nothing.
    with pytest.raises(WeightsTimeout, match=r"publishing weights version 4: packing and putting 1 buckets"):
        WeightPublisher(registry, timeout_s=1e-9).publish(Params({"w": torch.ones(3)}), 4)
    assert ray.get(registry.versions.remote(), timeout=120) == [3]


def test_a_dead_registry_is_a_clear_error(registry):
    name = ray.get(registry.__ray_call__.remote(lambda self: ray.get_runtime_context().get_actor_name()))
    assert get_registry(NAMESPACE, name)._actor_id == registry._actor_id
    kill_actor_and_wait(registry)
    fetcher = WeightsFetcher(registry, timeout_s=10)
    with pytest.raises(WeightsError, match="registry actor is gone"):
        fetcher.latest_version()
    with pytest.raises(WeightsError, match="registry actor is gone"):
        WeightPublisher(registry, timeout_s=10).publish(Params({"w": torch.ones(2)}), 1)
    with pytest.raises(WeightsError, match="no weight registry actor named 'absent'"):
        get_registry(NAMESPACE, "absent")


# ------------------------------------------------------------------------------ from a DeepSpeed engine


@pytest.fixture(scope="module")
def dist_world():
    """A gloo process group of one (the learner's single-process setup), torn down after the module."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    from learner.trainer import init_distributed

    created = not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if created:
        init_distributed()  # the learner's own: an in-memory rendezvous (no port), no unused DeepSpeed op built
    yield
    if created:
        dist.destroy_process_group()
        for k, v in saved.items():  # children of later tests must not inherit a rank of this process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def ds_engine(request, dist_world):
    """A real DeepSpeed engine (CPU, gloo) on a tiny random Qwen2, after one update."""
    import deepspeed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # persistence threshold 0: ZeRO-3 would otherwise keep these tiny parameters whole, never partitioned
    zero = {"stage": request.param, "stage3_param_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30})
    ids = torch.randint(0, 64, (2, 12))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return engine, initial


def _full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        return {n: p.detach().clone() for n, p in params}


@pytest.mark.slow
def test_publish_from_a_deepspeed_engine_gives_its_exact_parameters(registry, ds_engine):
    ds_engine, initial = ds_engine
    if ds_engine.zero_optimization_stage() == 3:  # the publisher must gather: nothing is whole at rest
        assert all(p.numel() == 0 for p in ds_engine.module.parameters())
    expected = _full_params(ds_engine)
    assert any(not torch.equal(initial[n], p) for n, p in expected.items())  # the update changed weights
    fetcher = WeightsFetcher(registry, timeout_s=120)

    WeightPublisher(registry, timeout_s=120).publish(ds_engine, version=1)
    version, out = _fetch_all(fetcher)
    assert version == 1 and list(out) == list(expected)
    for name, p in expected.items():
        assert out[name].dtype == torch.float32 and torch.equal(out[name], p), name

    # bf16 rollout in several buckets (the tiny model fits one bucket of 1 MB: use 4 KiB ones)
    publisher = WeightPublisher(registry, dtype="bfloat16", timeout_s=120)
    publisher.bucket_bytes = 4096
    publisher.publish(ds_engine, version=2)
    fetched = fetcher.fetch(2)
    assert len(fetched.manifest.buckets) > 3
    out = {n: t.clone() for n, t in fetched.tensors()}
    for name, p in expected.items():
        assert torch.equal(out[name], p.to(torch.bfloat16)), name
