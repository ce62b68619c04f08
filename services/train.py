"""`staleflow train`: the whole run on one machine or a Ray cluster.

Order of events: run directory (config.yaml saved) → Redis (embedded or external) → Ray (local or the cluster we
are in) → model (the tiny CPU model is built once and cached) → weight registry, metrics hub, dashboard →
learner ranks (`learner.num_processes` actors in a placement group, one process group; each resumes from the
newest checkpoint, then the starting weights are published) → rollout worker actors
(generate into the buffer until stopped) → the driver asks the learner for one update at a time, shows
progress, asks worker 0 for a held-out eval every `learner.eval_every` updates, and restarts a worker's loop
after Ray restarted a dead worker. Ctrl-C (or the end) stops the workers, checkpoints the learner, evaluates the
final weights, saves them to runs/<name>/final, and stops every process it started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy
from rich.console import Console

from buffer.redis_buffer import StalenessBuffer
from buffer.server import connect
from learner.memory import DoesNotFit
from services.actors import LearnerActor, RolloutActor
from services.config import Config, dump_config
from services.errors import LearnerDied, NotStarted, RunFailed, WorkersLost
from services.launcher import RedisEndpoint, actor_env, start_ray, start_redis
from services.metrics import MetricsHub, buffer_metrics
from services.placement import (
    ROLE_SHARE,
    PlacementLog,
    bundle_nodes,
    check_model_on,
    check_object_store,
    learner_bundles,
    local_shortfall,
    place,
    rollout_bundles,
)
from services.progress import TrainDisplay
from services.registry import REGISTRY_NAME, start_registry

log = logging.getLogger(__name__)


def _from_learner(ref: ray.ObjectRef) -> Any:
    """ray.get on a learner call; its process dying is LearnerDied (the driver must not wait forever), a failed
    preflight (DoesNotFit) is RunFailed with its one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        raise LearnerDied(f"the learner died ({type(exc).__name__})") from None
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DoesNotFit):
            raise NotStarted(str(exc.cause)) from None
        raise


def _from_learners(refs: list[ray.ObjectRef], idle=None, ranks: list | None = None) -> Any:  # noqa: ANN001
    """Every rank's call done; returns rank 0's result. With several ranks, one rank dying or failing is
    LearnerDied at once, not when the others return: they would wait for it in their next collective (or fail
    in it: a peer's death is an error there). `idle` runs about once a second meanwhile; `ranks`, the actors
    called, are asked who died when a rank fails."""
    if len(refs) == 1:
        while not ray.wait(refs, timeout=1.0)[0]:
            if idle is not None:
                idle()
        return _from_learner(refs[0])
    while True:
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                raise LearnerDied(f"the learner died (rank {refs.index(ref)}: {type(exc).__name__})") from None
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, DoesNotFit):
                    raise NotStarted(str(exc.cause)) from None
                # Often the echo of another rank's death (its peer's socket closed under a collective): name the
                # dead rank if there is one. A call to a dead actor fails and a live one answers (it is threaded).
                for i, rank in enumerate(ranks or []):
                    try:
                        ray.get(rank.pid.remote(), timeout=60)
                    except ray.exceptions.RayActorError as death:
                        raise LearnerDied(f"the learner died (rank {i}: {type(death).__name__})") from None
                    except ray.exceptions.GetTimeoutError:
                        pass
                cause = f"{type(exc.cause).__name__}: {str(exc.cause)[:200]}"
                raise LearnerDied(f"the learner failed (rank {refs.index(ref)}: {cause})") from None
        if len(done) == len(refs):
            return ray.get(refs[0])
        if idle is not None:
            idle()


WORKER_BUILD_TIMEOUT_S = 1800


def start_learner_ranks(cfg: Config, model_dir: str, run_dir: Path, redis: RedisEndpoint, registry, hub):  # noqa: ANN001, ANN201
    """learner.num_processes rank actors in one placement group (a bundle per rank: its GPUs, or its CPU threads
    on CPU, and the learner role's resource; learner.placement_strategy), after the model is found on their nodes
    and its versions fit rank 0's object store. Returns (placement group, [rank 0, rank 1, ...])."""
    lc = cfg.learner
    pg = place(learner_bundles(cfg), lc.placement_strategy, f"the learner's {lc.num_processes} ranks",
               "lower learner.num_processes, learner.gpus or learner.cpu_threads, add nodes (cluster.num_cpus for a "
               "local run), or check cluster.learner_resource")
    try:
        nodes = bundle_nodes(pg)
        check_object_store(cfg, check_model_on(nodes, model_dir, cfg.weights.dtype, "learner"), nodes[0])
    except NotStarted:
        remove_placement_group(pg)
        raise
    ranks = [
        ray.remote(LearnerActor)
        .options(
            max_concurrency=2,  # stop() must reach a train() that waits for data
            num_cpus=0 if lc.gpus > 0 else lc.cpu_threads,
            num_gpus=lc.gpus,
            resources={cfg.cluster.learner_resource: ROLE_SHARE} if cfg.cluster.learner_resource else None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            runtime_env={"env_vars": actor_env(cfg, lc.cpu_threads, gpu=lc.gpus > 0)},
        )
        .remote(cfg, model_dir, str(run_dir), redis, registry, hub, rank)
        for rank in range(lc.num_processes)
    ]
    return pg, ranks


def start_rollout_workers(cfg: Config, model_dir: str, redis: RedisEndpoint, registry_name: str,
                          hub_name: str):  # noqa: ANN201
    """rollout.num_workers worker actors in one placement group (rollout.placement_strategy; the rollout role's
    resource), after the model is found on their nodes. Returns (placement group, [worker 0, ...])."""
    rc = cfg.rollout
    tp = rc.tensor_parallel_size
    pg = place(rollout_bundles(cfg), rc.placement_strategy, f"{rc.num_workers} rollout workers",
               "lower rollout.num_workers, rollout.gpus_per_worker, rollout.tensor_parallel_size or "
               "rollout.cpu_threads, add nodes, or check cluster.rollout_resource")
    try:
        check_model_on(bundle_nodes(pg), model_dir, cfg.weights.dtype, "rollout workers")
    except NotStarted:
        remove_placement_group(pg)
        raise
    workers = []
    for i in range(rc.num_workers):
        env = actor_env(cfg, rc.cpu_threads, gpu=rc.gpus_per_worker > 0 or tp > 1)
        if tp > 1:  # vLLM's Ray executor puts its tp GPU processes in this worker's bundles
            env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(i * tp + k) for k in range(tp))
        own_gpu = rc.gpus_per_worker if tp == 1 else 0
        role = cfg.cluster.rollout_resource
        workers.append(
            ray.remote(RolloutActor)
            .options(
                num_cpus=0 if (rc.gpus_per_worker or tp > 1) else rc.cpu_threads,
                num_gpus=own_gpu,
                resources={role: ROLE_SHARE} if role else None,
                max_restarts=rc.max_restarts,
                max_task_retries=0,
                max_concurrency=3,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=i * tp, placement_group_capture_child_tasks=tp > 1),
                runtime_env={"env_vars": env},
            )
            .remote(cfg, model_dir, f"worker-{i}", redis, registry_name, hub_name)
        )
    return pg, workers


console = Console(stderr=True, soft_wrap=True)

QUIET = os.environ.get("STALEFLOW_QUIET") == "1"  # tests and CI: no live display


def idle_gpus(cfg: Config) -> float:
    """One line when the run leaves GPUs of the cluster unused (an 8-GPU node running a 4-GPU split)."""
    rc, lc = cfg.rollout, cfg.learner
    used = lc.num_processes * lc.gpus + rc.num_workers * (rc.tensor_parallel_size if rc.tensor_parallel_size > 1
                                                          else rc.gpus_per_worker)
    idle = ray.cluster_resources().get("GPU", 0) - used
    if idle >= 1:
        console.print(f"[yellow]{idle:g} of the cluster's GPUs are idle:[/] raise rollout.num_workers (or "
                      "learner.num_processes) to use them")
    return idle


def evaluate_on_a_live_worker(workers: list, restarting: set[int], timeout_s: float) -> dict[str, Any]:
    """A held-out eval of the newest weights on a rollout worker that can take it: workers Ray is not restarting
    first (in order), then any that comes back. A call to a restarting worker fails at once
    (ActorUnavailableError): that worker is asked again until `timeout_s`; a worker dead for good is skipped.
    The result says which worker evaluated ("worker": "worker-<i>")."""
    deadline = time.monotonic() + timeout_s
    order = sorted(range(len(workers)), key=lambda i: i in restarting)
    dead: set[int] = set()
    while True:
        for i in order:
            if i in dead:
                continue
            try:
                result = ray.get(workers[i].evaluate.remote(load_latest=True), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: try the others, then again
                continue
            except ray.exceptions.RayActorError:  # gone for good
                dead.add(i)
                continue
            return {**result, "worker": f"worker-{i}"}
        if len(dead) == len(workers):
            raise RunFailed("no rollout worker is alive to evaluate on")
        if time.monotonic() > deadline:
            raise RunFailed(f"no rollout worker could evaluate within {timeout_s:.0f} s (all restarting)")
        time.sleep(0.5)  # a restart takes seconds (a new process builds its engine): poll, do not spin


def open_run_dir(cfg: Config, resume: Path | None) -> tuple[Config, Path]:
    if resume is not None:
        if not (resume / "config.yaml").is_file():
            raise SystemExit(f"--resume {resume}: not a run directory (no config.yaml)")
        return cfg, resume.resolve()
    name = cfg.name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.learner.loss}"
    # Absolute: actors on other nodes of a cluster must write to the same (shared) folder, not their job dir.
    runs = Path(cfg.runs_dir).resolve()
    run_dir = runs / name
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs / f"{name}-{suffix}"
    run_dir.mkdir(parents=True)
    cfg = cfg.model_copy(update={"name": run_dir.name})
    (run_dir / "config.yaml").write_text(dump_config(cfg))  # no secrets: passwords live in the environment
    return cfg, run_dir


def resolve_model(cfg: Config) -> str:
    """The model folder as the nodes will open it. A folder of the driver's machine is made absolute; one that is
    not here must be an absolute path on the cluster's nodes (checked there, where it is loaded: see
    services/placement.py). "tiny" is built (once, cached) here."""
    if cfg.model.path != "tiny":
        path = Path(cfg.model.path)
        if path.is_dir():
            return str(path.resolve())
        if not path.is_absolute():
            raise SystemExit(f"model.path {cfg.model.path}: no such folder here; on a cluster, give the absolute path "
                             "the learner and rollout nodes have it at")
        return str(path)
    from rollout_worker.tiny_model import ensure_tiny_model, warm_start_for

    # The warm start teaches the run's task; each task's build has its own folder (no rebuild when switching).
    ws = warm_start_for(cfg.task.name, cfg.task.long_addition_digits, cfg.model.tiny_hidden)
    folder = cfg.model.tiny_dir if ws.task == "arithmetic" else f"{cfg.model.tiny_dir}-{ws.task}{ws.digits}"
    folder += "" if ws.hidden_size == 128 else f"-h{ws.hidden_size}"
    with console.status("building the tiny CPU model (once; cached)"):
        return str(Path(ensure_tiny_model(Path(folder), seed=cfg.model.tiny_seed, warm_start=ws)).resolve())


def run_cfg(cfg: Config) -> Config:
    """Settings derived from others, so nobody has to keep them in step by hand."""
    return cfg.model_copy(
        update={
            # One key namespace per run: several runs may share an external Redis.
            "buffer": cfg.buffer.model_copy(update={"prefix": f"{cfg.buffer.prefix}:{cfg.name}"}),
        }
    )


class Run:
    """The actors of one run and the driver's loop over them."""

    def __init__(self, cfg: Config, run_dir: Path, redis: RedisEndpoint, model_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        # Names unique to this run: two runs in one Ray namespace must not share (get_if_exists) a registry.
        run_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        registry_name, hub_name = f"{REGISTRY_NAME}-{run_id}", f"staleflow-metrics-{run_id}"
        self.registry = start_registry(cfg.weights.keep_versions, namespace=cfg.cluster.namespace, name=registry_name)
        # The hub serves Prometheus where the driver runs (compose scrapes staleflow:9400; a user's browser and
        # `staleflow dashboard` read the run directory there too).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.hub = (
            ray.remote(MetricsHub)
            .options(name=hub_name, namespace=cfg.cluster.namespace, num_cpus=0, max_concurrency=4,
                     scheduling_strategy=here)
            .remote(str(run_dir), cfg.metrics)
        )
        self.pg, self.learners = start_learner_ranks(cfg, model_dir, run_dir, redis, self.registry, self.hub)
        try:
            self.rollout_pg, self.workers = start_rollout_workers(cfg, model_dir, redis, registry_name, hub_name)
        except NotStarted:  # on a cluster nothing of this run may stay behind (a local Ray goes as a whole)
            for actor in [*self.learners, self.hub, self.registry]:
                ray.kill(actor, no_restart=True)
            remove_placement_group(self.pg)
            raise
        idle_gpus(cfg)
        # The driver's own view of the buffer: its statistics go to the hub ("buffer" source) every update.
        self.buffer = StalenessBuffer(connect(redis.url, redis.password), cfg.buffer)
        self.runs: dict[int, ray.ObjectRef] = {}
        self.restarts = 0
        self.probes: dict[int, ray.ObjectRef] = {}  # workers being restarted: pid() answers once back
        self.died_at: dict[int, float] = {}
        self.evals: list[dict[str, Any]] = []
        self._eval_ref: ray.ObjectRef | None = None
        self.placement: PlacementLog | None = None  # runs/<name>/placement.json, once the learner is set up
        self._train_refs: list[ray.ObjectRef] | None = None  # the update in flight (one call per rank), if any

    def _a_worker_is_built(self) -> None:
        """Wait until one worker's constructor (its engine) is done, or has failed. A short run on a loaded machine
        can end before any worker is built (seen: over 5 min for vLLM's start beside two busy loops); an eval's own
        deadline must not count that start, which is progress, not a hang. Bounded by WORKER_BUILD_TIMEOUT_S."""
        ray.wait([w.__ray_ready__.remote() for w in self.workers], num_returns=1, timeout=WORKER_BUILD_TIMEOUT_S)

    def _on_learners(self, method: str, *args: Any) -> list[ray.ObjectRef]:
        """Call `method` on every rank (train, checkpoint, save_final are collectives)."""
        return [getattr(rank, method).remote(*args) for rank in self.learners]

    def start(self) -> int:
        rendezvous = _from_learner(self.learners[0].rendezvous.remote()) if len(self.learners) > 1 else None
        version = _from_learners([rank.setup.remote(rendezvous) for rank in self.learners], ranks=self.learners)
        tp = self.cfg.rollout.tensor_parallel_size
        nodes = {"learner": bundle_nodes(self.pg), "rollout": bundle_nodes(self.rollout_pg)[::tp]}
        self.placement = PlacementLog(self.run_dir, self.learners, self.workers, nodes)  # which process, which node
        if version == 0 and self.cfg.learner.eval_every:
            # The starting point of every curve: the eval at version 0 (the warm start), before any worker
            # generates, so the newest published weights are v0 for sure. A resumed run has it already.
            self._a_worker_is_built()
            self.evals.append(evaluate_on_a_live_worker(self.workers, set(), timeout_s=600))
            console.print(f"held-out accuracy at version 0 (the warm start): {_accuracy(self.evals[-1])}")
        self.runs = {i: w.run.remote() for i, w in enumerate(self.workers)}
        return version

    def watch_workers(self) -> None:
        """A worker whose loop ended by an error is restarted by Ray (max_restarts); once its new process
        answers, start its loop again. A call made while Ray restarts it fails at once
        (ActorUnavailableError): resubmitting run() then would count as another death, so the driver waits
        with a pid() probe."""
        self._probe_restarting()
        if self.placement is not None:
            self.placement.refresh()
        watched = [ref for i, ref in self.runs.items() if i not in self.probes]
        done, _ = ray.wait(watched, num_returns=len(watched), timeout=0) if watched else ([], [])
        for i, ref in list(self.runs.items()):
            if ref not in done:
                continue
            try:
                ray.get(ref)
                log.warning("worker-%d stopped its loop; starting it again", i)
                self.runs[i] = self.workers[i].run.remote()
            except ray.exceptions.RayError as exc:
                if self.restarts >= self.cfg.rollout.max_restarts * len(self.workers):
                    raise WorkersLost(f"worker-{i} failed and its restarts are used up ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
                self.restarts += 1
                self.died_at[i] = time.monotonic()
                console.print(f"[yellow]worker-{i} died ({type(exc).__name__}); restart {self.restarts}[/]")
                self.probes[i] = self.workers[i].pid.remote()

    def _probe_restarting(self) -> None:
        if not self.probes:
            return
        done, _ = ray.wait(list(self.probes.values()), num_returns=len(self.probes), timeout=0)
        for i, ref in list(self.probes.items()):
            if ref not in done:
                continue
            try:
                pid = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # Ray is still restarting it (building its engine)
                self.probes[i] = self.workers[i].pid.remote()
                continue
            except ray.exceptions.RayActorError as exc:
                raise WorkersLost(f"worker-{i} could not be restarted ({type(exc).__name__})") from None
            del self.probes[i]
            took = time.monotonic() - self.died_at.pop(i)
            console.print(f"worker-{i} is back (pid {pid}, {took:.0f}s after it died); its loop starts again")
            self.runs[i] = self.workers[i].run.remote()
            self.placement.moved(i)

    def poll_eval(self, version: int, force: bool = False) -> dict[str, Any] | None:
        """Start an eval every eval_every updates on the first worker that is not being restarted; return a
        finished one, if any. An eval whose worker died under it is lost (one line), not the run."""
        result = None
        if self._eval_ref is not None and (force or ray.wait([self._eval_ref], timeout=0)[0]):
            try:
                result = ray.get(self._eval_ref)
            except ray.exceptions.RayActorError as exc:
                console.print(f"[yellow]eval lost: its worker died ({type(exc).__name__})[/]")
            else:
                self.evals.append(result)
            self._eval_ref = None
        every = self.cfg.learner.eval_every
        up = [i for i in range(len(self.workers)) if i not in self.probes]
        if self._eval_ref is None and every and version % every == 0 and not force and up:
            self._eval_ref = self.workers[up[0]].evaluate.remote(load_latest=True)
        return result

    def train(self, display: TrainDisplay, version: int, total: int) -> int:
        refs = self._on_learners("train", 1) if version < total else None
        while refs is not None:
            self._train_refs = refs
            stats = _from_learners(refs, idle=self.watch_workers, ranks=self.learners)
            version = int(stats.get("policy/version", version + 1))
            # The next update is asked for before this one's bookkeeping, so the learner never waits on the driver.
            self._train_refs = refs = self._on_learners("train", 1) if version < total else None
            self.placement.refresh()
            values = dict(stats)
            buffer_values = buffer_metrics(self.buffer.stats())
            self.hub.log.remote("buffer", version, buffer_values)
            values.update(buffer_values)
            ev = self.poll_eval(version)
            if ev is not None:
                values["eval/accuracy"] = ev["accuracy"]
                if "avg_at_k" in ev:
                    values["eval/avg_at_k"] = ev["avg_at_k"]
            display.update(version, values)
        return version

    def stop(self, final_eval: bool, learner_alive: bool = True) -> dict[str, Any]:
        """Stop workers, checkpoint, evaluate and save the final policy. Each step is bounded in time and a
        failing step is reported without skipping the ones after it (the processes are stopped regardless).
        With the learner dead there is nothing to checkpoint or save: workers are stopped, metrics closed."""
        summary: dict[str, Any] = {}

        def attempt(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # reported, and the shutdown goes on: nothing may stay running
                summary.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
                console.print(f"[red]{what} failed:[/] {type(exc).__name__}: {str(exc)[:300]}")

        for w in self.workers:
            w.stop.remote()
        # An update waiting for data that no worker will now produce.
        if self._train_refs is not None and learner_alive:
            self._on_learners("stop")  # rank 0 waits for data; it tells the others (they wait in its broadcast)
            ray.wait(self._train_refs, num_returns=len(self._train_refs), timeout=120)
        if self.runs:
            ray.wait(list(self.runs.values()), num_returns=len(self.runs), timeout=60)
        if self.placement is not None:
            attempt("placement.json", self.placement.refresh)
        if not learner_alive:
            attempt("closing the metrics", lambda: ray.get(self.hub.close.remote(), timeout=30))
            return summary
        attempt("checkpoint", lambda: summary.update(version=ray.get(self._on_learners("checkpoint"), timeout=300)[0]))
        if final_eval:
            attempt("saving the final policy", lambda: summary.update(
                final=ray.get(self._on_learners("save_final", str(self.run_dir / "final")), timeout=300)[0]))
            attempt("final eval", lambda: self._final_eval(summary))
        attempt("closing the metrics", lambda: ray.get(self.hub.close.remote(), timeout=30))
        return summary

    def _final_eval(self, summary: dict[str, Any]) -> None:
        if self._eval_ref is not None:  # an eval in flight: let it land in the curve first
            self.poll_eval(-1, force=True)
        # A worker Ray is restarting (killed near the end) cannot take it: another one does, or it is waited for.
        self._a_worker_is_built()
        result = evaluate_on_a_live_worker(self.workers, set(self.probes), timeout_s=300)
        summary["final_eval"] = result
        (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2))


def run_train(cfg: Config, resume: Path | None = None) -> int:
    """Run a training job; returns the process exit code."""
    cfg, run_dir = open_run_dir(cfg, resume)
    cfg = run_cfg(cfg)
    console.print(f"run directory: [bold]{run_dir}[/]")
    t0 = time.time()
    with ExitStack() as stack:
        # SIGTERM (ray job stop, docker stop) takes the same clean path as Ctrl-C. SIGINT too, explicitly: a run
        # started as a script's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt (seen: a proof run's Ctrl-C test, whose run trained on for 7,000 updates).
        for sig in (signal.SIGINT, signal.SIGTERM):
            stack.callback(signal.signal, sig, signal.signal(sig, signal.default_int_handler))
        redis = start_redis(cfg, stack, data_dir=run_dir / "redis")
        model_dir = resolve_model(cfg)
        try:
            if start_ray(cfg, stack) and (short := local_shortfall(cfg, ray.cluster_resources())):
                raise NotStarted(short)
            run = Run(cfg, run_dir, redis, model_dir)
        except NotStarted as exc:  # one line; what it started goes with Ray (local) or with this job (cluster)
            console.print(f"[bold red]error:[/] {exc}")
            return 1
        stack.callback(_kill_actors, run)
        url = ray.get(run.hub.prometheus_url.remote())
        console.print(f"prometheus metrics: {url}")
        if cfg.metrics.dashboard:
            from services.dashboard import start_dashboard

            try:
                dash_url, stop_dash = start_dashboard([run_dir], host=cfg.metrics.host, port=cfg.metrics.dashboard_port)
            except OSError:  # the port is taken (another run's dashboard): any free one will do
                dash_url, stop_dash = start_dashboard([run_dir], host=cfg.metrics.host, port=0)
            stack.callback(stop_dash)
            console.print(f"dashboard: [bold]{dash_url}[/]")
        interrupted, died = False, None
        try:
            version = run.start()
            with TrainDisplay(cfg.learner.total_steps, start_step=version, quiet=QUIET) as display:
                run.train(display, version, cfg.learner.total_steps)
        except KeyboardInterrupt:
            interrupted = True
            console.print("[yellow]stopping: workers, then a checkpoint (Ctrl-C again to abort)[/]")
        except RunFailed as exc:
            died = exc
        learner_alive = not isinstance(died, (LearnerDied, NotStarted))
        summary = run.stop(final_eval=not interrupted and died is None, learner_alive=learner_alive)
    if isinstance(died, NotStarted):
        console.print(f"[bold red]error:[/] {died}")
        return 1
    if died is not None:  # one clear message, no traceback: what happened and how to go on
        redo = "the learner checkpointed" if learner_alive else "updates after its last checkpoint are redone on resume"
        console.print(f"[bold red]error:[/] {died}; {redo}")
        console.print(f"resume with: staleflow train --resume {run_dir}")
        return 1
    _print_summary(run_dir, summary, time.time() - t0, run.evals, interrupted)
    return 130 if interrupted else (1 if summary.get("errors") else 0)


def _kill_actors(run: Run) -> None:
    for actor in [*run.learners, *run.workers, run.hub]:
        ray.kill(actor, no_restart=True)
    for pg in (run.pg, run.rollout_pg):
        remove_placement_group(pg)


def _accuracy(result: dict[str, Any]) -> str:
    """'0.812 greedy, 0.655 avg@4 at T=1' (or the greedy figure alone)."""
    text = f"{result['accuracy']:.3f} greedy"
    if "avg_at_k" in result:
        text += f", {result['avg_at_k']:.3f} avg@{result['k']} at T={result['sampled_temperature']:g}"
    return text


def _print_summary(run_dir: Path, summary: dict, wall_s: float, evals: list[dict], interrupted: bool) -> None:
    console.rule("staleflow train: stopped (resumable)" if interrupted else "staleflow train: done")
    console.print(f"updates: {summary.get('version')}   wall time: {wall_s / 60:.1f} min")
    if evals:
        curve = "  ".join(f"v{e['version']}:{e['accuracy']:.2f}" for e in evals)
        console.print(f"held-out accuracy: {curve}")
    if "final_eval" in summary:
        fe = summary['final_eval']
        console.print(f"final held-out accuracy: [bold]{_accuracy(fe)}[/] (on {fe.get('worker', 'worker-0')})")
    if interrupted:
        console.print(f"resume with: staleflow train --resume {run_dir}")
    console.print(f"run directory: [bold]{run_dir}[/]")
