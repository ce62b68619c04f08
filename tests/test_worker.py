"""The rollout worker loop with a real vLLM CPU engine and a real Redis buffer (tests/conftest.py's server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from buffer.trajectory import decode_group

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from rollout_worker.tiny_model import ensure_tiny_model

    return ensure_tiny_model(REPO / ".cache/staleflow/tiny-model")


@pytest.fixture(scope="module")
def rollout_cfg():
    from rollout_worker.config import RolloutConfig

    return RolloutConfig(n=3, max_tokens=6, temperature=1.0, groups_per_batch=2, max_model_len=256)


@pytest.fixture(scope="module")
def engine(model_dir, rollout_cfg):
    from rollout_worker.engine import VLLMEngine

    eng = VLLMEngine(str(model_dir), rollout_cfg)
    yield eng
    eng.close()


class Registry:
    """The two callables the worker gets from services: the newest version, and a version's tensors."""

    def __init__(self, model_dir: Path, latest: int = 0):
        self.model_dir, self.latest, self.fetched = model_dir, latest, []

    def get_latest(self) -> int:
        return self.latest

    def fetch(self, version: int):
        from safetensors.torch import load_file

        self.fetched.append(version)
        return load_file(self.model_dir / "model.safetensors").items()


def stream_groups(buf):
    return [decode_group(fields[b"d"]) for _, fields in buf.r.xrange(f"{buf.cfg.prefix}:stream")]


def make_worker(engine, task, buf, cfg, registry, reports, worker_id="w0", **kwargs):
    from rollout_worker.config import TaskConfig
    from rollout_worker.worker import RolloutWorker

    return RolloutWorker(engine, task, buf, cfg, TaskConfig(), worker_id=worker_id, get_latest=registry.get_latest,
                         fetch=registry.fetch, report=lambda step, values: reports.append((step, dict(values))),
                         **kwargs)


def test_worker_pushes_well_formed_groups_and_loads_newer_weights(engine, buffer_factory, rollout_cfg, model_dir):
    from rollout_worker.tasks.arithmetic import ArithmeticTask
    from rollout_worker.tiny_model import BOS_ID

    buf = buffer_factory(policy="bounded", max_staleness=4, batch_groups=2)
    engine.update_weights(Registry(model_dir).fetch(0), 0)
    registry, reports = Registry(model_dir, latest=0), []
    worker = make_worker(engine, ArithmeticTask(), buf, rollout_cfg, registry, reports)
    assert worker.run(max_batches=1) == 1
    registry.latest = 1  # a newer version is published: the next batch must be generated with it
    assert worker.run(max_batches=1) == 1
    assert registry.fetched == [1]

    groups = stream_groups(buf)
    assert len(groups) == 4
    for i, g in enumerate(groups):
        version = 0 if i < 2 else 1
        assert len(g.trajectories) == rollout_cfg.n and g.slot is None
        assert len({t.meta["prompt_id"] for t in g.trajectories}) == 1
        for t in g.trajectories:
            assert t.prompt_ids[0] == BOS_ID and len(t.prompt_ids) > 1
            assert 1 <= len(t.response_ids) <= rollout_cfg.max_tokens
            assert len(t.behaviour_logp) == len(t.response_ids) == len(t.versions)
            assert np.isfinite(t.behaviour_logp).all() and (t.behaviour_logp <= 0).all()
            assert (t.versions == version).all() and t.version_min == t.version_max == version
            assert t.reward in (0.0, 1.0)
            assert t.worker_id == "w0" and t.finish_reason in ("stop", "length")
            assert t.t_start <= t.t_end

    assert [step for step, _ in reports] == [0, 1]
    last = reports[-1][1]
    for key in ("rollout/tokens_per_s", "rollout/version_lag", "rollout/batch_s", "reward/mean",
                "weights/fetch_s", "rollout/reward_errors", "rollout/idle_s"):
        assert key in last, key
    assert last["rollout/version_lag"] == 0 and last["rollout/reward_errors"] == 0
    assert "weights/fetch_s" not in reports[0][1]  # nothing was loaded for the first batch


class FlakyReward:
    """A plug-in task whose reward function raises on every other prompt."""

    name = "flaky"
    reward_in_process = True

    def __init__(self):
        from rollout_worker.tasks.arithmetic import ArithmeticTask

        self.inner = ArithmeticTask()

    def train_prompts(self, seed):
        return self.inner.train_prompts(seed)

    def eval_prompts(self):
        return self.inner.eval_prompts()

    def reward(self, prompt, response):
        if int(prompt.id.split("+")[0]) % 2:
            raise RuntimeError("reward function bug")
        return self.inner.reward(prompt, response)


def test_failing_reward_is_counted_and_survived(engine, buffer_factory, rollout_cfg, model_dir):
    buf = buffer_factory(policy="unbounded")
    reports = []
    worker = make_worker(engine, FlakyReward(), buf, rollout_cfg, Registry(model_dir, latest=engine.version),
                         reports, worker_id="flaky")
    assert worker.run(max_batches=3) == 3
    groups = stream_groups(buf)
    assert len(groups) == 6
    failing = [g for g in groups if int(g.trajectories[0].meta["prompt_id"].split("+")[0]) % 2]
    assert failing, "no prompt hit the failing reward: the test did not exercise it"
    assert all(t.reward == 0.0 for g in failing for t in g.trajectories)
    errors = sum(values["rollout/reward_errors"] for _, values in reports)
    assert errors == rollout_cfg.n * len(failing)


def test_fixed_policy_generates_with_the_version_the_admission_names(engine, buffer_factory, rollout_cfg, model_dir):
    from rollout_worker.tasks.arithmetic import ArithmeticTask

    buf = buffer_factory(policy="fixed", max_staleness=1, batch_groups=2)
    buf.set_version(3)  # open slots 3..4; slot 3 must be generated by version 3 - 1 = 2
    engine.update_weights(Registry(model_dir).fetch(0), 0)
    registry = Registry(model_dir, latest=3)
    worker = make_worker(engine, ArithmeticTask(), buf, rollout_cfg, registry, [], worker_id="fixed")
    assert worker.run(max_batches=1) == 1
    assert registry.fetched == [2]  # the required version, not the newest
    groups = stream_groups(buf)
    assert len(groups) == 2
    assert all(g.slot == 3 and g.version_min == g.version_max == 2 for g in groups)


def test_an_eval_swapping_weights_mid_batch_cannot_change_the_version_a_fixed_batch_was_admitted_for(
        engine, buffer_factory, rollout_cfg, model_dir):
    """The actor's eval loads the newest weights on another thread. If that landed between the worker's
    required-version check and its generate, slot 3's groups would carry version 3 instead of 2 and update 3
    would wait for them forever. The swap is started inside that window (from tokenize) and given time to land."""
    import threading

    from rollout_worker.tasks.arithmetic import ArithmeticTask

    buf = buffer_factory(policy="fixed", max_staleness=1, batch_groups=2)
    buf.set_version(3)
    engine.update_weights(Registry(model_dir).fetch(0), 0)
    registry = Registry(model_dir, latest=3)
    worker = make_worker(engine, ArithmeticTask(), buf, rollout_cfg, registry, [], worker_id="eval-race")
    swaps: list[threading.Thread] = []

    def eval_like_swap():  # what RolloutActor.evaluate(load_latest=True) does
        with worker.engine_lock:
            engine.update_weights(registry.fetch(3), 3)

    class SwapWhileTokenizing:  # the engine, with an eval arriving right after the version check
        def __getattr__(self, name):
            return getattr(engine, name)

        def tokenize(self, texts):
            if not swaps:
                swaps.append(threading.Thread(target=eval_like_swap))
                swaps[0].start()
                swaps[0].join(timeout=1.0)  # lands now unless the worker holds the engine lock
            return engine.tokenize(texts)

    worker.engine = SwapWhileTokenizing()
    try:
        assert worker.run(max_batches=1) == 1
    finally:
        swaps[0].join(timeout=600)  # the swap lands once the batch releases the lock: wait for it, not a window
    assert not swaps[0].is_alive(), "the eval's swap never got the engine lock"
    groups = stream_groups(buf)
    assert len(groups) == 2 and all(g.slot == 3 and g.version_min == g.version_max == 2 for g in groups)
    assert engine.version == 3  # the eval's swap happened, after the batch


def test_a_weight_load_that_fails_half_way_is_never_generated_with(engine, buffer_factory, rollout_cfg, model_dir):
    """Buckets load as they arrive: a fetch lost after the first half leaves the engine with two versions' weights.
    No batch may come of them (they would be labelled with either version, wrongly); the next batch reloads."""
    from rollout_worker.engine import UNKNOWN_VERSION
    from rollout_worker.tasks.arithmetic import ArithmeticTask

    class LosesTheSecondHalfOnce(Registry):
        def fetch(self, version):
            items = list(super().fetch(version))
            if self.fetched.count(version) > 1:
                return items

            def half_then_lost():
                yield from items[: len(items) // 2]
                raise ConnectionError("object store: bucket 2/2 lost")

            return half_then_lost()

    buf = buffer_factory(policy="bounded", max_staleness=4, batch_groups=2)
    engine.update_weights(Registry(model_dir).fetch(0), 0)
    registry = LosesTheSecondHalfOnce(model_dir, latest=1)
    reports = []
    worker = make_worker(engine, ArithmeticTask(), buf, rollout_cfg, registry, reports, worker_id="half-load",
                         admit_wait_s=0.05)
    assert worker.run_batch() is False
    assert engine.version == UNKNOWN_VERSION and stream_groups(buf) == []
    assert buf.stats().outstanding == 0  # the grant it could not use went back
    assert reports[-1][1]["weights/fetch_errors"] == 1
    assert worker.run_batch() is True
    assert registry.fetched == [1, 1] and engine.version == 1
    assert all(g.version_min == g.version_max == 1 for g in stream_groups(buf))


def test_a_worker_refused_for_old_weights_looks_for_new_ones_at_every_retry(engine, buffer_factory, rollout_cfg,
                                                                              model_dir):
    """Bounded admission counts from min(learner version, worker version): a worker one batch ahead of a learner
    that has just updated is let in only with the new weights. It must look for them between retries, not wait
    inside admit() with the old ones (that cost one whole admission wait per learner update)."""
    from rollout_worker.tasks.arithmetic import ArithmeticTask

    buf = buffer_factory(policy="bounded", max_staleness=0, batch_groups=rollout_cfg.groups_per_batch)
    engine.update_weights(Registry(model_dir).fetch(0), 0)

    class LearnerUpdatesWhileAsked(Registry):  # the learner: version 1 in the buffer, then its weights published
        asked = 0

        def get_latest(self):
            self.asked += 1
            if self.asked == 3:
                buf.set_version(1)
            if self.asked == 6:
                self.latest = 1
            return self.latest

    class Recording:  # the real buffer, with each admission's arguments and answer recorded
        calls: list = []

        def __getattr__(self, name):
            return getattr(buf, name)

        def admit(self, worker_id, n, **kwargs):
            adm = buf.admit(worker_id, n, **kwargs)
            self.calls.append((kwargs, adm.granted))
            return adm

    registry = LearnerUpdatesWhileAsked(model_dir)
    recording = Recording()
    worker = make_worker(engine, ArithmeticTask(), recording, rollout_cfg, registry, [], worker_id="catch-up")
    assert worker.run(max_batches=2) == 2
    assert registry.fetched == [1]
    assert [g.version_min for g in stream_groups(buf)] == [0] * 2 + [1] * 2
    refused = [kw for kw, granted in recording.calls if not granted]
    assert len(refused) >= 2 and all(kw["weights_version"] == 0 for kw in refused)
    assert all(not kw.get("timeout_s") for kw, _ in recording.calls)  # never blocks with the old weights
    assert registry.asked >= len(refused) + 1  # it asked for newer weights after every refusal


def test_every_version_loaded_for_one_batch_is_on_record(engine, buffer_factory, rollout_cfg, model_dir):
    """A worker refused for a full window loads each newer version between retries: every load pulled a version
    onto its node, so every load is reported (the cluster test counts each node's object-store bytes against
    them), not only the batch's last one."""
    from rollout_worker.tasks.arithmetic import ArithmeticTask

    buf = buffer_factory(policy="bounded", max_staleness=0, batch_groups=rollout_cfg.groups_per_batch)
    assert buf.admit("other", rollout_cfg.groups_per_batch, weights_version=0).granted  # the window is full
    engine.update_weights(Registry(model_dir).fetch(0), 0)

    class PublishesWhileRefused(Registry):  # the learner publishes 1, then 2, then makes room
        asked = 0

        def get_latest(self):
            self.asked += 1
            if self.asked == 3:
                buf.set_version(1)
            return min(self.asked, 2)

    registry, reports = PublishesWhileRefused(model_dir), []
    worker = make_worker(engine, ArithmeticTask(), buf, rollout_cfg, registry, reports, worker_id="two-loads")
    assert worker.run(max_batches=1) == 1
    assert registry.fetched == [1, 2]  # both loaded for the one batch
    loads = [v for _, v in reports if "weights/version" in v]
    assert [v["weights/version"] for v in loads] == [1, 2] and all(v["weights/fetch_s"] > 0 for v in loads)
    assert reports[-1][1]["rollout/version"] == 2


def test_partial_rollouts_switch_version_mid_batch(engine, buffer_factory, rollout_cfg, model_dir):
    """rollout.partial: a version published while the batch generates is loaded mid-batch; the samples that
    were still running carry both versions, old tokens first."""
    from rollout_worker.tasks.arithmetic import ArithmeticTask

    # Long samples (temperature 2 rarely hits <eos>), and a poll after every engine step.
    cfg = rollout_cfg.model_copy(update={"partial": True, "partial_poll_s": 0.0, "max_tokens": 48, "temperature": 2.0})
    buf = buffer_factory(policy="unbounded")
    engine.update_weights(Registry(model_dir).fetch(0), 0)

    class Publishing(Registry):
        calls = 0

        def get_latest(self):  # the pre-batch check sees 0; every poll during generation sees 1
            self.calls += 1
            return 0 if self.calls == 1 else 1

    registry = Publishing(model_dir)
    worker = make_worker(engine, ArithmeticTask(), buf, cfg, registry, [], worker_id="partial")
    assert worker.run_batch()
    assert registry.fetched == [1] and engine.version == 1
    trajs = [t for g in stream_groups(buf) for t in g.trajectories]
    mixed = [t for t in trajs if t.version_min == 0 and t.version_max == 1]
    assert mixed, "no sample spanned the update"
    for t in trajs:
        assert (np.diff(t.versions) >= 0).all() and np.isfinite(t.behaviour_logp).all()
        assert len(t.response_ids) <= 48


def test_prompt_longer_than_the_context_is_dropped_and_its_grant_returned(engine, buffer_factory, rollout_cfg,
                                                                         model_dir):
    from rollout_worker.tasks.arithmetic import ArithmeticTask
    from rollout_worker.tasks.base import Prompt

    class SomeTooLong(ArithmeticTask):
        def train_prompts(self, seed):
            for i, p in enumerate(super().train_prompts(seed)):
                yield Prompt(p.id, p.text * 200, p.answer) if i % 2 else p  # odd ones overflow 256 tokens

    buf = buffer_factory(policy="bounded", max_staleness=0, batch_groups=2)
    reports = []
    worker = make_worker(engine, SomeTooLong(), buf, rollout_cfg, Registry(model_dir, latest=engine.version),
                         reports, worker_id="long")
    assert worker.run(max_batches=1) == 1
    assert len(stream_groups(buf)) == 1
    assert reports[-1][1]["rollout/prompts_too_long"] == 1
    grants = buf.r.hgetall(f"{buf.cfg.prefix}:grants:long")
    assert sum(int(v) for v in grants.values()) == 0  # the dropped prompt's grant went back
