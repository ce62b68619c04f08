"""DeepSpeed's JIT-built ops, loaded so that a killed build cannot hang every later learner.

torch builds a C++ extension under a lock FILE (`torch.utils.file_baton.FileBaton`: created with O_EXCL, removed
by the builder when it is done). A builder killed mid-build (Ctrl-C during a first run, a learner's SIGKILL, a
test's teardown) leaves the file behind, and every later load of that op, in every process on the machine, polls
for it forever and prints nothing: each learner hangs in `deepspeed.init_distributed`. Seen here: one killed build,
then a CI run whose learners all hung until the 90-minute limit.

So:
- The shared-memory comm op (`deepspeed_shm_comm`) is never built. DeepSpeed's CPU backend uses it only for
  `inference_all_reduce` (AutoTP inference), never in training; skipping it also saves its ~25 s cold build.
- The ops we use (the `deepspeed` optimizer's FusedAdam or CPUAdam) are loaded here before DeepSpeed asks for them,
  holding an flock on `<build root>/staleflow.lock`. The kernel drops an flock when its holder dies, however it
  dies, and staleflow builds only while holding it: a torch lock file that the holder finds was left by a dead
  build, and is removed. DeepSpeed's own `load()` then returns the module this process already loaded. (Another
  program building the same op in the same build root at that moment would lose its lock file: give staleflow its
  own root with TORCH_EXTENSIONS_DIR if that can happen.)
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

log = logging.getLogger(__name__)

UNUSED_OPS = ("deepspeed_shm_comm",)


def skip_unused_ops() -> None:
    """Mark the ops training never calls as incompatible: DeepSpeed then neither builds nor loads them."""
    import deepspeed.ops

    for name in UNUSED_OPS:
        deepspeed.ops.__compatible_ops__[name] = False  # the probe's dict, cached in the module (edits persist)


def optimizer_op(optimizer: str, offload: bool) -> str | None:
    """The op builder DeepSpeed's AdamW needs (engine.get_optimizer_configuration), or None for torch's AdamW."""
    if optimizer != "deepspeed":
        return None
    return "CPUAdamBuilder" if offload else "FusedAdamBuilder"


def load_op(builder_name: str):  # noqa: ANN201 (the op's extension module)
    """Build (first time) and load one op under staleflow's build lock, clearing a lock file a killed build left."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(builder_name)
    build_dir = Path(_get_build_directory(builder.name, verbose=False))  # where torch's FileBaton lives
    with open(build_dir.parent / "staleflow.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process's build of DeepSpeed's %s", builder.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build of %s that was killed", stale, builder.name)
            stale.unlink()
        return builder.load()
