"""Nothing that cannot run is accepted (issue 19.1): combinations the code would refuse later, in an actor after
minutes of loading, are refused when the config is loaded (uniar_ray/config/feasibility.py), naming the key and
what to use instead; what depends on the machine is checked only where that machine runs the work."""
from __future__ import annotations

import pytest

from jobs import grpo as grpo_job
from uniar_ray.config import ConfigError, EvalConfig, GRPORunConfig, load_config
from uniar_ray.config import feasibility

from faults_helpers import REPO

DEMO = REPO / "configs/grpo_demo.yaml"


@pytest.mark.parametrize("overrides,line", [
    (["rollout.backend=vllm", "model.device=cuda", "trainer.num_gpus=1", "rollout.num_gpus=1"],
     "rollout.backend=vllm with model.device='cuda': the UniAR vLLM engine runs on CPU in float32 only"),
    (["rollout.backend=vllm", "model.dtype=bfloat16"],
     "rollout.backend=vllm with model.dtype='bfloat16': the UniAR vLLM engine runs on CPU in float32 only"),
    (["model.attn_impl=flash_attention_2"], "model.attn_impl=flash_attention_2 with model.device=cpu: flash-attn "
                                            "runs on CUDA only; use model.attn_impl=sdpa"),
    (["rollout.cuda_graph=true"], "rollout.cuda_graph=true with model.device=cpu: CUDA graphs record GPU kernels; "
                                  "set rollout.cuda_graph=false on CPU"),
    (["rollout.compile=true"], "rollout.compile=true with model.device=cpu"),
    (["model.device=cuda", "rollout.num_gpus=1"], "model.device='cuda' with trainer.num_gpus=0: Ray gives the actor "
                                                  "no GPU; set trainer.num_gpus"),
    (["model.device=cuda", "trainer.num_gpus=1"], "model.device='cuda' with rollout.num_gpus=0"),
    (["model.device=cuda", "trainer.num_gpus=0.5", "trainer.world_size=2", "rollout.num_gpus=1"],
     "trainer.num_gpus=0.5 with trainer.world_size=2: NCCL needs one GPU per rank"),
    (["decoder.device=cuda:1", "decoder.num_gpus=1"], "decoder.device='cuda:1': an actor sees only the 1 GPU(s) "
                                                      "Ray gives it, as cuda:0..; set decoder.device=cuda"),
    (["rewards.models.judge.model_path=tiny", "rewards.models.judge.backend=vllm"],
     "rewards.models.judge.backend=vllm: the vLLM judge runs on whole GPUs"),
    (["rewards.models.hps.model_path=tiny", "rewards.models.hps.device=cuda"],
     "rewards.models.hps.device='cuda' with rewards.models.hps.num_gpus=0"),
    (["rewards.models.target_color.target=[300, 0, 0]"],
     "rewards.models.target_color.target=[300.0, 0.0, 0.0]: target_color takes [r, g, b], each in 0..255"),
])
def test_a_combination_the_code_refuses_is_refused_at_load(run_job, tmp_path, overrides, line):
    with pytest.raises(ConfigError) as e:
        load_config(GRPORunConfig, DEMO, overrides)
    assert line in str(e.value)
    code, err = run_job(grpo_job.main, "grpo", ["--config", str(DEMO), f"run_dir={tmp_path / 'run'}", *overrides])
    assert code == 2 and line in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_the_same_rules_in_eval_and_in_the_vllm_engine():
    with pytest.raises(ConfigError, match="rollout.backend=vllm with model.dtype='bfloat16'"):
        load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", ["rollout.backend=vllm",
                                                                          "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"rollout.max_batch=1 with rollout.backend=vllm and classifier-free "
                                          r"guidance \(settings.cfg_scale=0, 0 = the benchmark's, > 1\)"):
        load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", ["rollout.backend=vllm", "rollout.max_batch=1"])
    load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", ["rollout.backend=vllm", "rollout.max_batch=1",
                                                                      "settings.cfg_scale=1"])  # no CFG: one row
    from uniar_ray.config import ModelConfig

    assert feasibility.vllm_engine_problem(ModelConfig(dtype="bfloat16")).startswith("rollout.backend=vllm with")
    src = (REPO / "uniar_ray/rollout/vllm_engine/engine.py").read_text()
    assert "vllm_engine_problem(model)" in src  # the engine refuses by the same rule, not a copy of it


def test_a_config_for_a_gpu_cluster_loads_on_a_cpu_machine():
    """Rules that need the machine are not applied at load: the GPU recipe is written for the cluster, not for the
    laptop or CPU head node that loads it (its actors check their own node when they start)."""
    cfg = load_config(GRPORunConfig, REPO / "configs/grpo_uniar_rl.yaml")
    assert cfg.model.device == "cuda" and cfg.rollout.placement == "colocated" and cfg.rollout.backend == "torch"
    assert not feasibility.environment_problems(cfg, actors_here=False)  # the driver does nothing on a GPU here


def test_flash_attention_missing_on_the_node_is_refused_before_weights_load(monkeypatch):
    """Where the policy is built (an actor, on its own node): a ConfigError naming the key, before any weights are
    read, instead of an ImportError at the first forward."""
    import sys

    from uniar_ray.model.factory import load_policy

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    with pytest.raises(ConfigError, match="model.attn_impl=flash_attention_2: flash-attn cannot be imported on "
                                          "this node"):
        load_policy("/nonexistent/checkpoint", attn_impl="flash_attention_2")
