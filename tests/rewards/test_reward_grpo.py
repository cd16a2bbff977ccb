"""Rewards people bring, in GRPO steps on local Ray with the tiny models: a class that exists only in a py_modules
folder (its own runtime_env), a reward server on 127.0.0.1 (its details kept per sample), self_judge on the bits;
only the samples a pixel reward needs are decoded, a run with only self_judge starts no decoder, and a server that
is down stops the run through the failure budget with one line naming the reward and the URL."""
from __future__ import annotations

import importlib.util
import json
import math
import textwrap

import pytest
import yaml

from jobs import grpo as job
from uniar_ray.config import GRPORunConfig, load_config

# Two CPUs in all: the demo's actors take 1.5, the rewards added here 0.15 each.
FAST = ["data.prompts_per_step=2", "grpo.num_generations=4", "trainer.micro_batch_size=4", "decoder.max_batch=8",
        "grpo.decode_num_inference_steps=2", "steps=1"]
PIXEL_TASKS = ["ocr"]  # the pixel rewards' routing; self_judge scores every sample


@pytest.fixture
def outside_module(tmp_path):
    """A reward class in a folder outside the repository, importable only through runtime_env.py_modules."""
    folder = tmp_path / "ext" / "greenness_reward"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent('''
        import os

        import numpy as np

        from rewards.base import RewardScores


        class Greenness:
            """Mean green level times scale; details say which environment it ran in."""

            def __init__(self, scale=1.0):
                self.scale = scale

            def score(self, batch):
                values = [self.scale * float(np.asarray(im)[..., 1].mean()) / 255 for im in batch.images]
                details = [{"green": v, "flag": os.environ.get("GREEN_FLAG")} for v in values]
                return RewardScores(values, [None] * len(values), details=details)
    '''))
    assert importlib.util.find_spec("greenness_reward") is None  # not importable here, in the driver
    return folder


@pytest.mark.slow
def test_class_server_and_self_judge_score_a_step_decoding_only_what_pixels_need(ray_local, tmp_path, outside_module,
                                                                                 reward_server):
    tasks = json.dumps(PIXEL_TASKS)
    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", FAST + [
        f"run_dir={tmp_path / 'run'}", f"rewards.models.target_color.tasks={tasks}",
        "rewards.models.green.class=greenness_reward:Greenness", "rewards.models.green.options={scale: 2.0}",
        f"rewards.models.green.tasks={tasks}", "rewards.models.green.num_cpus=0.15",
        f"rewards.models.green.runtime_env={{py_modules: ['{outside_module}'], env_vars: {{GREEN_FLAG: 'own env'}}}}",
        "rewards.models.srv.backend=http", f"rewards.models.srv.url={reward_server.url}",
        f"rewards.models.srv.tasks={tasks}", "rewards.models.srv.num_cpus=0.15",
        "rewards.models.me.kind=self_judge", "rewards.models.me.num_cpus=0.15", "rewards.models.me.weight=0.5"])
    parts = job.Parts(cfg)
    try:
        m, _ = job.grpo_step(cfg, parts, 0, None)
        batch, images = parts.last_batch, parts.last_images
    finally:
        parts.close()
    assert not m["skipped_update"] and math.isfinite(m["train/loss"])
    pixel = [r.task in PIXEL_TASKS for r in batch.rollouts]
    assert any(pixel) and not all(pixel)  # the seeded prompts mix tasks
    assert [im is not None for im in images] == pixel  # decoded only where a pixel reward applies
    sent = [p for r in reward_server.requests for p in r["body"]["prompts"]]
    assert sorted(sent) == sorted(r.prompt for r, p in zip(batch.rollouts, pixel) if p)
    for r, im, p in zip(batch.rollouts, images, pixel):
        assert not r.excluded and 0.0 <= r.rewards["me"] <= 1.0
        assert set(r.reward_details["me"]) == {"p_yes", "p_no"}
        json.dumps(r.reward_details, allow_nan=False)  # JSON-friendly for the gallery
        if p:
            assert r.rewards["green"] == pytest.approx(2.0 * im[..., 1].mean() / 255)
            assert r.reward_details["green"]["flag"] == "own env"  # runtime_env.env_vars reached the actor
            assert r.rewards["srv"] == pytest.approx(im.mean() / 255)
            assert r.reward_details["srv"]["prompt"] == r.prompt and r.reward_details["srv"]["format"] == "89504e47"
        else:
            assert math.isnan(r.rewards["green"]) and math.isnan(r.rewards["srv"])


def test_self_judge_alone_starts_no_decoder(ray_local, tmp_path, monkeypatch):
    import actors.decoder_pool

    def no_decoder(*a, **k):
        raise AssertionError("a decoder pool was started")

    monkeypatch.setattr(actors.decoder_pool, "DecoderPool", no_decoder)
    data = yaml.safe_load(open("configs/grpo_demo.yaml"))
    data["rewards"] = {"models": {"self_judge": {"num_cpus": 0.25, "batch_size": 4}}}
    path = tmp_path / "self_judge.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(GRPORunConfig, str(path), FAST + [f"run_dir={tmp_path / 'run'}"])
    assert cfg.rewards.models["self_judge"].model_path == "tiny"  # the policy's own (no ref_model_path set)
    parts = job.Parts(cfg)
    try:
        assert not parts.decoder.actors
        m, _ = job.grpo_step(cfg, parts, 0, None)
    finally:
        parts.close()
    assert m["time/decode"] == 0.0 and not m["skipped_update"]
    assert all(im is None for im in parts.last_images)
    assert all(0.0 < r.rewards["self_judge"] < 1.0 for r in parts.last_batch.rollouts)
    # the sweep's validation cell of such a run starts no decoder either
    from jobs.grpo_validation import CheckpointScorer
    from uniar_ray.config import ModelConfig

    scorer = CheckpointScorer(cfg)
    try:
        cell = scorer.cell(ModelConfig(path="tiny"), tmp_path / "cell")
    finally:
        scorer.close()
    assert cell["complete"] and 0.0 < cell["score"] < 1.0


def test_server_down_stops_the_run_naming_reward_and_url(ray_local, tmp_path, dead_url):
    with pytest.raises(SystemExit) as stop:
        job.main(["--config", "configs/grpo_demo.yaml", *FAST, "steps=3", f"run_dir={tmp_path / 'run'}",
                  "grpo.failure_window=1", "rewards.models.srv.backend=http", f"rewards.models.srv.url={dead_url}",
                  "rewards.models.srv.retries=0", "rewards.models.srv.num_cpus=0.15"])
    message = str(stop.value)
    assert message.startswith("[grpo] step 0: stopping: 2 of 2 prompt groups (100%) were excluded")
    assert f"8x srv: POST {dead_url} failed after 1 try: cannot connect (" in message
