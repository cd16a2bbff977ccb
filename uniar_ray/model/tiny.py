"""Seeded tiny UniAR models and a locally built tokenizer with Qwen's special tokens (no downloads).

Keeps every structural feature of the published model (4 levels, merge 2, D = 64, visual-decoder stack, deepstack,
interleaved M-RoPE, GQA, q/k norm, RMSNorm head) at a size that runs on CPU in milliseconds. head_dim 32 so vLLM's
CPU backend can run it too. ``write_tiny_checkpoint`` saves through the same format a published checkpoint uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .configuration import TextConfig, UniARConfig, VisionConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
IMAGE_GEN_TOKEN = "<image_gen>"

# What Qwen3-VL's template renders for plain messages (no default system prompt; an image item becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands per merged patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Prompts in the shipped RL/eval files are English; the byte-level BPE still encodes any text.
_CORPUS = [
    "a photo of a red cat and a blue dog on the left of a green bench",
    "generate image 16 16 a poster with the text Hello World in bold letters",
    "a lighthouse on a rocky cliff at sunset, photorealistic, cinematic, 8K resolution",
    "two apples, three oranges, four bananas above a wooden table below a white wall",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"()-",
]


def tiny_config(vocab_size: int = 320, **text_overrides) -> UniARConfig:
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                rope_theta=10000.0, rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5],
                                                  "mrope_interleaved": True})
    text.update(text_overrides)
    vision = VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                          num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2], bsq_dim=64, bsq_hidden_dim=32)
    return UniARConfig(text_config=TextConfig(**text), vision_config=vision, vistok_pred=True,
                       vistok_pred_layernorm=True, visual_transformer_decoder=True, visual_transformer_decoder_depth=2)


def bench_config(vocab_size: int = 320) -> UniARConfig:
    """The published layer proportions scaled down (hidden 256, 18 backbone layers, visual-decoder depth 2)."""
    cfg = tiny_config(vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    cfg.vision_config.out_hidden_size = 256
    cfg.vision_config.hidden_size = 64
    cfg.vision_config.bsq_hidden_dim = 128
    return cfg


def build_tokenizer():
    """A byte-level BPE tokenizer whose first ids are Qwen's special tokens; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="left")
    fast.add_tokens([IMAGE_GEN_TOKEN])
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_policy(seed: int = 0, config: UniARConfig | None = None, dtype: torch.dtype = torch.float32):
    """A seeded random tiny policy with its tokenizer attached (token ids in the config match the tokenizer)."""
    from .policy import UniARPolicy

    tokenizer = build_tokenizer()
    cfg = config or tiny_config()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    for k, v in ids.items():
        setattr(cfg, k, v)
    cfg.text_config.vocab_size = max(cfg.text_config.vocab_size, len(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    policy = UniARPolicy(cfg)
    _init_weights(policy, gen)
    policy.tokenizer = tokenizer
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    policy.generation_config = {"eos_token_id": [end, pad], "pad_token_id": pad}  # as Qwen3-VL's
    return policy.to(dtype).eval()


def _init_weights(module: nn.Module, gen: torch.Generator, std: float = 0.05) -> None:
    # std 0.05 (not HF's 0.02) so tiny models have clearly non-uniform bit distributions: tests that compare
    # log-probabilities are then not trivially satisfied by logits near zero.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def write_tiny_checkpoint(folder: str | Path, seed: int = 0, config: UniARConfig | None = None) -> Path:
    """Save a tiny AR model like a published ``ar_model`` folder (config.json, safetensors, tokenizer files)."""
    folder = Path(folder)
    policy = build_tiny_policy(seed, config)
    policy.save_pretrained(folder)
    write_preprocessor_config(folder, policy.config.vision_config)
    return folder


def write_preprocessor_config(folder: Path, vision, min_pixels: int = 64 * 64, max_pixels: int = 256 * 256) -> None:
    """The Qwen2-VL image processor settings for the model's vision tower (Qwen3-VL's mean/std 0.5); the pixel
    budget is small so the tiny model answers about any picture in milliseconds."""
    cfg = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
           "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
           "merge_size": vision.spatial_merge_size, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "do_convert_rgb": True, "resample": 3, "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
