"""The DeepSpeed training step: one optimizer update (= one policy version) per batch of trajectory groups.

Split invariance is the design constraint. Every loss is a token sum divided by the GLOBAL valid-token count
(`denominator=`), and each micro-batch's loss is multiplied by the data-parallel world size before backward:
DeepSpeed averages gradients over ranks and, with `scale_wrt_gas=False`, does not divide by its accumulation
steps, so the accumulated, averaged gradient is exactly the gradient of the whole-batch loss. For M2PO the
drop threshold is chosen once over the whole batch: a no-grad pass collects the trust-region (log r)^2 of every
micro-batch on every rank (all-gathered, sizes vary), `m2po_threshold` picks one threshold, and the grad pass
masks with it. Hence: same mask, same update, whether the batch runs as 1, 2 or 4 micro-batches or on 2 ranks.

Every rank is handed the same global list of groups and trains on its own deterministic shard; ranks with
fewer micro-batches run zero-loss dummy micro-batches so that ZeRO's per-backward collectives line up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from buffer.trajectory import TrajectoryGroup
from learner.batching import MicroBatch, Row, build_rows, micro_batches, shard_rows
from learner.config import LearnerConfig
from learner.ds_ops import load_op, optimizer_op, skip_unused_ops
from learner.head import token_logp
from learner.losses import token_ids

_STALENESS_HIST_BINS = 16  # staleness/hist: counts for 0..15, the last bin also holds anything staler


def init_distributed(store: dist.Store | None = None, rank: int = 0, world_size: int = 1) -> None:
    """Join a process group: through `store` (ranks started by services, which hands rank 0's TCPStore address to
    the others), through a launcher's RANK/WORLD_SIZE/MASTER_* environment, or else as a world of one."""
    if dist.is_initialized():
        return
    import deepspeed

    skip_unused_ops()  # the shared-memory comm op: a JIT build training never uses (see ds_ops)
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" else "gloo"
    if store is not None:
        # LOCAL_RANK 0: each rank is its own Ray actor, which sees only its own GPU(s), as device 0.
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    elif "RANK" not in os.environ:
        # A world of one rendezvous in memory: no TCP port to choose (a probed free port can be taken by another
        # process before the store binds it: EADDRINUSE). DeepSpeed adopts a process group that already exists.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def deepspeed_config(cfg: LearnerConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        # The number of micro-batches varies per update (token budget), so DeepSpeed does not count them:
        # unmanaged accumulation = every backward() accumulates, the one step() is the boundary.
        "managed_gradient_accumulation": False,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer == "deepspeed":  # FusedAdam / CPUAdam (JIT-built on first use, ~45 s cold on CPU)
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay, "eps": 1e-8},
        }
    return config


def all_gather_variable(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-d tensor of per-rank length over all ranks (rank order)."""
    world = dist.get_world_size()
    if world == 1:
        return values
    n = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class Trainer:
    """A DeepSpeed engine over a local HF causal LM, stepping on lists of TrajectoryGroups."""

    def __init__(self, cfg: LearnerConfig, model_dir: str | Path, *, temperature: float = 1.0, version: int = 0):
        import deepspeed
        from transformers import AutoModelForCausalLM

        if not temperature > 0:  # greedy rollouts have no density to train on (RolloutConfig refuses them)
            raise ValueError(f"temperature must be > 0: the rollouts' sampling temperature (got {temperature})")
        init_distributed()
        if not torch.cuda.is_available():
            torch.set_num_threads(cfg.cpu_threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        # The rollouts' sampling temperature: the behaviour log-probs are vLLM's processed ones,
        # log_softmax(logits / T), so the learner's are too (log r = 0 at staleness 0 up to float noise).
        self.temperature = temperature
        self.version = version
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if cfg.optimizer == "torch":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

        warmup = cfg.warmup_steps

        def schedule(opt):  # linear warm-up then constant (the paper's recipe is constant)
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

        op = optimizer_op(cfg.optimizer, cfg.offload_optimizer)
        if op:
            load_op(op)  # built under staleflow's lock before DeepSpeed asks for it (see ds_ops)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=deepspeed_config(cfg),
        )
        self.device = self.engine.device

    # ---------------------------------------------------------------- log-probs
    def _response_logp(self, mb: MicroBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log p(response token) under the current weights: [B, T] (0 where masked), and optionally entropy.

        Logits are computed only for the valid response positions ([N, V], N = valid tokens), not the whole
        [B, L, V] sequence, and in chunks of learner.logits_chunk_tokens (learner/head.py): the vocabulary
        projection is the learner's largest activation.
        """
        # Through the engine (its forward does ZeRO's per-micro-batch bookkeeping), asking for the final
        # (post-norm) hidden states and a single position of logits; the vocabulary projection is ours.
        out = self.engine(
            input_ids=mb.input_ids.to(self.device),
            attention_mask=mb.attention_mask.to(self.device),
            logits_to_keep=1,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]  # [B, L, H]
        b, t = mb.mask.shape
        mask = mb.mask.to(self.device)
        # The logit predicting response token k sits at position P - 1 + k.
        pos = (mb.prompt_lens.to(self.device)[:, None] - 1 + torch.arange(t, device=self.device)).clamp(
            max=hidden.shape[1] - 1
        )  # [B, T]
        h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))[mask]  # [N, H]
        tokens = mb.response_ids.to(self.device)[mask]  # [N]
        token_lp, ent = token_logp(self.engine.module.get_output_embeddings(), h, tokens, temperature=self.temperature,
                                   chunk_tokens=self.cfg.logits_chunk_tokens, with_entropy=with_entropy)  # [N], [N]
        logp = torch.zeros(b, t, dtype=token_lp.dtype, device=self.device).masked_scatter(mask, token_lp)
        entropy = None if ent is None else torch.zeros(b, t, device=self.device).masked_scatter(mask, ent)
        return logp, entropy

    def _dummy_backward(self) -> None:
        """A zero-gradient micro-batch, so every rank runs the same number of backwards (ZeRO collectives)."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        loss = self.engine(input_ids=ids, logits_to_keep=1).logits.float().sum() * 0.0
        self.engine.backward(loss, scale_wrt_gas=False)

    # ---------------------------------------------------------------- the step
    def step(self, groups: Sequence[TrajectoryGroup]) -> dict[str, float | list]:
        """One optimizer update over `groups` (the same global list on every rank). Returns the step metrics."""
        from learner.advantages import grpo_advantages
        from learner.losses import loss_defaults, policy_loss

        t0 = time.perf_counter()
        cfg = self.cfg
        rows, zero_groups = build_rows(groups, self.version, grpo_advantages)
        if not rows:
            raise ValueError("step() needs at least one trajectory")
        local: list[Row] = shard_rows(rows, self.rank, self.world_size)
        mbs = micro_batches(local, cfg.micro_batch_tokens, self.version)
        n_steps = self._max_over_ranks(len(mbs))
        denominator = torch.tensor(float(sum(len(r.response_ids) for r in rows)), device=self.device).clamp(min=1)
        params = dict(cfg.loss_params)

        stats: dict[str, float | list] = {}
        self.engine.train()
        first = None  # the first micro-batch's (logp, entropy), when its grad forward already ran
        if cfg.loss == "m2po":
            tau = float(params.get("tau", loss_defaults("m2po")["tau"]))
            if self.world_size == 1 and len(mbs) == 1:
                # The whole batch is one micro-batch on one rank: the grad pass's own forward has every token's
                # ratio, so the threshold comes from it (no extra no-grad forward: ~20% of a small step).
                first = self._response_logp(mbs[0], with_entropy=True)
            threshold, m2_stats = self._global_m2po_threshold(
                mbs, tau, int(denominator), logps=None if first is None else [first[0].detach()])
            params["threshold"] = threshold
            stats.update(m2_stats)

        acc = _Accumulator(self.device)
        for i in range(n_steps):
            if i >= len(mbs):
                self._dummy_backward()
                continue
            mb = mbs[i]
            logp, entropy = first if (i == 0 and first is not None) else self._response_logp(mb, with_entropy=True)
            blogp = mb.behaviour_logp.to(self.device)
            adv = mb.advantages.to(self.device)
            mask = mb.mask.to(self.device)
            if cfg.loss == "m2po":  # the ids its threshold was chosen with: ties fall the same way in every split
                params["token_ids"] = token_ids(mb.row_indices, mask.shape[1])
            loss, loss_stats = policy_loss(cfg.loss, logp, blogp, adv, mask, denominator=denominator,
                                           entropy=entropy, **params)
            # x world: DeepSpeed averages over ranks; the per-rank sums must add up to the whole-batch loss.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            acc.add_micro_batch(mb, logp.detach(), entropy, loss.detach(), loss_stats)
        self.engine.step()
        self.version += 1

        stats.update(acc.reduce())
        stats.update(_batch_stats(rows, zero_groups))
        elapsed = time.perf_counter() - t0
        stats["policy/version"] = float(self.version)
        stats["time/step_s"] = elapsed
        stats["throughput/train_tokens_per_s"] = sum(r.length for r in rows) / max(elapsed, 1e-9)
        stats["learner/micro_batches"] = float(n_steps)
        stats["learner/lr"] = float(self.engine.get_lr()[0])
        grad_norm = self.engine.get_global_grad_norm()  # before clipping
        if grad_norm is not None:
            stats["grad/norm"] = float(grad_norm)
        return stats

    @torch.no_grad()
    def _global_m2po_threshold(self, mbs, tau, total_tokens, logps=None) -> tuple[torch.Tensor, dict]:
        from learner.losses import m2po_dropped, m2po_threshold, m2po_trust_region_values

        # Same micro-batches, same (train) mode as the grad pass: each token's (log r)^2 is recomputed
        # bit-identically there, so the loss masks exactly the tokens selected here. `logps`: the micro-batches'
        # log-probs when the caller already has them (from the grad pass's forward itself).
        if logps is None:
            logps = [self._response_logp(mb, with_entropy=False)[0] for mb in mbs]
        local = [
            m2po_trust_region_values(logp, mb.behaviour_logp.to(self.device), mb.advantages.to(self.device),
                                     mb.mask.to(self.device), token_ids(mb.row_indices, mb.mask.shape[1]))
            for logp, mb in zip(logps, mbs)
        ]
        empty = torch.zeros(0, device=self.device)
        values = all_gather_variable(torch.cat([v.float() for v, _ in local]) if local else empty)
        ids = all_gather_variable(torch.cat([i for _, i in local]).to(self.device) if local
                                  else empty.long())
        threshold = m2po_threshold(values, tau, ids).to(self.device)
        dropped = m2po_dropped(values, ids, threshold)
        kept = values[~dropped]
        # A tie at the threshold split by the ids (Algorithm 1 drops equal values one at a time).
        at = values.double() == threshold[0]
        stats = {
            "m2po/tau": tau,
            "m2po/threshold": float(threshold[0]),
            "m2po/trust_region_tokens": float(values.numel()),
            "m2po/m2_before": float(values.mean()) if values.numel() else 0.0,
            "m2po/m2_after": float(kept.mean()) if kept.numel() else 0.0,
            "m2po/trust_region_fraction": float(values.numel()) / max(1, total_tokens),
            "m2po/tie_split": float(bool((at & dropped).any() and (at & ~dropped).any())),
        }
        return threshold, stats

    def _max_over_ranks(self, n: int) -> int:
        if self.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ---------------------------------------------------------------- weights out
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters by HF name, for publishing (live tensors: copy before the next step).

        ZeRO 0-2: full tensors on every rank. ZeRO-3: the partitioned parameters themselves (they carry
        `ds_id`), for a publisher that gathers them bucket by bucket, collectively on every rank.
        """
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            yield from module.named_parameters()
        else:
            yield from ((name, p.detach()) for name, p in module.named_parameters())


class _Accumulator:
    """Token-level sums over micro-batches and ranks -> global means (all_reduce SUM / MAX).

    Whatever the loss removes from the gradient (M2PO's mask, PPO's clip, ...) comes from its own stats
    (`masked_fraction*` x token counts), so the fraction is exact over the whole batch for every loss.
    """

    SUMS = (
        "tokens", "loss", "masked", "masked_pos", "masked_neg", "pos_tokens", "neg_tokens",
        "k1", "k3", "r", "r2", "entropy", "mismatch", "mismatch_tokens", "clamped", "removed_entropy",
        "removed_tokens",
    )  # fmt: skip

    def __init__(self, device):
        self.device = device
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64, device=device)
        self.maxes = torch.zeros(2, dtype=torch.float64, device=device)  # [ratio max, |log r| max at staleness 0]

    def _add(self, name: str, value) -> None:
        self.sums[self.SUMS.index(name)] += float(value)

    def add_micro_batch(self, mb: MicroBatch, logp, entropy, loss, loss_stats: dict) -> None:
        mask = mb.mask.to(self.device)
        log_r = (logp - mb.behaviour_logp.to(self.device))[mask].double().clamp(-20, 20)  # [N], as the loss clamps
        a = mb.advantages.to(self.device)[mask]  # [N]
        r = log_r.exp()
        n_pos, n_neg = int((a > 0).sum()), int((a < 0).sum())
        self._add("tokens", log_r.numel())
        self._add("loss", loss)
        self._add("masked", loss_stats["masked_fraction"] * log_r.numel())
        self._add("masked_pos", loss_stats["masked_fraction_pos"] * n_pos)
        self._add("masked_neg", loss_stats["masked_fraction_neg"] * n_neg)
        self._add("pos_tokens", n_pos)
        self._add("neg_tokens", n_neg)
        self._add("clamped", loss_stats.get("clamp_count", 0.0))
        self._add("k1", (-log_r).sum())
        # k3 = E[r - 1 - log r] over behaviour samples: non-negative, low-variance KL(behaviour || current)
        self._add("k3", (r - 1 - log_r).sum())
        self._add("r", r.sum())
        self._add("r2", r.square().sum())
        self._add("entropy", entropy[mask].sum())
        self._add("removed_entropy", loss_stats.get("removed_entropy", 0.0))
        self._add("removed_tokens", loss_stats.get("removed_tokens", 0.0))
        # train/inference mismatch apart from staleness: tokens generated by the very weights being trained
        fresh = mb.token_staleness.to(self.device)[mask] == 0
        self._add("mismatch", log_r[fresh].abs().sum())
        self._add("mismatch_tokens", fresh.sum())
        if r.numel():
            self.maxes[0] = torch.maximum(self.maxes[0], r.max())
        if fresh.any():
            self.maxes[1] = torch.maximum(self.maxes[1], log_r[fresh].abs().max())

    def reduce(self) -> dict[str, float]:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.maxes, op=dist.ReduceOp.MAX)
        s = dict(zip(self.SUMS, self.sums.tolist()))
        tok = max(s["tokens"], 1.0)
        # Measured only on tokens generated by the weights being trained (staleness 0): with none in the batch
        # (every update after the first under `fixed` with s > 0) there is no value, and 0 would read "no mismatch".
        mismatch = {"mismatch/abs_logp_diff": s["mismatch"] / s["mismatch_tokens"],
                    "mismatch/max_abs_logp_diff": float(self.maxes[1].item())} if s["mismatch_tokens"] else {}
        return {
            "loss/value": s["loss"],
            "loss/masked_fraction": s["masked"] / tok,
            "loss/masked_fraction_pos": s["masked_pos"] / max(s["pos_tokens"], 1.0),
            "loss/masked_fraction_neg": s["masked_neg"] / max(s["neg_tokens"], 1.0),
            "loss/masked_tokens": round(s["masked"]),
            "kl/k1": s["k1"] / tok,
            "kl/k3": s["k3"] / tok,
            "entropy": s["entropy"] / tok,
            # The paper's diagnostic: the mean entropy of the tokens the loss masked or clipped, against all
            # tokens' ("entropy"). Absent when nothing was removed.
            **({"entropy/removed": s["removed_entropy"] / s["removed_tokens"]} if s["removed_tokens"] else {}),
            "ratio/mean": s["r"] / tok,
            "ratio/max": float(self.maxes[0].item()),
            "ratio/ess_fraction": s["r"] ** 2 / (tok * s["r2"]) if s["r2"] else 0.0,
            "ratio/log_clamped": s["clamped"],
            **mismatch,
            "mismatch/tokens": s["mismatch_tokens"],
            "train/tokens": s["tokens"],
        }


def _batch_stats(rows: Sequence[Row], zero_groups: int) -> dict[str, float | list]:
    stale = torch.tensor([r.staleness for r in rows], dtype=torch.float64)
    hist = torch.bincount(stale.long().clamp(max=_STALENESS_HIST_BINS - 1), minlength=_STALENESS_HIST_BINS)
    return {
        "staleness/mean": float(stale.mean()),
        "staleness/max": float(stale.max()),
        "staleness/hist": hist.tolist(),
        "reward/mean": sum(r.reward for r in rows) / len(rows),
        "advantage/zero_groups": float(zero_groups),
        "train/sequences": float(len(rows)),
    }
