"""Benchmarks in their official layouts: one self-describing module each (defaults, writer, converter, scorer).

``get("oneig")`` returns the module; every module has ``DEFAULTS``, ``writer(out_dir, ...)``, ``convert(src, dst)``
and ``check_layout(folder, records)``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

NAMES = ("geneval", "oneig", "longtext", "imgedit")


def get(name: str) -> ModuleType:
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(NAMES)}")
    return importlib.import_module(f"benchmarks.{name}")
