"""Outputs verified, not assumed: an eval resume counts a sample as done only if it decodes whole at the run's
image size; a truncated, emptied or wrongly sized sample is removed and made again; the preview never crashes on a
damaged file; results.json never says ``complete: true`` while samples are missing or being remade; a sweep does
not read back a cell whose files were cut short. Ray's stages are replaced by a stand-in that writes one image per
pending sample through the benchmark's real writer."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import oneig, report
from benchmarks.common import PromptRecord, SampleCheck, image_problem, looks_whole
from jobs import eval as eval_job

from faults_helpers import write_bytes


@pytest.fixture
def fake_generation(monkeypatch):
    """jobs.eval without Ray: each pending sample becomes a solid image of the run's size; records what was made
    and what results.json said while it was being made."""
    made, seen = [], []

    def stream(plan):
        seen.append(json.loads((plan.out_dir / "results.json").read_text())["complete"])
        w, h = plan.writer.check.size
        by_idx = {r.idx: r for r in plan.records}
        for row in plan.rows:
            plan.writer.write_sample(by_idx[row["idx"]], row["k"], Image.new("RGB", (w, h), (row["k"] * 60, 0, 0)))
            made.append((row["idx"], row["k"]))
        return {"seconds": 1.0, "startup_s": 0.0, "written": len(plan.rows)}

    monkeypatch.setattr(eval_job, "stream", stream)
    monkeypatch.setattr(eval_job, "start_ray", lambda cfg: False)
    return made, seen


def test_a_truncated_an_empty_and_a_wrongly_sized_sample_are_made_again(eval_argv, fake_generation, tmp_path,
                                                                         capsys):
    made, seen = fake_generation
    argv = eval_argv("longtext", "benchmark.limit=2", "scoring.enabled=false")[2:]
    eval_job.main(argv)
    assert len(made) == 8 and json.loads((tmp_path / "out" / "results.json").read_text())["complete"]
    images = tmp_path / "out" / "images"
    truncated, empty, small = images / "0_1.png", images / "0_2.png", images / "1_3.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    empty.write_bytes(b"")
    Image.new("RGB", (8, 8)).save(small)
    made.clear()
    capsys.readouterr()
    eval_job.main(argv)
    err = capsys.readouterr().err
    assert sorted(made) == [(0, 1), (0, 2), (1, 3)]  # only the damaged ones, nothing else regenerated
    assert f"[eval] 3 damaged sample file(s) removed, to be made again: {truncated}: not a readable image" in err
    assert seen == [False, False]  # results.json was not complete while samples were missing or being remade
    assert all(image_problem(p, (64, 64)) == "" for p in images.glob("*.png"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] and results["samples_written"] == 3 and results["samples_already_there"] == 5


def test_the_preview_never_crashes_on_a_damaged_file(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (0, 255, 0)).save(good)
    bad = write_bytes(tmp_path / "bad.png", good.read_bytes()[:30])
    sheet = report.contact_sheet([("a prompt", [good, bad])], tmp_path / "preview.png", thumb=64)
    assert image_problem(sheet) == ""


def test_a_damaged_oneig_grid_is_packed_again_from_its_staged_samples(tmp_path):
    record = PromptRecord(0, "text", {"id": "000", "category": "Text_Rendering"})
    writer = oneig.OneIGWriter(tmp_path, samples_per_prompt=4)
    writer.check = SampleCheck((16, 8))
    for k in range(4):
        writer.write_sample(record, k, Image.new("RGB", (16, 8), (50 * (k + 1), 0, 0)))
    grid = writer.grid_path(record)
    assert writer.pending(record) == [] and Image.open(grid).size == (32, 16)
    grid.write_bytes(grid.read_bytes()[:20])
    assert writer.pending(record) == [] and not grid.exists()  # the staged samples are whole: none to make again
    assert writer.finalize(record) and image_problem(grid, (32, 16)) == ""
    staged = writer.staging.sample_path(record, 2)
    staged.write_bytes(b"")
    grid.write_bytes(b"")
    assert writer.pending(record) == [2] and len(writer.check.removed) == 3


def test_a_sweep_does_not_read_back_a_cell_whose_files_were_cut_short(tmp_path, tiny_cache):
    from jobs import sweep
    from uniar_ray.config import SweepConfig, load_config

    cfg = load_config(SweepConfig, "configs/sweep.yaml", [
        f"out_dir={tmp_path / 'sweep'}", "benchmarks=[longtext]", "settings=[{}]", "checkpoints={tiny: {path: tiny}}",
        f"overrides=[benchmark.limit=1, settings.ar_height=64, settings.ar_width=64, settings.upsampling_ratio=1.0, "
        f"tiny_cache={tiny_cache}]"])
    cell = sweep.eval_config(cfg, "tiny", cfg.checkpoints["tiny"], "longtext", cfg.settings[0])
    plan = eval_job.make_plan(cell)
    plan.images_dir.mkdir(parents=True)
    (plan.out_dir / "config.json").write_text(json.dumps(plan.config_record()))
    png = plan.images_dir / "0_0.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    write_bytes(plan.out_dir / "results.json", json.dumps({"complete": True, "score": 0.5,
                                                           "images_dir": str(plan.images_dir)}).encode())
    assert sweep.finished(cell)["score"] == 0.5 and looks_whole(png)
    png.write_bytes(png.read_bytes()[:-5])
    assert not looks_whole(png) and sweep.finished(cell) is None
