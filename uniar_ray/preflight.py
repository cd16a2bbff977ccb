"""Checks first: everything a job can check without loading weights, done before Ray starts, by the same code in the
job and in ``--plan`` (one function per job).

    cfg = preflight.resolve_paths(cfg)          # GRPO: relative paths made absolute once, by the driver
    checked = preflight.grpo(cfg)               # raises ConfigError / DataError / LimitError / OSError (user errors)
    parts = Parts(cfg, checked)
    checked = preflight.grpo(cfg, here=False)   # --plan --cluster-file: what is not on this machine becomes a note

What is checked, by job:
- GRPO: the config's combinations (``uniar_ray.config.feasibility``, also at load time), this machine against what
  runs on it (the driver's memory for a step; the actors' devices, packages and CPUs/GPUs when they run in an
  embedded local Ray), the data file or mix (every entry, path and ratio), the model's, the
  reference's, the decoder's and every reward model's files, the prompts against ``data.max_prompt_tokens``, the AR
  size against the model's and the decoder's config.json. (The run folder is checked as it is opened, also before
  Ray: jobs/grpo_run.py.)
- eval (``jobs.eval.make_plan``, also before Ray): the same machine checks and the output folder; make_plan adds the
  prompt file, the model and decoder files and the limits.
- sweep: every cell's eval config, the checkpoints (``grpo_run``'s included) and the output folder.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from uniar_ray.config import ConfigError
from uniar_ray.config.feasibility import environment_problems

GIB = 2**30
TINY = ("", "tiny")


@dataclasses.dataclass
class Checked:
    """What the GRPO preflight read (the dataset, its prompts cut to the limit) and what it could not check here."""

    dataset: Any = None  # uniar_ray.data.RLDataset, or None when its file is not on this machine (a plan only)
    train: list = dataclasses.field(default_factory=list)  # its prompts the run trains on
    val: list = dataclasses.field(default_factory=list)  # the validation prompts (held out, or validation.prompt_file)
    notes: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


def resolve_paths(cfg: Any) -> Any:
    """The GRPO config with every relative path an actor or the driver opens made absolute against the driver's
    working directory, once. Actors on other nodes run in other working directories (``ray job submit`` unpacks the
    job's files per node), so a relative path would name a different folder on each."""
    def absolute(p: str) -> str:
        return p if p in TINY or Path(p).is_absolute() else str(Path(p).resolve())

    rewards = {name: dataclasses.replace(spec, model_path=absolute(spec.model_path),
                                         clip_path=absolute(spec.clip_path), checkpoint=absolute(spec.checkpoint))
               for name, spec in cfg.rewards.models.items()}
    return dataclasses.replace(
        cfg, run_dir=absolute(cfg.run_dir), model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
        decoder=dataclasses.replace(cfg.decoder, path=absolute(cfg.decoder.path)),
        grpo=dataclasses.replace(cfg.grpo, ref_model_path=absolute(cfg.grpo.ref_model_path)),
        rewards=dataclasses.replace(cfg.rewards, models=rewards))


def grpo(cfg: Any, here: bool = True) -> Checked:
    """Every check of a GRPO run that loads no weights. ``here``: the job, or a plan of the cluster it would run on
    (strict: what is missing is an error); False: a plan against a described cluster, whose files may live on that
    cluster only (what is missing here becomes a note; what is here is checked all the same)."""
    if here:
        problems = environment_problems(cfg, actors_here=not cfg.cluster.address) + driver_memory_problems(cfg)
        if problems:  # (the run folder is checked as it is opened, still before Ray: jobs/grpo_run.py)
            raise ConfigError("\n".join(problems))
    if here or Path(cfg.model.path).exists():  # else the plan sizes the published model, and says so
        model_folder(cfg.model.path, "model.path")
    notes: list[str] | None = None if here else []
    out = grpo_data(cfg, notes)
    _reward_files(cfg, notes)
    out.notes = notes or []
    return out


def grpo_data(cfg: Any, notes: list[str] | None = None) -> Checked:
    """The run's prompts as the run will use them: the data file or mix, each prompt against the limits (and the AR
    size against the model's and decoder's config.json), split into training and validation prompts. ``notes``: a
    plan against another cluster, where what is not on this machine is noted instead of refused."""
    from uniar_ray.data import split_prompts
    from uniar_ray.limits import check_grpo_inputs

    out = Checked(dataset=_dataset(cfg, notes))
    if out.dataset is None:  # sizes still checked against the config files
        check_grpo_inputs([], cfg, notes)
        return out
    out.dataset.records = check_grpo_inputs(out.dataset.records, cfg, notes)
    out.train, out.val = split_prompts(cfg, out.dataset.records)  # a hold-out too large, a bad prompt file
    return out


def _dataset(cfg: Any, notes: list[str] | None):
    from uniar_ray.data import DataError, load_dataset, resolve_data_path

    d = cfg.data
    if notes is not None:
        try:
            resolve_data_path(d.path)
        except DataError as e:  # the file itself is elsewhere; a file that is here is checked in full below
            notes.append(f"data.path: not checked ({e}); the job checks it before Ray starts")
            return None
    return load_dataset(d.path, seed=d.seed, prompt_key=d.prompt_key, skip_bad_lines=d.skip_bad_lines)


def _reward_files(cfg: Any, notes: list[str] | None) -> None:
    """Each reward model's folders (and HPS's checkpoint file) exist: a missing one fails here, not in its actor."""
    for name, spec in cfg.rewards.models.items():
        missing = []
        for field, kind in (("model_path", "folder"), ("clip_path", "folder"), ("checkpoint", "file")):
            path = getattr(spec, field)
            if path in TINY or (Path(path).is_dir() if kind == "folder" else Path(path).is_file()):
                continue
            if notes is None:
                what = "no such file or folder" if not Path(path).exists() else f"not a {kind}"
                raise ConfigError(f"rewards.models.{name}.{field}={path}: {what} (reward model files must be readable "
                                  "by the driver: local, or on storage the cluster shares)")
            missing.append(field)
        if missing:
            notes.append(f"rewards.models.{name}: {', '.join(missing)} not on this machine, not checked; the job "
                         "checks them before Ray starts")


def model_folder(path: str, key: str) -> None:
    """A UniAR AR model is at ``path`` (its config.json), or a ConfigError naming ``key``."""
    if path == "tiny":
        return
    from uniar_ray.model.loading import resolve_ar_folder

    try:
        resolve_ar_folder(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}={path}: {e} (a UniAR checkpoint root with ar_model/, or the AR folder; or tiny)") \
            from None


def sample_bytes(cfg: Any) -> int:
    """What the driver holds per sample of a step: the roll-out (packed bits, a float32 log-prob per bit) and its
    decoded image."""
    from uniar_ray.model.prompts import DOWNSAMPLE

    n = (cfg.ar_height // DOWNSAMPLE) * (cfg.ar_width // DOWNSAMPLE)
    bits = n * 4 * 4 * 64
    side = cfg.decode_upsampling_ratio
    return bits // 8 + bits * 4 + int(cfg.ar_height * side) * int(cfg.ar_width * side) * 3


def driver_memory_gib(cfg: Any) -> float:
    """The driver's memory for the steps in flight: the current batch and the last one (kept for the grid), plus the
    prefetched one with ``async_mode: one_step``."""
    samples = cfg.data.prompts_per_step * cfg.grpo.num_generations
    return samples * sample_bytes(cfg) * (3 if cfg.async_mode == "one_step" else 2) / GIB


def driver_memory_problems(cfg: Any) -> list[str]:
    import psutil

    need, have = driver_memory_gib(cfg), psutil.virtual_memory().available / GIB
    if need <= have:
        return []
    samples = cfg.data.prompts_per_step * cfg.grpo.num_generations
    return [f"{samples} samples per step (data.prompts_per_step x grpo.num_generations) at {cfg.ar_height}x"
            f"{cfg.ar_width} need ~{need:.1f} GiB in the driver (roll-outs with per-bit log-probs, and images), over "
            f"the {have:.1f} GiB this machine has available; lower data.prompts_per_step or grpo.num_generations"]


# ----------------------------------------------------------------------------------------------------------------
# Output folders, eval, sweep
# ----------------------------------------------------------------------------------------------------------------


def check_output_folder(folder: Path, key: str) -> None:
    """``folder`` can be created and written: not a file, and the nearest existing folder on the way is a writable
    folder (not a file: an out_dir under a file fails here, not after the work)."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():  # the folder itself, or a part of its path
        raise ConfigError(f"{key}={folder}: {existing} is a file, not a folder: choose another {key}")
    if not os.access(existing, os.W_OK):
        raise PermissionError(13, f"cannot write there ({key}={folder})", str(existing))


def eval_checks(cfg: Any, out_dir: Path) -> None:
    """The eval job's checks beyond its plan's (``jobs.eval.make_plan``): this machine, the scorer's model folders
    (loaded in the driver after every image is made), and the output folder."""
    problems = environment_problems(cfg, actors_here=not cfg.cluster.address)
    sc = cfg.scoring
    if sc.enabled and cfg.benchmark.name == "geneval" and sc.geneval_detector:
        for key in ("geneval_detector", "geneval_clip"):
            path = getattr(sc, key)
            if path not in TINY and not Path(path).is_dir():
                problems.append(f"scoring.{key}={path}: no such folder (a local transformers folder, or tiny)")
    if problems:
        raise ConfigError("\n".join(problems))
    check_output_folder(out_dir, "out_dir")


def sweep(cfg: Any, checkpoints: dict, eval_configs: list) -> None:
    """A sweep's checks before Ray: its output folder, each checkpoint's model folder, each cell's eval config
    (built by the caller, so its loading errors surface here) against this machine and its output folder."""
    check_output_folder(Path(cfg.out_dir), "out_dir")
    for name, model in checkpoints.items():
        model_folder(model.path, f"checkpoints.{name}.path")
    for run_cfg in eval_configs:
        eval_checks(run_cfg, Path(run_cfg.out_dir))
