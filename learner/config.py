"""The `learner` config section: the loss, the optimiser and the DeepSpeed engine."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LossName = Literal["m2po", "m2po_released", "ppo_clip", "no_trust_region", "tis", "gspo", "cispo"]


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: LossName = "m2po"
    loss_params: dict[str, Any] = Field(default_factory=dict, description="e.g. {tau: 0.04} or {eps_high: 0.28}.")
    # Only "rollout" exists: the engine's log-probs, with the train/inference mismatch logged apart
    # (mismatch/abs_logp_diff). "recompute" (the learner's numerics at the generation version, as the paper's
    # code does) is refused rather than silently ignored until it is built (docs/learner.md).
    behaviour_logp: Literal["rollout"] = Field("rollout", description="rollout: the engine's log-probs.")
    lr: float = Field(3e-4, gt=0, description="The demo's tiny model; the paper used 1e-6 on 1.5B-32B.")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    total_steps: int = Field(300, ge=1, description="Optimizer updates (= policy versions) to train.")
    micro_batch_tokens: int = Field(4096, ge=16, description="Token budget of a micro-batch (padding included).")
    logits_chunk_tokens: int = Field(
        0, ge=0, description="Loss head in chunks of this many tokens (recomputed in backward); 0 = all at once.")
    zero_stage: Literal[0, 1, 2, 3] = 2
    optimizer: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: torch.optim.AdamW (no build); deepspeed: FusedAdam/CPUAdam (JIT-built once)."
    )
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU (needs deepspeed optimizer).")
    num_processes: int = Field(1, ge=1, description="Data-parallel ranks, each a Ray actor in one placement group.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the ranks' bundles (PACK: as few nodes as possible).")
    gpus: float = Field(0.0, ge=0, description="GPUs per learner rank (0 on CPU).")
    dtype: Literal["float32", "bfloat16"] = "float32"
    cpu_threads: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(20, ge=0, description="0 = never.")
    seed: int = 0
