"""Contact sheet, results.json + summary.md, the conversion CLI, and BenchmarkConfig."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import convert, longtext
from benchmarks.common import UnifiedWriter, read_prompts
from benchmarks.report import contact_sheet, write_summary
from uniar_ray.config import BenchmarkConfig, ConfigError, load_config


def test_contact_sheet_places_samples_per_row(tmp_path):
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 32), color).save(p)
        paths.append(p)
    out = contact_sheet([("first prompt", paths), ("second", paths[1:])], tmp_path / "sheet.png", thumb=40,
                        label_height=10)
    with Image.open(out) as sheet:
        assert sheet.size == (80, 100)
        assert sheet.getpixel((20, 25)) == (255, 0, 0) and sheet.getpixel((60, 25)) == (0, 0, 255)
        assert sheet.getpixel((20, 75)) == (0, 0, 255) and sheet.getpixel((60, 75)) == (255, 255, 255)


def test_write_summary(tmp_path):
    results = {"benchmark": "geneval", "overall": 0.61234, "tags": {"counting": 0.5}, "per_prompt": {"0": {}}}
    json_path, md_path = write_summary(tmp_path, results, title="GenEval")
    assert json.loads(json_path.read_text()) == results
    md = md_path.read_text()
    assert "# GenEval" in md and "| overall | 0.6123 |" in md and "## tags" in md and "| counting | 0.5000 |" in md
    assert "per_prompt" not in md


def test_convert_cli_reports_and_fails_on_incomplete(tmp_path, shared_data, capsys):
    records = read_prompts(shared_data / "uniar/eval_prompts/longtext.jsonl", limit=2)
    src = UnifiedWriter(tmp_path / "src", 4)
    for r in records:
        for k in range(4 if r.idx == 0 else 3):
            src.write_sample(r, k, Image.new("RGB", (2, 2)))
    rc = convert.main(["--benchmark", "longtext", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
    out = capsys.readouterr().out
    assert rc == 1 and "written 7" in out and "prompt_id 1: 3 files, expected 4" in out
    src.write_sample(records[1], 3, Image.new("RGB", (2, 2)))
    rc = convert.main(["--benchmark", "longtext", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
    assert rc == 0 and "written 1, skipped (already there) 7, problems 0" in capsys.readouterr().out
    assert longtext.check_layout(tmp_path / "dst", records).ok


def test_benchmark_config_overrides_and_errors():
    cfg = load_config(BenchmarkConfig, None, ["name=oneig", "limit=5", "pad_missing=true"])
    assert (cfg.name, cfg.limit, cfg.pad_missing, cfg.model_name) == ("oneig", 5, True, "uniar")
    with pytest.raises(ConfigError, match="benchmark.name='mmlu'"):
        load_config(BenchmarkConfig, None, ["name=mmlu"])
    with pytest.raises(ConfigError, match="limit"):
        BenchmarkConfig(limit=-1)


def test_resolve_fills_defaults_per_benchmark(shared_data, tmp_path):
    import benchmarks

    r = benchmarks.resolve(BenchmarkConfig(name="imgedit"))
    assert r.prompt_file == shared_data / "uniar/eval_prompts/imgedit.jsonl"
    assert r.image_root == shared_data / "uniar/imgedit_images" and r.samples_per_prompt == 1 and r.limit is None
    g = benchmarks.resolve(BenchmarkConfig(name="geneval", limit=2, samples_per_prompt=2))
    assert g.prompt_file.name == "geneval_long.jsonl" and g.image_root is None and g.limit == 2
    assert g.writer(tmp_path).samples_per_prompt == 2
    o = benchmarks.resolve(BenchmarkConfig(name="oneig", model_name="m", pad_missing=True)).writer(tmp_path)
    assert (o.model_name, o.pad_missing, o.samples_per_prompt) == ("m", True, 4)


@pytest.mark.parametrize("name", ["oneig", "imgedit"])
def test_preview_from_any_writer(name, tmp_path, shared_data):
    import benchmarks
    from benchmarks.report import preview

    module = benchmarks.get(name)
    records = read_prompts(shared_data / f"uniar/eval_prompts/{name}.jsonl", limit=3)
    w = module.writer(tmp_path / "out")
    assert preview(w, records, tmp_path / "none.png") is None  # nothing written yet
    for r in records[:2]:
        for k in w.pending(r):
            w.write_sample(r, k, Image.new("RGB", (40, 20), (0, 200, 0)))
    sheet = preview(w, records, tmp_path / "sheet.png", thumb=32)
    with Image.open(sheet) as image:
        assert image.size == (32 * module.DEFAULTS.samples_per_prompt, 2 * (40 + 32))
