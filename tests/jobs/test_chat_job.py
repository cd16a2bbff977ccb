"""python -m jobs.chat: the tiny default answers about a picture; --bits answers from a bits file exactly as the
picture whose quantised bits it holds; bad arguments are clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import chat
from uniar_ray.bits import save_bits_file
from uniar_ray.model import UniARPolicy, write_tiny_checkpoint
from uniar_ray.model.chat import ChatProcessor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chatjob") / "ar_model", seed=0)


def _picture(path, h=64, w=96):
    Image.fromarray((np.random.default_rng(5).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_tiny_default_answers(tmp_path, monkeypatch, capsys):
    """No --model: the seeded tiny checkpoint is built once into the user cache and answers on CPU."""
    monkeypatch.setenv("UNIAR_CACHE_DIR", str(tmp_path / "cache"))
    answer = chat.main(["--image", str(_picture(tmp_path / "apple.png")), "--prompt", "What is this?",
                        "--max-new-tokens", "6"])
    assert answer and capsys.readouterr().out.strip().endswith(answer.strip())
    cached = next((tmp_path / "cache" / "tiny").glob("*seed0"))  # the folder name carries a format version
    assert (cached / "ar_model" / "preprocessor_config.json").is_file()


def test_bits_file_answers_like_its_picture(tmp_path, folder):
    picture = _picture(tmp_path / "pic.png")
    policy = UniARPolicy.from_pretrained(folder)
    proc = ChatProcessor.from_pretrained(folder, policy.tokenizer, policy.config.vision_config)
    inputs = proc(["What is this?"], images=[Image.open(picture)])
    bits = policy.model.visual.encode_bits(inputs.pixel_values, inputs.image_grid_thw)
    bits_path = save_bits_file(tmp_path / "pic.bits.npz", bits, 64, 96, prompt="a picture")
    args = ["--model", str(folder), "--prompt", "What is this?", "--max-new-tokens", "12"]
    from_picture = chat.main(args + ["--image", str(picture)])
    from_bits = chat.main(args + ["--bits", str(bits_path)])
    assert from_bits == from_picture
    other = save_bits_file(tmp_path / "other.bits.npz", torch.ones_like(bits), 64, 96)
    assert chat.main(args + ["--bits", str(other)]) != from_picture


def test_bad_arguments(tmp_path, folder):
    with pytest.raises(SystemExit):
        chat.main(["--model", str(folder), "--prompt", "hi"])  # neither --image nor --bits
    from uniar_ray.image_source import ImageSourceError

    with pytest.raises(ImageSourceError, match="no such file"):  # a user error: one line through jobs/entry.py
        chat.main(["--model", str(folder), "--prompt", "hi", "--image", str(tmp_path / "missing.png")])
    (tmp_path / "nochat").mkdir()
    bare = write_tiny_checkpoint(tmp_path / "nochat" / "ar_model")
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        chat.main(["--model", str(bare), "--prompt", "hi", "--image", str(_picture(tmp_path / "p.png"))])


def test_bf16_eager_runs_like_the_reference_chat(tmp_path, folder, capsys):
    """--dtype bfloat16 --attn eager is chat.py's CPU set-up (model.to(bf16): bf16 rotary tables; eager attention)."""
    args = ["--model", str(folder), "--prompt", "What is this?", "--max-new-tokens", "5",
            "--image", str(_picture(tmp_path / "p.png"))]
    answer = chat.main(args + ["--dtype", "bfloat16", "--attn", "eager"])
    assert isinstance(answer, str) and capsys.readouterr().out
