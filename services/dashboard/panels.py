"""The dashboard's panels, one list shared by the web page (served as /api/panels) and `staleflow plot`.

A panel lists metric names; each name is looked up per run in eval.jsonl, then metrics.jsonl (learner
records), then rollout.jsonl (one series per worker). A name ending in "/" is a prefix: every matching name
is a series (buffer/drops/<reason>). Panels that show rollout series are drawn against wall time, the others
against the learner step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Panel:
    id: str
    title: str
    keys: tuple[str, ...]
    kind: Literal["line", "heatmap"] = "line"
    unit: str = ""
    log_y: bool = False
    help: str = ""


PANELS: tuple[Panel, ...] = (
    Panel("staleness_hist", "Staleness histogram over time", ("staleness/hist",), kind="heatmap",
          unit="versions behind", help="Share of each learner batch by staleness (policy versions behind)."),
    Panel("staleness", "Staleness mean / max", ("staleness/mean", "staleness/max"), unit="versions"),
    Panel("buffer_depth", "Buffer depth", ("buffer/depth",), unit="trajectories"),
    Panel("buffer_age", "Buffer oldest age", ("buffer/oldest_age_s",), unit="s"),
    Panel("buffer_drops", "Buffer drops & dead letters", ("buffer/drops/", "buffer/dead_letters"),
          unit="count"),
    Panel("version_lag", "Rollout version lag per worker", ("rollout/version_lag",), unit="versions"),
    Panel("reward", "Reward (train)", ("reward/mean",)),
    Panel("accuracy", "Held-out accuracy: greedy and sampled avg@k", ("eval/accuracy", "eval/avg_at_k"),
          help="avg@k: k samples per prompt at the rollout temperature (task.eval_samples)."),
    Panel("m2", "M2 before / after masking", ("m2po/m2_before", "m2po/m2_after", "m2po/tau"),
          help="Second moment of the log-ratio; M2PO masks tokens until M2 <= tau."),
    Panel("masked", "Masked / clipped token fraction", ("loss/masked_fraction", "loss/clip_fraction")),
    Panel("ratio", "Importance ratio max", ("ratio/max",), log_y=True),
    Panel("entropy", "Entropy: masked/clipped tokens vs all", ("entropy", "entropy/removed"), unit="nats",
          help="Mean entropy of the tokens whose gradient the loss removed, beside all tokens'. Clipping tends "
               "to remove high-entropy (pivotal) tokens; M2PO few."),
    Panel("ess", "Effective sample size fraction", ("ratio/ess_fraction",),
          help="(sum r)^2 / (n sum r^2): 1 when every importance ratio is equal; low when a few tokens dominate."),
    Panel("throughput", "Throughput", ("throughput/train_tokens_per_s", "rollout/tokens_per_s"),
          unit="tokens/s"),
    Panel("idle", "Idle time", ("learner/idle_s", "rollout/idle_s"), unit="s"),
    Panel("weights", "Weight sync", ("weights/publish_s", "weights/put_s", "weights/fetch_s"), unit="s",
          help="publish_s: what an update waits for; put_s: the part off the step (weights.background)."),
    Panel("bound", "Staleness bound (adaptive)", ("staleness/bound", "staleness/max"),
          help="buffer.policy=adaptive: the bound the controller sets from drift and idle time "
               "(runs/<name>/adaptive.jsonl has each change and why), beside the staleness trained on."),
    Panel("kept", "Weight versions kept", ("weights/kept",),
          help="Newest weights.keep_versions plus the versions pinned for slots not filled yet (fixed)."),
    Panel("step_time", "Learner step time", ("time/step_s",), unit="s"),
    Panel("mismatch", "KL & train/inference mismatch", ("kl/k3", "mismatch/abs_logp_diff"), log_y=True),
)


def panels_json() -> list[dict]:
    return [asdict(p) for p in PANELS]
