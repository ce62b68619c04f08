"""GRPO group-normalised advantages (DeepSeekMath, arXiv:2402.03300; as used by M2PO, arXiv:2510.01161)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> tuple[Tensor, int]:
    """rewards [G, n] (G prompts, n responses each) -> (advantages [G, n], zero_groups).

    A = (R - mean(R_group)) / (std(R_group) + eps), with the UNBIASED std (Bessel, n - 1): the official
    M2PO code (verl's compute_grpo_outcome_advantage) uses torch.std, whose default is unbiased, so the
    advantage scale matches the paper's runs (for n = 8 it is sqrt(7/8) ~ 0.94 of the biased version).
    Groups whose rewards are all equal carry no signal: their advantages are exactly 0 (not rounding
    noise divided by eps) and they are counted in `zero_groups`. Computed in >= float32.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        shape = tuple(rewards.shape)
        raise ValueError(f"rewards must be [G, n] with n >= 2 responses per prompt, got {shape}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    mean = r.mean(dim=1, keepdim=True)  # [G, 1]
    std = r.std(dim=1, keepdim=True, correction=1)  # [G, 1]
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # [G, 1]
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))
    return adv, int(flat.sum())
