"""A run directory: resolved config, metrics.jsonl (one object per step), reward-curve plot, rollout grids and
checkpoints with the driver's own state (step, data position, RNG).

    run = RunDir("runs/grpo-demo", resume=False)
    run.log_metrics({"step": 0, "reward_mean": 0.4, ...}); run.plot_rewards()
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniar_ray.files import atomic_write, naming


class RunDir:
    """``RunDir(path)`` only names the folder; ``open()`` creates it. A folder counts as used (a fresh run moves to
    ``<path>-<timestamp>`` instead) once it holds a metric line or a checkpoint: a start that failed before its
    first step leaves it reusable."""

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        if not resume and self.is_used():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            print(f"[run] {self.path} holds an earlier run; this one writes to {self.path.name}-{stamp} "
                  "(--resume continues the earlier one)", flush=True)
            self.path = self.path.with_name(f"{self.path.name}-{stamp}")  # never overwrite an earlier run
        self.metrics_path = self.path / "metrics.jsonl"
        self.validation_path = self.path / "validation.jsonl"  # one line per validation (jobs/grpo_validation.py)
        self.identity: dict[str, Any] | None = None  # the run's config + data fingerprint (set by the GRPO job)
        self.locks: list = []  # uniar_ray.runlock claims held for the run's life (released by close)

    def close(self) -> None:
        """Release the run folder's lock(s): another job may use the folder from now on."""
        while self.locks:
            self.locks.pop().release()

    def is_used(self) -> bool:
        metrics = self.path / "metrics.jsonl"
        has_metrics = metrics.is_file() and metrics.read_text().strip() != ""
        return has_metrics or any((self.path / "checkpoints").glob("step-*"))

    def open(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "grids").mkdir(exist_ok=True)
        return self

    # -- metrics -----------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with naming(self.metrics_path), open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """One row per step in step order; should a step appear twice (a run resumed by an older version), its last
        line wins, so the summary and the curve never count a step twice."""
        if not self.metrics_path.exists():
            return []
        rows: dict[Any, dict[str, Any]] = {}
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                m = json.loads(line)
                rows[m.get("step")] = m
        return [rows[k] for k in sorted(rows, key=lambda s: -1 if s is None else s)]

    def truncate_metrics(self, upto_step: int) -> int:
        """On resume, drop the lines of steps at or after the checkpoint's step (they will be run again), any
        duplicate, and the grids and sample dumps of those steps; returns how many metric lines were dropped."""
        if not self.metrics_path.exists():
            return 0
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = [m for m in self.read_metrics() if m.get("step", -1) < upto_step]  # also drops older duplicates
        atomic_write(self.metrics_path, lambda f: f.write("".join(json.dumps(m) + "\n" for m in keep).encode()))
        for grid in (self.path / "grids").glob("step-*.png"):
            if int(grid.stem[len("step-"):]) >= upto_step:
                grid.unlink()
        from uniar_ray import gallery

        gallery.truncate(self.path / "rollouts", upto_step)  # and the sample dumps of those steps
        self._truncate_validations(upto_step)
        return len(lines) - len(keep)

    def _truncate_validations(self, upto_step: int) -> None:
        """Validations after ``upto_step`` measured policies the resumed run replaces; the one at ``upto_step``
        measured the checkpoint's own weights and stays (a resumed run does not redo it)."""
        if not self.validation_path.exists():
            return
        lines = [line for line in self.validation_path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", -1) <= upto_step]
        if len(keep) != len(lines):
            tmp = self.validation_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.rename(self.validation_path)

    def plot_rewards(self) -> Path | None:
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [m for m in rows if "reward_mean" in m]
        val = [m for m in rows if "val/reward_mean" in m]  # held-out prompts, every validation.every steps
        steps = [m["step"] for m in train]
        names = sorted({k[len("rewards/"):-len("/mean")] for m in rows for k in m
                        if k.startswith("rewards/") and k.endswith("/mean")})
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), dpi=110, sharex=True)
        top.plot(steps, [_num(m.get("reward_mean")) for m in train], marker="o", label="training batch")
        if val:
            top.plot([m["step"] for m in val], [_num(m["val/reward_mean"]) for m in val], marker="s",
                     label="validation (held-out)")
            top.legend(fontsize=8)
        top.set_ylabel("weighted reward")
        for n in names:  # each reward on its own scale would squash the total, hence a second panel
            line, = bottom.plot(steps, [_num(m.get(f"rewards/{n}/mean")) for m in train], marker=".", label=n)
            if any(f"val/{n}/mean" in m for m in val):
                bottom.plot([m["step"] for m in val], [_num(m.get(f"val/{n}/mean")) for m in val], marker="s",
                            linestyle="--", color=line.get_color(), label=f"{n} (validation)")
        bottom.set_ylabel("per reward (mean)")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        if names:
            bottom.legend(fontsize=8)
        fig.tight_layout()
        out = self.path / "reward_curve.png"
        try:  # a full disk leaves the previous curve, never a 0-byte file
            atomic_write(out, lambda f: fig.savefig(f, format="png"))
        finally:
            plt.close(fig)
        return out

    # -- checkpoints -------------------------------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step-{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        from uniar_ray.checkpoint import complete_checkpoints

        done = complete_checkpoints(self.path)
        return done[0] if done else None

    def save_driver_state(self, folder: Path, state: dict[str, Any]) -> None:
        """Written last, with the size of every file saved before it: a checkpoint folder without this file, or
        with a file of another size, is incomplete (uniar_ray.checkpoint.check_checkpoint)."""
        from uniar_ray.checkpoint import manifest

        state = dict(state, rng=capture_rng(), manifest=manifest(folder))
        atomic_write(folder / "driver_state.json", lambda f: f.write(json.dumps(state).encode()))

    def set_aside_checkpoints_after(self, step: int) -> Path | None:
        """Checkpoints after the one a resume continues from (a corrupt one, or the steps of the continuation this
        resume replaces) move to ``checkpoints/superseded-<time>/``: kept for inspection, never resumed or pruned."""
        later = [p for p in (self.path / "checkpoints").glob("step-*") if int(p.name[len("step-"):]) > step]
        if not later:
            return None
        aside = self.path / "checkpoints" / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in later:
            p.rename(aside / p.name)
        return aside

    def prune_checkpoints(self, keep: int) -> None:
        root = self.path / "checkpoints"
        done = sorted(p for p in root.glob("step-*") if (p / "driver_state.json").exists())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    return {"python": _b64(random.getstate()), "numpy": _b64(np.random.get_state()), "torch": torch.get_rng_state().tolist()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_unb64(state["python"]))
    np.random.set_state(_unb64(state["numpy"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _b64(obj: Any) -> Any:
    # RNG states are tuples of ints / arrays: store them as JSON lists (no pickle in run files).
    if isinstance(obj, tuple):
        return {"t": [_b64(x) for x in obj]}
    if isinstance(obj, np.ndarray):
        return {"a": obj.tolist(), "dtype": str(obj.dtype)}
    return obj


def _unb64(obj: Any) -> Any:
    if isinstance(obj, dict) and "t" in obj:
        return tuple(_unb64(x) for x in obj["t"])
    if isinstance(obj, dict) and "a" in obj:
        return np.asarray(obj["a"], dtype=obj["dtype"])
    if isinstance(obj, list):
        return [_unb64(x) for x in obj]
    return obj


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a missing figure is null
    return v


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)
