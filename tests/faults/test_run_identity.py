"""Run identity: an eval folder or sweep cell made with other settings is refused (naming the keys and the two ways
out) and left exactly as it was; overwrite=true really clears it; the same settings resume even with other batch
sizes or actor counts."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from jobs import eval as eval_job
from jobs import sweep
from uniar_ray.config import EvalConfig, SweepConfig, load_config
from uniar_ray.run_identity import RunIdentityError, claim_folder, identity_diff

from faults_helpers import REPO, tree, write_bytes


def first_run(eval_argv, *overrides):
    """What an earlier run leaves: config.json (with its identity), an image and reports (no Ray needed)."""
    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", eval_argv("longtext", *overrides)[2:])
    plan = eval_job.make_plan(cfg)
    plan.out_dir.mkdir(parents=True)
    (plan.out_dir / "config.json").write_text(json.dumps(plan.config_record()))
    plan.images_dir.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 0, 0)).save(plan.images_dir / "0_0.png")  # a whole sample of the run's size
    write_bytes(plan.out_dir / "results.json", b'{"complete": true}')
    write_bytes(plan.out_dir / "notes.txt", b"the user's own file")
    return plan.out_dir


@pytest.mark.parametrize("change,key", [
    ("settings.seed=7", "settings.seed: 0 -> 7"), ("settings.ar_height=96", "settings.ar_height: 64 -> 96"),
    ("settings.num_inference_steps=3", "settings.num_inference_steps: 2 -> 3"),
    ("benchmark.samples_per_prompt=2", "benchmark.samples_per_prompt: 4 -> 2"),
    ("model.tiny_seed=1", "model.tiny_seed: 0 -> 1"),
    ("benchmark.max_prompt_tokens=8", "benchmark.max_prompt_tokens: 1024 -> 8"),
])
def test_rerun_with_other_settings_is_refused_and_changes_nothing(run_job, eval_argv, change, key):
    out = first_run(eval_argv)
    before = tree(out)
    code, err = run_job(eval_job.main, "eval", eval_argv("longtext", change))
    assert code == 2
    assert f"out_dir={out} holds a run made with other settings ({key})" in err
    assert "choose a new out_dir, or pass overwrite=true" in err and "nothing was changed" in err
    assert tree(out) == before


def test_overwrite_really_clears_the_old_run_but_not_foreign_files(eval_argv):
    out = first_run(eval_argv)
    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml",
                      eval_argv("longtext", "settings.seed=7", "overwrite=true")[2:])
    plan = eval_job.make_plan(cfg)
    assert sorted(tree(out)) == ["notes.txt"]  # the old image, config.json and results.json are gone
    assert len(plan.rows) == len(plan.records) * plan.bench.samples_per_prompt  # everything is generated anew


def test_overwrite_refused_by_a_later_check_deletes_nothing(run_job, eval_argv):
    out = first_run(eval_argv)
    before = tree(out)
    code, err = run_job(eval_job.main, "eval", eval_argv("longtext", "overwrite=true", "settings.ar_height=4096",
                                                         "settings.ar_width=4096"))
    assert code == 2 and "AR size 4096x4096" in err
    assert tree(out) == before


def test_same_identity_resumes_with_other_batch_sizes_and_actor_counts(eval_argv):
    out = first_run(eval_argv)
    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", eval_argv(
        "longtext", "batch_size=1", "rollout.num_actors=2", "decoder.max_batch=1", "benchmark.limit=2",
        "scoring.enabled=false")[2:])
    plan = eval_job.make_plan(cfg)
    assert "images/0_0.png" in tree(out) and plan.already_done == 1


def test_a_folder_that_is_not_a_run_is_never_cleared(run_job, eval_argv, tmp_path):
    write_bytes(tmp_path / "out" / "thesis.tex", b"precious")
    code, err = run_job(eval_job.main, "eval", eval_argv("longtext", "overwrite=true"))
    assert code == 2 and "holds no config.json: it is not a run folder" in err
    assert tree(tmp_path / "out") == {"thesis.tex": b"precious"}


def test_identity_diff_and_claim_folder_states(tmp_path):
    assert identity_diff({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
    assert identity_diff({"a": 1}, {"a": 2, "c": None}) == ["a: 1 -> 2", "c: (none) -> null"]
    assert claim_folder(tmp_path / "new", {"a": 1}, overwrite=False) == "fresh"
    write_bytes(tmp_path / "run" / "config.json", json.dumps({"identity": {"a": 1}}).encode())
    assert claim_folder(tmp_path / "run", {"a": 1}, overwrite=False) == "resume"
    write_bytes(tmp_path / "file", b"")
    with pytest.raises(RunIdentityError, match="is a file, not a folder"):
        claim_folder(tmp_path / "file", {"a": 1}, overwrite=True)
    write_bytes(tmp_path / "old" / "config.json", b"{}")  # a run from before identities were recorded
    with pytest.raises(RunIdentityError, match="config.json has no readable identity"):
        claim_folder(tmp_path / "old", {"a": 1}, overwrite=False)


def test_sweep_cell_with_other_settings_is_refused_not_reported_over_old_images(tmp_path, tiny_cache):
    overrides = ["benchmark.limit=1", "settings.ar_height=64", "settings.ar_width=64", "settings.upsampling_ratio=1.0",
                 f"tiny_cache={tiny_cache}"]
    cfg = load_config(SweepConfig, REPO / "configs/sweep.yaml", [
        f"out_dir={tmp_path / 'sweep'}", "benchmarks=[longtext]", "settings=[{}]", "checkpoints={tiny: {path: tiny}}",
        f"overrides=[{', '.join([*overrides, 'settings.num_inference_steps=2'])}]"])
    cell = sweep.eval_config(cfg, "tiny", cfg.checkpoints["tiny"], "longtext", cfg.settings[0])
    plan = eval_job.make_plan(cell)
    plan.out_dir.mkdir(parents=True)
    (plan.out_dir / "config.json").write_text(json.dumps(plan.config_record()))
    write_bytes(plan.out_dir / "results.json", json.dumps({"complete": True, "score": 0.5}).encode())
    before = tree(plan.out_dir)

    changed = load_config(SweepConfig, REPO / "configs/sweep.yaml", [
        f"out_dir={tmp_path / 'sweep'}", "benchmarks=[longtext]", "settings=[{}]", "checkpoints={tiny: {path: tiny}}",
        f"overrides=[{', '.join([*overrides, 'settings.num_inference_steps=3'])}]"])
    assert sweep.finished(sweep.eval_config(changed, "tiny", changed.checkpoints["tiny"], "longtext",
                                            changed.settings[0])) is None
    with pytest.raises(RunIdentityError, match=r"settings.num_inference_steps: 2 -> 3.*overwrite=true"):
        sweep.run_sweep(changed)
    assert tree(plan.out_dir) == before and not (tmp_path / "sweep" / "results.csv").exists()
