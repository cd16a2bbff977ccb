"""Reward models as Ray actors: one pool per reward, all rewards scored in parallel, routed and combined as the
reference does (``rewards/router.py``), failures counted and never scored 0.

    group = RewardGroup(cfg.rewards)                       # starts the pools; resources from each RewardSpec
    routed = group.score(images, prompts, tasks, metadata)   # RoutedScores: per reward, total, valid, failures
    group.stats()                                            # per actor: calls, samples, rejected images
    group.shutdown()

Images travel as uint8 [H, W, 3] arrays (Ray's object store, put once per batch) or PNG bytes
(``wire_format: png``), metadata as JSON text; each actor checks every image on arrival and rejects oversized or
corrupt ones (decompression bombs) per sample, then gives its reward the images as its ``image_format`` says (the
JPEG round trip the reference's servers received). A reward reading bits (self_judge, or a class with
``inputs: bits``) gets each sample's packed bits instead (put once per batch, shared like the images). A reward with
a ``runtime_env`` runs its actors in that Ray environment (its own pip / conda / container / py_modules).
A call that raises, times out or loses its actor fails only its own samples (NaN + reason); Ray restarts the
actor (``max_restarts``) and, after a death, retries the call (``max_task_retries``); a timed-out actor is killed so
that Ray restarts it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import ray

from actors.group import ActorGroup, counter_at_zero, split_even
from rewards.base import ImageLimits, RewardOutput, RewardScores, encode_png, scatter, score_checked
from rewards.base import ImageCodec, PackedBits
from rewards.router import RoutedScores, build_reward, combine, reward_tasks, route
from uniar_ray.config import RewardConfig, RewardSpec

logger = logging.getLogger(__name__)


@ray.remote
class RewardActor:
    """Owns one reward model; scores the samples of a batch it is pointed at."""

    def __init__(self, name: str, spec: RewardSpec, limits: ImageLimits):
        # One compute thread per whole CPU reserved (at least one), for torch and onnxruntime alike.
        threads = max(1, int(spec.num_cpus))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            import torch
        except ImportError:  # a reward's own environment (runtime_env) need not have torch
            torch = None
        if torch is not None:
            torch.set_num_threads(threads)
        self.model = build_reward(name, spec)
        self.limits = limits
        self.codec = ImageCodec(spec.image_format, spec.jpeg_quality or 75)
        self.counts = {"calls": 0, "samples": 0, "rejected_images": 0}

    def ready(self) -> str:
        return self.model.name

    def stats(self) -> dict[str, int]:
        """Since this actor (re)started: calls, samples scored, images rejected."""
        return dict(self.counts)

    def score(self, images: Sequence[np.ndarray | bytes | None] | None, indices: Sequence[int], prompts: Sequence[str],
              tasks: Sequence[str | None], metadata_json: Sequence[str],
              bits: Sequence[PackedBits | None] | None = None) -> dict[str, Any]:
        """``images`` / ``bits``: the whole batch (one object-store copy shared by every reward; None when no reward
        of this kind reads it); ``indices``: this call's samples; the other lists are already this call's. Returns
        plain arrays, strings and JSON objects."""
        t0 = time.perf_counter()
        metadata = [json.loads(m) or {} for m in metadata_json]
        mine = [images[i] for i in indices] if images is not None else [None] * len(indices)
        res = score_checked(self.model, mine, prompts, tasks, metadata, self.limits, self.codec,
                            [bits[i] for i in indices] if bits is not None else None)
        self.counts["calls"] += 1
        self.counts["samples"] += len(indices)
        self.counts["rejected_images"] += sum(bool(e and e.startswith("image rejected")) for e in res.errors)
        return {"scores": res.scores, "errors": res.errors, "extras": res.extras, "details": res.details,
                "elapsed_s": time.perf_counter() - t0}


def runtime_env(name: str, env: dict[str, Any]) -> dict[str, Any]:
    """The reward's runtime_env for Ray. Local py_modules / working_dir folders are checked here (a clear error now
    instead of a worker that cannot start) and uploaded to the cluster, as ``ray.init`` does for a job's own: Ray
    takes only URIs in an actor's runtime_env."""
    env = dict(env)

    def local(path: str, key: str) -> str:
        if "://" in path:  # a URI Ray fetches itself (s3://, gs://, https://...zip)
            return path
        p = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(p):
            raise FileNotFoundError(f"rewards.models.{name}.runtime_env.{key}: {path} does not exist "
                                    f"(looked for {p})")
        return p

    if "py_modules" in env:
        env["py_modules"] = [local(m, "py_modules") if isinstance(m, str) else m for m in env["py_modules"]]
    if isinstance(env.get("working_dir"), str):
        env["working_dir"] = local(env["working_dir"], "working_dir")
    return _upload_local_folders(env)


def _upload_local_folders(env: dict[str, Any]) -> dict[str, Any]:
    """Local folders -> gcs:// URIs (Ray's own upload for a job's runtime_env; a private API, hence the checks)."""
    import inspect
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    node = getattr(ray._private.worker.global_worker, "node", None)
    scratch = node.get_runtime_env_dir_path() if node is not None else tempfile.mkdtemp(prefix="uniar-reward-env-")
    for upload in (upload_py_modules_if_needed, upload_working_dir_if_needed):
        extra = {"include_gitignore": True} if "include_gitignore" in inspect.signature(upload).parameters else {}
        env = upload(env, scratch_dir=scratch, logger=logger, **extra)
    return env


def _as_array(image: Any) -> Any:
    """PIL images become RGB uint8 arrays here, in the driver; arrays and bytes pass as they are (checked in the
    actor)."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        return np.asarray(image.convert("RGB"))
    return image


@dataclasses.dataclass
class _Call:
    name: str
    actor: Any
    indices: list[int]
    ref: Any
    deadline: float
    timeout_s: float
    result: dict[str, Any] | None = None
    error: str | None = None
    done_at: float = 0.0


class RewardGroup:
    """The reward pools of one ``RewardConfig`` and the calls across them."""

    def __init__(self, cfg: RewardConfig):
        if not cfg.models:
            raise ValueError("no rewards configured")
        self.cfg = cfg
        self.limits = ImageLimits(max_pixels=cfg.max_image_pixels, max_bytes=cfg.max_image_bytes)
        self.tasks = {name: reward_tasks(spec) for name, spec in cfg.models.items()}
        self.pools = {name: self._start(name, spec).actors for name, spec in cfg.models.items()}
        self.failures = {name: 0 for name in cfg.models}  # failed samples since start, per reward
        self._turn = 0
        self._metrics = _Metrics(list(cfg.models))

    def _start(self, name: str, spec: RewardSpec) -> ActorGroup:
        options = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": self.cfg.max_restarts,
                   "max_task_retries": self.cfg.max_task_retries}
        if spec.runtime_env:
            options["runtime_env"] = runtime_env(name, spec.runtime_env)
        return ActorGroup(RewardActor, spec.num_actors, options, name, spec, self.limits)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every actor has built its model. An actor that Ray is restarting answers "unavailable"
        for a moment (calls made then fail unless ``max_task_retries`` > 0): poll through that."""
        deadline = time.monotonic() + timeout_s
        for actor in [a for pool in self.pools.values() for a in pool]:
            while True:
                try:
                    ray.get(actor.ready.remote(), timeout=max(0.0, deadline - time.monotonic()))
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def score(self, images: Sequence[np.ndarray | bytes | None], prompts: Sequence[str], tasks: Sequence[str | None],
              metadata: Sequence[dict[str, Any] | None], parallel: bool = True,
              bits: Sequence[PackedBits | None] | None = None) -> RoutedScores:
        """Score a batch with every reward. ``images[i]`` may be None where no reward reading pixels applies to
        sample i (it was not decoded); ``bits``: each sample's packed bits, for the rewards that read bits.
        ``parallel=False`` calls one reward after another (what the reference trainer does; kept for comparison)."""
        n = len(images)
        if not (len(prompts) == len(tasks) == len(metadata) == n) or (bits is not None and len(bits) != n):
            raise ValueError("images, prompts, tasks, metadata (and bits) differ in length")
        specs = self.cfg.models
        images_ref = bits_ref = None
        if any(not specs[name].reads_bits for name in self.pools):
            images = [_as_array(im) for im in images]
            if self.cfg.wire_format == "png":
                images = [encode_png(im) if isinstance(im, np.ndarray) else im for im in images]
            images_ref = ray.put(list(images))
        if bits is not None and any(specs[name].reads_bits for name in self.pools):
            bits_ref = ray.put(list(bits))
        meta_json = [json.dumps(m) for m in metadata]
        calls: list[_Call] = []
        for name in self.pools:
            inputs = (None, bits_ref) if specs[name].reads_bits else (images_ref, None)
            new = self._submit(name, inputs, list(tasks), list(prompts), meta_json)
            if not parallel:
                self._gather(new)
            calls.extend(new)
        self._gather(calls)
        return combine({name: self._output(name, [c for c in calls if c.name == name], n) for name in self.pools},
                       self.cfg.weights)

    def _submit(self, name, inputs, tasks, prompts, meta_json) -> list[_Call]:
        idx = route(tasks, self.tasks[name])
        if not idx:  # no sample for this reward: no call at all
            return []
        pool, spec = self.pools[name], self.cfg.models[name]
        self._turn += 1
        chunks = [c for c in split_even(idx, len(pool)) if c]
        calls = []
        start = time.monotonic()
        for k, chunk in enumerate(chunks):
            actor = pool[(self._turn + k) % len(pool)]
            ref = actor.score.remote(inputs[0], chunk, [prompts[i] for i in chunk], [tasks[i] for i in chunk],
                                     [meta_json[i] for i in chunk], inputs[1])
            calls.append(_Call(name, actor, chunk, ref, start + spec.timeout_s, spec.timeout_s))
        return calls

    def _gather(self, calls: list[_Call]) -> None:
        pending = {c.ref: c for c in calls if c.result is None and c.error is None}
        while pending:
            deadline = min(c.deadline for c in pending.values())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for ref in ready:
                call = pending.pop(ref)
                call.done_at = now
                try:
                    call.result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    call.error = f"reward raised: {type(e.cause).__name__}: {e.cause}"
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    call.error = f"reward actor lost: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                except Exception as e:  # noqa: BLE001 - object lost, worker crash: this call fails, not the step
                    call.error = f"{type(e).__name__}: {str(e)[:200]}"
            for call in [c for c in pending.values() if c.deadline <= now]:
                del pending[call.ref]
                call.done_at, call.error = now, f"timed out after {call.timeout_s:.0f}s"
                logger.warning("reward %s: call timed out; restarting its actor", call.name)
                ray.kill(call.actor, no_restart=False)  # Ray restarts it (max_restarts); the stuck call is dropped

    def _output(self, name: str, calls: list[_Call], n: int) -> RewardOutput:
        full = RewardScores.not_applicable(n)
        for c in calls:
            r = c.result
            part = (RewardScores(r["scores"], r["errors"], r["extras"], r.get("details") or []) if c.error is None
                    else RewardScores.failed(len(c.indices), c.error))
            scatter(n, c.indices, part, into=full)
        starts = [c.deadline - c.timeout_s for c in calls]
        elapsed = max(c.done_at for c in calls) - min(starts) if calls else 0.0
        out = RewardOutput(name, full.scores, full.errors, sum(len(c.indices) for c in calls), elapsed, full.extras,
                           full.details)
        self.failures[name] += out.failures
        out.log()
        self._metrics.record(out)
        return out

    def stats(self) -> dict[str, list[dict[str, int]]]:
        """Per reward, each actor's ``RewardActor.stats``."""
        return {name: ray.get([a.stats.remote() for a in pool]) for name, pool in self.pools.items()}

    def shutdown(self) -> None:
        for pool in self.pools.values():
            for actor in pool:
                ray.kill(actor, no_restart=True)
        self.pools = {}


class _Metrics:
    """Per-reward figures exported to the Ray dashboard (Prometheus): mean score, failed samples, call time."""

    def __init__(self, names: list[str]):
        from ray.util.metrics import Counter, Gauge

        self.mean = Gauge("uniar_reward_mean", "mean reward over the last batch's scored samples", tag_keys=("reward",))
        self.time = Gauge("uniar_reward_call_seconds", "wall time of the last batch", tag_keys=("reward",))
        self.failed = Counter("uniar_reward_failed_samples", "samples a reward failed on", tag_keys=("reward",))
        for name in names:
            counter_at_zero(self.failed, tags={"reward": name})

    def record(self, out: RewardOutput) -> None:
        tags = {"reward": out.name}
        valid = out.scores[~np.isnan(out.scores)]
        if valid.size:
            self.mean.set(float(valid.mean()), tags=tags)
        self.time.set(out.elapsed_s, tags=tags)
        if out.failures:
            self.failed.inc(out.failures, tags=tags)
