"""benchmarks/custom.py: any {idx, prompt, meta} file in the unified layout; edit-image lookup as the reference's
generate_batch.py (meta, meta.meta, top level); layout check and unified-to-unified copy."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import custom
from benchmarks.common import PromptRecord, read_prompts
from benchmarks.imgedit import InputImageError
from uniar_ray.config import BenchmarkConfig, ConfigError


def record(meta=None, **top) -> PromptRecord:
    return PromptRecord(idx=3, prompt="p", meta=meta or {}, extra=top)


def test_image_lookup_order_meta_then_nested_then_top_level(tmp_path):
    assert custom.image_value(record({"src": "a.png", "meta": {"src": "b.png"}}, src="c.png"), "src") == "a.png"
    assert custom.image_value(record({"meta": {"src": "b.png"}}, src="c.png"), "src") == "b.png"
    assert custom.image_value(record({"other": 1}, src="c.png"), "src") == "c.png"
    assert custom.image_value(record({"meta": "not a dict"}), "src") is None
    assert custom.input_image_path(record({"src": "x/a b.png"}), tmp_path, "src") == tmp_path / "x" / "a b.png"
    for bad in ("/etc/passwd", "../outside.png", "x/../../y.png"):
        with pytest.raises(InputImageError, match="paths in data files"):
            custom.input_image_path(record({"src": bad}), tmp_path, "src")
    with pytest.raises(InputImageError, match=r"idx=3: no 'src' path \(looked in meta, meta.meta"):
        custom.input_image_path(record({}), tmp_path, "src")
    (tmp_path / "here.png").write_bytes(b"png")
    problems = custom.check_inputs([record({"src": "here.png"}), record({"src": "gone.png"})], tmp_path, image_key="src")
    assert problems == [f"record idx=3: input image missing: {tmp_path / 'gone.png'}"]


def test_layout_check_and_copy(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"idx": 7, "prompt": "a cat", "meta": {"tag": "x"}, "extra": 1}\n{"prompt": "a dog"}\n')
    records = read_prompts(path)
    w = custom.writer(tmp_path / "run", samples_per_prompt=2)
    img = Image.new("RGB", (16, 16), (200, 0, 0))
    for r in records:
        assert w.write_sample(r, 0, img)
    report = custom.check_layout(tmp_path / "run", records, 2)
    assert not report.ok and report.problems == ["00001: samples [0] != 0..1", "00007: samples [0] != 0..1"]
    for r in records:
        w.write_sample(r, 1, img)
    assert custom.check_layout(tmp_path / "run", records, 2).ok
    meta = json.loads((tmp_path / "run" / "00007" / "metadata.json").read_text())
    assert meta == {"idx": 7, "prompt": "a cat", "meta": {"tag": "x"}, "extra": 1}  # the whole record, as reference
    copy = custom.convert(tmp_path / "run", tmp_path / "copy", samples_per_prompt=1)
    assert copy.written == 2 and copy.problems == ["idx 1: extra sample 0001.png ignored",
                                                   "idx 7: extra sample 0001.png ignored"]
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*.png")) == \
        ["00001/samples/0000.png", "00007/samples/0000.png"]


@pytest.mark.parametrize("overrides,match", [
    ({}, "needs benchmark.prompt_file"),
    ({"prompt_file": "p.jsonl", "image_root": "/x"}, "must be set together"),
    ({"prompt_file": "p.jsonl", "image_key": "src"}, "must be set together"),
])
def test_config_rules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        BenchmarkConfig(name="custom", **overrides)
    with pytest.raises(ConfigError, match="image_key is for benchmark.name=custom"):
        BenchmarkConfig(name="imgedit", image_key="input_image")
