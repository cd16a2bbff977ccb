"""The actors of a GRPO run and the driver-side glue for each stage of a step (roll-out, decode, score, weight sync),
kept out of ``jobs/grpo.py`` so that its step reads as a list.

    parts = Parts(cfg)                       # rollout engines, decoder pool, reward pools, trainers, data sampler
    batch, images, metrics = parts.collect(step)      # stages 1-4
    parts.sync_weights(step + 1); parts.close()
"""
from __future__ import annotations

import math
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager

import ray

from actors.group import gather
from uniar_ray.checkpoint import prefetch_mismatch
from uniar_ray.config import GRPORunConfig
from uniar_ray.files import atomic_write
from uniar_ray.rollout import GenerationRequest, Rollout, RolloutError
from uniar_ray.runlog import RunDir

SECONDARY_EXCLUSION = "another sample of its group failed"  # not a cause of its own: left out of the reasons shown


@contextmanager
def timed(m: dict, stage: str):
    t0 = time.perf_counter()
    yield
    m[f"time/{stage}"] = time.perf_counter() - t0


class Parts:
    """The actors of a run and the driver-side glue for each stage (kept out of the step so it reads as a list)."""

    def __init__(self, cfg: GRPORunConfig, checked=None):
        """``checked``: what ``uniar_ray.preflight.grpo`` read before Ray started (the job passes it); None: read and
        check the data here (tests, tools). Either way the data is ready before any actor starts."""
        from actors.group import ActorGroup
        from actors.reward_models import RewardGroup
        from actors.rollout_engine import RolloutEngineActor
        from actors.trainer import TrainerGroup
        from actors.weight_sync import WeightSync

        self.cfg = cfg
        if checked is None or checked.dataset is None:  # made outside the job (tests, tools): read the data here
            from uniar_ray.preflight import grpo_data

            checked = grpo_data(cfg)
        self.val_records = checked.val  # validation prompts, never trained on
        self._start_sampler(cfg, checked)
        r = cfg.rollout
        # colocated: the trainer ranks roll out over their own parameters; no engine actors, nothing to sync
        self.colocated = r.placement == "colocated"
        self.rollout_group = None if self.colocated else ActorGroup(
            RolloutEngineActor, r.num_actors, {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}, cfg.model, r)
        self.decoder = decoder_pool(cfg)
        self.rewards = RewardGroup(cfg.rewards)
        self.trainer = TrainerGroup(cfg.model, cfg.grpo, cfg.trainer, cfg.steps, rollout=r)
        # the weights the engines sample with (rollout.weight_sync; colocated: a version count)
        self.weight_sync = WeightSync(self.trainer, self.rollout_group.actors if self.rollout_group else [], r,
                                      cfg.model.device)
        self.metrics = _Metrics()
        self.last_batch = self.last_images = None
        self.last_reasons: list[str] = []  # why the last step's samples were excluded (their own causes only)
        self._pending = None  # the background stages 1-4 (one_step mode)
        self._data_before: dict[int, dict] = {}  # step -> sampler position before its prompts were drawn
        self._prefetched = None  # (step, object refs of its roll-out) while one_step has one in flight
        self.nodes_at_start = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

    def _start_sampler(self, cfg: GRPORunConfig, checked) -> None:
        from uniar_ray.data import PromptSampler

        d, v = cfg.data, cfg.validation
        held = (f"; validation: {len(checked.val)} prompts, "
                + (f"from {v.prompt_file}" if v.prompt_file else "held out of these") if checked.val else "")
        print(f"[grpo] data: {checked.dataset.summary()}{held}", flush=True)
        self.sampler = PromptSampler(checked.train, d.prompts_per_step, seed=d.seed, shuffle=d.shuffle)

    @property
    def weights(self):
        """The policy version every roll-out samples with (``Weights``: model.path until the first sync)."""
        return self.weight_sync.weights

    # 1-2 ----------------------------------------------------------------------------------------------------------
    def _requests(self, step: int):
        self._data_before = {k: v for k, v in self._data_before.items() if k >= step - 1}
        self._data_before[step] = self.sampler.state_dict()
        records = self.sampler.next_batch()
        g, c = self.cfg.grpo.num_generations, self.cfg
        reqs = []
        for p, rec in enumerate(records):
            for k in range(g):
                seed = c.grpo.seed * 1_000_003 + step * 10_007 + p * g + k  # distinct per (step, prompt, sample)
                reqs.append(GenerationRequest(rec.prompt, c.ar_height, c.ar_width, seed=seed,
                                              temperature=self.cfg.grpo.temperature, request_id=f"s{step}-p{p}-g{k}"))
        return records, reqs

    def generate(self, reqs: list[GenerationRequest]) -> list:
        """Roll out ``reqs`` with the current policy (``self.weights``): one Rollout or RolloutError each, in order
        (an engine or rank whose call failed past its restarts: a RolloutError for each of its requests, a counted
        failure). The one way the driver samples (training steps and validation alike)."""
        from actors.rollout_engine import StaleWeightsError

        try:
            return self._gather(*self._submit(reqs))
        except StaleWeightsError:  # an engine restarted during the roll-out, after a collective broadcast
            self.weight_sync.publish()  # the trainer holds the weights until the next update: the engine loads them
            return self._gather(*self._submit(reqs))  # seeds travel with the requests: the same samples

    def _submit(self, reqs: list[GenerationRequest]) -> tuple[list, list[list]]:
        """(one object ref per non-empty contiguous share of ``reqs``, those shares): the trainer ranks'
        (colocated) or the rollout engines' (an engine behind on weights is given a reference to load them from)."""
        from actors.group import split_even

        if self.colocated:  # run in submission order on each rank: before any update submitted after
            refs = self.trainer.submit_generate(reqs, self.weights.version)
            return refs, [s for s in split_even(reqs, len(self.trainer.actors)) if s]
        self.weight_sync.catch_up()
        shards = [s for s in split_even(reqs, len(self.rollout_group.actors)) if s]
        return [a.generate.remote(s, self.weights) for a, s in zip(self.rollout_group.actors, shards)], shards

    def _gather(self, refs: list, shards: list[list]) -> list:
        from actors.rollout_engine import StaleWeightsError

        def failed(error: BaseException, shard: list) -> list:
            if isinstance(error, StaleWeightsError):  # not a failure: generate reloads the weights and retries
                raise error
            return failed_rollouts(error, shard)

        return gather(refs, shards, self.cfg.rollout.timeout_s, on_error=failed)

    def rollout(self, step: int):
        records, reqs = self._requests(step)
        return _Batch.build(records, reqs, self.generate(reqs), self.cfg.grpo.num_generations)

    def collect(self, step: int, submitted=None, records=None, reqs=None):
        """Stages 1-4 of a step: roll-out (or wait for one already ``submitted``: refs and their shares), decode,
        score."""
        m: dict[str, float] = {}
        with timed(m, "rollout"):  # 1-2. sample prompts, roll out G per prompt
            if submitted is None:
                batch = self.rollout(step)
            else:
                batch = _Batch.build(records, reqs, self._gather(*submitted), self.cfg.grpo.num_generations)
        if not batch.rollouts:  # every group's roll-out failed: nothing to decode or score
            return batch, [], m
        m["rollout/weight_version"] = min(r.weight_version for r in batch.rollouts)
        with timed(m, "decode"):  # 3. bits -> images (retried; failures exclude their group)
            images = self.decode(batch)
        if not self.cfg.rewards.pixel_rewards:  # every reward reads bits: no decoder, nothing decoded
            m["time/decode"] = 0.0
        with timed(m, "score"):  # 4. rewards in parallel, routed by task, weighted nansum
            self.score(batch, images, m)
        return batch, images, m

    def prefetch(self, step: int, rollouts: list | None = None):
        """Submit step ``step``'s roll-out now (ordered before any later weight update), finish 1-4 in a thread.
        rollouts: that roll-out already done (saved in the checkpoint a resume starts from): decode and score it."""
        records, reqs = self._requests(step)
        if rollouts is not None:  # reused only if it is what this step samples now (one_step: before the update)
            why = prefetch_mismatch(rollouts, reqs, step - 1 if self.cfg.async_mode == "one_step" else step)
            if why:
                print(f"[grpo] --resume: the checkpoint's prefetched roll-out of step {step} does not match this run "
                      f"({why}); sampling it again", file=sys.stderr, flush=True)
                rollouts = None
        submitted = self._submit(reqs) if rollouts is None else ([ray.put(rollouts)], [reqs])
        self._prefetched = (step, submitted[0])
        self._pending = in_background(self.collect, step, submitted, records, reqs)
        return self._pending

    def data_state(self, step: int) -> dict:
        """The sampler position to resume at ``step`` from: before its prompts were drawn, also when a one_step
        prefetch has drawn them already."""
        return self._data_before.get(step) or self.sampler.state_dict()

    def prefetched_rollouts(self, step: int) -> list | None:
        """Step ``step``'s roll-out if one_step submitted it before the update (waits for it), else None."""
        if self._prefetched is None or self._prefetched[0] != step:
            return None
        try:
            results = [x for part in ray.get(self._prefetched[1]) for x in part]
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError):
            return None  # an engine died under it: a resume samples the step again
        return results if all(isinstance(r, Rollout) for r in results) else None

    # 3 --------------------------------------------------------------------------------------------------------------
    def decode(self, batch):
        """One image per sample: decoded for the samples a pixel reward needs (``pixel_samples``), None for the
        others (and for failed decodes, whose samples are then excluded)."""
        from uniar_ray.decoder.types import DecodeRequest

        g = self.cfg.grpo
        images = [None] * len(batch.rollouts)
        need = pixel_samples(self.cfg, batch)
        if not need:
            return images

        def seed(r):  # see GRPORunConfig.decode_seed
            mode = self.cfg.decode_seed
            return g.seed if mode == "fixed" else batch.seeds[r.group] if mode == "group" else r.seed

        todo = [batch.rollouts[i] for i in need]
        results = self.decoder.decode_requests([DecodeRequest.from_rollout(r, seed=seed(r)) for r in todo],
                                               upsampling_ratio=self.cfg.decode_upsampling_ratio,
                                               num_inference_steps=g.decode_num_inference_steps,
                                               guidance_scale=g.decode_cfg_scale)
        for i, r, res in zip(need, todo, results):
            if not res.ok:  # never a blank image in its place: the sample (and so its group) is left out
                r.excluded = r.excluded or f"decode failed: {res.error}"
            images[i] = res.image if res.ok else None
        return images

    # 4 --------------------------------------------------------------------------------------------------------------
    def score(self, batch, images, m: dict) -> None:
        """Every sample not excluded yet (a failed decode excludes), with its image (None where no pixel reward
        applies: not decoded) and its bits packed as the Rollout carries them (for the rewards that read bits)."""
        from rewards.base import PackedBits

        ok = [i for i, r in enumerate(batch.rollouts) if not r.excluded]
        arrays = [images[i] for i in ok]
        rec = [batch.record_of(i) for i in ok]
        bits = [PackedBits.of(batch.rollouts[i]) for i in ok] if len(self.cfg.rewards.pixel_rewards) < len(
            self.cfg.rewards.models) else None
        routed = self.rewards.score(arrays, [x.prompt for x in rec], [x.task for x in rec], [x.metadata for x in rec],
                                    bits=bits)
        for j, i in enumerate(ok):
            r = batch.rollouts[i]
            r.rewards = {n: float(v[j]) for n, v in routed.per_reward.items()}
            r.reward_details = {n: {**{k: _plain(v[j]) for k, v in routed.extras.get(n, {}).items()},
                                    **(routed.details.get(n, [None] * len(ok))[j] or {}),
                                    **({"error": routed.errors[n][j]} if routed.errors[n][j] else {})}
                                for n in routed.per_reward}
            if routed.failed.get(j):  # a reward call failed on it: never a made-up score
                r.excluded = r.excluded or "; ".join(routed.failed[j])
        m.update({f"score/{k}": v for k, v in routed.metrics.items()})

    # 7 --------------------------------------------------------------------------------------------------------------
    def sync_weights(self, version: int) -> None:
        """The new weights (version: steps done) into the rollout engines, never through this process: by reference
        to rank 0's object store, or broadcast from rank 0 (``WeightSync``; colocated: a version count only). An
        engine that misses them loads them before its next roll-out."""
        self.weight_sync.sync(version)

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

    def save_grid(self, run: RunDir, step: int):
        """The last step's first 16 images, captioned; returns the PNG's path (None when nothing was decoded)."""
        from uniar_ray.visualize import captioned_grid

        if self.last_batch is None:
            return None
        from PIL import Image

        shown = [(im, r) for im, r in zip(self.last_images, self.last_batch.rollouts) if im is not None][:16]
        if not shown:
            return None
        grid = captioned_grid([Image.fromarray(im) for im, _ in shown], [f"{r.reward:.3f} {r.prompt}" for _, r in shown])
        path = run.path / "grids" / f"step-{step:06d}.png"
        atomic_write(path, lambda f: grid.save(f, format="PNG"))
        return path

    def close(self, join_timeout_s: float = 30.0) -> None:
        """Kill every actor first, so that a background step waiting on one fails at once instead of waiting
        (or spinning on a pool that is gone), then join that step, then release the pools."""
        engines = self.rollout_group.actors if self.rollout_group else []  # none when colocated
        actors = [*engines, *self.decoder.actors, *self.trainer.actors,
                  *(a for pool in self.rewards.pools.values() for a in pool)]
        for a in actors:
            ray.kill(a, no_restart=True)
        if self._pending is not None:
            self._pending.cancel()
            try:
                self._pending.exception(timeout=join_timeout_s)
            except (FutureTimeout, CancelledError):
                pass  # a daemon thread: it cannot keep the process alive
        self.rewards.shutdown()
        self.decoder.shutdown()
        self.trainer.shutdown()


class NoDecoder:
    """The decoder pool of a run whose rewards all read bits: no actors, nothing to decode."""

    actors: tuple = ()

    def shutdown(self) -> None:
        pass


def decoder_pool(cfg: GRPORunConfig):
    """The run's decoder pool, started only when some reward reads pixels: a run whose rewards all read bits
    (self_judge) decodes nothing."""
    from actors.decoder_pool import DecoderPool

    return DecoderPool(cfg.decoder) if cfg.rewards.pixel_rewards else NoDecoder()


def pixel_samples(cfg: GRPORunConfig, batch) -> list[int]:
    """The samples some reward reading pixels applies to (by task), not excluded already: the ones to decode."""
    from rewards.base import applies_to
    from rewards.router import reward_tasks

    routes = [reward_tasks(cfg.rewards.models[name]) for name in cfg.rewards.pixel_rewards]
    return [i for i, r in enumerate(batch.rollouts) if not r.excluded and any(applies_to(t, r.task) for t in routes)]


def failed_rollouts(error: BaseException, reqs: list[GenerationRequest]) -> list[RolloutError]:
    """What stands for the requests of an engine call that failed (its actor died past its restarts, or raised): a
    counted failure of their groups, like a failed decode or reward, never the end of the run."""
    why = f"rollout engine failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
    return [RolloutError(q.request_id, q.prompt, why) for q in reqs]


def _plain(value):
    """A JSON-friendly scalar (numpy values, NaN as None)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def in_background(fn, *args) -> Future:
    """``fn(*args)`` in a daemon thread (unlike an executor's thread, one that is stuck cannot hold up the exit)."""
    future: Future = Future()

    def run():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)

    threading.Thread(target=run, name="grpo-prefetch", daemon=True).start()
    return future


class _Batch:
    """Rollouts of one step, G consecutive per prompt, with the prompt records they came from."""

    def __init__(self, records, rollouts, g):
        self.records, self.rollouts, self.g = records, rollouts, g
        self.seeds = [rollouts[i * g].seed for i in range(len(records))]  # one decoder seed per group
        self.dropped, self.dropped_reasons = 0, []  # every roll-out failed: the groups left out, why (per sample)

    def record_of(self, i: int):
        return self.records[i // self.g]

    @classmethod
    def build(cls, records, reqs, results, g):
        """A failed roll-out (a RolloutError) stays in the batch as an excluded stand-in, so the batch keeps its shape
        (the trainer ranks split it evenly) and its group is excluded and counted against the failure budget, like
        a failed decode or reward. When every roll-out failed the batch is empty and ``dropped`` counts the groups."""
        done = [r for r in results if isinstance(r, Rollout)]
        if not done:
            batch = cls([], [], g)
            batch.dropped, batch.dropped_reasons = len(records), [f"rollout failed: {r.error}" for r in results]
            return batch
        rollouts = []
        for i, (req, res) in enumerate(zip(reqs, results)):
            if not isinstance(res, Rollout):
                res = _stand_in(done[0], req, f"rollout failed: {res.error}")
            res.group, res.task = i // g, records[i // g].task
            rollouts.append(res)
        return cls(records, rollouts, g)


def gauge_name(key: str) -> str:
    """The Ray gauge of a metrics.jsonl key (Prometheus adds ``ray_``): ``train/kl`` -> ``uniar_grpo_train_kl``."""
    return "uniar_grpo_" + "".join(c if c.isalnum() else "_" for c in key)
def _stand_in(template: Rollout, req: GenerationRequest, why: str) -> Rollout:
    """An excluded sample in the place of a failed roll-out: another sample's tokens and bits (same shapes; the loss
    never counts an excluded sample), this request's identity."""
    import dataclasses

    return dataclasses.replace(template, request_id=req.request_id, prompt=req.prompt, seed=req.seed,
                               temperature=req.temperature, rewards={}, reward_details={}, reward=math.nan,
                               advantage=0.0, excluded=why)


class _Metrics:
    """Per-step figures as Ray metrics (Prometheus via the dashboard): one gauge per key, created on first use."""

    def __init__(self):
        self.gauges = {}

    def export(self, m: dict) -> None:
        from ray.util.metrics import Gauge

        for k, v in m.items():
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                continue
            name = gauge_name(k)
            if name not in self.gauges:
                self.gauges[name] = Gauge(name, description=f"GRPO {k} per step")
            self.gauges[name].set(float(v))
