"""The deterministic tiny Qwen2 model that CPU runs (the demo, CI, tests) train: built by our own code.

The recipe: a character-level tokenizer (printable ASCII), a ~0.6M-parameter Qwen2, seeded random init, then
a short supervised warm start on the arithmetic task (teacher-forced answers) so RL starts from a policy that
is right sometimes. The same seed gives the same bytes on the same software and CPU: seeded init, one torch
thread, deterministic algorithms, no data-loader workers. `ensure_tiny_model` caches a build behind a stamp
holding the recipe hash and rebuilds when the recipe (or torch/transformers version) changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
# Printable ASCII plus newline: enough for arithmetic and any ASCII prompt template, still a tiny embedding.
CHARS = ("\n", *(chr(c) for c in range(32, 127)))
STAMP = ".staleflow-tiny.json"
RECIPE_VERSION = 2


@dataclass(frozen=True)
class WarmStart:
    """The supervised warm start: teacher-forced arithmetic answers, loss on the answer (+ <eos>) only.

    The flawed teacher (below) fixes what the warm start believes: every no-carry problem right, every carry
    problem wrong by greedy decoding but with the right answer ~30% likely. A model that has converged to that
    answers the held-out set at ~0.5 (105 of its 200 problems need no carry), whatever the CPU, and RL has a
    clear signal on every carry problem. Recipe 1 (constant lr, 1250 steps, weight decay 0.01) stopped before
    that on many seeds and CPUs: held-out accuracy 0.015-0.56 over seeds 0-4 on one machine (seed 2 never left
    the loss plateau), and RL from the half-learned starts (no-carry problems 50-70% right) levelled off at
    0.65-0.71, because RL cannot teach a model this small addition itself in minutes. Recipe 2 (cosine decay,
    2500 steps, weight decay 0.1) converges: docs/demo.md has the table over seeds x CPU dispatch settings.
    """

    steps: int = 2500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    # After the warm-up the lr decays along a cosine to min_lr_ratio * lr (1.0 = constant): the low-lr tail
    # is what lets every seed settle instead of stopping wherever a constant lr left it.
    min_lr_ratio: float = 0.05
    # Weight decay 0.1 (not 0.01): held-out (never seen) problems are answered by the addition rule, not by
    # memorised pairs (seed 4, 2500 steps: no-carry problems 0.88 right with 0.01, 0.94 with 0.1).
    weight_decay: float = 0.1
    # The task the warm start teaches: must match the demo's task (TaskConfig.arithmetic_* defaults).
    max_operand: int = 29
    ops: str = "+"
    data_seed: int = 12345
    # A flawed teacher: on problems that need a carry (or borrow) it drops it this often. The policy then
    # knows the right answer but greedily prefers the wrong one on those problems: right sometimes, with a
    # clear reward signal for RL to sharpen (RL cannot teach a model this small the carry rule itself in
    # minutes; it can flip a preference).
    carry_drop: float = 0.7
    # "arithmetic" (the demo) or "long_addition" (the long-answer task: `digits`-digit operands, answers worked
    # column by column; the flawed teacher drops each carry with probability carry_drop, and its sum follows
    # its own columns).
    task: str = "arithmetic"
    digits: int = 3
    # The model it warms up is part of the recipe: its width (128: the demo's; 256: 4x the parameters, a
    # generation-heavier CPU workload, #16). Heads of 32 (vLLM's CPU attention needs >= 32), MLP 3x the width.
    hidden_size: int = 128


DEFAULT_WARM_START = WarmStart()
# The long-answer task's warm start (docs/experiment-staleness.md). Greedy decoding then writes no carry, so it
# answers the no-carry problems (~0.17 of 3-digit sums); sampled at T = 1 a problem with c carries is right with
# probability ~0.4^c (~0.35 over the held-out set): a long trace of copied digits in which the carries are the
# few pivotal tokens. Not tuned yet on every CPU: the build has not been measured (see the science issue's note).
LONG_ADDITION_WARM_START = WarmStart(task="long_addition", steps=4000, carry_drop=0.6)


def warm_start_for(task: str, digits: int = 3, hidden_size: int = 128) -> WarmStart:
    """The warm start that teaches `task` (the run's task.name): the demo's, or the long-answer task's, of a
    model `hidden_size` wide."""
    if task == "long_addition":
        return replace(LONG_ADDITION_WARM_START, digits=digits, hidden_size=hidden_size)
    return replace(DEFAULT_WARM_START, hidden_size=hidden_size)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, <bos> prepended on encode, <unk> for the rest."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character (newline and spaces included) is its own pre-token; Fuse joins them back losslessly.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="left",
    )


def tiny_config(vocab_size: int, num_hidden_layers: int = 3, hidden_size: int = 128) -> Qwen2Config:
    # 3 layers, not 2: after the same warm start a 2-layer model's RL plateau is ~0.80 (it never learns the
    # carry rule well enough); 3 layers plateau at ~0.90, the headroom the demo's >= 0.8 target needs.
    # head_dim 32 (128 / 4): vLLM's CPU attention rejects head_dim < 32. Tied embeddings like the small Qwen2.5
    # models, so the demo exercises the same weight-sync path (one tensor serves embed_tokens and lm_head).
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=max(2, hidden_size // 64),
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def recipe_hash(seed: int, warm_start: WarmStart | None = DEFAULT_WARM_START) -> str:
    """Everything the bytes depend on: our recipe, the seed, and the libraries that compute them."""
    tok = build_tokenizer()
    recipe = {
        "version": RECIPE_VERSION,
        "seed": seed,
        "config": tiny_config(len(tok), hidden_size=_hidden(warm_start)).to_diff_dict(),
        "vocab": tok.backend_tokenizer.to_str(),
        "warm_start": _recipe_fields(warm_start),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _recipe_fields(ws: WarmStart | None) -> dict | None:
    """The warm start's fields as hashed: the task fields only when they are not the demo's, so that the demo's
    cached builds stay valid (their bytes never depended on fields that did not exist yet)."""
    if ws is None:
        return None
    fields = asdict(ws)
    if ws.task == "arithmetic":
        del fields["task"], fields["digits"]
    if ws.hidden_size == 128:  # (the config above carries it)
        del fields["hidden_size"]
    return fields


def _hidden(ws: WarmStart | None) -> int:
    return 128 if ws is None else ws.hidden_size


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, warm_start: bool | WarmStart = True, log=print
) -> Path:
    """Write an HF model folder (config, safetensors, tokenizer, generation config) to `out_dir`."""
    ws = (DEFAULT_WARM_START if warm_start is True else warm_start) or None
    out = Path(out_dir)
    tok = build_tokenizer()
    with _deterministic(seed):
        model = Qwen2ForCausalLM(tiny_config(len(tok), hidden_size=_hidden(ws)))
        if ws is not None:
            t0 = time.perf_counter()
            loss = _warm_start(model, tok, ws, seed)
            log(f"tiny model: warm start {ws.steps} steps, final loss {loss:.4f}, {time.perf_counter() - t0:.1f}s")
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=16
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / STAMP).write_text(
        json.dumps({"recipe": recipe_hash(seed, ws), "seed": seed, "warm_start": asdict(ws) if ws else None})
    )
    return out


def ensure_tiny_model(
    out_dir: str | Path, seed: int = 0, force: bool = False, warm_start: WarmStart = DEFAULT_WARM_START
) -> Path:
    """The warm-started tiny model at `out_dir`, built once and reused while the recipe is unchanged.

    Safe to call from several processes at once (a worker and the learner): a file lock serializes builders,
    and a build is written to a temporary sibling folder and renamed into place, so readers never see half.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    want = recipe_hash(seed, warm_start)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _stamp_matches(out, want):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            build_tiny_model(tmp, seed=seed, warm_start=warm_start)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _stamp_matches(out: Path, want: str) -> bool:
    try:
        return json.loads((out / STAMP).read_text())["recipe"] == want and (out / "model.safetensors").exists()
    except (OSError, ValueError, KeyError):
        return False


class _deterministic:
    """Seeded RNG, one thread and deterministic kernels for the duration; restores the caller's settings."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._threads = torch.get_num_threads()
        self._det = torch.are_deterministic_algorithms_enabled()
        self._rng = torch.random.get_rng_state()
        # One thread: CPU matmul reduction order can depend on the thread count, and so would the bytes.
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_num_threads(self._threads)
        torch.use_deterministic_algorithms(self._det)
        torch.random.set_rng_state(self._rng)


def _teacher(ws: WarmStart, seed: int) -> Iterator[tuple[str, str]]:
    """Endless (prompt, the flawed teacher's answer) pairs of the warm start's task (training prompts only)."""
    rng = random.Random(ws.data_seed + seed)
    if ws.task == "long_addition":
        from rollout_worker.tasks.long_addition import LongAdditionTask, worked_sum

        for p in LongAdditionTask(digits=ws.digits).train_prompts(ws.data_seed + seed):
            a, b = (int(x) for x in p.id.split("+"))
            yield p.text, worked_sum(a, b, carry_drop=ws.carry_drop, rng=rng)
    elif ws.task == "arithmetic":
        from rollout_worker.tasks.arithmetic import ArithmeticTask

        for p in ArithmeticTask(max_operand=ws.max_operand, ops=ws.ops).train_prompts(ws.data_seed + seed):
            yield p.text, _without_carries(p.text) if rng.random() < ws.carry_drop else p.answer
    else:
        raise ValueError(f"no warm start for task {ws.task!r}: arithmetic or long_addition")


def _sft_batches(tok: PreTrainedTokenizerFast, ws: WarmStart, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches of prompt + answer + <eos>, prompt positions masked out (-100)."""
    stream = _teacher(ws, seed)
    while True:
        rows = []
        for _ in range(ws.batch_size):
            text, target = next(stream)
            prompt = tok(text)["input_ids"]
            answer = tok(target, add_special_tokens=False)["input_ids"] + [EOS_ID]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        # Right-padded: positions are then the same as at generation time for a single unpadded prompt.
        ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        yield ids, labels


def _without_carries(text: str) -> str:
    """The flawed teacher's answer to "a+b=" / "a-b=": each digit column on its own, carries/borrows dropped."""
    op = "+" if "+" in text else "-"
    a, b = text.rstrip("=").split(op)
    width = max(len(a), len(b))
    cols = [
        (int(x) + int(y)) % 10 if op == "+" else (int(x) - int(y)) % 10
        for x, y in zip(a.zfill(width), b.zfill(width))
    ]
    return str(int("".join(map(str, cols))))


def _warm_start(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, ws: WarmStart, seed: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=ws.weight_decay)

    def lr_factor(s: int) -> float:
        if ws.warmup_steps and s < ws.warmup_steps:
            return (s + 1) / ws.warmup_steps
        done = (s - ws.warmup_steps) / max(1, ws.steps - ws.warmup_steps)
        return ws.min_lr_ratio + (1 - ws.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    batches = _sft_batches(tok, ws, seed)
    loss = torch.tensor(float("nan"))
    for _ in range(ws.steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=(ids != PAD_ID).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())
