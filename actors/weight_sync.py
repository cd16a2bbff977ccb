"""The driver's side of keeping the rollout engines on the trainer's weights (``rollout.weight_sync``;
docs/weight_sync.md): a sync after each update, and a catch-up for an engine that missed one.

    ws = WeightSync(trainer_group, engine_actors, rollout_cfg, model_cfg.device)
    ws.sync(step + 1)          # object_store: rank 0 puts, engines pull by reference; collective: rank 0 broadcasts
    ws.catch_up()              # before a roll-out: an engine behind (restarted) gets a reference to load from
    engine.generate.remote(requests, ws.weights)
With no engines (``rollout.placement: colocated``: the trainer ranks sample over their own parameters) a sync
only counts the version.
"""
from __future__ import annotations

import sys
import uuid

import ray

from actors.rollout_engine import Weights
from uniar_ray import weight_broadcast
from uniar_ray.config import RolloutConfig


class WeightSync:
    def __init__(self, trainer, engines: list, rollout: RolloutConfig, device: str,
                 bucket_numel: int = weight_broadcast.DEFAULT_BUCKET_NUMEL):
        self.trainer, self.engines, self.cfg, self.bucket_numel = trainer, list(engines), rollout, bucket_numel
        self.collective = rollout.weight_sync == "collective" and bool(self.engines)
        self.backend = "nccl" if device.startswith("cuda") else "gloo"
        self.weights = Weights(0)  # what the engines must sample with: model.path until the first sync
        self.group: str | None = None  # the weight group the engines joined (collective)
        self.members: list = []
        self._metas = None

    def sync(self, version: int) -> None:
        """The trainer's weights, now version ``version``, into every engine (the trainer must hold them: call it
        right after the update)."""
        if not self.engines:
            self.weights = Weights(version)
        elif self.collective:
            self._broadcast(version)
        else:
            self._object_store(version)

    def catch_up(self) -> None:
        """Before a roll-out (the trainer still holds ``self.weights``): if an engine holds another version (it
        restarted since the last broadcast), publish the weights to the object store once; the engine loads them
        from there in ``generate`` before it samples. Only the collective path needs this: an object-store sync
        leaves its reference in ``self.weights`` anyway."""
        if not self.collective or self.weights.ref is not None or self.weights.version == 0:
            return
        # an engine that does not answer (restarting right now) counts as behind: it will come back at version 0
        behind = [i for i, v in enumerate(self.ask("weights_version")) if v != self.weights.version]
        if behind:
            print(f"[grpo] rollout engine(s) {behind} missed weights version {self.weights.version} (restarted, or "
                  "restarting?): publishing it to the object store for them", file=sys.stderr, flush=True)
            self.publish()

    def publish(self) -> None:
        """The current version into rank 0's object store (for engines that cannot get it over the group)."""
        if self.weights.ref is None and self.weights.version > 0:
            self.weights = self.trainer.publish_weights(self.weights.version)

    # ---------------------------------------------------------------------------------------------------------------
    def _object_store(self, version: int) -> None:
        """Trainer rank 0 puts the new weights into its object store; the driver hands the reference on (the engines
        fetch the tensors from rank 0's node, never through this process). An engine that is down now loads them
        before its next roll-out (``generate`` gets ``self.weights``)."""
        self.weights = self.trainer.publish_weights(version)
        for i, e in enumerate(self.engines):
            try:
                ray.get(e.update_weights.remote(self.weights.ref, version), timeout=self.cfg.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                print(f"[grpo] rollout engine {i} did not take weights version {version} "
                      f"({type(err).__name__}); it loads them before its next roll-out", file=sys.stderr, flush=True)

    def _broadcast(self, version: int) -> None:
        """Rank 0 broadcasts to every engine in the group, formed anew when an engine restarted since. A broadcast
        that fails (an engine died during it) leaves the engines that missed it to ``catch_up``."""
        self.weights = Weights(version)
        try:
            members = self._form_group()
            refs = self.trainer.submit_broadcast(self.bucket_numel)
            refs += [e.receive_weights.remote(version, self.bucket_numel) for e in members]
            ray.get(refs, timeout=self.cfg.timeout_s)
        except (ray.exceptions.RayError, RuntimeError) as err:
            self.group = None  # a member is gone or the group broke: the next sync forms a new one
            print(f"[grpo] weight broadcast of version {version} failed ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200]}); engines that missed it load it from the object store",
                  file=sys.stderr, flush=True)
            self.catch_up()

    def _form_group(self) -> list:
        """The live engines, in one weight group with trainer rank 0; a new group when membership changed."""
        names = self.ask("weight_group_name", missing="dead")
        live = [e for e, n in zip(self.engines, names) if n != "dead"]
        if self.group is not None and live == self.members and all(n == self.group for n in names if n != "dead"):
            return live
        rank0 = self.trainer.actors[0]
        if self._metas is None:
            self._metas = ray.get(rank0.weight_meta.remote(), timeout=self.cfg.timeout_s)
        name, world, t = uuid.uuid4().hex[:12], 1 + len(live), self.cfg.timeout_s
        host, port = ray.get(rank0.open_weight_group.remote(world, t), timeout=t)
        refs = [rank0.join_weight_group.remote(name, world, self.backend, t)]
        refs += [e.join_weight_group.remote(host, port, k + 1, world, name, self._metas, self.backend, t)
                 for k, e in enumerate(live)]
        ray.get(refs, timeout=t)
        self.group, self.members = name, live
        return live

    def ask(self, method: str, missing=None) -> list:
        """``method()`` of every engine (waits for a restarting one); ``missing`` for an engine that is gone."""
        out = []
        for ref in [getattr(e, method).remote() for e in self.engines]:
            try:
                out.append(ray.get(ref, timeout=self.cfg.timeout_s))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                out.append(missing)
        return out
