"""The placement and memory plan of a GRPO run, from its config alone (the model's config.json, no weights): where
each actor lands and what it holds in memory, as one table; ``python -m jobs.grpo --plan`` prints it.

    print(plan_run(cfg, Cluster.from_file("cluster.yaml")))   # PlanError (what does not fit, ways out) otherwise
Memory model (per process): weights; gradients and Adam state split by the ZeRO stage (Rajbhandari et al. 2020,
mixed precision: fp32 master + m + v = 12 bytes per trainable parameter, 8 without a master copy in fp32);
activations per micro-batch (Korthikanti et al. 2022: ~34 bytes x hidden per token per layer in 16 bit without
recomputation; layer inputs only, plus one layer, with gradient checkpointing); the rollout KV cache and the
engine's working memory (in the trainer ranks with colocated rollout). Clusters: uniar_ray/clusters.py.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from uniar_ray.clusters import GIB, Cluster, Node, PlanError  # noqa: F401 (Node, PlanError: re-exported)

PROMPT_TOKENS = 1024  # the reference's max_prompt_length: the activation and KV figures are upper bounds
BITS_PER_TOKEN = 4 * 4 * 64  # levels x sub-patches x BSQ bits of one image token
ACT_BYTES_PER_HIDDEN = 34  # per token per layer, 16-bit activations, flash/SDPA attention (no s^2 term)
# The published decoder (SD3.5-medium-sized transformer + VAE + CLIP-L/G + T5-XXL, all loaded before the text
# encoders are dropped) when its folder is not readable from here: parameters, at the decoder's dtype.
DECODER_PARAMS_ASSUMED = 8.3e9
# The reference's reward models, when their folders are not readable from here: UnifiedReward-2.0-qwen3vl-32b,
# HPSv2.1 (CLIP ViT-H-14), GenEval's Mask2Former detector + CLIP ViT-L/14 colour classifier.
REWARD_PARAMS_ASSUMED = {"judge": 33e9, "hps": 0.99e9, "pickscore": 0.99e9, "geneval": 0.65e9, "ocr": 0.0}
# The published shapes (Qwen3-VL-8B text stack + the UniAR visual stack), for a model.path not readable here
PUBLISHED_CONFIG = Path(__file__).resolve().parents[1] / "perf" / "configs" / "uniar_8b" / "config.json"


@dataclasses.dataclass
class Need:
    """One actor's request and memory (GiB) by part; ``on_gpu``: the memory sits on its GPU(s), else in host RAM."""

    role: str
    cpus: float
    gpus: float
    parts: dict[str, float]
    on_gpu: bool
    alt_activations: float | None = None  # activations the other way (with/without gradient checkpointing)
    node: str = ""
    host: str = ""  # runs inside that actor's process (a colocated engine): no resources of its own

    @property
    def total(self) -> float:
        return sum(self.parts.values())


# ----------------------------------------------------------------------------------------------------------------
# Memory estimates
# ----------------------------------------------------------------------------------------------------------------


def policy_config(model_cfg: Any, notes: list[str] | None = None):
    """The policy's config.json. ``notes``: a plan of a described cluster, where the checkpoint may live on that
    cluster only; a model.path that is not here is then sized as the published UniAR-8B (noted)."""
    from uniar_ray.model.configuration import UniARConfig
    from uniar_ray.model.loading import resolve_ar_folder
    from uniar_ray.model.tiny import tiny_config

    if model_cfg.path == "tiny":
        return tiny_config()
    try:
        return UniARConfig.from_pretrained(resolve_ar_folder(model_cfg.path))
    except FileNotFoundError as e:
        if notes is None or Path(model_cfg.path).exists():
            raise PlanError(f"model.path={model_cfg.path}: {e} (--plan reads only its config.json)") from None
    notes.append(f"model.path={model_cfg.path} not readable here: sized as the published UniAR-8B "
                 f"({PUBLISHED_CONFIG.relative_to(PUBLISHED_CONFIG.parents[3])})")
    return UniARConfig.from_pretrained(PUBLISHED_CONFIG.parent)


def count_params(cfg) -> tuple[int, int]:
    """(all, trained) parameters of the policy ``cfg`` describes, built on the meta device (no memory)."""
    import torch

    from uniar_ray.model.policy import UniARPolicy

    with torch.device("meta"):
        policy = UniARPolicy(cfg)
    total = trained = 0
    for name, p in policy.named_parameters():
        total += p.numel()
        if not name.startswith(FROZEN_PREFIXES):
            trained += p.numel()
    return total, trained


FROZEN_PREFIXES = ("model.visual.", "lm_head.")  # as actors/trainer.py: the vision tower and lm_head stay frozen


def trainer_memory(cfg: Any, total: int, trained: int, model_cfg) -> tuple[dict[str, float], float, float]:
    """Per trainer rank: parts (GiB) with the configured recomputation, and activations (without, with) it."""
    t, w = cfg.trainer, cfg.trainer.world_size
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    zero = t.zero_stage
    parts = {"weights": total * b / (w if zero >= 3 else 1) / GIB,
             "grads": trained * b / (w if zero >= 2 else 1) / GIB,
             "optimizer": trained * (12 if b == 2 else 8) / (w if zero >= 1 else 1) / GIB}
    if cfg.grpo.beta != 0.0:  # a frozen full copy of the same architecture on every rank
        parts["ref model"] = total * b / GIB
    text = model_cfg.text_config
    layers = text.num_hidden_layers + model_cfg.visual_transformer_decoder_depth
    tokens = t.micro_batch_size * (PROMPT_TOKENS + image_tokens(cfg, model_cfg))
    full = tokens * text.hidden_size * ACT_BYTES_PER_HIDDEN * (b / 2) * layers / GIB
    ckpt = (tokens * text.hidden_size * b * layers + tokens * text.hidden_size * ACT_BYTES_PER_HIDDEN * (b / 2)) / GIB
    recompute = getattr(t, "gradient_checkpointing", False)
    parts["activations"] = ckpt if recompute else full
    return parts, full, ckpt


def image_tokens(cfg: Any, model_cfg) -> int:
    d = model_cfg.vision_config.downsample
    return (cfg.ar_height // d) * (cfg.ar_width // d)


def rollout_memory(cfg: Any, model_cfg, rows: int) -> dict[str, float]:
    """An engine's own memory for ``rows`` rows per batch (its weights are counted by the caller): the KV cache and
    its working memory (one layer's prefill activations at the longest prompt, and the per-bit outputs)."""
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    r, text = cfg.rollout, model_cfg.text_config
    n = image_tokens(cfg, model_cfg)
    if r.backend == "vllm":
        kv = r.vllm_kvcache_gib
    else:  # K and V per layer (backbone + visual decoder) for every row of a batch, prompt + image
        layers = text.num_hidden_layers + model_cfg.visual_transformer_decoder_depth
        kv = 2 * layers * text.num_key_value_heads * text.head_dim * b * rows * (PROMPT_TOKENS + n) / GIB
    prefill = rows * PROMPT_TOKENS * (4 * text.hidden_size + 3 * text.intermediate_size) * b
    outputs = rows * n * BITS_PER_TOKEN * (4 + 1)  # float32 log-prob and a bit per sampled bit
    return {"kv cache": kv, "engine work": (prefill + outputs) / GIB}


def colocated_rows(cfg: Any) -> int:
    """Rows per batch of a colocated engine: a rank rolls out its share of the step, max_batch at a time."""
    per_rank = cfg.data.prompts_per_step * cfg.grpo.num_generations // cfg.trainer.world_size
    return max(1, min(cfg.rollout.max_batch, per_rank))


def folder_gib(path: str) -> float | None:
    """Bytes of the weight files under a local folder (links followed), or None when it is not readable here."""
    p = Path(path)
    if not p.is_dir():
        return None
    size = 0
    for root, _, files in os.walk(p, followlinks=True):
        size += sum(Path(root, f).stat().st_size for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    return size / GIB


def decoder_memory(cfg: Any) -> tuple[dict[str, float], str]:
    d = cfg.decoder
    if d.path == "tiny":
        return {"weights": 0.01}, ""
    found = folder_gib(d.path)
    if found is not None:
        return {"weights": found}, ""
    b = 4 if d.dtype == "float32" else 2
    return {"weights": DECODER_PARAMS_ASSUMED * b / GIB}, f"decoder.path not readable here: assumed {DECODER_PARAMS_ASSUMED / 1e9:.1f}B parameters"


def reward_memory(spec: Any, policy_params: int = 0) -> tuple[dict[str, float], str]:
    """``policy_params``: the policy's parameter count (self_judge is a copy of it)."""
    if spec.kind in ("brightness", "target_color") or spec.backend == "http":
        return {"weights": 0.0}, ""
    if spec.class_path:  # your own class: its memory is unknown here
        return {"weights": 0.0}, f"class {spec.class_path}: memory unknown, counted as 0"
    if spec.kind == "self_judge" and spec.model_path != "tiny" and folder_gib(spec.model_path) is None:
        return {"weights": policy_params * (4 if spec.dtype == "float32" else 2) / GIB}, ""
    if spec.model_path in ("", "tiny"):  # OCR (rapidocr's small ONNX models) or a tiny seeded model
        return {"weights": 0.01}, ""
    found = folder_gib(spec.model_path)
    if found is not None:
        return {"weights": found + (folder_gib(spec.clip_path) or 0.0 if spec.clip_path else 0.0)}, ""
    params = REWARD_PARAMS_ASSUMED[spec.kind]
    b = 4 if spec.dtype == "float32" else 2
    return ({"weights": params * b / GIB},
            f"{spec.model_path} not readable here: assumed {params / 1e9:g}B parameters (the reference's model)")


# ----------------------------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------------------------


def place(need: Need, nodes: list[Node], only: list[Node] | None = None) -> str | None:
    """First fit: CPUs, GPU shares with the memory on each GPU, or host memory. The node's name, or None."""
    for node in only or nodes:
        if node.free_cpus + 1e-9 < need.cpus:
            continue
        gpus = _gpu_slots(node, need)
        if gpus is None:
            continue
        if not need.on_gpu and node.free_memory + 1e-9 < need.total:
            continue
        node.free_cpus -= need.cpus
        share = need.total / max(1, len(gpus)) if need.on_gpu else 0.0
        for g in gpus:
            node.gpu_free[g] -= min(need.gpus, 1.0)
            node.gpu_mem_free[g] -= share
        if not need.on_gpu:
            node.free_memory -= need.total
        return node.name + (f" gpu {','.join(map(str, gpus))}" if gpus else "")
    return None


def _gpu_slots(node: Node, need: Need) -> list[int] | None:
    if need.gpus <= 0:
        return []
    if need.gpus >= 1:  # whole GPUs, the memory split across them
        k = int(need.gpus)
        free = [g for g in range(node.gpus) if node.gpu_free[g] >= 1.0 - 1e-9
                and (not need.on_gpu or node.gpu_mem_free[g] + 1e-9 >= need.total / k)]
        return free[:k] if len(free) >= k else None
    for g in range(node.gpus):  # a share of one GPU, next to other actors
        if node.gpu_free[g] + 1e-9 >= need.gpus and (not need.on_gpu or node.gpu_mem_free[g] + 1e-9 >= need.total):
            return [g]
    return None


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


def needs(cfg: Any, described: bool = False) -> tuple[list[Need], list[str]]:
    """Every actor of the run with its resources and memory, trainer ranks first (the largest), and notes.
    ``described``: planned on a described cluster, whose files may not be on this machine."""
    assumed: list[str] = []
    model_cfg = policy_config(cfg.model, assumed if described else None)
    total, trained = count_params(model_cfg)
    notes = assumed + [f"policy: {_n(total)} parameters ({_n(trained)} trained), {cfg.model.dtype}, "
             f"ZeRO-{cfg.trainer.zero_stage} over {cfg.trainer.world_size} rank(s); sequences "
             f"<= {PROMPT_TOKENS} prompt + {image_tokens(cfg, model_cfg)} image tokens"]
    t, r, d = cfg.trainer, cfg.rollout, cfg.decoder
    parts, full, ckpt = trainer_memory(cfg, total, trained, model_cfg)
    recompute = getattr(t, "gradient_checkpointing", False)
    out = [Need(f"trainer rank {i}", t.num_cpus, t.num_gpus, dict(parts), t.num_gpus > 0, full if recompute else ckpt)
           for i in range(t.world_size)]
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    if getattr(r, "placement", "separate") == "colocated":  # the engine runs in each rank over its own parameters
        engine = rollout_memory(cfg, model_cfg, colocated_rows(cfg))
        for rank in out:
            rank.parts.update(engine)
        out += [Need(f"rollout engine {i}", 0, 0, {}, t.num_gpus > 0, host=f"trainer rank {i}")
                for i in range(t.world_size)]
        notes.append(f"rollout: colocated, a torch engine inside each trainer rank over its live parameters "
                     f"({colocated_rows(cfg)} rows per batch; its KV cache and working memory are in the rank's row)")
    else:
        engine = {"weights": total * b / GIB, **rollout_memory(cfg, model_cfg, r.max_batch)}
        out += [Need(f"rollout {i}", r.num_cpus, r.num_gpus, dict(engine), r.num_gpus > 0)
                for i in range(r.num_actors)]
    dec, note = decoder_memory(cfg)
    notes += [note] if note else []
    if getattr(cfg.rewards, "pixel_rewards", True):  # no decoder when every reward reads bits
        out += [Need(f"decoder {i}", d.num_cpus, d.num_gpus, dict(dec), d.num_gpus > 0) for i in range(d.num_actors)]
    for name, spec in cfg.rewards.models.items():
        mem, note = reward_memory(spec, total)
        notes += [f"reward {name}: {note}"] if note else []
        out += [Need(f"reward {name} {i}", spec.num_cpus, spec.num_gpus, dict(mem), spec.num_gpus > 0)
                for i in range(spec.num_actors)]
    return out, notes


def _n(count: int) -> str:
    return f"{count / 1e9:.3g}B" if count >= 1e8 else f"{count / 1e6:.3g}M"


def plan_run(cfg: Any, cluster: Cluster, notes: list[str] | None = None) -> str:
    """Place every actor (trainer ranks as their placement group asks) and return the table; PlanError if any
    actor finds no room, naming it, what it needs, and the ways out. ``notes``: lines to print with the table (what
    the preflight could not check from here)."""
    actors, own = needs(cfg, described=cluster.described)
    notes = own + list(notes or [])
    nodes = cluster.nodes
    strategy = cfg.trainer.placement_strategy
    trainers = [a for a in actors if a.role.startswith("trainer")]
    for a in actors:
        if a.host:  # inside another actor's process: lands where that one does
            continue
        only = None
        if a in trainers and strategy == "STRICT_PACK" and trainers[0].node:
            only = [n for n in nodes if a is not trainers[0] and n.name == trainers[0].node.split()[0]]
        if a in trainers and strategy == "STRICT_SPREAD":
            used = {t.node.split()[0] for t in trainers if t.node}
            only = [n for n in nodes if n.name not in used]
        node = place(a, nodes, only)
        if node is None:
            raise PlanError(_no_room(cfg, a, cluster) + "\n\n" + table(actors, cluster, notes))
        a.node = node
    by_role = {a.role: a for a in actors}
    for a in actors:
        if a.host:
            a.node = by_role[a.host].node
    workers = {a.node.split()[0] for a in actors if a.node} - {cluster.head}
    if cluster.max_workers is not None and len(workers) > cluster.max_workers:
        raise PlanError(f"does not fit: the actors need {len(workers)} worker nodes and {cluster.source} allows "
                        f"max_workers={cluster.max_workers}; raise it, or use fewer or smaller actors\n\n"
                        + table(actors, cluster, notes))
    return table(actors, cluster, notes)


def _no_room(cfg: Any, a: Need, cluster: Cluster) -> str:
    biggest = max((n.gpu_memory_gib for n in cluster.nodes), default=0)
    where = "GPU" if a.on_gpu else "host"
    msg = (f"does not fit: {a.role} needs {a.cpus:g} CPU, {a.gpus:g} GPU and {a.total:.1f} GiB of {where} memory "
           f"({', '.join(f'{k} {v:.1f}' for k, v in a.parts.items())}); ")
    if a.gpus and not any(n.gpus for n in cluster.nodes):
        return msg + (f"{cluster.source} has no GPU (set the actor's num_gpus to 0 and its device to cpu, or "
                      "describe the GPU cluster with --cluster-file).")
    elif a.on_gpu and a.total / max(1.0, a.gpus) > biggest:
        msg += f"the largest GPU in {cluster.source} has {biggest:g} GiB."
    else:
        msg += f"no node of {cluster.source} has that much left after the actors placed before it."
    if a.role.startswith("trainer"):
        ways = []
        if cfg.trainer.zero_stage < 3:
            ways.append("trainer.zero_stage=3 (shard the weights too)")
        ways.append("a larger trainer.world_size (the optimizer state is split across ranks)")
        if not getattr(cfg.trainer, "gradient_checkpointing", False):
            ways.append("trainer.gradient_checkpointing=true")
        if cfg.trainer.micro_batch_size > 1:
            ways.append("a smaller trainer.micro_batch_size")
        if cfg.grpo.beta != 0.0:
            ways.append("grpo.beta=0 (no reference copy)")
        msg += " Ways out: " + "; ".join(ways) + ", or more/larger GPUs."
    else:
        msg += " Ways out: fewer or smaller actors of this kind, num_gpus on a GPU with room, or more nodes."
    return msg


def table(actors: list[Need], cluster: Cluster, notes: list[str]) -> str:
    cols = ["actor", "node", "CPU", "GPU", "weights", "grads", "optimizer", "ref model", "activations", "act. other",
            "kv cache", "engine work", "total GiB", "where"]
    keys = ("weights", "grads", "optimizer", "ref model", "activations")
    rows = [[a.role, a.node or "-", f"{a.cpus:g}", f"{a.gpus:g}"]
            + [f"{a.parts[k]:.2f}" if k in a.parts else "" for k in keys]
            + ["" if a.alt_activations is None else f"{a.alt_activations:.2f}"]
            + [f"{a.parts[k]:.2f}" if k in a.parts else "" for k in ("kv cache", "engine work")]
            + (["", f"in {a.host}"] if a.host else [f"{a.total:.2f}", "GPU" if a.on_gpu else "host"])
            for a in actors]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    head = [f"[plan] cluster: {cluster.source}: {_describe_nodes(cluster.nodes)}", *(f"[plan] {n}" for n in notes),
            "[plan] act. other = activations with gradient checkpointing the other way round"]
    return "\n".join(head + [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _describe_nodes(nodes: list[Node]) -> str:
    """Nodes of one kind once (``gpu_8x-0..3``), in order."""
    groups: list[list[Node]] = []
    for n in nodes:
        same = groups and (groups[-1][0].cpus, groups[-1][0].gpus, groups[-1][0].gpu_memory_gib,
                           groups[-1][0].memory_gib) == (n.cpus, n.gpus, n.gpu_memory_gib, n.memory_gib)
        if same and groups[-1][0].name.rstrip("0123456789") == n.name.rstrip("0123456789"):
            groups[-1].append(n)
        else:
            groups.append([n])
    out = []
    for g in groups:
        n = g[0]
        name = n.name if len(g) == 1 else f"{n.name}..{g[-1].name[len(n.name.rstrip('0123456789')):]}"
        out.append(f"{name} ({n.cpus:g} CPU, {n.gpus} x {n.gpu_memory_gib:g} GiB GPU, {n.memory_gib:.0f} GiB)")
    return ", ".join(out)
