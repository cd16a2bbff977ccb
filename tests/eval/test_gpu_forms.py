"""The GPU form of every benchmark's eval config (configs/eval/gpu/<benchmark>.yaml) loads and passes the
feasibility rules here, and runs with the reference's scripts/infer/run_*.sh settings: bf16, CUDA, GPUs for the
generation and the decoder stages."""
from __future__ import annotations

from pathlib import Path

import pytest

import benchmarks
from jobs.eval import resolve_settings
from uniar_ray.config import BENCHMARK_NAMES, ConfigError, EvalConfig, load_config

REPO = Path(__file__).resolve().parents[2]
# ShareLab-SII/UniAR scripts/infer/run_<benchmark>.sh (custom: inference/generate_batch.py's defaults):
# ar_height, ar_width, upsampling_ratio, samples_per_prompt, temperature, cfg; every script: --batch_size 8 and the
# generator's decoder defaults, 28 steps at guidance 1.5, seed 0, over 8 GPUs.
REFERENCE = {"geneval": (512, 512, 2.0, 4, 0.1, 2.5), "imgedit": (512, 512, 2.0, 1, 0.1, 2.0),
             "longtext": (704, 1280, 1.0, 4, 0.1, 2.0), "oneig": (704, 1280, 1.0, 4, 0.1, 2.0),
             "custom": (512, 512, 2.0, 4, 0.1, 2.0)}


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_gpu_form_loads_with_the_reference_settings(name):
    path = REPO / "configs" / "eval" / "gpu" / f"{name}.yaml"
    cfg = load_config(EvalConfig, path)
    assert cfg.benchmark.name == name
    assert (cfg.model.dtype, cfg.model.device, cfg.decoder.dtype, cfg.decoder.device) == \
        ("bfloat16", "cuda", "bfloat16", "cuda")
    assert cfg.rollout.backend == "torch" and cfg.rollout.cuda_graph and cfg.rollout.compile  # what ran on a GPU
    gpus = cfg.rollout.num_actors * cfg.rollout.num_gpus + cfg.decoder.num_actors * cfg.decoder.num_gpus
    assert cfg.rollout.num_gpus > 0 and cfg.decoder.num_gpus > 0 and gpus == 8  # the scripts' NUM_GPUS=8
    assert cfg.batch_size == 8 and cfg.rollout.max_batch == 8 and cfg.scoring.device == "cpu"  # scoring: the driver
    bench = benchmarks.resolve(cfg.benchmark)
    s = resolve_settings(cfg.settings, bench.module.DEFAULTS)
    got = (s.ar_height, s.ar_width, s.upsampling_ratio, bench.samples_per_prompt, s.temperature, s.cfg_scale)
    assert got == REFERENCE[name]
    assert (s.num_inference_steps, s.guidance_scale, s.seed) == (28, 1.5, 0)
    assert f"configs/eval/gpu/{name}.yaml" in (REPO / "configs" / "eval" / f"{name}.yaml").read_text()  # documented


def test_gpu_form_on_a_cpu_device_is_refused_naming_the_keys():
    """The validation that passes above can fail: the same form moved to CPU keeps CUDA graphs and GPUs it cannot
    use."""
    with pytest.raises(ConfigError) as e:
        load_config(EvalConfig, REPO / "configs/eval/gpu/geneval.yaml", ["model.device=cpu", "decoder.num_gpus=0"])
    msg = str(e.value)
    assert "rollout.cuda_graph=true with model.device=cpu" in msg and "rollout.compile=true" in msg
    assert "decoder.device='cuda' with decoder.num_gpus=0" in msg
