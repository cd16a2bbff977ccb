"""rollout.placement=colocated in the DeepSpeed trainer actors (ZeRO-2, gloo, CPU): two ranks sample their shares
over their own live parameters with the same bits as a separate rollout engine holding the same weights, before
and after an update; and the config rules that go with it."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from uniar_ray.config import ConfigError, GRPORunConfig, load_config


def _reqs():
    from uniar_ray.rollout import GenerationRequest

    prompts = ["a red cat", "a red cat", "two dogs on a bench", "two dogs on a bench", "a poster", "a poster"]
    return [GenerationRequest(p, 64, 64, seed=10 + i, request_id=f"r{i}") for i, p in enumerate(prompts)]


def _same(a, b) -> bool:
    return all(torch.equal(x.bits(), y.bits()) and np.array_equal(x.logprobs, y.logprobs) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_ranks_sample_like_a_separate_engine_before_and_after_an_update(ray_local):
    from actors.rollout_engine import RolloutEngineActor
    from actors.trainer import TrainerGroup
    from uniar_ray.config import GRPOConfig, ModelConfig, RolloutConfig, TrainerConfig

    # max_batch 3: each rank's share is one batch, as on the separate engine (a batch's padding moves the last bits)
    rollout = RolloutConfig(placement="colocated", max_batch=3)
    trainer = TrainerGroup(ModelConfig(), GRPOConfig(num_generations=2, learning_rate=0.05, beta=0.01),
                           TrainerConfig(world_size=2, num_cpus=0.5, micro_batch_size=3), total_steps=2,
                           rollout=rollout)
    engine = RolloutEngineActor.options(num_cpus=0.25).remote(ModelConfig(), RolloutConfig(max_batch=3))
    try:
        first = trainer.generate(_reqs(), 0)
        assert [r.request_id for r in first] == [f"r{i}" for i in range(6)]  # shares back in request order
        assert {r.weight_version for r in first} == {0}
        assert _same(first, ray.get(engine.generate.remote(_reqs())))
        for i, r in enumerate(first):
            r.group, r.advantage = i // 2, (1.0, -1.0)[i % 2]
        trainer.train_step(first)  # ZeRO-2 writes the parameters in place
        digests = trainer.param_digests()
        assert digests[0] == digests[1]  # sampling left both ranks' training state alone
        second = trainer.generate(_reqs(), 1)
        assert {r.weight_version for r in second} == {1}
        assert not _same(first, second)  # the second step samples from the updated weights ...
        ray.get(engine.update_weights.remote(trainer.trainable_state(), 1))
        assert _same(second, ray.get(engine.generate.remote(_reqs())))  # ... exactly them
    finally:
        ray.kill(engine)
        trainer.shutdown()


def _cfg(*overrides):
    return load_config(GRPORunConfig, "configs/grpo_demo.yaml", list(overrides))


def test_colocated_config_rules():
    ok = _cfg("rollout.placement=colocated", "async_mode=one_step", "trainer.world_size=2")
    assert ok.rollout.placement == "colocated"
    for overrides, words in [
        (["trainer.zero_stage=3"], "trainer.zero_stage=2"),
        (["rollout.backend=vllm"], "rollout.backend=torch"),
        (["rollout.weight_sync=collective"], "rollout.placement=separate"),
        (["rollout.num_actors=2"], "rollout.num_actors"),
    ]:
        with pytest.raises(ConfigError, match=words):
            _cfg("rollout.placement=colocated", *overrides)
    assert _cfg("trainer.zero_stage=3", "rollout.weight_sync=collective").rollout.weight_sync == "collective"


def test_eval_refuses_grpo_only_rollout_keys():
    from uniar_ray.config import EvalConfig

    with pytest.raises(ConfigError, match="GRPO options"):
        load_config(EvalConfig, "configs/eval/quick_tiny.yaml", ["rollout.placement=colocated"])
