"""python -m jobs.generate: prompts to PNGs with the reference's options, tiny default model (cached), packed bits
beside the PNG, edit mode, progress bars, and bad arguments refused before any model loads."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from jobs import generate
from uniar_ray.bits import load_bits_file

QUICK = ["--ar_height", "64", "--ar_width", "96", "--upsampling_ratio", "1.5", "--decoder_num_inference_steps", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("uniar-cache")


@pytest.fixture(autouse=True)
def user_cache(cache, monkeypatch):
    monkeypatch.setenv("UNIAR_CACHE_DIR", str(cache))  # the tiny checkpoint is written here once


def test_tiny_prompt_to_png_with_bits_and_progress(tmp_path, cache, capsys):
    out = tmp_path / "sub" / "apple.png"
    [path] = generate.main(["--prompt", "a red apple", "--output", str(out), "--save-bits", *QUICK])
    assert path == out and (cache / "tiny" / "v1-seed0" / "ar_model").is_dir()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (144, 96)  # (width, height) = AR size x 1.5
    saved = load_bits_file(tmp_path / "sub" / "apple.bits.npz")
    assert saved.bits.shape == (2 * 3, 4, 4, 64) and (saved.ar_height, saved.ar_width) == (64, 96)
    assert saved.prompt == "a red apple" and set(saved.bits.unique().tolist()) == {0, 1}
    err = capsys.readouterr().err
    assert "AR steps: 100%" in err and "6/6" in err and "denoising steps: 100%" in err and "2/2" in err


def test_several_prompts_and_edit_mode(tmp_path):
    paths = generate.main(["--prompt", "a red apple", "--prompt", "a blue car", "--output", str(tmp_path / "x.png"),
                           "--seed", "5", "--save_bits", "--no-progress", *QUICK])
    assert paths == [tmp_path / "x_0.png", tmp_path / "x_1.png"] and all(p.is_file() for p in paths)
    Image.new("RGB", (50, 40), (255, 255, 0)).save(tmp_path / "input.png")
    [edited] = generate.main(["--prompt", "a red apple", "--image", str(tmp_path / "input.png"), "--output",
                              str(tmp_path / "edit.png"), "--seed", "5", "--save-bits", "--no-progress", *QUICK])
    assert edited.is_file()
    # the input image conditions the bits: same prompt and seed, different draw
    assert not torch.equal(load_bits_file(tmp_path / "edit.bits.npz").bits, load_bits_file(tmp_path / "x_0.bits.npz").bits)


@pytest.mark.parametrize("args,message", [
    (["--ar_height", "100"], "height=100 is not a positive multiple of 32"),
    (["--upsampling_ratio", "3"], "--upsampling_ratio 3.0: must be in [1, 2]"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--cfg", "0.5"], "--cfg 0.5: must be >= 1"),
    (["--decoder_num_inference_steps", "0"], "--decoder_num_inference_steps 0: must be >= 1"),
    (["--output", "apple.jpg"], "--output apple.jpg: must end in .png"),
    (["--model", "/nonexistent/UniAR"], "--model /nonexistent/UniAR: not a folder"),
    (["--image", "/nonexistent/in.png"], "--image /nonexistent/in.png: no such file"),
    (["--prompt", " "], "--prompt ' ': empty"),
])
def test_bad_arguments_are_refused_before_loading(args, message, capsys, cache):
    base = [] if "--prompt" in args else ["--prompt", "a red apple"]
    with pytest.raises(SystemExit) as exit_:
        generate.main([*base, *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_input_image(tmp_path, capsys):
    from jobs import entry

    (tmp_path / "in.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_:
        entry.run(generate.main, "generate", ["--prompt", "x", "--image", str(tmp_path / "in.png"), "--output",
                                              str(tmp_path / "o.png")])
    assert exit_.value.code == 2 and "--image " in (err := capsys.readouterr().err)
    assert "in.png: cannot decode the input image" in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()
