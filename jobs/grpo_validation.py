"""Validation during GRPO training: a fixed set of held-out prompts, sampled with fixed seeds through the run's own
actors (``Parts.generate``, then the step's ``decode`` and ``score`` glue) and scored by the run's rewards.

    train, held = split_prompts(cfg, records)            # in Parts: held-out prompts never reach the sampler
    validator = Validator(cfg, parts.val_records, run)   # validations a resumed run already has are reused
    metrics.update(validator.at(parts, step, pending))   # before step `step` (not in its time): the policy it samples
    row = validator.at_end(parts)                        # the final policy, a metrics row of its own
    results = CheckpointScorer(run_cfg).cell(model_cfg, out_dir)   # jobs/sweep.py: the same for a saved checkpoint
Each validation is one line of ``validation.jsonl`` (step, settings identity, figures) and ``val/*`` keys in the
metrics row of its step: ``val/<reward>/mean`` per reward, ``val/reward_mean`` (weighted total), counts and time.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from jobs.grpo_parts import Parts, _Batch, decoder_pool
from uniar_ray.config import GRPORunConfig, ModelConfig
from uniar_ray.data import split_prompts
from uniar_ray.rollout import GenerationRequest
from uniar_ray.runlog import RunDir

VALIDATION = "validation"  # the sweep's name for "the GRPO run's own validation" (jobs/sweep.py)


def held_out_prompts(cfg: GRPORunConfig) -> list:
    """The validation prompts of a run, as its ``Parts`` picked them (the sweep re-creates them from the config)."""
    from uniar_ray.data import load_dataset
    from uniar_ray.limits import check_grpo_inputs

    d = cfg.data
    records = load_dataset(d.path, seed=d.seed, prompt_key=d.prompt_key, skip_bad_lines=d.skip_bad_lines).records
    return split_prompts(cfg, check_grpo_inputs(records, cfg))[1]


def settings_identity(cfg: GRPORunConfig, records: list) -> str:
    """A short hash of what makes two validations comparable: the starting policy, the prompts, seeds, sampling,
    decoding and rewards (not ``every`` or ``at_start``, which only say when)."""
    v = cfg.validation
    same = {"model": [cfg.model.path, cfg.model.tiny_seed, cfg.model.dtype],
            "prompts": [[r.prompt, r.task] for r in records], "num_generations": v.num_generations, "seed": v.seed,
            "temperature": v.temperature or cfg.grpo.temperature, "ar": [cfg.ar_height, cfg.ar_width],
            "decode": [cfg.decode_seed, cfg.grpo.seed, cfg.grpo.decode_num_inference_steps, cfg.grpo.decode_cfg_scale,
                       cfg.decode_upsampling_ratio, dataclasses.asdict(cfg.decoder)["path"]],
            "rewards": dataclasses.asdict(cfg.rewards)}
    return hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()[:16]


def requests(cfg: GRPORunConfig, records: list) -> list[GenerationRequest]:
    """``num_generations`` requests per prompt, G consecutive per prompt (as a step's), with seeds that depend on
    the prompt's place and the sample only: every validation samples the same noise, so only the policy changes."""
    v = cfg.validation
    g, temperature = v.num_generations, v.temperature or cfg.grpo.temperature
    return [GenerationRequest(rec.prompt, cfg.ar_height, cfg.ar_width, seed=v.seed * 1_000_003 + p * g + k,
                              temperature=temperature, request_id=f"val-p{p}-g{k}", return_logprobs=False)
            for p, rec in enumerate(records) for k in range(g)]


def validate(cfg: GRPORunConfig, parts: Any, records: list) -> dict[str, float]:
    """Sample, decode and score the validation prompts with ``parts`` (``generate``, ``decode``, ``score``: the
    training run's ``Parts``, or a ``CheckpointScorer``); the ``val/*`` figures."""
    t0 = time.perf_counter()
    reqs = requests(cfg, records)
    batch = _Batch.build(records, reqs, parts.generate(reqs), cfg.validation.num_generations)
    images = parts.decode(batch)
    parts.score(batch, images, {})
    m = figures(cfg, batch.rollouts)
    m["val/time_s"] = time.perf_counter() - t0
    return m


def figures(cfg: GRPORunConfig, rollouts: list) -> dict[str, float]:
    """Per-reward means (over the samples each reward applies to) and the weighted total (over the samples any
    reward applies to), with the step's own statistics (``grpo.group_advantages``); failed samples are left out
    and counted."""
    import torch

    from uniar_ray import grpo

    names = list(cfg.rewards.weights)
    R = torch.tensor([[r.rewards.get(n, math.nan) for n in names] for r in rollouts], dtype=torch.float64)
    failed = torch.tensor([bool(r.excluded) for r in rollouts])
    res = grpo.group_advantages(R, [cfg.rewards.weights[n] for n in names], cfg.validation.num_generations, "none",
                                all_nan_rewards=cfg.grpo.all_nan_rewards, exclude=failed, func_names=names)
    m = {f"val/{n}/mean": res.metrics[f"rewards/{n}/mean"] for n in names}
    m.update({"val/reward_mean": res.metrics["reward"], "val/num_samples": float((~res.excluded).sum()),
              "val/num_failed": float(failed.sum())})
    return m


def format_line(step: int, m: dict[str, float], note: str = "") -> str:
    per = "  ".join(f"{k[len('val/'):-len('/mean')]} {_fmt(v)}" for k, v in m.items()
                    if k.endswith("/mean") and k != "val/reward_mean")
    return (f"[grpo] val  {step:>4}  reward {_fmt(m.get('val/reward_mean'))}  ({per})  "
            f"{int(m.get('val/num_samples', 0))} samples, {int(m.get('val/num_failed', 0))} failed  "
            f"{m.get('val/time_s', math.nan):.1f}s{note}")


def _fmt(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


class Validator:
    """When to validate and what was validated already: a validation of step s measures the policy after s updates
    (the one step s samples from), before step s, at step 0 (``at_start``), every ``every`` steps and after the
    last step. Lines of ``validation.jsonl`` with these settings are reused, not redone (a resumed run keeps the
    validations up to its checkpoint's step, ``RunDir.truncate_metrics``)."""

    def __init__(self, cfg: GRPORunConfig, records: list, run: RunDir):
        self.cfg, self.records, self.run = cfg, list(records), run
        self.identity = settings_identity(cfg, self.records)
        self.recorded: dict[int, dict[str, float]] = {}
        path = run.validation_path
        for line in path.read_text().splitlines() if path.exists() else []:
            rec = json.loads(line) if line.strip() else {}
            if rec.get("identity") == self.identity:
                self.recorded[int(rec["step"])] = rec["metrics"]

    def due(self, step: int, final: bool = False) -> bool:
        v = self.cfg.validation
        if not (self.records and v.every):
            return False
        return final or (step % v.every == 0 and (step > 0 or v.at_start))

    def at(self, parts: Any, step: int, pending: concurrent.futures.Future | None = None,
           final: bool = False) -> dict[str, float]:
        """The ``val/*`` figures of step ``step``'s policy when a validation is due (else {}): recorded ones, or a
        validation now. ``pending``: a step's decode and score running in the background (one_step), waited for
        first, so that the decoder and reward pools never serve two callers at once."""
        if not self.due(step, final):
            return {}
        if step in self.recorded:
            m = dict(self.recorded[step])
            print(format_line(step, m, "  (recorded before the resume, not redone)"), flush=True)
            return m
        if pending is not None:
            concurrent.futures.wait([pending])
        m = validate(self.cfg, parts, self.records)
        self.recorded[step] = m  # written only once complete: an interrupted validation is redone on resume
        with open(self.run.validation_path, "a") as f:
            f.write(json.dumps({"step": step, "identity": self.identity,
                                "metrics": {k: _json(v) for k, v in m.items()}}) + "\n")
        print(format_line(step, m), flush=True)
        return m

    def at_end(self, parts: Any) -> dict[str, float]:
        """The final policy's row (``step`` = grpo steps, only ``val/*`` keys), or {} without validation."""
        m = self.at(parts, self.cfg.steps, final=True)
        return {"step": self.cfg.steps, **m} if m else {}


def summary_line(rows: list[dict[str, Any]]) -> str | None:
    """The run's validation reward from its first validation to its last, for the end-of-run summary."""
    val = [(m["step"], m["val/reward_mean"]) for m in rows if m.get("val/reward_mean") is not None]
    if len(val) < 2:
        return None
    (s0, v0), (s1, v1) = val[0], val[-1]
    return (f"[grpo] validation reward (held-out prompts): step {s0} {v0:.4f}, step {s1} {v1:.4f} "
            f"({v1 - v0:+.4f}) over {len(val)} validations")


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ----------------------------------------------------------------------------------------------------------------
# Saved checkpoints (jobs/sweep.py): the run's validation, once per checkpoint
# ----------------------------------------------------------------------------------------------------------------


class CheckpointScorer:
    """The actors a validation needs, outside the training run: rollout engines holding one checkpoint at a time,
    and the run's own decoder and reward pools (started at the first cell that is not read back). ``decode`` and
    ``score`` are the training loop's own glue, so a checkpoint scores as the run's validation of that step did."""

    decode = Parts.decode
    score = Parts.score

    def __init__(self, cfg: GRPORunConfig):
        self.cfg = cfg
        self.records = held_out_prompts(cfg)
        if not self.records:
            raise ValueError("sweep: benchmark 'validation' scores the GRPO run's held-out prompts, but the run holds "
                             "none out (its validation.holdout is 0 and validation.prompt_file is empty); list a "
                             "benchmark instead (benchmarks=[geneval])")
        self.decoder = self.rewards = self.rollout_group = None

    def generate(self, reqs: list[GenerationRequest]) -> list:
        from actors.rollout_engine import Weights

        return self.rollout_group.map("generate", reqs, Weights(0), timeout_s=self.cfg.rollout.timeout_s)

    def cell(self, model: ModelConfig, out_dir: Path) -> dict[str, Any]:
        """One sweep cell: ``results.json`` in ``out_dir`` (read back when it holds these settings and weights)."""
        import ray

        identity = {"kind": VALIDATION, "settings": settings_identity(self.cfg, self.records),
                    "model": weights_stamp(model.path)}
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            old = json.loads((out_dir / "results.json").read_text())
            if old.get("identity") == identity and old.get("complete"):
                return old
        except (OSError, ValueError):
            pass
        from actors.group import ActorGroup
        from actors.rollout_engine import RolloutEngineActor

        if self.decoder is None:
            from actors.reward_models import RewardGroup

            self.decoder, self.rewards = decoder_pool(self.cfg), RewardGroup(self.cfg.rewards)  # as the run's
        r = self.cfg.rollout
        mine = dataclasses.replace(self.cfg.model, path=model.path, dtype=model.dtype, device=model.device)
        self.rollout_group = ActorGroup(RolloutEngineActor, r.num_actors,
                                        {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}, mine, r)
        try:
            m = validate(self.cfg, self, self.records)
        finally:
            for a in self.rollout_group.actors:
                ray.kill(a, no_restart=True)
        results = self.results(m, identity, out_dir)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

    def results(self, m: dict[str, float], identity: dict, out_dir: Path) -> dict[str, Any]:
        """A sweep row's fields (jobs.sweep.table_row), like an eval run's results.json."""
        c, v = self.cfg, self.cfg.validation
        expected = len(self.records) * v.num_generations
        score = m["val/reward_mean"]
        return {
            "identity": identity, "benchmark": VALIDATION, "score": None if math.isnan(score) else score,
            "scores": {"scored": not math.isnan(score), "reason": "no sample could be scored",
                       **{k[len("val/"):]: _json(x) for k, x in m.items()}},
            "complete": m["val/num_failed"] == 0, "prompts": len(self.records), "samples_expected": expected,
            "samples_failed": int(m["val/num_failed"]), "seconds": round(m["val/time_s"], 3),
            "images_per_s": round(expected / max(m["val/time_s"], 1e-9), 4), "ar_size": f"{c.ar_height}x{c.ar_width}",
            "temperature": v.temperature or c.grpo.temperature, "cfg_scale": 1.0,
            "decoder_steps": c.grpo.decode_num_inference_steps, "out_dir": str(out_dir)}

    def close(self) -> None:
        for pool in (self.decoder, self.rewards):
            if pool is not None:
                pool.shutdown()


def weights_stamp(path: str) -> str:
    """Size and modification time of every file under a model folder (linked decoder folders not followed): a
    re-saved checkpoint is scored again."""
    root = Path(path)
    stat = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not Path(folder, d).is_symlink())
        for name in sorted(files):
            p = Path(folder, name)
            stat.append([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns])
    return hashlib.sha256(json.dumps([str(root.resolve()), stat]).encode()).hexdigest()[:16]
