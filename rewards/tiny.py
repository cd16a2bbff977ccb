"""Seeded tiny reward models written to local folders in the layout of the real ones (no downloads): CLIP (HPS,
PickScore, GenEval colours), COCO detectors (Mask2Former, DETR) and a Qwen2-VL judge.

For tests, demos and CPU benchmarks: they exercise every line of loading and scoring, their scores mean nothing.
``write_tiny(kind, folder)``; ``tiny_spec_paths(root)`` writes all of them once and returns their folders.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from rewards.geneval import OBJECT_NAMES

_CORPUS = [
    "a photo of a red cat and a blue dog on the left of a green bench",
    "a photo of a orange-colored yellow purple pink brown black white object",
    "a lighthouse on a rocky cliff at sunset, photorealistic, cinematic",
    "a poster with the text Hello World in bold letters, two apples, three oranges",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"()-[]",
]


def clip_tokenizer():
    """Byte-level BPE with CLIP's special tokens, <|startoftext|> ... <|endoftext|> around every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok.train_from_iterator(_CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = tok.token_to_id(specials[0]), tok.token_to_id(specials[1])
    tok.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A {specials[1]}",
                                                       special_tokens=[(specials[0], bos), (specials[1], eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1], model_max_length=77)


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    tok = clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, hidden_act="gelu")
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def _coco_labels():
    return {i: n for i, n in enumerate(OBJECT_NAMES)}, {n: i for i, n in enumerate(OBJECT_NAMES)}


def write_tiny_mask2former(folder: str | Path, seed: int = 0, size: int = 64) -> Path:
    from transformers import Mask2FormerConfig, SwinConfig
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    from unittest import mock

    from transformers.models.mask2former import modeling_mask2former

    folder = Path(folder)
    id2label, label2id = _coco_labels()
    backbone = SwinConfig(image_size=size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=12, num_labels=len(id2label), id2label=id2label,
                            label2id=label2id, common_stride=4)
    torch.manual_seed(seed)
    # Without scipy, skip the check for the training loss's matcher, as rewards.geneval._load_mask2former does.
    with mock.patch.object(modeling_mask2former, "requires_backends", lambda *a, **k: None):
        model = modeling_mask2former.Mask2FormerForUniversalSegmentation(cfg).eval()
    model.save_pretrained(folder)
    Mask2FormerImageProcessorPil(size={"shortest_edge": size, "longest_edge": 2 * size}, size_divisor=32,
                                 num_labels=len(id2label)).save_pretrained(folder)
    return folder


def write_tiny_detr(folder: str | Path, seed: int = 0, size: int = 64) -> Path:
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    folder = Path(folder)
    id2label, label2id = _coco_labels()
    backbone = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                            layer_type="basic", out_features=["stage2"])
    cfg = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=12, num_labels=len(id2label),
                     id2label=id2label, label2id=label2id)
    torch.manual_seed(seed)
    DetrForObjectDetection(cfg).eval().save_pretrained(folder)
    DetrImageProcessorPil(size={"shortest_edge": size, "longest_edge": 2 * size}).save_pretrained(folder)
    return folder


def write_tiny_qwen2vl(folder: str | Path, seed: int = 0) -> Path:
    """A Qwen2-VL judge: the UniAR tiny tokenizer (Qwen's special tokens) and the PIL Qwen2-VL image processor with
    small pixel limits (4..16 merged patches per image)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from uniar_ray.model.tiny import build_tokenizer

    folder = Path(folder)
    tok = build_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [8, 4, 4]},
                bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(folder)
    return folder


WRITERS = {"clip": write_tiny_clip, "mask2former": write_tiny_mask2former, "detr": write_tiny_detr,
           "qwen2vl": write_tiny_qwen2vl}


def write_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny ``kind`` model into ``folder`` unless it is already there. Written beside it and renamed into
    place, so reward actors starting together never read a half-written folder."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    WRITERS[kind](tmp, seed=seed)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(path: str, kind: str, seed: int = 0) -> str:
    """``path`` itself, or for ``tiny`` (``tiny-detr``: the DETR detector) the folder of that tiny model in a
    cache (``$UNIAR_TINY_DIR``, default the user's cache: ``$UNIAR_CACHE_DIR/tiny_rewards``; never the shared temp
    folder, where anyone could have put a model under that name first)."""
    from uniar_ray.datasets import cache_dir

    if path not in ("tiny", "tiny-detr"):
        return path
    kind = "detr" if path == "tiny-detr" else kind
    root = Path(os.environ.get("UNIAR_TINY_DIR") or cache_dir() / "tiny_rewards")
    return str(write_tiny(kind, root / f"{kind}-seed{seed}", seed))


def tiny_spec_paths(root: str | Path, seed: int = 0) -> dict[str, str]:
    """All tiny models under ``root``: {"clip", "mask2former", "detr", "qwen2vl"} -> folder."""
    root = Path(root)
    return {kind: str(write_tiny(kind, root / kind, seed)) for kind in WRITERS}
