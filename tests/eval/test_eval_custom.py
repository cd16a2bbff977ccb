"""jobs.eval with benchmark.name=custom: any prompt file into the unified layout, resumable, with edit inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from jobs import eval as eval_job

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]  # two eval runs on Ray (~40 s on 2 cores)


def test_custom_prompts_unified_layout_resume_and_edit_inputs(quick_config, tmp_path):
    rows = [{"idx": 4, "prompt": "a red apple", "meta": {"src": "a.png"}},
            {"idx": 9, "prompt": "a blue car", "meta": {"meta": {"src": "sub/b.png"}}, "note": "kept"},
            {"prompt": "a green tree", "src": "gone.png"}]  # no idx: its ordinal (2); its image is missing
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "inputs"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 0, 0)).save(root / "a.png")
    Image.new("RGB", (30, 40), (0, 0, 250)).save(root / "sub" / "b.png")
    cfg = quick_config("custom", f"benchmark.prompt_file={path}", "benchmark.samples_per_prompt=2",
                       f"benchmark.image_root={root}", "benchmark.image_key=src")
    first = eval_job.run(cfg)

    images = Path(first["images_dir"])
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()) == [
        "00004/metadata.json", "00004/samples/0000.png", "00004/samples/0001.png",
        "00009/metadata.json", "00009/samples/0000.png", "00009/samples/0001.png"]
    assert json.loads((images / "00009" / "metadata.json").read_text()) == rows[1] | {"idx": 9}
    assert [(f["idx"], "input image missing" in f["error"]) for f in first["failures"]] == [(2, True)]
    assert not first["complete"] and first["samples_written"] == 4
    assert first["scores"] == {"scored": False, "reason": "a custom prompt file has no scorer"}
    with Image.open(images / "00004" / "samples" / "0000.png") as im:
        assert im.size == (64, 64)  # quick config: AR 64x64, ratio 1

    before = (images / "00009" / "samples" / "0001.png").read_bytes()
    (images / "00009" / "samples" / "0001.png").unlink()
    (root / "gone.png").write_bytes((root / "a.png").read_bytes())
    second = eval_job.run(cfg)
    assert second["samples_written"] == 3 and second["samples_already_there"] == 3 and second["complete"]
    assert (images / "00009" / "samples" / "0001.png").read_bytes() == before  # same seed -> same sample
