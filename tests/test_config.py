"""Config composition: files + dotted overrides, and one readable line for every mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.config import ConfigError, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "learner:\n  lr: 1.0e-4\n  loss: ppo_clip\nbuffer:\n  max_staleness: 2\n")
    b = write(tmp_path, "b.yaml", "learner:\n  lr: 3.0e-5\n")
    cfg = load_config([a, b], ["buffer.max_staleness=7", "learner.loss_params={tau: 0.1}", "learner.lr=1e-5"])
    assert cfg.learner.lr == pytest.approx(1e-5)  # '1e-5' typed on a command line is a float, not a string
    assert cfg.learner.loss == "ppo_clip"  # kept from a.yaml: dicts merge deeply
    assert cfg.buffer.max_staleness == 7
    assert cfg.learner.loss_params == {"tau": 0.1}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("buffer.max_stalenes=3", "buffer.max_stalenes: unknown key (did you mean 'buffer.max_staleness'?)"),
        ("learner.lr=abc", "learner.lr:"),
        ("learner.lr=-1", "learner.lr: Input should be greater than 0"),
        ("buffer.policy=sometimes", "buffer.policy:"),
        ("lerner.lr=1", "lerner: unknown key (did you mean 'learner'?)"),
        ("learner", "expected key=value"),
        # not built: refused, not silently ignored
        ("learner.behaviour_logp=recompute", "learner.behaviour_logp: Input should be 'rollout'"),
    ],
)
def test_bad_override_is_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config([], [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_fixed_staleness_refuses_skipped_weight_versions():
    # fixed trains update V on exactly version V - s: an unpublished version would stall the run forever
    with pytest.raises(ConfigError, match=r"weights.publish_every must be 1 \(got 2\)"):
        load_config([], ["buffer.policy=fixed", "weights.publish_every=2"])
    assert load_config([], ["buffer.policy=bounded", "weights.publish_every=2"]).weights.publish_every == 2


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    bad = write(tmp_path, "bad.yaml", "learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    scalar = write(tmp_path, "scalar.yaml", "3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([scalar])


def test_dump_round_trips(tmp_path):
    cfg = load_config([], ["learner.loss=gspo", "rollout.n=4"])
    saved = write(tmp_path, "saved.yaml", dump_config(cfg))
    assert load_config([saved]) == cfg


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config([path])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "eval", "config", "model", "dashboard", "plot"):
        assert command in out.stdout


def test_cli_bad_override_exits_nonzero_with_one_line():
    out = run_cli("config", "show", "buffer.max_stalenes=3")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["config error: buffer.max_stalenes: unknown key (did you mean 'buffer.max_staleness'?)"]


def test_cli_config_show_prints_resolved_yaml():
    out = run_cli("config", "show", "learner.lr=2e-5")
    assert out.returncode == 0, out.stderr
    assert "lr: 2.0e-05" in out.stdout


def test_no_arguments_is_the_cpu_demo():
    """`staleflow train` with no arguments must run exactly configs/tiny-cpu.yaml."""
    assert load_config([]) == load_config([REPO / "configs" / "tiny-cpu.yaml"])
