"""Config of the rollout engines (uniar_ray/rollout/, actors/rollout_engine.py): backend, actors and their
resources, GPU step options.
"""
from __future__ import annotations

import dataclasses

from uniar_ray.config.base import ConfigError, check_choice


@dataclasses.dataclass
class RolloutConfig:
    """How many rollout actors, on what resources, with which engine (torch: KV-cached reference path; vllm)."""

    backend: str = "torch"  # torch | vllm
    # GRPO only. separate: rollout engine actors of their own (num_actors, num_cpus, num_gpus, num_threads), weights
    # synced to them after every step. colocated (the reference's topology): each trainer rank rolls out its share
    # of the step with the torch engine over its own live parameters, in the rank's own resources and threads
    # (uniar_ray/rollout/colocated.py); no engine actors, nothing synced. max_batch, cuda_graph, compile apply to both.
    placement: str = "separate"
    # separate placement: how new weights reach the engines. object_store: trainer rank 0 puts them in its node's
    # object store, the engines pull them. collective: a torch.distributed broadcast from rank 0 (gloo on CPU, NCCL
    # on GPU; uniar_ray/weight_broadcast.py); the object store then only serves an engine that missed a broadcast.
    weight_sync: str = "object_store"
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch: int = 16  # rows (x2 with CFG) per engine call
    num_threads: int = 0  # torch threads inside the actor (0: torch's default)
    vllm_kvcache_gib: float = 1.0  # vllm: paged KV cache for both stacks (kv_cache_memory_bytes), GiB
    timeout_s: float = 1800.0  # per driver wait on a step's roll-out (and on a weight load); past it the job stops
    # torch engine on CUDA (perf/RESULTS.md, "Rollout on a GPU"): record each decode step in a CUDA graph, and fuse
    # each layer's elementwise work with torch.compile (a minute of compilation per process). Both off on CPU.
    cuda_graph: bool = False
    compile: bool = False

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, ("torch", "vllm"))
        check_choice("rollout.placement", self.placement, ("separate", "colocated"))
        check_choice("rollout.weight_sync", self.weight_sync, ("object_store", "collective"))
        if (self.cuda_graph or self.compile) and self.backend != "torch":
            raise ConfigError("rollout.cuda_graph and rollout.compile apply to rollout.backend=torch")
        if self.placement == "colocated":
            if self.backend != "torch":
                raise ConfigError("rollout.placement=colocated generates with the torch engine inside each trainer "
                                  "rank; rollout.backend=vllm runs in engine actors of its own: use "
                                  "rollout.backend=torch, or rollout.placement=separate for vllm")
            if self.weight_sync != "object_store":
                raise ConfigError(f"rollout.weight_sync={self.weight_sync} with rollout.placement=colocated: colocated "
                                  "rollout reads the trainer's own parameters and syncs nothing; use "
                                  "rollout.placement=separate for a collective weight sync")
            if self.num_actors != 1 or self.num_gpus:
                raise ConfigError("rollout.num_actors and rollout.num_gpus place engine actors of their own "
                                  "(rollout.placement=separate); colocated rollout runs on the trainer ranks' GPUs: "
                                  "leave them at 1 and 0")
        if not self.timeout_s > 0:
            raise ConfigError(f"rollout.timeout_s={self.timeout_s}: must be > 0")
        if self.num_actors < 1 or self.max_batch < 1:
            raise ConfigError("rollout.num_actors and rollout.max_batch must be >= 1")

