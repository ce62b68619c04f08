"""The chunked loss head (learner/head.py) computes what the whole-batch head computes: the same log-probs,
entropies and gradients (of the hidden states and of the projection), in float64 so that only a real difference
shows; and the trainer's DeepSpeed step with a chunked head is in tests/test_trainer.py's invariance test."""

from __future__ import annotations

import pytest
import torch

from learner.head import token_logp


@pytest.mark.parametrize("chunk", [1, 7, 64, 299])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunks_give_the_whole_heads_values_and_gradients(chunk, temperature):
    gen = torch.Generator().manual_seed(0)
    n, h, v = 300, 16, 1000
    head = torch.nn.Linear(h, v, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=gen, dtype=torch.float64))
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, v, (n,), generator=gen)
    weights = torch.randn(n, generator=gen, dtype=torch.float64)  # a loss that weighs each token differently

    results = {}
    for c in (0, chunk):
        head.zero_grad()
        x = hidden.clone().requires_grad_(True)
        logp, ent = token_logp(head, x, tokens, temperature=temperature, chunk_tokens=c, with_entropy=True)
        (logp * weights).sum().backward()
        results[c] = (logp.detach(), ent, x.grad, head.weight.grad.clone())
    whole, chunked = results[0], results[chunk]
    assert whole[0].shape == whole[1].shape == (n,)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert whole[3].abs().max() > 1e-3 and not ent.requires_grad  # gradients flowed; the entropy has none


def test_without_entropy_none_comes_back():
    head = torch.nn.Linear(4, 10, bias=False)
    logp, ent = token_logp(head, torch.randn(9, 4), torch.arange(9), chunk_tokens=2)
    assert ent is None and logp.shape == (9,) and bool((logp <= 0).all())
