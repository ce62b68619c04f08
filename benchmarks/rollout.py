"""Rollout worker throughput vs vLLM's own `LLM.generate`, same engine, weights and prompts, in the same run.

    .venv/bin/python benchmarks/rollout.py [--batches 4] [--groups 8] [--n 8] [--max-tokens 16] [--rounds 3]

worker: RolloutWorker.run() on the tiny CPU model: admission + prompt tokenisation + step-driven generation
(per-token log-probs and versions) + arithmetic scoring + building TrajectoryGroups + push_many into a real
embedded Redis. baseline: `llm.generate(prompts, SamplingParams(n, temperature, max_tokens, logprobs=0))` on the
same prompt list, one call per batch of groups_per_batch prompts (the engine's LLM object, so the same
weights and threads). Tokens = sampled response tokens.
Headline ratio: worker_vs_vllm_generate_median_of_rounds. Also: an in-place weight update (the full
state dict through the worker extension + prefix-cache reset) timed against one baseline batch. Every round
runs both back to back (the machine is shared); figures are medians. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout: keep it JSON only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4, help="worker batches per round")
    ap.add_argument("--groups", type=int, default=8, help="prompts per batch (rollout.groups_per_batch)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=1)
    args = ap.parse_args()

    from safetensors.torch import load_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from buffer.config import BufferConfig
    from buffer.redis_buffer import StalenessBuffer
    from buffer.server import EmbeddedRedis, connect
    from rollout_worker.config import RolloutConfig, TaskConfig
    from rollout_worker.engine import VLLMEngine
    from rollout_worker.tasks.arithmetic import ArithmeticTask
    from rollout_worker.tiny_model import ensure_tiny_model
    from rollout_worker.worker import RolloutWorker

    model_dir = ensure_tiny_model(REPO / ".cache/staleflow/tiny-model")
    cfg = RolloutConfig(n=args.n, max_tokens=args.max_tokens, temperature=1.0, groups_per_batch=args.groups,
                        cpu_threads=args.cpu_threads)
    task = ArithmeticTask()
    engine = VLLMEngine(str(model_dir), cfg)
    per_round = args.batches * args.groups
    stream = task.train_prompts(7)
    prompt_sets = [[next(stream) for _ in range(per_round)] for _ in range(args.rounds + 1)]
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, logprobs=0)

    def baseline(prompts) -> tuple[int, float]:
        """One LLM.generate call per batch of groups_per_batch prompts, as the worker does."""
        ids = engine.tokenize([p.text for p in prompts])
        tokens = 0
        t0 = time.perf_counter()
        for i in range(0, len(ids), args.groups):
            batch = [TokensPrompt(prompt_token_ids=x) for x in ids[i : i + args.groups]]
            outs = engine.llm.generate(batch, params, use_tqdm=False)
            tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        return tokens, time.perf_counter() - t0

    with EmbeddedRedis(aof=False) as server:
        client = connect(server.url, server.password)
        buf = StalenessBuffer(client, BufferConfig(prefix="bench-rollout", policy="unbounded",
                                                   capacity_groups=100_000, aof=False))
        buf.reset()

        def worker_round(prompts, batches: int) -> tuple[int, float]:
            tokens = []
            worker = RolloutWorker(engine, task, buf, cfg, TaskConfig(), worker_id="bench",
                                   get_latest=lambda: engine.version, fetch=lambda v: [],
                                   report=lambda step, values: tokens.append(values), prompts=iter(prompts))
            t0 = time.perf_counter()
            worker.run(max_batches=batches)
            dt = time.perf_counter() - t0
            n_tok = sum(v["rollout/tokens"] for v in tokens)
            return n_tok, dt

        worker_round(prompt_sets[0][: args.groups], 1)  # warm-up: first-call allocations in both paths
        baseline(prompt_sets[0][: args.groups])
        w_rates, b_rates = [], []
        for r in range(args.rounds):
            prompts = prompt_sets[r + 1]
            bt, bs = baseline(prompts)
            wt, ws = worker_round(prompts, args.batches)
            b_rates.append(bt / bs)
            w_rates.append(wt / ws)
        pushed = client.xlen("bench-rollout:stream")
        buf.reset()
        client.close()

    state = load_file(model_dir / "model.safetensors")
    update_s = []
    for v in range(1, 4):
        t0 = time.perf_counter()
        engine.update_weights(state.items(), v)
        update_s.append(time.perf_counter() - t0)
    _, one_batch_s = baseline(prompt_sets[1][: args.groups])
    engine.close()

    w, b = statistics.median(w_rates), statistics.median(b_rates)
    print(json.dumps({
        "benchmark": "rollout",
        "model": "tiny (hidden 128, 2 layers)",
        "setup": {"groups_per_batch": args.groups, "n": args.n, "max_tokens": args.max_tokens,
                  "batches_per_round": args.batches, "rounds": args.rounds, "cpu_threads": args.cpu_threads},
        "worker_tokens_per_s": round(w, 1),
        "vllm_generate_tokens_per_s": round(b, 1),
        "worker_vs_vllm_generate": round(w / b, 3),
        # each round runs both back to back: the median of the per-round ratios resists load drifting over the run
        "worker_vs_vllm_generate_median_of_rounds": round(statistics.median(x / y for x, y in zip(w_rates, b_rates)), 3),
        "rounds_worker_tokens_per_s": [round(x, 1) for x in w_rates],
        "rounds_vllm_generate_tokens_per_s": [round(x, 1) for x in b_rates],
        "groups_pushed": pushed,
        "weight_update_s": round(statistics.median(update_s), 4),
        "weight_update_vs_one_batch": round(statistics.median(update_s) / one_batch_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
