"""Three Ray nodes on this machine, each its own raylet and object store, with node roles: a learner node (the
head) and two rollout nodes. A `staleflow train` against it (cluster.address) and one through `ray job submit`.
Each checks where every actor ran (runs/<name>/placement.json against the nodes' roles), that each node's object
store received each weight version once, not once per worker (its created-bytes counter against the versions its
workers loaded), that nothing was lost or trained twice (the ledger), and that no actor or placement group of the
run is left."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from tests.ray_cluster import RAY, RayCluster
from tests.test_train_e2e import REPO, SHORT, check_run_dir, read_jsonl, staleflow

pytestmark = pytest.mark.slow

ROLES = ["cluster.learner_resource=learner", "cluster.rollout_resource=rollout", "learner.num_processes=2"]


@pytest.fixture(scope="module")
def cluster():
    # The head is the learner node: 2 CPUs for the 2 ranks (the drivers and the metrics hub take no CPU).
    with RayCluster([{"num_cpus": 2, "resources": {"learner": 1}},
                     {"num_cpus": 2, "resources": {"rollout": 1}},
                     {"num_cpus": 2, "resources": {"rollout": 1}}]) as c:
        yield c


def roles(cluster: RayCluster) -> dict[str, str]:
    return {n["node_id"]: "learner" if "learner" in n["resources"] else "rollout" for n in cluster.nodes()}


def check_placement_and_transfers(cluster: RayCluster, run_dir: Path, before: dict[str, int], workers: int) -> None:
    role_of = roles(cluster)
    rows = json.loads((run_dir / "placement.json").read_text())
    learners = [r for r in rows if r["role"] == "learner"]
    # A worker may still be building its engine when a short run on a loaded machine ends: its row has its
    # bundle's node, no pid yet. The learner ranks ran every update.
    assert all(r["state"] == "running" for r in learners) and any(r["state"] == "running" for r in rows
                                                                     if r["role"] == "rollout"), rows
    rollouts = [r for r in rows if r["role"] == "rollout"]
    assert len(learners) == 2 and len(rollouts) == workers
    assert {role_of[r["node_id"]] for r in learners} == {"learner"}, rows
    assert len({r["node_id"] for r in learners}) == 1, "the ranks are packed on the learner node"
    assert {role_of[r["node_id"]] for r in rollouts} == {"rollout"}, rows
    assert len({r["node_id"] for r in rollouts}) == 2, "SPREAD: both rollout nodes have a worker"
    # `ray start` leaves Ray's worker niceness at 15: the actors lower their own to 0
    assert all(r["nice"] == 0 for r in rows if r["pid"] is not None), rows

    # Each version's bytes, and who holds what: rank 0 put every published version on the learner node; each
    # rollout node pulled each version that a worker there loaded, once.
    published = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "weights/bytes" in r]
    size = int(published[0]["weights/bytes"])
    assert {int(r["weights/bytes"]) for r in published} == {size}
    loaded: dict[str, set[int]] = defaultdict(set)  # worker -> versions it loaded
    for r in read_jsonl(run_dir / "rollout.jsonl"):
        if "weights/version" in r:
            loaded[r["worker"]].add(int(r["weights/version"]))
    created = {node: after - before.get(node, 0) for node, after in cluster.created_bytes().items()}
    learner_node = learners[0]["node_id"]
    # Ray's own small objects (well under one version) may sit beside them: [n versions, n + 1 versions).
    assert len(published) * size <= created[learner_node] < (len(published) + 1) * size, (created, len(published))
    figures = {"version_bytes": size, "learner_node": {"published": len(published), "created": created[learner_node]}}
    for node in {r["node_id"] for r in rollouts}:
        here = [f"worker-{r['index']}" for r in rollouts if r["node_id"] == node]
        versions = set().union(*(loaded[w] for w in here))
        figures[node[:8]] = {"workers": here, "loads": sum(len(loaded[w]) for w in here), "versions": len(versions),
                             "created": created[node]}
        assert len(versions) * size <= created[node] < (len(versions) + 1) * size, (
            node, here, dict(loaded), size, created, rows)
    # The figures behind the assertions, for a human: test-artifacts/cluster-<run>.json (git-ignored).
    out = Path(__file__).resolve().parent.parent / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / f"cluster-{run_dir.name}.json").write_text(json.dumps(figures, indent=1))
    assert any(loaded.values()), "no worker loaded a published version: nothing crossed to a rollout node"


def check_nothing_left(cluster: RayCluster, run_dir: Path) -> None:
    """Every process of the run is gone, and Ray holds no actor or placement group of it."""
    from ray.util.state import list_actors, list_placement_groups

    pids = [r["pid"] for r in json.loads((run_dir / "placement.json").read_text()) if r["pid"] is not None]
    ours = {"LearnerActor", "RolloutActor", "MetricsHub", "WeightRegistry"}
    deadline = time.monotonic() + 300
    while True:  # the driver has exited; Ray reaps what it owned
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        actors = [a.class_name for a in list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")])
                  if a.class_name in ours]
        groups = list_placement_groups(address=cluster.dashboard, filters=[("state", "=", "CREATED")])
        if not (alive or actors or groups):
            return
        assert time.monotonic() < deadline, f"left behind: pids {alive}, actors {actors}, placement groups {groups}"
        time.sleep(1)


def test_a_run_on_three_nodes_places_each_role_and_moves_each_version_once_per_node(cluster, tmp_path):
    before = cluster.created_bytes()
    out = staleflow(["train", *SHORT, *ROLES, "rollout.num_workers=3", f"cluster.address={cluster.address}",
                     f"runs_dir={tmp_path}", "name=three"], timeout=2400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run_dir = tmp_path / "three"
    check_run_dir(run_dir, updates=4)
    check_placement_and_transfers(cluster, run_dir, before, workers=3)
    check_nothing_left(cluster, run_dir)


# Two readers on one rollout node take the same version through the reference path the engine's processes use
# (WeightRefs.tensors()): in a short run which workers load which version depends on timing, here it does not.
SAME_VERSION_TWICE = """
import json, sys, ray, torch
from learner.publisher import WeightPublisher
from rollout_worker.weights import WeightsFetcher
from services.registry import start_registry
ray.init(address=sys.argv[1], namespace="same-version", logging_level="ERROR")
registry = start_registry(2, namespace="same-version", name="twice")

@ray.remote(num_cpus=0, resources={"learner": 0.001})
class Learner:
    def publish(self, registry):
        model = torch.nn.Linear(1000, 1000)  # ~4 MB of float32
        return WeightPublisher(registry).publish(model, 1).bytes

@ray.remote(num_cpus=0, resources={"rollout": 0.001})
class Reader:
    def node(self):
        return ray.get_runtime_context().get_node_id()
    def load(self, weight_refs):
        return sum(t.numel() * t.element_size() for _, t in weight_refs.tensors())

learner = Learner.remote()  # owns the version's objects: kept alive
size = ray.get(learner.publish.remote(registry))
readers = [Reader.options(scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
    sys.argv[2], soft=False)).remote() for _ in range(2)]
assert len(set(ray.get([r.node.remote() for r in readers]))) == 1
fetcher = WeightsFetcher(registry)
loaded = [ray.get(r.load.remote(fetcher.fetch(1).refs())) for r in readers]  # one after the other
print(json.dumps({"size": size, "loaded": loaded}))
"""


def test_two_workers_of_one_node_pull_a_version_once(cluster):
    rollout_nodes = [node for node, role in roles(cluster).items() if role == "rollout"]
    before = cluster.created_bytes()
    out = subprocess.run([sys.executable, "-c", SAME_VERSION_TWICE, cluster.address, rollout_nodes[0]], cwd=REPO,
                         env={**cluster.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    size = result["size"]
    assert result["loaded"] == [size, size]  # each reader got the whole version
    created = {node: after - before.get(node, 0) for node, after in cluster.created_bytes().items()}
    assert size <= created[rollout_nodes[0]] < 2 * size, (size, created)  # once for the node, not once per reader
    assert created[rollout_nodes[1]] < size  # the other node took no part


def test_ray_job_submit_on_three_nodes(cluster, tmp_path):
    """`ray job submit -- staleflow train` against the head: the job's driver joins the cluster."""
    before = cluster.created_bytes()
    runs = tmp_path / "runs"
    agent_deadline = time.monotonic() + 900  # a loaded machine starts the head's job agent slowly
    while True:  # the head answers before its job agent takes a submission
        job = subprocess.run(
            [str(RAY), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO), "--",
             sys.executable, "-m", "services.cli", "train", *SHORT, *ROLES, "rollout.num_workers=2",
             "learner.total_steps=2", f"runs_dir={runs}", "name=job",
             f"model.tiny_dir={REPO / '.cache/staleflow/tiny-model'}"],
            env={**cluster.env, "STALEFLOW_QUIET": "1"}, capture_output=True, text=True, timeout=2400,
        )
        if "No available agent to submit job" not in job.stderr:
            break
        assert time.monotonic() < agent_deadline, "the head's job agent never took the job"
        time.sleep(2)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert "succeeded" in (job.stdout + job.stderr).lower()
    run_dir = runs / "job"
    check_run_dir(run_dir, updates=2)
    check_placement_and_transfers(cluster, run_dir, before, workers=2)
    check_nothing_left(cluster, run_dir)
