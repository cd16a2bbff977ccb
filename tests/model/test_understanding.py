"""Image understanding: text_logits / generate_text invariants (cache, padding, M-RoPE deltas, EOS, sampling) and
the shared context (an image given as its bits answers exactly like the image given as pixels)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uniar_ray.bits import BitsFile
from uniar_ray.model import UniARPolicy, write_tiny_checkpoint
from uniar_ray.model.chat import ChatProcessor
from uniar_ray.model.understanding import next_positions, text_positions

NO_EOS: list[int] = []  # run every row to max_new_tokens


def _image(h, w, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "ar_model", seed=0)


@pytest.fixture(scope="module")
def processor(tiny_policy, chat_folder):
    return ChatProcessor.from_pretrained(chat_folder, tiny_policy.tokenizer, tiny_policy.config.vision_config)


def _uncached_greedy(policy, inputs, steps):
    """The obvious loop: full text_logits over prompt + tokens so far, argmax of the last position."""
    ids, mask, out = inputs.input_ids, inputs.attention_mask, []
    for _ in range(steps):
        logits = policy.text_logits(ids, mask, inputs.pixel_values, inputs.image_grid_thw, inputs.image_bits)
        token = logits[:, -1].argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def test_cached_generate_equals_uncached_loop_with_mixed_image_and_text_rows(tiny_policy, processor):
    """Rows with an image (positions after it run behind the sequence index: the rope delta) and a text-only row,
    left-padded together: the KV-cached loop gives the full-recompute tokens."""
    inputs = processor(["What is this?", "Describe the picture in one long sentence please", "hello"],
                       images=[_image(64, 96), _image(96, 64, seed=1), None])
    assert not bool(inputs.attention_mask[:, 0].all())  # left padding present
    cached = tiny_policy.generate_text(**inputs.model_kwargs(), max_new_tokens=12, eos_token_ids=NO_EOS)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, _uncached_greedy(tiny_policy, inputs, 12))


def test_batch_with_padding_equals_rows_alone(tiny_policy, processor):
    prompts, images = ["What is this?", "hi", "Which colour is the top left corner?"], [_image(64, 64), None,
                                                                                          _image(128, 64, 2)]
    batch = tiny_policy.generate_text(**processor(prompts, images=images).model_kwargs(), max_new_tokens=8,
                                      eos_token_ids=NO_EOS)
    for row, (p, im) in enumerate(zip(prompts, images)):
        alone = tiny_policy.generate_text(**processor([p], images=[im]).model_kwargs(), max_new_tokens=8,
                                          eos_token_ids=NO_EOS)
        assert torch.equal(batch[row], alone[0]), row


def test_positions_after_an_image_follow_get_rope_index(tiny_policy, processor):
    """get_rope_index (transformers 4.57): a 4x6-patch image (2x3 merged) starting at st gets (st, st+r, st+c); the
    text after it continues at max + 1 = st + 3; the first generated token at the last position + 1 (rope delta
    = that - sequence length < 0)."""
    inputs = processor(["What is this?"], images=[_image(64, 96)])
    ids = inputs.input_ids[0].tolist()
    pos = text_positions(tiny_policy, inputs.input_ids, inputs.attention_mask, inputs.image_grid_thw)[:, 0]
    st = ids.index(tiny_policy.config.image_token_id)
    assert pos[:, :st].tolist() == [list(range(st))] * 3
    assert pos[:, st:st + 6].T.tolist() == [[st, st + r, st + c] for r in range(2) for c in range(3)]
    tail = len(ids) - (st + 6)
    assert pos[:, st + 6:].tolist() == [list(range(st + 3, st + 3 + tail))] * 3
    nxt = next_positions(pos[:, None], inputs.attention_mask)
    assert nxt.tolist() == [st + 3 + tail] and nxt.item() - len(ids) == -3  # 6 image tokens span 3 positions


def test_rows_stop_at_eos_and_are_padded_after(tiny_policy, processor):
    inputs = processor(["What is this?", "hello"], images=[_image(64, 64), None])
    free = tiny_policy.generate_text(**inputs.model_kwargs(), max_new_tokens=10, eos_token_ids=NO_EOS)
    eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
    first0 = free[0].tolist().index(eos)
    out = tiny_policy.generate_text(**inputs.model_kwargs(), max_new_tokens=10, eos_token_ids=[eos],
                                    pad_token_id=-7)
    assert out[0, : first0 + 1].tolist() == free[0, : first0 + 1].tolist()
    assert (out[0, first0 + 1:] == -7).all()
    row1 = free[1].tolist()
    stop1 = row1.index(eos) + 1 if eos in row1 else 10
    assert out.shape[1] == max(first0 + 1, stop1)  # trimmed to the longest row
    assert out[1, :stop1].tolist() == row1[:stop1]


def test_sampling_is_seeded_and_validated(tiny_policy, processor):
    kw = processor(["What is this?"], images=[_image(64, 64)]).model_kwargs()
    draw = lambda seed: tiny_policy.generate_text(**kw, max_new_tokens=16, do_sample=True, temperature=2.0,  # noqa
                                                  seed=seed, eos_token_ids=NO_EOS)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    with pytest.raises(ValueError, match="temperature"):
        tiny_policy.generate_text(**kw, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_policy.generate_text(**kw, max_new_tokens=0)


def test_text_logits_shape_and_final_norm(tiny_policy, processor):
    inputs = processor(["What is this?"], images=[_image(64, 64)])
    logits = tiny_policy.text_logits(**inputs.model_kwargs())
    assert logits.shape == (*inputs.input_ids.shape, tiny_policy.config.text_config.vocab_size)
    # The image path (bit_logits) skips the final norm; the text path must not.
    lm = tiny_policy.model.language_model
    norm_w = lm.norm.weight.data.clone()
    try:
        lm.norm.weight.data.mul_(2.0)
        assert not torch.allclose(tiny_policy.text_logits(**inputs.model_kwargs()), logits)
    finally:
        lm.norm.weight.data.copy_(norm_w)


def test_answer_from_bits_equals_answer_from_pixels(tiny_policy, processor):
    """Shared context: the bits the vision tower's own quantiser gives for a picture, fed as image_bits (no pixels,
    no decoder), give the same logits and the same answer as the picture itself."""
    pictures = [_image(64, 96, seed=3), _image(64, 64, seed=4)]
    prompts = ["What is this?", "Describe it"]
    from_pixels = processor(prompts, images=pictures)
    grids = from_pixels.image_grid_thw
    bits = tiny_policy.model.visual.encode_bits(from_pixels.pixel_values, grids)
    sizes = (grids.prod(-1) // 4).tolist()
    files = [BitsFile(b, int(g[1]) * 16, int(g[2]) * 16, "") for b, g in zip(bits.split(sizes), grids)]
    from_bits = processor(prompts, bits=files)
    assert torch.equal(from_bits.input_ids, from_pixels.input_ids)
    assert torch.equal(from_bits.image_grid_thw, grids)
    assert torch.equal(tiny_policy.text_logits(**from_bits.model_kwargs()),
                       tiny_policy.text_logits(**from_pixels.model_kwargs()))
    a = tiny_policy.generate_text(**from_pixels.model_kwargs(), max_new_tokens=10, eos_token_ids=NO_EOS)
    b = tiny_policy.generate_text(**from_bits.model_kwargs(), max_new_tokens=10, eos_token_ids=NO_EOS)
    assert torch.equal(a, b)
    flipped = files[0].bits.clone()
    flipped[:, 0] ^= 1  # other bits, other answer: the bits are really what the model reads
    files[0] = BitsFile(flipped, files[0].ar_height, files[0].ar_width, "")
    assert not torch.equal(tiny_policy.text_logits(**processor(prompts, bits=files).model_kwargs()),
                           tiny_policy.text_logits(**from_pixels.model_kwargs()))


def test_bad_inputs_are_clear_errors(tiny_policy, processor):
    inputs = processor(["What is this?"], images=[_image(64, 64)])
    kw = inputs.model_kwargs()
    short = dict(kw, input_ids=kw["input_ids"][:, 1:], attention_mask=kw["attention_mask"][:, 1:])
    short["input_ids"] = short["input_ids"].clone()
    short["input_ids"][0, short["input_ids"][0].tolist().index(tiny_policy.config.image_token_id)] = 100
    with pytest.raises(ValueError, match="<\\|image_pad\\|> tokens"):
        tiny_policy.text_logits(**short)
    bits = torch.zeros(4, *tiny_policy.bits_shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not both"):
        tiny_policy.text_logits(**dict(kw, image_bits=bits))
    with pytest.raises(ValueError, match="image_bits has shape"):
        tiny_policy.text_logits(**dict(kw, pixel_values=None, image_bits=bits[:3]))
    right = dict(kw, attention_mask=kw["attention_mask"].clone())
    right["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        tiny_policy.generate_text(**right)
    with pytest.raises(ValueError, match="neither pixel_values nor image_bits"):
        tiny_policy.text_logits(inputs.input_ids, inputs.attention_mask)


def test_vision_tower_follows_attn_impl_and_rope_rounding(tiny_checkpoint):
    """The reference's chat.py runs the vision tower with transformers' eager attention on CPU and, after
    ``.to(bfloat16)``, builds its rotary angle table in bf16: set_attn_impl / bf16_rope_tables reproduce both
    (checked bit for bit against the reference; here the invariants that need no reference)."""
    pol = UniARPolicy.from_pretrained(tiny_checkpoint)
    vis = pol.model.visual
    patches = torch.randn(24, 1536, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([[1, 4, 6]])
    sdpa = vis(patches, grid)[0]
    pol.set_attn_impl("eager")
    assert all(b.attn.impl == "eager" for b in vis.blocks)
    torch.testing.assert_close(vis(patches, grid)[0], sdpa, atol=1e-5, rtol=1e-5)  # same maths in fp32
    bf16 = UniARPolicy.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, bf16_rope_tables=True).model.visual
    cos, _ = bf16._rotary(grid)
    inv = bf16.rotary_inv_freq.to(torch.bfloat16)
    table = torch.outer(torch.arange(6, dtype=torch.bfloat16), inv)  # transformers: arange x inv_freq in bf16
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos[1, : inv.numel()], table[0].cos())  # patch (0, 1): row 0 ...
    assert torch.equal(cos[1, inv.numel(): 2 * inv.numel()], table[1].cos())  # ... column 1


def test_chat_template_comes_from_the_checkpoint(tmp_path, tiny_policy, chat_folder):
    """chat_template.jinja, else chat_template.json (Qwen3-VL's published form), else the tokenizer's; none: error."""
    from uniar_ray.model.chat import load_chat_template

    folder = tmp_path / "ck"
    folder.mkdir()
    tok = tiny_policy.tokenizer
    assert load_chat_template(chat_folder, None) == tok.chat_template
    (folder / "chat_template.json").write_text('{"chat_template": "X{{ messages[0][\'role\'] }}"}')
    assert load_chat_template(folder, tok) == "X{{ messages[0]['role'] }}"
    (folder / "chat_template.json").unlink()
    assert load_chat_template(folder, tok) == tok.chat_template
    with pytest.raises(FileNotFoundError, match="no chat template"):
        load_chat_template(folder, type("Tok", (), {"chat_template": None})())
