"""Peak memory of the loss head (learner/head.py), whole vs in chunks of tokens, forward + backward.

    .venv/bin/python benchmarks/learner_memory.py [--tokens 16384] [--vocab 151936] [--hidden 256]

1. Tracked at full size (Qwen's vocabulary 151,936, hidden 256, 16k tokens): the whole head needs ~37 GiB, more
   than this machine has, so it runs under torch's FakeTensorMode (no storage is allocated) with
   torch.distributed._tools.mem_tracker.MemTracker counting every tensor from its creation to its release: the
   peak of live tensors, the figure that decides an out-of-memory on a GPU.
2. Measured for real at a size that fits (2,048 tokens): each variant in its own process, peak RSS minus the RSS
   before the head runs, beside the tracked figure for the same size (do the two agree?).
Prints JSON: peak GiB per chunk size and chunked / whole ratios (lower is better); the goal is >= 8x less.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def _inputs(vocab: int, hidden: int, tokens: int):  # noqa: ANN202
    import torch

    weight = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.02)
    x = torch.randn(tokens, hidden, requires_grad=True)
    ids = torch.randint(0, vocab, (tokens,))
    # A function, not an nn.Linear: MemTracker refuses a module called once per chunk.
    return weight, x, ids, lambda h: torch.nn.functional.linear(h, weight)


def _step(head, x, ids, chunk: int) -> None:  # noqa: ANN001
    from learner.head import token_logp

    logp, _ = token_logp(head, x, ids, chunk_tokens=chunk, with_entropy=True)
    logp.sum().backward()


def tracked_peak(vocab: int, hidden: int, tokens: int, chunk: int) -> float:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        weight, x, ids, head = _inputs(vocab, hidden, tokens)
        tracker = MemTracker()
        tracker.track_external(weight, x, ids)
        with tracker:
            _step(head, x, ids, chunk)
        peak = tracker.get_tracker_snapshot("peak")
    return sum(dev["Total"] for dev in peak.values()) / GIB


def measured_peak(vocab: int, hidden: int, tokens: int, chunk: int) -> float:
    """In a fresh process: peak RSS during forward + backward, minus the RSS once the inputs exist."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import resource, sys, json; sys.path.insert(0, {root!r})\n"
        "from benchmarks.learner_memory import _inputs, _step\n"
        f"w, x, ids, head = _inputs({vocab}, {hidden}, {tokens})\n"
        "import torch; torch.nn.functional.linear(x[:1], w)\n"  # warm the kernels outside the measurement
        "before = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
        f"_step(head, x, ids, {chunk})\n"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4096, 2048, 1024])
    ap.add_argument("--measured-tokens", type=int, default=2048)
    ap.add_argument("--measured-chunk", type=int, default=256)
    a = ap.parse_args()

    whole = tracked_peak(a.vocab, a.hidden, a.tokens, 0)
    tracked = {str(c): round(tracked_peak(a.vocab, a.hidden, a.tokens, c), 3) for c in a.chunks}
    small = {c: tracked_peak(a.vocab, a.hidden, a.measured_tokens, c) for c in (0, a.measured_chunk)}
    real = {c: measured_peak(a.vocab, a.hidden, a.measured_tokens, c) for c in (0, a.measured_chunk)}
    print(json.dumps({
        "vocab": a.vocab, "hidden": a.hidden,
        "tracked": {
            "tokens": a.tokens, "whole_gib": round(whole, 3), "chunked_gib": tracked,
            "chunked_over_whole": {c: round(v / whole, 4) for c, v in tracked.items()},
        },
        "measured": {
            "tokens": a.measured_tokens, "chunk": a.measured_chunk,
            "whole_gib": round(real[0], 3), "chunked_gib": round(real[a.measured_chunk], 3),
            "chunked_over_whole": round(real[a.measured_chunk] / real[0], 4),
            "tracked_whole_gib": round(small[0], 3), "tracked_chunked_gib": round(small[a.measured_chunk], 3),
        },
        "ru_maxrss_unit": "KiB (Linux)", "pagesize": resource.getpagesize(),
    }, indent=1))


if __name__ == "__main__":
    main()
