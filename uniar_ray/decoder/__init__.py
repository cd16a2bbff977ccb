"""The visual decoder: BSQ bits -> pixels with an SD3 transformer that injects BSQ features (spec §8).

``from uniar_ray.decoder import UniARDecoder``; ``UniARDecoder.from_pretrained(root)`` loads a published checkpoint,
``UniARDecoder.tiny()`` a seeded tiny one. ``actors/decoder_pool.py`` serves it on Ray.
"""
from .pipeline import DecodeError, UniARDecoder, load_decoder
from .transformer import SD3TransformerWithBSQ
from .types import DECODER_PROMPT, DecodeFailure, DecodeRequest, DecodeResult, Decoder

__all__ = ["UniARDecoder", "load_decoder", "DecodeError", "SD3TransformerWithBSQ", "DECODER_PROMPT", "DecodeFailure",
           "DecodeRequest", "DecodeResult", "Decoder"]
