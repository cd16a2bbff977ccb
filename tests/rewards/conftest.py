"""Fixtures for the reward tests: tiny seeded reward models written once per session, text rendered by PIL."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from rewards.tiny import tiny_spec_paths

    return tiny_spec_paths(tmp_path_factory.mktemp("tiny_rewards"))


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """``model_path: tiny`` resolves under a per-session folder, not the machine's temp folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("UNIAR_TINY_DIR", str(tmp_path_factory.mktemp("tiny_cache")))
    yield
    mp.undo()


def _font_path() -> str | None:
    try:
        out = subprocess.run(["fc-list", ":lang=en", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    paths = [line.split(":")[0].strip() for line in out.splitlines() if line.strip().endswith((".ttf", ".ttf:"))]
    preferred = [p for p in paths if "DejaVuSans.ttf" in p] + [p for p in paths if "Sans" in p] + paths
    return next((p for p in preferred if Path(p).exists()), None)


@pytest.fixture(scope="session")
def render_text():
    """render_text("Hello") -> [H, W, 3] uint8: black text on white, a TrueType font if the machine has one,
    else PIL's built-in scalable font."""
    from PIL import Image, ImageDraw, ImageFont

    path = _font_path()
    font = ImageFont.truetype(path, 44) if path else ImageFont.load_default(size=44)

    def render(text: str, size=(512, 256)) -> np.ndarray:
        img = Image.new("RGB", size, "white")
        ImageDraw.Draw(img).text((24, size[1] // 2 - 28), text, fill="black", font=font)
        return np.asarray(img)

    return render
