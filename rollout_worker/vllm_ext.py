"""A vLLM worker extension that loads new policy weights into a running engine, in place.

vLLM mixes this class into its worker (`LLM(..., worker_extension_cls="rollout_worker.vllm_ext.WeightUpdateExtension")`)
so `llm.collective_rpc("staleflow_load_weights", ...)` runs `load_weights_inplace` next to the model.

Why not a plain `reload_weights`: vLLM's layer-wise reload copies checkpoint tensors into the parameters and
re-runs the post-load processing of the layers it tracks, but on the CPU build the vocab embedding / lm_head
keeps a pre-packed GEMM copy made at start-up (`dispatch_cpu_unquantized_gemm`); without re-running
`process_weights_after_loading` on every `VocabParallelEmbedding` the logits stay those of the OLD weights.
On GPU that re-run is a no-op for unquantized embeddings, so one code path serves both builds.

Pinned to vLLM 0.32/0.33 internals (`Worker.reload_weights(weights_iterator=, is_checkpoint_format=)`);
tests/test_engine.py compares greedy output after an update against transformers to catch a regression.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def _from_safetensors(blob: bytes) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    yield from load(blob).items()


class WeightUpdateExtension:
    """Methods added to vLLM's worker. `self` is the worker (it has `reload_weights`, `model_runner`)."""

    def staleflow_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | bytes) -> int:
        """Load checkpoint-format weights; `weights` is (name, tensor) pairs (in-process engine) or
        safetensors bytes (engine core in another process: collective_rpc would turn tensors into lists).
        Returns the number of tensors loaded."""
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        pairs = _from_safetensors(bytes(weights)) if isinstance(weights, (bytes, bytearray, memoryview)) else weights
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, tensor in pairs:
                count += 1
                yield name, tensor

        self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        model = self.model_runner.get_model()
        for module in model.modules():
            if isinstance(module, VocabParallelEmbedding):
                module.quant_method.process_weights_after_loading(module)
        return count


def to_safetensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Pack (name, tensor) pairs for the out-of-process path."""
    from safetensors.torch import save

    return save({name: t.detach().contiguous().cpu() for name, t in named_tensors})


__all__ = ["WeightUpdateExtension", "to_safetensors"]
