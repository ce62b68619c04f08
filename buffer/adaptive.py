"""Adaptive staleness: the `adaptive` policy's bound s(t), moved by what the learner measures.

`adaptive` is `bounded` (buffer/staleness.py) whose bound s lives in Redis (P:state `bound`) and moves. Once
every `window` updates the learner (rank 0) feeds this controller the window's means and applies its answer:

    idle   = sum(learner/idle_s) / sum(learner/idle_s + time/step_s)   the share of time the learner waited
    masked = mean(loss/masked_fraction)      (M2PO's masked tokens; clip losses: their clip fraction)
    m2     = mean(m2po/m2_before)            (0 for losses that do not measure it)

    drift  = masked > target_masked  or  (target_m2 is set and m2 > target_m2)
    wait   = idle > idle_target  and  masked <= target_masked / 2
    s'     = max(s_min, s // 2)              if drift                                 ("drift")
             min(s_max, max(2 s, s + 1))     elif wait and no drift seen yet          ("idle": slow start)
             min(s_max, s + 1)               elif wait                                ("idle")
             s                               otherwise

TCP's congestion control, with drift for loss: the bound doubles per window while the learner waits and no
window has drifted yet (slow start: from s_min = 1 it reaches 8 in 3 windows, where one step per window took
7; measured in benchmarks/adaptive.py, docs/benchmarks.md), then, once the data has drifted, a cut halves it
and throughput is bought back one step at a time (additive increase, multiplicative decrease). The dead band
between `target_masked / 2` and `target_masked` and one decision per window keep it from oscillating: under
steady signals it moves monotonically to a bound (or s_min / s_max) and stays there. Every change is returned
with its reason and the window's signals, for the run's log (runs/<name>/adaptive.jsonl). Pure: no Redis, no
clock; tests feed it synthetic signals.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AdaptiveConfig(BaseModel):
    """`buffer.adaptive`: the controller's bounds and targets (read only by policy=adaptive)."""

    model_config = ConfigDict(extra="forbid")

    min_staleness: int = Field(1, ge=0, description="The lowest bound the controller sets.")
    max_staleness: int = Field(6, ge=0, description="The highest bound (capacity_groups must hold it: (6 + 1) x 16 "
                               "= 112 <= 128 with the default batch).")
    target_masked: float = Field(0.05, ge=0, le=1, description="Cut the bound when the masked (or clipped) "
                                 "token fraction exceeds this; raise it only below half of it.")
    # 0.04 = M2PO's own budget τ. The masked fraction alone is too quiet to steer by: in benchmarks/adaptive.py
    # at lr 3e-4 it stayed at 0.04-0.36% at every bound while M2 went 0.005 (s = 1) -> 0.46 (s = 16) and bounds
    # of 8-16 lost 21 points of accuracy (docs/benchmarks.md).
    target_m2: float | None = Field(0.04, ge=0, description="Also cut when M2 before masking exceeds this "
                                    "(None: the masked fraction alone; losses without M2 report 0).")
    idle_target: float = Field(0.2, ge=0, le=1, description="Raise the bound when the learner waits for data "
                               "more than this share of its time.")
    window: int = Field(5, ge=1, description="Updates per decision.")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveConfig:
        if self.min_staleness > self.max_staleness:
            raise ValueError(f"buffer.adaptive.min_staleness={self.min_staleness} is above "
                             f"max_staleness={self.max_staleness}")
        return self


@dataclass(frozen=True)
class Signals:
    """One update's measurements (the learner's metrics of that update)."""

    idle_s: float
    step_s: float
    masked_fraction: float
    m2_before: float = 0.0


@dataclass(frozen=True)
class BoundChange:
    version: int
    old: int
    new: int
    reason: str  # "drift" | "idle"
    idle: float
    masked: float
    m2: float


class BoundController:
    """s(t) for the adaptive policy: `observe` once per update; a BoundChange when the bound moves."""

    def __init__(self, cfg: AdaptiveConfig, bound: int):
        self.cfg = cfg
        self.bound = min(max(bound, cfg.min_staleness), cfg.max_staleness)
        self._window: list[Signals] = []
        self._slow_start = True  # until the first drift

    def observe(self, version: int, signals: Signals) -> BoundChange | None:
        self._window.append(signals)
        if len(self._window) < self.cfg.window:
            return None
        w, self._window = self._window, []
        busy = sum(s.idle_s + s.step_s for s in w)
        idle = sum(s.idle_s for s in w) / busy if busy > 0 else 0.0
        masked = sum(s.masked_fraction for s in w) / len(w)
        m2 = sum(s.m2_before for s in w) / len(w)
        c = self.cfg
        if masked > c.target_masked or (c.target_m2 is not None and m2 > c.target_m2):
            new, reason = max(c.min_staleness, self.bound // 2), "drift"
            self._slow_start = False
        elif idle > c.idle_target and masked <= c.target_masked / 2:
            step = max(self.bound, 1) if self._slow_start else 1
            new, reason = min(c.max_staleness, self.bound + step), "idle"
        else:
            return None
        if new == self.bound:
            return None
        change = BoundChange(version, self.bound, new, reason, idle, masked, m2)
        self.bound = new
        return change


__all__ = ["AdaptiveConfig", "BoundChange", "BoundController", "Signals"]
