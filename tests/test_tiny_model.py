"""The tiny CPU model: tokenizer, deterministic build, caching, loadability (warm start kept short here)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout_worker.tiny_model import (
    DEFAULT_WARM_START,
    EOS_ID,
    STAMP,
    WarmStart,
    _recipe_fields,
    _sft_batches,
    _without_carries,
    build_tiny_model,
    build_tokenizer,
    ensure_tiny_model,
    recipe_hash,
    warm_start_for,
)

SHORT = WarmStart(steps=3, batch_size=8)


def test_tokenizer_round_trip() -> None:
    tok = build_tokenizer()
    for text in ["12+34=46", "a b\n  c", "Let's think: \\boxed{1/2}."]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode([*tok("7")["input_ids"], EOS_ID], skip_special_tokens=True) == "7"
    assert tok("é")["input_ids"][1] == tok.unk_token_id


def test_flawed_teacher_drops_only_carries() -> None:
    assert _without_carries("12+7=") == "19"  # no carry: the right answer
    assert _without_carries("18+5=") == "13"  # carry dropped (right: 23)
    assert _without_carries("23-5=") == "28"  # borrow dropped (right: 18)


def test_the_long_addition_warm_start_teaches_worked_sums_with_some_carries_dropped() -> None:
    """The long task's teacher: every answer is a worked sum of its prompt's operands, the prompt masked out of
    the loss; some carries dropped (at carry_drop = 0.6 about 60% of them), so the model learns both ways."""
    from rollout_worker.tasks.long_addition import LongAdditionTask, worked_sum

    ws = warm_start_for("long_addition", 3)
    assert (ws.task, ws.digits) == ("long_addition", 3) and warm_start_for("arithmetic") == DEFAULT_WARM_START
    assert recipe_hash(0, ws) != recipe_hash(0)  # its own build, its own cache stamp
    tok = build_tokenizer()
    ids, labels = next(_sft_batches(tok, ws, seed=0))
    held = {p.id for p in LongAdditionTask(digits=3).eval_prompts()}
    carries = dropped = 0
    for row, lab in zip(ids.tolist(), labels.tolist()):
        answer_at = next(i for i, x in enumerate(lab) if x != -100)
        prompt = tok.decode(row[:answer_at], skip_special_tokens=True)
        answer = tok.decode([x for x in lab[answer_at:] if x not in (-100, EOS_ID)])
        assert prompt.endswith("=") and prompt[:-1] not in held  # training prompts only
        a, b = (int(x) for x in prompt[:-1].split("+"))
        right = worked_sum(a, b)
        assert answer.split(";")[0].count(",") == 2 and len(answer) >= 25  # three columns worked
        # a step's carry-in is the previous step's tens digit, and the last step's tens digit leads the sum,
        # unless the teacher dropped that carry
        steps, total = answer.split(";")
        sums = [int(s.split("=")[1]) for s in steps.split(",")]
        carry_in = [int(s.split("=")[0].split("+")[2]) for s in steps.split(",")]
        lost = [prev >= 10 and cin == 0 for prev, cin in zip(sums, carry_in[1:])]
        lost.append(sums[-1] >= 10 and int(total) < 10 ** len(sums))  # the carry out of the last column
        carries += sum(prev >= 10 for prev in sums)
        dropped += sum(lost)
        assert (answer == right) == (not any(lost)), (answer, right)
    assert carries > 20 and 0.35 < dropped / carries < 0.85, (carries, dropped)


def test_a_wider_tiny_model_is_its_own_build_and_the_demos_stamp_stays(tmp_path) -> None:
    """model.tiny_hidden=256: a model twice as wide (32-wide heads, as vLLM's CPU attention needs), its own
    recipe; the 128-wide builds keep the stamp they had before the width was part of the recipe."""
    from safetensors import safe_open

    wide = replace(SHORT, hidden_size=256)
    assert recipe_hash(0, wide) != recipe_hash(0, SHORT)
    assert "hidden_size" not in _recipe_fields(SHORT)  # so cached 128-wide builds are not rebuilt
    out = build_tiny_model(tmp_path / "w", seed=0, warm_start=wide)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [768, 256]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [128, 256]  # 4 kv heads of 32


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    a = build_tiny_model(root / "a", seed=0, warm_start=SHORT)
    b = build_tiny_model(root / "b", seed=0, warm_start=SHORT)
    c = build_tiny_model(root / "c", seed=1, warm_start=SHORT)
    return a, b, c


def test_same_seed_same_bytes(built) -> None:
    a, b, c = built
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_build_leaves_torch_settings_alone(tmp_path) -> None:
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    build_tiny_model(tmp_path / "m", seed=0, warm_start=False)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
    assert not torch.are_deterministic_algorithms_enabled()


def test_loads_in_transformers_and_generates(built) -> None:
    path = built[0]
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention
    assert cfg.eos_token_id == tok.eos_token_id == EOS_ID
    enc = tok(["12+7=", "3+4="], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 4


def test_ensure_reuses_matching_build_and_rebuilds_on_change(tmp_path) -> None:
    out = ensure_tiny_model(tmp_path / "m", seed=0, warm_start=SHORT)
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path / "m", seed=0, warm_start=SHORT) == out
    assert weights.stat().st_mtime_ns == mtime  # reused: stamp matched
    (out / STAMP).write_text("{}")  # a stale or foreign stamp forces a rebuild
    ensure_tiny_model(tmp_path / "m", seed=0, warm_start=SHORT)
    assert weights.stat().st_mtime_ns != mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.") and p.is_dir()]  # no temp left
