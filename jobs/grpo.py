"""GRPO training of a UniAR policy on Ray: roll out, decode, score, advantages, update, sync weights.

    python -m jobs.grpo --config configs/grpo_demo.yaml [grpo.beta=0.0 steps=20 ...] [--resume [RUN_OR_CKPT]]
    python -m jobs.grpo --plan --config configs/grpo_uniar_rl.yaml [--cluster-file my_cluster.yaml]
    ray job submit --working-dir . -- python -m jobs.grpo --config configs/grpo_uniar_rl.yaml cluster.address=auto
The default config is the embedded demo: local Ray, tiny policy, a tiny decoder whose colours follow the bits, a
redness reward, CPU.
Prints the run directory at the end (metrics.jsonl, reward_curve.png, grids/, checkpoints/step-N/{model,trainer}).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path

import ray

from jobs import start_ray
from uniar_ray import checkpoint as ckpt
from uniar_ray import grpo
from uniar_ray.config import GRPORunConfig, parse_cli, to_dict
from uniar_ray.data import resolve_data_path
from uniar_ray.limits import check_grpo_inputs
from uniar_ray.rollout import GenerationRequest, Rollout
from uniar_ray.rollout.types import load_rollouts, save_rollouts
from uniar_ray.runlog import RunDir, restore_rng
from uniar_ray.tracking import Tracker

PREFETCHED = "prefetched_rollouts.npz"  # in a checkpoint: the next step's roll-out, sampled before the update


def main(argv: list[str] | None = None):
    cfg, args = parse_cli(GRPORunConfig, argv, default_config="configs/grpo_demo.yaml", add_flags=_flags)
    if args.plan:
        return show_plan(cfg, args.cluster_file)
    resolve_data_path(cfg.data.path)  # missing data files are reported before the run folder and Ray
    try:
        run, candidates = open_run(cfg, args.resume)  # a resume that would break the run stops here, nothing written
    except ckpt.ResumeError as e:
        raise SystemExit(f"[grpo] {e}") from None
    start_ray(cfg)
    parts = Parts(cfg)  # rollout engines, decoder pool, reward pools, trainers, data sampler
    budget = grpo.FailureBudget(cfg.grpo.max_excluded_fraction, cfg.grpo.failure_window)
    trained = 0
    step = 0
    tracker = None
    try:
        step, prefetched = resume(run, parts, candidates) if args.resume else (0, None)
        record_placement(run, parts)
        first_step = step
        (run.path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))  # once the run is really this one
        tracker = Tracker(cfg.tracking, run.path, to_dict(cfg), start_step=step)
        # one_step: step's roll-out is submitted now; after a resume it is the one the checkpoint saved
        pending = parts.prefetch(step, prefetched) if cfg.async_mode == "one_step" or prefetched else None
        for step in range(step, cfg.steps):
            metrics, pending = grpo_step(cfg, parts, step, pending)
            run.log_metrics(metrics)
            tracker.log(metrics)
            parts.export(metrics)
            print(format_line(metrics), flush=True)
            if step == 0 or (step + 1) % cfg.grid_every == 0 or step + 1 == cfg.steps:  # first, every k, last
                parts.save_grid(run, step)
            trained += not metrics["skipped_update"]
            if not metrics["skipped_update"] and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(run, parts, step + 1)  # a step that changed nothing is not worth a checkpoint
            stop = budget.record(metrics["excluded_groups_all"], metrics["groups"], parts.last_reasons)
            if stop:
                raise SystemExit(f"[grpo] step {step}: stopping: {stop}. {last_checkpoint_note(run)}")
        record_placement(run, parts, digests=True)
    except FloatingPointError as e:  # a NaN loss: stop with a message, keep the last good checkpoint
        raise SystemExit(f"[grpo] {e}") from None
    except ray.exceptions.RayError as e:  # when a node went away, say so in one line instead of a remote traceback
        lost = parts.lost_nodes()
        if not lost:
            raise
        raise SystemExit(f"[grpo] lost Ray node(s) {', '.join(lost)} ({type(e).__name__}); stopping. "
                         f"{last_checkpoint_note(run)} Bring the node(s) back and rerun with --resume.") from None
    except KeyboardInterrupt:
        print(f"[grpo] interrupted at step {step}; shutting down. {last_checkpoint_note(run)}", file=sys.stderr,
              flush=True)
        raise SystemExit(130) from None
    finally:
        if tracker is not None:  # the run started (a resume refused at loading leaves its folder as it was)
            run.plot_rewards()
            tracker.close()
        parts.close()
    if not trained and first_step < cfg.steps:  # every step was skipped: the job did not do its work
        raise SystemExit(f"[grpo] no step of this run updated the model (every prompt group was excluded); see the "
                         f"per-step causes above. {last_checkpoint_note(run)}")
    summarize(run)
    print(run.path)
    return run.path


def last_checkpoint_note(run: RunDir) -> str:
    folder = run.latest_checkpoint()
    return f"The last good checkpoint is {folder}." if folder else f"No checkpoint was written under {run.path}."


def summarize(run: RunDir) -> None:
    """One line a person can read at the end: how the reward moved (first 3 vs last 3 steps), against the per-step
    noise of the mean reward."""
    rows = [m["reward_mean"] for m in run.read_metrics() if m.get("reward_mean") is not None]
    if len(rows) >= 2:
        k = min(3, len(rows) // 2)
        first, last = sum(rows[:k]) / k, sum(rows[-k:]) / k
        noise = step_noise(rows)
        ratio = (last - first) / noise if noise > 0 else math.nan
        print(f"[grpo] mean reward: first {k} steps {first:.4f}, last {k} steps {last:.4f} ({last - first:+.4f}); "
              f"per-step noise {noise:.4f} (rise {ratio:.1f}x the noise); "
              f"curve: {run.path / 'reward_curve.png'}", flush=True)


def step_noise(values: list[float]) -> float:
    """Per-step noise of a curve: std of its second differences / sqrt(6), which is the std of white noise added
    to a curve with a locally linear trend (the trend itself cancels; step-to-step differences would count it)."""
    second = [values[i + 1] - 2 * values[i] + values[i - 1] for i in range(1, len(values) - 1)]
    return statistics.stdev(second) / math.sqrt(6) if len(second) >= 2 else math.nan


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
    parts.last_reasons = [r.excluded for r in batch.rollouts if r.excluded and r.excluded != SECONDARY_EXCLUSION]
    m["skipped_update"] = int(m["excluded_groups_all"] == m["groups"])
    if m["skipped_update"]:  # nothing to learn from: no optimizer step (no momentum drift), nothing to sync
        print(f"[grpo] step {step}: no prompt group could be scored, the model is not updated; causes (samples): "
              f"{grpo.count_reasons(parts.last_reasons)}", flush=True)
    else:
        with timed(m, "update"):  # 6. DeepSpeed step on the trainer ranks
            m.update({f"train/{k}": v for k, v in parts.trainer.train_step(batch.rollouts).items()})
        if not math.isfinite(m["train/loss"]):
            raise FloatingPointError(f"step {step}: the loss is {m['train/loss']}; stopping (the last good "
                                     f"checkpoint is kept under {cfg.run_dir}/checkpoints)")
        with timed(m, "sync"):  # 7. new weights (version: steps done) into the rollout engines, by reference
            parts.sync_weights(step + 1)
    m["step_time_s"] = time.perf_counter() - t_step
    m["images_per_s"] = len(batch.rollouts) / m["step_time_s"]
    parts.last_batch, parts.last_images = batch, images
    return m, pending


SECONDARY_EXCLUSION = "another sample of its group failed"  # not a cause of its own: left out of the reasons shown


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
            r.excluded = SECONDARY_EXCLUSION if bad else "no reward applies to this sample"
    groups_out = (~res.excluded).view(-1, g).sum(dim=1) < 2  # fewer than 2 samples left: no group signal
    m.update(reward_mean=res.metrics["reward"], excluded_groups=int(failed.view(-1, g)[:, 0].sum()),
             excluded_groups_all=int(groups_out.sum()), groups=len(groups_out),
             **{k: v for k, v in res.metrics.items() if k != "reward"})


@contextmanager
def timed(m: dict, stage: str):
    t0 = time.perf_counter()
    yield
    m[f"time/{stage}"] = time.perf_counter() - t0


def format_line(m: dict) -> str:
    return (f"[grpo] step {m['step']:>4}  reward {m.get('reward_mean', float('nan')):.4f}  "
            f"loss {m.get('train/loss', float('nan')):+.4f}  kl {m.get('train/kl', float('nan')):.4f}  "
            f"{m['step_time_s']:.1f}s" + ("  (not updated: no group scored)" if m.get("skipped_update") else ""))


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


def _flags(parser) -> None:
    parser.add_argument("--plan", action="store_true",
                        help="validate the config, place every actor and estimate its memory; load nothing, train nothing")
    parser.add_argument("--cluster-file", default="", help="with --plan: a YAML cluster description instead of the "
                        "cluster this config would run on")


def show_plan(cfg: GRPORunConfig, cluster_file: str) -> None:
    from uniar_ray.plan import Cluster, PlanError, plan_run

    cluster = Cluster.from_file(cluster_file) if cluster_file else Cluster.detect(cfg.cluster)
    try:
        table = plan_run(cfg, cluster)
    except PlanError as e:
        raise SystemExit(f"[plan] {e}") from None
    print(table)


def open_run(cfg: GRPORunConfig, resume) -> tuple[RunDir, list]:
    """The run folder and, for a resume, the checkpoints it may continue from (newest complete first). A resume
    whose config breaks the checkpoint's identity is refused before anything is written."""
    identity = {**to_dict(cfg), "data_fingerprint": _data_fingerprint(cfg)}
    path = cfg.run_dir if resume is True else resume
    if resume is True and not Path(path).exists():
        print(f"[grpo] --resume: {path} does not exist yet; starting a new run there", file=sys.stderr)
        resume = False
    if not resume:
        return _opened(RunDir(cfg.run_dir), identity), []
    run_path, given = ckpt.resolve_resume(path)
    folder, warnings = ckpt.choose_checkpoint([given] if given else ckpt.all_checkpoints(run_path))
    changed = ckpt.check_resume(folder, run_path / "config.json", identity) if folder else []
    for w in warnings:
        print(f"[grpo] warning: {w}", file=sys.stderr)
    if changed:
        print("[grpo] --resume: settings changed since the checkpoint (allowed):\n  " + "\n  ".join(changed),
              file=sys.stderr)
    candidates = [folder] + [p for p in ckpt.complete_checkpoints(run_path) if p.name < folder.name] if folder else []
    return _opened(RunDir(run_path, resume=True), identity), candidates[:1] if given else candidates


def _opened(run: RunDir, identity: dict) -> RunDir:
    run.open().identity = identity
    return run


def _data_fingerprint(cfg: GRPORunConfig) -> str:
    from uniar_ray.data import load_dataset

    d = cfg.data
    return ckpt.data_fingerprint(load_dataset(d.path, seed=d.seed, prompt_key=d.prompt_key,
                                              skip_bad_lines=d.skip_bad_lines).records)


def save_checkpoint(run: RunDir, parts: "Parts", step: int) -> None:
    """trainer/ (DeepSpeed state), model/ (the published layout: ar_model/ + the decoder linked), config.json, and
    driver_state.json last (step, data position, RNG, file sizes)."""
    folder = run.checkpoint_dir(step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ckpt.DRIVER_STATE).unlink(missing_ok=True)  # a re-save is incomplete until it is written again
    parts.trainer.save_checkpoint(folder / "trainer")
    parts.trainer.save_model(folder / ckpt.MODEL_DIR / "ar_model")
    ckpt.link_decoder(folder / ckpt.MODEL_DIR, parts.cfg.decoder, run.path)
    (folder / "config.json").write_text(json.dumps(to_dict(parts.cfg), indent=2))
    rollouts = parts.prefetched_rollouts(step)
    if rollouts is not None:  # one_step: sampled before this update, from the weights a resume no longer has
        save_rollouts(folder / PREFETCHED, rollouts)
    run.save_driver_state(folder, {"step": step, "data": parts.data_state(step),
                                   "data_fingerprint": run.identity["data_fingerprint"]})
    run.prune_checkpoints(parts.cfg.keep_checkpoints)


def resume(run: RunDir, parts: "Parts", candidates: list):
    """Load the newest loadable checkpoint (an unloadable one falls back to the next, with a warning naming both);
    later checkpoints are set aside and later metric lines dropped. No complete checkpoint at all: start over at step
    0, and say so; complete ones that all fail to load: stop, changing nothing. Returns (next step, the roll-out
    one_step had prefetched for it, or None)."""
    for i, folder in enumerate(candidates):
        try:
            parts.trainer.load_checkpoint(folder / "trainer")
        except Exception as e:  # noqa: BLE001 - any failure to read it: try the next older one
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            print(f"[grpo] warning: could not load {folder} ({str(e).splitlines()[-1][:300]}); "
                  + (f"falling back to {nxt}" if nxt else "no older complete checkpoint"), file=sys.stderr)
            continue
        state = json.loads((folder / ckpt.DRIVER_STATE).read_text())
        parts.sampler.load_state_dict(state["data"])
        restore_rng(state["rng"])
        parts.sync_weights(state["step"])
        _rewind(run, state["step"])
        print(f"[grpo] resumed from {folder} at step {state['step']}", file=sys.stderr)
        prefetched = folder / PREFETCHED
        return state["step"], load_rollouts(prefetched) if prefetched.exists() else None
    if candidates:
        raise SystemExit(f"[grpo] --resume: none of {', '.join(p.name for p in candidates)} in {run.path} could be "
                         "loaded (see the warnings above); nothing was changed. Start a new run (drop --resume or set "
                         "run_dir), or fix the environment that cannot read them.")
    _rewind(run, 0)
    print(f"[grpo] --resume: no complete checkpoint in {run.path}; starting over at step 0", file=sys.stderr)
    return 0, None


def _rewind(run: RunDir, step: int) -> None:
    dropped = run.truncate_metrics(step)
    aside = run.set_aside_checkpoints_after(step)
    if dropped or aside:
        print(f"[grpo] --resume: dropped {dropped} metric line(s) of steps >= {step}"
              + (f"; later checkpoints moved to {aside}" if aside else ""), file=sys.stderr)


class Parts:
    """The actors of a run and the driver-side glue for each stage (kept out of the step so it reads as a list)."""

    def __init__(self, cfg: GRPORunConfig):
        from actors.decoder_pool import DecoderPool
        from actors.group import ActorGroup
        from actors.reward_models import RewardGroup
        from actors.rollout_engine import RolloutEngineActor, Weights
        from actors.trainer import TrainerGroup
        from uniar_ray.data import PromptSampler, load_dataset

        self.cfg = cfg
        r = cfg.rollout
        self.rollout_group = ActorGroup(RolloutEngineActor, r.num_actors, {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
                                        cfg.model, r)
        self.decoder = DecoderPool(cfg.decoder)
        self.rewards = RewardGroup(cfg.rewards)
        self.trainer = TrainerGroup(cfg.model, cfg.grpo, cfg.trainer, cfg.steps)
        d = cfg.data
        dataset = load_dataset(d.path, seed=d.seed, prompt_key=d.prompt_key, skip_bad_lines=d.skip_bad_lines)
        dataset.records = check_grpo_inputs(dataset.records, cfg)  # model files, prompt and AR size limits
        print(f"[grpo] data: {dataset.summary()}", flush=True)
        self.sampler = PromptSampler(dataset.records, d.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
        self.metrics = _Metrics()
        self.last_batch = self.last_images = None
        self.last_reasons: list[str] = []  # why the last step's samples were excluded (their own causes only)
        self.weights = Weights(0)  # the policy the engines must sample with: model.path until the first sync
        self._pending = None  # the background stages 1-4 (one_step mode)
        self._data_before: dict[int, dict] = {}  # step -> sampler position before its prompts were drawn
        self._prefetched = None  # (step, object refs of its roll-out) while one_step has one in flight
        self.nodes_at_start = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

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

    def rollout(self, step: int):
        records, reqs = self._requests(step)
        results = self.rollout_group.map("generate", reqs, self.weights, timeout_s=self.cfg.rollout.timeout_s)
        return _Batch.build(records, reqs, results, self.cfg.grpo.num_generations)

    def collect(self, step: int, refs=None, records=None, reqs=None):
        """Stages 1-4 of a step: roll-out (or wait for one already submitted), decode, score."""
        m: dict[str, float] = {}
        with timed(m, "rollout"):  # 1-2. sample prompts, roll out G per prompt
            if refs is None:
                batch = self.rollout(step)
            else:
                results = [x for part in ray.get(refs, timeout=self.cfg.rollout.timeout_s) for x in part]
                batch = _Batch.build(records, reqs, results, self.cfg.grpo.num_generations)
        m["rollout/weight_version"] = min(r.weight_version for r in batch.rollouts)
        with timed(m, "decode"):  # 3. bits -> images (retried; failures exclude their group)
            images = self.decode(batch)
        with timed(m, "score"):  # 4. rewards in parallel, routed by task, weighted nansum
            self.score(batch, images, m)
        return batch, images, m

    def prefetch(self, step: int, rollouts: list | None = None):
        """Submit step ``step``'s roll-out now (ordered before any later weight update), finish 1-4 in a thread.
        rollouts: that roll-out already done (saved in the checkpoint a resume starts from): decode and score it."""
        from actors.group import split_even

        records, reqs = self._requests(step)
        if rollouts is None:
            shards = split_even(reqs, len(self.rollout_group.actors))
            refs = [a.generate.remote(s, self.weights) for a, s in zip(self.rollout_group.actors, shards) if s]
        else:
            if [r.request_id for r in rollouts] != [q.request_id for q in reqs]:
                raise RuntimeError(f"the checkpoint's prefetched roll-out is not step {step}'s (other requests): "
                                   "was data.* or grpo.num_generations changed? resume with the same config")
            refs = [ray.put(rollouts)]
        self._prefetched = (step, refs)
        self._pending = in_background(self.collect, step, refs, records, reqs)
        return self._pending

    def data_state(self, step: int) -> dict:
        """The sampler position to resume at ``step`` from: before its prompts were drawn, also when a one_step
        prefetch has drawn them already."""
        return self._data_before.get(step) or self.sampler.state_dict()

    def prefetched_rollouts(self, step: int) -> list | None:
        """Step ``step``'s roll-out if one_step submitted it before the update (waits for it), else None."""
        if self._prefetched is None or self._prefetched[0] != step:
            return None
        results = [x for part in ray.get(self._prefetched[1]) for x in part]
        return results if all(isinstance(r, Rollout) for r in results) else None

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
    def sync_weights(self, version: int) -> None:
        """Trainer rank 0 puts the new weights into its object store; the driver hands the reference on (the
        engines fetch the tensors from rank 0's node, never through this process). An engine that is down now
        loads them before its next roll-out (``generate`` gets ``self.weights``)."""
        self.weights = self.trainer.publish_weights(version)
        refs = self.rollout_group.broadcast("update_weights", self.weights.ref, version)
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=self.cfg.rollout.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                print(f"[grpo] rollout engine {i} did not take weights version {version} "
                      f"({type(e).__name__}); it loads them before its next roll-out", file=sys.stderr, flush=True)

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

    def close(self, join_timeout_s: float = 30.0) -> None:
        """Kill every actor first, so that a background step waiting on one fails at once instead of waiting
        (or spinning on a pool that is gone), then join that step, then release the pools."""
        actors = [*self.rollout_group.actors, *self.decoder.actors, *self.trainer.actors,
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
    from jobs import entry

    entry.run(main, "grpo")
