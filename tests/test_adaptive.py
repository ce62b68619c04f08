"""Adaptive staleness: the controller's rule on synthetic signals (buffer/adaptive.py), the bound through Redis
(admission and the learner's rule read it), and a short train in which the bound moves."""

from __future__ import annotations

import json

import pytest

from buffer.adaptive import AdaptiveConfig, BoundController, Signals
from buffer.config import BufferConfig
from tests.buffer_helpers import make_group

CFG = AdaptiveConfig(min_staleness=1, max_staleness=8, target_masked=0.05, target_m2=0.5, idle_target=0.2, window=3)
WAITING = Signals(idle_s=0.5, step_s=0.5, masked_fraction=0.0)  # the learner waits half its time, nothing masked
DRIFTING = Signals(idle_s=0.0, step_s=1.0, masked_fraction=0.2)
CALM = Signals(idle_s=0.05, step_s=1.0, masked_fraction=0.01)  # neither: inside the dead band


def run(ctrl: BoundController, signals: Signals, updates: int, start: int = 1) -> list[tuple[int, int, str]]:
    changes = [ctrl.observe(v, signals) for v in range(start, start + updates)]
    return [(c.old, c.new, c.reason) for c in changes if c is not None]


def test_a_waiting_learner_doubles_the_bound_until_the_first_drift_then_raises_it_one_step_per_window():
    ctrl = BoundController(CFG, bound=1)
    assert run(ctrl, WAITING, 2) == []  # mid-window: no decision
    assert run(ctrl, WAITING, 1, start=3) == [(1, 2, "idle")]
    assert run(ctrl, WAITING, 30, start=4) == [(2, 4, "idle"), (4, 8, "idle")]  # slow start
    assert ctrl.bound == 8  # the top, and it stays there
    assert run(ctrl, DRIFTING, 3, start=34) == [(8, 4, "drift")]
    assert run(ctrl, WAITING, 30, start=37) == [(b, b + 1, "idle") for b in range(4, 8)]  # additive from now on
    zero = BoundController(AdaptiveConfig(min_staleness=0, max_staleness=5, window=1), bound=0)
    assert run(zero, WAITING, 5) == [(0, 1, "idle"), (1, 2, "idle"), (2, 4, "idle"), (4, 5, "idle")]  # capped


def test_drift_halves_the_bound_down_to_the_bottom():
    ctrl = BoundController(CFG, bound=8)
    assert run(ctrl, DRIFTING, 30) == [(8, 4, "drift"), (4, 2, "drift"), (2, 1, "drift")]
    assert ctrl.bound == 1
    m2_only = BoundController(CFG, bound=4)  # M2 before masking past its target is drift too
    assert run(m2_only, Signals(0.5, 0.5, 0.0, m2_before=0.9), 3) == [(4, 2, "drift")]


def test_drift_wins_over_idle_and_idle_needs_masking_well_below_target():
    assert run(BoundController(CFG, bound=4), Signals(0.9, 0.1, masked_fraction=0.2), 3) == [(4, 2, "drift")]
    # waiting, but masking between half the target and the target: hold (the dead band)
    assert run(BoundController(CFG, bound=4), Signals(0.9, 0.1, masked_fraction=0.04), 30) == []


def test_steady_signals_never_oscillate():
    for signals in (WAITING, DRIFTING, CALM):
        ctrl = BoundController(CFG, bound=4)
        bounds = []
        for v in range(1, 91):
            ctrl.observe(v, signals)
            bounds.append(ctrl.bound)
        moves = [b - a for a, b in zip(bounds, bounds[1:]) if b != a]
        assert all(m > 0 for m in moves) or all(m < 0 for m in moves), (signals, bounds)  # one direction only
        assert bounds[-30:] == [bounds[-1]] * 30  # settled
    assert run(BoundController(CFG, bound=4), CALM, 60) == []


def test_by_default_drift_is_m2_past_m2pos_budget():
    """The defaults cut the bound when M2 before masking passes 0.04 (τ), though almost nothing is masked."""
    waiting_but_drifted = Signals(idle_s=0.5, step_s=0.5, masked_fraction=0.003, m2_before=0.2)
    assert run(BoundController(AdaptiveConfig(), bound=4), waiting_but_drifted, 5) == [(4, 2, "drift")]
    waiting_close = Signals(idle_s=0.5, step_s=0.5, masked_fraction=0.003, m2_before=0.03)
    assert run(BoundController(AdaptiveConfig(), bound=4), waiting_close, 5) == [(4, 6, "idle")]  # slow start, capped


def test_a_window_decides_on_its_means_not_its_last_update():
    ctrl = BoundController(CFG, bound=4)
    ctrl.observe(1, DRIFTING)  # masked 0.2, then two clean updates: mean 0.067 > 0.05 is still drift
    ctrl.observe(2, WAITING)
    assert ctrl.observe(3, WAITING).reason == "drift"


def test_the_config_refuses_what_it_would_ignore():
    with pytest.raises(ValueError, match="min_staleness=5 is above max_staleness=2"):
        AdaptiveConfig(min_staleness=5, max_staleness=2)
    with pytest.raises(ValueError, match="buffer.adaptive is the adaptive policy's controller"):
        BufferConfig(policy="bounded", adaptive={"window": 2})
    with pytest.raises(ValueError, match="starting bound max_staleness=9 is outside"):
        BufferConfig(policy="adaptive", max_staleness=9, capacity_groups=1000)
    with pytest.raises(ValueError, match=r"below \(adaptive.max_staleness \+ updates_per_batch\)"):
        BufferConfig(policy="adaptive", batch_groups=16, capacity_groups=64)


def test_admission_and_the_learners_rule_follow_the_bound_in_redis(buffer_factory):
    """adaptive is bounded with s from Redis: the grant window and the take/drop rule move when it moves."""
    buf = buffer_factory(policy="adaptive", max_staleness=1, batch_groups=2, capacity_groups=64,
                         adaptive={"min_staleness": 0, "max_staleness": 8})
    assert buf.bound() == 1
    assert buf.admit("w", 100).granted == (1 + 0 + 1) * 2  # (s + V + 1) * B
    buf.set_bound(4)
    assert buf.admit("w", 100).granted == 3 * 2  # the window grew with the bound
    assert buf.stats().max_staleness == 4
    for v in (0, 2):
        buf.push(make_group(v, gid=f"v{v}"), "w")
    buf.set_version(4)
    buf.set_bound(2)  # drift: the learner cuts the bound; data made under the old one is now too stale
    got = buf.pull(2, block_ms=200)
    assert [e.group.group_id for e in got] == ["v2"] and buf.stats().drops == {"too_stale": 1}
    with pytest.raises(ValueError, match="adaptive policy's"):
        buffer_factory(policy="bounded").set_bound(3)


@pytest.mark.slow
def test_a_short_train_in_which_the_bound_moves(tmp_path):
    """policy=adaptive from s = 4 with targets every update misses (any masked token or any M2 is drift): the
    controller halves the bound once per window, logs each change with its reason, and the learner trains on
    what the bound in force allows."""
    from tests.test_train_e2e import SHORT, read_jsonl, staleflow

    out = staleflow(["train", *SHORT, "learner.total_steps=6", "learner.eval_every=0", "buffer.policy=adaptive",
                     "buffer.max_staleness=4", "buffer.capacity_groups=64", "buffer.adaptive.min_staleness=1",
                     "buffer.adaptive.max_staleness=4", "buffer.adaptive.target_masked=0",
                     "buffer.adaptive.target_m2=0", "buffer.adaptive.window=2",
                     f"runs_dir={tmp_path}", "name=adapt"], timeout=1800)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    changes = read_jsonl(tmp_path / "adapt" / "adaptive.jsonl")
    assert [(c["version"], c["old"], c["new"], c["reason"]) for c in changes] == [(2, 4, 2, "drift"),
                                                                                (4, 2, 1, "drift")]
    assert all(c["m2"] > 0 for c in changes)  # what it saw: the measured drift
    records = [r for r in read_jsonl(tmp_path / "adapt" / "metrics.jsonl") if "policy/version" in r]
    assert [r["staleness/bound"] for r in records] == [4, 2, 2, 1, 1, 1]
    # each update trained within the bound in force when it pulled (the one before its own change)
    assert all(r["staleness/max"] <= b for r, b in zip(records, [4, 4, 2, 2, 1, 1])), records
    assert json.loads((tmp_path / "adapt" / "adaptive.jsonl").read_text().splitlines()[0])["idle"] >= 0
