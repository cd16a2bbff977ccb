"""rollout.weight_sync=collective: the Ray-free broadcast (uniar_ray/weight_broadcast.py) over gloo, then trainer rank 0
to two rollout engines through ``WeightSync`` (actors/weight_sync.py): bits equal to an engine loaded from the
trainer's saved model, nothing in the object store, and a restarted engine catching up before it samples."""
from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from uniar_ray import weight_broadcast as wb


def test_buckets_keep_order_dtype_and_size():
    m = [wb.TensorMeta(f"t{i}", shape, dtype) for i, (shape, dtype) in
         enumerate([((3, 4), "float32"), ((5,), "float32"), ((20,), "float32"), ((2,), "bfloat16"), ((1,), "float32")])]
    assert wb.buckets(m, max_numel=17) == [[0, 1], [2], [3], [4]]  # 12 + 5 fit; 20 alone; a dtype change cuts
    assert [i for b in wb.buckets(m, 10**9) for i in b] == list(range(5))


def test_gloo_group_broadcasts_buckets_into_named_tensors():
    """Rank 0 and two receivers in threads of this process, each with its own group object over one store."""
    named = [("a", torch.randn(3, 4)), ("b", torch.arange(7.0)), ("c", torch.randn(2, 2).bfloat16()),
             ("d", torch.randn(4, 5).t())]  # a non-contiguous tensor travels too
    metas = wb.metas(named)
    plan = wb.buckets(metas, max_numel=16)
    store = wb.host_store(3, timeout_s=60)
    got: dict[int, dict] = {}

    def member(rank: int):
        g = wb.WeightGroup.join("127.0.0.1", store.port, rank, 3, "gloo", "t", 60, store=store if rank == 0 else None)
        got[rank] = {}
        for bucket in plan:
            if rank == 0:
                g.send([named[i][1] for i in bucket])
            else:
                got[rank].update(g.receive([metas[i] for i in bucket], "cpu"))
        g.close()

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(plan) >= 3 and got.keys() == {0, 1, 2}
    for rank in (1, 2):
        assert list(got[rank]) == [n for n, _ in named]
        for n, t in named:
            assert got[rank][n].dtype == t.dtype and torch.equal(got[rank][n], t)
    assert wb.digest(named) == wb.digest(got[1].items())


def _reqs():
    from uniar_ray.rollout import GenerationRequest

    return [GenerationRequest(p, 64, 64, seed=s) for p, s in (("a red cat", 5), ("a blue dog", 6))]


def _wait_restarted(engine, timeout_s: float = 300) -> None:
    """Until the restarted engine answers with version 0 (calls made while it restarts raise and are sent again)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(engine.weights_version.remote(), timeout=timeout_s) == 0:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
    raise TimeoutError(f"the killed engine did not come back within {timeout_s} s")


def _bits(results):
    return [r.bits() for r in results]


@pytest.mark.slow
def test_collective_sync_then_a_restarted_engine_catches_up(ray_local, tmp_path):
    from actors.rollout_engine import RolloutEngineActor, Weights
    from actors.trainer import TrainerGroup
    from actors.weight_sync import WeightSync
    from uniar_ray.config import GRPOConfig, ModelConfig, RolloutConfig, TrainerConfig

    rollout = RolloutConfig(weight_sync="collective", num_cpus=0.25, timeout_s=300)
    engines = [RolloutEngineActor.options(num_cpus=0.25).remote(ModelConfig(), rollout) for _ in range(2)]
    trainer = TrainerGroup(ModelConfig(), GRPOConfig(num_generations=2, learning_rate=0.05, beta=0.0),
                           TrainerConfig(num_cpus=0.5, micro_batch_size=2), total_steps=2)
    try:
        ws = WeightSync(trainer, engines, rollout, "cpu", bucket_numel=20_000)  # several buckets at the tiny size
        samples = ray.get(engines[0].generate.remote(_reqs()))
        for r, adv in zip(samples, (1.0, -1.0)):
            r.group, r.advantage = 0, adv
        trainer.train_step(samples)
        ws.sync(1)
        assert ws.weights == Weights(1) and ws.group is not None  # nothing put in the object store
        digests = ray.get([e.param_digest.remote() for e in engines])
        assert digests == [trainer.param_digests()[0]] * 2
        trainer.save_model(tmp_path / "ar_model")
        loaded = RolloutEngineActor.options(num_cpus=0.25).remote(ModelConfig(path=str(tmp_path)), rollout)
        want = _bits(ray.get(loaded.generate.remote(_reqs())))
        ray.kill(loaded)
        synced = ray.get([e.generate.remote(_reqs(), ws.weights) for e in engines])
        assert all(all(torch.equal(a, b) for a, b in zip(_bits(s), want)) for s in synced)
        assert not all(torch.equal(a, b) for a, b in zip(_bits(samples), want))  # the update moved the samples

        ray.kill(engines[1], no_restart=False)  # Ray restarts it at model.path (version 0), out of the group
        _wait_restarted(engines[1])  # ray.kill is asynchronous: a call sent now could still reach the old process
        ws.catch_up()  # what Parts does before every roll-out
        assert ws.weights.version == 1 and ws.weights.ref is not None  # published once, for the restarted one
        caught = ray.get(engines[1].generate.remote(_reqs(), ws.weights))
        assert ray.get(engines[1].weights_version.remote()) == 1
        assert all(torch.equal(a, b) for a, b in zip(_bits(caught), want))
        old_group = ws.group
        ws.sync(2)  # the next sync forms a new group with the restarted engine in it
        assert ws.group != old_group and ws.weights == Weights(2)
        assert ray.get([e.param_digest.remote() for e in engines]) == [trainer.param_digests()[0]] * 2
    finally:
        for e in engines:
            ray.kill(e)
        trainer.shutdown()
