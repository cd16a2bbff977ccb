"""Config as nested dataclasses, loaded from YAML with ``a.b=c`` command-line overrides.

Usage: ``cfg = load_config(GenerateConfig, "configs/demo.yaml", ["sampling.cfg_scale=2.0"])``. YAML files carry
values only; the dataclasses are the single schema. Unknown keys are errors that name the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the schema."""


# ----------------------------------------------------------------------------------------------------------------
# Component configs shared by several jobs. Job-level configs (GRPO, eval, ...) compose these.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
    """Where the AR policy comes from: a checkpoint root (``ar_model/`` inside it, or the AR model at the root), or
    ``tiny`` for the built-in seeded tiny model used by demos and tests."""

    path: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16
    device: str = "cpu"  # cpu | cuda | cuda:N
    tiny_seed: int = 0
    # Attention kernels, the reference's --attn: sdpa (any device; unmasked flash kernels when nothing is padded),
    # eager, or flash_attention_2 (the flash-attn package, CUDA; variable-length kernels for padded batches).
    attn_impl: str = "sdpa"

    def __post_init__(self):
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("model.attn_impl", self.attn_impl, ("sdpa", "eager", "flash_attention_2"))


@dataclasses.dataclass
class SamplingConfig:
    """How the AR policy samples bits (spec §4): AR image size, temperature, classifier-free guidance."""

    ar_height: int = 512
    ar_width: int = 512
    temperature: float = 1.0
    cfg_scale: float = 1.0
    # reference: cond and uncond rows draw their bits independently (the published code; reproduces its numbers).
    # shared: both rows feed back the same bits (standard CFG).
    cfg_mode: str = "reference"

    def __post_init__(self):
        for name in ("ar_height", "ar_width"):
            value = getattr(self, name)
            if value <= 0 or value % 32:
                raise ConfigError(f"sampling.{name}={value}: AR sizes must be positive multiples of 32")
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature={self.temperature}: must be > 0")
        if self.cfg_scale < 1:
            raise ConfigError(f"sampling.cfg_scale={self.cfg_scale}: must be >= 1 (1 disables guidance)")
        _check_choice("sampling.cfg_mode", self.cfg_mode, ("reference", "shared"))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")


# Rules every field obeys by its type and name, in every config (GRPO, eval, sweep, demo): checked per key while a
# file is loaded (so each problem names its key and source) and again on the built config (configs made in code).
NON_NEGATIVE = ("num_cpus", "num_gpus", "num_threads", "delay_s", "vllm_kvcache_gib", "seed", "tiny_seed")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def field_problem(key: str, value: Any) -> str:
    """Why ``value`` cannot be the value of ``key`` (dotted), or "": non-finite floats, negative resources and
    seeds, unknown devices."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={value}: must be a finite number"
    if name in NON_NEGATIVE and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return f"{key}={value}: must be >= 0"
    if name == "device" and isinstance(value, str) and not DEVICE.fullmatch(value):
        return f"{key}={value!r}: expected cpu, cuda or cuda:N"
    return ""


def tree_problems(cfg: Any, prefix: str = "") -> list[str]:
    """``field_problem`` over every field of a built config, nested dataclasses, lists and dicts included."""
    if dataclasses.is_dataclass(cfg):
        items = [(f"{prefix}{f.name}", getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    elif isinstance(cfg, dict):
        items = [(f"{prefix}{k}", v) for k, v in cfg.items()]
    else:
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(cfg)]
    out = []
    for key, value in items:
        if dataclasses.is_dataclass(value) or isinstance(value, (dict, list, tuple)):
            out += tree_problems(value, f"{key}." if not isinstance(value, (list, tuple)) else key)
        elif problem := field_problem(key, value):
            out.append(problem)
    return out


def check_tree(cfg: Any) -> None:
    """Top-level configs call this from ``__post_init__``: one line per problem."""
    if problems := tree_problems(cfg):
        raise ConfigError("\n".join(problems))


def check_upsampling_ratio(key: str, value: float, zero_means_default: bool = False) -> None:
    """The decoder's output scale, shared by GRPO, eval and the decoder pool: in [1, 2] (the SD3 decoder's range)."""
    if zero_means_default and value == 0:
        return
    if not 1.0 <= value <= 2.0:
        default = " (0 = the benchmark's default)" if zero_means_default else ""
        raise ConfigError(f"{key}={value}: must be in [1, 2]{default}")


# ----------------------------------------------------------------------------------------------------------------
# Loading machinery
# ----------------------------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) plus ``a.b=c`` overrides (values parsed as YAML scalars). Every
    problem found is reported, one line each, naming the key and where it came from (the file or the command line).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(path)
    from_cli = set()
    for item in overrides or []:
        from_cli.add(apply_override(data, item))
    where = str(path) if path is not None else "<overrides>"
    return from_dict(cls, data, where=where, from_cli=from_cli)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file (the shipped configs are in configs/)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def apply_override(data: dict[str, Any], item: str) -> str:
    """Set ``data[a][b] = c`` for the override string ``a.b=c``; returns the key ``a.b``."""
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r}: expected the form key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: override {item!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"command line: override {item!r}: the value is not a YAML scalar (quote it)") from None
    return ".".join(parts)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "<config>", prefix: str = "",
              from_cli: set[str] = frozenset()) -> T:
    """Recursively build dataclass ``cls`` from a mapping. Unknown keys (with a suggestion) and values breaking the
    field rules are collected over the whole mapping and raised together, one line per problem; ``from_cli`` holds
    the dotted keys set on the command line, so each line names its source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs, problems = {}, []
    for key, value in data.items():
        full = f"{prefix}{key}"
        source = _source(full, where, from_cli)
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.0)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            problems.append(f"{source}: unknown key '{full}'{hint}")
            continue
        try:
            kwargs[key] = _coerce(hints[key], value, source, full, from_cli)
        except ConfigError as e:
            problems += str(e).splitlines()
            continue
        if problem := field_problem(full, kwargs[key]):
            problems.append(f"{source}: {problem}")
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        return _raise_with_source(e, prefix, where, from_cli)


def _source(key: str, where: str, from_cli: set[str]) -> str:
    """The command line when the key, or a section holding it, was set there; else the file."""
    parts = key.split(".")
    if any(".".join(parts[:i]) in from_cli for i in range(1, len(parts) + 1)):
        return "command line"
    return where


def _raise_with_source(e: ConfigError, prefix: str, where: str, from_cli: set[str]):
    """A ``__post_init__`` rule names its key (``grpo.beta=...``): attribute each line to the command line when a
    key of this section with that name was set there, else to the file."""
    lines = []
    for line in str(e).splitlines():
        if line.startswith(("command line: ", f"{where}: ")):
            lines.append(line)
            continue
        names = [k.rsplit(".", 1)[-1] for k in from_cli if k.startswith(prefix)]
        named = any(re.search(rf"\b{re.escape(name)}\b", line) for name in names)
        lines.append(f"{'command line' if named else where}: {line}")
    raise ConfigError("\n".join(lines)) from None


def _coerce(tp: Any, value: Any, where: str, name: str, from_cli: set[str] = frozenset()) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where, prefix=f"{name}.", from_cli=from_cli)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where, name) if len(args) == 1 else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, where, f"{name}[{i}]", from_cli) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2:
            return {k: _coerce(args[1], v, where, f"{name}.{k}", from_cli) for k, v in value.items()}
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: {name} must be float, got {value!r}") from None
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: {name} must be {tp.__name__}, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be int, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view (for logging and for writing the resolved config next to a run's outputs)."""
    return dataclasses.asdict(cfg)


def parse_cli(cls: type[T], argv: list[str] | None, default_config: str | None = None,
              add_flags: typing.Callable[[Any], None] | None = None) -> tuple[T, Any]:
    """Shared ``--config FILE [--resume [PATH]] [a.b=c ...]`` parsing for the jobs; ``add_flags(parser)`` adds a
    job's own flags. Returns (config, argparse namespace); ``args.resume`` is False, True or a path."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=default_config, help="YAML file in configs/")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                        help="continue the run in the configured run dir, or the run / checkpoint folder PATH")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    if add_flags is not None:
        add_flags(parser)
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume a.b=c`: an override, not a path
        args.resume = True
    return load_config(cls, args.config, args.overrides), args


@dataclasses.dataclass
class DemoConfig:
    """``jobs.demo``: generate a few images with a (tiny or published) policy and write PNGs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(ar_height=128, ar_width=128))
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a red apple on a wooden table"])
    seed: int = 0
    out_dir: str = "runs/demo"

    def __post_init__(self):
        check_tree(self)


# ----------------------------------------------------------------------------------------------------------------
# Rewards (rewards/, actors/reward_models.py)
# ----------------------------------------------------------------------------------------------------------------

REWARD_KINDS = ("ocr", "geneval", "hps", "pickscore", "judge", "brightness", "target_color")


@dataclasses.dataclass
class RewardSpec:
    """One reward model: what it is, its weight in the total, where its weights live, and its Ray resources.

    ``model_path`` is a local folder (no hub downloads), or ``tiny`` for a seeded tiny model written on the fly
    (demos, tests, benchmarks). A kind ignores the fields it does not use."""

    kind: str = ""  # one of REWARD_KINDS; empty = the name the spec is registered under
    weight: float = 1.0
    # Routing override: the tasks this reward scores. None = the kind's default (geneval -> ["geneval"],
    # ocr -> ["ocr"], every other kind -> every sample).
    tasks: list[str] | None = None
    model_path: str = ""  # geneval: detector; hps/pickscore: CLIP folder; judge: VLM folder
    clip_path: str = ""  # geneval: CLIP for the colour classifier
    checkpoint: str = ""  # hps: HPS_v2.1_compressed.pt (open_clip layout, converted to transformers on load)
    backend: str = "transformers"  # judge: transformers (CPU or GPU) | vllm (GPU)
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    batch_size: int = 16  # model forward batch inside one call
    max_new_tokens: int = 256  # judge
    missing_score: str = "nan"  # judge: a reply without all three scores -> nan (failure) | zero (reference)
    target: list[float] | None = None  # brightness: [level in 0..1]; target_color: [r, g, b] in 0..255
    delay_s: float = 0.0  # programmatic kinds: simulated latency per call (tests and benchmarks)
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    timeout_s: float = 600.0  # per call; a timed-out call scores NaN and its actor is restarted

    def __post_init__(self):
        if self.kind:
            _check_choice("reward.kind", self.kind, REWARD_KINDS)
        _check_choice("reward.backend", self.backend, ("transformers", "vllm"))
        _check_choice("reward.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("reward.missing_score", self.missing_score, ("nan", "zero"))
        if self.num_actors < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("reward: num_actors, batch_size and max_new_tokens must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.timeout_s <= 0 or self.delay_s < 0:
            raise ConfigError("reward: num_cpus/num_gpus/delay_s must be >= 0 and timeout_s > 0")


@dataclasses.dataclass
class RewardConfig:
    """Named rewards combined by a weighted nansum (spec §7.3), each in its own Ray actor pool.

    YAML: ``models: {ocr: {weight: 1.0}, hps: {model_path: ..., checkpoint: ..., num_gpus: 1}}``; the key is the
    reward's name and, unless ``kind`` says otherwise, its kind."""

    models: dict[str, RewardSpec] = dataclasses.field(default_factory=dict)
    max_restarts: int = 2  # Ray restarts a dead reward actor this many times
    max_task_retries: int = 1  # a call interrupted by an actor death is retried on the restarted actor
    wire_format: str = "array"  # array: uint8 [H, W, 3] | png: encoded bytes (smaller across nodes)
    max_image_pixels: int = 4096 * 4096  # larger images (and decompression bombs) are rejected per sample
    max_image_bytes: int = 64 * 2**20

    def __post_init__(self):
        for name, spec in self.models.items():
            if not spec.kind:
                if name not in REWARD_KINDS:
                    raise ConfigError(f"rewards.models.{name}: set kind (one of {', '.join(REWARD_KINDS)})")
                spec.kind = name
            need = {"geneval": ("model_path", "clip_path"), "hps": ("model_path",), "pickscore": ("model_path",),
                    "judge": ("model_path",)}.get(spec.kind, ())
            for key in need:
                if not getattr(spec, key):
                    raise ConfigError(f"rewards.models.{name}: {spec.kind} needs {key} (a local folder, or tiny)")
        _check_choice("rewards.wire_format", self.wire_format, ("array", "png"))
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ConfigError("rewards: max_restarts and max_task_retries must be >= 0")
        if self.max_image_pixels <= 0 or self.max_image_bytes <= 0:
            raise ConfigError("rewards: image limits must be positive")

    @property
    def weights(self) -> dict[str, float]:
        return {name: spec.weight for name, spec in self.models.items()}


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks (benchmarks/; the generation defaults per benchmark are benchmarks.<name>.DEFAULTS)
# ----------------------------------------------------------------------------------------------------------------

BENCHMARK_NAMES = ("geneval", "oneig", "longtext", "imgedit", "custom")


@dataclasses.dataclass
class BenchmarkConfig:
    """Which benchmark an eval run writes and where its inputs come from. Empty / zero values mean the
    benchmark's own default (its registered prompt file, samples per prompt, image root; uniar_ray/datasets.py)."""

    name: str = "geneval"
    prompt_file: str = ""
    limit: int = 0  # first N prompts; 0 = all
    skip_bad_lines: bool = False  # report malformed prompt lines and go on instead of failing
    samples_per_prompt: int = 0
    image_root: str = ""  # edit benchmarks: folder holding meta.input_image paths
    image_key: str = ""  # custom: the record field naming an input image under image_root (edit mode)
    model_name: str = "uniar"  # oneig: the <model> folder under text/
    pad_missing: bool = False  # oneig: pad a prompt with missing samples with exactly-black tiles
    # Limits checked before any work is queued. A longer prompt is cut to its first max_prompt_tokens tokens
    # (truncate: the reference's max_prompt_length 1024) or refused (error); 0 = no limit.
    max_prompt_tokens: int = 1024
    prompt_overflow: str = "truncate"  # truncate | error
    max_input_image_pixels: int = 4096 * 4096  # edit inputs over this (from the header) fail for their record only
    max_input_image_bytes: int = 32 * 2**20

    def __post_init__(self):
        _check_choice("benchmark.name", self.name, BENCHMARK_NAMES)
        if self.name == "custom" and not self.prompt_file:
            raise ConfigError("benchmark.name=custom needs benchmark.prompt_file=FILE.jsonl ({idx, prompt, meta} "
                              "lines)")
        if self.name == "custom" and bool(self.image_root) != bool(self.image_key):
            raise ConfigError("benchmark.image_root and benchmark.image_key must be set together (edit mode): the "
                              "input image is <image_root>/<the record's image_key value>")
        if self.image_key and self.name != "custom":
            raise ConfigError(f"benchmark.image_key is for benchmark.name=custom ({self.name} has a fixed layout)")
        _check_choice("benchmark.prompt_overflow", self.prompt_overflow, ("truncate", "error"))
        if min(self.max_prompt_tokens, self.max_input_image_pixels, self.max_input_image_bytes) < 0:
            raise ConfigError("benchmark: max_prompt_tokens, max_input_image_pixels and max_input_image_bytes must "
                              "be >= 0 (0 = no limit)")
        if self.limit < 0 or self.samples_per_prompt < 0:
            raise ConfigError("benchmark: limit and samples_per_prompt must be >= 0 (0 = default)")
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"benchmark.model_name={self.model_name!r}: a plain folder name")


# ----------------------------------------------------------------------------------------------------------------
# Rollout engines (uniar_ray/rollout/, actors/rollout_engine.py)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RolloutConfig:
    """How many rollout actors, on what resources, with which engine (torch: KV-cached reference path; vllm)."""

    backend: str = "torch"  # torch | vllm
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch: int = 16  # rows (x2 with CFG) per engine call
    num_threads: int = 0  # torch threads inside the actor (0: torch's default)
    vllm_kvcache_gib: float = 1.0  # vllm: paged KV cache for both stacks (kv_cache_memory_bytes), GiB
    timeout_s: float = 1800.0  # per driver wait on a step's roll-out (and on a weight load); past it the job stops
    # torch engine on CUDA (perf/RESULTS.md, "Rollout on a GPU"): record each decode step in a CUDA graph, and fuse
    # each layer's elementwise work with torch.compile (a minute of compilation per process). Both off on CPU.
    cuda_graph: bool = False
    compile: bool = False

    def __post_init__(self):
        _check_choice("rollout.backend", self.backend, ("torch", "vllm"))
        if (self.cuda_graph or self.compile) and self.backend != "torch":
            raise ConfigError("rollout.cuda_graph and rollout.compile apply to rollout.backend=torch")
        if not self.timeout_s > 0:
            raise ConfigError(f"rollout.timeout_s={self.timeout_s}: must be > 0")
        if self.num_actors < 1 or self.max_batch < 1:
            raise ConfigError("rollout.num_actors and rollout.max_batch must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# GRPO (uniar_ray/grpo.py) and RL data (uniar_ray/data.py)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPOConfig:
    """GRPO hyper-parameters, with the reference's names and its launch-script values (spec §7.8; where the launch
    script and TRL's GRPOConfig differ, the launch script wins: lr 5e-6 not 1e-6, beta 0.01 not 0.0)."""

    # Optimiser and schedule (AdamW; max_grad_norm 0 = no clipping)
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "linear"  # linear | constant
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    # Groups and sampling
    num_generations: int = 16  # G rollouts per prompt
    num_iterations: int = 1  # optimizer steps per generation batch
    temperature: float = 1.0
    # Advantages (spec §7.5)
    scale_rewards: str | bool = "group"  # group (True) | batch | none (False)
    all_nan_rewards: str = "exclude"  # rows no reward applies to: exclude | zero (the reference: 0 + a warning)
    # Failure budget: the job stops, naming the causes, when more than this fraction of the prompt groups was
    # excluded (failed decodes or rewards, no applicable reward) over the last failure_window steps; 1.0 = never
    max_excluded_fraction: float = 0.5
    failure_window: int = 3
    # Loss (spec §7.7)
    beta: float = 0.01  # k3 KL weight; 0 = no reference policy
    ref_model_path: str = ""  # the frozen KL reference (the reference's ref_model_name_or_path); "" = model.path
    epsilon: float = 0.2  # lower clip
    epsilon_high: float | None = None  # upper clip; None = epsilon
    delta: float | None = None  # two-sided clipping: upper bound on the ratio (must be > 1)
    importance_sampling_level: str = "token"  # token (per bit) | sequence (per image)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    loss_use_float: bool = True  # score the bit logits in fp32
    logits_use_temperature: bool = True  # divide the logits by temperature before the log-softmax
    bsq_loss_normalize: bool = False  # grpo: per-sample sum over bits / N (1024x the default scale, spec §7.7)
    max_completion_length: int = 256  # only used by dr_grpo's denominator (a text length; kept for parity)
    # Truncated importance sampling against the rollout engine's per-bit log-probs (TRL's names; here it applies
    # to any rollout engine, torch or vLLM)
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_cap: float = 2.0
    # Decoding of rollouts for the rewards
    decode_num_inference_steps: int = 14
    decode_cfg_scale: float = 1.0  # 1.0 = no decoder CFG

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        _check_choice("grpo.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        _check_choice("grpo.all_nan_rewards", self.all_nan_rewards, ("exclude", "zero"))
        if not 0.0 <= self.max_excluded_fraction <= 1.0 or self.failure_window < 1:
            raise ConfigError(f"grpo.max_excluded_fraction={self.max_excluded_fraction} must be in [0, 1] and "
                              f"grpo.failure_window={self.failure_window} >= 1")
        _check_choice("grpo.lr_scheduler_type", self.lr_scheduler_type, ("linear", "constant"))
        _check_choice("grpo.importance_sampling_level", self.importance_sampling_level, ("token", "sequence"))
        _check_choice("grpo.loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo"))
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations={self.num_generations}: GRPO needs at least 2 samples per "
                              "prompt to compute group advantages")
        if self.num_iterations < 1 or self.warmup_steps < 0:
            raise ConfigError("grpo.num_iterations must be >= 1 and grpo.warmup_steps >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature={self.temperature}: must be > 0")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("grpo.learning_rate, weight_decay and max_grad_norm must be >= 0")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_epsilon <= 0:
            raise ConfigError("grpo.adam_beta1/adam_beta2 must be in [0, 1) and adam_epsilon > 0")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta={self.beta}: the KL weight must be >= 0")
        if self.ref_model_path and self.beta == 0:
            raise ConfigError(f"grpo.ref_model_path={self.ref_model_path!r} with grpo.beta=0: no KL term, so no "
                              "reference model is loaded; set grpo.beta > 0 or leave ref_model_path empty")
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"grpo.epsilon={self.epsilon}: the lower clip must be in [0, 1)")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"grpo.epsilon_high={self.epsilon_high}: must be >= 0 (or null = epsilon)")
        if self.delta is not None and self.delta <= 1:
            raise ConfigError(f"grpo.delta={self.delta}: the upper bound on the ratio must be > 1 (or null = off); "
                              "at or below 1 it cuts the on-policy ratio itself")
        if self.max_completion_length < 1:
            raise ConfigError("grpo.max_completion_length must be >= 1")
        if self.vllm_importance_sampling_cap <= 0:
            raise ConfigError(f"grpo.vllm_importance_sampling_cap={self.vllm_importance_sampling_cap}: must be > 0")
        if self.decode_num_inference_steps < 1 or self.decode_cfg_scale < 1:
            raise ConfigError("grpo.decode_num_inference_steps must be >= 1 and grpo.decode_cfg_scale >= 1")


@dataclasses.dataclass
class DataConfig:
    """RL prompts: a JSONL file or a YAML mix (spec §7.1-7.2), and how many prompts a step takes.

    A relative ``path`` is looked up in the working directory, the repository root, then as a registered data name
    (uniar_ray/datasets.py: the mirror, the cache, or a verified download)."""

    path: str = "uniar/rl_demo/demo_mix.yaml"
    prompt_key: str = "instruction"
    prompts_per_step: int = 32  # the reference: 512 samples per optimizer step / G 16
    seed: int = 42  # mix sampling and the per-epoch prompt order
    shuffle: bool = True  # the reference's shuffle_dataset
    skip_bad_lines: bool = False  # log, count and skip malformed lines instead of failing
    max_prompt_tokens: int = 1024  # the reference's max_prompt_length; 0 = no limit
    prompt_overflow: str = "truncate"  # a longer prompt: truncate (to its first max_prompt_tokens tokens) | error

    def __post_init__(self):
        _check_choice("data.prompt_overflow", self.prompt_overflow, ("truncate", "error"))
        if self.max_prompt_tokens < 0:
            raise ConfigError(f"data.max_prompt_tokens={self.max_prompt_tokens}: must be >= 0 (0 = no limit)")
        if not self.path.endswith((".jsonl", ".yaml", ".yml")):
            raise ConfigError(f"data.path={self.path!r}: must end in .jsonl (records) or .yaml/.yml (a mix)")
        if not self.prompt_key:
            raise ConfigError("data.prompt_key must not be empty")
        if self.prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step={self.prompts_per_step}: must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Trainer actors and the cluster (actors/trainer.py, jobs/)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainerConfig:
    """Data-parallel trainer actors: DeepSpeed ZeRO (gloo + torch AdamW on CPU, NCCL on GPU)."""

    world_size: int = 1
    micro_batch_size: int = 2  # samples per forward/backward (the reference's per_device_train_batch_size)
    zero_stage: int = 2  # 2 or 3
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_threads: int = 0  # torch threads per actor (0: torch's default)
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    timeout_s: float = 3600.0  # per driver wait on the trainers (a step, a weight publish, a checkpoint)
    placement_timeout_s: float = 300.0  # wait for the ranks' resources at start; past it: an error naming them
    # Recompute layer activations in the backward pass (on in the reference, TRL's default): same gradients,
    # activation memory per micro-batch ~ one layer instead of all of them, about one extra forward of compute.
    gradient_checkpointing: bool = True

    def __post_init__(self):
        if not (self.timeout_s > 0 and self.placement_timeout_s > 0):
            raise ConfigError("trainer.timeout_s and trainer.placement_timeout_s must be > 0")
        if self.world_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("trainer.world_size and trainer.micro_batch_size must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"trainer.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        _check_choice("trainer.placement_strategy", self.placement_strategy,
                      ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclasses.dataclass
class ClusterConfig:
    """Where Ray runs: an address (``auto`` inside ``ray job submit``) or an embedded local instance."""

    address: str = ""  # "" = start a local Ray in the job; "auto" = join the running cluster
    num_cpus: int = 0  # local Ray only; 0 = all cores
    dashboard: bool = False  # local Ray only: start the dashboard (metrics, actor health)
    log_to_driver: bool = False


@dataclasses.dataclass
class TrackingConfig:
    """Experiment trackers for the GRPO job (uniar_ray/tracking.py), both off by default; each logs the keys of
    metrics.jsonl at their step."""

    tensorboard: bool = False  # event files under <run_dir>/tensorboard
    wandb: bool = False  # Weights & Biases, files under <run_dir>/wandb
    wandb_mode: str = "offline"  # offline (no network; `wandb sync <run_dir>/wandb/offline-run-*` later) | online
    wandb_project: str = "uniar_grpo"  # the reference's WANDB_PROJECT
    wandb_name: str = ""  # "" = the run folder's name

    def __post_init__(self):
        _check_choice("tracking.wandb_mode", self.wandb_mode, ("offline", "online"))


# ----------------------------------------------------------------------------------------------------------------
# The GRPO job (jobs/grpo.py)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GRPORunConfig:
    """Everything one GRPO run needs; ``configs/grpo_demo.yaml`` is the embedded CPU demo."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=lambda: DecoderConfig())  # noqa: F821 (appended by the decoder)
    rewards: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    ar_height: int = 512  # the reference's IMAGE_HEIGHT / IMAGE_WIDTH in RL (N = 256)
    ar_width: int = 512
    decode_upsampling_ratio: float = 1.0  # RL decodes at the AR size (the reference's decode server)
    # The decoder's initial noise per image. sample (default, the reference's behaviour: its RL decode server
    # draws fresh noise for every image): its own per sample, reproducible from the sample's seed. group: shared by
    # the G samples of a prompt, new per group. fixed: the same noise (seed grpo.seed) for every sample of every
    # step - a variance reduction for small demos (reward differences then come from the bits alone), not what the
    # reference trains with.
    decode_seed: str = "sample"
    steps: int = 500
    async_mode: str = "sync"  # sync | one_step (decode + score of step k overlap the roll-out of step k+1)
    run_dir: str = "runs/grpo"
    save_every: int = 50
    keep_checkpoints: int = 10
    grid_every: int = 1

    def __post_init__(self):
        for name in ("ar_height", "ar_width"):
            v = getattr(self, name)
            if v <= 0 or v % 32:
                raise ConfigError(f"{name}={v}: AR sizes must be positive multiples of 32")
        _check_choice("async_mode", self.async_mode, ("sync", "one_step"))
        _check_choice("decode_seed", self.decode_seed, ("fixed", "group", "sample"))
        if self.steps < 1 or self.save_every < 1 or self.grid_every < 1:
            raise ConfigError("steps, save_every and grid_every must be >= 1")
        batch = self.data.prompts_per_step * self.grpo.num_generations
        per_rank = self.trainer.world_size
        if batch % per_rank:
            raise ConfigError(f"{batch} samples per step (data.prompts_per_step x grpo.num_generations) do not split "
                              f"evenly across trainer.world_size={per_rank}")
        if not self.rewards.models:
            raise ConfigError("rewards.models is empty: configure at least one reward")
        check_upsampling_ratio("decode_upsampling_ratio", self.decode_upsampling_ratio)
        check_tree(self)


# ----------------------------------------------------------------------------------------------------------------
# Batch evaluation and sweeps (jobs/eval.py, jobs/sweep.py)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalSettings:
    """Generation settings of one eval run; 0 means the benchmark's default (``benchmarks.<name>.DEFAULTS``, the
    reference's launch scripts). Sample k of prompt idx uses seed ``seed + idx * samples_per_prompt + k``."""

    ar_height: int = 0
    ar_width: int = 0
    temperature: float = 0.0
    cfg_scale: float = 0.0
    cfg_mode: str = "reference"  # reference | shared (see SamplingConfig)
    upsampling_ratio: float = 0.0  # decoder output = AR size x ratio, in [1, 2]
    num_inference_steps: int = 0  # decoder steps
    guidance_scale: float = 0.0  # decoder CFG
    seed: int = 0

    def __post_init__(self):
        _check_choice("settings.cfg_mode", self.cfg_mode, ("reference", "shared"))
        for name in ("ar_height", "ar_width"):
            value = getattr(self, name)
            if value < 0 or value % 32:
                raise ConfigError(f"settings.{name}={value}: a positive multiple of 32 (0 = benchmark default)")
        if self.temperature < 0 or self.num_inference_steps < 0 or self.seed < 0:
            raise ConfigError("settings: temperature, num_inference_steps and seed must be >= 0 (0 = default)")
        if self.cfg_scale and self.cfg_scale < 1:
            raise ConfigError(f"settings.cfg_scale={self.cfg_scale}: must be >= 1 (0 = benchmark default)")
        check_upsampling_ratio("settings.upsampling_ratio", self.upsampling_ratio, zero_means_default=True)
        if self.guidance_scale and self.guidance_scale < 1:
            raise ConfigError(f"settings.guidance_scale={self.guidance_scale}: must be >= 1 (0 = default)")


@dataclasses.dataclass
class EvalDecoderConfig:
    """The decoder stage of the eval pipeline: where the decoder lives and the Ray Data actors that run it."""

    path: str = ""  # checkpoint root (bsq_encoder/, sd3_transformer/, sd3_pipeline/); "" = the model's root
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch: int = 8  # samples per denoising batch inside the decoder
    num_threads: int = 0  # torch threads per actor (0: num_cpus, at least 1)

    def __post_init__(self):
        _check_choice("decoder.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.num_actors < 1 or self.max_batch < 1 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("decoder: num_actors and max_batch must be >= 1, num_cpus/num_gpus >= 0")


@dataclasses.dataclass
class EvalScoringConfig:
    """Scoring in the eval job, where local models allow it (ImgEdit's GPT-4o judge never runs here)."""

    enabled: bool = True
    ocr: str = "rapidocr"  # OneIG / LongText text scores: rapidocr | none
    geneval_detector: str = ""  # "" = GenEval is not scored; a local detector folder, or tiny
    geneval_clip: str = ""  # CLIP folder for GenEval's colour classifier (needed with a detector), or tiny
    device: str = "cpu"
    batch_size: int = 8

    def __post_init__(self):
        _check_choice("scoring.ocr", self.ocr, ("rapidocr", "none"))
        if self.geneval_detector and not self.geneval_clip:
            raise ConfigError("scoring.geneval_detector is set: also set scoring.geneval_clip (colour classifier)")
        if self.batch_size < 1:
            raise ConfigError("scoring.batch_size must be >= 1")


@dataclasses.dataclass
class EvalConfig:
    """``jobs.eval``: one benchmark, one model, one set of settings, streamed through Ray Data."""

    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # a checkpoint root, or tiny
    settings: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    rollout: RolloutConfig = dataclasses.field(default_factory=lambda: RolloutConfig(max_batch=8))
    decoder: EvalDecoderConfig = dataclasses.field(default_factory=EvalDecoderConfig)
    scoring: EvalScoringConfig = dataclasses.field(default_factory=EvalScoringConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    batch_size: int = 8  # rows per Ray Data batch (one generation call, one decoder call)
    out_dir: str = ""  # "" = runs/eval/<benchmark>
    # out_dir holds a run with other settings (its config.json identity differs): false = refuse, naming the keys;
    # true = delete that run's images and reports, then start over. The same settings always resume.
    overwrite: bool = False
    tiny_cache: str = "runs/.tiny_checkpoint"  # model.path=tiny: the four-folder tiny checkpoint, written once
    preview_prompts: int = 8  # prompts in preview.png
    progress: bool = True  # tqdm bar (images done, images/s)

    def __post_init__(self):
        if self.batch_size < 1 or self.preview_prompts < 0:
            raise ConfigError("eval: batch_size must be >= 1 and preview_prompts >= 0")
        check_tree(self)


@dataclasses.dataclass
class SweepConfig:
    """``jobs.sweep``: checkpoints x benchmarks x settings, each an eval run; one results table and a plot.

    Each run starts from ``eval_config`` (``{benchmark}`` is replaced by the benchmark's name), then ``overrides``
    (``a.b=c`` strings, as on the command line), then the checkpoint's model and the setting."""

    checkpoints: dict[str, ModelConfig] = dataclasses.field(default_factory=dict)
    # A GRPO run folder: its complete checkpoints join the sweep as ``step-NNNNNN`` (each one's model/ folder; dtype
    # and device from the run's config.json). grpo_steps picks some of them; empty = all.
    grpo_run: str = ""
    grpo_steps: list[int] = dataclasses.field(default_factory=list)
    benchmarks: list[str] = dataclasses.field(default_factory=lambda: ["geneval"])
    settings: list[EvalSettings] = dataclasses.field(default_factory=lambda: [EvalSettings()])
    eval_config: str = "configs/eval/{benchmark}.yaml"
    overrides: list[str] = dataclasses.field(default_factory=list)
    out_dir: str = "runs/sweep"
    overwrite: bool = False  # a cell folder made with other settings: false = refuse; true = clear it (see EvalConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    def __post_init__(self):
        for name in self.benchmarks:
            _check_choice("sweep.benchmarks[]", name, BENCHMARK_NAMES)
        if not (self.checkpoints or self.grpo_run) or not self.benchmarks or not self.settings:
            raise ConfigError("sweep: checkpoints (or grpo_run), benchmarks and settings must each list at least one "
                              "entry")
        if self.grpo_steps and not self.grpo_run:
            raise ConfigError("sweep.grpo_steps is set: also set grpo_run (the GRPO run folder they belong to)")
        bad = [name for name in self.checkpoints if not name or "/" in name]
        if bad:
            raise ConfigError(f"sweep.checkpoints: names are folder names, got {bad}")
        check_tree(self)


# ----------------------------------------------------------------------------------------------------------------
# Decoder pool (uniar_ray/decoder/, actors/decoder_pool.py)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecoderConfig:
    """The visual decoder behind the Ray decoder pool: which checkpoint, the decode defaults a request may leave
    unset, and the pool's actors, batching, backpressure, timeout and retries."""

    path: str = "tiny"  # checkpoint root (bsq_encoder/, sd3_transformer/, sd3_pipeline/), or tiny (seeded)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    tiny_seed: int = 0
    # tiny only: initialised so that the pixel colours follow the bits (the GRPO demo's decoder; see
    # uniar_ray/decoder/tiny.py::make_bit_driven). The random tiny decoder's pixels barely depend on them.
    tiny_bit_driven: bool = False
    # None: the bsq_encoder config.json value when it has one, else true (the reference library's value; its decode
    # server defaults to false, which passes deepstack levels through merger.norm).
    inference_skip_final_layernorm: bool | None = None
    upsampling_ratio: float = 2.0  # output = AR size x ratio, snapped to multiples of 16; in [1, 2]
    num_inference_steps: int = 28
    guidance_scale: float = 1.5  # <= 1 disables CFG
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_threads: int = 0  # torch threads per actor (0: torch's default)
    max_batch: int = 8  # samples per denoising batch, and per actor call
    max_inflight_per_actor: int = 2  # calls queued per actor before submit() blocks (backpressure)
    timeout_s: float = 600.0  # per actor call; a timed-out actor is killed (Ray restarts it) and the call retried
    max_restarts: int = 2  # Ray restarts a dead decoder actor this many times
    max_retries: int = 2  # a call whose actor died or timed out is resubmitted this many times, then fails

    def __post_init__(self):
        _check_choice("decoder.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_upsampling_ratio("decoder.upsampling_ratio", self.upsampling_ratio)
        if self.tiny_bit_driven and self.path != "tiny":
            raise ConfigError(f"decoder.tiny_bit_driven applies to decoder.path=tiny only, not {self.path!r}")
        if self.num_inference_steps < 1:
            raise ConfigError("decoder.num_inference_steps must be >= 1")
        if min(self.num_actors, self.max_batch, self.max_inflight_per_actor) < 1:
            raise ConfigError("decoder: num_actors, max_batch and max_inflight_per_actor must be >= 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_threads < 0 or self.timeout_s <= 0:
            raise ConfigError("decoder: num_cpus/num_gpus/num_threads must be >= 0 and timeout_s > 0")
        if self.max_restarts < 0 or self.max_retries < 0:
            raise ConfigError("decoder: max_restarts and max_retries must be >= 0")
