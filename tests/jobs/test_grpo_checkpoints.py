"""GRPO checkpoints end to end on local Ray with tiny models: every save writes a model folder that loads and that
jobs.sweep evaluates; --resume keeps the run's identity, truncates metrics, falls back past a corrupt checkpoint and
changes nothing on disk when refused; TensorBoard and W&B (offline) get the keys of metrics.jsonl."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import grpo as job
from uniar_ray.checkpoint import check_checkpoint
from uniar_ray.model import UniARPolicy

REPO = Path(__file__).resolve().parents[2]
# Validation is tested where a test names it (the demo validates every 5 steps); its sample count is part of a
# run's identity, so it is the same in every run here.
FAST = ["save_every=2", "grid_every=2", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
        "validation.every=0", "validation.num_generations=2"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run4(ray_local, tmp_path_factory):
    """A 4-step demo run saving every 2 steps, validating at 0, 2 and 4, with both trackers on (shared by the tests
    below; copy before use)."""
    path = tmp_path_factory.mktemp("grpo") / "run"
    return job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={path}", "steps=4", *FAST,
                     "tracking.tensorboard=true", "tracking.wandb=true", "validation.every=2"])


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tree(path: Path) -> dict[str, str]:
    """Every file and link under ``path`` with a hash of its content and its mtime: any change on disk shows."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
        else:
            out[str(p)] = "dir"
    return out


def test_every_save_writes_a_model_folder_that_loads_and_differs(run4):
    models = {s: run4 / "checkpoints" / f"step-{s:06d}" / "model" for s in (2, 4)}
    for folder in models.values():
        assert sorted(p.name for p in folder.iterdir()) == ["ar_model", "bsq_encoder", "sd3_pipeline",
                                                            "sd3_transformer"]
        assert (folder / "bsq_encoder").is_symlink() and not os.path.isabs(os.readlink(folder / "bsq_encoder"))
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (folder / "ar_model").iterdir()}
    a, b = (UniARPolicy.from_pretrained(models[s]).state_dict() for s in (2, 4))
    trained = [k for k in a if not k.startswith(("model.visual.", "lm_head."))]
    assert max((a[k] - b[k]).abs().max().item() for k in trained) > 1e-6  # step 4 moved on from step 2
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.visual."))  # frozen, as in the reference
    # the model folder holds exactly the weights of the DeepSpeed state saved beside it
    ds = torch.load(run4 / "checkpoints/step-000004/trainer/state/mp_rank_00_model_states.pt", map_location="cpu",
                    weights_only=False)["module"]
    assert max((ds[k].float() - b[k].float()).abs().max().item() for k in ds) == 0.0


def test_sweep_finds_a_missing_data_file_of_the_run_before_it_starts_anything(run4, tmp_path, monkeypatch):
    """The validation cells need the run's held-out prompts: their data is fetched and checked before Ray."""
    from jobs import sweep

    run = tmp_path / "run"
    shutil.copytree(run4, run, symlinks=True)
    config = json.loads((run / "config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone" / "mix.yaml")
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sweep, "start_ray", lambda cfg: pytest.fail("Ray started before the data was checked"))
    with pytest.raises(Exception, match=r"gone/mix\.yaml"):
        sweep.main(["--config", "configs/sweep_grpo_run.yaml", f"grpo_run={run}", f"out_dir={tmp_path / 's'}"])
    assert not (tmp_path / "s").exists()


def test_sweep_over_the_runs_checkpoints_gives_one_row_each(run4, tmp_path):
    from jobs import sweep

    argv = ["--config", "configs/sweep_grpo_run.yaml", f"grpo_run={run4}", f"out_dir={tmp_path / 's'}",
            "benchmarks=[validation, geneval]",
            "overrides=[benchmark.limit=1, settings.ar_height=64, settings.ar_width=64, "
            "settings.upsampling_ratio=1.0, settings.num_inference_steps=2, scoring.geneval_detector=tiny, "
            "scoring.geneval_clip=tiny]"]
    out = sweep.main(argv)
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [(r["checkpoint"], r["benchmark"]) for r in rows] == [
        ("step-000002", "validation"), ("step-000002", "geneval"), ("step-000004", "validation"),
        ("step-000004", "geneval")]
    assert all(r["complete"] == "True" for r in rows)  # complete runs
    # each checkpoint scored as the run validated it: the same prompts, seeds, decoder and rewards, the same number
    val = {m["step"]: m["val/reward_mean"] for m in map(json.loads, (run4 / "metrics.jsonl").read_text().splitlines())
           if "val/reward_mean" in m}
    assert sorted(val) == [0, 2, 4]
    for r in rows[::2]:
        assert float(r["score"]) == pytest.approx(val[int(r["checkpoint"][5:])], abs=1e-6), r
    results = out / "step-000004" / "validation" / "run" / "results.json"
    stamp = results.stat().st_mtime_ns
    sweep.main(argv)  # a rerun reads finished cells back
    assert results.stat().st_mtime_ns == stamp
    only = sweep.sweep_checkpoints(sweep.load_config(sweep.SweepConfig, "configs/sweep_grpo_run.yaml",
                                                     [f"grpo_run={run4}", "grpo_steps=[4]"]))
    assert list(only) == ["step-000004"]
    with pytest.raises(FileNotFoundError, match=r"step\(s\) \[3\].*there are \[2, 4\]"):
        sweep.sweep_checkpoints(sweep.load_config(sweep.SweepConfig, "configs/sweep_grpo_run.yaml",
                                                  [f"grpo_run={run4}", "grpo_steps=[3]"]))


def test_trackers_get_the_keys_of_metrics_jsonl(run4):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (run4 / "metrics.jsonl").read_text().splitlines()]
    keys = {k for m in rows for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
    rows, final = rows[:-1], rows[-1]  # the steps; the last row holds the final validation only
    acc = EventAccumulator(str(run4 / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == keys
    assert [e.step for e in acc.Scalars("reward_mean")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Scalars("val/reward_mean")] == [0, 2, 4]  # 4: the trained policy
    assert [e.value for e in acc.Scalars("reward_mean")] == pytest.approx([m["reward_mean"] for m in rows])
    # W&B offline: one run, its transaction log (what `wandb sync` uploads) holds every key and the values
    logs = list((run4 / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    from test_tracking import wandb_log  # same folder

    log = wandb_log(logs[0], repr(final["val/reward_mean"]).encode())  # the last figure logged
    assert [k for k in keys if k.encode() not in log] == []
    assert all(repr(m["reward_mean"]).encode() in log for m in rows)


def test_resume_that_breaks_the_run_is_refused_and_changes_nothing(run4, tmp_path):
    run = _copy(run4, tmp_path / "run")
    before = _tree(run)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for override, key in (("grpo.num_generations=8", "grpo.num_generations"),
                          ("data.path=uniar/rl_demo/ocr.jsonl", "data.path"),
                          ("trainer.world_size=2", "trainer.world_size")):
        p = subprocess.run([sys.executable, "-m", "jobs.grpo", "--config", "configs/grpo_demo.yaml", f"run_dir={run}",
                            "steps=6", *FAST, override, "--resume"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2, p.stderr  # a user error
        assert key in p.stderr and "breaks the run" in p.stderr and "Nothing was changed on disk" in p.stderr
        assert "Traceback" not in p.stderr
        assert _tree(run) == before  # config.json included


def test_resume_from_a_checkpoint_path_lists_changes_and_sets_later_checkpoints_aside(run4, tmp_path, capfd):
    run = _copy(run4, tmp_path / "run")
    out = job.main(["--config", "configs/grpo_demo.yaml", "steps=3", *FAST, "grpo.learning_rate=0.02",
                    "--resume", str(run / "checkpoints" / "step-000002")])
    err = capfd.readouterr().err
    assert out == run  # the checkpoint's run, whatever run_dir the config names
    assert "grpo.learning_rate: 0.01 -> 0.02" in err and "resumed from" in err and "step-000002" in err
    assert _steps(run) == [0, 1, 2]  # steps 2 and 3 of the abandoned continuation are gone, step 2 ran again
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    aside = list((run / "checkpoints").glob("superseded-*/step-000004"))
    assert len(aside) == 1  # kept for inspection, never resumed from
    assert json.loads((run / "config.json").read_text())["grpo"]["learning_rate"] == 0.02


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_complete_one(run4, tmp_path, capfd):
    run = _copy(run4, tmp_path / "run")
    # Same size, unreadable: only loading it can tell (the file-size manifest cannot).
    state = run / "checkpoints/step-000004/trainer/state/mp_rank_00_model_states.pt"
    data = bytearray(state.read_bytes())
    data[-512:] = bytes(512)
    state.write_bytes(bytes(data))
    before = _tree(run)
    with pytest.raises(SystemExit, match=r"none of step-000004 .* could be loaded.*nothing was changed"):
        job.main(["--config", "configs/grpo_demo.yaml", "steps=3", *FAST, "--resume", str(state.parents[2])])
    assert _tree(run) == before  # the checkpoint asked for by name: no silent fallback, nothing moved
    capfd.readouterr()
    out = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run}", "steps=3", *FAST, "--resume"])
    err = capfd.readouterr().err
    assert out == run
    assert f"could not load {run / 'checkpoints/step-000004'}" in err
    assert f"falling back to {run / 'checkpoints/step-000002'}" in err
    assert _steps(run) == [0, 1, 2]
    assert check_checkpoint(run / "checkpoints/step-000003") is None


def test_resume_without_a_checkpoint_starts_over_and_says_so(ray_local, tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    # what a run killed before its first checkpoint leaves: lines for steps 0 and 1, no checkpoint
    (run / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.1}\n{"step": 1, "reward_mean": 0.2}\n')
    out = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run}", "steps=1", *FAST, "--resume"])
    err = capfd.readouterr().err
    assert out == run and "no complete checkpoint" in err and "starting over at step 0" in err
    assert "dropped 2 metric line(s)" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [0] and rows[0]["reward_mean"] not in (0.1, None)


def test_a_start_that_fails_before_its_first_step_leaves_run_dir_to_the_corrected_rerun(ray_local, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Exception, match="does not exist"):  # a mistyped model path: refused before Ray starts
        job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run}", "steps=1", *FAST,
                  f"model.path={tmp_path / 'typo'}"])
    assert not (run / "metrics.jsonl").exists()
    out = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={run}", "steps=1", *FAST])
    assert out == run and _steps(run) == [0]  # the same folder, not run-<timestamp>
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_zero3_model_folder_holds_the_gathered_full_weights(ray_local, tmp_path):
    """Two ZeRO-3 ranks each hold half of every parameter; the saved folder must hold the full tensors."""
    from actors.trainer import TrainerGroup
    from uniar_ray.config import GRPOConfig, ModelConfig, TrainerConfig
    from uniar_ray.model import build_tiny_policy

    group = TrainerGroup(ModelConfig(), GRPOConfig(beta=0.0), TrainerConfig(world_size=2, zero_stage=3, num_cpus=0.5,
                                                                             num_threads=1), total_steps=1)
    try:
        group.save_model(tmp_path / "ar_model")
    finally:
        group.shutdown()
    saved = UniARPolicy.from_pretrained(tmp_path).state_dict()
    want = build_tiny_policy(seed=0).state_dict()
    assert saved.keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)
