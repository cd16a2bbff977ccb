"""GRPO training of a UniAR policy on Ray: roll out, decode, score, advantages, update, sync weights.

    python -m jobs.grpo --config configs/grpo_demo.yaml [grpo.beta=0.0 steps=20 ...] [--resume [RUN_OR_CKPT]]
    python -m jobs.grpo --plan --config configs/grpo_uniar_rl.yaml [--cluster-file cluster.yaml]
    ray job submit --working-dir . -- python -m jobs.grpo --config configs/grpo_uniar_rl.yaml cluster.address=auto
The default config is the embedded demo: local Ray, tiny policy, a tiny decoder whose colours follow the bits, a
redness reward, CPU.
Prints the run directory at the end (metrics.jsonl, validation.jsonl, reward_curve.png, grids/,
rollouts/step-N/index.html with rollouts.dump_every, checkpoints/step-N/{model,trainer}).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import ray

from jobs import entry, start_ray
from jobs.grpo_parts import SECONDARY_EXCLUSION, Parts, timed
from jobs.grpo_run import (check_run_folder, last_checkpoint_note, open_run, record_placement, resume,
                           save_checkpoint)
from jobs.grpo_validation import Validator
from jobs.grpo_validation import summary_line as validation_summary
from uniar_ray import gallery, grpo, preflight
from uniar_ray.config import GRPORunConfig, parse_cli, to_dict
from uniar_ray.files import atomic_write
from uniar_ray.runlog import RunDir
from uniar_ray.tracking import Tracker


def main(argv: list[str] | None = None):
    cfg, args = parse_cli(GRPORunConfig, argv, default_config="configs/grpo_demo.yaml", add_flags=_flags)
    cfg = preflight.resolve_paths(cfg)  # once, here: actors on other nodes run in other working directories
    if isinstance(args.resume, str):
        args.resume = str(Path(args.resume).resolve())
    if args.plan:
        return show_plan(cfg, args.cluster_file)
    checked = preflight.grpo(cfg)  # everything that loads no weights, before Ray and the folder
    run, candidates = open_run(cfg, args.resume)  # a resume that would break the run stops here, nothing written
    started = False  # the folder is this job's from here until the end, whatever ends it
    try:
        started = start_ray(cfg)
        return train(cfg, checked, run, candidates, resumed=bool(args.resume))
    finally:
        entry.close_all("grpo", lambda: started and ray.shutdown(), run.close)


def train(cfg: GRPORunConfig, checked, run: RunDir, candidates: list, resumed: bool):
    """The step loop, from the actors' start to the summary. A stop signal ends it in one line (status 143 / 130)
    wherever it is (a step, a save, the prefetch, a validation); the actors are stopped and the last complete
    checkpoint is named."""
    parts = Parts(cfg, checked)  # rollout engines, decoder pool, reward pools, trainers, data sampler
    budget = grpo.FailureBudget(cfg.grpo.max_excluded_fraction, cfg.grpo.failure_window)
    trained = 0
    step = 0
    tracker = None
    try:
        check_run_folder(run, parts)  # one folder for the driver and every rank, or stop naming the node
        step, prefetched = resume(run, parts, candidates) if resumed else (0, None)
        record_placement(run, parts)
        first_step = step
        config = json.dumps(to_dict(cfg), indent=2)
        atomic_write(run.path / "config.json", lambda f: f.write(config), "w")  # once the run is really this one
        tracker = Tracker(cfg.tracking, run.path, to_dict(cfg), start_step=step)
        # one_step: step's roll-out is submitted now; after a resume it is the one the checkpoint saved
        pending = parts.prefetch(step, prefetched) if cfg.async_mode == "one_step" or prefetched else None
        validator = Validator(cfg, parts.val_records, run)
        for step in range(step, cfg.steps):
            entry.raise_if_stopped()
            val = validator.at(parts, step, pending)  # held-out prompts, the policy this step samples from
            metrics, pending = grpo_step(cfg, parts, step, pending)
            metrics.update(val)
            run.log_metrics(metrics)
            tracker.log(metrics)
            parts.export(metrics)
            print(format_line(metrics), flush=True)
            if step == 0 or (step + 1) % cfg.grid_every == 0 or step + 1 == cfg.steps:  # first, every k, last
                tracker.log_grid(step, parts.save_grid(run, step))
            if gallery.due(step, cfg.rollouts.dump_every, cfg.steps):  # every sample: PNG, record, gallery page
                tracker.log_samples(step, gallery.dump(run.path / "rollouts", step, parts.last_batch,
                                                       parts.last_images), parts.last_images)
            trained += not metrics["skipped_update"]
            if not metrics["skipped_update"] and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(run, parts, step + 1)  # a step that changed nothing is not worth a checkpoint
            stop = budget.record(metrics["excluded_groups_all"], metrics["groups"], parts.last_reasons)
            if stop:
                raise SystemExit(f"[grpo] step {step}: stopping: {stop}. {last_checkpoint_note(run)}")
        entry.raise_if_stopped()
        final = validator.at_end(parts)  # the trained policy: a row of its own, step = cfg.steps
        if final:
            run.log_metrics(final)
            tracker.log(final)
            parts.export(final)
        record_placement(run, parts, digests=True)
    except FloatingPointError as e:  # a NaN loss: stop with a message, keep the last good checkpoint
        raise SystemExit(f"[grpo] {e}") from None
    except ray.exceptions.RayError as e:  # when a node went away, say so in one line instead of a remote traceback
        lost = parts.lost_nodes()
        if not lost:
            raise
        raise SystemExit(f"[grpo] lost Ray node(s) {', '.join(lost)} ({type(e).__name__}); stopping. "
                         f"{last_checkpoint_note(run)} Bring the node(s) back and rerun with --resume.") from None
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM (jobs/entry.py), at any point of a step, a save, a prefetch
        print(f"[grpo] {entry.describe_stop(e)} at step {step}; shutting down. {last_checkpoint_note(run)}",
              file=sys.stderr, flush=True)
        raise SystemExit(entry.exit_status(e)) from None
    finally:  # each part runs even if one fails; a failure here never hides the error that ended the run
        entry.close_all("grpo", *((run.plot_rewards, tracker.close) if tracker is not None else ()), parts.close)
    if not trained and first_step < cfg.steps:  # every step was skipped: the job did not do its work
        raise SystemExit(f"[grpo] no step of this run updated the model (every prompt group was excluded); see the "
                         f"per-step causes above. {last_checkpoint_note(run)}")
    summarize(run)
    print(run.path)
    return run.path


def summarize(run: RunDir) -> None:
    """One line a person can read at the end: how the reward moved (first 3 vs last 3 steps), against the per-step
    noise of the mean reward."""
    rows = [m["reward_mean"] for m in run.read_metrics() if m.get("reward_mean") is not None]
    if len(rows) >= 2:
        k = min(3, len(rows) // 2)
        first, last = sum(rows[:k]) / k, sum(rows[-k:]) / k
        noise = step_noise(rows)
        if not math.isfinite(noise):  # second differences of fewer than 4 steps: no spread to measure
            against = f"per-step noise not estimated ({len(rows)} steps; it needs 4 or more)"
        elif noise <= 1e-9 * max(1.0, *map(abs, rows)):  # rounding of an exactly linear curve
            against = "per-step noise 0 (the curve is a straight line)"
        else:
            against = f"per-step noise {noise:.4f} (rise {(last - first) / noise:.1f}x the noise)"
        print(f"[grpo] mean reward: first {k} steps {first:.4f}, last {k} steps {last:.4f} ({last - first:+.4f}); "
              f"{against}; curve: {run.path / 'reward_curve.png'}", flush=True)
    val = validation_summary(run.read_metrics())
    if val:
        print(val, flush=True)


def step_noise(values: list[float]) -> float:
    """Per-step noise of a curve: std of its second differences / sqrt(6), which is the std of white noise added
    to a curve with a locally linear trend (the trend itself cancels; step-to-step differences would count it)."""
    second = [values[i + 1] - 2 * values[i] + values[i - 1] for i in range(1, len(values) - 1)]
    return statistics.stdev(second) / math.sqrt(6) if len(second) >= 2 else math.nan


def grpo_step(cfg: GRPORunConfig, parts: Parts, step: int, pending):
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
    parts.last_reasons += batch.dropped_reasons
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


def assign_advantages(cfg: GRPORunConfig, batch, m: dict) -> None:
    """Group advantages (uniar_ray.grpo); a group with a failed sample (roll-out, decode, reward) is excluded whole
    and counted."""
    import torch

    if not batch.rollouts:  # every roll-out failed: every group is out
        m.update(reward_mean=math.nan, excluded_groups=batch.dropped, excluded_groups_all=batch.dropped,
                 groups=batch.dropped)
        return
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


def format_line(m: dict) -> str:
    return (f"[grpo] step {m['step']:>4}  reward {m.get('reward_mean', float('nan')):.4f}  "
            f"loss {m.get('train/loss', float('nan')):+.4f}  kl {m.get('train/kl', float('nan')):.4f}  "
            f"{m['step_time_s']:.1f}s" + ("  (not updated: no group scored)" if m.get("skipped_update") else ""))


def _flags(parser) -> None:
    parser.add_argument("--plan", action="store_true",
                        help="validate the config, place every actor and estimate its memory; load nothing, train nothing")
    parser.add_argument("--cluster-file", default="", help="with --plan: a YAML cluster description instead of the "
                        "cluster this config would run on")


def show_plan(cfg: GRPORunConfig, cluster_file: str) -> None:
    """The job's own preflight, then every actor placed and sized. Against a described cluster (``--cluster-file``)
    the files that live on that cluster only are noted instead of checked; every problem is one line, exit 2."""
    from uniar_ray.plan import Cluster, PlanError, plan_run

    checked = preflight.grpo(cfg, here=not cluster_file)
    try:
        cluster = Cluster.from_file(cluster_file) if cluster_file else Cluster.detect(cfg.cluster)
        notes = checked.notes + [f"driver: ~{preflight.driver_memory_gib(cfg):.1f} GiB for the steps in flight "
                                 "(roll-outs and images), on the node that runs the job"]
        table = plan_run(cfg, cluster, notes)
    except PlanError as e:  # what does not fit (and the table so far), or a cluster that cannot be read
        print(f"[plan] {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table)


if __name__ == "__main__":
    entry.run(main, "grpo")
