"""The preflight's arithmetic (learner/memory.py) and its one-line refusals; the object-store check end to end
is in tests/test_train_e2e.py."""

from __future__ import annotations

import pytest

from learner.config import LearnerConfig
from learner.memory import DoesNotFit, check_learner_memory, count_parameters, model_state_bytes, weight_bytes
from tests.learner_helpers import tiny_model

B7 = 7.6e9  # Qwen2.5-Math-7B's parameters


@pytest.mark.parametrize(("fields", "gb"), [
    ({"zero_stage": 3, "num_processes": 1, "dtype": "bfloat16"}, 121.6),  # 16 B/param: the issue's ~122 GB
    ({"zero_stage": 3, "num_processes": 4, "dtype": "bfloat16"}, 30.4),   # everything sharded over 4
    ({"zero_stage": 2, "num_processes": 4, "dtype": "bfloat16"}, 15.2 + 3.8 + 22.8),  # weights whole; 2, 12 B / 4
    ({"zero_stage": 1, "num_processes": 4, "dtype": "float32"}, 30.4 + 30.4 + 15.2),  # 4 + 4 whole, 8 B / 4
    ({"zero_stage": 0, "num_processes": 4, "dtype": "float32"}, 121.6),
    ({"zero_stage": 3, "num_processes": 4, "dtype": "bfloat16", "offload_optimizer": True}, 7.6),  # 2 + 2 B / 4
])
def test_model_states_per_rank_follow_zero(fields, gb):
    assert model_state_bytes(int(B7), LearnerConfig(**fields))["total"] / 1e9 == pytest.approx(gb, rel=1e-9)


def test_a_learner_that_cannot_fit_is_one_line_naming_what_to_change():
    cfg = LearnerConfig(zero_stage=3, num_processes=1, dtype="bfloat16")
    with pytest.raises(DoesNotFit) as err:
        check_learner_memory(int(B7), cfg, 80e9, "GPU H100")
    text = str(err.value)
    assert "\n" not in text and "121.6 GB per rank" in text and "GPU H100 has 80.0 GB" in text
    assert "learner.num_processes" in text and "learner.offload_optimizer" in text
    assert check_learner_memory(int(B7), cfg.model_copy(update={"num_processes": 4}), 80e9, "GPU") == 30.4e9


def test_parameters_and_version_bytes_come_from_the_safetensors_headers(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_model(tmp_path / "m")
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).state_dict().values())
    assert count_parameters(path) == n > 0
    assert weight_bytes(path, "auto") == 4 * n == 2 * weight_bytes(path, "bfloat16")
