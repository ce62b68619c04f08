"""Learner step throughput: staleflow's Trainer.step (DeepSpeed ZeRO-2, global M2PO, response-only logits)
against a plain-torch step that computes the full [B, L, V] logits, on the same model and batch, in one run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/learner.py [--rounds 3] [--vocab 32000]

A random Qwen2 (hidden 128, 2 layers) with a realistic vocabulary: at this size the vocabulary projection
dominates, which is what the response-only logits save. Batch: 8 groups x 4 responses, prompt 128 and response
64 tokens. Each round times one step of each side back to back; ratios are medians over rounds (same load).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from buffer.trajectory import Trajectory, TrajectoryGroup  # noqa: E402
from learner.advantages import grpo_advantages  # noqa: E402
from learner.batching import build_rows, collate  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.losses import policy_loss  # noqa: E402
from learner.trainer import Trainer  # noqa: E402


def groups(vocab: int, seed: int = 0) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(8):
        gid = f"b{g}"
        trajs = [
            Trajectory.make(
                group_id=gid, prompt_ids=rng.integers(1, vocab, 128), response_ids=rng.integers(1, vocab, 64),
                behaviour_logp=(-np.log(vocab) + rng.normal(0, 0.2, 64)).astype(np.float32), version=0,
                reward=float(i % 2),
            )  # fmt: skip
            for i in range(4)
        ]
        out.append(TrajectoryGroup(group_id=gid, trajectories=trajs))
    return out


def plain_step(model, opt, batch) -> None:
    """Baseline: full logits over every position, then the response positions picked out."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, L, V]
    t = batch.mask.shape[1]
    pos = batch.prompt_lens[:, None] - 1 + torch.arange(t)
    logp = torch.log_softmax(logits.float(), -1).gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    logp = logp.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    loss, _ = policy_loss("m2po", logp, batch.behaviour_logp, batch.advantages, batch.mask)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=args.vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(str(tmp))
    lcfg = LearnerConfig(lr=1e-5, micro_batch_tokens=10**6, cpu_threads=torch.get_num_threads())
    trainer = Trainer(lcfg, tmp)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = groups(args.vocab)
    rows, _ = build_rows(data, 0, grpo_advantages)
    batch = collate(rows, 0)
    tokens = sum(r.length for r in rows)
    trainer.step(data), plain_step(model, opt, batch)  # warm-up
    ours, base = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        trainer.step(data)
        t1 = time.perf_counter()
        plain_step(model, opt, batch)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        base.append(t2 - t1)
    print(json.dumps({
        "batch": {"sequences": len(rows), "tokens": tokens, "response_tokens": int(batch.mask.sum()), "vocab": args.vocab},
        "staleflow_step_s": statistics.median(ours),
        "plain_torch_full_logits_step_s": statistics.median(base),
        "staleflow_tokens_per_s": tokens / statistics.median(ours),
        "speedup_vs_plain_torch": statistics.median(b / o for o, b in zip(ours, base)),
        "logits_elements_ratio": int(batch.mask.sum()) / batch.input_ids.numel(),
        "threads": torch.get_num_threads(),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
