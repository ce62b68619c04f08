"""Weights through the Ray object store: end-to-end bandwidth against a plain memory copy, per bucket size.

End to end = what one policy update costs: WeightPublisher.publish (pack into buckets, ray.put, register
with the WeightRegistry actor) + WeightsFetcher.fetch (ask the registry, ray.get each bucket) + copying every
tensor into the receiver's preallocated torch tensors (what a load in place does). Baseline, same run, same
bytes: copying every source tensor straight into the receiver tensors (memcpy). The figures are steady state:
publishing repeats every update, so every configuration is warmed up (keep_versions + 1 publishes) before the
timed repeats (median reported). Ray's store page-faults in every object it creates, warm or not, unless it was
touched at start: `--prefault` (cluster.prefault_object_store) measures that setting.

    .venv/bin/python benchmarks/weights.py [--sizes-mb 100 1000] [--bucket-mb 32 64 256] [--reps 5] [--prefault]

Prints one JSON object: per size and bucket size, GB/s end to end, of the fetch + load half alone (what a
rollout worker waits for), and of memcpy, with the ratios to memcpy. `learner_wait_s`: what an update waits for
with `weights.background=true` (the publish call returns once the weights are copied to host memory; the put and
the registration run on a thread), with its ratio to memcpy (1.0: the learner waits for one copy, no more).
`put_only_gbps`: ray.put of already-packed buckets alone, the object store's own speed, and the end-to-end
ratio it allows a publisher that would not pack (put + fetch and load): no publisher through Ray does better.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from learner.publisher import WeightPublisher  # noqa: E402
from rollout_worker.weights import WeightsFetcher  # noqa: E402
from services.registry import start_registry  # noqa: E402

KEEP_VERSIONS = 2


def transformer_like(target_mb: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Named tensors shaped like a Qwen2-style decoder (GQA attention, SwiGLU MLP, RMSNorm, untied head):
    hidden 1024 (~100 MB models) or 2048 (~1 GB), layers added until the target size is reached."""
    hidden, inter, kv, vocab = (1024, 2816, 256, 2048) if target_mb < 500 else (2048, 5632, 512, 16384)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    layer = 0
    elt = dtype.itemsize
    while sum(torch.Size(s).numel() for s in shapes.values()) * elt + vocab * hidden * elt < target_mb * 1e6:
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        }
        layer += 1
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return {name: torch.randn(shape, dtype=dtype) for name, shape in shapes.items()}


def as_module(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree whose named_parameters() are exactly these names and tensors (no copies)."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def bench(size_mb: int, bucket_mbs: list[int], reps: int, dtype: str, device: str = "cpu") -> dict:
    # float32, like the learner's master weights; on a GPU machine on the GPU, so that the baseline and the
    # publish both include the device-to-host copy
    source = {n: t.to(device) for n, t in transformer_like(size_mb).items()}
    receiver = {n: torch.empty_like(t, dtype=getattr(torch, dtype)) for n, t in source.items()}
    nbytes = sum(t.numel() * t.element_size() for t in receiver.values())  # bytes that travel
    model = as_module(source)

    def memcpy() -> float:
        t0 = time.perf_counter()
        for name, t in source.items():
            receiver[name].copy_(t)
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    memcpy()  # first touch of the receiver's pages
    registry = start_registry(KEEP_VERSIONS, name=f"bench-weights-{size_mb}")
    fetcher = WeightsFetcher(registry, timeout_s=600)
    version = 0
    rows = []
    for bucket_mb in bucket_mbs:
        publisher = WeightPublisher(registry, bucket_mb=bucket_mb, dtype=dtype, timeout_s=600)
        e2e, fetch_load, publish, memcpy_s = [], [], [], []
        for rep in range(KEEP_VERSIONS + 1 + reps):
            version += 1
            t0 = time.perf_counter()
            stats = publisher.publish(model, version)
            t1 = time.perf_counter()
            for name, t in fetcher.fetch(version).tensors():
                receiver[name].copy_(t)
            t2 = time.perf_counter()
            if rep > KEEP_VERSIONS:  # warmed up
                e2e.append(t2 - t0)
                fetch_load.append(t2 - t1)
                publish.append(t1 - t0)
                memcpy_s.append(memcpy())  # interleaved: both see the same machine load
        # it did move the weights
        assert all(torch.equal(receiver[n], t.to("cpu", receiver[n].dtype)) for n, t in source.items())
        background = WeightPublisher(registry, bucket_mb=bucket_mb, dtype=dtype, timeout_s=600, background=True)
        wait, memcpy_bg = [], []
        for rep in range(KEEP_VERSIONS + 1 + reps):
            version += 1
            t0 = time.perf_counter()
            background.publish(model, version)
            waited = time.perf_counter() - t0
            background.flush()  # here only to time each publish alone; a learner trains meanwhile
            if rep > KEEP_VERSIONS:
                wait.append(waited)
                memcpy_bg.append(memcpy())
        # The object store's own speed: ray.put of packed, warm buckets (what any publisher through it pays, a
        # bucket at a time; the registry still keeps its versions, as in steady state), and the end-to-end bound
        # it sets without the pack pass: put + fetch and load.
        warm = np.ones(min(bucket_mb << 20, nbytes), dtype=np.uint8)
        put_s = []
        for rep in range(KEEP_VERSIONS + 1 + reps):
            t0 = time.perf_counter()
            refs = [ray.put(warm) for _ in range(math.ceil(nbytes / warm.size))]
            if rep > KEEP_VERSIONS:
                put_s.append(time.perf_counter() - t0)
        del refs
        med = statistics.median
        # Ratios per repeat (memcpy measured right after it), then the median: the machine's load drifts.
        rows.append({
            "bucket_mb": bucket_mb,
            "buckets": stats.buckets,
            "publish_s": round(med(publish), 4),
            "fetch_load_s": round(med(fetch_load), 4),
            "e2e_gbps": gbps(nbytes, med(e2e)),
            "fetch_load_gbps": gbps(nbytes, med(fetch_load)),
            "memcpy_gbps": gbps(nbytes, med(memcpy_s)),
            "ratio_e2e_vs_memcpy": round(med(m / e for m, e in zip(memcpy_s, e2e)), 3),
            "ratio_fetch_load_vs_memcpy": round(med(m / f for m, f in zip(memcpy_s, fetch_load)), 3),
            "put_only_gbps": gbps(nbytes, med(put_s)),
            "bound_e2e_vs_memcpy_without_pack": round(med(memcpy_s) / (med(put_s) + med(fetch_load)), 3),
            "learner_wait_s": round(med(wait), 4),
            "ratio_memcpy_vs_learner_wait": round(med(m / w for m, w in zip(memcpy_bg, wait)), 3),
        })
    ray.kill(registry)
    best = max(rows, key=lambda r: r["ratio_e2e_vs_memcpy"])
    return {"size_mb": round(nbytes / 1e6, 1), "tensors": len(source), "best_bucket_mb": best["bucket_mb"],
            "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="rollout dtype; bfloat16: the baseline is the converting copy fp32 -> bf16")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the learner's weights live (auto: cuda when a GPU is visible)")
    parser.add_argument("--prefault", action="store_true",
                        help="touch the object store's memory at start (cluster.prefault_object_store), sized to"
                             " what the run keeps (8 of the largest model)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    store = dict(object_store_memory=8 * max(args.sizes_mb) << 20,
                 _system_config={"preallocate_plasma_memory": True}) if args.prefault else {}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}}, **store)
    try:
        results = [bench(size, args.bucket_mb, args.reps, args.dtype, device) for size in args.sizes_mb]
    finally:
        ray.shutdown()
    print(json.dumps({
        "benchmark": "weights",
        "what": "publish (pack, ray.put, register) + fetch via registry + copy into preallocated tensors,"
                " float32 learner weights, vs copying the same tensors directly (memcpy, converting when the"
                " rollout dtype differs); steady state, medians of reps",
        "rollout_dtype": args.dtype,
        "prefault_object_store": args.prefault,
        "device": device,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "torch_threads": torch.get_num_threads()},
        "keep_versions": KEEP_VERSIONS,
        "reps": args.reps,
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
