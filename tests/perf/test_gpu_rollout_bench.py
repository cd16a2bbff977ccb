"""perf/gpu_rollout.py on the tiny model and the CPU: the code the GPU run uses, end to end, with its JSON line."""
from __future__ import annotations

import json

from perf import gpu_rollout


def test_gpu_rollout_tiny_cpu(capsys):
    gpu_rollout.main(["--tiny", "--device", "cpu", "--sizes", "64", "--batches", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "gpu_rollout" and last["device"] == "cpu"
    runs = {(r["engine"], r["padded"]): r for r in last["runs"]}
    assert set(runs) == {("cached", False), ("reference", False), ("cached", True)}
    assert all("error" not in r and r["ms_per_step"] > 0 and r["image_tokens_per_s"] > 0 for r in runs.values())
    assert last["ratios"]["cached_over_reference_n64_b2"] > 0
    assert last["decoder"]["batched_images_per_s"] > 0  # the tiny decoder (diffusers is installed here)
