"""The loss head: each taken token's log-prob (and the entropy) from the final hidden states, chunk by chunk.

The vocabulary projection is the learner's largest activation: N valid tokens x V logits (V = 151,936 for Qwen)
in fp32, and their log-softmax, and the gradient of each, all alive at once (~15 GB at 8k tokens). With
`chunk_tokens` = C, each chunk of C tokens is projected and reduced on its own, and its forward is recomputed in
the backward (torch.utils.checkpoint), so only [C, V] tensors are alive at a time: peak memory follows C, not N.
The results and gradients are those of the whole-batch computation (float64 test in tests/test_head.py);
`benchmarks/learner_memory.py` measures the peak.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _token_logp(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(hidden).float()  # [C, V]
    if temperature != 1.0:
        logits = logits / temperature  # the density the tokens were sampled from (docs/rollout.md)
    logsm = torch.log_softmax(logits, dim=-1)  # [C, V]
    logp = logsm.gather(-1, tokens[:, None]).squeeze(-1)  # [C]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logsm.exp() * logsm).sum(-1)  # [C]
    return logp, entropy


def token_logp(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
               chunk_tokens: int = 0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens[i] | hidden[i]) under head(hidden) / temperature: [N], and the entropy [N] (no grad).

    hidden: [N, H] (the positions that predict `tokens`), tokens: [N]. chunk_tokens 0 (or >= N): one piece."""
    n = hidden.shape[0]
    if chunk_tokens <= 0 or chunk_tokens >= n:
        return _token_logp(head, hidden, tokens, temperature, with_entropy)
    pieces = [
        checkpoint(_token_logp, head, hidden[i : i + chunk_tokens], tokens[i : i + chunk_tokens], temperature,
                   with_entropy, use_reentrant=False)
        for i in range(0, n, chunk_tokens)
    ]
    logp = torch.cat([p for p, _ in pieces])
    return logp, torch.cat([e for _, e in pieces]) if with_entropy else None
