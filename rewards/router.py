"""The reward router: routes samples to rewards by task and combines named rewards with weights (spec §7.3).

``RewardRouter(models, weights).score(batch)`` runs the rewards in this process; ``actors/reward_models.py`` runs the
same routing and ``combine`` across Ray actors. ``build_reward(name, spec)`` makes a reward from its config.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import numpy as np

from rewards.base import RewardBatch, RewardModel, RewardOutput, applies_to, reads_bits, run_reward
from uniar_ray.config import RewardConfig, RewardSpec

logger = logging.getLogger(__name__)

# The reference's routing: GenEval and OCR score only their own task's rows; every other reward scores every row.
DEFAULT_TASKS: dict[str, frozenset[str] | None] = {"geneval": frozenset({"geneval"}), "ocr": frozenset({"ocr"})}


def reward_tasks(spec: RewardSpec) -> frozenset[str] | None:
    if spec.tasks is not None:
        return frozenset(spec.tasks)
    return DEFAULT_TASKS.get(spec.kind)


def route(tasks: Sequence[str | None], reward_tasks_: frozenset[str] | None) -> list[int]:
    """Indices of the samples a reward applies to, in batch order."""
    return [i for i, t in enumerate(tasks) if applies_to(reward_tasks_, t)]


@dataclasses.dataclass
class RoutedScores:
    """All rewards over one batch and their weighted total.

    ``total[i]`` = sum over rewards of weight * score, NaN scores left out (the reference's nansum). Unlike the
    reference, a sample gets NaN and ``valid[i] = False`` instead of a silent 0 when no reward applied to it
    (``unscored``) or when a reward with a non-zero weight failed on it (``failed``: its reasons)."""

    per_reward: dict[str, np.ndarray]  # name -> [B] float64
    errors: dict[str, list[str | None]]  # name -> [B]
    weights: dict[str, float]
    total: np.ndarray  # [B] float64, NaN where not valid
    valid: np.ndarray  # [B] bool
    unscored: list[int]
    failed: dict[int, list[str]]
    metrics: dict[str, float]
    extras: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    details: dict[str, list[dict | None]] = dataclasses.field(default_factory=dict)  # name -> [B] JSON objects

    def matrix(self) -> np.ndarray:
        """[B, F] in ``weights`` order (the reference's ``rewards_per_func``)."""
        return np.stack([self.per_reward[n] for n in self.weights], axis=1)


def combine(outputs: Mapping[str, RewardOutput], weights: Mapping[str, float]) -> RoutedScores:
    names = list(weights)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(f"no output for rewards {missing}")
    n = len(outputs[names[0]].scores) if names else 0
    total = np.zeros(n)
    applied = np.zeros(n, dtype=bool)
    failed: dict[int, list[str]] = {}
    metrics: dict[str, float] = {}
    for name in names:
        out, w = outputs[name], float(weights[name])
        ok = ~np.isnan(out.scores)
        total[ok] += w * out.scores[ok]
        applied |= ok
        for i, err in enumerate(out.errors):
            if err is not None and w != 0:  # a zero-weight reward only logs; its failure excludes nothing
                applied[i] = True
                failed.setdefault(i, []).append(f"{name}: {err}")
        metrics.update(out.metrics())
    unscored = [i for i in range(n) if not applied[i]]
    valid = applied.copy()
    valid[list(failed)] = False
    total[~valid] = math.nan
    if unscored:
        logger.warning("rewards: %d sample(s) had no applicable reward and are not scored: %s", len(unscored),
                       unscored)
    if failed:
        logger.warning("rewards: %d sample(s) failed a reward and are excluded: %s", len(failed),
                       {i: r for i, r in list(failed.items())[:8]})
    good = total[valid]
    metrics.update({
        "reward/total/mean": float(good.mean()) if good.size else math.nan,
        "reward/total/std": float(good.std()) if good.size else math.nan,
        "reward/valid": float(valid.sum()),
        "reward/unscored": float(len(unscored)),
        "reward/failed": float(len(failed)),
    })
    return RoutedScores({k: outputs[k].scores for k in names}, {k: outputs[k].errors for k in names}, dict(weights),
                        total, valid, unscored, failed, metrics, {k: outputs[k].extras for k in names},
                        {k: outputs[k].details or [None] * n for k in names})


class RewardRouter:
    """Rewards in this process, one after another (tests, CPU demos). Weights default to 1 each."""

    def __init__(self, models: Mapping[str, RewardModel], weights: Mapping[str, float] | None = None):
        if not models:
            raise ValueError("no rewards configured")
        self.models = dict(models)
        self.weights = {name: 1.0 for name in self.models} if weights is None else dict(weights)
        if set(self.weights) != set(self.models):
            raise ValueError(f"weights {sorted(self.weights)} do not match rewards {sorted(self.models)}")

    def score(self, batch: RewardBatch) -> RoutedScores:
        outputs = {name: run_reward(model, batch) for name, model in self.models.items()}
        return combine(outputs, self.weights)


def load_class(path: str):
    """``package.module:ClassName`` -> the class, imported here (in a reward actor: in its runtime_env)."""
    import importlib

    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"class {path}: cannot import {module_name} ({e}); is it installed in this reward's "
                          "environment (runtime_env py_modules / pip)?") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"class {path}: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                          f"{attr}") from None


def build_reward(name: str, spec: RewardSpec) -> RewardModel:
    """Make one reward from its spec (heavy imports happen here, inside the process that owns the reward)."""
    from rewards.tiny import resolve

    kind = spec.kind or name
    tasks = reward_tasks(dataclasses.replace(spec, kind=kind))
    if spec.class_path:
        model = load_class(spec.class_path)(**spec.options)
        if reads_bits(model) != spec.reads_bits:
            raise TypeError(f"reward {name}: class {spec.class_path} reads {'bits' if reads_bits(model) else 'pixels'}"
                            f" (its inputs attribute) but the config says inputs: {spec.inputs}")
        if not callable(getattr(model, "score", None)):
            raise TypeError(f"reward {name}: class {spec.class_path} has no score(batch) method "
                            "(see rewards/base.py RewardModel)")
    elif spec.backend == "http":
        from rewards.http import HttpReward

        model = HttpReward.from_spec(name, spec)
    elif kind == "self_judge":
        from rewards.self_judge import SelfJudgeReward

        model = SelfJudgeReward.from_spec(spec)
    elif kind == "ocr":
        from rewards.ocr import OcrReward

        model: RewardModel = OcrReward()
    elif kind == "geneval":
        from rewards.geneval import GenEvalReward

        model = GenEvalReward.from_paths(resolve(spec.model_path, "mask2former"), resolve(spec.clip_path, "clip"),
                                         device=spec.device, batch_size=spec.batch_size)
    elif kind in ("hps", "pickscore"):
        from rewards.preference import PreferenceReward

        model = PreferenceReward.from_paths(kind, resolve(spec.model_path, "clip"), checkpoint=spec.checkpoint or None,
                                            device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size)
    elif kind == "judge":
        from rewards.judge import JudgeReward

        model = JudgeReward.from_spec(dataclasses.replace(spec, model_path=resolve(spec.model_path, "qwen2vl")))
    elif kind in ("brightness", "target_color"):
        from rewards.programmatic import BrightnessReward, TargetColorReward

        cls = BrightnessReward if kind == "brightness" else TargetColorReward
        model = cls(target=spec.target, delay_s=spec.delay_s)
    else:
        raise ValueError(f"reward {name!r}: unknown kind {kind!r}")
    model.name = name
    model.tasks = tasks
    return model


def required_paths(spec: RewardSpec) -> list[str]:
    """The local files and folders a reward needs on the machines its actors run on (checked before a run starts):
    model folders and checkpoints (not ``tiny``), and the local folders of its runtime_env (py_modules entries and
    working_dir that are not URIs). Cheap: reads nothing."""
    paths = [p for p in (spec.model_path, spec.clip_path, spec.checkpoint) if p and p not in ("tiny", "tiny-detr")]
    env = spec.runtime_env or {}
    local = [m for m in env.get("py_modules", []) if isinstance(m, str) and "://" not in m]
    if isinstance(env.get("working_dir"), str) and "://" not in env["working_dir"]:
        local.append(env["working_dir"])
    return paths + local


def build_router(cfg: RewardConfig) -> RewardRouter:
    return RewardRouter({name: build_reward(name, spec) for name, spec in cfg.models.items()}, cfg.weights)
