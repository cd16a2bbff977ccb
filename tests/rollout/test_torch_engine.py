"""Torch rollout engine: consistency with the teacher-forced scorer, cache == recompute, seeds, CFG, edit, errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from uniar_ray.model import UniARPolicy, bit_logprobs, generation_text, tokenize
from uniar_ray.rollout import GenerationRequest, Rollout, RolloutError, TorchRolloutEngine
from uniar_ray.sampling import guided_logits

PROMPTS = ["a red cat", "two dogs on a wooden bench under a tree", "a poster"]


def _teacher_forced(policy, prompt, bits, h, w):
    tp = tokenize(policy.tokenizer, [generation_text(prompt, h, w)])
    return policy.bit_logits(tp.input_ids, tp.attention_mask, bits[None].to(policy.device), h, w)[0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.02)])
def test_rollout_logprobs_equal_teacher_forced(tiny_checkpoint, dtype, tol):
    policy = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=dtype)
    engine = TorchRolloutEngine(policy)
    reqs = [GenerationRequest(p, 64, 128, seed=i) for i, p in enumerate(PROMPTS)]  # mixed lengths: left padding
    for req, r in zip(reqs, engine.generate(reqs)):
        assert isinstance(r, Rollout)
        bits = r.bits()
        assert bits.shape == (8, 4, 4, 64) and bits.dtype == torch.uint8 and bits.is_contiguous()
        lp = bit_logprobs(_teacher_forced(policy, req.prompt, bits, 64, 128), bits)
        assert (lp - torch.from_numpy(r.logprobs)).abs().max().item() <= tol


def test_cached_visual_stack_equals_full_recompute(tiny_policy):
    reqs = lambda: [GenerationRequest(p, 128, 128, seed=7 + i) for i, p in enumerate(PROMPTS)]  # noqa: E731
    cached = TorchRolloutEngine(tiny_policy).generate(reqs())
    naive = TorchRolloutEngine(tiny_policy, recompute_visual_stack=True).generate(reqs())
    for a, b in zip(cached, naive):
        assert np.abs(a.logprobs - b.logprobs).max() < 1e-5
        assert torch.equal(a.bits(), b.bits())


def test_same_seed_same_bits_whatever_the_batch(tiny_policy):
    engine = TorchRolloutEngine(tiny_policy)
    alone = engine.generate([GenerationRequest("a red cat", 64, 64, seed=3)])[0]
    mixed = engine.generate([GenerationRequest("something much longer than the other prompt", 64, 64, seed=1),
                             GenerationRequest("a red cat", 64, 64, seed=3)])[1]
    other_seed = engine.generate([GenerationRequest("a red cat", 64, 64, seed=4)])[0]
    assert torch.equal(alone.bits(), mixed.bits())
    assert not torch.equal(alone.bits(), other_seed.bits())


def test_temperature_changes_the_distribution(tiny_policy):
    engine = TorchRolloutEngine(tiny_policy)
    hot, cold = engine.generate([GenerationRequest("a cat", 64, 64, seed=0, temperature=2.0),
                                 GenerationRequest("a cat", 64, 64, seed=0, temperature=0.1)])
    assert hot.logprobs.mean() < cold.logprobs.mean()  # sharper distribution -> likelier samples


def test_shared_cfg_logprobs_are_the_guided_distribution(tiny_policy):
    engine = TorchRolloutEngine(tiny_policy)
    r = engine.generate([GenerationRequest("a red cat", 64, 64, seed=5, cfg_scale=3.0, cfg_mode="shared")])[0]
    bits = r.bits()
    cond = _teacher_forced(tiny_policy, "a red cat", bits, 64, 64).float()
    uncond = _teacher_forced(tiny_policy, "", bits, 64, 64).float()
    lp = bit_logprobs(guided_logits(cond, uncond, 3.0), bits)
    assert (lp - torch.from_numpy(r.logprobs)).abs().max() < 1e-4


def test_reference_cfg_mode_differs_from_shared_after_the_first_token(tiny_policy):
    engine = TorchRolloutEngine(tiny_policy)
    ref, shared = engine.generate([
        GenerationRequest("a red cat", 128, 128, seed=5, cfg_scale=3.0, cfg_mode="reference"),
        GenerationRequest("a red cat", 128, 128, seed=5, cfg_scale=3.0, cfg_mode="shared")])
    assert torch.equal(ref.bits()[0], shared.bits()[0])  # same distribution and uniforms at step 0
    assert not torch.equal(ref.bits(), shared.bits())  # the uncond branch then follows its own tokens


def _png(color=(200, 30, 30), size=(80, 48)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_edit_mode_runs_and_depends_on_the_image(tiny_policy):
    engine = TorchRolloutEngine(tiny_policy)
    a, b, c = engine.generate([GenerationRequest("make it blue", 64, 64, seed=1, image=_png()),
                               GenerationRequest("make it blue", 64, 64, seed=1, image=_png((0, 200, 0))),
                               GenerationRequest("make it blue", 64, 64, seed=1, image=_png(), cfg_scale=2.0)])
    assert isinstance(a, Rollout) and isinstance(b, Rollout) and isinstance(c, Rollout)
    assert not np.allclose(a.logprobs, b.logprobs)


def test_bad_requests_fail_alone(tiny_policy):
    engine = TorchRolloutEngine(tiny_policy)
    out = engine.generate([
        GenerationRequest("ok", 64, 64, request_id="good"),
        GenerationRequest("x", 100, 64, request_id="size"),
        GenerationRequest("  ", 64, 64, request_id="empty"),
        GenerationRequest("x", 64, 64, temperature=0, request_id="temp"),
        GenerationRequest("x", 64, 64, cfg_scale=0.5, request_id="cfg"),
        GenerationRequest("x", 64, 64, image=b"not an image", request_id="img"),
    ])
    assert isinstance(out[0], Rollout)
    errors = {r.request_id: r.error for r in out[1:]}
    assert all(isinstance(r, RolloutError) for r in out[1:])
    assert "multiple of 32" in errors["size"] and "empty prompt" in errors["empty"]
    assert "temperature" in errors["temp"] and "cfg_scale" in errors["cfg"] and "decode" in errors["img"]
    assert all(e.startswith(k) for k, e in errors.items())


def test_update_weights_in_place(tiny_checkpoint):
    policy = UniARPolicy.from_pretrained(tiny_checkpoint)
    engine = TorchRolloutEngine(policy)
    before = engine.generate([GenerationRequest("a cat", 64, 64, seed=0)])[0]
    new = {k: v * 1.5 for k, v in policy.state_dict().items() if k.startswith("output_layer_vistok")}
    engine.update_weights(new)
    after = engine.generate([GenerationRequest("a cat", 64, 64, seed=0)])[0]
    assert not np.allclose(before.logprobs, after.logprobs)
    with pytest.raises(KeyError, match="unknown parameter"):
        engine.update_weights({"nope": torch.zeros(1)})
