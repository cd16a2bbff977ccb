"""The GRPO job end to end with ``rollout.backend=vllm`` on local Ray (tiny models): two steps roll out through the
vLLM engine, train, and sync the new weights into it in place."""
from __future__ import annotations

import json
import math

import pytest
import torch

from jobs import grpo as job

pytestmark = pytest.mark.slow  # Ray, the trainer and a vLLM start

FAST = ["steps=2", "save_every=1", "grid_every=2", "data.prompts_per_step=2", "grpo.num_generations=4",
        "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2",
        "rollout.backend=vllm", "rollout.max_batch=8", "rollout.vllm_kvcache_gib=0.25", "validation.every=0"]


def _model_state(run_dir, step):
    f = run_dir / "checkpoints" / f"step-{step:06d}" / "trainer" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(f, map_location="cpu", weights_only=False)["module"]


def test_grpo_with_the_vllm_engine(ray_local, tmp_path):
    run = job.main(["--config", "configs/grpo_demo.yaml", f"run_dir={tmp_path / 'vllm'}", *FAST])
    assert json.loads((run / "config.json").read_text())["rollout"]["backend"] == "vllm"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert math.isfinite(m["train/loss"]) and m["excluded_groups"] == 0
        # The vLLM engine sampled from the trainer's current weights: step 1 only after the in-place weight sync.
        assert m["train/sampling/sampling_logp_difference/max"] < 1e-3
    # Step 0 is on-policy for the vLLM engine's own log-probs too: the sampler's log-probs are the trainer's.
    assert metrics[0]["train/clip_ratio/region_mean"] == 0.0
    a, b = _model_state(run, 1), _model_state(run, 2)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) > 0  # the second step trained too
