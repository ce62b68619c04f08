"""The `task` and `rollout` config sections: what the workers generate and how."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, field_validator, model_validator


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A built-in name ("arithmetic", "math") or a plug-in path "package.module:function" returning a Task.
    name: str = "arithmetic"
    data_path: str | None = Field(None, description="math: a local JSONL or parquet file of prompts/answers.")
    prompt_template: str | None = Field(None, description="Name of a bundled template or a str.format template.")
    eval_size: int = Field(200, ge=1, description="Held-out prompts for evaluation.")
    eval_samples: int = Field(4, ge=0, description="Each eval also samples this many responses per prompt at the "
                                                   "rollout temperature: avg@k beside greedy (0: greedy only).")
    eval_data_path: str | None = Field(
        None, description="math: a separate local eval file (else eval_size rows of data_path are held out)."
    )
    question_key: str | None = Field(None, description="math: the question column (default: problem/question/...).")
    answer_key: str | None = Field(None, description="math: the answer column (default: answer/final_answer/...).")
    arithmetic_max_operand: int = Field(29, ge=1, description="arithmetic: operands are drawn from [0, this].")
    arithmetic_ops: str = Field("+", description="arithmetic: the operators, any of '+-'.")
    long_addition_digits: int = Field(3, ge=1, le=9, description="long_addition: digits of each operand.")
    reward_timeout_s: float = Field(5.0, gt=0)
    seed: int = 0


MIN_TEMPERATURE = 0.01  # vLLM raises any lower positive temperature to this (SamplingParams, _MAX_TEMP)


class RolloutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    n: int = Field(8, ge=1, description="Responses per prompt (the GRPO group size).")
    temperature: float = Field(1.0, description="Sampling temperature of training rollouts, in [0.01, 2].")
    top_p: float = Field(1.0, description="1 only: see _whole_vocabulary.")
    max_tokens: int = Field(4, ge=1)
    stop: list[str] = Field(default_factory=list)
    groups_per_batch: int = Field(16, ge=1, description="Prompts a worker generates per engine call.")
    partial: bool = Field(False, description="Interrupt generation to load newer weights mid-batch.")
    partial_poll_s: float = Field(0.05, ge=0, description="partial: ask the registry for a newer version this often.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = True
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int = Field(512, ge=16)
    cpu_kvcache_gib: int = Field(1, ge=1)
    cpu_threads: int = Field(1, ge=1, description="Torch/OMP threads of a CPU engine.")
    max_restarts: int = Field(3, ge=0)
    delay_s: list[NonNegativeFloat] = Field(default_factory=list, description="Extra seconds worker i waits after each batch "
                                 "(delay_s[i % len]): a slower, uneven rollout side for experiments, e.g. [0, 2].")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans (vLLM's Ray executor).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "SPREAD", description="How the workers' placement group spreads them over nodes (SPREAD: one per node "
                              "where possible, so a node pulls each weight version once for its workers).")
    seed: int = 0

    @model_validator(mode="after")
    def _tensor_parallel_on_whole_gpus(self) -> RolloutConfig:
        # Each of an engine's tp processes takes one whole GPU, and they must share a node (NVLink, one
        # process group): a spreading strategy would scatter one engine's GPUs over nodes.
        if self.tensor_parallel_size > 1:
            if self.gpus_per_worker != 1:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} puts each of the engine's "
                                 f"processes on one whole GPU: gpus_per_worker must be 1 (GPUs per process), got "
                                 f"{self.gpus_per_worker}")
            if self.placement_strategy in ("SPREAD", "STRICT_SPREAD"):
                raise ValueError(f"tensor_parallel_size > 1 needs placement_strategy PACK or STRICT_PACK (one "
                                 f"engine's GPUs on one node), got {self.placement_strategy}")
        return self

    @field_validator("temperature")
    @classmethod
    def _sampled(cls, t: float) -> float:
        # Training needs a distribution: at T = 0 a group's n responses are one response (no advantage signal)
        # and the learner's logits / T divide by zero. Evaluation decodes greedily on its own, whatever this is.
        # [0.01, 2] is vLLM's range: it refuses T > 2 and silently raises 0 < T < 0.01 to 0.01, which would
        # sample (and return log-probs) at another temperature than the learner's.
        if not MIN_TEMPERATURE <= t <= 2:
            raise ValueError(f"must be in [{MIN_TEMPERATURE}, 2]: training rollouts are sampled (greedy decoding, "
                             f"T = 0, is evaluation's, which decodes greedily whatever this says)")
        return t

    @field_validator("top_p")
    @classmethod
    def _whole_vocabulary(cls, p: float) -> float:
        # vLLM's log-probs are then over the renormalised nucleus and the learner's over the whole vocabulary:
        # log r would not be 0 at staleness 0. Refused rather than trained with wrong ratios.
        if p != 1.0:
            raise ValueError("only 1.0 is supported: with top_p < 1 the engine's log-probs (renormalised over the "
                             "nucleus) and the learner's (whole vocabulary) differ, so the importance ratios would "
                             "be wrong")
        return p
