"""Seeded tiny decoder components built locally (as diffusers' SD3 pipeline tests do) and a tiny checkpoint writer.

``write_tiny_decoder_checkpoint(folder)`` writes the published layout (ar_model/, bsq_encoder/, sd3_transformer/,
sd3_pipeline/) with a tiny SD3 transformer, VAE, CLIP-L/G and T5 and locally built tokenizers: no downloads, and
``UniARDecoder.from_pretrained(folder)`` decodes 128x128 images on CPU in well under a second.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from uniar_ray.model.configuration import VisionConfig
from uniar_ray.model.loading import save_safetensors
from uniar_ray.model.tiny import _init_weights, tiny_config, write_tiny_checkpoint
from uniar_ray.model.vision import VisionModel

from .transformer import SD3TransformerWithBSQ
from .types import DECODER_PROMPT

CLIP_MAX_LENGTH = 77
_T5_WORDS = DECODER_PROMPT.replace(".", " .").split()


def tiny_vision_config() -> VisionConfig:
    """The tiny AR model's vision config (4 levels, merge 2, D = 64, Hv = 32), so decoder features are 128 wide."""
    return tiny_config().vision_config


def random_bits(batch: int, ar_height: int, ar_width: int, seed: int = 0) -> torch.Tensor:
    """Seeded random bits [B, N, L, U, D] (uint8) for the tiny vision config at an AR size."""
    cfg = tiny_vision_config()
    n = (ar_height // cfg.downsample) * (ar_width // cfg.downsample)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (batch, n, cfg.num_levels, cfg.merge_unit, cfg.bsq_dim), generator=gen).to(torch.uint8)


def build_tiny_bsq_encoder(seed: int = 0) -> VisionModel:
    model = VisionModel(tiny_vision_config())
    _init_weights(model, torch.Generator().manual_seed(seed))
    return model.eval()


def build_tiny_transformer(seed: int = 0, siglip_channels: int = 128, injection_std: float = 0.3,
                           super_resolution: bool = True) -> SD3TransformerWithBSQ:
    """2 joint blocks, 2 heads of 8, 4 latent channels. The injection weight is drawn (N(0, injection_std^2))
    rather than left at its zero construction value, so images depend on the bits."""
    torch.manual_seed(seed)
    model = SD3TransformerWithBSQ(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=64, siglip_channels=siglip_channels, super_resolution=super_resolution)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        w = model.siglip_embed_add_latent.weight
        w.copy_(torch.randn(w.shape, generator=gen) * injection_std)
    return model.eval()


def build_tiny_vae(seed: int = 0):
    """AutoencoderKL with four levels (scale factor 8, like SD3's VAE), 8 channels, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=1.5035, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False).eval()


def build_clip_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte symbols (+ word-final forms) and a few merges; vocab/merges written
    to a scratch folder because CLIPTokenizer reads them from files."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = ["t h", "th e</w>", "r e", "i n", "a l", "al l</w>", "a n", "an d</w>", "i s</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                            model_max_length=CLIP_MAX_LENGTH)
    return tok


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte -> printable-unicode table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_t5_tokenizer():
    """A Unigram tokenizer with T5's layout (<pad> 0, </s> 1, <unk> 2): the prompt's words plus letters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(_T5_WORDS)] + [(".", -1.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_pipeline_parts(seed: int = 0, with_t5: bool = True) -> dict:
    """The sd3_pipeline components (without the transformer, which the decoder supplies)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok = build_clip_tokenizer()
    eos = clip_tok.convert_tokens_to_ids("<|endoftext|>")
    bos = clip_tok.convert_tokens_to_ids("<|startoftext|>")
    clip_cfg = dict(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=8,
                    bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="gelu")
    torch.manual_seed(seed + 10)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    torch.manual_seed(seed + 11)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)).eval()
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=build_tiny_vae(seed + 12),
                 text_encoder=text_encoder, tokenizer=clip_tok, text_encoder_2=text_encoder_2,
                 tokenizer_2=build_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    if with_t5:
        t5_tok = build_t5_tokenizer()
        torch.manual_seed(seed + 13)
        parts["text_encoder_3"] = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0)).eval()
        parts["tokenizer_3"] = t5_tok
    return parts


def make_bit_driven(transformer: SD3TransformerWithBSQ, vae, seed: int = 0) -> None:
    """Re-initialise a tiny transformer and VAE in place so that each image patch's colour follows its bits (the
    GRPO demo's decoder: a policy that changes its bits visibly changes the picture).

    - Transformer: the joint blocks' residual gates and the output modulation are zeroed (each block passes the
      image tokens through unchanged), the latent patch embedding is scaled down and the BSQ injection drawn
      with std 1, so the velocity is ~ proj_out(LayerNorm(projected features)): a function of the bits alone.
      Euler steps from sigma 1 to 0 integrate it exactly: latent = noise - velocity.
    - VAE decoder: a near-identity path. conv_in copies the 4 latent channels (and their negatives), resnets,
      attention and upsamplers pass through (nearest upsampling x8), and conv_out reads a palette: red from
      latent channel 0 - 1, green and blue from channel 2 - 3. After the final GroupNorm each patch is one of red,
      white, black or cyan, chosen by the signs of two linear functions of its bits.
    """
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            lin, d = block.norm1.linear, block.norm1.linear.out_features // 6
            for chunk in (2, 5):  # gate_msa, gate_mlp of AdaLayerNormZero
                lin.weight[chunk * d:(chunk + 1) * d] = 0.0
                lin.bias[chunk * d:(chunk + 1) * d] = 0.0
        transformer.norm_out.linear.weight.zero_()
        transformer.norm_out.linear.bias.zero_()
        transformer.pos_embed.proj.weight.mul_(0.1)
        w = transformer.siglip_embed_add_latent.weight
        w.copy_(torch.randn(w.shape, generator=gen))
        transformer.proj_out.weight.mul_(3.0)
        dec = vae.decoder
        for m in dec.modules():
            kind = type(m).__name__
            if kind == "ResnetBlock2D":
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif kind == "Attention":
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
            elif kind == "Upsample2D":
                _identity_conv(m.conv)
        dec.conv_in.weight.zero_()
        dec.conv_in.bias.zero_()
        for c in range(4):
            dec.conv_in.weight[c, c, 1, 1], dec.conv_in.weight[c + 4, c, 1, 1] = 1.0, -1.0
        dec.conv_norm_out.weight.fill_(1.0)
        dec.conv_norm_out.bias.zero_()
        dec.conv_out.weight.zero_()
        dec.conv_out.bias.zero_()
        for rgb, (pos, neg) in enumerate(((0, 1), (2, 3), (2, 3))):
            dec.conv_out.weight[rgb, pos, 1, 1], dec.conv_out.weight[rgb, neg, 1, 1] = 3.0, -3.0


def _identity_conv(conv) -> None:
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(conv.weight.shape[0]):
        conv.weight[c, c, conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] = 1.0


def write_tiny_decoder_checkpoint(folder: str | Path, seed: int = 0, ar_model: bool = True, ar_at_root: bool = False,
                                  with_t5: bool = True, injection_std: float = 0.3, bit_driven: bool = False) -> Path:
    """Write a tiny UniAR checkpoint in the published layout and return its root.

    ar_model: also write the tiny AR model (``root/ar_model``, or ``root`` itself with ``ar_at_root``); the
    decoder does not read it, the layout test does. bit_driven: see ``make_bit_driven``.
    """
    from diffusers import StableDiffusion3Pipeline

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    if ar_model:
        write_tiny_checkpoint(root if ar_at_root else root / "ar_model", seed=seed)

    bsq = build_tiny_bsq_encoder(seed)
    (root / "bsq_encoder").mkdir(exist_ok=True)
    bsq.cfg.save_pretrained(root / "bsq_encoder")
    save_safetensors(bsq.state_dict(), root / "bsq_encoder" / "model.safetensors")

    cfg = bsq.cfg
    transformer = build_tiny_transformer(seed, cfg.num_levels * cfg.hidden_size, injection_std)
    parts = build_tiny_pipeline_parts(seed, with_t5)
    if bit_driven:
        make_bit_driven(transformer, parts["vae"], seed)
    transformer.save_pretrained(root / "sd3_transformer")
    pipe = StableDiffusion3Pipeline(transformer=None, **parts)
    pipe.save_pretrained(root / "sd3_pipeline")
    return root


def ensure_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """The seeded tiny four-folder checkpoint (AR model + decoder) at ``folder``, written once and reused."""
    folder = Path(folder).resolve()
    if (folder / "sd3_pipeline" / "model_index.json").is_file() and (folder / "ar_model").is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place: two runs starting together never load a half-written checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    write_tiny_decoder_checkpoint(tmp, seed=seed, ar_model=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# Part of the cache folder's name: bump it when the files a tiny checkpoint holds change, so that a cache written by
# an older version is never mistaken for a complete one.
TINY_CHECKPOINT_VERSION = 1


def cached_tiny_checkpoint(seed: int = 0) -> Path:
    """The tiny checkpoint the command-line tools use by default (``--model tiny``), under the user cache
    (``$UNIAR_CACHE_DIR/tiny/v<version>-seed<seed>``, default ~/.cache/uniar-ray)."""
    from uniar_ray.datasets import cache_dir

    return ensure_tiny_checkpoint(cache_dir() / "tiny" / f"v{TINY_CHECKPOINT_VERSION}-seed{seed}", seed)
