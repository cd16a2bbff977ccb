"""The configuration machinery every area shares: YAML + ``a.b=c`` overrides into nested dataclasses, per-key
rules by field name and type, and the command-line parsing of the jobs.

    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", ["grpo.beta=0.0"])   # ConfigError lists problems
YAML files carry values only; the dataclasses (one module per area of this package) are the single schema.
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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
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
    aliases = getattr(cls, "YAML_ALIASES", {})  # a YAML key that cannot be a field name (e.g. `class`)
    kwargs, problems = {}, []
    for key, value in data.items():
        full = f"{prefix}{key}"
        source = _source(full, where, from_cli)
        key = aliases.get(key, key)
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

