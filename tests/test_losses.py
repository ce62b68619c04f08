"""learner.losses: hand-computed cases, hypothesis properties, the released M2PO against a loop oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.losses import (
    LOG_RATIO_CLAMP,
    LOSS_NAMES,
    loss_defaults,
    m2po_dropped,
    m2po_threshold,
    m2po_trust_region_values,
    policy_loss,
    token_ids,
)

PROPS = settings(max_examples=30, deadline=None)


def _leaf(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).requires_grad_()


def _run(name, logp, blp, adv, mask, **params):
    """(loss, stats, grad wrt logp) for a leaf `logp`."""
    logp.grad = None
    loss, stats = policy_loss(name, logp, blp, adv, mask, **params)
    loss.backward()
    return loss.detach(), stats, logp.grad.clone()


def _batch(seed: int, B: int, T: int, scale: float, dtype=torch.float64):
    """GRPO-like random inputs: row-constant advantages (some rows 0), random valid lengths."""
    g = torch.Generator().manual_seed(seed)
    blp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (blp + torch.randn(B, T, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64) * (torch.rand(B, 1, generator=g) > 0.2)
    lengths = torch.randint(0, T + 1, (B, 1), generator=g)
    mask = torch.arange(T)[None, :] < lengths
    return logp, blp.to(dtype), adv.expand(B, T).to(dtype), mask


batches = st.builds(
    lambda seed, B, T, scale: (seed, B, T, scale),
    st.integers(0, 2**31 - 1),
    st.integers(1, 6),
    st.integers(1, 12),
    st.sampled_from([0.02, 0.1, 0.3, 1.0]),
)


# ------------------------------------------------------------------------------------ hand-computed
def test_m2po_hand_case():
    # One sequence, A = +1, log r = [.1, .2, .3, -.1, .5]: T = the four r > 1 tokens, (log r)^2 =
    # .01, .04, .09, .25; prefix means .01, .025, .0467 > .04 -> keep 2, drop the .3 and .5 tokens.
    lr = [0.1, 0.2, 0.3, -0.1, 0.5]
    logp = _leaf([lr])
    loss, stats, grad = _run("m2po", logp, torch.zeros(1, 5), torch.ones(1, 5), torch.ones(1, 5))
    kept_ratio = [math.exp(0.1), math.exp(0.2), 0.0, math.exp(-0.1), 0.0]
    assert loss.item() == pytest.approx(-sum(kept_ratio) / 5)
    assert grad[0].tolist() == pytest.approx([-x / 5 for x in kept_ratio])
    assert stats["masked_fraction"] == pytest.approx(2 / 5)
    assert stats["masked_fraction_pos"] == pytest.approx(2 / 5) and stats["masked_fraction_neg"] == 0
    assert stats["m2_before"] == pytest.approx(0.39 / 4) and stats["m2_after"] == pytest.approx(0.025)
    assert stats["trust_region_fraction"] == pytest.approx(4 / 5)
    assert stats["threshold"] == pytest.approx(0.09) and stats["tau"] == 0.04
    assert stats["ratio_max"] == pytest.approx(math.exp(0.5))
    assert stats["kl_k1"] == pytest.approx(-sum(lr) / 5)
    assert stats["kl_k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in lr) / 5)
    # With the tokens' entropy: the removed tokens' (the .3 and .5 ones) summed, and their count.
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    _, with_h = policy_loss("m2po", logp, torch.zeros(1, 5), torch.ones(1, 5), torch.ones(1, 5), entropy=entropy)
    assert with_h["removed_entropy"] == 8.0 and with_h["removed_tokens"] == 2
    assert "removed_entropy" not in stats


def test_m2po_negative_advantage_only_masks_r_below_one():
    # A = -1: T = {log r = -.3} only; (.3)^2 = .09 > .04 alone -> dropped. The +.4 token has the larger
    # (log r)^2 but is outside T, so it keeps its gradient.
    logp = _leaf([[-0.3, 0.4]])
    _, stats, grad = _run("m2po", logp, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2))
    assert grad[0, 0] == 0 and grad[0, 1].item() == pytest.approx(math.exp(0.4) / 2)
    assert stats["masked_fraction_neg"] == pytest.approx(0.5) and stats["m2_after"] == 0


def test_m2po_ties_are_dropped_one_at_a_time_the_later_token_first():
    # (log r)^2 = .01, v, v with v = .05: prefix means .01, .03 (<= .031), .0367 -> keep 2. Algorithm 1 removes
    # ONE of the tied v tokens (that leaves .03 <= tau): the later one (row, then position), in any order.
    v = math.sqrt(0.05)
    for order, dropped in (([0.1, v, v], 2), ([v, 0.1, v], 2), ([v, v, 0.1], 1)):
        logp = _leaf([order])
        _, _, grad = _run("m2po", logp, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3), tau=0.031)
        assert [g == 0 for g in grad[0].tolist()] == [i == dropped for i in range(3)]
    logp = _leaf([[v], [0.1], [v]])  # the same tokens in three rows: the last row's goes
    _, _, grad = _run("m2po", logp, torch.zeros(3, 1), torch.ones(3, 1), torch.ones(3, 1), tau=0.031)
    assert [g == 0 for g in grad[:, 0].tolist()] == [False, False, True]


def test_m2po_threshold_function():
    assert m2po_threshold(torch.tensor([0.01, 0.04, 0.09, 0.25]), 0.04)[0].item() == pytest.approx(0.09)
    assert m2po_threshold(torch.tensor([0.25, 0.01, 0.09, 0.04]), 0.04)[0].item() == pytest.approx(0.09)
    assert m2po_threshold(torch.tensor([0.01, 0.02]), 0.04)[0].item() == math.inf  # M2 <= tau: no-op
    assert m2po_threshold(torch.tensor([0.05]), 0.04)[0].item() == pytest.approx(0.05)  # drops it
    assert m2po_threshold(torch.empty(0), 0.04)[0].item() == math.inf
    assert m2po_threshold(torch.tensor([0.01, math.inf, math.inf]), 0.04)[0].item() == math.inf  # +inf padding


def test_m2po_drops_tied_values_one_at_a_time_the_larger_id_first():
    """Algorithm 1 removes one token at a time. [.01, .05, .05, .05] at tau .035: removing one .05 leaves M2
    .0367 > tau, a second leaves .03: two of the three tied .05s go, the one of smallest id stays (dropping all
    three, as a value threshold would, masks more than the algorithm)."""
    values = torch.tensor([0.05, 0.01, 0.05, 0.05], dtype=torch.float64)
    ids = torch.tensor([7, 3, 2, 9])
    t = m2po_threshold(values, 0.035, ids)
    assert t[0].item() == 0.05 and t[1].item() == 7  # the ties in id order: 2 (kept), 7, 9 (dropped)
    assert m2po_dropped(values, ids, t).tolist() == [True, False, False, True]
    perm = torch.tensor([2, 0, 3, 1])  # the order they arrive in does not matter, the ids do
    again = m2po_dropped(values[perm], ids[perm], m2po_threshold(values[perm], 0.035, ids[perm]))
    assert again.tolist() == m2po_dropped(values, ids, t)[perm].tolist()


def test_ppo_clip_hand_case():
    # (A, log r): (+1, .3) clipped at 1.2; (-1, -.3) clipped at .8; (+1, -.3), (-1, .3) not (no dual clip)
    logp = _leaf([[0.3, -0.3, -0.3, 0.3]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    loss, stats, grad = _run("ppo_clip", logp, torch.zeros(1, 4), adv, torch.ones(1, 4))
    assert loss.item() == pytest.approx((-1.2 + 0.8 - math.exp(-0.3) + math.exp(0.3)) / 4)
    assert grad[0].tolist() == pytest.approx([0, 0, -math.exp(-0.3) / 4, math.exp(0.3) / 4])
    assert stats["masked_fraction"] == 0.5 == stats["masked_fraction_pos"] == stats["masked_fraction_neg"]
    # clip-higher: e^.22 = 1.246 is clipped at eps_high .2 but not at DAPO's .28
    logp = _leaf([[0.22]])
    one = torch.ones(1, 1)
    assert _run("ppo_clip", logp, torch.zeros(1, 1), one, one)[1]["masked_fraction"] == 1
    _, stats, grad = _run("ppo_clip", logp, torch.zeros(1, 1), one, one, eps_high=0.28)
    assert stats["masked_fraction"] == 0 and grad.item() == pytest.approx(-math.exp(0.22))


def test_tis_and_cispo_hand_case():
    # gradient = -w A / n with w = min(r, 2) (tis) or clip(r, 0, 1.28) (cispo); no token loses it
    logp = _leaf([[math.log(3.0), math.log(1.1), math.log(0.5)]])
    adv = torch.tensor([[1.0, -2.0, 1.0]], dtype=torch.float64)
    blp, mask = torch.zeros(1, 3), torch.ones(1, 3)
    loss, stats, grad = _run("tis", logp, blp, adv, mask)
    assert grad[0].tolist() == pytest.approx([-2.0 / 3, 2 * 1.1 / 3, -0.5 / 3])
    surrogate = 2 * math.log(3) - 2 * 1.1 * math.log(1.1) + 0.5 * math.log(0.5)  # sum of w A logp
    assert loss.item() == pytest.approx(-surrogate / 3)
    assert stats["truncated_fraction"] == pytest.approx(1 / 3) and stats["masked_fraction"] == 0
    _, stats, grad = _run("cispo", logp, blp, adv, mask)
    assert grad[0].tolist() == pytest.approx([-1.28 / 3, 2 * 1.1 / 3, -0.5 / 3])


def test_gspo_hand_case():
    # row 0: s = exp(mean(.1, .3)) = e^.2 > 1 + 4e-4 with A = 1 -> clipped; value -(1 + 4e-4) per token.
    # row 1: s = exp(mean(1e-4, -1e-4)) = 1, A = -1 -> d loss / d logp_t = -A s / (D len) * len = 1 / D.
    logp = _leaf([[0.1, 0.3], [1e-4, -1e-4]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    loss, stats, grad = _run("gspo", logp, torch.zeros(2, 2), adv, torch.ones(2, 2))
    assert loss.item() == pytest.approx((2 * -(1 + 4e-4) + 2 * 1.0) / 4)
    assert grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.25, 0.25])
    assert stats["masked_fraction"] == 0.5 and stats["masked_fraction_pos"] == 1


def test_released_hand_cases():
    # sorted (log r)^2 = .01, .0361, .09, .25, budget .04 * 4 = .16: capped sums at each breakpoint
    # .04, .1183, .2261 -> the first to reach .16 is k = 2, so t^2 = .0361: |log r| = .3, .5 clipped.
    logp = _leaf([[0.1, 0.19, 0.3, 0.5]])
    one = torch.ones(1, 4)
    loss, stats, grad = _run("m2po_released", logp, torch.zeros(1, 4), one, one)
    assert stats["clip_log_bound"] == pytest.approx(0.19)
    assert grad[0, 0].item() == pytest.approx(-math.exp(0.1) / 4) and grad[0, 2:].tolist() == [0, 0]
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 3 * math.exp(0.19)) / 4, rel=1e-6)
    assert stats["m2_after"] == pytest.approx((0.01 + 3 * 0.0361) / 4)
    # even the smallest value breaks the budget (.25 >= .04): t = 0, all of T clipped (gradient 0)
    logp = _leaf([[0.5, 0.6, -0.7]])
    _, stats, grad = _run("m2po_released", logp, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3))
    assert stats["clip_log_bound"] == 0 and grad[0].tolist() == [0, 0, pytest.approx(-math.exp(-0.7) / 3)]
    # uncapped M2 over T = (3e-4 + .09) / 4 <= .04: no constraint, even on the .3 token
    logp = _leaf([[0.01, 0.01, 0.01, 0.3]])
    _, stats, grad = _run("m2po_released", logp, torch.zeros(1, 4), one, one)
    assert stats["clip_log_bound"] == math.inf and (grad != 0).all()


def test_clamp_is_counted_and_keeps_everything_finite():
    logp = _leaf([[25.0, -30.0, 0.1, 50.0]])
    mask = torch.tensor([[True, True, True, False]])
    for name in LOSS_NAMES:
        loss, stats, grad = _run(name, logp, torch.zeros(1, 4), torch.tensor([[1.0, -1.0, 1.0, 1.0]]), mask)
        assert stats["clamp_count"] == 2, name
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name
        assert stats["ratio_max"] == pytest.approx(math.exp(LOG_RATIO_CLAMP)), name


def test_bad_arguments_raise():
    x, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss("ppo", x, x, x, m)
    with pytest.raises(ValueError, match="eps_high"):
        policy_loss("m2po", x, x, x, m, eps_high=0.3)
    with pytest.raises(ValueError, match="shape"):
        policy_loss("m2po", x, x, x, m[:, :2])
    with pytest.raises(ValueError, match="denominator"):
        policy_loss("ppo_clip", x, x, x, m, denominator=0)
    assert loss_defaults("ppo_clip") == {"eps_low": 0.2, "eps_high": 0.2}


# ----------------------------------------------------------------------------------------- properties
def _trust_region(logp, blp, adv, mask):
    lr = logp.detach() - blp
    return mask & (((adv > 0) & (lr > 0)) | ((adv < 0) & (lr < 0))), lr.square()


@PROPS
@given(batches, st.sampled_from([0.0, 0.01, 0.04, 0.16]))
def test_m2po_selection_properties(b, tau):
    logp, blp, adv, mask = _batch(*b)
    loss, stats, grad = _run("m2po", logp, blp, adv, mask, tau=tau)
    region, sq = _trust_region(logp, blp, adv, mask)
    masked = mask & (adv != 0) & (grad == 0)
    assert not (masked & ~region).any()  # only trust-region tokens are masked
    kept = region & ~masked
    if kept.any():
        assert sq[kept].mean() <= tau * (1 + 1e-9)
        assert stats["m2_after"] == pytest.approx(sq[kept].mean().item())
    if masked.any():  # minimal: restoring any ONE dropped token (the smallest) breaks the budget
        assert torch.cat([sq[kept], sq[masked].min()[None]]).mean() > tau
    assert stats["masked_fraction"] == pytest.approx(masked.sum().item() / max(mask.sum().item(), 1))
    _, ntr_stats, ntr_grad = _run("no_trust_region", logp, blp, adv, mask)
    assert torch.allclose(grad[~masked], ntr_grad[~masked])  # elsewhere the same gradient as plain r*A
    if not region.any() or sq[region].mean() <= tau:  # no-op when M2 <= tau
        assert not masked.any() and stats["threshold"] == math.inf


@PROPS
@given(batches, st.integers(2, 4))
def test_m2po_global_threshold_makes_the_split_irrelevant(b, parts):
    logp, blp, adv, mask = _batch(*b)
    whole, _, whole_grad = _run("m2po", logp, blp, adv, mask)
    rows = torch.arange(logp.shape[0]).tensor_split(parts)
    T = logp.shape[1]
    pieces = [m2po_trust_region_values(logp[r], blp[r], adv[r], mask[r], token_ids(r, T)) for r in rows]
    values, ids = torch.cat([v for v, _ in pieces]), torch.cat([i for _, i in pieces])
    threshold, denominator = m2po_threshold(values, 0.04, ids), float(mask.sum().clamp(min=1))
    logp.grad = None
    total = sum(
        policy_loss("m2po", logp[r], blp[r], adv[r], mask[r], threshold=threshold, token_ids=token_ids(r, T),
                    denominator=denominator)[0]
        for r in rows
    )
    total.backward()
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    assert torch.allclose(logp.grad, whole_grad, atol=1e-15)


def _algorithm_1(values: torch.Tensor, ids: torch.Tensor, tau: float) -> set[int]:
    """The paper's loop, literally: while M2 > tau, remove the largest (log r)^2 (the larger id of a tie)."""
    kept = sorted(zip(values.tolist(), ids.tolist()))
    dropped = set()
    while kept and sum(v for v, _ in kept) / len(kept) > tau:
        dropped.add(kept.pop()[1])
    return dropped


@PROPS
@given(st.integers(0, 2**31 - 1), st.integers(1, 60), st.sampled_from([0.0, 0.01, 0.04, 0.16]), st.integers(1, 4))
def test_m2po_selection_is_algorithm_1_with_ties_in_any_split(seed, n, tau, parts):
    g = torch.Generator().manual_seed(seed)
    values = (torch.randint(0, 4, (n,), generator=g) * 0.1).double().square()  # 4 distinct values: many ties
    ids = torch.randperm(10 * n, generator=g)[:n]
    expected = _algorithm_1(values, ids, tau)
    threshold = m2po_threshold(values, tau, ids)
    assert set(ids[m2po_dropped(values, ids, threshold)].tolist()) == expected
    # Gathered in another order (another split over ranks / micro-batches): the same threshold, the same tokens.
    order = torch.cat([p.flip(0) for p in torch.randperm(n, generator=g).tensor_split(parts)])
    again = m2po_threshold(values[order], tau, ids[order])
    assert torch.equal(again, threshold)


@PROPS
@given(batches, st.sampled_from(["ppo_clip", "no_trust_region", "tis", "cispo", "gspo"]))
def test_global_denominator_makes_token_mean_losses_additive(b, name):
    logp, blp, adv, mask = _batch(*b)
    whole, _, whole_grad = _run(name, logp, blp, adv, mask)
    denominator = float(mask.sum().clamp(min=1))
    logp.grad = None
    halves = torch.arange(logp.shape[0]).tensor_split(2)
    total = sum(
        policy_loss(name, logp[r], blp[r], adv[r], mask[r], denominator=denominator)[0] for r in halves
    )
    total.backward()
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    assert torch.allclose(logp.grad, whole_grad, atol=1e-15)


@PROPS
@given(batches, st.sampled_from(LOSS_NAMES), st.integers(1, 3), st.integers(0, 2))
def test_padding_with_garbage_changes_nothing(b, name, extra_cols, extra_rows):
    logp, blp, adv, mask = _batch(*b)
    loss, stats, grad = _run(name, logp, blp, adv, mask)
    B, T = logp.shape
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -7.0])

    def pad(x, fill):
        size = (B + extra_rows) * (T + extra_cols)
        out = fill.repeat(size // len(fill) + 1)[:size].reshape(B + extra_rows, T + extra_cols).to(x.dtype)
        out[:B, :T] = x
        return out

    big = pad(logp.detach(), garbage).requires_grad_()
    big_mask = pad(mask, torch.tensor([False]))
    loss2, stats2, grad2 = _run(name, big, pad(blp, garbage.roll(1)), pad(adv, garbage.roll(2)), big_mask)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)
    assert torch.allclose(grad2[:B, :T], grad, atol=1e-15)
    assert (grad2[~big_mask] == 0).all()
    assert stats2 == pytest.approx(stats, nan_ok=True)


@PROPS
@given(batches, st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]))
def test_ppo_clip_fraction(b, eps):
    logp, blp, adv, mask = _batch(*b)
    _, stats, grad = _run("ppo_clip", logp, blp, adv, mask, eps_low=eps[0], eps_high=eps[1])
    r = (logp.detach() - blp).exp()
    clipped = mask & (((adv > 0) & (r > 1 + eps[1])) | ((adv < 0) & (r < 1 - eps[0])))
    assert stats["masked_fraction"] == pytest.approx(clipped.sum().item() / max(mask.sum().item(), 1))
    pos = mask & (adv > 0)
    pos_fraction = (clipped & pos).sum().item() / max(pos.sum().item(), 1)
    assert stats["masked_fraction_pos"] == pytest.approx(pos_fraction)
    assert ((grad == 0) & mask & (adv != 0)).eq(clipped).all()


@PROPS
@given(batches, st.sampled_from(LOSS_NAMES))
def test_dtypes(b, name):
    seed, B, T, scale = b
    logp16, blp, adv, mask = _batch(seed, B, T, scale, dtype=torch.bfloat16)
    loss16, stats16, grad16 = _run(name, logp16, blp, adv, mask)
    assert loss16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    # bfloat16 is computed in float32: identical to the float32 run on the same (rounded) values
    logp32 = logp16.detach().float().requires_grad_()
    loss32, stats32, grad32 = _run(name, logp32, blp.float(), adv.float(), mask)
    assert loss16.item() == loss32.item() and torch.equal(grad16, grad32.bfloat16())
    assert stats16 == pytest.approx(stats32, nan_ok=True)
    logp64 = logp32.detach().double().requires_grad_()
    loss64, _, _ = _run(name, logp64, blp.double(), adv.double(), mask)
    assert loss64.dtype == torch.float64 and loss64.item() == pytest.approx(loss32.item(), rel=1e-4, abs=1e-6)


# -------------------------------------------------------------------- released variant vs loop oracle
def released_oracle(old_log_prob, log_prob, advantages, response_mask, budget):
    """The released compute_m2po_policy_loss (miniclip off), transcribed as written: float32 tensors,
    trust-region values by row sign of column 0, the breakpoint loop with python floats, float32 bounds,
    max(-A r, -A clamp(r)) token-mean with verl's masked_mean (+1e-8)."""
    mask = response_mask.bool()
    adv_example = advantages[:, 0]
    delta = old_log_prob - log_prob
    ratio = torch.exp(-delta)
    chunks = []
    pos, neg = adv_example > 1e-12, adv_example < -1e-12
    chunks.append(delta.pow(2)[pos][(ratio[pos] > 1.0 + 1e-12) & mask[pos]])
    chunks.append(delta.pow(2)[neg][(ratio[neg] < 1.0 - 1e-12) & mask[neg]])
    values = torch.cat(chunks).detach()
    n = values.numel()
    tau = 100000
    if n > 0 and float(values.sum().item() / n) > budget + 1e-12:
        target = budget * float(n)
        ordered = torch.sort(values).values
        csum = torch.cumsum(ordered, dim=0)
        for k in range(n):
            if (ordered[k].item() - 1e-12) * (n - k - 1) + float(csum[k].item()) >= target - 1e-12:
                tau = 0.0 if k == 0 else float(ordered[k - 1].item() - 1e-12) ** 0.5
                break
    clip_low = 1 - float(torch.exp(torch.tensor(-tau)).item())
    clip_high = float(torch.exp(torch.tensor(tau)).item()) - 1
    ratio = torch.exp(log_prob - old_log_prob)
    losses = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    return (losses * response_mask).sum() / (response_mask.sum() + 1e-8), tau


def test_released_matches_loop_oracle():
    branches = set()
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        B, T = int(torch.randint(1, 7, (), generator=g)), int(torch.randint(1, 13, (), generator=g))
        scale = [0.05, 0.2, 0.5, 1.0][seed % 4]
        logp, blp, adv, mask = _batch(seed, B, T, scale, dtype=torch.float32)
        budget = [0.04, 0.01, 0.16][seed % 3]
        loss, stats, grad = _run("m2po_released", logp, blp, adv, mask, tau=budget)
        logp.grad = None
        ref, tau = released_oracle(blp, logp, adv, mask.float(), budget)
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7), seed
        assert torch.allclose(grad, logp.grad, rtol=1e-5, atol=1e-8), seed
        assert stats["clip_log_bound"] == (math.inf if tau == 100000 else pytest.approx(tau)), seed
        branches.add("none" if tau == 100000 else "zero" if tau == 0 else "breakpoint")
    assert branches == {"none", "zero", "breakpoint"}  # every branch of the solver was exercised


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_and_fully_masked_batches(name):
    # an uneven split can hand a rank no rows, or rows that are all padding: zero loss, a usable graph
    for B in (0, 2):
        logp = torch.zeros(B, 3, requires_grad=True)
        none = torch.zeros(B, 3, dtype=torch.bool)
        loss, stats = policy_loss(name, logp, torch.zeros(B, 3), torch.ones(B, 3), none)
        loss.backward()
        assert loss.item() == 0 and stats["valid_tokens"] == 0 and stats["masked_fraction"] == 0
        assert math.isnan(stats["ratio_p50"]) and (logp.grad == 0).all()
