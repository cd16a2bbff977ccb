"""GRPO run-folder bookkeeping without Ray: when a folder counts as used, metric lines never counted twice, and
what makes a checkpoint complete (the slow end-to-end cases are in test_grpo_checkpoints.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from uniar_ray.checkpoint import compare_identity, check_checkpoint
from uniar_ray.config import GRPORunConfig, load_config, parse_cli, to_dict
from uniar_ray.runlog import RunDir



@pytest.mark.parametrize("leftovers", [[], ["config.json", "grids/"], ["config.json", "metrics.jsonl"]])
def test_a_failed_start_leaves_the_folder_reusable(tmp_path, leftovers):
    run = tmp_path / "run"
    run.mkdir()
    for name in leftovers:
        (run / name).mkdir() if name.endswith("/") else (run / name).write_text("")
    assert RunDir(run).path == run  # the corrected rerun writes where it was asked to


def test_a_folder_with_a_step_or_a_checkpoint_is_used(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    (a).mkdir()
    (a / "metrics.jsonl").write_text('{"step": 0}\n')
    (b / "checkpoints" / "step-000002").mkdir(parents=True)
    for run in (a, b):
        moved = RunDir(run).path
        assert moved != run and moved.name.startswith(run.name + "-")
    assert "holds an earlier run" in capsys.readouterr().out


def test_summary_and_curve_never_count_a_step_twice(tmp_path):
    run = RunDir(tmp_path / "run").open()
    for step, r in [(0, 0.1), (1, 0.2), (0, 0.3), (1, 0.4), (2, 0.5)]:  # an old resume's duplicates
        run.log_metrics({"step": step, "reward_mean": r})
    assert [(m["step"], m["reward_mean"]) for m in run.read_metrics()] == [(0, 0.3), (1, 0.4), (2, 0.5)]
    assert run.truncate_metrics(1) == 4 and [m["step"] for m in run.read_metrics()] == [0]


def test_check_checkpoint_names_what_is_wrong(tmp_path):
    folder = tmp_path / "checkpoints" / "step-000002"
    (folder / "trainer").mkdir(parents=True)
    (folder / "trainer" / "w.pt").write_bytes(b"x" * 100)
    assert "no driver_state.json" in check_checkpoint(folder)
    RunDir(tmp_path).save_driver_state(folder, {"step": 2})
    assert check_checkpoint(folder) is None
    (folder / "trainer" / "w.pt").write_bytes(b"x" * 50)
    assert check_checkpoint(folder) == "trainer/w.pt has 50 bytes, 100 were written"
    (folder / "driver_state.json").write_text('{"step": 2, "rng"')
    assert "driver_state.json is unreadable" in check_checkpoint(folder)


def test_identity_compare_separates_breaking_keys_from_the_rest():
    old = to_dict(load_config(GRPORunConfig, "configs/grpo_demo.yaml"))
    new = to_dict(load_config(GRPORunConfig, "configs/grpo_demo.yaml", [
        "grpo.num_generations=4", "model.tiny_seed=3", "steps=60", "grpo.learning_rate=0.02", "run_dir=elsewhere"]))
    breaking, other = compare_identity({**old, "data_fingerprint": "a"}, {**new, "data_fingerprint": "b"})
    assert [b.split(":")[0] for b in breaking] == ["data_fingerprint", "grpo.num_generations", "model.tiny_seed"]
    assert other == ["grpo.learning_rate: 0.01 -> 0.02", "steps: 30 -> 60"]  # run_dir is where, not what


def test_resume_flag_takes_an_optional_path_and_leaves_overrides_alone():
    _, args = parse_cli(GRPORunConfig, ["--config", "configs/grpo_demo.yaml", "--resume", "steps=3"])
    assert args.resume is True and args.overrides == ["steps=3"]
    _, args = parse_cli(GRPORunConfig, ["--config", "configs/grpo_demo.yaml", "steps=3", "--resume", "configs"])
    assert args.resume == "configs"
    _, args = parse_cli(GRPORunConfig, ["--config", "configs/grpo_demo.yaml"])
    assert args.resume is False


def test_decoder_components_are_linked_relative_inside_the_run_and_absolute_outside(tmp_path):
    from types import SimpleNamespace

    from uniar_ray.checkpoint import link_decoder

    outside = tmp_path / "decoder"
    for name in ("bsq_encoder", "sd3_transformer", "sd3_pipeline"):
        (outside / name).mkdir(parents=True)
    run = tmp_path / "run"
    model = run / "checkpoints" / "step-000002" / "model"
    model.mkdir(parents=True)
    link_decoder(model, SimpleNamespace(path=str(outside)), run)
    assert all(Path(os.readlink(model / n)) == outside.resolve() / n for n in ("bsq_encoder", "sd3_pipeline"))
    missing = SimpleNamespace(path=str(tmp_path / "on-the-nodes-only"))
    link_decoder(model, missing, run)  # not readable from here: still the published layout, with a warning
    assert os.readlink(model / "sd3_transformer") == str(tmp_path / "on-the-nodes-only" / "sd3_transformer")
