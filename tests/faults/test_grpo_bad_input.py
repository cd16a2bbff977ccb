"""``jobs.grpo`` config and data problems: exit 2 with one line per problem (key and source), before Ray or any
actor starts, and no run folder left behind; prompt limits applied to the RL data before the first step."""
from __future__ import annotations

import pytest

from jobs import grpo as grpo_job
from uniar_ray.config import GRPORunConfig, load_config
from uniar_ray.data import load_dataset
from uniar_ray.limits import LimitError, check_grpo_inputs

from faults_helpers import REPO


def argv(tmp_path, *overrides):
    return ["--config", str(REPO / "configs/grpo_demo.yaml"), f"run_dir={tmp_path / 'run'}", *overrides]


@pytest.mark.parametrize("override,line", [
    ("grpo.learning_rate=nan", "command line: grpo.learning_rate=nan: must be a finite number"),
    ("grpo.learning_rate=1e400", "command line: grpo.learning_rate=inf: must be a finite number"),
    ("grpo.temperature=.inf", "command line: grpo.temperature=inf: must be a finite number"),
    ("grpo.temperature=0", "grpo.temperature=0.0: must be > 0"),
    ("grpo.beta=.NaN", "command line: grpo.beta=nan: must be a finite number"),
    ("grpo.beta=-.nan", "command line: grpo.beta must be float, got '-.nan'"),
    ("rewards.models.brightness.weight=nan", "command line: rewards.models.brightness.weight=nan: must be a finite"),
    ("decode_upsampling_ratio=-1", "command line: decode_upsampling_ratio=-1.0: must be in [1, 2]"),
    ("decode_upsampling_ratio=2.5", "command line: decode_upsampling_ratio=2.5: must be in [1, 2]"),
    ("trainer.num_cpus=-1", "command line: trainer.num_cpus=-1.0: must be >= 0"),
    ("decoder.num_threads=-2", "command line: decoder.num_threads=-2: must be >= 0"),
    ("cluster.num_cpus=-3", "command line: cluster.num_cpus=-3: must be >= 0"),
    ("model.device=gpu", "command line: model.device='gpu': expected cpu, cuda or cuda:N"),
    ("model.device=cuda:one", "command line: model.device='cuda:one': expected cpu, cuda or cuda:N"),
    ("data.prompt_overflow=drop", "data.prompt_overflow='drop': expected one of truncate, error"),
    ("rewards.models.target_color.url=http://h/", "command line: rewards.models.target_color.url: only read by "
                                                  "backend http"),
    ("rewards.models.mine.class=no_colon", "rewards.models.mine.class='no_colon': expected package.module:ClassName"),
])
def test_config_problem_exits_2_before_anything_starts(run_job, tmp_path, override, line):
    code, err = run_job(grpo_job.main, "grpo", argv(tmp_path, override))
    assert code == 2 and line in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from jobs import entry
    from uniar_ray.config import ConfigError

    with pytest.raises(ConfigError, match="grpo.beta=nan"):
        entry.run(grpo_job.main, "grpo", [*argv(tmp_path, "grpo.beta=nan"), "--debug"])
    monkeypatch.setenv("UNIAR_DEBUG", "1")
    with pytest.raises(ConfigError):
        entry.run(grpo_job.main, "grpo", argv(tmp_path, "grpo.beta=nan"))


def test_the_shipped_demo_config_passes_the_rules():
    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml")
    records = load_dataset(cfg.data.path).records
    assert check_grpo_inputs(records, cfg) == records  # every demo prompt is far below 1024 tokens


def test_rl_prompts_over_the_limit_are_truncated_and_said_or_refused(capsys):
    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml", ["data.max_prompt_tokens=4"])
    records = load_dataset(cfg.data.path).records
    cut = check_grpo_inputs(records, cfg)
    assert len(cut) == len(records) and all(len(c.prompt) < len(r.prompt) for c, r in zip(cut, records))
    assert "60 prompts over data.max_prompt_tokens=4 were truncated" in capsys.readouterr().out
    refuse = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml",
                         ["data.max_prompt_tokens=4", "data.prompt_overflow=error"])
    with pytest.raises(LimitError, match=r"(?s)geneval number 0 \(line 1\): the prompt has \d+ tokens, over "
                                         r"data.max_prompt_tokens=4 .*\(and 55 more\)"):
        check_grpo_inputs(records, refuse)


def test_truncated_decoder_weights_are_named_before_the_first_step(tmp_path):
    from uniar_ray.decoder.tiny import write_tiny_decoder_checkpoint
    from uniar_ray.model.loading import CorruptWeightFile

    root = tmp_path / "decoder"
    write_tiny_decoder_checkpoint(root, seed=0)
    weights = next((root / "sd3_transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml",
                      [f"decoder.path={root}", "decoder.tiny_bit_driven=false"])  # bit-driven: the tiny decoder only
    with pytest.raises(CorruptWeightFile, match=rf"{weights}: truncated \(\d+ bytes, its header needs \d+\)"):
        check_grpo_inputs(load_dataset(cfg.data.path).records, cfg)


def test_rl_ar_size_beyond_the_tiny_model_positions(tmp_path):
    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml", ["ar_height=4096", "ar_width=4096"])
    with pytest.raises(LimitError, match="ar_height/ar_width: AR size 4096x4096 needs 16384 image tokens"):
        check_grpo_inputs(load_dataset(cfg.data.path).records, cfg)
