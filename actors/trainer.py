"""Data-parallel GRPO trainer actors on DeepSpeed ZeRO (gloo + torch AdamW on CPU, NCCL on GPU).

    group = TrainerGroup(model_cfg, grpo_cfg, trainer_cfg, total_steps)   # world_size actors, one placement group
    metrics = group.train_step(samples)            # Rollout list, split evenly across ranks
    weights = group.publish_weights(step + 1)      # Weights(version, ref): rank 0's object, the driver holds a ref
    results = group.generate(requests, version)    # rollout.placement=colocated: each rank samples its share
    group.submit_broadcast(bucket_numel)           # rollout.weight_sync=collective (actors/weight_sync.py drives it)
Each actor holds the policy (vision tower and lm_head frozen, as in the reference) and, when beta != 0, a frozen
reference policy (``grpo.ref_model_path``, default the policy's own path) colocated with it for the k3 KL term.
A train step is one generation batch: ``grpo.num_iterations`` optimizer steps over the same samples, the loss
normalised over the whole batch (all micro-batches, all ranks; ``grpo.BatchCounts``).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.group import split_even
from actors.rollout_engine import Weights
from uniar_ray import grpo, train_step, weight_broadcast
from uniar_ray.config import GRPOConfig, ModelConfig, RolloutConfig, TrainerConfig
from uniar_ray.model.factory import load_policy
from uniar_ray.rollout.colocated import ColocatedEngine
from uniar_ray.rollout.types import GenerationRequest, Rollout, RolloutError
from uniar_ray.train_step import batch_counts

FROZEN_PREFIXES = ("model.visual.", "lm_head.")  # the reference trains everything but the vision tower
GATHER_BUCKET_NUMEL = 50_000_000  # ZeRO-3 weight publish: elements gathered at once (200 MB in fp32)


def trainable(name: str) -> bool:
    return not name.startswith(FROZEN_PREFIXES)


@ray.remote(max_restarts=0)
class TrainerActor:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model: ModelConfig,
                 grpo_cfg: GRPOConfig, trainer: TrainerConfig, total_steps: int, rollout: RolloutConfig | None = None):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        if trainer.num_threads:
            torch.set_num_threads(trainer.num_threads)
        import deepspeed

        on_gpu = model.device.startswith("cuda")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.model_cfg, self.grpo, self.trainer, self.total_steps, self.rank = model, grpo_cfg, trainer, total_steps, rank
        self.rollout_cfg, self._sampler = rollout or RolloutConfig(), None  # colocated roll-out (``generate``)
        torch.manual_seed(grpo_cfg.seed + rank)
        policy = load_policy(model.path, model.dtype, model.device, model.tiny_seed,
                             attn_impl=model.attn_impl).train()
        policy.set_gradient_checkpointing(trainer.gradient_checkpointing)
        for name, p in policy.named_parameters():
            p.requires_grad_(trainable(name))
        self.ref = None
        if grpo_cfg.beta != 0.0:  # frozen, colocated; by default a copy of the starting policy
            self.ref = load_policy(grpo_cfg.ref_model_path or model.path, model.dtype, model.device,
                                   model.tiny_seed, attn_impl=model.attn_impl).eval()
            self.ref.requires_grad_(False)
        self.tokenizer = policy.tokenizer
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=policy, model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=self._ds_config(on_gpu), lr_scheduler=self._scheduler)

    def _ds_config(self, on_gpu: bool) -> dict:
        g, t = self.grpo, self.trainer
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": 1,  # accumulation over micro-batches is done here, see train_step
            "gradient_clipping": g.max_grad_norm,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": self.model_cfg.dtype == "bfloat16" and on_gpu},
            "optimizer": {"type": "AdamW", "params": {
                "lr": g.learning_rate, "betas": [g.adam_beta1, g.adam_beta2], "eps": g.adam_epsilon,
                "weight_decay": g.weight_decay, "torch_adam": not on_gpu}},
            "steps_per_print": 10**9,
        }

    def _scheduler(self, optimizer):
        g = self.grpo
        total = max(1, self.total_steps * g.num_iterations)  # optimizer steps: num_iterations per GRPO step
        warm = g.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, 1.0 - (step - warm) / max(1, total - warm)) if g.lr_scheduler_type == "linear" else 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # ------------------------------------------------------------------------------------------------------------

    def train_step(self, samples: list[Rollout], counts: grpo.BatchCounts | None = None) -> dict[str, float]:
        """``grpo.num_iterations`` optimizer steps over this rank's samples of one generation batch, in
        micro-batches; gradients are averaged across ranks. counts: the whole batch's (all ranks; the group passes
        them), None = this rank's samples are the whole batch.

        Reference and, with num_iterations > 1, old log-probs are computed once, before the first update (TRL):
        the later passes see the updated policy against them, so their ratio moves and the clipping acts. With
        num_iterations == 1 old = the current log-probs, detached (ratio exactly 1). Metrics are merged over the
        passes; ``loss`` is the whole batch's loss."""
        t0 = time.perf_counter()
        mb = self.trainer.micro_batch_size
        micro = [self._prepare(samples[i: i + mb]) for i in range(0, len(samples), mb)]
        counts = counts or batch_counts(samples, num_processes=1)
        mu = self.grpo.num_iterations
        passes = []
        for _ in range(mu):
            metrics = self._backward_pass(micro, counts)
            self.engine.step()
            grad_norm = self.engine.get_global_grad_norm()
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            passes.append(metrics)
        sums = train_step.merge_metrics(passes)
        sums.update(lr=self.scheduler.get_last_lr()[0], train_time_s=time.perf_counter() - t0)
        return sums

    def gradients(self, samples: list[Rollout], counts: grpo.BatchCounts | None = None) -> dict[str, torch.Tensor]:
        """The full gradient (gathered from the ZeRO partitions, reduced across ranks) that ``train_step``'s first
        pass would apply, without stepping; every rank must be called. For checking layouts and options (micro-
        batches, ranks, gradient checkpointing) against each other."""
        from deepspeed.utils import safe_get_full_grad

        mb = self.trainer.micro_batch_size
        self._backward_pass([self._prepare(samples[i: i + mb]) for i in range(0, len(samples), mb)],
                            counts or batch_counts(samples, num_processes=1))
        out = {n: safe_get_full_grad(p).detach().cpu().clone() for n, p in self.engine.module.named_parameters()
               if p.requires_grad}
        self.engine.optimizer.zero_grad()
        return out

    def _backward_pass(self, micro: list[train_step.MicroBatch], counts: grpo.BatchCounts) -> dict[str, float]:
        """Forward and backward over every micro-batch of the generation batch (gradients accumulate, reduced
        across ranks at the last one); metrics merged over micro-batches (``train_step.merge_metrics``: maxima
        the max, means the mean), ``loss`` summed."""
        rows = []
        for i, batch in enumerate(micro):
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            loss, metrics = self._micro_loss(batch, counts)
            self.engine.backward(loss)
            metrics["loss"] *= len(micro)  # the rank's loss is the sum over its micro-batches
            rows.append(metrics)
        return train_step.merge_metrics(rows)

    def _prepare(self, chunk: list[Rollout]) -> train_step.MicroBatch:
        ref = None if self.ref is None else self.ref.bit_logits
        return train_step.prepare(chunk, self.engine, ref, self.tokenizer.pad_token_id, self.grpo,
                                  self.engine.module.device)

    def _micro_loss(self, x: train_step.MicroBatch, counts: grpo.BatchCounts) -> tuple[torch.Tensor, dict[str, float]]:
        # through the DeepSpeed engine's forward (UniARPolicy.forward = bit_logits): ZeRO-3 gathers its shards there
        return train_step.micro_loss(self.engine, x, counts, self.grpo)

    # ------------------------------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest], version: int) -> list[Rollout | RolloutError]:
        """Colocated roll-out: ``requests`` sampled with the torch engine over this rank's live parameters (ZeRO-2:
        every rank holds them whole), each Rollout stamped with ``version`` (the driver's count of the weights this
        rank holds: calls run in submission order, so a roll-out submitted before a train step samples before it)."""
        if self.trainer.zero_stage == 3:  # refused at config load too (GRPORunConfig); this is for direct callers
            raise RuntimeError("colocated roll-out needs whole parameters on every rank: trainer.zero_stage <= 2")
        if self._sampler is None:
            r = self.rollout_cfg
            self._sampler = ColocatedEngine(self.engine.module, max_batch=r.max_batch, cuda_graph=r.cuda_graph,
                                            compile=r.compile)
        out = self._sampler.generate(requests)
        for res in out:
            if isinstance(res, Rollout):
                res.weight_version = version
        return out

    def publish_weights(self, version: int) -> Weights | None:
        """Put the full trainable parameters (the only ones that change) into the object store from rank 0 and
        return a reference to them: the engines fetch them from here, never through the driver. Under ZeRO-3 each
        rank holds a shard, so every rank must take part in the gather; only rank 0 returns something."""
        state = self._full_state(keep=self.rank == 0)
        return Weights(version, ray.put(state)) if self.rank == 0 else None

    # weight_sync=collective (actors/weight_sync.py drives these) -------------------------------------------------
    def weight_meta(self) -> list[weight_broadcast.TensorMeta]:
        """Names, full shapes and dtypes of the trainable parameters, in broadcast order."""
        return weight_broadcast.metas(self._trainable_named())

    def open_weight_group(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Rank 0: host a new weight group's store on this node; returns its address for the engines."""
        self._weight_store = weight_broadcast.host_store(world_size, timeout_s)
        return ray.util.get_node_ip_address(), self._weight_store.port

    def join_weight_group(self, name: str, world_size: int, backend: str, timeout_s: float) -> None:
        """Rank 0: join the group as its sender (blocks until every engine has joined); leaves the previous one."""
        old = getattr(self, "_weight_group", None)
        if old is not None:
            old.close()
        self._weight_group = weight_broadcast.WeightGroup.join("", 0, 0, world_size, backend, name, timeout_s,
                                                               store=self._weight_store)

    def broadcast_weights(self, bucket_numel: int = weight_broadcast.DEFAULT_BUCKET_NUMEL) -> None:
        """Rank 0 broadcasts the trainable parameters bucket by bucket, straight from its tensors (on GPU: GPU to
        GPU, no host copy). Under ZeRO-3 every rank must be called: each bucket is gathered first, as in
        ``_full_state``, so a rank never holds more than one bucket beyond its shard."""
        named = self._trainable_named()
        for bucket in weight_broadcast.buckets(weight_broadcast.metas(named), bucket_numel):
            params = [named[i][1] for i in bucket]
            with self._gathered(params):
                if self.rank == 0:
                    self._weight_group.send(params)

    def _trainable_named(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _gathered(self, params: list[torch.Tensor]):
        if self.trainer.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable parameters on CPU, on every rank (under ZeRO-3 every rank must be called)."""
        return self._full_state(keep=True)

    def _full_state(self, keep: bool, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """ZeRO-3 gathers the partitioned parameters bucket by bucket (at most ``GATHER_BUCKET_NUMEL`` extra
        elements materialised per rank at a time); ``keep=False`` takes part in the gather and copies nothing."""
        named = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad or not trainable_only]
        if self.trainer.zero_stage != 3:
            return {n: p.detach().cpu().clone() for n, p in named} if keep else {}
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for bucket in _buckets(named, GATHER_BUCKET_NUMEL):
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                if keep:
                    out.update({n: p.detach().cpu().clone() for n, p in bucket})
        return out

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the policy (state_dict names) on CPU, full size; a collective under ZeRO-3 (every rank
        must call it). Buffers are never partitioned."""
        params = self._full_state(keep=True, trainable_only=False)
        return {k: params[k] if k in params else v.detach().cpu().clone()
                for k, v in self.engine.module.state_dict().items()}

    def save_model(self, folder: str) -> None:
        """The policy in the published ``ar_model`` layout (config.json, safetensors, tokenizer), written by rank 0
        into a temporary folder and renamed, so a half-written model folder never looks complete."""
        state = self.full_state()
        if self.rank == 0:
            import shutil

            final, tmp = Path(folder), Path(f"{folder}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.engine.module.save_pretrained(tmp, state_dict=state)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)

    def save_checkpoint(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag="state")

    def load_checkpoint(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}")

    def param_digest(self) -> str:
        """sha256 of this rank's trainable parameters: data-parallel ranks must agree bit for bit."""
        return weight_broadcast.digest((n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad)

    def check_run_folder(self, folder: str, token: str) -> tuple[str, str]:
        """(this node's address, "" or why ``folder`` is not the driver's run folder here): the driver's marker
        check (uniar_ray/shared_folder.py), run where this rank writes its checkpoints."""
        from uniar_ray.shared_folder import check_marker

        return ray.util.get_node_ip_address(), check_marker(folder, token)


class TrainerGroup:
    """``world_size`` trainer actors in one placement group; the driver's view of data-parallel training."""

    def __init__(self, model: ModelConfig, grpo_cfg: GRPOConfig, trainer: TrainerConfig, total_steps: int,
                 rollout: RolloutConfig | None = None):
        t = trainer
        self.timeout_s, self.zero_stage = t.timeout_s, t.zero_stage
        bundle = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})}
        self.pg = placement_group([bundle] * t.world_size, strategy=t.placement_strategy)
        try:  # resources that never free up (or never exist) must not look like a hang
            ray.get(self.pg.ready(), timeout=t.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"the {t.world_size} trainer ranks ({bundle} each, {t.placement_strategy}) could not be placed within "
                f"trainer.placement_timeout_s={t.placement_timeout_s:g} s; free: {ray.available_resources()}. Lower "
                "trainer.num_cpus/num_gpus or trainer.world_size, or add nodes") from None
        # rank 0's bundle names the rendezvous: its node's address and a port free there (the driver's node may run
        # no trainer at all, e.g. a head with CPU: 0); the same for gloo and NCCL
        addr, port = ray.get(_rendezvous_address.options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        ).remote(), timeout=self.timeout_s)
        self.actors = [
            TrainerActor.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r))
            .remote(r, t.world_size, addr, port, model, grpo_cfg, trainer, total_steps, rollout)
            for r in range(t.world_size)
        ]

    def submit_generate(self, requests: list[GenerationRequest], version: int) -> list[ray.ObjectRef]:
        """Colocated roll-out: ``requests`` split evenly over the ranks in order (``split_even``), one reference per
        non-empty share; concatenated, their results are in request order."""
        shards = split_even(requests, len(self.actors))
        return [a.generate.remote(s, version) for a, s in zip(self.actors, shards) if s]

    def generate(self, requests: list[GenerationRequest], version: int) -> list[Rollout | RolloutError]:
        """``submit_generate`` and wait: one result per request, in order."""
        return [x for part in ray.get(self.submit_generate(requests, version), timeout=self.timeout_s) for x in part]

    def train_step(self, samples: list[Rollout]) -> dict[str, float]:
        n = len(self.actors)
        if len(samples) % n:
            raise ValueError(f"{len(samples)} samples do not split evenly across {n} trainer ranks")
        k = len(samples) // n
        counts = batch_counts(samples, num_processes=n)
        per_rank = ray.get([a.train_step.remote(samples[r * k:(r + 1) * k], counts)
                            for r, a in enumerate(self.actors)], timeout=self.timeout_s)
        return train_step.merge_metrics(per_rank)

    def publish_weights(self, version: int) -> Weights:
        """Rank 0's ``Weights`` (a reference; the tensors stay in the object store of rank 0's node)."""
        return ray.get([a.publish_weights.remote(version) for a in self.actors], timeout=self.timeout_s)[0]

    def submit_broadcast(self, bucket_numel: int) -> list[ray.ObjectRef]:
        """weight_sync=collective: rank 0 sends (ZeRO-3: every rank takes part in the gathers)."""
        senders = self.actors if self.zero_stage == 3 else self.actors[:1]
        return [a.broadcast_weights.remote(bucket_numel) for a in senders]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The full trainable state in this process (tests and tools; the job passes references instead)."""
        return ray.get([a.trainable_state.remote() for a in self.actors], timeout=self.timeout_s)[0]

    def node_ips(self) -> list[str]:
        """The node address of each rank (from the placement group), for the run's placement.json."""
        node_of_bundle = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        ip_of_node = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return [ip_of_node[node_of_bundle[r]] for r in range(len(self.actors))]

    def param_digests(self) -> list[str]:
        return ray.get([a.param_digest.remote() for a in self.actors])

    def save_checkpoint(self, folder: Path) -> None:
        ray.get([a.save_checkpoint.remote(str(folder)) for a in self.actors], timeout=self.timeout_s)

    def load_checkpoint(self, folder: Path) -> None:
        ray.get([a.load_checkpoint.remote(str(folder)) for a in self.actors], timeout=self.timeout_s)

    def save_model(self, folder: Path) -> None:
        """Rank 0 writes the full policy as ``folder`` (every rank takes part in the ZeRO-3 gather)."""
        ray.get([a.save_model.remote(str(folder)) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)


def _buckets(named: list[tuple[str, torch.Tensor]], max_numel: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive parameters in buckets of at most ``max_numel`` elements (a bigger parameter is a bucket alone).
    ZeRO-3 partitioned parameters report their full size in ``ds_numel``."""
    out, size = [[]], 0
    for n, p in named:
        k = getattr(p, "ds_numel", p.numel())
        if out[-1] and size + k > max_numel:
            out.append([])
            size = 0
        out[-1].append((n, p))
        size += k
    return [b for b in out if b]


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """This node's address and a port free on it (bound on every interface, as torch's TCPStore will)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]
