"""Experiment tracking for the GRPO job: TensorBoard event files and Weights & Biases (offline works without a
network), both optional; every sink gets the keys of metrics.jsonl at their step, and the rollout grids as images;
W&B also gets each dumped step's samples as a table (``completions``: TRL's ``log_completions`` layout, one row per
sample with its image, each reward, the total and the advantage).

    tracker = Tracker(cfg.tracking, run.path, to_dict(cfg), start_step=step); tracker.log(metrics)
    tracker.log_grid(step, grid_png); tracker.log_samples(step, gallery_records, images); tracker.close()
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(self, cfg: Any, run_path: Path, config: dict[str, Any], start_step: int = 0):
        self.tb = self.wandb_run = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("tracking.tensorboard=true needs the tensorboard package: "
                                   "pip install 'uniar-ray[tracking]' (or tracking.tensorboard=false)") from e
            # purge_step: on resume, events of steps that will be run again are dropped (as in metrics.jsonl)
            self.tb = SummaryWriter(str(Path(run_path) / "tensorboard"), purge_step=start_step or None)
        if cfg.wandb:
            self.wandb_run = _start_wandb(cfg, Path(run_path), config)

    def log(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        values = {k: float(v) for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, global_step=step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **values}, step=step)

    def log_grid(self, step: int, path: Path | None) -> None:
        """The step's captioned grid (grids/step-N.png) as an image: TensorBoard ``grids``, W&B ``grids``."""
        if path is None or (self.tb is None and self.wandb_run is None):
            return
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        if self.tb is not None:
            self.tb.add_image("grids", pixels, global_step=step, dataformats="HWC")
            self.tb.flush()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"grids": wandb.Image(pixels, caption=f"step {step}")}, step=step)

    def log_samples(self, step: int, records: list[dict[str, Any]], images: list) -> None:
        """A dumped step's samples (uniar_ray.gallery records, in order, with their images) as W&B's ``completions``
        table: step, prompt, task, image, each reward, total, advantage, excluded (TRL's log_completions columns,
        the image standing in for the completion text)."""
        if self.wandb_run is None:
            return
        import wandb

        names = sorted({n for r in records for n in r["rewards"]})
        columns = ["step", "prompt", "task", "image", *names, "reward", "advantage", "excluded"]
        table = wandb.Table(columns=columns)
        for r, im in zip(records, images):
            table.add_data(str(step), r["prompt"], r["task"] or "", None if im is None else wandb.Image(im),
                           *[r["rewards"].get(n) for n in names], r["reward"], r["advantage"],
                           r["excluded_reason"] or "")
        self.wandb_run.log({"completions": table}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(cfg: Any, run_path: Path, config: dict[str, Any]):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("tracking.wandb=true needs the wandb package: pip install 'uniar-ray[tracking]' "
                           "(or tracking.wandb=false)") from e
    # One W&B run per run folder: its id is kept there, so a resumed run continues the same W&B run.
    id_file = run_path / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    (run_path / "wandb").mkdir(exist_ok=True)
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or run_path.name, id=run_id, resume="allow",
                      dir=str(run_path), mode=cfg.wandb_mode, config=config,
                      settings=wandb.Settings(console="off", silent=True, disable_code=True, x_disable_stats=True))
