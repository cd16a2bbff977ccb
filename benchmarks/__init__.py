"""Benchmarks in their official layouts: one self-describing module each (defaults, writer, converter, scorer).

``get("oneig")`` returns the module; every module has ``DEFAULTS``, ``writer(out_dir, ...)``, ``convert(src, dst)``
and ``check_layout(folder, records)``. ``resolve(BenchmarkConfig)`` fills a config's empty fields from DEFAULTS.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

NAMES = ("geneval", "oneig", "longtext", "imgedit", "custom")


def get(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(NAMES)}")
    return importlib.import_module(f"benchmarks.{name}")


@dataclasses.dataclass
class Resolved:
    """A benchmark config with every default filled in: what the eval job reads, writes and generates."""

    module: ModuleType
    prompt_file: Path
    samples_per_prompt: int
    image_root: Path | None
    limit: int | None
    skip_bad_lines: bool
    writer_options: dict[str, Any]
    input_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # edit inputs: custom's image_key

    def writer(self, out_dir: str | Path):
        return self.module.writer(out_dir, samples_per_prompt=self.samples_per_prompt, **self.writer_options)


def resolve(cfg: Any) -> Resolved:
    """``cfg`` is a ``uniar_ray.config.BenchmarkConfig``; empty/zero fields take the benchmark's DEFAULTS."""
    from uniar_ray import datasets

    module = get(cfg.name)
    d = module.DEFAULTS
    root = cfg.image_root or (str(datasets.fetch_folder(d.image_root)) if d.image_root else "")
    return Resolved(
        module=module,
        prompt_file=datasets.resolve(cfg.prompt_file) if cfg.prompt_file else d.prompt_path(),
        samples_per_prompt=cfg.samples_per_prompt or d.samples_per_prompt,
        image_root=Path(root) if root else None,
        limit=cfg.limit or None,
        skip_bad_lines=cfg.skip_bad_lines,
        writer_options={"model_name": cfg.model_name, "pad_missing": cfg.pad_missing},
        input_options={"image_key": cfg.image_key} if cfg.image_key else {},
    )
