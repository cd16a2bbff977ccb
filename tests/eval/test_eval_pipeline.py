"""End-to-end tiny eval runs per benchmark on local Ray: official layouts, resume after a partial run, malformed
prompt lines and missing/corrupt edit images reported, scores and reports written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks
from benchmarks.common import PromptFileError, iter_prompts
from jobs import eval as eval_job

pytestmark = pytest.mark.usefixtures("local_ray")


def prompt_lines(shared_data: Path, name: str) -> list[str]:
    return (shared_data / "uniar" / "eval_prompts" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_geneval_reports_bad_lines_and_scores_with_a_detector(quick_config, shared_data, tmp_path):
    good = prompt_lines(shared_data, "geneval_long")[:2]
    path = write_lines(tmp_path / "prompts.jsonl", [good[0], '{"idx": 9, "prompt": "broken', good[1],
                                                     '{"idx": 10, "prompt": 5}'])
    cfg = quick_config("geneval", f"benchmark.prompt_file={path}", "benchmark.skip_bad_lines=true",
                       "benchmark.samples_per_prompt=2", "scoring.geneval_detector=tiny", "scoring.geneval_clip=tiny")
    results = eval_job.run(cfg)

    assert [r.split(":")[-2].strip() for r in results["bad_line_reports"]] == ["2", "4"]
    assert "not valid JSON" in results["bad_line_reports"][0] and "'prompt' must be a string" in \
        results["bad_line_reports"][1]
    records = list(iter_prompts(path, skip_bad=True))
    assert benchmarks.get("geneval").check_layout(results["images_dir"], records, 2).ok
    assert results["complete"] and results["samples_written"] == 4 and results["prompts"] == 2
    scores = results["scores"]
    assert scores["scored"] and scores["images"] == 4 and set(scores["tags"]) == {"single_object"}
    assert 0.0 <= results["score"] <= 1.0
    rows = (Path(results["out_dir"]) / "geneval_results.jsonl").read_text().splitlines()
    assert len(rows) == 4 and json.loads(rows[0])["prompt"] == json.loads(good[0])["meta"]["short_prompt"]
    out = Path(results["out_dir"])
    assert "| bad_lines | 2 |" in (out / "summary.md").read_text()
    assert (out / "preview.png").stat().st_size > 0


def test_malformed_line_stops_the_run_naming_its_line(quick_config, shared_data, tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [*prompt_lines(shared_data, "longtext")[:2], "[1, 2]"])
    with pytest.raises(PromptFileError, match=r"prompts\.jsonl:3: expected a JSON object"):
        eval_job.make_plan(quick_config("longtext", f"benchmark.prompt_file={path}"))


def test_longtext_resumes_exactly_the_missing_samples(quick_config):
    cfg = quick_config("longtext", "benchmark.limit=2")
    first = eval_job.run(cfg)
    images = Path(first["images_dir"])
    before = files(images)
    assert set(before) == {f"{pid}_{k}.png" for pid in (0, 1) for k in range(4)}
    assert first["complete"] and first["scores"]["scored"] and first["scores"]["images"] == 8

    # a partial run: three samples never written, one killed mid-write (a hidden temporary file)
    for name in ("0_1.png", "1_0.png", "1_3.png"):
        (images / name).unlink()
    (images / ".0_2.png.4242-deadbeef.tmp").write_bytes(b"half a png")
    kept = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    second = eval_job.run(cfg)

    after = files(images)
    assert set(after) == set(before)  # no temporary file, no duplicate, nothing missing
    assert second["samples_written"] == 3 and second["samples_already_there"] == 5 and second["complete"]
    assert all((images / name).stat().st_mtime_ns == t for name, t in kept.items())  # untouched
    # per-sample seeds: a resumed sample is the one a full run draws
    assert all(after[name] == before[name] for name in ("0_1.png", "1_0.png", "1_3.png"))


def test_oneig_grids_resume_and_text_score(quick_config):
    cfg = quick_config("oneig", "benchmark.limit=2")
    first = eval_job.run(cfg)
    images = Path(first["images_dir"])
    grids = images / "text" / "uniar"
    assert sorted(p.name for p in grids.iterdir()) == ["000.webp", "001.webp"]
    assert first["scores"]["scored"] and first["scores"]["found"] == 2 and first["scores"]["dropped"] == []
    before = files(images)

    (grids / "000.webp").unlink()  # killed after the last sample, before its grid
    (grids / "001.webp").unlink()  # killed before one sample
    (images / "unified" / "00001" / "samples" / "0002.png").unlink()
    second = eval_job.run(cfg)

    assert second["samples_written"] == 1 and second["complete"]
    assert files(images) == before


def test_imgedit_missing_and_corrupt_inputs_are_reported_per_record(quick_config, shared_data, tmp_path):
    lines = prompt_lines(shared_data, "imgedit")
    missing = next(line for line in lines if '"input_image": "compose/animal/5.jpg"' in line)  # absent upstream
    good, corrupt = lines[0], lines[1]
    root = tmp_path / "images"
    for line, data in ((good, None), (corrupt, b"not an image")):
        rel = json.loads(line)["meta"]["input_image"]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data or (shared_data / "uniar" / "imgedit_images" / rel).read_bytes())
    path = write_lines(tmp_path / "prompts.jsonl", [good, missing, corrupt])
    results = eval_job.run(quick_config("imgedit", f"benchmark.prompt_file={path}", f"benchmark.image_root={root}"))

    key = lambda line: json.loads(line)["meta"]["metadata"]["original_id"]  # noqa: E731
    assert sorted(p.name for p in Path(results["images_dir"]).iterdir()) == [f"{key(good)}.png"]
    failures = {f["idx"]: f["error"] for f in results["failures"]}
    assert set(failures) == {json.loads(missing)["idx"], json.loads(corrupt)["idx"]}
    assert "input image missing" in failures[json.loads(missing)["idx"]]
    assert "unreadable" in failures[json.loads(corrupt)["idx"]]  # found from its header, before any work
    assert not results["complete"] and results["samples_written"] == 1
    assert results["scores"] == {"scored": False, "reason": results["scores"]["reason"]}
    assert "GPT-4o" in results["scores"]["reason"]
