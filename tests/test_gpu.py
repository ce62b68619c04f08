"""GPU-only paths, run by `make test-gpu` on a CUDA machine (and skipped here, one line each, without one):
the CUDA build of vLLM reloading weights in place through the worker's reference path, and a short bf16 train
with learner and worker sharing one GPU. Both run benchmarks/gpu_check.py, the one-script GPU check, and assert
on its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: a GPU-only path (make test-gpu)"),
]


def gpu_check(*args: str) -> dict:
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_cuda_greedy_after_an_in_place_reload_is_transformers_greedy():
    r = gpu_check("--only", "reload")["reload"]
    assert r["policies_differ"], "the two policies agree everywhere: the check would prove nothing"
    assert r["greedy_before_reload_equals_transformers"] and r["greedy_after_reload_equals_transformers"], r


def test_a_short_bf16_train_shares_one_gpu_and_its_logprobs_match_the_learners():
    r = gpu_check("--only", "train", "--updates", "5")["train"]
    assert r["exit_code"] == 0 and r["updates_done"] == 5, r
    # bf16 kernels differ between vLLM and the learner; far below a policy change's |log r| (~0.1 and up).
    assert r["bf16_logp_vs_learner_mean_abs_diff"] < 0.05, r
