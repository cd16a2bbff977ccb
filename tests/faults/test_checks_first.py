"""Checks first (issue 22.5): everything that can be checked without loading weights fails before Ray starts and
before any actor exists, in the job and in ``--plan`` alike (uniar_ray/preflight.py). The ``no_ray`` fixture turns
starting Ray or creating the GRPO actors into a test failure, so every case asserts on those events, not on time."""
from __future__ import annotations

import json

import pytest

from jobs import eval as eval_job
from jobs import grpo as grpo_job
from jobs import sweep as sweep_job

from faults_helpers import REPO, write_bytes


@pytest.fixture
def no_ray(monkeypatch):
    """Records (and refuses) every start of Ray and every creation of the GRPO actors."""
    import ray

    import jobs.grpo_parts

    events: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            events.append(what)
            raise AssertionError(f"{what} before the checks failed")
        return call

    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(jobs.grpo_parts.Parts, "__init__", refuse("actors created"))
    return events


def grpo_argv(tmp_path, *overrides):
    return ["--config", str(REPO / "configs/grpo_demo.yaml"), f"run_dir={tmp_path / 'run'}", *overrides]


def rl_jsonl(path, prompts, bad_line: str | None = None):
    lines = [json.dumps({"instruction": p, "number": i}) for i, p in enumerate(prompts)]
    if bad_line is not None:
        lines.insert(1, bad_line)
    return write_bytes(path, ("\n".join(lines) + "\n").encode())


@pytest.mark.parametrize("case", ["malformed line", "prompt over the limit"])
def test_a_bad_prompt_file_fails_before_ray_and_any_actor(run_job, tmp_path, no_ray, case):
    if case == "malformed line":
        data = rl_jsonl(tmp_path / "rl.jsonl", ["a red apple", "a blue car"], bad_line='{"instruction": "x", ')
        extra, line = [], "rl.jsonl:2: not valid JSON"
    else:
        data = rl_jsonl(tmp_path / "rl.jsonl", ["a red apple", "a very long prompt " * 40])
        extra = ["data.max_prompt_tokens=16", "data.prompt_overflow=error"]
        line = "rl number 1 (line 2): the prompt has"
    code, err = run_job(grpo_job.main, "grpo", grpo_argv(tmp_path, f"data.path={data}", *extra))
    assert code == 2 and line in err and "Traceback" not in err, err
    assert no_ray == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,line", [
    (["grpo.num_generations=100000000", "steps=1"],
     "samples per step (data.prompts_per_step x grpo.num_generations)=800000000: over the limit of 65536"),
    (["ar_height=4096", "ar_width=4096", "data.prompts_per_step=1", "grpo.num_generations=2"],
     "ar_height/ar_width: AR size 4096x4096 needs 16384 image tokens"),
    (["rewards.models.hps.model_path=/nonexistent/clip", "rewards.models.hps.num_cpus=0"],
     "rewards.models.hps.model_path=/nonexistent/clip: no such file or folder"),
    (["rollout.num_actors=8", "rollout.num_cpus=1"], "the actors ask for 9.25 CPUs"),
])
def test_sizes_and_folders_fail_before_ray(run_job, tmp_path, no_ray, overrides, line):
    """An absurd size (the driver would build 8e8 requests and hang), the AR size against the model's config.json,
    a reward model folder that is not there, more CPUs than the embedded local Ray has."""
    code, err = run_job(grpo_job.main, "grpo", grpo_argv(tmp_path, *overrides))
    assert code == 2 and line in err and "Traceback" not in err, err
    assert no_ray == [] and not (tmp_path / "run").exists()


def test_a_step_larger_than_the_driver_memory_fails_before_ray(run_job, tmp_path, no_ray, monkeypatch):
    import psutil

    class Small:
        available = 2 * 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Small())
    code, err = run_job(grpo_job.main, "grpo", grpo_argv(tmp_path, "ar_height=512", "ar_width=512",
                                                         "data.prompts_per_step=64", "grpo.num_generations=16"))
    assert code == 2 and "1024 samples per step" in err and "over the 2.0 GiB this machine has available" in err
    assert no_ray == []


@pytest.mark.parametrize("entry,line", [
    ({"name": "x", "json_path": "missing.jsonl", "sampled_ratio": 1}, "json_path 'missing.jsonl' not found"),
    ({"name": "x", "json_path": "rl.jsonl", "sampled_ratio": -1}, "datasets[0].sampled_ratio=-1: must be a finite"),
    ({"name": "x", "json_path": "rl.jsonl", "sampled_ratio": "half"}, "sampled_ratio='half': must be a number"),
])
def test_plan_refuses_the_data_mix_the_run_refuses(run_job, tmp_path, no_ray, entry, line):
    rl_jsonl(tmp_path / "rl.jsonl", ["a red apple", "a blue car"])
    mix = write_bytes(tmp_path / "mix.yaml", json.dumps({"datasets": [entry]}).encode())
    for plan in (["--plan"], []):  # the same check, the same line, in the plan and in the job
        code, err = run_job(grpo_job.main, "grpo", grpo_argv(tmp_path, f"data.path={mix}", *plan))
        assert code == 2 and line in err and "Traceback" not in err, (plan, err)
    assert no_ray == []


def test_plan_without_a_running_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    """``--plan`` with cluster.address=auto and no cluster: Ray's ConnectionError becomes one line, exit 2."""
    import ray

    def no_cluster(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")
    monkeypatch.setattr(ray, "init", no_cluster)
    from jobs import entry

    with pytest.raises(SystemExit) as e:
        entry.run(grpo_job.main, "grpo", grpo_argv(tmp_path, "cluster.address=auto", "--plan"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "[plan] cluster.address=auto: no Ray cluster to plan on (Could not find any running Ray instance. Please "
        "specify the one to connect to); start it (ray up / ray start), run --plan on one of its nodes, or describe "
        "it with --cluster-file cluster.yaml"]


def test_eval_out_dir_under_a_file_fails_before_ray(run_job, eval_argv, tmp_path, no_ray):
    blocker = write_bytes(tmp_path / "a_file", b"not a folder")
    code, err = run_job(eval_job.main, "eval", [*eval_argv("geneval"), f"out_dir={blocker / 'out'}"])
    assert code == 2 and f"out_dir={blocker / 'out'}: {blocker} is a file, not a folder: choose another out_dir" in err, err
    assert no_ray == [] and blocker.read_bytes() == b"not a folder"


def test_eval_scorer_folder_that_is_not_there_fails_before_ray(run_job, eval_argv, tmp_path, no_ray):
    """GenEval's detector is loaded in the driver after every image is made: a wrong folder is found at start."""
    code, err = run_job(eval_job.main, "eval", [*eval_argv("geneval"), "scoring.geneval_detector=/nonexistent/det",
                                                "scoring.geneval_clip=tiny"])
    assert code == 2 and "scoring.geneval_detector=/nonexistent/det: no such folder" in err, err
    assert no_ray == [] and not (tmp_path / "out" / "images").exists()


def test_sweep_over_a_missing_grpo_run_names_it_before_ray(run_job, tmp_path, no_ray):
    missing = tmp_path / "no_such_run"
    code, err = run_job(sweep_job.main, "sweep", ["--config", str(REPO / "configs/sweep_grpo_run.yaml"),
                                                  f"grpo_run={missing}", f"out_dir={tmp_path / 'sweep'}"])
    assert code == 2 and f"{missing}: sweep.grpo_run: no such folder" in err, err
    assert no_ray == [] and not (tmp_path / "sweep").exists()


def test_eval_gpu_device_on_a_machine_without_gpus_fails_before_ray(run_job, eval_argv, no_ray, monkeypatch):
    """An eval whose actors run here (embedded local Ray) on CUDA, on a machine without CUDA: refused at start."""
    from uniar_ray.config import feasibility

    monkeypatch.setattr(feasibility, "_cuda_count", lambda: 0)  # this machine, as far as the check can tell
    code, err = run_job(eval_job.main, "eval", [*eval_argv("geneval"), "model.device=cuda", "rollout.num_gpus=1"])
    assert code == 2 and "model.device='cuda': this machine has no CUDA GPU and the job runs its actors here" in err
    assert "the actors ask for 1 GPUs (rollout 1 x 1) and this machine has 0" in err and no_ray == []
