"""Policy-gradient losses as pure tensor functions; one entry point for the trainer, tests and users.

    loss, stats = policy_loss(name, logp, behaviour_logp, advantages, mask, **params)

Shapes: B sequences, T response positions. Every input is [B, T]; positions where `mask` is False are
padding and may hold anything (NaN included): they never reach the loss, its gradient or the stats.
`loss` is a 0-d tensor to MINIMISE; `stats` is a dict of python floats (one device sync per call).

Token-mean losses divide the masked sum by the local count of valid tokens, or by `denominator` when
given: the trainer passes the valid-token count of the whole optimizer batch so that summing the
micro-batch losses gives the whole-batch loss whatever the split (all losses here, gspo included).

Notation: log r = logp - behaviour_logp (clamped to +-LOG_RATIO_CLAMP before exp, clamps counted),
r = exp(log r), A the advantage. Trust-region tokens T: (A > 0 and r > 1) or (A < 0 and r < 1).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: finite in float32/bfloat16, far beyond any sane ratio.
_QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class _Batch:
    """Sanitised inputs in the compute dtype; padding is 0 (log r, A, logp) and 1 (r)."""

    mask: Tensor  # [B, T] bool
    logp: Tensor  # [B, T] current log-probs, carries grad
    raw_log_r: Tensor  # [B, T] unclamped log r, no grad: (log r)^2 for the M2 selection
    log_r: Tensor  # [B, T] clamped log r, carries grad
    ratio: Tensor  # [B, T] exp(log_r), carries grad
    adv: Tensor  # [B, T] no grad
    clamped: Tensor  # [B, T] bool, valid tokens whose log r hit the clamp


# (per-token loss [B, T] with 0 at padding, gradient removed by the trust region [B, T] bool, extra stats)
_Out = tuple[Tensor, Tensor, dict[str, Tensor]]


def _prepare(logp: Tensor, behaviour_logp: Tensor, advantages: Tensor, mask: Tensor) -> _Batch:
    if not (logp.shape == behaviour_logp.shape == advantages.shape == mask.shape) or logp.ndim != 2:
        raise ValueError(
            f"expected four [B, T] tensors of one shape, got logp {tuple(logp.shape)}, behaviour_logp "
            f"{tuple(behaviour_logp.shape)}, advantages {tuple(advantages.shape)}, mask {tuple(mask.shape)}"
        )
    # bfloat16/float16 lose the small log-ratios M2PO works with: compute in float32 (float64 stays).
    dtype = torch.promote_types(logp.dtype, torch.float32)
    mask = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    # torch.where (not multiplication) so NaN/inf padding yields neither NaN values nor NaN gradients.
    lp = torch.where(mask, logp.to(dtype), zero)
    blp = torch.where(mask, behaviour_logp.detach().to(dtype), zero)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    raw = lp - blp
    log_r = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    raw = raw.detach()
    return _Batch(mask, lp, raw, log_r, log_r.exp(), adv, mask & (raw.abs() > LOG_RATIO_CLAMP))


def _trust_region(b: _Batch) -> Tensor:
    """[B, T] bool: tokens PPO's clip could act on, (A > 0 and r > 1) or (A < 0 and r < 1)."""
    return b.mask & (((b.adv > 0) & (b.raw_log_r > 0)) | ((b.adv < 0) & (b.raw_log_r < 0)))


def _surrogate(b: _Batch, clipped: Tensor, low: Tensor | float, high: Tensor | float) -> Tensor:
    """PPO's max(-A r, -A clip(r, low, high)) given which tokens take the clipped branch (zero gradient)."""
    return -b.adv * torch.where(clipped, b.ratio.detach().clamp(low, high), b.ratio)


# ---------------------------------------------------------------------------------------------- M2PO
TOKEN_ID_STRIDE = 1 << 20  # a token's id: its row's index in the optimizer batch x this + its response position


def token_ids(row_indices: Tensor | list[int], length: int) -> Tensor:
    """[B, T] int64: each token's id in the optimizer batch, (global row index, position) in one number: the
    order in which M2PO's selection breaks ties, the same whatever the micro-batch or rank split."""
    rows = torch.as_tensor(row_indices, dtype=torch.int64)
    return rows[:, None] * TOKEN_ID_STRIDE + torch.arange(length, dtype=torch.int64)[None, :]


@torch.no_grad()
def m2po_threshold(sq_logr: Tensor, tau: float, ids: Tensor | None = None) -> Tensor:
    """Drop threshold of M2PO's selection (arXiv:2510.01161, Algorithm 1) over a set of tokens.

    sq_logr: [N] the (log r)^2 of ALL trust-region tokens of the optimizer batch (gathered across
    micro-batches and ranks; +inf entries count as dropped, so padding with +inf is harmless). ids: [N] their
    token ids (`token_ids`; default: their order here).
    Algorithm 1 removes the token of largest (log r)^2, one at a time, until the M2 of the rest is <= tau. Equal
    values are removed in a fixed order, the larger id first (global row, then position), so the kept set is
    always a prefix of the tokens sorted by ((log r)^2, id): the longest prefix whose mean is <= tau (prefix
    means of an ascending sort never decrease). Returns [2] float64, (value, id) of the first dropped token: a
    token is dropped iff ((log r)^2, id) >= it (`m2po_dropped`); (+inf, +inf) when nothing is. Split-independent:
    the ids, not the order tokens arrive in, break ties. Sorts + cumsum, no per-token loop, no device sync.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    values = sq_logr.detach().reshape(-1).double()  # [N]
    n = values.numel()
    inf = torch.full((2,), math.inf, dtype=torch.float64, device=values.device)
    if n == 0:
        return inf
    ids = torch.arange(n, device=values.device) if ids is None else ids.reshape(-1).to(values.device)
    order = torch.argsort(ids, stable=True)
    order = order[torch.argsort(values[order], stable=True)]  # by value, then id
    values, ids = values[order], ids[order].double()  # ids < 2^53: exact in float64
    counts = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    within = values.cumsum(0) / counts <= tau  # [N] prefix mean <= tau
    keep = within.long().cumprod(0).sum()  # leading run: robust if rounding breaks monotonicity
    cut = keep.clamp(max=n - 1)
    return torch.where(keep < n, torch.stack([values[cut], ids[cut]]), inf)


def m2po_dropped(sq_logr: Tensor, ids: Tensor, threshold: Tensor) -> Tensor:
    """bool, the shape of sq_logr: ((log r)^2, id) >= (threshold value, threshold id), lexicographically."""
    value, first_id = threshold[0], threshold[1]
    sq = sq_logr.double()
    return (sq > value) | ((sq == value) & (ids.double() >= first_id))


@torch.no_grad()
def m2po_trust_region_values(
    logp: Tensor, behaviour_logp: Tensor, advantages: Tensor, mask: Tensor, ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """([N] the (log r)^2 of the trust-region tokens, [N] their ids), no grad, for the trainer to gather across the
    batch. ids: [B, T] (`token_ids`; default: row-major positions of this call)."""
    b = _prepare(logp, behaviour_logp, advantages, mask)
    region = _trust_region(b)
    if ids is None:
        ids = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape)
    return b.raw_log_r.square()[region], ids.to(mask.device)[region]


def _m2po(b: _Batch, tau: float = 0.04, threshold: Tensor | None = None, token_ids: Tensor | None = None) -> _Out:
    """M2PO as the paper states it (arXiv:2510.01161, Algorithm 1 and Eq. 5).

    J = (1 / #valid) sum_i M_i r_i A_i, r unclipped, M_i = 0 for the trust-region tokens dropped by the
    second-moment selection (see m2po_threshold), the denominator counting ALL valid tokens. `threshold`
    (from m2po_threshold over the whole optimizer batch, with `token_ids` [B, T] the ids it was chosen with)
    replaces the local selection so the update does not depend on the micro-batch/rank split.
    """
    sq = b.raw_log_r.square()  # [B, T]
    region = _trust_region(b)
    if token_ids is None:
        token_ids = torch.arange(sq.numel(), device=sq.device).reshape(sq.shape)
    token_ids = token_ids.to(sq.device)
    if threshold is None:
        threshold = m2po_threshold(sq[region], tau, token_ids[region])
    threshold = torch.as_tensor(threshold, dtype=torch.float64, device=sq.device)
    dropped = region & m2po_dropped(sq, token_ids, threshold)
    kept = region & ~dropped
    per_token = torch.where(dropped, torch.zeros_like(b.ratio), -b.adv * b.ratio)
    n_region = region.sum()
    extra = {
        "m2_before": sq.where(region, 0.0).sum() / n_region.clamp(min=1),
        "m2_after": sq.where(kept, 0.0).sum() / kept.sum().clamp(min=1),
        "trust_region_fraction": n_region / b.mask.sum().clamp(min=1),
        "tau": torch.tensor(tau, dtype=torch.float64),
        "threshold": threshold[0],
    }
    return per_token, dropped, extra


def _m2po_released(b: _Batch, tau: float = 0.04) -> _Out:
    """The released M2PO loss (Infini-AI-Lab/M2PO, verl/trainer/ppo/core_algos.py,
    compute_m2po_policy_loss with miniclip_low/high unset, as in its training scripts); our own code.

    Over the same trust region T it solves one scalar bound t: sort (log r)^2 ascending, k* = first k with
    (v_k - 1e-12)(n - k - 1) + sum_{j<=k} v_j >= tau n - 1e-12, t^2 = v_{k*-1} - 1e-12 (the breakpoint
    below the first one that breaks the capped-mean budget), t = 0 when k* = 0 (even the smallest value
    breaks it: all of T clipped), no constraint when the uncapped M2 over T is already <= tau + 1e-12.
    Then PPO's surrogate max(-A r, -A clip(r, e^-t, e^t)) (bounds rounded through float32 as there),
    token-mean over all valid tokens. Its gradient masks the tokens with |log r| > t, about twice as many
    as Algorithm 1 at the same tau. Computed PER MICRO-BATCH PER GPU because the reference is: its
    result depends on the split (use "m2po" for the batch-level selection). Differences: T uses each
    token's advantage sign (the reference reads column 0 of each row: equal for GRPO advantages); r is
    clamped at exp(+-20); a negative t^2 (the reference would fail on it) becomes 0.
    """
    sq = b.raw_log_r.square()  # [B, T]
    r = b.raw_log_r.exp()  # unclamped, as the reference selects on it
    region = b.mask & (((b.adv > 1e-12) & (r > 1.0 + 1e-12)) | ((b.adv < -1e-12) & (r < 1.0 - 1e-12)))
    n = region.sum()
    inf = torch.tensor(math.inf, dtype=sq.dtype, device=sq.device)
    # [BT + 1]: T first, then +inf (one always, so an empty batch still indexes)
    values = torch.cat([torch.sort(torch.where(region, sq, inf).reshape(-1)).values, inf[None]])
    csum = values.cumsum(0)
    m2_now = torch.where(region, sq, torch.zeros_like(sq)).sum() / n  # compute dtype, as the reference
    k = torch.arange(values.numel(), device=sq.device, dtype=torch.float64)
    rest = n.double() - k - 1
    breaks = (values.double() - 1e-12) * rest + csum.double() >= tau * n.double() - 1e-12
    breaks = (breaks & (k < n)) | (k == n - 1)  # the reference's loop always stops by k = n - 1
    k_star = breaks.long().argmax()  # first True
    below = values[(k_star - 1).clamp(min=0)].double()
    tau_sq = torch.where(k_star > 0, (below - 1e-12).clamp(min=0.0), torch.zeros_like(below))
    unconstrained = (n == 0) | (m2_now.double() <= tau + 1e-12)
    bound = torch.where(unconstrained, torch.full_like(tau_sq, math.inf), tau_sq.sqrt())
    # The reference maps t through torch.tensor(+-t) (float32) and exp, so the bounds are float32 values.
    low = torch.exp(-bound.float()).to(sq.dtype)
    high = torch.exp(bound.float()).to(sq.dtype)
    clipped = b.mask & (((b.adv > 0) & (b.ratio > high)) | ((b.adv < 0) & (b.ratio < low)))
    capped = torch.minimum(sq.double(), bound.square())  # the released M2: mean over T of min(v, t^2)
    extra = {
        "m2_before": torch.where(n > 0, m2_now, torch.zeros_like(m2_now)),
        "m2_after": capped.where(region, 0.0).sum() / n.clamp(min=1),
        "trust_region_fraction": n / b.mask.sum().clamp(min=1),
        "tau": torch.tensor(tau, dtype=torch.float64),
        "clip_log_bound": bound,
    }
    return _surrogate(b, clipped, low, high), clipped, extra


# ------------------------------------------------------------------------------------------ baselines
def _ppo_clip(b: _Batch, eps_low: float = 0.2, eps_high: float = 0.2) -> _Out:
    """GRPO's token-level PPO clip (PPO arXiv:1707.06347; GRPO arXiv:2402.03300), symmetric by default,
    no dual clip. eps_high = 0.28 is DAPO's clip-higher (arXiv:2503.14476). The gradient of a token is
    removed when its clipped branch is active: (A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low).
    """
    low, high = 1.0 - eps_low, 1.0 + eps_high
    clipped = b.mask & (((b.adv > 0) & (b.ratio > high)) | ((b.adv < 0) & (b.ratio < low)))
    return _surrogate(b, clipped, low, high), clipped, {}


def _no_trust_region(b: _Batch) -> _Out:
    """GRPO without a trust region (eps = inf), the paper's 'prosperity before collapse' baseline
    (arXiv:2510.01161): plain -r A."""
    return -b.adv * b.ratio, torch.zeros_like(b.mask), {}


def _tis(b: _Batch, cap: float = 2.0) -> _Out:
    """Truncated importance sampling: the policy gradient sg(min(r, cap)) A grad(log pi), as IMPALA's
    truncated weights (arXiv:1802.01561) and Yao et al. 2025's TIS for the rollout-engine/trainer mismatch
    (cap 2 there). Surrogate -sg(min(r, cap)) A logp; no token loses its gradient (weights are truncated)."""
    weight = b.ratio.detach().clamp(max=cap)
    return -weight * b.adv * b.logp, torch.zeros_like(b.mask), {"truncated_fraction": _frac(b, b.ratio > cap)}


def _cispo(b: _Batch, eps_low: float = 1.0, eps_high: float = 0.28) -> _Out:
    """CISPO (MiniMax-M1, arXiv:2506.13585, Eq. 4): -sg(clip(r, 1 - eps_low, 1 + eps_high)) A logp.
    The paper sets no lower bound (large eps_low, 1.0 here) and tunes eps_high; every token keeps its
    gradient, only its weight is clipped."""
    low, high = 1.0 - eps_low, 1.0 + eps_high
    weight = b.ratio.detach().clamp(low, high)
    truncated = (b.ratio > high) | (b.ratio < low)
    return -weight * b.adv * b.logp, torch.zeros_like(b.mask), {"truncated_fraction": _frac(b, truncated)}


def _gspo(b: _Batch, eps_low: float = 3e-4, eps_high: float = 4e-4) -> _Out:
    """GSPO (arXiv:2507.18071): sequence ratio s = exp(mean_t log r) over the valid tokens, PPO clip on s
    with the paper's eps (3e-4, 4e-4), A the sequence's mean advantage. Aggregated as a token mean like
    verl's token-mean mode (a sequence weighs its length; the paper's sequence mean is equal when lengths
    are), so the global `denominator` of valid tokens applies unchanged."""
    length = b.mask.sum(1).clamp(min=1)  # [B]
    s = (b.log_r.sum(1) / length).exp()  # [B] (padding holds 0)
    adv = b.adv.sum(1) / length  # [B]
    low, high = 1.0 - eps_low, 1.0 + eps_high
    seq_clipped = ((adv > 0) & (s > high)) | ((adv < 0) & (s < low))  # [B]
    per_seq = -adv * torch.where(seq_clipped, s.detach().clamp(low, high), s)  # [B]
    per_token = torch.where(b.mask, per_seq[:, None], torch.zeros_like(b.ratio))
    return per_token, b.mask & seq_clipped[:, None], {}


def _frac(b: _Batch, flags: Tensor) -> Tensor:
    return (flags & b.mask).sum() / b.mask.sum().clamp(min=1)


_LOSSES: dict[str, Callable[..., _Out]] = {
    "m2po": _m2po,
    "m2po_released": _m2po_released,
    "ppo_clip": _ppo_clip,
    "no_trust_region": _no_trust_region,
    "tis": _tis,
    "gspo": _gspo,
    "cispo": _cispo,
}
LOSS_NAMES = tuple(_LOSSES)


def loss_defaults(name: str) -> dict[str, object]:
    """The parameters `name` takes and their defaults (for validating a config's loss_params)."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
    params = list(inspect.signature(_LOSSES[name]).parameters.values())[1:]
    return {p.name: p.default for p in params}


# ------------------------------------------------------------------------------------------ entry point
def policy_loss(
    name: str,
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    denominator: float | Tensor | None = None,
    entropy: Tensor | None = None,
    **params: object,
) -> tuple[Tensor, dict[str, float]]:
    """The loss `name` (see LOSS_NAMES) on [B, T] inputs; returns (0-d loss to minimise, float stats).

    logp: current-policy log-probs of the response tokens (requires grad); behaviour_logp: under the
    policy that generated them; advantages: per token (GRPO broadcasts a sequence's value); mask: bool,
    the valid tokens. denominator: the sum's divisor (default: this call's valid-token count).
    entropy: [B, T] per-token entropy of the current policy, optional: the stats then include the entropy summed
    over the tokens the loss masked or clipped ("removed_entropy", the paper's diagnostic: which tokens lose their
    gradient) and their count ("removed_tokens").
    params: the loss's own, see loss_defaults(name). Any float dtype; computed in >= float32.
    """
    allowed = loss_defaults(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"loss {name!r} takes {sorted(allowed)}; unknown parameter(s) {unknown}")
    if isinstance(denominator, (int, float)) and not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    b = _prepare(logp, behaviour_logp, advantages, mask)
    per_token, removed, extra = _LOSSES[name](b, **params)
    if denominator is None:
        denominator = b.mask.sum().clamp(min=1)
    loss = per_token.sum() / denominator
    if entropy is not None:
        gone = removed & b.mask
        extra = {**extra, "removed_entropy": entropy.detach().double().where(gone, 0.0).sum(),
                 "removed_tokens": gone.sum()}
    return loss, _stats(b, removed, extra)


@torch.no_grad()
def _stats(b: _Batch, removed: Tensor, extra: dict[str, Tensor]) -> dict[str, float]:
    """All statistics as float64 tensors, moved to the host in ONE sync at the end."""
    m = b.mask
    pos, neg = m & (b.adv > 0), m & (b.adv < 0)
    n = m.sum().double()
    log_r = b.log_r.detach().double().where(m, 0.0)
    r = log_r.exp().where(m, 0.0)
    sorted_r = torch.sort(b.ratio.detach().double().where(m, math.inf).reshape(-1)).values
    sorted_r = torch.cat([sorted_r, sorted_r.new_full((1,), math.inf)])  # [BT + 1]: empty batches index
    out: dict[str, Tensor] = {
        "valid_tokens": n,
        "masked_fraction": (removed & m).sum() / n.clamp(min=1),
        "masked_fraction_pos": (removed & pos).sum() / pos.sum().clamp(min=1),
        "masked_fraction_neg": (removed & neg).sum() / neg.sum().clamp(min=1),
        "ratio_mean": r.sum() / n,
        "ratio_max": sorted_r[(n.long() - 1).clamp(min=0)],
        "kl_k1": -log_r.sum() / n,  # KL(behaviour || current) estimated on behaviour samples
        "kl_k3": (r - 1 - log_r).where(m, 0.0).sum() / n,
        "entropy_proxy": -b.logp.detach().double().where(m, 0.0).sum() / n,
        "ess_fraction": r.sum().square() / (n * r.square().sum()),  # (sum r)^2 / (n sum r^2), 1 = uniform
        "clamp_count": b.clamped.sum(),
    }
    for q in _QUANTILES:  # linear interpolation between order statistics, like torch.quantile
        at = q * (n - 1).clamp(min=0)
        lo, hi = at.floor().long(), at.ceil().long()
        out[f"ratio_p{round(q * 100)}"] = sorted_r[lo] + (sorted_r[hi] - sorted_r[lo]) * (at - lo)
    out.update(extra)
    values = torch.stack([v.detach().double().reshape(()).to(n.device) for v in out.values()]).tolist()
    stats = dict(zip(out, values))
    if stats["valid_tokens"] == 0:  # nothing to describe: ratio/KL statistics are undefined
        for key in ("ratio_mean", "ratio_max", "kl_k1", "kl_k3", "entropy_proxy", "ess_fraction"):
            stats[key] = math.nan
        for q in _QUANTILES:
            stats[f"ratio_p{round(q * 100)}"] = math.nan
    return stats
