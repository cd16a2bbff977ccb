"""A failed roll-out is a counted failure, like a failed decode or reward: an engine killed in the middle of
``generate`` (the test waits for it to say it started) leaves its groups excluded and counted against the failure
budget, and the run goes on with the other engine."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray

from faults_helpers import REPO

FAST = ["data.prompts_per_step=2", "grpo.num_generations=4", "trainer.micro_batch_size=4", "decoder.max_batch=8",
        "grpo.decode_num_inference_steps=2", "save_every=100", "grid_every=100", "validation.every=0"]


@pytest.mark.slow
def test_an_engine_killed_mid_generate_excludes_its_groups_and_the_run_goes_on(ray_local, tmp_path, monkeypatch):
    import actors.rollout_engine as rollout_engine
    from jobs import grpo as job

    started = tmp_path / "generating"

    class EngineThatHangsOnce(rollout_engine.RolloutEngineActor.__ray_actor_class__):
        """The first call of either engine says where it runs, then waits to be killed; every other call works."""

        def generate(self, requests, weights=None):
            try:
                fd = os.open(started, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return super().generate(requests, weights)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            threading.Event().wait()

    monkeypatch.setattr(rollout_engine, "RolloutEngineActor", ray.remote(max_restarts=0)(EngineThatHangsOnce))

    def kill_when_generating():
        end = time.monotonic() + 600
        while time.monotonic() < end and not (started.exists() and started.read_text()):
            time.sleep(0.2)
        os.kill(int(started.read_text()), signal.SIGKILL)  # the engine process dies in the middle of generate

    killer = threading.Thread(target=kill_when_generating, daemon=True)
    killer.start()
    run = job.main(["--config", str(REPO / "configs/grpo_demo.yaml"), f"run_dir={tmp_path / 'run'}", *FAST,
                    "rollout.num_actors=2", "steps=2"])
    killer.join(timeout=1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [0, 1]  # the run went on
    for m in rows:  # one engine's group excluded every step (dead past its restarts), the other one trained on
        assert (m["groups"], m["excluded_groups"], m["skipped_update"]) == (2, 1, 0)
        assert m["train/loss"] is not None


def _rollouts(reqs, failed: set[int]):
    import numpy as np
    import torch

    from uniar_ray.rollout import Rollout, RolloutError

    out = []
    for i, q in enumerate(reqs):
        if i in failed:
            out.append(RolloutError(q.request_id, q.prompt, f"{q.request_id}: engine gone"))
        else:
            out.append(Rollout.from_bits(torch.zeros(4, 4, 4, 64, dtype=torch.uint8), request_id=q.request_id,
                                         prompt=q.prompt, prompt_ids=np.arange(3, dtype=np.int32), ar_height=64,
                                         ar_width=64, logprobs=None, seed=q.seed, weight_version=0))
    return out


def test_a_failed_roll_out_excludes_its_group_and_counts_against_the_budget():
    """Without Ray: the batch keeps its shape (an excluded stand-in per failed request), the group is excluded and
    counted, and over the failure window the budget stops the run naming the roll-out failure."""
    from jobs.grpo import assign_advantages
    from jobs.grpo_parts import _Batch
    from uniar_ray import grpo
    from uniar_ray.config import GRPORunConfig, load_config
    from uniar_ray.data import PromptRecord
    from uniar_ray.rollout import GenerationRequest

    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_demo.yaml", ["grpo.num_generations=2"])
    records = [PromptRecord(prompt=f"p{i}", number=i) for i in range(3)]
    reqs = [GenerationRequest(records[i // 2].prompt, 64, 64, seed=i, request_id=f"s0-p{i // 2}-g{i % 2}")
            for i in range(6)]
    batch = _Batch.build(records, reqs, _rollouts(reqs, failed={3}), g=2)
    assert [r.request_id for r in batch.rollouts] == [q.request_id for q in reqs]  # same shape, same order
    assert batch.rollouts[3].excluded == "rollout failed: s0-p1-g1: engine gone" and not batch.rollouts[2].excluded
    for r in batch.rollouts:
        r.rewards = {n: 1.0 + r.seed for n in cfg.rewards.weights}
    m = {}
    assign_advantages(cfg, batch, m)
    assert (m["groups"], m["excluded_groups"], m["excluded_groups_all"]) == (3, 1, 1)
    assert batch.rollouts[2].excluded  # its group mate is out with it

    everything = _Batch.build(records, reqs, _rollouts(reqs, failed=set(range(6))), g=2)
    assert everything.rollouts == [] and everything.dropped == 3
    m = {}
    assign_advantages(cfg, everything, m)
    assert (m["groups"], m["excluded_groups_all"]) == (3, 3)
    budget = grpo.FailureBudget(0.5, 2)
    assert budget.record(1, 3, [batch.rollouts[3].excluded]) is None
    stop = budget.record(3, 3, everything.dropped_reasons)
    assert stop.startswith("4 of 6 prompt groups (67%) were excluded over the last 2 steps")
    assert "rollout failed" in stop
