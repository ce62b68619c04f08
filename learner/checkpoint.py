"""Checkpoints: model + optimizer (DeepSpeed), policy version, RNG states, and the buffer position.

Layout under `root`:
    v00000012/            engine.save_checkpoint tag (model, optimizer, scheduler states)
    v00000012/staleflow.json   version, unacked buffer entry ids, RNG states (JSON: nothing to unpickle)
    latest                     the tag of the newest complete checkpoint (written tmp + fsync + rename)

Exactly-once protocol with the buffer: entries are acked only after the checkpoint covering their update is
durable. The checkpoint records the ids it covers that were not acked yet; on resume they are acked first (the
process may have died between save and ack). Entries used by updates after the checkpoint were never acked,
so the buffer delivers them again and those updates are redone.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

META = "staleflow.json"


@dataclass
class CheckpointState:
    version: int
    unacked_ids: list[str]
    path: Path
    extra: dict = field(default_factory=dict)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a torn file, even across a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def _tag(version: int) -> str:
    return f"v{version:08d}"


class CheckpointManager:
    """Save/load checkpoints of a `learner.trainer.Trainer` under `root`, keeping the newest `keep`."""

    def __init__(self, root: str | Path, keep: int):
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / META).exists() else None

    def save(self, trainer, unacked_ids: list[str], extra: dict | None = None) -> Path:
        """Collective (every rank calls it). Returns the checkpoint directory once it is durable."""
        tag = _tag(trainer.version)
        engine = trainer.engine
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        path = self.root / tag
        if dist.is_initialized():
            dist.barrier()
        if trainer.rank == 0:
            meta = {
                "version": trainer.version,
                "unacked_ids": list(unacked_ids),
                "rng": _rng_state(),
                "extra": extra or {},
            }
            _fsync_tree(path)
            write_atomic(path / META, json.dumps(meta))
            write_atomic(self.root / "latest", tag)
            self._prune(keep_tag=tag)
        if dist.is_initialized():
            dist.barrier()
        return path

    def load(self, trainer) -> CheckpointState | None:
        """Restore the newest checkpoint into `trainer` (collective); None when there is none."""
        path = self.latest()
        if path is None:
            return None
        loaded, _ = trainer.engine.load_checkpoint(str(self.root), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        meta = json.loads((path / META).read_text())
        trainer.version = int(meta["version"])
        _set_rng_state(meta["rng"])
        return CheckpointState(meta["version"], meta["unacked_ids"], path, meta.get("extra", {}))

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("v"))
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != keep_tag:
                shutil.rmtree(self.root / old, ignore_errors=True)


TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges")


def save_final(trainer, out_dir: str | Path, model_dir: str | Path, bucket_bytes: int = 256 << 20) -> Path:
    """The trained policy as a folder that transformers and vLLM load: weights (safetensors, the training dtype),
    config, and the starting model's tokenizer files. Collective: under ZeRO-3 the module holds only partitions,
    so every rank takes part in gathering them, a bucket's worth at a time; rank 0 writes."""
    from learner.publisher import zero3_named_params

    module = trainer.engine.module
    named = list(module.named_parameters())  # tied parameters appear once; save_pretrained re-ties them
    if any(hasattr(p, "ds_id") for _, p in named):
        tensors = dict(zero3_named_params(named, bucket_bytes, None))  # empty on ranks other than 0
    else:
        tensors = {name: p.detach() for name, p in named}
    out = Path(out_dir)
    if trainer.rank == 0:
        module.save_pretrained(out, state_dict=tensors, safe_serialization=True)
        for f in Path(model_dir).iterdir():
            if f.is_file() and f.name.startswith(TOKENIZER_FILES):
                shutil.copy2(f, out / f.name)
    if dist.is_initialized():
        dist.barrier()
    return out
