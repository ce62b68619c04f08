"""The GPU check, ready for a lent GPU machine: one script, a few minutes on one GPU, JSON on stdout.

    .venv-gpu/bin/python benchmarks/gpu_check.py [--only reload,train] [--updates 20]   (make test-gpu runs it)

reload: the CUDA build of vLLM loads new weights in place through the rollout worker's own path (a version
  published to Ray's object store by the learner's WeightPublisher, its bucket references handed to the engine,
  pulled there); its greedy tokens must then be transformers' greedy tokens under the new weights (fp32, the
  warm-started tiny model, prompts of the arithmetic task). Both policies' greedy outputs are compared, and they
  must differ from each other, or the check proves nothing.
train: a ~100M-parameter Qwen2-architecture model built here (random init, our tokenizer: nothing from a hub),
  then `staleflow train` for --updates updates in bf16 on this one GPU (the learner and one vLLM worker share it:
  0.5 GPU each). From its run directory: the bf16 vLLM log-probs against the learner's at staleness 0
  (mismatch/abs_logp_diff, mean over updates, and the largest |difference| of any token), learner samples/s
  (samples per update / step time) and rollout samples/s (samples generated / generation time).
Without CUDA it prints {"skipped": ...} and exits 0: every figure here needs the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout: keep it JSON only


def reload_check() -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks._stdout import stdout_to_stderr
    from learner.publisher import WeightPublisher
    from rollout_worker.config import RolloutConfig
    from rollout_worker.engine import VLLMEngine
    from rollout_worker.tasks.arithmetic import ArithmeticTask
    from rollout_worker.tiny_model import ensure_tiny_model
    from rollout_worker.weights import WeightsFetcher
    from services.registry import start_registry

    with stdout_to_stderr():
        model_dir = ensure_tiny_model(REPO / ".cache/staleflow/tiny-model")
        a = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        b = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        gen = torch.Generator(device="cuda").manual_seed(5)
        with torch.no_grad():
            for p in b.parameters():  # a second policy: every tensor perturbed
                p.add_(0.05 * torch.randn(p.shape, generator=gen, device="cuda"))
        engine = VLLMEngine(str(model_dir), RolloutConfig(dtype="float32", gpus_per_worker=1.0,
                                                          gpu_memory_utilization=0.3, max_model_len=512))
        prompts = engine.tokenize([p.text for p in ArithmeticTask().eval_prompts()[:32]])

        def hf_greedy(model) -> list[list[int]]:
            out = []
            for p in prompts:
                ids = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=8, do_sample=False)[0, len(p):]
                ids = ids.tolist()
                eos = model.generation_config.eos_token_id
                out.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
            return out

        def vllm_greedy() -> list[list[int]]:
            return [g[0].token_ids for g in engine.generate(prompts, 1, temperature=0.0, max_tokens=8)]

        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, namespace="gpu-check", logging_level="ERROR")
        try:
            registry = start_registry(2, namespace="gpu-check", name="gpu-check")
            t0 = time.perf_counter()
            WeightPublisher(registry, bucket_mb=1).publish(b, 1)
            publish_s = time.perf_counter() - t0
            before = vllm_greedy()
            t0 = time.perf_counter()
            engine.update_weights(WeightsFetcher(registry).fetch(1), 1)
            load_s = time.perf_counter() - t0
            after = vllm_greedy()
        finally:
            ray.shutdown()
        ref_a, ref_b = hf_greedy(a), hf_greedy(b)
        engine.close()
    return {
        "prompts": len(prompts),
        "greedy_before_reload_equals_transformers": before == ref_a,
        "greedy_after_reload_equals_transformers": after == ref_b,
        "policies_differ": ref_a != ref_b,
        "publish_s": round(publish_s, 3),
        "fetch_and_load_s": round(load_s, 3),
    }


def build_100m(out: Path) -> tuple[Path, int]:
    """A Qwen2-architecture model of ~100M parameters: random init (seed 0), our tokenizer, bf16."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rollout_worker.tiny_model import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                      torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def train_check(updates: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir, n_params = build_100m(work / "model-100m")
    groups, n = 16, 8
    args = ["configs/tiny-cpu.yaml", f"model.path={model_dir}", f"runs_dir={work / 'runs'}", "name=gpu",
            f"learner.total_steps={updates}", "learner.eval_every=10", f"learner.checkpoint_every={updates}",
            "learner.gpus=0.5", "learner.dtype=bfloat16", "rollout.gpus_per_worker=0.5", "rollout.dtype=bfloat16",
            "rollout.gpu_memory_utilization=0.3", "weights.dtype=bfloat16", f"buffer.batch_groups={groups}",
            f"rollout.groups_per_batch={groups}", f"rollout.n={n}", "rollout.max_tokens=32",
            "metrics.dashboard=false"]
    env = {**os.environ, "STALEFLOW_QUIET": "1", "DS_ACCELERATOR": "cuda"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "services.cli", "train", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=420)
    wall = time.perf_counter() - t0
    result: dict = {"parameters": n_params, "updates": updates, "exit_code": out.returncode,
                    "wall_s": round(wall, 1)}
    if out.returncode != 0:
        return {**result, "error": (out.stdout + out.stderr)[-3000:]}
    run = work / "runs" / "gpu"
    learner = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in learner if "time/step_s" in r]
    rollouts = [json.loads(line) for line in (run / "rollout.jsonl").read_text().splitlines()]
    batches = [r for r in rollouts if "rollout/generate_s" in r]
    diffs = [r["mismatch/abs_logp_diff"] for r in steps if "mismatch/abs_logp_diff" in r]
    return {
        **result,
        "updates_done": len(steps),
        "bf16_logp_vs_learner_mean_abs_diff": statistics.mean(diffs) if diffs else None,
        "bf16_logp_vs_learner_max_abs_diff": max((r["mismatch/max_abs_logp_diff"] for r in steps
                                                  if "mismatch/max_abs_logp_diff" in r), default=None),
        "learner_samples_per_s": groups * n / statistics.median(r["time/step_s"] for r in steps),
        "rollout_samples_per_s": sum(r["rollout/groups"] * n for r in batches)
        / max(sum(r["rollout/generate_s"] for r in batches), 1e-9),
        "final_eval": json.loads((run / "eval.json").read_text()).get("accuracy"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="reload,train", help="comma-separated: reload, train")
    ap.add_argument("--updates", type=int, default=20)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device: the GPU check needs one (make test-gpu on a GPU machine)"}))
        return
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    checks = set(args.only.split(","))
    t0 = time.perf_counter()
    if "reload" in checks:
        report["reload"] = reload_check()
    if "train" in checks:
        report["train"] = train_check(args.updates)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
