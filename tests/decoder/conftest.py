"""Decoder fixtures: one tiny four-folder checkpoint (AR model included) and the decoder loaded from it."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_decoder_root(tmp_path_factory):
    from uniar_ray.decoder.tiny import write_tiny_decoder_checkpoint

    return write_tiny_decoder_checkpoint(tmp_path_factory.mktemp("decoder") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_decoder(tiny_decoder_root):
    from uniar_ray.decoder import UniARDecoder

    return UniARDecoder.from_pretrained(tiny_decoder_root, dtype=torch.float32)

