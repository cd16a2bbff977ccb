"""UniARDecoder end to end on the tiny checkpoint: layouts, sizes, per-sample seeds, CFG with zero features,
bad input per sample, the cached prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from uniar_ray.bits import pack_bits
from uniar_ray.decoder import DecodeError, DecodeFailure, DecodeRequest, UniARDecoder
from uniar_ray.decoder.features import decoder_features
from uniar_ray.decoder.tiny import random_bits, write_tiny_decoder_checkpoint

STEPS = 4


def _arr(im) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def test_sizes_square_non_square_and_ratios(tiny_decoder):
    cases = [((64, 64), 1.0, (64, 64)), ((64, 64), 2.0, (128, 128)), ((64, 128), 2.0, (128, 256)),
             ((64, 128), 1.0, (64, 128)), ((96, 64), 1.5, (144, 96)), ((64, 64), 1.3, (80, 80))]
    for (h, w), ratio, (oh, ow) in cases:
        (im,) = tiny_decoder.decode(random_bits(1, h, w), ar_height=h, ar_width=w, upsampling_ratio=ratio,
                                    num_inference_steps=2, guidance_scale=1.5, seeds=[0])
        assert isinstance(im, Image.Image) and im.size == (ow, oh), (h, w, ratio)
        assert oh % 16 == 0 and ow % 16 == 0


def test_noise_is_randn_tensor_with_the_sample_seed(tiny_decoder):
    want = randn_tensor((1, 4, 16, 8), generator=torch.Generator("cpu").manual_seed(123), device=torch.device("cpu"),
                        dtype=torch.float32)
    assert torch.equal(tiny_decoder._noise(123, 16, 8), want)


def test_a_sample_does_not_depend_on_its_batch(tiny_decoder):
    bits = random_bits(3, 64, 64, seed=1)
    alone = tiny_decoder.decode(bits[1:2], ar_height=64, ar_width=64, num_inference_steps=STEPS, seeds=[77])[0]
    other = random_bits(1, 64, 128, seed=2)[0]
    mixed = tiny_decoder.decode([bits[0], other, bits[1], bits[2]], ar_height=[64, 64, 64, 64],
                                ar_width=[64, 128, 64, 64], num_inference_steps=STEPS, seeds=[5, 6, 77, 8])
    assert mixed[1].size == (256, 128)
    assert np.abs(_arr(mixed[2]) - _arr(alone)).max() <= 1  # batched matmuls may round differently
    assert np.abs(_arr(mixed[0]) - _arr(alone)).mean() > 5  # other bits and seed: another image
    again = tiny_decoder.decode(bits[1:2], ar_height=64, ar_width=64, num_inference_steps=STEPS, seeds=[78])[0]
    assert np.abs(_arr(again) - _arr(alone)).mean() > 1  # the seed matters


def test_cfg_runs_uncond_rows_with_zero_features(tiny_decoder, monkeypatch):
    seen, steps_in = [], []
    forward = tiny_decoder.transformer.forward

    def spy(x, text, pooled, t, feature_tokens=None, **kw):
        out = forward(x, text, pooled, t, feature_tokens=feature_tokens, **kw)
        seen.append((x.clone(), feature_tokens.clone(), text.clone(), out[0].clone()))
        return out

    step = FlowMatchEulerDiscreteScheduler.step

    def step_spy(self, model_output, *a, **kw):
        steps_in.append(model_output.clone())
        return step(self, model_output, *a, **kw)

    monkeypatch.setattr(tiny_decoder.transformer, "forward", spy)
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", step_spy)
    bits = random_bits(2, 64, 64, seed=3)
    tiny_decoder.decode(bits, ar_height=64, ar_width=64, upsampling_ratio=2.0, num_inference_steps=2,
                        guidance_scale=2.5, seeds=[1, 2])
    assert len(seen) == 2
    x, tokens, text, out = seen[0]
    assert x.shape[0] == 4 and torch.equal(x[:2], x[2:])
    assert tokens[:2].abs().max() == 0 and tokens[2:].abs().max() > 0
    want = tiny_decoder.transformer.embed_features(decoder_features(tiny_decoder.vision, bits, 64, 64), (4, 4), (8, 8))
    torch.testing.assert_close(tokens[2:], want)
    torch.testing.assert_close(text[:2], text[2:])  # same prompt as the negative prompt
    uncond, cond = out.chunk(2)
    torch.testing.assert_close(steps_in[0], uncond + 2.5 * (cond - uncond))

    seen.clear()
    tiny_decoder.decode(bits, ar_height=64, ar_width=64, num_inference_steps=2, guidance_scale=1.0, seeds=[1, 2])
    assert seen[0][0].shape[0] == 2 and seen[0][1].abs().max() > 0  # no CFG: conditional rows only


def test_bad_samples_fail_alone(tiny_decoder):
    good = random_bits(2, 64, 64, seed=4)
    batch = [good[0], random_bits(1, 64, 128)[0], good[0], good[0], good[1]]
    out = tiny_decoder.decode(batch, ar_height=[64, 64, 48, 64, 64], ar_width=64, upsampling_ratio=[2, 2, 2, 2.5, 1],
                              num_inference_steps=STEPS, seeds=[0, 1, 2, 3, 4], on_error="return")
    assert isinstance(out[0], Image.Image) and isinstance(out[4], Image.Image)
    assert [type(o) for o in out[1:4]] == [DecodeFailure] * 3
    assert "bits have shape (8, 4, 4, 64), a 64x64 image needs (4, 4, 4, 64)" in out[1].error
    assert "ar_height=48: AR sizes must be positive multiples of 32" in out[2].error
    assert "upsampling_ratio=2.5: must be between 1.0 and 2.0" in out[3].error
    alone = tiny_decoder.decode(good[:1], ar_height=64, ar_width=64, num_inference_steps=STEPS, seeds=[0])[0]
    assert np.abs(_arr(out[0]) - _arr(alone)).max() <= 1

    with pytest.raises(DecodeError, match="1 of 2 samples failed") as err:
        tiny_decoder.decode([good[0], good[0] * 2], ar_height=64, ar_width=64, num_inference_steps=1, seeds=[0, 1])
    assert isinstance(err.value.results[0], Image.Image) and "bits must be 0 or 1" in str(err.value)
    with pytest.raises(ValueError, match=r"expected \[B, N, L, U, D\]"):
        tiny_decoder.decode(good[0], ar_height=64, ar_width=64)


def test_decode_requests_bit_packed(tiny_decoder):
    bits = random_bits(2, 64, 64, seed=6)
    reqs = [DecodeRequest.from_bits(bits[0], 64, 64, seed=3, request_id="a"),
            DecodeRequest(pack_bits(bits[1])[:-1], (4, 4, 4, 64), 64, 64, request_id="short"),
            DecodeRequest.from_bits(bits[1], 64, 64, seed=4, upsampling_ratio=1.0, request_id="c")]
    res = tiny_decoder.decode_requests(reqs, upsampling_ratio=2.0, num_inference_steps=STEPS, guidance_scale=1.5)
    assert [r.request_id for r in res] == ["a", "short", "c"]
    assert res[0].ok and res[0].image.shape == (128, 128, 3) and res[0].image.dtype == np.uint8
    assert not res[1].ok and res[1].image is None and "bad bits" in res[1].error and "needs 512" in res[1].error
    assert res[2].ok and res[2].image.shape == (64, 64, 3)
    direct = tiny_decoder.decode(bits[:1], ar_height=64, ar_width=64, num_inference_steps=STEPS, seeds=[3])[0]
    assert np.abs(res[0].image.astype(np.int16) - _arr(direct)).max() <= 1


def test_decode_pixels_stay_on_the_device_and_are_the_images(tiny_decoder):
    """decode_pixels (rewards computed on the GPU) = decode's images before the rounding to uint8; max_batch
    chunks are joined in order."""
    bits = random_bits(3, 64, 64, seed=8)
    old, tiny_decoder.max_batch = tiny_decoder.max_batch, 2  # both calls batch alike (batched matmuls round apart)
    try:
        images = tiny_decoder.decode(bits, ar_height=64, ar_width=64, upsampling_ratio=1.0, num_inference_steps=2,
                                     seeds=[5, 6, 7])
        px = tiny_decoder.decode_pixels(bits, 64, 64, upsampling_ratio=1.0, num_inference_steps=2, seeds=[5, 6, 7])
    finally:
        tiny_decoder.max_batch = old
    assert px.shape == (3, 3, 64, 64) and px.device == tiny_decoder.device and 0 <= float(px.min()) <= 1
    as_uint8 = (px.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).numpy()
    assert all(np.array_equal(a, np.asarray(im)) for a, im in zip(as_uint8, images))
    with pytest.raises(ValueError, match="bits must be 0 or 1"):
        tiny_decoder.decode_pixels(bits * 2, 64, 64, num_inference_steps=1, seeds=[0, 1, 2])


def test_prompt_is_encoded_once_and_text_encoders_dropped(tiny_decoder):
    assert not any(hasattr(tiny_decoder, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "pipeline"))
    p = tiny_decoder.prompt
    assert p.prompt.shape == (1, 77 + 256, 32) and p.pooled.shape == (1, 16)
    assert p.prompt[:, 77:].abs().max() > 0  # T5 states present (a folder without T5 gives zeros there)
    torch.testing.assert_close(p.prompt, p.negative)


def test_layouts_and_missing_parts(tmp_path, tiny_decoder):
    bits = random_bits(1, 64, 64, seed=7)
    ref = tiny_decoder.decode(bits, ar_height=64, ar_width=64, num_inference_steps=2, seeds=[0])[0]
    root = write_tiny_decoder_checkpoint(tmp_path / "at_root", seed=0, ar_at_root=True, with_t5=False)
    assert (root / "config.json").is_file() and (root / "bsq_encoder").is_dir()
    dec = UniARDecoder.from_pretrained(root, dtype=torch.float32)
    assert dec.prompt.prompt[:, 77:].abs().max() == 0  # no T5: zeros, as diffusers' SD3 pipeline does
    im = dec.decode(bits, ar_height=64, ar_width=64, num_inference_steps=2, seeds=[0])[0]
    assert im.size == ref.size
    # explicit component paths override the root
    dec2 = UniARDecoder.from_pretrained(tmp_path / "nowhere", dtype=torch.float32,
                                        bsq_encoder_path=root / "bsq_encoder",
                                        sd3_transformer_path=root / "sd3_transformer",
                                        sd3_pipeline_path=root / "sd3_pipeline")
    assert dec2.decode(bits, ar_height=64, ar_width=64, num_inference_steps=2, seeds=[0])[0].size == ref.size
    with pytest.raises(FileNotFoundError, match="no bsq_encoder/ folder"):
        UniARDecoder.from_pretrained(root / "sd3_pipeline")


def test_deepstack_norm_flag_changes_the_features(tiny_decoder_root, tiny_decoder):
    dec = UniARDecoder.from_pretrained(tiny_decoder_root, dtype=torch.float32, inference_skip_final_layernorm=False)
    assert dec.deepstack_norm and not tiny_decoder.deepstack_norm
    bits = random_bits(1, 64, 64, seed=8)
    a = tiny_decoder.decode(bits, ar_height=64, ar_width=64, num_inference_steps=STEPS, seeds=[0])[0]
    b = dec.decode(bits, ar_height=64, ar_width=64, num_inference_steps=STEPS, seeds=[0])[0]
    assert np.abs(_arr(a) - _arr(b)).mean() > 0.5


def test_bfloat16_decodes(tiny_decoder_root):
    dec = UniARDecoder.from_pretrained(tiny_decoder_root, dtype=torch.bfloat16)
    assert dec.transformer.dtype == torch.bfloat16 and dec.vae.dtype == torch.bfloat16
    (im,) = dec.decode(random_bits(1, 64, 64), ar_height=64, ar_width=64, num_inference_steps=2, seeds=[0])
    assert im.size == (128, 128) and np.asarray(im).std() > 1


def test_config_and_protocol(tiny_decoder):
    from uniar_ray.config import ConfigError, DecoderConfig, load_config
    from uniar_ray.decoder import Decoder

    assert isinstance(tiny_decoder, Decoder)
    cfg = load_config(DecoderConfig, None, ["num_actors=2", "inference_skip_final_layernorm=false", "dtype=bfloat16"])
    assert cfg.num_actors == 2 and cfg.inference_skip_final_layernorm is False
    for bad in (["upsampling_ratio=2.5"], ["dtype=int8"], ["max_batch=0"], ["timeout_s=0"]):
        with pytest.raises(ConfigError):
            load_config(DecoderConfig, None, bad)
