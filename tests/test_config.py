"""Config loading: YAML + overrides, unknown keys with suggestions, and every shipped YAML loads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from uniar_ray import config as C

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class _Inner:
    temperature: float = 1.0
    names: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    steps: int = 3


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  temperature: 2\nsteps: 5\n")
    cfg = C.load_config(_Outer, f, ["inner.names=[a, b]", "steps=7"])
    assert cfg.inner.temperature == 2.0 and isinstance(cfg.inner.temperature, float)
    assert cfg.inner.names == ["a", "b"] and cfg.steps == 7


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown key 'inner.temperatur'.*did you mean 'inner.temperature'"):
        C.load_config(_Outer, None, ["inner.temperatur=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(C.ConfigError, match="steps must be int"):
        C.load_config(_Outer, None, ["steps=abc"])


def test_validation_in_post_init():
    with pytest.raises(C.ConfigError, match="multiples of 32"):
        C.SamplingConfig(ar_height=100)
    with pytest.raises(C.ConfigError, match="cfg_scale"):
        C.SamplingConfig(cfg_scale=0.5)


def test_round_trip_to_dict():
    cfg = C.load_config(_Outer, None, ["inner.temperature=0.5"])
    assert C.from_dict(_Outer, C.to_dict(cfg)) == cfg


def test_every_shipped_yaml_loads():
    from jobs import CONFIG_SCHEMAS

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "configs/ should ship at least one YAML"
    for f in files:
        schema = CONFIG_SCHEMAS.get(f.relative_to(REPO / "configs").parts[0].removesuffix(".yaml"))
        schema = schema or CONFIG_SCHEMAS.get(f.stem)
        assert schema is not None, f"{f}: no config schema registered for it in jobs.CONFIG_SCHEMAS"
        C.load_config(schema, f)


def test_float_in_exponent_notation_without_a_dot():
    cfg = C.load_config(_Outer, None, ["inner.temperature=1e-6"])  # YAML 1.1 parses this as a string
    assert cfg.inner.temperature == 1e-6
