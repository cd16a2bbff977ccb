"""Can this combination run? The one rule set every job applies when its config is loaded (``GRPORunConfig``,
``EvalConfig`` and ``DemoConfig`` call ``check`` from ``__post_init__``) and ``--plan`` applies too: a config the
code would refuse later (in an actor, after minutes of loading) is refused here, one line per problem naming the key
and what to use instead.

    problems = config_problems(cfg)          # [] or ["rollout.backend=vllm with model.device='cuda': ...", ...]
    check(cfg)                               # ConfigError listing them
    env = environment_problems(cfg)          # this machine: flash-attn importable, CUDA present (see below)

Two kinds of rules, kept apart on purpose:
- ``config_problems``: the config against itself. A config is often written for a cluster, not for the machine that
  loads it (a laptop running ``--plan``, a CPU head node running the driver), so these rules never look at the
  machine: ``model.device: cuda`` loads fine on a CPU box.
- ``environment_problems``: the config against this machine, applied (by ``uniar_ray.preflight``) only to what runs
  here: the driver's own work always, the actors only when the job starts an embedded local Ray. On a cluster the
  actors check their node themselves when they start (``require_flash_attn`` in ``load_policy``, before any
  weights are read), because the driver cannot see their Python environment.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from uniar_ray.config.base import ConfigError

# Upper bounds that keep the driver's memory finite (it builds one request, one roll-out and one image per sample of
# a step, and one handle per actor): about 100x the published recipe's 512 samples per step and 16 ranks. Past them a
# typo (num_generations=100000000) would allocate for hours instead of failing.
MAX_SAMPLES_PER_STEP = 65536
MAX_ACTORS = 1024  # per pool (rollout, decoder, each reward) and trainer ranks
MAX_SAMPLES_PER_PROMPT = 1024  # eval
MAX_BATCH = 4096  # rows per engine / decoder / Ray Data batch
VLLM_ENGINE = "the UniAR vLLM engine runs on CPU in float32 only"


def check(cfg: Any) -> None:
    """``ConfigError`` listing every problem ``config_problems`` finds (called from the configs' __post_init__)."""
    if problems := config_problems(cfg):
        raise ConfigError("\n".join(problems))


def config_problems(cfg: Any) -> list[str]:
    """Every combination in ``cfg`` (a GRPO, eval or demo config) that the code would refuse later."""
    from uniar_ray.config.eval import EvalConfig
    from uniar_ray.config.grpo import GRPORunConfig

    if isinstance(cfg, GRPORunConfig):
        return _grpo(cfg)
    if isinstance(cfg, EvalConfig):
        return _eval(cfg)
    return model_problems(cfg.model)  # DemoConfig: the policy alone, in the driver


# ----------------------------------------------------------------------------------------------------------------
# One home per rule (the engines call these too)
# ----------------------------------------------------------------------------------------------------------------


def vllm_engine_problem(model: Any) -> str:
    """Why the vLLM rollout engine cannot run ``model`` (a ModelConfig), or "". ``VLLMRolloutEngine`` raises this."""
    if model.device != "cpu":
        return (f"rollout.backend=vllm with model.device={model.device!r}: {VLLM_ENGINE} (its sampler is a V1 CPU "
                "model-runner subclass; GPU needs the Model Runner V2 port in docs/vllm_engine.md); use "
                "rollout.backend=torch on GPU (with rollout.cuda_graph=true rollout.compile=true, as run on an H200)")
    if model.dtype != "float32":
        return (f"rollout.backend=vllm with model.dtype={model.dtype!r}: {VLLM_ENGINE} (vLLM's CPU backend "
                "crashes in bfloat16 on these machines); set model.dtype=float32, or use rollout.backend=torch for "
                "bfloat16")
    return ""


def model_problems(model: Any, key: str = "model") -> list[str]:
    out = []
    if model.attn_impl == "flash_attention_2" and model.device == "cpu":
        out.append(f"{key}.attn_impl=flash_attention_2 with {key}.device=cpu: flash-attn runs on CUDA only; use "
                   f"{key}.attn_impl=sdpa (or eager) on CPU")
    return out


def rollout_problems(model: Any, rollout: Any) -> list[str]:
    """The engine that ``rollout`` builds over ``model`` (uniar_ray/rollout/factory.py)."""
    out = []
    if rollout.backend == "vllm" and (problem := vllm_engine_problem(model)):
        out.append(problem)
    if model.device == "cpu":
        if rollout.cuda_graph:
            out.append("rollout.cuda_graph=true with model.device=cpu: CUDA graphs record GPU kernels; set "
                       "rollout.cuda_graph=false on CPU")
        if rollout.compile:
            out.append("rollout.compile=true with model.device=cpu: it fuses a GPU decode step's small kernels (on "
                       "CPU the oneDNN-packed projections are used instead, and compile would disable them); set "
                       "rollout.compile=false on CPU")
    return out


def gpu_problems(key: str, device: str, num_gpus: float, device_key: str = "") -> list[str]:
    """An actor on ``device`` (the key ``device_key``, default ``<key>.device``) asking Ray for ``<key>.num_gpus``:
    Ray hides every GPU it did not give the actor and shows the ones it gave as cuda:0..k-1, so a CUDA actor without
    GPUs, or on cuda:N past its share, cannot start."""
    device_key = device_key or f"{key}.device"
    if not device.startswith("cuda"):
        return []
    if num_gpus <= 0:
        return [f"{device_key}={device!r} with {key}.num_gpus=0: Ray gives the actor no GPU; set {key}.num_gpus "
                f"(e.g. 1, or 0.5 to share one) or {device_key}=cpu"]
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= max(1, int(num_gpus)):
        return [f"{device_key}={device!r}: an actor sees only the {max(1, int(num_gpus))} GPU(s) Ray gives it, as "
                f"cuda:0..; set {device_key}=cuda (Ray picks the GPU)"]
    return []


def bound(key: str, value: int, limit: int, why: str = "") -> list[str]:
    if value > limit:
        return [f"{key}={value}: over the limit of {limit}{why} (the driver holds state for each; raise it in "
                "uniar_ray/config/feasibility.py if you really mean it)"]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Per job
# ----------------------------------------------------------------------------------------------------------------


def _grpo(cfg: Any) -> list[str]:
    m, r, t, d = cfg.model, cfg.rollout, cfg.trainer, cfg.decoder
    out = model_problems(m) + rollout_problems(m, r)
    out += gpu_problems("trainer", m.device, t.num_gpus, "model.device")
    if m.device.startswith("cuda") and 0 < t.num_gpus < 1 and t.world_size > 1:
        out.append(f"trainer.num_gpus={t.num_gpus:g} with trainer.world_size={t.world_size}: NCCL needs one GPU per "
                   "rank (two ranks on a shared GPU are refused); set trainer.num_gpus=1")
    if r.placement == "separate":  # colocated: the engine lives in the trainer ranks, on their GPUs
        out += gpu_problems("rollout", m.device, r.num_gpus, "model.device")
    out += gpu_problems("decoder", d.device, d.num_gpus)
    out += reward_problems(cfg.rewards)
    samples = cfg.data.prompts_per_step * cfg.grpo.num_generations
    out += bound("samples per step (data.prompts_per_step x grpo.num_generations)", samples, MAX_SAMPLES_PER_STEP)
    out += bound("trainer.world_size", t.world_size, MAX_ACTORS)
    out += bound("rollout.num_actors", r.num_actors, MAX_ACTORS) + bound("decoder.num_actors", d.num_actors, MAX_ACTORS)
    out += bound("rollout.max_batch", r.max_batch, MAX_BATCH) + bound("decoder.max_batch", d.max_batch, MAX_BATCH)
    return out


def reward_problems(rewards: Any) -> list[str]:
    out = []
    for name, spec in rewards.models.items():
        key = f"rewards.models.{name}"
        if spec.kind in ("geneval", "hps", "pickscore", "judge", "self_judge"):  # they load a model on spec.device
            out += gpu_problems(key, spec.device, spec.num_gpus)
        if spec.kind == "judge" and spec.backend == "vllm" and (spec.device == "cpu" or spec.num_gpus < 1):
            out.append(f"{key}.backend=vllm: the vLLM judge runs on whole GPUs (tensor parallel over num_gpus); set "
                       f"{key}.device=cuda and {key}.num_gpus >= 1, or {key}.backend=transformers on CPU")
        out += bound(f"{key}.num_actors", spec.num_actors, MAX_ACTORS)
        out += _target_problems(key, spec)
    return out


def _target_problems(key: str, spec: Any) -> list[str]:
    """The programmatic rewards' targets, as their constructors (rewards/programmatic.py) would refuse them."""
    t = spec.target
    if not t or spec.kind not in ("brightness", "target_color"):
        return []
    if spec.kind == "brightness" and not (len(t) == 1 and 0 <= t[0] <= 1):
        return [f"{key}.target={t}: brightness takes [level], a level in 0..1"]
    if spec.kind == "target_color" and not (len(t) == 3 and all(0 <= c <= 255 for c in t)):
        return [f"{key}.target={t}: target_color takes [r, g, b], each in 0..255"]
    return []


def _eval(cfg: Any) -> list[str]:
    m, r, d = cfg.model, cfg.rollout, cfg.decoder
    out = model_problems(m) + rollout_problems(m, r)
    out += gpu_problems("rollout", m.device, r.num_gpus, "model.device")
    out += gpu_problems("decoder", d.device, d.num_gpus)
    if r.backend == "vllm" and r.max_batch < 2 and cfg.settings.cfg_scale != 1:  # 0: the benchmarks' cfg, >= 2
        out.append(f"rollout.max_batch={r.max_batch} with rollout.backend=vllm and classifier-free guidance "
                   f"(settings.cfg_scale={cfg.settings.cfg_scale:g}, 0 = the benchmark's, > 1): the vLLM engine "
                   "decodes a CFG sample's two rows together; set rollout.max_batch >= 2")
    out += bound("benchmark.samples_per_prompt", cfg.benchmark.samples_per_prompt, MAX_SAMPLES_PER_PROMPT)
    out += bound("batch_size", cfg.batch_size, MAX_BATCH) + bound("rollout.max_batch", r.max_batch, MAX_BATCH)
    out += bound("rollout.num_actors", r.num_actors, MAX_ACTORS) + bound("decoder.num_actors", d.num_actors, MAX_ACTORS)
    return out


# ----------------------------------------------------------------------------------------------------------------
# This machine
# ----------------------------------------------------------------------------------------------------------------


def require_flash_attn(key: str = "model.attn_impl") -> None:
    """Raise ``ConfigError`` when flash-attn cannot be imported here. Called where the policy is built (actors on
    their own node, before reading weights), since only that process knows its Python environment."""
    try:
        import flash_attn  # noqa: F401 - a package that is installed but cannot load (no CUDA runtime) fails too
    except ImportError as e:
        raise ConfigError(f"{key}=flash_attention_2: flash-attn cannot be imported on this node ({e}); install it "
                          "(pip install flash-attn, CUDA only) or use attn_impl=sdpa, which takes flash kernels when "
                          "nothing is padded") from None


def environment_problems(cfg: Any, actors_here: bool) -> list[str]:
    """What this machine cannot run of ``cfg``. ``actors_here``: the actors run on this machine too (an embedded
    local Ray), so their devices, packages and resources are this machine's; else only the driver's own work is
    checked (eval scores in the driver)."""
    out = []
    scoring = getattr(cfg, "scoring", None)
    if scoring is not None and scoring.enabled and scoring.device.startswith("cuda") and not _cuda_count():
        out.append(f"scoring.device={scoring.device!r}: the eval driver scores on this machine, which has no CUDA "
                   "GPU; set scoring.device=cpu")
    if not actors_here:
        return out
    devices = [("model", cfg.model.device)] + [("decoder", cfg.decoder.device)]
    devices += [(f"rewards.models.{n}", s.device) for n, s in getattr(getattr(cfg, "rewards", None), "models",
                                                                        {}).items()]
    gpus = _cuda_count()
    for key, device in devices:
        if device.startswith("cuda") and not gpus:
            out.append(f"{key}.device={device!r}: this machine has no CUDA GPU and the job runs its actors here "
                       "(embedded local Ray); set it to cpu, or join a GPU cluster with cluster.address=auto")
    if cfg.model.attn_impl == "flash_attention_2":
        try:
            require_flash_attn()
        except ConfigError as e:
            out.append(str(e))
    if cfg.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        out.append("rollout.backend=vllm: vLLM is not installed here (pip install 'uniar-ray[vllm]'); or use "
                   "rollout.backend=torch")
    return out + _local_resources(cfg, gpus)


def requested_resources(cfg: Any) -> list[tuple[str, int, float, float]]:
    """(what, actors, CPUs each, GPUs each) of every actor pool a GRPO or eval config asks Ray for."""
    r, d = cfg.rollout, cfg.decoder
    pools = []
    if hasattr(cfg, "trainer"):  # GRPO
        t = cfg.trainer
        pools.append(("trainer", t.world_size, t.num_cpus, t.num_gpus))
        pools += [("rewards.models." + n, s.num_actors, s.num_cpus, s.num_gpus) for n, s in cfg.rewards.models.items()]
    if getattr(r, "placement", "separate") == "separate":
        pools.append(("rollout", r.num_actors, r.num_cpus, r.num_gpus))
    pools.append(("decoder", d.num_actors, d.num_cpus, d.num_gpus))
    return pools


def _local_resources(cfg: Any, gpus: int) -> list[str]:
    """An embedded local Ray has this machine's CPUs (``cluster.num_cpus`` caps them) and GPUs: actors that cannot
    be placed wait for resources that never come (a placement timeout, or a roll-out timeout much later)."""
    import os

    pools = requested_resources(cfg)
    have_cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    cpus = sum(n * c for _, n, c, _ in pools)
    want_gpus = sum(n * g for _, n, _, g in pools)
    out = []
    # GRPO's actors must all be up for a step (each takes its share of the requests); eval's Ray Data pools start
    # with the actors that fit, so only GPUs that are not there at all are refused for it
    if hasattr(cfg, "trainer") and cpus > have_cpus + 1e-9:
        listed = ", ".join(f"{k} {n} x {c:g}" for k, n, c, _ in pools if n * c)
        out.append(f"the actors ask for {cpus:g} CPUs ({listed}) and the embedded local Ray has {have_cpus:g} "
                   "(cluster.num_cpus, else this machine's cores); lower the num_cpus / num_actors, or raise "
                   "cluster.num_cpus")
    if want_gpus > gpus + 1e-9:
        listed = ", ".join(f"{k} {n} x {g:g}" for k, n, _, g in pools if n * g)
        out.append(f"the actors ask for {want_gpus:g} GPUs ({listed}) and this machine has {gpus}; lower the "
                   "num_gpus, or join a GPU cluster with cluster.address=auto")
    return out


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
