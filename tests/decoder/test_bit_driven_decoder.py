"""The GRPO demo's tiny decoder (``decoder.tiny_bit_driven``): its pixel colours follow the bits, unlike the random
tiny decoder's, so a policy that learns visibly changes the picture; and the option is refused where it means
nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from uniar_ray.config import ConfigError, DecoderConfig
from uniar_ray.decoder import load_decoder

RED = np.array([255.0, 0.0, 0.0])


def _redness(images) -> np.ndarray:
    """The demo's target_color reward: 1 - mean RGB distance to red / the largest distance."""
    return np.array([1 - np.linalg.norm(np.asarray(im).reshape(-1, 3) - RED, axis=1).mean() / (255 * 3 ** 0.5)
                     for im in images])


def _decode(decoder, bits):
    return decoder.decode(bits, 64, 64, upsampling_ratio=1.0, num_inference_steps=4, guidance_scale=1.0,
                          seeds=[42] * len(bits))


def test_bit_driven_pixels_follow_the_bits():
    g = torch.Generator().manual_seed(1)
    bits = (torch.rand(8, 4, 4, 4, 64, generator=g) < 0.5).to(torch.uint8)
    spread, change = {}, {}
    for driven in (False, True):
        images = _decode(load_decoder(DecoderConfig(path="tiny", tiny_bit_driven=driven)), bits)
        spread[driven] = _redness(images).std()
        arrays = np.stack([np.asarray(im, dtype=np.float64) for im in images])
        change[driven] = np.abs(arrays[1:] - arrays[:1]).mean()  # same noise, other bits: mean pixel change
    assert spread[True] > 5 * spread[False]  # the reward varies with the bits: something for GRPO to learn
    assert change[True] > 40 and change[True] > 5 * change[False], change


def test_bit_driven_only_for_the_tiny_decoder():
    with pytest.raises(ConfigError, match="tiny_bit_driven"):
        DecoderConfig(path="/ckpt/uniar", tiny_bit_driven=True)


def test_checkpoints_link_the_decoder_the_run_trained_with(tmp_path):
    """A run with the bit-driven decoder links that one into every step-N/model (the folder's name says so): a
    checkpoint decodes exactly as the run's decoder pool did."""
    from uniar_ray.checkpoint import link_decoder
    from uniar_ray.decoder import UniARDecoder

    bits = (torch.rand(2, 4, 4, 4, 64, generator=torch.Generator().manual_seed(3)) < 0.5).to(torch.uint8)
    run = tmp_path / "run"
    for driven in (True, False):
        model = run / "checkpoints" / f"step-00000{int(driven)}" / "model"
        model.mkdir(parents=True)
        found = link_decoder(model, DecoderConfig(path="tiny", tiny_bit_driven=driven), run)
        assert found["sd3_transformer"].parent.name == "tiny_decoder-seed0" + ("-bit_driven" if driven else "")
    model = run / "checkpoints" / "step-000001" / "model"
    linked = _decode(UniARDecoder.from_pretrained(model, dtype=torch.float32), bits)
    pool = _decode(load_decoder(DecoderConfig(path="tiny", tiny_bit_driven=True)), bits)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(linked, pool))
