"""A benchmark eval with ``rollout.backend=vllm`` end to end on local Ray (tiny model): ImgEdit (edit mode, cfg 2)
writes byte-identical files to the torch engine's run with the same seeds."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jobs import eval as eval_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]  # a vLLM start inside a Ray Data actor


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_imgedit_with_vllm_writes_the_torch_engines_files(quick_config, shared_data, tmp_path):
    lines = (shared_data / "uniar" / "eval_prompts" / "imgedit.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    runs = {}
    for backend in ("torch", "vllm"):
        cfg = quick_config("imgedit", f"benchmark.prompt_file={prompts}", f"rollout.backend={backend}",
                           f"out_dir={tmp_path / backend}")
        assert cfg.settings.cfg_scale in (0.0, 2.0)  # the benchmark's cfg 2 (0 = its default)
        runs[backend] = eval_job.run(cfg)
    for r in runs.values():
        assert r["complete"] and r["samples_written"] == 2, r.get("failures")
    torch_files, vllm_files = (_hashes(Path(runs[b]["images_dir"])) for b in ("torch", "vllm"))
    assert len(torch_files) == 2 and vllm_files == torch_files
    ids = sorted(json.loads(line)["meta"]["metadata"]["original_id"] for line in lines)
    assert sorted(torch_files) == [f"{i}.png" for i in ids]
