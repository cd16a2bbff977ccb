"""Helpers for the benchmark tests: small solid-colour images and prompt records."""
from __future__ import annotations

import pytest
from PIL import Image

from benchmarks.common import PromptRecord


def solid(color, size=(12, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture
def make_image():
    return solid


@pytest.fixture
def record():
    return PromptRecord(idx=7, prompt="ein Apfel — äpfel", meta={"tag": "single_object", "note": "日本"})
