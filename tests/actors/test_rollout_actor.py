"""The rollout actor on local Ray: bit-packed results, in-place weight updates, errors per request."""
from __future__ import annotations

import numpy as np
import ray

from actors.group import ActorGroup, split_even
from actors.rollout_engine import RolloutEngineActor
from uniar_ray.config import ModelConfig
from uniar_ray.rollout import GenerationRequest, Rollout, RolloutError


def test_split_even_keeps_order_and_sizes():
    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_even([1], 2) == [[1], []]


def test_rollout_actor_generate_and_update(ray_local):
    group = ActorGroup(RolloutEngineActor, 1, {"num_cpus": 1}, ModelConfig(path="tiny"))
    reqs = [GenerationRequest("a red cat", 64, 64, seed=1), GenerationRequest("x", 64, 65, request_id="bad")]
    first, bad = group.map("generate", reqs)
    assert isinstance(first, Rollout) and first.bits_packed.dtype == np.uint8
    assert first.bits_packed.nbytes == 4 * 4 * 4 * 64 // 8
    assert isinstance(bad, RolloutError) and bad.error.startswith("bad:")
    policy_state = ray.get(group.actors[0].stats.remote())
    assert policy_state["images"] == 1
    from uniar_ray.model import build_tiny_policy

    scaled = {k: v * 2 for k, v in build_tiny_policy(0).state_dict().items() if k.startswith("output_layer_vistok")}
    ray.get(group.broadcast("update_weights", scaled))
    again = group.map("generate", [GenerationRequest("a red cat", 64, 64, seed=1)])[0]
    assert not np.allclose(again.logprobs, first.logprobs)
