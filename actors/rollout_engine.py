"""Ray actor hosting a rollout engine (torch now; vLLM through the same ``RolloutEngine`` protocol).

    actor = RolloutEngineActor.options(num_cpus=1).remote(model_cfg, rollout_cfg)   # engine: build_engine
    results = ray.get(actor.generate.remote([GenerationRequest(...), ...], weights))  # Rollout | RolloutError
    ray.get(actor.update_weights.remote(weights.ref, weights.version))       # in place, no restart
    actor.join_weight_group / receive_weights                                 # weight_sync=collective (weight_sync.py)
Every engine knows the policy version it holds (0: ``model.path``; k: published after GRPO step k-1, i.e. k
optimizer steps when no step was skipped) and stamps it on each Rollout. ``generate`` takes the driver's current
``Weights``: an engine that Ray restarted (back at version 0) pulls them before it samples, so it never rolls out
a stale policy.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import ray
import torch

from uniar_ray import weight_broadcast
from uniar_ray.config import ModelConfig, RolloutConfig
from uniar_ray.rollout import GenerationRequest, Rollout, RolloutError, TorchRolloutEngine
from uniar_ray.rollout.factory import build_engine

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Weights:
    """A published policy version (the number of steps done when it was published), its trainable tensors in the
    object store of the process that put them (trainer rank 0). ``ref`` is nested in this object, so Ray hands it on as a
    reference (the driver never fetches the tensors); None: the weights of ``model.path`` (version 0)."""

    version: int
    ref: Any = None  # ObjectRef of dict[str, Tensor] (full, unpartitioned, CPU)


class StaleWeightsError(RuntimeError):
    """An engine holds another version than it was asked to sample with and has no reference to load it from (it
    restarted after a collective broadcast): the driver publishes the weights to the object store and retries."""


# A call that meets the actor dead or restarting is retried on the restarted actor (seeds travel with the
# requests, so a retried roll-out gives the same samples; a restarted engine loads the current weights first).
@ray.remote(max_restarts=2, max_task_retries=2)
class RolloutEngineActor:
    def __init__(self, model: ModelConfig, rollout: RolloutConfig | None = None):
        rollout = rollout or RolloutConfig()
        if rollout.num_threads:
            torch.set_num_threads(rollout.num_threads)
        self.engine = build_engine(model, rollout)
        self.version = 0  # the policy as loaded from model.path
        self.group: weight_broadcast.WeightGroup | None = None  # weight_sync=collective: member of this group
        self._metas: list[weight_broadcast.TensorMeta] = []
        self._tokens_per_s = _gauge("uniar_rollout_tokens_per_s", "AR image tokens generated per second (last call)")
        self._images = _counter("uniar_rollout_images", "images rolled out")

    def generate(self, requests: list[GenerationRequest],
                 weights: Weights | None = None) -> list[Rollout | RolloutError]:
        """Roll out ``requests`` with policy ``weights`` (loaded first if this engine holds another version)."""
        if weights is not None and weights.version != self.version:
            if weights.ref is None:
                raise StaleWeightsError(f"rollout engine holds weights version {self.version} and was asked for "
                                        f"version {weights.version} without a reference to them")
            logger.warning("rollout engine at weights version %d: loading version %d before sampling",
                           self.version, weights.version)
            self.update_weights(ray.get(weights.ref), weights.version)
        t0 = time.perf_counter()
        out = self.engine.generate(requests)
        done = [r for r in out if isinstance(r, Rollout)]
        for r in done:
            r.weight_version = self.version
        tokens = sum(r.bits_shape[0] for r in done)
        self._tokens_per_s.set(tokens / max(time.perf_counter() - t0, 1e-9))
        if done:
            self._images.inc(len(done))
        return out

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int = -1) -> int:
        """Load ``state_dict`` in place (passed as an ObjectRef, Ray fetches it here from its owner's node) and
        record its version (-1: weights set by hand, not a trainer version). Returns the version now held."""
        self.engine.update_weights(state_dict)
        self.version = version
        return version

    def weights_version(self) -> int:
        return self.version

    # weight_sync=collective ------------------------------------------------------------------------------------
    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, name: str,
                          metas: list[weight_broadcast.TensorMeta], backend: str, timeout_s: float) -> None:
        """Join trainer rank 0's weight group (blocks until every member has); leaves the previous one."""
        if self.group is not None:
            self.group.close()
            self.group = None
        self.group = weight_broadcast.WeightGroup.join(host, port, rank, world_size, backend, name, timeout_s)
        self._metas = list(metas)

    def weight_group_name(self) -> str | None:
        """The group this engine receives from; None after a restart (the driver then forms a new one)."""
        return None if self.group is None else self.group.name

    def receive_weights(self, version: int, bucket_numel: int = weight_broadcast.DEFAULT_BUCKET_NUMEL) -> int:
        """Receive one broadcast from trainer rank 0, bucket by bucket: the torch engine copies each bucket into its
        parameters as it lands; other engines (vLLM: whole modules at once) get the whole state in one update."""
        if self.group is None:
            raise RuntimeError("receive_weights: this engine is in no weight group (join_weight_group first)")
        partial = isinstance(self.engine, TorchRolloutEngine)
        device = self.engine.policy.device if partial else torch.device("cpu")
        state: dict[str, torch.Tensor] = {}
        for bucket in weight_broadcast.buckets(self._metas, bucket_numel):
            got = self.group.receive([self._metas[i] for i in bucket], device)
            if partial:
                self.engine.update_weights(got)
            else:
                state.update(got)
        if state:
            self.engine.update_weights(state)
        self.version = version
        return version

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def param_digest(self) -> str | None:
        """sha256 of the trainable parameters, as ``TrainerActor.param_digest`` computes it (torch engine only)."""
        from actors.trainer import trainable  # here: actors.trainer imports this module

        policy = getattr(self.engine, "policy", None)
        if policy is None:
            return None
        return weight_broadcast.digest((n, p) for n, p in policy.named_parameters() if trainable(n))

    def stats(self) -> dict[str, float]:
        return self.engine.stats()


def _gauge(name: str, description: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description)


def _counter(name: str, description: str):
    from ray.util.metrics import Counter

    return Counter(name, description=description)
