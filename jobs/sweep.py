"""Sweeps: checkpoints x benchmarks x settings, each one ``jobs.eval`` run (a finished run is read back, an
unfinished one resumes); writes one results table (results.csv, results.md) and a plot (scores.png).

    python -m jobs.sweep --config configs/sweep.yaml [out_dir=runs/sweep2 overrides='[benchmark.limit=8]' ...]
    python -m jobs.sweep --config configs/sweep_grpo_run.yaml grpo_run=runs/grpo-demo [grpo_steps='[10,30]']
A GRPO run's checkpoints are scored by default as the run validated them (benchmark ``validation``: its rewards on
its held-out prompts); benchmarks can be listed beside it.
    ray job submit --working-dir . -- python -m jobs.sweep --config configs/sweep.yaml cluster.address=auto
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import atomic_write, atomic_write_text, looks_whole
from jobs import eval as eval_job
from jobs import start_ray
from jobs.grpo_validation import VALIDATION
from uniar_ray import preflight
from uniar_ray.config import EvalConfig, EvalSettings, ModelConfig, SweepConfig, load_config, parse_cli
from uniar_ray import runlock
from uniar_ray.run_identity import normalized, recorded_identity

COLUMNS = ("checkpoint", "benchmark", "setting", "ar_size", "temperature", "cfg_scale", "decoder_steps", "score",
           "scored", "prompts", "samples_expected", "samples_failed", "complete", "seconds", "images_per_s", "run")
SHORT = {"ar_height": "h", "ar_width": "w", "temperature": "T", "cfg_scale": "cfg", "cfg_mode": "mode",
         "upsampling_ratio": "up", "num_inference_steps": "steps", "guidance_scale": "g", "seed": "seed"}


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_cli(SweepConfig, argv, default_config="configs/sweep.yaml")
    # before Ray: the checkpoints, every cell's eval config, the run's held-out prompts, this machine, the output
    scorer = preflight_sweep(cfg)
    with runlock.claim(cfg.out_dir, "out_dir", "sweep"):  # one sweep per folder (each cell is claimed too)
        started = start_ray(cfg)
        try:
            rows = run_sweep(cfg, scorer)
        finally:
            if started:
                import ray

                ray.shutdown()
    print(f"[sweep] {len(rows)} runs; table {Path(cfg.out_dir) / 'results.md'}", file=sys.stderr)
    print(Path(cfg.out_dir).resolve())
    return Path(cfg.out_dir).resolve()


def run_sweep(cfg: SweepConfig, scorer=None) -> list[dict[str, Any]]:
    """Every cell; ``scorer`` (from ``preflight_sweep``) runs the GRPO run's own validation cells."""
    out = Path(cfg.out_dir)
    rows = []
    if scorer is None:
        scorer = run_validation(cfg)
    try:
        for name, model in sweep_checkpoints(cfg).items():
            for bench in cfg.benchmarks:
                if bench == VALIDATION:  # once per checkpoint: the run's own settings, not the sweep's
                    results = scorer.cell(model, out.resolve() / name / bench / "run")
                    rows.append(table_row(name, bench, "run", results))
                    print(f"[sweep] {name} / {bench}: score {results['score']}", file=sys.stderr)
                    continue
                for setting in cfg.settings:
                    run_cfg = eval_config(cfg, name, model, bench, setting)
                    results = finished(run_cfg)
                    status = "read back" if results else "ran"
                    results = results or eval_job.run(run_cfg)
                    rows.append(table_row(name, bench, label(setting), results))
                    print(f"[sweep] {name} / {bench} / {label(setting)}: score {results['score']} ({status})",
                          file=sys.stderr)
    finally:
        if scorer is not None:
            scorer.close()
    write_table(out, rows)
    plot(out / "scores.png", rows)
    return rows


def preflight_sweep(cfg: SweepConfig):
    """The checks before Ray; returns the validation scorer (the run's config.json and held-out prompts, its data
    files fetched and verified) when ``benchmarks`` lists validation, else None."""
    checkpoints = sweep_checkpoints(cfg)
    cells = [eval_config(cfg, name, model, bench, setting) for name, model in checkpoints.items()
             for bench in cfg.benchmarks if bench != VALIDATION for setting in cfg.settings]
    preflight.sweep(cfg, checkpoints, cells)
    return run_validation(cfg)


def sweep_checkpoints(cfg: SweepConfig) -> dict[str, ModelConfig]:
    """The listed checkpoints plus, with ``grpo_run``, that run's checkpoints (``step-NNNNNN``: its model folder)."""
    from uniar_ray.checkpoint import checkpoint_steps

    found = dict(cfg.checkpoints)
    if cfg.grpo_run:
        run = Path(cfg.grpo_run)
        if not run.is_dir():
            raise FileNotFoundError(2, f"sweep.grpo_run: {'not a folder' if run.exists() else 'no such folder'} "
                                       "(a GRPO run folder, e.g. runs/grpo-demo, with checkpoints/step-N/)", str(run))
        trained = json.loads((run / "config.json").read_text())["model"] if (run / "config.json").is_file() else {}
        for name, folder in checkpoint_steps(run, cfg.grpo_steps).items():
            if name in found:
                raise ValueError(f"sweep: checkpoint name {name} is both in checkpoints and in grpo_run {run}")
            found[name] = ModelConfig(path=str(folder.resolve()), dtype=trained.get("dtype", "float32"),
                                      device=trained.get("device", "cpu"))
    return found


def run_validation(cfg: SweepConfig):
    """A ``CheckpointScorer`` with the GRPO run's config when ``benchmarks`` lists validation, else None."""
    if VALIDATION not in cfg.benchmarks:
        return None
    from jobs.grpo_validation import CheckpointScorer

    return CheckpointScorer(grpo_run_config(cfg))


def grpo_run_config(cfg: SweepConfig):
    """The config of ``grpo_run`` (its config.json), which the validation cells sample and score with."""
    from uniar_ray.config import GRPORunConfig, from_dict

    config = Path(cfg.grpo_run) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(2, "sweep: benchmark validation needs the GRPO run's config.json: not found",
                                str(config))
    return from_dict(GRPORunConfig, json.loads(config.read_text()), where=str(config))


def label(setting: EvalSettings) -> str:
    """The fields a setting changes from the benchmark defaults, e.g. ``cfg2.5_steps14``; ``default`` if none."""
    base = EvalSettings()
    parts = [f"{SHORT[f.name]}{getattr(setting, f.name):g}" if isinstance(getattr(setting, f.name), float)
             else f"{SHORT[f.name]}{getattr(setting, f.name)}"
             for f in dataclasses.fields(setting) if getattr(setting, f.name) != getattr(base, f.name)]
    return "_".join(parts) or "default"


def eval_config(cfg: SweepConfig, name: str, model: ModelConfig, bench: str, setting: EvalSettings) -> EvalConfig:
    """The benchmark's eval YAML + the sweep's overrides + this checkpoint + the fields this setting changes."""
    run_cfg = load_config(EvalConfig, cfg.eval_config.format(benchmark=bench), [*cfg.overrides,
                                                                               f"benchmark.name={bench}"])
    base, changed = EvalSettings(), {}
    for f in dataclasses.fields(setting):
        if getattr(setting, f.name) != getattr(base, f.name):
            changed[f.name] = getattr(setting, f.name)
    out_dir = Path(cfg.out_dir).resolve() / name / bench / label(setting)
    return dataclasses.replace(run_cfg, model=model, settings=dataclasses.replace(run_cfg.settings, **changed),
                               cluster=cfg.cluster, out_dir=str(out_dir), progress=False, overwrite=cfg.overwrite)


def finished(run_cfg: EvalConfig) -> dict[str, Any] | None:
    """A complete earlier run with the same identity (batch sizes and actor counts may differ): its results, else
    None. A cell made with other settings is not read back: ``eval_job.run`` refuses it, or clears it with
    ``overwrite``."""
    out = Path(run_cfg.out_dir)
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    old = recorded_identity(out)
    same = old is not None and normalized(old) == normalized(eval_job.run_identity(run_cfg))
    if not (same and results.get("complete")):
        return None
    images = Path(results.get("images_dir") or out / "images")
    damaged = [p for p in images.rglob("*") if p.is_file() and not p.name.startswith(".") and not looks_whole(p)]
    return None if damaged else results  # a file cut short since: the eval rerun finds it and makes it again


def table_row(name: str, bench: str, setting: str, r: dict[str, Any]) -> dict[str, Any]:
    scores = r.get("scores", {})
    return {"checkpoint": name, "benchmark": bench, "setting": setting, "ar_size": r["ar_size"],
            "temperature": r["temperature"], "cfg_scale": r["cfg_scale"], "decoder_steps": r["decoder_steps"],
            "score": r["score"], "scored": "yes" if scores.get("scored") else f"no: {scores.get('reason', '')}",
            "prompts": r["prompts"], "samples_expected": r["samples_expected"], "samples_failed": r["samples_failed"],
            "complete": r["complete"], "seconds": r["seconds"], "images_per_s": r["images_per_s"],
            "run": r["out_dir"]}


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    shown = [c for c in COLUMNS if c != "run"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in shown) + " |" for row in rows]
    atomic_write_text(out / "results.md", "# Sweep results\n\n" + "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """One panel per benchmark: score per setting, one line per checkpoint (one setting: score per checkpoint);
    unscored benchmarks say why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        mine = [r for r in rows if r["benchmark"] == bench]
        settings = list(dict.fromkeys(r["setting"] for r in mine))
        names = list(dict.fromkeys(r["checkpoint"] for r in mine))
        if len(settings) == 1:  # one setting: the checkpoints along the axis (a GRPO run's steps, in order)
            ticks, series = names, {settings[0]: {r["checkpoint"]: r["score"] for r in mine}}
        else:  # a line per checkpoint across the settings
            ticks = settings
            series = {n: {r["setting"]: r["score"] for r in mine if r["checkpoint"] == n} for n in names}
        for name, points in series.items():
            ys = [points.get(t) for t in ticks]
            ax.plot(range(len(ticks)), [float("nan") if y is None else y for y in ys], marker="o", label=name)
        if all(r["score"] is None for r in mine):
            ax.text(0.5, 0.5, "not scored\n" + mine[0]["scored"][4:][:60], ha="center", va="center",
                    transform=ax.transAxes, wrap=True)
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=8)
        ax.set_title(bench)
        ax.set_ylabel("score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:  # a full disk leaves the previous plot, never a 0-byte one
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


if __name__ == "__main__":
    from jobs import entry
    from jobs import sweep as job  # run as jobs.sweep, so eval's stage classes pickle by reference

    entry.run(job.main, "sweep")
