"""Helpers for the learner tests: a tiny random Qwen2, synthetic groups, and process entry points.

DeepSpeed runs in child processes (its process group and engine state must not leak into the pytest process):

    python -m tests.learner_helpers invariance MODEL_DIR OUT_DIR WORLD BUDGET...  # see run_invariance
    python -m tests.learner_helpers learn CONFIG_JSON                      # the learner loop (kill/resume test)
    python -m tests.learner_helpers logr MODEL_DIR GROUPS_JSON OUT_JSON T  # see run_log_ratios
    python -m tests.learner_helpers ds-ops MODEL_DIR OUT_JSON              # see run_ds_ops
    python -m tests.learner_helpers precision MODEL_DIR OUT_DIR            # see run_precision

Each step writes OUT_DIR/<name>.safetensors (parameters after the step) and OUT_DIR/<name>.json (metrics).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch

from buffer.trajectory import Trajectory, TrajectoryGroup

VOCAB = 64


def tiny_model(path: str | Path, seed: int = 0) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(path))
    return Path(path)


def make_groups(n_groups: int, seed: int = 0, *, n: int = 4, version: int = 0, prefix: str = "g") -> list[TrajectoryGroup]:
    """Groups with varied prompt/response lengths. Behaviour log-probs = a uniform model's (-log V) plus
    noise, so that (log r)^2 against the random tiny model spreads around M2PO's tau and masks some tokens."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        gid = f"{prefix}{seed}-{g}"
        trajs = []
        for i in range(n):
            t = int(rng.integers(1, 14))
            trajs.append(
                Trajectory.make(
                    id=f"{gid}-{i}",
                    group_id=gid,
                    prompt_ids=rng.integers(1, VOCAB, int(rng.integers(2, 7))),
                    response_ids=rng.integers(1, VOCAB, t),
                    behaviour_logp=(-np.log(VOCAB) + rng.normal(0, 0.3, t)).astype(np.float32),
                    version=version,
                    reward=float(rng.integers(0, 2)),
                )
            )
        trajs[0] = trajs[0].model_copy(update={"reward": 1.0})  # no all-equal groups: every group has signal
        trajs[1] = trajs[1].model_copy(update={"reward": 0.0})
        groups.append(TrajectoryGroup(group_id=gid, trajectories=trajs))
    return groups


def learner_config(budget: int, **fields):
    from learner.config import LearnerConfig

    base = dict(loss="m2po", lr=1e-3, weight_decay=0.0, micro_batch_tokens=budget, zero_stage=2, dtype="float32")
    return LearnerConfig(**{**base, **fields})


def _save(trainer, stats: dict, out: Path, name: str) -> None:
    import deepspeed
    from safetensors.torch import save_file

    named = list(trainer.named_tensors())
    with deepspeed.zero.GatheredParameters([p for _, p in named if hasattr(p, "ds_id")]):  # ZeRO-3: full tensors
        tensors = {k: v.detach().clone().contiguous() for k, v in named}
    save_file(tensors, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps(stats))


def _split_main(model_dir: str, out: str, budgets: list[int]) -> None:
    from learner.trainer import Trainer

    for budget in budgets:
        trainer = Trainer(learner_config(budget), model_dir)
        _save(trainer, trainer.step(make_groups(6)), Path(out), f"split-{budget}")
    # The loss head in chunks of 5 tokens (recomputed in backward): the same step.
    trainer = Trainer(learner_config(budgets[0], logits_chunk_tokens=5), model_dir)
    _save(trainer, trainer.step(make_groups(6)), Path(out), f"chunk5-{budgets[0]}")
    # ZeRO-3 accumulates partitioned gradients by its own micro-step count: the smallest split again, with the
    # chunked head too (its recomputation re-gathers the partitioned projection).
    trainer = Trainer(learner_config(budgets[-1], zero_stage=3, logits_chunk_tokens=5), model_dir)
    _save(trainer, trainer.step(make_groups(6)), Path(out), f"zero3-{budgets[-1]}")


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str, budget: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    from learner.trainer import Trainer

    trainer = Trainer(learner_config(budget), model_dir)
    stats = trainer.step(make_groups(6))
    if rank == 0:
        _save(trainer, stats, Path(out), f"ranks{world}-{budget}")


def reference_step(model_dir: str, out: str) -> None:
    """The same update in plain torch, no DeepSpeed and no micro-batching: each sequence alone through the
    FULL logits (an independent log-prob path), one M2PO threshold over the batch, whole-batch token mean,
    clip_grad_norm_, AdamW. Writes reference.safetensors / reference.json."""
    from transformers import AutoModelForCausalLM

    from learner.advantages import grpo_advantages
    from learner.batching import build_rows
    from learner.losses import m2po_threshold, m2po_trust_region_values, policy_loss, token_ids

    cfg = learner_config(10**6)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows, _ = build_rows(make_groups(6), 0, grpo_advantages)

    def tensors(r):
        ids = torch.tensor(np.concatenate([r.prompt_ids, r.response_ids]), dtype=torch.long)[None]
        p, t = len(r.prompt_ids), len(r.response_ids)
        logits = model(input_ids=ids).logits[0, p - 1 : p + t - 1]  # [T, V]: position j predicts token j + 1
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, p:, None]).T  # [1, T]
        blogp = torch.from_numpy(r.behaviour_logp.copy())[None]
        return logp, blogp, torch.full((1, t), r.advantage), torch.ones(1, t, dtype=torch.bool)

    def ids(r):  # each token's id in the batch: ties at the threshold fall as in the trainer
        return token_ids([r.index], len(r.response_ids))

    with torch.no_grad():
        pieces = [m2po_trust_region_values(*tensors(r), ids(r)) for r in rows]
    threshold = m2po_threshold(torch.cat([v for v, _ in pieces]), 0.04, torch.cat([i for _, i in pieces]))
    total = sum(len(r.response_ids) for r in rows)
    loss = 0.0
    masked = 0.0
    for r in rows:
        piece, st = policy_loss("m2po", *tensors(r), threshold=threshold, token_ids=ids(r), denominator=total)
        loss = loss + piece
        masked += st["masked_fraction"] * len(r.response_ids)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt.step()
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, str(Path(out) / "reference.safetensors"))
    stats = {"loss/value": float(loss), "grad/norm": float(norm), "loss/masked_tokens": round(masked)}
    (Path(out) / "reference.json").write_text(json.dumps(stats))


def run_invariance(model_dir: str, out: str, budgets: list[int], world: int) -> None:
    """One step per budget on 1 rank, one on `world` gloo ranks (first budget after the largest), then the
    plain-torch reference. Children are forked from this process, which has imported DeepSpeed and
    transformers once (importing them costs more than the steps) and runs no torch op before forking."""
    import learner.trainer  # noqa: F401  (imports deepspeed + transformers once, before forking)

    ctx = torch.multiprocessing.get_context("fork")
    child = ctx.Process(target=_split_main, args=(model_dir, out, budgets))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"single-rank run failed ({child.exitcode})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _rank_main, args=(world, port, model_dir, out, budgets[1]), nprocs=world, join=True, start_method="fork"
    )
    reference_step(model_dir, out)


def run_learn(config_path: str) -> None:
    """The learner loop against a real Redis buffer, as a standalone process (killed and resumed by a test).

    Crash points for the test (it SIGKILLs this process once the marker file appears):
    pause_after_version: stop after that update's ledger line (its checkpoint, if any, not written yet);
    hang_in_ack_version: stop after that version's checkpoint is durable, before its entries are acked.
    """
    import time

    from buffer.config import BufferConfig
    from buffer.redis_buffer import StalenessBuffer
    from buffer.server import connect
    from learner.loop import run_learner

    spec = json.loads(Path(config_path).read_text())
    run_dir = Path(spec["run_dir"])
    client = connect(spec["redis_url"], os.environ["TEST_REDIS_PASSWORD"])
    buffer = StalenessBuffer(client, BufferConfig(**spec["buffer"]))
    cfg = learner_config(spec["budget"], checkpoint_every=spec["checkpoint_every"], keep_checkpoints=2)

    def stop_here(name: str) -> None:
        (run_dir / name).write_text("")
        time.sleep(600)

    real_ack = buffer.ack

    def ack(ids: list[str]) -> int:
        if ids and buffer.version() == spec.get("hang_in_ack_version"):
            stop_here("hung-in-ack")
        return real_ack(ids)

    buffer.ack = ack

    def report(step: int, stats: dict) -> None:
        if step == spec.get("pause_after_version"):
            stop_here("paused")

    def publish(version: int, named) -> dict:
        assert sum(1 for _ in named) > 0
        return {}

    run_learner(
        cfg, spec["model_dir"], buffer, publish, report, spec["total_steps"], run_dir=run_dir,
        batch_groups=spec["batch_groups"], publish_every=1, pull_block_ms=200, starve_timeout_s=60,
    )  # fmt: skip


def run_log_ratios(model_dir: str, groups_json: str, out_json: str, temperature: float) -> None:
    """The learner's log-probs (the Trainer's own head, at `temperature` and at 1) of trajectories whose
    behaviour log-probs came from the engine, as log r = learner - behaviour over every response token."""
    from learner.advantages import grpo_advantages
    from learner.batching import build_rows, micro_batches
    from learner.trainer import Trainer

    spec = json.loads(Path(groups_json).read_text())
    groups = []
    for g, group in enumerate(spec):
        trajs = [Trajectory.make(id=f"t{g}-{i}", group_id=f"t{g}", prompt_ids=np.array(t["prompt"]),
                                 response_ids=np.array(t["response"]), behaviour_logp=np.array(t["logp"], np.float32),
                                 version=0, reward=float(i % 2)) for i, t in enumerate(group)]  # fmt: skip
        groups.append(TrajectoryGroup(group_id=f"t{g}", trajectories=trajs))
    rows, _ = build_rows(groups, version=0, advantage_fn=grpo_advantages)
    trainer = Trainer(learner_config(10**6), model_dir, temperature=temperature)
    result = {}
    for name, t in (("at_T", temperature), ("at_1", 1.0)):
        trainer.temperature = t
        log_r = []
        with torch.no_grad():
            for mb in micro_batches(rows, 10**6, 0):
                logp, _ = trainer._response_logp(mb, with_entropy=False)
                log_r.append((logp - mb.behaviour_logp)[mb.mask])
        log_r = torch.cat(log_r).abs()
        result[name] = {"mean_abs": log_r.mean().item(), "max_abs": log_r.max().item(), "tokens": log_r.numel()}
    Path(out_json).write_text(json.dumps(result))


def run_ds_ops(model_dir: str, out_json: str) -> None:
    """One step with DeepSpeed's own AdamW (FusedAdam, JIT-built) in a build root where killed builds left their
    lock files (of the shared-memory comm op and of fused_adam): it must neither wait on them nor build the
    shared-memory op. Run with TORCH_EXTENSIONS_DIR set to an empty directory (a cold build)."""
    from torch.utils.cpp_extension import _get_build_directory

    from learner.trainer import Trainer

    dirs = {name: Path(_get_build_directory(name, verbose=False)) for name in ("deepspeed_shm_comm", "fused_adam")}
    for d in dirs.values():
        (d / "lock").touch()  # what a build killed mid-way leaves
    trainer = Trainer(learner_config(64, optimizer="deepspeed"), model_dir)
    before = {k: v.detach().clone() for k, v in trainer.named_tensors()}
    trainer.step(make_groups(4))
    Path(out_json).write_text(json.dumps({
        "optimizer": type(trainer.engine.basic_optimizer).__name__,
        "changed": any(not torch.equal(before[k], v) for k, v in trainer.named_tensors()),
        "built": {name: sorted(p.name for p in d.glob("*.so")) for name, d in dirs.items()},
        "locks": {name: (d / "lock").exists() for name, d in dirs.items()},
    }))


def run_precision(model_dir: str, out: str) -> None:
    """The same step (6 groups, ZeRO-2, one micro-batch) in float32, with gradient checkpointing, in bfloat16
    (DeepSpeed bf16: bf16 weights and activations, fp32 master weights), and both: each run's parameters after
    the step (in its dtype) and its metrics (OUT_DIR/<name>.{safetensors,json})."""
    from learner.trainer import Trainer

    for name, fields in {"fp32": {}, "gc": {"gradient_checkpointing": True}, "bf16": {"dtype": "bfloat16"},
                         "bf16-gc": {"dtype": "bfloat16", "gradient_checkpointing": True}}.items():
        trainer = Trainer(learner_config(10**6, **fields), model_dir)
        stats = trainer.step(make_groups(6))
        stats["gradient_checkpointing"] = trainer.engine.module.is_gradient_checkpointing  # on, or a vacuous test
        _save(trainer, stats, Path(out), name)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "invariance":
        run_invariance(args[0], args[1], [int(b) for b in args[3:]], int(args[2]))
    elif cmd == "learn":
        run_learn(args[0])
    elif cmd == "logr":
        run_log_ratios(args[0], args[1], args[2], float(args[3]))
    elif cmd == "precision":
        run_precision(args[0], args[1])
    elif cmd == "ds-ops":
        run_ds_ops(args[0], args[1])
    else:
        raise SystemExit(f"unknown command {cmd}")
