"""Where each role's processes run: placement groups for the learner ranks and the rollout workers, optional
node-role resources, the model checked on the nodes that load it, and runs/<name>/placement.json.

Roles. A node is marked for a role by a custom Ray resource (`ray start --resources='{"learner": 1}'`);
`cluster.learner_resource` and `cluster.rollout_resource` name them, and every bundle of that role asks for
ROLE_SHARE of it: any number of the role's processes fit on a marked node, none lands on an unmarked one. Unset,
any node with the CPUs or GPUs will do. The learner's group is placed first (its ranks are the scarce, tightly
coupled part), then the workers' (`rollout.placement_strategy`; SPREAD by default: one worker per node where
there are several, so each node pulls each weight version once for its own workers).

A model folder is checked where it is loaded (a small task on each bundle's node), not on the driver: on a
cluster the model need only exist on the learner and rollout nodes.

Tensor-parallel workers (`rollout.tensor_parallel_size` = tp > 1) own tp one-GPU bundles each (worker i: bundles
i*tp ... i*tp + tp - 1). The worker actor runs in its first bundle without a GPU of its own, and vLLM's Ray
executor starts its tp GPU processes in those bundles (VLLM_RAY_BUNDLE_INDICES; the actor captures its
placement group for them), as OpenRLHF does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from services.config import Config
from services.errors import NotStarted

PLACEMENT_TIMEOUT_S = 300
ROLE_SHARE = 0.001  # of a node-role resource per bundle: a marker, not a count


def _with_role(bundle: dict[str, float], resource: str | None) -> dict[str, float]:
    return {**bundle, resource: ROLE_SHARE} if resource else bundle


def learner_bundles(cfg: Config) -> list[dict[str, float]]:
    lc = cfg.learner
    bundle = {"GPU": lc.gpus} if lc.gpus > 0 else {"CPU": lc.cpu_threads}
    return [_with_role(bundle, cfg.cluster.learner_resource)] * lc.num_processes


def rollout_bundles(cfg: Config) -> list[dict[str, float]]:
    rc = cfg.rollout
    if rc.tensor_parallel_size > 1:
        per_worker = [{"GPU": 1.0}] * rc.tensor_parallel_size
    else:
        per_worker = [{"GPU": rc.gpus_per_worker} if rc.gpus_per_worker else {"CPU": rc.cpu_threads}]
    return [_with_role(b, cfg.cluster.rollout_resource) for _ in range(rc.num_workers) for b in per_worker]


def local_shortfall(cfg: Config, have: dict[str, float]) -> str | None:
    """None if the learner's and the workers' bundles fit a local Ray with resources `have`; else one line.

    A local Ray never grows, so a bundle that does not fit now would wait PLACEMENT_TIMEOUT_S for nothing (a
    cluster may be autoscaling: there `place` waits). Totals only: bundles of a local node always pack."""
    need: dict[str, float] = {}
    for bundle in [*learner_bundles(cfg), *rollout_bundles(cfg)]:
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    short = {k for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return None
    lc, rc = cfg.learner, cfg.rollout
    fix = f"; to share the cores anyway, declare them: cluster.num_cpus={int(need['CPU'])}" if short == {"CPU"} else ""
    return (f"this machine's local Ray has {_fmt(have, need)}; the learner ({lc.num_processes} x "
            f"{learner_bundles(cfg)[0]}) and {rc.num_workers} rollout workers ({rollout_bundles(cfg)[0]} each) need "
            f"{_fmt(need, need)}: lower rollout.num_workers, rollout.cpu_threads or learner.cpu_threads{fix}")


def _fmt(res: dict[str, float], keys: dict[str, float]) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in keys)


def place(bundles: list[dict[str, float]], strategy: str, what: str, advice: str) -> PlacementGroup:
    """A ready placement group, or NotStarted with one line saying what could not be placed."""
    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise NotStarted(
            f"{what} ({len(bundles)} bundles of {bundles[0]}, {strategy}) could not be placed in "
            f"{PLACEMENT_TIMEOUT_S} s; the cluster has {ray.cluster_resources()}: {advice}"
        ) from None
    return pg


def bundle_nodes(pg: PlacementGroup) -> list[str]:
    """The node id of each bundle, in bundle order."""
    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in range(len(table))]


def _inspect_model(model_dir: str, dtype: str) -> tuple[str, str | None, int]:
    """On a node: (its address, an error line or None, the weights' bytes in `dtype`)."""
    from learner.memory import weight_bytes

    here = ray.util.get_node_ip_address()
    if not Path(model_dir, "config.json").is_file():
        return here, f"model.path {model_dir}: not a local HF model folder (no config.json) on node {here}", 0
    return here, None, weight_bytes(model_dir, dtype)


def check_model_on(nodes: list[str], model_dir: str, dtype: str, role: str) -> int:
    """The model folder must be readable on every node of `nodes` (one task each, pinned there); returns the
    weights' size in the publish dtype."""
    task = ray.remote(num_cpus=0, max_retries=0)(_inspect_model)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(model_dir, dtype)
            for node in dict.fromkeys(nodes)]
    size = 0
    for _, error, nbytes in ray.get(refs, timeout=PLACEMENT_TIMEOUT_S):
        if error:
            raise NotStarted(f"{error}, where the {role} loads it")
        size = nbytes
    return size


def node_store_bytes(node_id: str) -> float:
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["Resources"].get("object_store_memory", 0)
    return 0


def check_object_store(cfg: Config, version_bytes: int, node_id: str) -> None:
    """(weights.keep_versions + 1) versions live in the learner node's object store at once (the registry keeps
    K, the newest is being put; rank 0 puts them on its node): they must fit, or publishing fails minutes in.
    Fixed staleness pins more only while workers lag behind their slots; Ray spills what does not fit to disk."""
    need = (cfg.weights.keep_versions + 1) * version_bytes
    have = node_store_bytes(node_id)
    if need > have:
        raise NotStarted(
            f"{cfg.weights.keep_versions + 1} weight versions ({cfg.weights.keep_versions} kept + the one being "
            f"published) take {need / 1e9:.2f} GB and the learner node's object store has {have / 1e9:.2f} GB: "
            "lower weights.keep_versions, set weights.dtype=bfloat16, or "
            "give Ray more object store memory (ray start --object-store-memory)"
        )


class PlacementLog:
    """runs/<name>/placement.json, kept current: one row per process of the run (role, index, pid, node_id,
    node_ip), for a py-spy, a kill, a look at one rank's log (Ray's log deduplication can fold the ranks' own
    lines into one). Rows fill in as actors come up (a worker builds its engine for minutes on a loaded machine:
    nothing waits for it here); `moved(i)` when Ray restarted worker i. `refresh()` never blocks."""

    def __init__(self, run_dir: Path, learners: list[Any], workers: list[Any], nodes: dict[str, list[str]]):
        """`nodes`: each role's node ids by actor index (its placement group bundle's node), known before the actor
        is up."""
        self.path = run_dir / "placement.json"
        self.workers = workers
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.pending: dict[tuple[str, int], ray.ObjectRef] = {}
        for role, actors in (("learner", learners), ("rollout", workers)):
            for i, actor in enumerate(actors):
                self.rows[(role, i)] = {"role": role, "index": i, "pid": None, "node_id": nodes[role][i],
                                        "state": "starting"}
                self.pending[(role, i)] = actor.where.remote()
        learner_refs = [ref for (role, _), ref in self.pending.items() if role == "learner"]
        ray.wait(learner_refs, num_returns=len(learner_refs), timeout=PLACEMENT_TIMEOUT_S)  # set up: they answer
        self.refresh(force=True)

    def moved(self, worker: int) -> None:
        self.rows[("rollout", worker)].update(pid=None, state="restarting")
        self.pending[("rollout", worker)] = self.workers[worker].where.remote()

    def refresh(self, force: bool = False) -> None:
        refs = list(self.pending.values())
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for key, ref in list(self.pending.items()):
            if ref not in done:
                continue
            del self.pending[key]
            try:
                self.rows[key] = {"role": key[0], "index": key[1], **ray.get(ref), "state": "running"}
            except ray.exceptions.RayError as exc:  # it died first: `moved` asks again once Ray restarted it
                self.rows[key].update(state=type(exc).__name__)
        if done or force:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(list(self.rows.values()), indent=1))
            tmp.replace(self.path)  # readers never see half a file
