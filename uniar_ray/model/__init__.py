"""The UniAR AR policy (Qwen3-VL backbone + BSQ vision tower + bitwise head) in plain PyTorch.

``from uniar_ray.model import UniARPolicy``; ``UniARPolicy.from_pretrained(path)`` loads published checkpoints.
"""
from .configuration import TextConfig, UniARConfig, VisionConfig
from .loading import CheckpointMismatch, resolve_ar_folder
from .policy import UniARPolicy, bit_logprobs
from .prompts import generation_text, load_tokenizer, tokenize
from .tiny import build_tiny_policy, tiny_config, write_tiny_checkpoint

__all__ = ["UniARPolicy", "UniARConfig", "TextConfig", "VisionConfig", "CheckpointMismatch", "resolve_ar_folder",
           "bit_logprobs", "generation_text", "load_tokenizer", "tokenize", "build_tiny_policy", "tiny_config",
           "write_tiny_checkpoint"]
