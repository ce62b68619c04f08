"""The whole run's config: one pydantic section per service, composed from YAML files plus dotted overrides.

    staleflow train configs/tiny-cpu.yaml learner.lr=1e-5 buffer.max_staleness=4

Files are merged left to right (later wins, dicts merge deeply), then each `a.b.c=value` override is applied
(the value parsed as YAML: `4` is an int, `[a, b]` a list, `null` None). Any wrong key, type or value raises
`ConfigError` with one line naming the dotted key and why, and the closest valid key for a typo, before
anything starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from buffer.config import BufferConfig
from learner.config import LearnerConfig
from rollout_worker.config import RolloutConfig, TaskConfig


class ConfigError(ValueError):
    """A config problem, phrased as one readable line."""


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "tiny" = build (or reuse) the deterministic tiny CPU model under `tiny_dir`; else a local HF model folder.
    path: str = "tiny"
    tiny_dir: str = ".cache/staleflow/tiny-model"
    tiny_seed: int = 0
    tiny_hidden: Literal[128, 256] = Field(128, description="The tiny model's width: 128 (the demo's) or 256.")


class WeightsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    publish_every: int = Field(1, ge=1, description="Publish weights every this many updates.")
    keep_versions: int = Field(
        2, ge=1, description="The newest versions the registry keeps. Under buffer.policy=fixed it also keeps the "
        "older versions whose slots are not filled yet (none beyond the newest two while workers keep up).",
    )
    bucket_mb: int = Field(64, ge=1, description="Weights travel in buckets of at most this size.")
    background: bool = Field(
        True, description="Publish off the learner's step: an update waits only for the copy of the weights into "
        "host memory; the object-store put and the registration run on a thread while the next update trains "
        "(two host copies of the model, used in turn). false: the update waits for the whole publish.",
    )
    timeout_s: float = Field(120.0, gt=0, description="A publish or fetch slower than this is an error.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Bind address of the metrics and dashboard endpoints.")
    prometheus_port: int = Field(0, ge=0, le=65535, description="0 = a free port.")
    dashboard: bool = True
    dashboard_port: int = Field(9266, ge=0, le=65535)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "staleflow"
    wandb_mode: Literal["online", "offline"] = "offline"


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # None: join the Ray cluster this process runs in (ray job submit) or else start a local one.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="Local Ray: CPUs to declare (default: all).")
    object_store_gb: float | None = Field(None, gt=0, description="Local Ray: object store size (default: Ray's).")
    # Ray's store page-faults in every object it creates (put ~1.6 GB/s here, 1/8 of memcpy): a 1 GB weight
    # publish took 0.29-0.78 s from run to run, 0.28-0.31 s with the store touched once at start (put 7-10 GB/s;
    # benchmarks/weights.py, docs/weights.md). The cost:
    # the store's whole size is resident from the start, and the start takes longer; so set object_store_gb too.
    # A cluster's nodes: RAY_preallocate_plasma_memory=1 ray start ...
    prefault_object_store: bool = Field(
        False, description="Local Ray: touch all of the object store's memory at start (weights publish faster)."
    )
    namespace: str = "staleflow"
    # Node roles: a custom Ray resource that marks the nodes of a role (`ray start --resources='{"learner": 1}'`).
    # Each of the role's processes asks for a sliver of it, so it runs only on marked nodes. None: any node.
    learner_resource: str | None = Field(None, description="Ray resource marking learner nodes (None: any node).")
    rollout_resource: str | None = Field(None, description="Ray resource marking rollout nodes (None: any node).")


SEEDED_SECTIONS = ("task", "rollout", "learner")  # the sections with a `seed` that the top-level one defaults


class Config(BaseModel):
    """The defaults ARE the CPU demo (`staleflow train` with no arguments = configs/tiny-cpu.yaml, a test checks
    it); the GPU configs in configs/ set every value that differs."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Run name; default: <timestamp>-<loss>.")
    runs_dir: str = "runs"
    seed: int = Field(0, description="The run's seed: the default of task.seed, rollout.seed and learner.seed.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="before")
    @classmethod
    def _seed_is_every_sections_default(cls, data: Any) -> Any:
        # One `seed` changes every random stream of a run (prompt order, engine sampling, learner init); a
        # section's own seed, where given, wins. The tiny model's build seed (model.tiny_seed) is separate: it
        # names a cached artifact, not a run.
        if not isinstance(data, dict) or type(seed := data.get("seed")) is not int:
            return data
        data = dict(data)
        for section in SEEDED_SECTIONS:
            given = data.get(section)
            if given is None:
                data[section] = {"seed": seed}
            elif isinstance(given, dict) and "seed" not in given:
                data[section] = {**given, "seed": seed}
            elif isinstance(given, BaseModel) and "seed" not in given.model_fields_set:
                data[section] = given.model_copy(update={"seed": seed})
        return data

    @model_validator(mode="after")
    def _fixed_needs_every_version(self) -> Config:
        # fixed: slot k must be generated by exactly version max(0, k - s); an unpublished version can never be
        # fetched, and the workers would retry it forever while the learner waits.
        if self.buffer.policy == "fixed" and self.weights.publish_every != 1:
            raise ValueError(
                f"buffer.policy=fixed trains each update on one exact policy version, so every version must be "
                f"published: weights.publish_every must be 1 (got {self.weights.publish_every})"
            )
        return self


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, dotted + ".")
    return keys


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, _valid_keys(Config), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. learner.lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 as a string (it wants 1.0e-5): accept what people type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return key, value


def _explain(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if not loc:  # a rule across keys: its message names them
        return e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_closest(loc)}"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {e['msg'].removeprefix('Value error, ')}{shown}"


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Compose files (left to right) and dotted overrides into a validated Config, or raise ConfigError."""
    tree: dict[str, Any] = {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = _deep_merge(tree, data)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML. It holds no secrets: passwords only ever live in the environment."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
