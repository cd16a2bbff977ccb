"""GRPO --resume identity: a key that changes what the run trains (AR size, seeds, the KL reference, the decoder and
how it decodes, the reward set and weights, the validation set, the roll-out placement) is refused before anything is
written, naming the key and what it breaks; hyper-parameters and resources may change and are listed; a one_step
checkpoint's prefetched roll-out is reused only when it is what the resumed step samples, else sampled again."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import grpo as grpo_job
from jobs import grpo_run
from uniar_ray import checkpoint as ckpt
from uniar_ray.config import GRPORunConfig, load_config, to_dict
from uniar_ray.rollout import GenerationRequest, Rollout
from uniar_ray.runlog import RunDir

from faults_helpers import REPO, tree

DEMO = str(REPO / "configs/grpo_demo.yaml")


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A 2-step demo run as a finished run leaves it (config.json, a metric line, a complete checkpoint), no Ray."""
    monkeypatch.chdir(REPO)  # the demo's data path is relative to the repository
    run = tmp_path / "run"
    cfg = load_config(GRPORunConfig, DEMO, [f"run_dir={run}", "steps=2"])
    folder = run / "checkpoints" / "step-000002"
    (folder / "trainer").mkdir(parents=True)
    (folder / "trainer" / "state.pt").write_bytes(b"optimizer state")
    for f in (run / "config.json", folder / "config.json"):
        f.write_text(json.dumps(to_dict(cfg), indent=2))
    (run / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.1}\n{"step": 1, "reward_mean": 0.2}\n')
    RunDir(run, resume=True).save_driver_state(folder, {"step": 2, "data": {},
                                                        "data_fingerprint": grpo_run._data_fingerprint(cfg)})
    return run


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """A policy and a decoder checkpoint other than the run's (tiny, other seeds)."""
    from uniar_ray.decoder.tiny import write_tiny_decoder_checkpoint
    from uniar_ray.model import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("elsewhere")
    return {"policy": str(write_tiny_checkpoint(root / "policy", seed=5)),
            "decoder": str(write_tiny_decoder_checkpoint(root / "decoder", seed=5, ar_model=False))}


def _argv(run, *overrides):
    return ["--config", DEMO, f"run_dir={run}", "steps=4", *overrides, "--resume"]


@pytest.mark.parametrize("overrides,key", [
    (["ar_height=128", "ar_width=128"], "ar_height: 64 -> 128 (changes the image size the policy is trained to"),
    (["grpo.ref_model_path={policy}"], "grpo.ref_model_path: 'tiny' -> '{policy}' (changes the KL"),
    (["grpo.seed=7"], "grpo.seed: 42 -> 7 (changes the seeds of every roll-out"),
    (["data.seed=7"], "data.seed: 42 -> 7 (changes the prompt order"),
    (["model.tiny_seed=1"], "model.tiny_seed: 0 -> 1 (changes the policy"),
    (["decoder.tiny_seed=3"], "decoder.tiny_seed: 0 -> 3 (changes the decoder"),
    (["decoder.path={decoder}", "decoder.tiny_bit_driven=false"], "decoder.path: 'tiny' -> '{decoder}'"),
    (["grpo.decode_num_inference_steps=3"], "grpo.decode_num_inference_steps: 4 -> 3 (changes how the images"),
    (["decode_seed=sample"], "decode_seed: 'fixed' -> 'sample'"),
    (["rewards.models.target_color.weight=2.0"], "rewards.models.target_color.weight: 1.0 -> 2.0 (changes the reward"),
    (["rewards.models.target_color.target=[0,0,255]"],
     "rewards.models.target_color.target: [255.0, 0.0, 0.0] -> [0.0, 0.0, 255.0]"),
    (["rewards.models.brightness={target: [0.5], num_cpus: 0.25}"],
     "rewards.models.brightness.kind: <unset> -> 'brightness'"),
    (["rollout.placement=colocated"], "rollout.placement: 'separate' -> 'colocated'"),
])
def test_grpo_resume_that_changes_what_the_run_trains_is_refused_and_writes_nothing(
        run_job, old_run, overrides, key, elsewhere):
    # other folders that exist (a path that does not is refused earlier, by the checks before Ray)
    for name, path in elsewhere.items():
        overrides, key = [o.replace(f"{{{name}}}", path) for o in overrides], key.replace(f"{{{name}}}", path)
    before = tree(old_run)
    code, err = run_job(grpo_job.main, "grpo", _argv(old_run, *overrides))
    assert code == 2 and key in err, err  # a user error: one message, exit 2, no traceback
    assert "[grpo] error: --resume: the config differs" in err and "Nothing was changed on disk" in err
    assert tree(old_run) == before  # config.json included: the refused resume rewrote nothing


def test_grpo_resume_with_other_hyper_parameters_and_resources_lists_them(old_run, capsys):
    cfg = load_config(GRPORunConfig, DEMO, [f"run_dir={old_run}", "steps=4", "grpo.learning_rate=0.02",
                                            "grpo.temperature=0.9", "rollout.num_actors=2", "decoder.num_actors=2",
                                            "rewards.models.target_color.num_actors=2", "grpo.ref_model_path=tiny"])
    run, candidates = grpo_run.open_run(cfg, True)
    assert run.path == old_run and [c.name for c in candidates] == ["step-000002"]
    err = capsys.readouterr().err
    listed = err.split("settings changed since the checkpoint (allowed):")[1].split()
    assert "grpo.learning_rate:" in listed and "grpo.temperature:" in listed and "steps:" in listed
    assert "rewards.models.target_color.num_actors:" in listed and "decoder.num_actors:" in listed
    assert "grpo.ref_model_path:" not in err  # spelled out, it is the same reference as the empty default


def test_resume_identity_of_older_runs_reward_sets_and_validation():
    new = to_dict(load_config(GRPORunConfig, DEMO))
    older = json.loads(json.dumps(new))
    del older["grpo"]["ref_model_path"], older["decode_upsampling_ratio"]  # fields added after that run was made
    assert ckpt.compare_identity(older, new) == ([], [])  # it ran as the defaults do
    changed = json.loads(json.dumps(new))
    changed["decode_upsampling_ratio"] = 1.5
    breaking, _ = ckpt.compare_identity(older, changed)
    assert breaking == ["decode_upsampling_ratio: 1.0 -> 1.5 (changes how the images the rewards score are decoded)"]
    fewer = json.loads(json.dumps(new))
    fewer["rewards"]["models"] = {}  # a reward removed
    breaking, _ = ckpt.compare_identity(new, fewer)
    removed = "rewards.models.target_color.weight: 1.0 -> <unset> (changes the reward the run maximises"
    assert removed in "\n".join(breaking)
    with_val = {**new, "validation": {**new["validation"], "prompt_file": "a.jsonl", "every": 5, "seed": 0}}
    for change in ({"prompt_file": "b.jsonl"}, {"seed": 1}, {"num_generations": 8}, {"temperature": 0.5}):
        breaking, _ = ckpt.compare_identity(with_val, {**new, "validation": {**with_val["validation"], **change}})
        assert len(breaking) == 1 and "validation set" in breaking[0]
    breaking, _ = ckpt.compare_identity(with_val, {**new, "validation": {**with_val["validation"], "holdout": 4}})
    assert len(breaking) == 1 and "held-out prompts leave the training set" in breaking[0]
    breaking, other = ckpt.compare_identity(with_val, {**new, "validation": {**with_val["validation"], "every": 10}})
    assert breaking == [] and other == ["validation.every: 5 -> 10"]  # how often it runs may change
    assert ckpt.breaking_reason("grpo.learning_rate") is None and ckpt.breaking_reason("steps") is None


def _rollout(req: GenerationRequest, version: int) -> Rollout:
    return Rollout(request_id=req.request_id, prompt=req.prompt, prompt_ids=np.zeros(3, np.int32),
                   ar_height=req.ar_height, ar_width=req.ar_width, bits_shape=(1, 4, 4, 64),
                   bits_packed=np.zeros(128, np.uint8), logprobs=None, seed=req.seed, temperature=req.temperature,
                   cfg_scale=req.cfg_scale, weight_version=version)


def test_a_prefetched_roll_out_is_reused_only_when_its_settings_match():
    reqs = [GenerationRequest("a red apple", 64, 64, seed=11 + k, temperature=1.0, request_id=f"s3-p0-g{k}")
            for k in range(2)]
    saved = [_rollout(q, version=2) for q in reqs]  # one_step: sampled before step 2's update
    assert ckpt.prefetch_mismatch(saved, reqs, weight_version=2) is None
    cases = [
        ([GenerationRequest("a red apple", 128, 128, seed=11 + k, request_id=f"s3-p0-g{k}") for k in range(2)], 2,
         "s3-p0-g0: AR size '64x64', this step's is '128x128'"),
        ([GenerationRequest("a red apple", 64, 64, seed=11 + k, temperature=0.7, request_id=f"s3-p0-g{k}")
          for k in range(2)], 2, "temperature 1.0, this step's is 0.7"),
        ([GenerationRequest("a red apple", 64, 64, seed=11 + k, cfg_scale=2.0, request_id=f"s3-p0-g{k}")
          for k in range(2)], 2, "cfg 1.0, this step's is 2.0"),
        ([GenerationRequest("a red apple", 64, 64, seed=99 + k, request_id=f"s3-p0-g{k}") for k in range(2)], 2,
         "seed 11, this step's is 99"),
        ([GenerationRequest("a blue car", 64, 64, seed=11 + k, request_id=f"s3-p0-g{k}") for k in range(2)], 2,
         "prompt 'a red apple', this step's is 'a blue car'"),
        (reqs, 3, "weight version 2, this step's is 3"),  # a synchronous resume samples from the saved weights
        (reqs[:1], 2, "it holds 2 samples, this step draws 1"),
    ]
    for now, version, message in cases:
        assert message in ckpt.prefetch_mismatch(saved, now, weight_version=version)


@pytest.mark.slow
def test_a_one_step_resume_with_another_temperature_samples_the_prefetched_step_again(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(REPO)
    fast = ["steps=2", "save_every=1", "grid_every=1", "data.prompts_per_step=2", "grpo.num_generations=2",
            "trainer.micro_batch_size=4", "validation.every=0", "decoder.max_batch=8", "grpo.decode_num_inference_steps=1",
            "async_mode=one_step", f"run_dir={tmp_path / 'run'}"]
    run = grpo_job.main(["--config", DEMO, *fast])
    assert (run / "checkpoints" / "step-000001" / grpo_run.PREFETCHED).exists()
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000002")  # as if it stopped after checkpoint 1
    capfd.readouterr()
    grpo_job.main(["--config", DEMO, *fast, "grpo.temperature=0.5", "--resume"])
    err = capfd.readouterr().err
    assert ("the checkpoint's prefetched roll-out of step 1 does not match this run (s1-p0-g0: temperature 1.0, "
            "this step's is 0.5); sampling it again") in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [0, 1] and rows[1]["rollout/weight_version"] == 1  # the checkpoint's weights


@pytest.mark.parametrize("rewards,expected", [
    ([0.1, 0.2, 0.4], "per-step noise not estimated (3 steps; it needs 4 or more)"),
    ([0.1, 0.3], "per-step noise not estimated (2 steps; it needs 4 or more)"),
    ([0.1, 0.2, 0.3, 0.4], "per-step noise 0 (the curve is a straight line)"),
    ([0.1, 0.3, 0.2, 0.5, 0.4], "per-step noise 0.1"),
])
def test_grpo_summary_of_a_short_run_never_prints_nan(tmp_path, capsys, rewards, expected):
    run = RunDir(tmp_path / "run").open()
    for step, r in enumerate(rewards):
        run.log_metrics({"step": step, "reward_mean": r})
    grpo_job.summarize(run)
    line = capsys.readouterr().out
    assert expected in line and "nan" not in line.lower() and line.startswith("[grpo] mean reward: first ")
