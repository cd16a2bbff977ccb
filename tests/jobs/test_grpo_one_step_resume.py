"""``async_mode: one_step`` resume: a run killed after a checkpoint and resumed gives the uninterrupted run's next
step (prompts, seeds, images, rewards, loss), although that step's roll-out was sampled before the checkpoint; its
validations (taken while a roll-out runs in the background) are reused up to the checkpoint and equal after it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import grpo as job
from jobs import grpo_run

FAST = ["steps=3", "save_every=1", "grid_every=1", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
        "async_mode=one_step", "decode_seed=sample",
        "validation.every=2", "validation.holdout=4", "validation.num_generations=2"]


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir, step):
    f = run_dir / "checkpoints" / f"step-{step:06d}" / "trainer" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow
def test_one_step_resume_equals_the_uninterrupted_run(ray_local, tmp_path):
    full = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'full'}", *FAST])
    ckpt2 = full / "checkpoints" / "step-000002"
    assert (ckpt2 / grpo_run.PREFETCHED).exists()  # step 2's roll-out was in flight when step 1's update was saved
    # A crash right after checkpoint 2: copy the run without what came later, then resume it.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000003")
    (cut / "grids" / "step-000002.png").unlink()
    resumed = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={cut}", *FAST, "--resume"])
    assert resumed == cut
    a, b = _metrics(full), _metrics(cut)
    assert [m["step"] for m in b] == [0, 1, 2, 3]  # 3: the final policy's validation
    # validations while a roll-out runs in the background; step 2's (the checkpoint's weights) is reused, not redone
    assert [m["step"] for m in a if "val/reward_mean" in m] == [0, 2, 3]
    assert len((cut / "validation.jsonl").read_text().splitlines()) == 3
    for step in (2, 3):
        assert b[step]["val/reward_mean"] == pytest.approx(a[step]["val/reward_mean"], rel=1e-5), step
    for key in ("reward_mean", "train/loss", "train/kl", "train/grad_norm",
                "train/sampling/sampling_logp_difference/max"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    # the grid shows the step's prompts, rewards and images: identical
    grid = lambda run: np.asarray(Image.open(run / "grids" / "step-000002.png"))  # noqa: E731
    assert np.array_equal(grid(full), grid(cut))
    wa, wb = _weights(full, 3), _weights(cut, 3)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5
