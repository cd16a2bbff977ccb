"""perf/gpu_grpo.py on the tiny model and the CPU: the one-process GRPO step the GPU run measures, end to end, with
its JSON line; the step-2 check and the GPU reward checked against what they stand for."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from perf import gpu_grpo
from uniar_ray.model.tiny import build_tiny_policy
from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine


def test_gpu_grpo_tiny_cpu(capsys):
    gpu_grpo.main(["--tiny", "--device", "cpu", "--prompts", "2", "--generations", "2", "--decoder-steps", "1",
                   "--lr", "1e-3"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "gpu_grpo" and last["device"] == "cpu" and last["dtype"] == "bfloat16"
    assert [s["step"] for s in last["steps"]] == [1, 2]
    assert set(last["phases_s"]) == {"rollout", "decode", "reward", "advantages", "train", "optimizer"}
    assert all(v > 0 for v in last["phases_s"].values()) and last["images_per_gpu_s"] > 0
    check = last["check"]
    assert check["step2_replay_equals_eager"] and check["replay_vs_eager"]["logprob_max_diff"] == 0.0
    assert check["step2_bits_differ_from_step1_frac"] > 0  # the update reached the sampler
    assert all(s["watched_weight_changed_frac"] > 0 and math.isfinite(s["loss"]) for s in last["steps"])
    flops = last["train_flops"]
    assert flops["hardware_with_recompute"] > flops["model_fwd_bwd"] > flops["forward"] > 0  # recompute counted
    assert flops["tflops_hardware"] > 0 and flops["peak_tflops"] is None
    plan = last["memory_plan"]
    assert plan["master_fp32_gib"] == pytest.approx(2 * plan["grads_trainable_gib"], rel=1e-3)
    assert plan["grads_trainable_gib"] > 0 and plan["peak_train_gib"] > plan["weights_all_gib"]
    assert last["shapes"]["params_b"]["text_layers"] > 0


def test_the_step2_check_catches_stale_weights():
    """The CPU check (engine vs a freshly packed copy) fails when an update bypasses the version counter (writes
    through .data, which leaves the engine's oneDNN packs stale) and passes after an in-place update."""
    policy = build_tiny_policy(0, dtype=torch.bfloat16)
    engine = TorchRolloutEngine(policy, max_batch=4)
    reqs = [GenerationRequest("a red cat", 64, 64, seed=i) for i in range(3)]
    engine.generate(reqs)  # packs built from the starting weights
    delta = {n: torch.randn_like(p) * 0.02 for n, p in policy.named_parameters()}
    for n, p in policy.named_parameters():
        p.data.add_(delta[n])  # no version bump: the packs go stale
    stale = gpu_grpo.compare_bits(engine.generate(reqs), gpu_grpo.eager_rollouts(policy, reqs, False, False))
    assert not stale["equal"]
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.0)  # an in-place update (as MasterWeightAdamW's copy_) moves the version counter
    fresh = gpu_grpo.compare_bits(engine.generate(reqs), gpu_grpo.eager_rollouts(policy, reqs, False, False))
    assert fresh["equal"] and fresh["logprob_max_diff"] == 0.0


def test_gpu_reward_is_the_target_color_reward():
    from rewards.base import RewardBatch
    from rewards.programmatic import TargetColorReward
    from uniar_ray.decoder import UniARDecoder
    from uniar_ray.decoder.tiny import random_bits

    dec = UniARDecoder.tiny(bit_driven=True)  # colourful images: the rewards differ between samples
    bits = random_bits(3, 64, 64, seed=4)
    images = [np.asarray(im) for im in dec.decode(bits, 64, 64, upsampling_ratio=1.0, num_inference_steps=1,
                                                   seeds=[0, 1, 2])]
    px = dec.decode_pixels(bits, 64, 64, upsampling_ratio=1.0, num_inference_steps=1, seeds=[0, 1, 2])
    for rgb in ([255, 0, 0], [10, 200, 30]):
        want = TargetColorReward(rgb).score(RewardBatch(images, [""] * 3, [None] * 3, [{}] * 3)).scores
        got = gpu_grpo.target_color_scores(px, rgb).numpy()
        assert np.abs(got - want).max() < 1e-5 and np.ptp(want) > 1e-3


def test_bad_arguments_are_refused(capsys):
    for argv, says in ((["--tiny", "--device", "cpu", "--steps", "1"], "--steps must be >= 2"),
                       (["--device", "cpu"], "use --tiny there")):
        with pytest.raises(SystemExit) as e:
            gpu_grpo.main(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_frozen_parameters_are_the_trainers():
    from actors.trainer import FROZEN_PREFIXES

    assert gpu_grpo.FROZEN_PREFIXES == FROZEN_PREFIXES
