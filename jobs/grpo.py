"""GRPO training of a UniAR policy on Ray: roll out, decode, score, advantages, update, sync weights.

    python -m jobs.grpo --config configs/grpo_demo.yaml [grpo.beta=0.0 steps=20 ...] [--resume]
    ray job submit --working-dir . -- python -m jobs.grpo --config configs/grpo_demo.yaml
The default config is the embedded demo: local Ray, tiny policy and decoder, a programmatic reward plus OCR, CPU.
Prints the run directory at the end (metrics.jsonl, reward_curve.png, grids/, checkpoints/).
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager

import ray

from jobs import start_ray
from uniar_ray import grpo
from uniar_ray.config import GRPORunConfig, parse_cli, to_dict
from uniar_ray.rollout import GenerationRequest, Rollout
from uniar_ray.runlog import RunDir, restore_rng


def main(argv: list[str] | None = None):
    cfg, args = parse_cli(GRPORunConfig, argv, default_config="configs/grpo_demo.yaml")
    run = RunDir(cfg.run_dir, resume=args.resume)
    (run.path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    start_ray(cfg)
    parts = Parts(cfg)  # rollout engines, decoder pool, reward pools, trainers, data sampler
    try:
        record_placement(run, parts)
        step = resume(run, parts) if args.resume else 0
        pending = parts.prefetch(step) if cfg.async_mode == "one_step" else None
        for step in range(step, cfg.steps):
            metrics, pending = grpo_step(cfg, parts, step, pending)
            run.log_metrics(metrics)
            parts.export(metrics)
            print(format_line(metrics), flush=True)
            if (step + 1) % cfg.grid_every == 0 or step + 1 == cfg.steps:
                parts.save_grid(run, step)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(run, parts, step + 1)
        record_placement(run, parts, digests=True)
    except FloatingPointError as e:  # a NaN loss: stop with a message, keep the last good checkpoint
        raise SystemExit(f"[grpo] {e}") from None
    except ray.exceptions.RayError as e:  # when a node went away, say so in one line instead of a remote traceback
        lost = parts.lost_nodes()
        if not lost:
            raise
        raise SystemExit(f"[grpo] lost Ray node(s) {', '.join(lost)} ({type(e).__name__}); stopping. Last good "
                         f"checkpoint: {run.latest_checkpoint() or 'none'}; bring the node(s) back and rerun with "
                         f"--resume") from None
    finally:
        run.plot_rewards()
        parts.close()
    summarize(run)
    print(run.path)
    return run.path


def summarize(run: RunDir) -> None:
    """One line a person can read at the end: how the reward moved (first 3 vs last 3 steps)."""
    rows = [m for m in run.read_metrics() if m.get("reward_mean") is not None]
    if len(rows) >= 2:
        k = min(3, len(rows) // 2)
        first = sum(m["reward_mean"] for m in rows[:k]) / k
        last = sum(m["reward_mean"] for m in rows[-k:]) / k
        print(f"[grpo] mean reward: first {k} steps {first:.4f}, last {k} steps {last:.4f} ({last - first:+.4f}); "
              f"curve: {run.path / 'reward_curve.png'}", flush=True)


def grpo_step(cfg: GRPORunConfig, parts: "Parts", step: int, pending):
    """One GRPO step; each numbered stage is timed (``time/<stage>``).

    With ``async_mode: one_step`` stages 1-4 of step k+1 run in the background (roll-out submitted before step k's
    update, so it samples from the same weights as a synchronous run would one step earlier) while step k updates:
    its samples are one step stale, which the trainer's importance-sampling correction accounts for."""
    m: dict[str, float] = {"step": step}
    t_step = time.perf_counter()
    if pending is not None:  # 1-4 done in the background; the wait is what the overlap did not hide
        with timed(m, "wait_prefetch"):
            batch, images, staged = pending.result()
        m.update(staged)
    else:
        batch, images, staged = parts.collect(step)  # 1-4: prompts, roll-out, decode, score
        m.update(staged)
    if cfg.async_mode == "one_step" and step + 1 < cfg.steps:
        pending = parts.prefetch(step + 1)
    else:
        pending = None
    with timed(m, "advantages"):  # 5. group-normalised advantages
        assign_advantages(cfg, batch, m)
    with timed(m, "update"):  # 6. DeepSpeed step on the trainer ranks
        m.update({f"train/{k}": v for k, v in parts.trainer.train_step(batch.rollouts).items()})
    if not math.isfinite(m["train/loss"]):
        raise FloatingPointError(f"step {step}: the loss is {m['train/loss']}; stopping (the last good checkpoint "
                                 f"is kept under {cfg.run_dir}/checkpoints)")
    with timed(m, "sync"):  # 7. new weights into the rollout engines, in place
        parts.sync_weights()
    m["step_time_s"] = time.perf_counter() - t_step
    m["images_per_s"] = len(batch.rollouts) / m["step_time_s"]
    parts.last_batch, parts.last_images = batch, images
    return m, pending


def assign_advantages(cfg: GRPORunConfig, batch, m: dict) -> None:
    """Group advantages (uniar_ray.grpo); a group with a failed sample is excluded whole and counted."""
    import torch

    g, names = cfg.grpo.num_generations, list(cfg.rewards.weights)
    R = torch.tensor([[r.rewards.get(n, math.nan) for n in names] for r in batch.rollouts], dtype=torch.float64)
    failed = grpo.whole_groups(torch.tensor([bool(r.excluded) for r in batch.rollouts]), g)
    res = grpo.group_advantages(R, [cfg.rewards.weights[n] for n in names], g, cfg.grpo.scale_rewards,
                                all_nan_rewards=cfg.grpo.all_nan_rewards, exclude=failed, func_names=names)
    for r, a, total, out, bad in zip(batch.rollouts, res.advantages.tolist(), res.rewards.tolist(),
                                     res.excluded.tolist(), failed.tolist()):
        r.advantage, r.reward = a, total
        if out and not r.excluded:
            r.excluded = "another sample of its group failed" if bad else "no reward applies to this sample"
    m.update(reward_mean=res.metrics["reward"], excluded_groups=int(failed.view(-1, g)[:, 0].sum()),
             **{k: v for k, v in res.metrics.items() if k != "reward"})


@contextmanager
def timed(m: dict, stage: str):
    t0 = time.perf_counter()
    yield
    m[f"time/{stage}"] = time.perf_counter() - t0


def format_line(m: dict) -> str:
    return (f"[grpo] step {m['step']:>4}  reward {m.get('reward_mean', float('nan')):.4f}  "
            f"loss {m.get('train/loss', float('nan')):+.4f}  kl {m.get('train/kl', float('nan')):.4f}  "
            f"{m['step_time_s']:.1f}s")


def record_placement(run: RunDir, parts: "Parts", digests: bool = False) -> None:
    """placement.json: the Ray the run used and each trainer rank's node; at the end, each rank's parameter digest
    (data-parallel ranks must agree; a mismatch is printed)."""
    path = run.path / "placement.json"
    rec = json.loads(path.read_text()) if path.exists() else {}
    rec.update(gcs_address=ray.get_runtime_context().gcs_address, driver_node_ip=ray.util.get_node_ip_address(),
               trainer_node_ips=parts.trainer.node_ips())
    if digests:
        rec["trainer_param_sha256"] = parts.trainer.param_digests()
        if len(set(rec["trainer_param_sha256"])) > 1:
            print(f"[grpo] warning: trainer ranks hold different parameters: {rec['trainer_param_sha256']}",
                  file=sys.stderr)
    path.write_text(json.dumps(rec, indent=2) + "\n")


def save_checkpoint(run: RunDir, parts: "Parts", step: int) -> None:
    folder = run.checkpoint_dir(step)
    folder.mkdir(parents=True, exist_ok=True)
    parts.trainer.save_checkpoint(folder / "trainer")
    run.save_driver_state(folder, {"step": step, "data": parts.sampler.state_dict()})
    run.prune_checkpoints(parts.cfg.keep_checkpoints)


def resume(run: RunDir, parts: "Parts") -> int:
    folder = run.latest_checkpoint()
    if folder is None:
        print(f"[grpo] --resume: no complete checkpoint in {run.path}; starting at step 0", file=sys.stderr)
        run.truncate_metrics(0)  # the lines of the earlier attempt are run again
        return 0
    state = json.loads((folder / "driver_state.json").read_text())
    parts.trainer.load_checkpoint(folder / "trainer")
    parts.sampler.load_state_dict(state["data"])
    restore_rng(state["rng"])
    parts.sync_weights()
    run.truncate_metrics(state["step"])
    print(f"[grpo] resumed from {folder} at step {state['step']}", file=sys.stderr)
    return state["step"]


class Parts:
    """The actors of a run and the driver-side glue for each stage (kept out of the step so it reads as a list)."""

    def __init__(self, cfg: GRPORunConfig):
        from actors.decoder_pool import DecoderPool
        from actors.group import ActorGroup
        from actors.reward_models import RewardGroup
        from actors.rollout_engine import RolloutEngineActor
        from actors.trainer import TrainerGroup
        from uniar_ray.data import PromptSampler, load_dataset

        self.cfg = cfg
        r = cfg.rollout
        self.rollout_group = ActorGroup(RolloutEngineActor, r.num_actors, {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
                                        cfg.model, r.backend, r.max_batch, r.num_threads, r.vllm_kvcache_gib)
        self.decoder = DecoderPool(cfg.decoder)
        self.rewards = RewardGroup(cfg.rewards)
        self.trainer = TrainerGroup(cfg.model, cfg.grpo, cfg.trainer, cfg.steps)
        d = cfg.data
        dataset = load_dataset(d.path, seed=d.seed, prompt_key=d.prompt_key, skip_bad_lines=d.skip_bad_lines)
        print(f"[grpo] data: {dataset.summary()}", flush=True)
        self.sampler = PromptSampler(dataset.records, d.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
        self.metrics = _Metrics()
        self.last_batch = self.last_images = None
        self.nodes_at_start = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

    # 1-2 ----------------------------------------------------------------------------------------------------------
    def _requests(self, step: int):
        records = self.sampler.next_batch()
        g, c = self.cfg.grpo.num_generations, self.cfg
        reqs = []
        for p, rec in enumerate(records):
            for k in range(g):
                seed = c.grpo.seed * 1_000_003 + step * 10_007 + p * g + k  # distinct per (step, prompt, sample)
                reqs.append(GenerationRequest(rec.prompt, c.ar_height, c.ar_width, seed=seed,
                                              temperature=self.cfg.grpo.temperature, request_id=f"s{step}-p{p}-g{k}"))
        return records, reqs

    def rollout(self, step: int):
        records, reqs = self._requests(step)
        return _Batch.build(records, reqs, self.rollout_group.map("generate", reqs), self.cfg.grpo.num_generations)

    def collect(self, step: int, refs=None, records=None, reqs=None):
        """Stages 1-4 of a step: roll-out (or wait for one already submitted), decode, score."""
        m: dict[str, float] = {}
        with timed(m, "rollout"):  # 1-2. sample prompts, roll out G per prompt
            if refs is None:
                batch = self.rollout(step)
            else:
                results = [x for part in ray.get(refs) for x in part]
                batch = _Batch.build(records, reqs, results, self.cfg.grpo.num_generations)
        with timed(m, "decode"):  # 3. bits -> images (retried; failures exclude their group)
            images = self.decode(batch)
        with timed(m, "score"):  # 4. rewards in parallel, routed by task, weighted nansum
            self.score(batch, images, m)
        return batch, images, m

    def prefetch(self, step: int):
        """Submit step ``step``'s roll-out now (ordered before any later weight update), finish 1-4 in a thread."""
        from concurrent.futures import ThreadPoolExecutor

        from actors.group import split_even

        records, reqs = self._requests(step)
        shards = split_even(reqs, len(self.rollout_group.actors))
        refs = [a.generate.remote(s) for a, s in zip(self.rollout_group.actors, shards) if s]
        self._pool = getattr(self, "_pool", None) or ThreadPoolExecutor(1, thread_name_prefix="grpo-prefetch")
        return self._pool.submit(self.collect, step, refs, records, reqs)

    # 3 --------------------------------------------------------------------------------------------------------------
    def decode(self, batch):
        from uniar_ray.decoder.types import DecodeRequest

        g = self.cfg.grpo

        def seed(r):  # see GRPORunConfig.decode_seed
            mode = self.cfg.decode_seed
            return g.seed if mode == "fixed" else batch.seeds[r.group] if mode == "group" else r.seed

        results = self.decoder.decode_requests([DecodeRequest.from_rollout(r, seed=seed(r)) for r in batch.rollouts],
                                               upsampling_ratio=self.cfg.decode_upsampling_ratio,
                                               num_inference_steps=g.decode_num_inference_steps,
                                               guidance_scale=g.decode_cfg_scale)
        for r, res in zip(batch.rollouts, results):
            if not res.ok:  # never a blank image in its place: the sample (and so its group) is left out
                r.excluded = r.excluded or f"decode failed: {res.error}"
        return [res.image if res.ok else None for res in results]

    # 4 --------------------------------------------------------------------------------------------------------------
    def score(self, batch, images, m: dict) -> None:
        ok = [i for i, im in enumerate(images) if im is not None]
        arrays = [images[i] for i in ok]
        rec = [batch.record_of(i) for i in ok]
        routed = self.rewards.score(arrays, [x.prompt for x in rec], [x.task for x in rec], [x.metadata for x in rec])
        for j, i in enumerate(ok):
            r = batch.rollouts[i]
            r.rewards = {n: float(v[j]) for n, v in routed.per_reward.items()}
            if routed.failed.get(j):  # a reward call failed on it: never a made-up score
                r.excluded = r.excluded or "; ".join(routed.failed[j])
        m.update({f"score/{k}": v for k, v in routed.metrics.items()})

    # 7 --------------------------------------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        state_ref = ray.put(self.trainer.trainable_state())
        ray.get(self.rollout_group.broadcast("update_weights", state_ref))

    def lost_nodes(self, wait_s: float = 45.0) -> list[str]:
        """Addresses of the nodes alive when the run started and dead now. A killed node is declared dead only after
        its missed health checks (~15-30 s), while its actors' errors arrive at once: wait up to ``wait_s`` for that."""
        others = {i: ip for i, ip in self.nodes_at_start.items() if i != ray.get_runtime_context().get_node_id()}
        deadline = time.monotonic() + wait_s
        while others:  # a single-node (local) run cannot lose a node and still be here
            alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            lost = sorted(ip for i, ip in others.items() if i not in alive)
            if lost or time.monotonic() > deadline:
                return lost
            time.sleep(1.0)
        return []

    # ---------------------------------------------------------------------------------------------------------------
    def export(self, m: dict) -> None:
        self.metrics.export(m)

    def save_grid(self, run: RunDir, step: int) -> None:
        from uniar_ray.visualize import captioned_grid

        if self.last_batch is None:
            return
        from PIL import Image

        shown = [(im, r) for im, r in zip(self.last_images, self.last_batch.rollouts) if im is not None][:16]
        if shown:
            grid = captioned_grid([Image.fromarray(im) for im, _ in shown], [f"{r.reward:.3f} {r.prompt}" for _, r in shown])
            grid.save(run.path / "grids" / f"step-{step:06d}.png")

    def close(self) -> None:
        self.rewards.shutdown()
        self.decoder.shutdown()
        self.trainer.shutdown()
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
        for a in self.rollout_group.actors:
            ray.kill(a)


class _Batch:
    """Rollouts of one step, G consecutive per prompt, with the prompt records they came from."""

    def __init__(self, records, rollouts, g):
        self.records, self.rollouts, self.g = records, rollouts, g
        self.seeds = [rollouts[i * g].seed for i in range(len(records))]  # one decoder seed per group

    def record_of(self, i: int):
        return self.records[i // self.g]

    @classmethod
    def build(cls, records, reqs, results, g):
        rollouts = []
        for i, (req, res) in enumerate(zip(reqs, results)):
            if not isinstance(res, Rollout):
                raise RuntimeError(f"rollout failed for {req.request_id}: {res.error}")
            res.group, res.task = i // g, records[i // g].task
            rollouts.append(res)
        return cls(records, rollouts, g)


class _Metrics:
    """Per-step figures as Ray metrics (Prometheus via the dashboard): one gauge per key, created on first use."""

    def __init__(self):
        self.gauges = {}

    def export(self, m: dict) -> None:
        from ray.util.metrics import Gauge

        for k, v in m.items():
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                continue
            name = "uniar_grpo_" + "".join(c if c.isalnum() else "_" for c in k)
            if name not in self.gauges:
                self.gauges[name] = Gauge(name, description=f"GRPO {k} per step")
            self.gauges[name].set(float(v))


if __name__ == "__main__":
    main()
