"""The data-parallel learner under `staleflow train`: learner.num_processes=2 (gloo, CPU), real processes.

1. Two ranks make the same update as one rank on the same batch. Each run's buffer is an external redis-server
   holding the same 4 groups before the run starts; with fixed staleness 0 the learner's first batch is exactly
   those (the ledger says so), whatever the rollout worker adds later. The weights after update 1 (DeepSpeed's
   fp32 master weights, consolidated from each run's ZeRO checkpoint) agree, and differ from the start.
2. ZeRO-3 on 2 ranks: every rank's shard in the checkpoint, and the final folder loads in transformers with the
   trained weights (those of the last checkpoint, consolidated) and in vLLM (the run's final eval, again).
3. SIGKILL of rank 1: the run stops with one error line naming the rank, leaves nothing running, and
   `--resume` finishes it exactly once (ledger).
4. Ctrl-C: every rank stops (none is left in a collective) and checkpoints its shard; exit 130.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.learner_helpers import make_groups
from tests.test_faults_e2e import (
    FAST,
    assert_gone,
    check_exactly_once,
    kill_and_finish,
    ledger_in_force,
    lines,
    own_services,
    spawn,
    wait_for,
)
from tests.test_train_e2e import REPO, staleflow

pytestmark = pytest.mark.slow

TWO = ["learner.num_processes=2", "cluster.num_cpus=3"]  # 2 learner ranks + 1 worker on a 2-core machine


def ranks(run_dir: Path) -> list[dict]:
    """The run's learner ranks: [{rank, pid, node_id, ...}] (placement.json, written once every rank is set up)."""
    rows = json.loads((run_dir / "placement.json").read_text())
    # the local Ray starts its workers at nice 0, not Ray's 15: a busy process elsewhere must not starve a rank
    assert all(r["nice"] == 0 for r in rows if r["pid"] is not None), rows
    return [{"rank": r["index"], **r} for r in rows if r["role"] == "learner"]


def consolidated(checkpoints: Path, version: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's fp32 weights of checkpoint `version`, whatever the ZeRO stage and number of ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=f"v{version:08d}")


def start_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(REPO / ".cache/staleflow/tiny-model/model.safetensors")


def prefill(redis_server, name: str, overrides: list[str]) -> list[str]:  # noqa: ANN001
    """Put 4 groups of version 0 into run `name`'s buffer (its prefix, its settings), as a worker would."""
    from buffer.redis_buffer import StalenessBuffer
    from buffer.server import connect
    from services.config import load_config
    from services.train import run_cfg

    files = [REPO / a for a in overrides if "=" not in a]
    cfg = run_cfg(load_config(files, [a for a in overrides if "=" in a] + [f"name={name}"]))
    buf = StalenessBuffer(connect(redis_server.url, redis_server.password), cfg.buffer)
    groups = make_groups(4, seed=7, prefix=f"pre-{name}-")
    assert buf.admit("prefill", 4).granted == 4
    buf.push_many(groups, "prefill")
    return [t.id for g in groups for t in g.trajectories]


def test_two_ranks_make_the_update_one_rank_makes(redis_server, tmp_path):
    common = [*FAST, "buffer.policy=fixed", "buffer.max_staleness=0", "learner.checkpoint_every=1",
              f"buffer.redis_url={redis_server.url}", f"runs_dir={tmp_path}"]
    env = {"STALEFLOW_REDIS_PASSWORD": redis_server.password}
    runs = {}
    for name, extra in (("one", ["learner.total_steps=1"]), ("two", [*TWO, "learner.total_steps=2"])):
        prefilled = prefill(redis_server, name, common)
        # A deadline for a hang only: beside two busy loops the first run (it builds the tiny model, then waits
        # for vLLM's start before its final eval) took over 15 minutes.
        out = staleflow(["train", *common, *extra, f"name={name}"], env=env, timeout=2400)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert ledger_in_force(tmp_path / name)[1]["trajectory_ids"] == prefilled  # update 1 = the prefilled batch
        runs[name] = out.stdout + out.stderr
    # Two rank processes, and both ranks' optimizer shards in each checkpoint (DeepSpeed's own files).
    assert len({r["pid"] for r in ranks(tmp_path / "two")}) == 2
    for v in (1, 2):
        files = {p.name for p in (tmp_path / "two/checkpoints" / f"v{v:08d}").iterdir()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    check_exactly_once(tmp_path / "two", 2)

    one, two, start = consolidated(tmp_path / "one/checkpoints", 1), consolidated(tmp_path / "two/checkpoints", 1), \
        start_weights()
    assert one.keys() == two.keys()
    moved = max((one[k] - start[k]).abs().max().item() for k in start)  # lm_head is tied: not in the file
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-4 and gap < 1e-6, (moved, gap)  # the same update, up to the order of float sums


def test_zero3_on_two_ranks_saves_shards_and_a_final_folder_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "z3"
    out = staleflow(["train", *FAST, *TWO, "learner.zero_stage=3", "learner.total_steps=2",
                     "learner.checkpoint_every=1", f"runs_dir={tmp_path}", "name=z3"], timeout=2400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    files = {p.name for p in (run_dir / "checkpoints/v00000002").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} <= files
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    final = model.state_dict()  # tied lm_head included
    trained, start = consolidated(run_dir / "checkpoints", 2), start_weights()
    for name, t in trained.items():
        torch.testing.assert_close(final[name].detach(), t, rtol=0, atol=0)  # the gathered weights, exactly
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-4  # and they were trained
    # vLLM loads it too, with the trained weights: greedy held-out accuracy equals the run's final eval (which
    # ran on the published version 2 in a rollout worker).
    result = tmp_path / "eval.json"
    ev = staleflow(["eval", "--model", str(run_dir / "final"), "--out", str(result), "task.eval_size=16"], timeout=2400)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    final_eval = json.loads((run_dir / "eval.json").read_text())
    assert final_eval["version"] == 2
    assert json.loads(result.read_text())["accuracy"] == final_eval["accuracy"]


def test_rank_1_killed_stops_the_run_and_resume_finishes_it_exactly_once(tmp_path):
    # A run far too long to end before the kill (the kill comes at update 3); the resume is told where to stop.
    run_dir, log = tmp_path / "rkill", tmp_path / "rkill.log"
    driver = spawn(["train", *FAST, *TWO, "learner.total_steps=100000", "learner.checkpoint_every=2",
                    f"runs_dir={tmp_path}", "name=rkill"], log)
    try:
        wait_for(lambda: ledger_in_force(run_dir).get(3), 900, "update 3", driver, log)  # past checkpoint v2
        pid = ranks(run_dir)[1]["pid"]
        services = own_services(driver)
    except BaseException:
        driver.kill()
        raise
    code, out = kill_and_finish(driver, log, pid)
    assert code == 1, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "learner died (rank 1" in errors[0], out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert_gone(services)
    assert int((run_dir / "checkpoints/latest").read_text().strip()[1:]) >= 2
    updates = max(ledger_in_force(run_dir)) + 2  # past what the killed run reached: the resume trains on

    t0 = time.time()
    resumed = staleflow(["train", "--resume", str(run_dir), f"learner.total_steps={updates}"], timeout=2400)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    check_exactly_once(run_dir, updates)
    assert len({r["pid"] for r in ranks(run_dir)}) == 2  # the resumed run's two ranks
    print(f"DP rank-1 kill: resume took {time.time() - t0:.0f} s; ledger lines {len(lines(run_dir / 'ledger.jsonl'))}")


def test_ctrl_c_stops_every_rank_with_a_checkpoint_of_both_shards(tmp_path):
    """SIGINT while rank 0 waits for data or trains: rank 0 tells the others (they wait in its broadcast), every
    rank checkpoints, the run exits 130 and leaves nothing running. A hang here is a rank left in a collective."""
    run_dir, log = tmp_path / "ctrlc", tmp_path / "ctrlc.log"
    driver = spawn(["train", *FAST, *TWO, "learner.total_steps=100000", "learner.checkpoint_every=1000",
                    f"runs_dir={tmp_path}", "name=ctrlc"], log)
    try:
        wait_for(lambda: ledger_in_force(run_dir).get(2), 900, "update 2", driver, log)
        services = own_services(driver)
        driver.send_signal(signal.SIGINT)
        code = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    out = log.read_text()
    assert code == 130, out[-4000:]
    assert "Traceback" not in out and "error:" not in out, out[-4000:]
    assert_gone(services)
    tag = (run_dir / "checkpoints/latest").read_text().strip()
    assert int(tag[1:]) == max(ledger_in_force(run_dir)) >= 2  # the version it stopped at, not an older one
    files = {p.name for p in (run_dir / "checkpoints" / tag).iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
