"""What the learner's model states take per rank, and the check made before the engine is built.

Model states per parameter (ZeRO paper's accounting, AdamW):
    float32:  weights 4 B + gradients 4 B + optimizer 8 B (two fp32 moments)                 = 16 B
    bfloat16: weights 2 B + gradients 2 B + optimizer 12 B (fp32 master weights + moments)    = 16 B
ZeRO divides by the number of ranks N: stage >= 1 the optimizer states, >= 2 the gradients, 3 the weights too.
`offload_optimizer` moves the optimizer states to host memory. Activations (micro-batch and loss-head sized, see
learner/head.py) come on top: this is a necessary condition, not a sufficient one, and it fails in one line
instead of an out-of-memory minutes into the run.
"""

from __future__ import annotations

from pathlib import Path

from learner.config import LearnerConfig

GB = 1e9


class DoesNotFit(RuntimeError):
    """A preflight check failed; the message is one line naming the settings to change."""


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "BF16", "F16"}


def _tensors(model_dir: str | Path) -> list[tuple[int, str]]:
    """(elements, safetensors dtype) of each tensor of a Hugging Face folder, from the headers (nothing loaded)."""
    from safetensors import safe_open

    out = []
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = f.get_slice(name)
                n = 1
                for d in piece.get_shape():
                    n *= d
                out.append((n, piece.get_dtype()))
    return out


def count_parameters(model_dir: str | Path) -> int:
    return sum(n for n, _ in _tensors(model_dir))


def weight_bytes(model_dir: str | Path, dtype: str) -> int:
    """Bytes of one published version: floating-point tensors in `dtype` ("auto": as saved), others as saved."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype)
    return sum(n * (size if size and t in _FLOATS else _ITEMSIZE.get(t, 4)) for n, t in _tensors(model_dir))


def model_state_bytes(n_params: int, cfg: LearnerConfig) -> dict[str, float]:
    """Per-rank bytes on the device: weights, gradients, optimizer states, total (see the module docstring)."""
    bf16 = cfg.dtype == "bfloat16"
    n, stage = cfg.num_processes, cfg.zero_stage
    weights = n_params * (2 if bf16 else 4) / (n if stage >= 3 else 1)
    grads = n_params * (2 if bf16 else 4) / (n if stage >= 2 else 1)
    optim = 0.0 if cfg.offload_optimizer else n_params * (12 if bf16 else 8) / (n if stage >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optim, "total": weights + grads + optim}


def check_learner_memory(n_params: int, cfg: LearnerConfig, capacity_bytes: float, where: str) -> float:
    """Raise DoesNotFit when the model states of one rank exceed `capacity_bytes`; returns the bytes needed."""
    need = model_state_bytes(n_params, cfg)["total"]
    if need > capacity_bytes:
        raise DoesNotFit(
            f"the learner's weights, gradients and optimizer state need {need / GB:.1f} GB per rank "
            f"({n_params / 1e9:.2f}B parameters, {cfg.dtype}, ZeRO-{cfg.zero_stage}, {cfg.num_processes} rank(s)) and "
            f"{where} has {capacity_bytes / GB:.1f} GB: raise learner.num_processes, learner.zero_stage (3 shards the "
            "weights too) or set learner.offload_optimizer=true"
        )
    return need


def rank_memory(cfg: LearnerConfig) -> tuple[float, str]:
    """(bytes, what) one rank can hold: its GPU's memory, or on CPU this node's available RAM over the ranks."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[1]), f"GPU {torch.cuda.get_device_name()}"
    import psutil

    return psutil.virtual_memory().available / cfg.num_processes, f"this node's free RAM / {cfg.num_processes} rank(s)"
