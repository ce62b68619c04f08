"""The learner's batching and the DeepSpeed step: alignment, token budget, and split invariance of M2PO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from learner.advantages import grpo_advantages
from learner.batching import build_rows, collate, micro_batches, plan_micro_batches, shard_rows
from tests.learner_helpers import make_groups, tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    return build_rows(make_groups(6), version=0, advantage_fn=grpo_advantages)[0]


def test_collate_aligns_response_tensors_with_the_sequence(rows):
    mb = collate(rows[:5], version=3)
    for i, r in enumerate(rows[:5]):
        p, t = len(r.prompt_ids), len(r.response_ids)
        ids = mb.input_ids[i].numpy()
        assert (ids[:p] == r.prompt_ids).all() and (ids[p : p + t] == r.response_ids).all()
        assert mb.attention_mask[i].sum() == p + t and (ids[p + t :] == 0).all()
        assert int(mb.prompt_lens[i]) == p
        assert mb.mask[i].sum() == t and mb.mask[i, :t].all()
        assert np.allclose(mb.behaviour_logp[i, :t].numpy(), r.behaviour_logp)
        assert (mb.advantages[i, :t] == np.float32(r.advantage)).all()
        assert (mb.token_staleness[i, :t] == 3).all()  # groups are generated at version 0


def test_micro_batches_respect_the_token_budget_and_cover_every_row_once(rows):
    longest = max(r.length for r in rows)
    for budget in (longest, 2 * longest, 100, 10**6):
        mbs = micro_batches(rows, budget, version=0)
        seen = sorted(i for mb in mbs for i in mb.row_indices)
        assert seen == list(range(len(rows)))
        assert all(mb.padded_tokens <= budget for mb in mbs)
        assert sum(mb.num_tokens for mb in mbs) == sum(len(r.response_ids) for r in rows)
    assert len(micro_batches(rows, 10**6, 0)) == 1
    # Length-sorted: a micro-batch's rows are all at least as long as the next micro-batch's.
    mbs = micro_batches(rows, 100, 0)
    for a, b in zip(mbs, mbs[1:]):
        assert int(a.attention_mask.sum(1).min()) >= int(b.attention_mask.sum(1).max())


def test_planning_and_sharding_are_deterministic_and_order_free(rows):
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    plan = [[r.index for r in mb] for mb in plan_micro_batches(rows, 100)]
    assert plan == [[r.index for r in mb] for mb in plan_micro_batches(shuffled, 100)]
    shards = [shard_rows(shuffled, rank, 3) for rank in range(3)]
    assert sorted(r.index for s in shards for r in s) == list(range(len(rows)))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_empty_prompt_is_refused():
    group = make_groups(1)[0]
    bad = group.trajectories[0].model_copy(update={"prompt_ids": np.zeros(0, dtype=np.int32)})
    group = group.model_copy(update={"trajectories": [bad, *group.trajectories[1:]]})
    with pytest.raises(ValueError, match="empty prompt"):
        build_rows([group], 0, grpo_advantages)


def test_a_lone_response_counts_as_a_zero_group():
    group = make_groups(1)[0]
    group = group.model_copy(update={"trajectories": group.trajectories[:1]})
    rows, zero_groups = build_rows([group, *make_groups(2, seed=1)], 0, grpo_advantages)
    assert zero_groups == 1 and rows[0].advantage == 0.0
    assert any(r.advantage != 0.0 for r in rows[1:])


def _budget_for(rows, k: int) -> int:
    return next(b for b in range(max(r.length for r in rows), 10**5) if len(plan_micro_batches(rows, b)) == k)


@pytest.mark.slow
def test_m2po_step_is_split_invariant_and_matches_a_plain_torch_update(rows, tmp_path):
    """1, 2 and 4 micro-batches, 2 gloo ranks, ZeRO-3, and a loss head in chunks of 5 tokens: the same global
    M2PO mask, the same gradient (norm), the same parameters after the step, all equal to a whole-batch
    plain-torch AdamW update (its own log-probs from the full logits)."""
    from safetensors.torch import load_file

    model = tiny_model(tmp_path / "model")
    budgets = [10**6, _budget_for(rows, 2), _budget_for(rows, 4)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tests.learner_helpers", "invariance", str(model), str(tmp_path), "2"]
    subprocess.run(cmd + [str(b) for b in budgets], check=True, env=env, cwd=ROOT, timeout=540)

    ref = load_file(tmp_path / "reference.safetensors")
    ref_stats = json.loads((tmp_path / "reference.json").read_text())
    base = load_file(model / "model.safetensors")
    moved = max((ref[k] - base[k]).abs().max().item() for k in ref)
    assert moved > 5e-4  # the step did something (lr 1e-3): the comparisons below can fail
    assert 0 < ref_stats["loss/masked_tokens"]

    runs = {f"split-{b}": n for b, n in zip(budgets, (1, 2, 4))}
    runs |= {f"ranks2-{budgets[1]}": 2, f"zero3-{budgets[2]}": 4, f"chunk5-{budgets[0]}": 1}
    for name, n_micro in runs.items():
        stats = json.loads((tmp_path / f"{name}.json").read_text())
        params = load_file(tmp_path / f"{name}.safetensors")
        assert stats["learner/micro_batches"] == n_micro, name
        assert stats["loss/masked_tokens"] == ref_stats["loss/masked_tokens"], name
        assert stats["loss/masked_tokens"] < stats["m2po/trust_region_tokens"], name
        assert stats["policy/version"] == 1.0
        assert stats["grad/norm"] == pytest.approx(ref_stats["grad/norm"], rel=1e-4), name
        assert stats["loss/value"] == pytest.approx(ref_stats["loss/value"], rel=1e-4, abs=1e-6), name
        # Adam's first step is ~lr * sign(g): float noise on near-zero gradients moves a weight by a
        # fraction of lr, so compare at 1e-4 (a wrong mask or weighting moves many weights by ~2 lr).
        diff = max((params[k] - ref[k]).abs().max().item() for k in ref)
        assert diff < 1e-4, (name, diff)


@pytest.mark.parametrize("learner_version", [0, 3])
def test_the_mismatch_is_measured_only_on_fresh_tokens_and_absent_without_them(learner_version):
    """mismatch/abs_logp_diff: mean |log r| over staleness-0 tokens. Data from version 0 consumed at version 3
    has none: the metric is absent (0 would read "no mismatch"), and mismatch/tokens says it measured nothing."""
    import torch

    from learner.trainer import _Accumulator

    groups = make_groups(3, version=0)
    rows, _ = build_rows(groups, version=learner_version, advantage_fn=grpo_advantages)
    acc = _Accumulator("cpu")
    no_loss = {"masked_fraction": 0.0, "masked_fraction_pos": 0.0, "masked_fraction_neg": 0.0}
    tokens = 0
    for i, mb in enumerate(micro_batches(rows, 10**6, learner_version)):
        logp = mb.behaviour_logp + 0.01 * mb.mask  # the trainer's log-probs, 0.01 away from the engine's
        if i == 0:
            logp[tuple(mb.mask.nonzero()[0].tolist())] -= 0.05  # one token 0.04 the other way: the max is its 0.04
        acc.add_micro_batch(mb, logp, torch.zeros_like(logp), 0.0, no_loss)
        tokens += mb.num_tokens
    stats = acc.reduce()
    if learner_version == 0:
        assert stats["mismatch/tokens"] == tokens > 1
        assert stats["mismatch/abs_logp_diff"] == pytest.approx((0.01 * (tokens - 1) + 0.04) / tokens, rel=1e-4)
        assert stats["mismatch/max_abs_logp_diff"] == pytest.approx(0.04, rel=1e-4)
    else:
        assert stats["mismatch/tokens"] == 0
        assert "mismatch/abs_logp_diff" not in stats and "mismatch/max_abs_logp_diff" not in stats


def test_deepspeed_adamw_builds_past_the_lock_files_of_killed_builds(tmp_path):
    """learner.optimizer=deepspeed, cold, in a build root holding the lock files that builds killed mid-way leave
    (torch's FileBaton): the step runs (parameters move) with DeepSpeed's FusedAdam instead of polling for the
    lock forever, and the shared-memory comm op, which training never uses, is not built at all."""
    model = tiny_model(tmp_path / "model")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    cmd = [sys.executable, "-m", "tests.learner_helpers", "ds-ops", str(model), str(tmp_path / "out.json")]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=900)  # the old code waits forever: a failure here
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["optimizer"] == "FusedAdam" and out["changed"], out
    assert out["built"] == {"deepspeed_shm_comm": [], "fused_adam": ["fused_adam.so"]}, out
    assert out["locks"] == {"deepspeed_shm_comm": True, "fused_adam": False}, out  # the shm op's was never touched


def test_bf16_and_gradient_checkpointing_make_the_fp32_update(tmp_path):
    """The GPU configs' bf16 (DeepSpeed bf16: bf16 weights and activations, fp32 master weights) and gradient
    checkpointing, one step each on the same batch as float32. Checkpointing recomputes the same float32 math:
    the same parameters (measured: identical). bf16: the same M2PO mask (+-2 tokens), loss within 2%, gradient
    norm within 1%, and an update along the float32 one (measured: cosine 0.993, relative error 0.12, which
    includes rounding the updated weights to bf16); stated bounds: cosine >= 0.97, relative error <= 0.25."""
    import torch
    from safetensors.torch import load_file

    model = tiny_model(tmp_path / "model")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "tests.learner_helpers", "precision", str(model), str(tmp_path)],
                   check=True, env=env, cwd=ROOT, timeout=600)
    base = load_file(model / "model.safetensors")
    runs = {n: load_file(tmp_path / f"{n}.safetensors") for n in ("fp32", "gc", "bf16", "bf16-gc")}
    stats = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in runs}
    assert [stats[n]["gradient_checkpointing"] for n in runs] == [False, True, False, True]
    assert {str(t.dtype) for t in runs["bf16"].values()} == {"torch.bfloat16"}

    def update(name: str) -> torch.Tensor:
        return torch.cat([(runs[name][k].float() - base[k]).flatten() for k in base])

    fp32, bf16 = update("fp32"), update("bf16")
    assert fp32.abs().max() > 5e-4  # the step moved the weights (lr 1e-3)
    # Identical here; bounds that a different CPU's kernels (recompute vs first pass) cannot trip, a wrong
    # recomputation would (its update would be the wrong sign on many weights: ~2e-3 off, cosine far below 1).
    torch.testing.assert_close(update("gc"), fp32, rtol=0, atol=1e-6)
    assert torch.nn.functional.cosine_similarity(update("bf16-gc"), bf16, dim=0) >= 0.999
    assert abs(stats["bf16"]["loss/masked_tokens"] - stats["fp32"]["loss/masked_tokens"]) <= 2
    assert stats["bf16"]["loss/value"] == pytest.approx(stats["fp32"]["loss/value"], rel=2e-2)
    assert stats["bf16"]["grad/norm"] == pytest.approx(stats["fp32"]["grad/norm"], rel=1e-2)
    assert torch.nn.functional.cosine_similarity(bf16, fp32, dim=0) >= 0.97
    assert (bf16 - fp32).norm() / fp32.norm() <= 0.25
