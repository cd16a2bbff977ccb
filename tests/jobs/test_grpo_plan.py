"""`python -m jobs.grpo --plan`: the config is validated, every actor placed on a described cluster and its memory
estimated, without loading weights; a run that does not fit fails with what to change."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uniar_ray.config import GRPORunConfig, load_config
from uniar_ray.model.configuration import TextConfig, UniARConfig
from uniar_ray.plan import Cluster, PlanError, count_params, plan_run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uniar_8b(tmp_path_factory) -> Path:
    """Only config.json of a Qwen3-VL-8B-sized UniAR (spec §2.2, [inferred] dims): no weights anywhere."""
    root = tmp_path_factory.mktemp("uniar8b")
    text = TextConfig(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=12288,
                      rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    UniARConfig(text_config=text, vistok_pred=True, vistok_pred_layernorm=True,
                visual_transformer_decoder=True).save_pretrained(root / "ar_model")
    return root


def _cluster(tmp_path, nodes: str) -> Path:
    f = tmp_path / "cluster.yaml"
    f.write_text(f"nodes:\n{nodes}")
    return f


# the reference's deployment: 2 training nodes + a decode node + a reward node, 8 x 80 GB each
REFERENCE = ("  - {name: train, count: 2, cpus: 96, gpus: 8, gpu_memory_gib: 80, memory_gib: 1000}\n"
             "  - {name: decode, cpus: 96, gpus: 8, gpu_memory_gib: 80, memory_gib: 1000}\n"
             "  - {name: reward, cpus: 96, gpus: 8, gpu_memory_gib: 80, memory_gib: 1000}\n")


def test_the_8b_size_is_counted_from_config_json_alone(uniar_8b):
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [f"model.path={uniar_8b}"])
    from uniar_ray.plan import policy_config

    total, trained = count_params(policy_config(cfg.model))
    assert 8.0e9 < total < 10.0e9 and total - trained > 0.9e9  # vision tower + lm_head frozen


def test_published_recipe_fits_the_reference_cluster(uniar_8b, tmp_path):
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [f"model.path={uniar_8b}"])
    out = plan_run(cfg, Cluster.from_file(_cluster(tmp_path, REFERENCE)))
    lines = out.splitlines()
    assert sum(line.startswith("trainer rank") for line in lines) == 16
    ranks = [line for line in lines if line.startswith("trainer rank")]
    assert {r.split()[3] for r in ranks} == {"train0", "train1"}  # PACK: the 16 ranks fill both training nodes
    assert "decoder.path not readable here: assumed" in out
    total = float(ranks[0].split()[-2])
    assert 40 < total < 80  # weights 17 + grads 1 + Adam 6 + ref 17 + activations: fits, with room


def test_8b_with_fp32_adam_and_zero2_over_too_few_gpus_does_not_fit(uniar_8b, tmp_path):
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [
        f"model.path={uniar_8b}", "model.dtype=float32", "trainer.world_size=4", "data.prompts_per_step=4"])
    cluster = Cluster.from_file(_cluster(tmp_path, "  - {name: box, cpus: 64, gpus: 8, gpu_memory_gib: 80, "
                                                   "memory_gib: 500}\n"))
    with pytest.raises(PlanError) as e:
        plan_run(cfg, cluster)
    msg = str(e.value)
    assert msg.startswith("does not fit: trainer rank 0 needs")
    assert "the largest GPU in" in msg and "80 GiB" in msg
    assert "trainer.zero_stage=3" in msg and "trainer.world_size" in msg


def test_plan_cli_prints_the_table_or_fails_with_the_reason(uniar_8b, tmp_path):
    cluster = _cluster(tmp_path, REFERENCE)
    run = [sys.executable, "-m", "jobs.grpo", "--plan", "--config", "configs/grpo_uniar_rl.yaml",
           "--cluster-file", str(cluster), f"model.path={uniar_8b}", f"run_dir={tmp_path / 'run'}"]
    ok = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "trainer rank 15" in ok.stdout and "reward judge 0" in ok.stdout
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    bad = subprocess.run(run + ["trainer.world_size=2", "model.dtype=float32", "data.prompts_per_step=2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not fit: trainer rank 0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_described_cluster_with_too_few_gpus_names_the_actor(uniar_8b, tmp_path):
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [f"model.path={uniar_8b}"])
    small = _cluster(tmp_path, "  - {name: train, count: 2, cpus: 96, gpus: 8, gpu_memory_gib: 80, memory_gib: 1000}\n")
    with pytest.raises(PlanError, match=r"does not fit: (rollout|decoder|reward \w+) \d+ needs"):
        plan_run(cfg, Cluster.from_file(small))


def test_placeholder_model_path_is_reported(tmp_path):
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml")
    with pytest.raises(PlanError, match=r"model.path=/FILL/IN/UniAR: .*reads only its config.json"):
        plan_run(cfg, Cluster.from_file(_cluster(tmp_path, REFERENCE)))
