"""Sweep over the tiny model: every (checkpoint, benchmark, setting) runs once, a rerun reads finished runs back,
and one table (CSV + markdown) and a plot come out."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from jobs import eval as eval_job
from jobs import sweep
from uniar_ray.config import EvalSettings, SweepConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_label_names_what_a_setting_changes():
    assert sweep.label(EvalSettings()) == "default"
    assert sweep.label(EvalSettings(cfg_scale=2.5, num_inference_steps=14)) == "cfg2.5_steps14"


def test_sweep_runs_each_cell_once_then_reads_back(local_ray, tiny_cache, tmp_path, monkeypatch):
    cfg = load_config(SweepConfig, REPO / "configs/sweep.yaml", [
        f"out_dir={tmp_path / 'sweep'}", "benchmarks=[longtext]", "settings=[{}, {cfg_scale: 1.0}]",
        "checkpoints={tiny: {path: tiny}}",
        "overrides=[benchmark.limit=1, benchmark.samples_per_prompt=2, settings.ar_height=64, settings.ar_width=64, "
        f"settings.upsampling_ratio=1.0, settings.num_inference_steps=2, tiny_cache={tiny_cache}, batch_size=2]"])
    rows = sweep.run_sweep(cfg)
    assert [(r["checkpoint"], r["benchmark"], r["setting"]) for r in rows] == [
        ("tiny", "longtext", "default"), ("tiny", "longtext", "cfg1")]
    assert [r["cfg_scale"] for r in rows] == [2.0, 1.0]  # the LongText default, then the sweep's value
    assert all(r["complete"] and r["scored"] == "yes" and isinstance(r["score"], float) for r in rows)
    assert sorted(p.name for p in Path(rows[1]["run"], "images").iterdir()) == ["0_0.png", "0_1.png"]

    out = tmp_path / "sweep"
    table = list(csv.DictReader(open(out / "results.csv")))
    assert [t["setting"] for t in table] == ["default", "cfg1"] and list(table[0]) == list(sweep.COLUMNS)
    assert (out / "results.md").read_text().count("| tiny | longtext |") == 2
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_rerun(run_cfg):
        raise AssertionError(f"finished run {run_cfg.out_dir} was run again")

    monkeypatch.setattr(eval_job, "run", no_rerun)
    again = sweep.run_sweep(cfg)
    assert [r["score"] for r in again] == [r["score"] for r in rows]
    # same folders, different eval config (3 samples per prompt): not read back
    changed = dataclasses.replace(cfg, overrides=[*cfg.overrides, "benchmark.samples_per_prompt=3"])
    with pytest.raises(AssertionError, match="was run again"):
        sweep.run_sweep(changed)
