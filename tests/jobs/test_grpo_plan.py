"""`python -m jobs.grpo --plan`: the config is validated, every actor placed on a described cluster and its memory
estimated, without loading weights; a run that does not fit fails with what to change."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from uniar_ray.config import GRPORunConfig, load_config
from uniar_ray.model.configuration import TextConfig, UniARConfig
from uniar_ray.plan import Cluster, Node, PlanError, count_params, needs, plan_run

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
    """Planned for this machine, a model.path that is not here is an error; on a described cluster (whose storage
    may hold it) the plan sizes the published UniAR-8B instead, and says so."""
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml")
    here = Cluster([Node("local", 64, 8, 80, 500)], "this machine")
    with pytest.raises(PlanError, match=r"model.path=/FILL/IN/UniAR: .*reads only its config.json"):
        plan_run(cfg, here)
    out = plan_run(cfg, Cluster.from_file(_cluster(tmp_path, REFERENCE)))
    assert "model.path=/FILL/IN/UniAR not readable here: sized as the published UniAR-8B" in out
    assert "policy: 9.63B parameters" in out


# ---------------------------------------------------------------------------------------------------------------
# Ray's autoscaler cluster file, colocated rollout, one-line problems (issue 19.6)
# ---------------------------------------------------------------------------------------------------------------

def test_gpu_recipe_against_the_shipped_cluster_yaml_places_every_actor(tmp_path):
    """The published recipe (colocated rollout on the 16 trainer GPUs) planned on the project's cluster.yaml: it
    fits, and the table names where each rank, engine, decoder and reward lands."""
    run = subprocess.run([sys.executable, "-m", "jobs.grpo", "--plan", "--config", "configs/grpo_uniar_rl.yaml",
                          "--cluster-file", "cluster.yaml"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr  # as shipped, /FILL/IN paths and all: the README's command
    assert "sized as the published UniAR-8B" in run.stdout
    cells = [re.split(r"\s{2,}", line.strip()) for line in run.stdout.splitlines() if not line.startswith("[plan]")]
    rows = {c[0]: c for c in cells}  # actor -> [actor, node, CPU, GPU, ..., total GiB | "", where]
    ranks = [rows[f"trainer rank {i}"] for i in range(16)]
    assert [r[1] for r in ranks] == [f"gpu_8x-0 gpu {g}" for g in range(8)] + [f"gpu_8x-1 gpu {g}" for g in range(8)]
    for i in range(16):  # colocated: each engine is inside its rank, on the rank's GPU
        engine = rows[f"rollout engine {i}"]
        assert engine[1] == ranks[i][1] and engine[-1] == f"in trainer rank {i}"
    assert "rollout 0" not in rows  # no engine actors of their own
    landed = {k: c[1] for k, c in rows.items() if k.startswith(("decoder ", "reward "))}
    assert len(landed) == 8 + 4 + 1 + 4 + 1  # decoders, judges, geneval, ocr, hps
    assert all(n.split()[0].startswith(("gpu_8x-", "gpu_1x-", "cpu-")) for n in landed.values()), landed
    assert "kv cache" in run.stdout and "[plan] rollout: colocated" in run.stdout
    total = float(ranks[0][-2])
    assert 40 < total < 80  # the KV cache and engine memory on top of the trainer's state still fit an 80 GB GPU


def _autoscaler(tmp_path, types: str, cap: int = 16) -> Path:
    f = tmp_path / "cluster.yaml"
    f.write_text(f"max_workers: {cap}\nhead_node_type: head\navailable_node_types:\n"
                 "  head: {node_config: {}, resources: {CPU: 0}}\n" + types)
    return f


def test_autoscaler_file_counts_each_type_at_its_max_workers(tmp_path):
    f = _autoscaler(tmp_path, "  gpu: {node_config: {}, resources: {CPU: 96, GPU: 8, memory: 1099511627776}, "
                              "labels: {gpu_memory_gib: '80'}, max_workers: 3}\n")
    cluster = Cluster.from_file(f)
    assert [n.name for n in cluster.nodes] == ["head-0", "gpu-0", "gpu-1", "gpu-2"]
    assert (cluster.nodes[1].gpus, cluster.nodes[1].gpu_memory_gib, cluster.nodes[1].memory_gib) == (8, 80.0, 1024.0)
    no_label = _autoscaler(tmp_path, "  gpu: {node_config: {}, resources: {CPU: 8, GPU: 1, memory: 1}, "
                                     "max_workers: 1}\n")
    with pytest.raises(PlanError, match=r"available_node_types.gpu: has 1 GPU\(s\): give their memory as labels: "
                                        r"\{gpu_memory_gib: \"80\"\}"):
        Cluster.from_file(no_label)


def test_autoscaler_max_workers_caps_the_nodes_a_plan_may_use(uniar_8b, tmp_path):
    cfg = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [f"model.path={uniar_8b}"])
    small = _autoscaler(tmp_path, "  gpu: {node_config: {}, resources: {CPU: 192, GPU: 8, memory: 1099511627776}, "
                                  "labels: {gpu_memory_gib: '80'}, max_workers: 8}\n", cap=2)
    with pytest.raises(PlanError, match=r"^does not fit: the actors need 4 worker nodes and .* allows "
                                        r"max_workers=2"):
        plan_run(cfg, Cluster.from_file(small))


def test_colocated_rollout_is_sized_inside_the_trainer_ranks(uniar_8b, tmp_path):
    cluster = _cluster(tmp_path, REFERENCE)
    colocated = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [f"model.path={uniar_8b}"])
    separate = load_config(GRPORunConfig, "configs/grpo_uniar_rl.yaml", [
        f"model.path={uniar_8b}", "rollout.placement=separate", "rollout.num_actors=4", "rollout.num_gpus=1"])
    a = {r.role: r for r in needs(colocated)[0]}
    b = {r.role: r for r in needs(separate)[0]}
    rank, engine = a["trainer rank 0"], a["rollout engine 0"]
    assert engine.host == "trainer rank 0" and engine.cpus == engine.gpus == 0 and not engine.parts
    # the rank holds its share's KV cache (32 rows: 512 samples / 16 ranks) and the engine's working memory
    assert rank.parts["kv cache"] > 0 and rank.parts["engine work"] > 0
    assert rank.total == pytest.approx(b["trainer rank 0"].total + rank.parts["kv cache"] + rank.parts["engine work"])
    assert "rollout 0" in b and "weights" in b["rollout 0"].parts and "rollout 0" not in a
    plan_run(colocated, Cluster.from_file(cluster))  # fits the reference's 4 x 8 x 80 GB


@pytest.mark.parametrize("content,line", [
    ("nodes: [", "not valid YAML"),
    ("nodes:\n  - {name: a, cpus: many}\n", "nodes[0].cpus: expected a number, got 'many'"),
    ("head_node_type: x\navailable_node_types: {a: {node_config: {}, resources: {CPU: 1}}}\n",
     "head_node_type 'x' is not one of available_node_types (a)"),
    ("clusters: []\n", "expected Ray's autoscaler format (available_node_types) or `nodes:`"),
])
def test_every_plan_problem_is_one_line(tmp_path, capsys, content, line):
    from jobs import entry
    from jobs import grpo as job

    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        entry.run(job.main, "grpo", ["--plan", "--config", "configs/grpo_demo.yaml", "--cluster-file", str(f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and line in err, err
