"""Data-parallel GRPO trainer actors on DeepSpeed ZeRO (gloo + torch AdamW on CPU, NCCL on GPU).

    group = TrainerGroup(model_cfg, grpo_cfg, trainer_cfg, total_steps)   # world_size actors, one placement group
    metrics = group.train_step(samples)            # Rollout list, split evenly across ranks
    state = group.trainable_state()                # for weight sync to the rollout engines (in place)
Each actor holds the policy (vision tower and lm_head frozen, as in the reference) and, when beta != 0, a frozen
reference policy colocated with it for the k3 KL term.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from uniar_ray import grpo
from uniar_ray.config import GRPOConfig, ModelConfig, TrainerConfig
from uniar_ray.model.factory import load_policy
from uniar_ray.model.prompts import pad_left
from uniar_ray.rollout.types import Rollout

FROZEN_PREFIXES = ("model.visual.", "lm_head.")  # the reference trains everything but the vision tower


def trainable(name: str) -> bool:
    return not name.startswith(FROZEN_PREFIXES)


@ray.remote(max_restarts=0)
class TrainerActor:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model: ModelConfig,
                 grpo_cfg: GRPOConfig, trainer: TrainerConfig, total_steps: int):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        if trainer.num_threads:
            torch.set_num_threads(trainer.num_threads)
        import deepspeed

        on_gpu = model.device.startswith("cuda")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.model_cfg, self.grpo, self.trainer, self.total_steps, self.rank = model, grpo_cfg, trainer, total_steps, rank
        torch.manual_seed(grpo_cfg.seed + rank)
        policy = load_policy(model.path, model.dtype, model.device, model.tiny_seed).train()
        for name, p in policy.named_parameters():
            p.requires_grad_(trainable(name))
        self.ref = None
        if grpo_cfg.beta != 0.0:  # a frozen copy of the starting policy, colocated
            self.ref = load_policy(model.path, model.dtype, model.device, model.tiny_seed).eval()
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
        total = max(1, self.total_steps)
        warm = g.warmup_steps

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, 1.0 - (step - warm) / max(1, total - warm)) if g.lr_scheduler_type == "linear" else 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # ------------------------------------------------------------------------------------------------------------

    def train_step(self, samples: list[Rollout]) -> dict[str, float]:
        """One optimizer step over this rank's samples, in micro-batches; gradients are averaged across ranks."""
        t0 = time.perf_counter()
        mb = self.trainer.micro_batch_size
        chunks = [samples[i: i + mb] for i in range(0, len(samples), mb)]
        sums: dict[str, float] = {}
        for i, chunk in enumerate(chunks):
            self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            loss, metrics = self._micro_loss(chunk, grad_accum=len(chunks))
            self.engine.backward(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / len(chunks)
        sums["loss"] = sums.get("loss", 0.0) * len(chunks)  # per-chunk losses are already divided by grad_accum
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        sums.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    lr=self.scheduler.get_last_lr()[0], train_time_s=time.perf_counter() - t0)
        return sums

    def _micro_loss(self, chunk: list[Rollout], grad_accum: int) -> tuple[torch.Tensor, dict[str, float]]:
        g, dev = self.grpo, self.engine.module.device
        tp = pad_left([s.prompt_ids.tolist() for s in chunk], self.tokenizer.pad_token_id, dev)
        h, w = chunk[0].ar_height, chunk[0].ar_width
        bits = torch.stack([s.bits() for s in chunk]).to(dev)
        logits = self.engine.module.bit_logits(tp.input_ids, tp.attention_mask, bits, h, w)
        logp = grpo.bit_logprobs(logits, bits, g)
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp = grpo.bit_logprobs(self.ref.bit_logits(tp.input_ids, tp.attention_mask, bits, h, w), bits, g)
        rollout_logp = torch.stack([torch.from_numpy(s.logprobs) for s in chunk]).to(dev)
        adv = torch.tensor([s.advantage for s in chunk], device=dev, dtype=torch.float32)
        keep = torch.tensor([not s.excluded for s in chunk], device=dev)
        loss, metrics = grpo.policy_loss(logp, adv, g, ref_logp=ref_logp, rollout_logp=rollout_logp,
                                         sample_mask=keep, grad_accum=grad_accum)
        with torch.no_grad():
            metrics["entropy"] = grpo.entropy_mean(grpo.bit_entropy(logits, g), keep)
        return loss, metrics

    # ------------------------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters on CPU (the only ones that change), for in-place weight sync."""
        return {n: p.detach().cpu().clone() for n, p in self.engine.module.named_parameters() if p.requires_grad}

    def save_checkpoint(self, folder: str) -> None:
        self.engine.save_checkpoint(folder, tag="state")

    def load_checkpoint(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}")

    def param_digest(self) -> str:
        """sha256 of this rank's trainable parameters: data-parallel ranks must agree bit for bit."""
        h = hashlib.sha256()
        for n, p in self.engine.module.named_parameters():
            if p.requires_grad:
                h.update(n.encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


class TrainerGroup:
    """``world_size`` trainer actors in one placement group; the driver's view of data-parallel training."""

    def __init__(self, model: ModelConfig, grpo_cfg: GRPOConfig, trainer: TrainerConfig, total_steps: int):
        t = trainer
        bundle = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})}
        self.pg = placement_group([bundle] * t.world_size, strategy=t.placement_strategy)
        ray.get(self.pg.ready())
        # rank 0's bundle names the rendezvous: its node's address and a port free there (the driver's node may run
        # no trainer at all, e.g. a head with CPU: 0); the same for gloo and NCCL
        addr, port = ray.get(_rendezvous_address.options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        ).remote())
        self.actors = [
            TrainerActor.options(num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r))
            .remote(r, t.world_size, addr, port, model, grpo_cfg, trainer, total_steps)
            for r in range(t.world_size)
        ]

    def train_step(self, samples: list[Rollout]) -> dict[str, float]:
        n = len(self.actors)
        if len(samples) % n:
            raise ValueError(f"{len(samples)} samples do not split evenly across {n} trainer ranks")
        k = len(samples) // n
        per_rank = ray.get([a.train_step.remote(samples[r * k:(r + 1) * k]) for r, a in enumerate(self.actors)])
        return {key: sum(m[key] for m in per_rank) / n for key in per_rank[0]}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return ray.get(self.actors[0].trainable_state.remote())

    def node_ips(self) -> list[str]:
        """The node address of each rank (from the placement group), for the run's placement.json."""
        node_of_bundle = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        ip_of_node = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return [ip_of_node[node_of_bundle[r]] for r in range(len(self.actors))]

    def param_digests(self) -> list[str]:
        return ray.get([a.param_digest.remote() for a in self.actors])

    def save_checkpoint(self, folder: Path) -> None:
        ray.get([a.save_checkpoint.remote(str(folder)) for a in self.actors])

    def load_checkpoint(self, folder: Path) -> None:
        ray.get([a.load_checkpoint.remote(str(folder)) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.pg)


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """This node's address and a port free on it (bound on every interface, as torch's TCPStore will)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]
