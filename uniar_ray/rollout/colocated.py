"""Roll-out over a training policy's live parameters (``rollout.placement: colocated``, the reference's topology):
the torch engine runs inside the trainer rank on the very tensors the optimizer updates. No copy, no sync.

    engine = ColocatedEngine(policy, max_batch=16)          # policy: the trainer's module (DeepSpeed engine.module)
    results = engine.generate(requests)                     # between optimizer steps; training state untouched

Why a wrapper and not ``TorchRolloutEngine`` as is: that engine makes the policy its own for good (eval mode, fused
q/k/v and gate/up whose weights replace the published parameters, oneDNN packs, compiled layers). Inside a trainer
those parameters belong to the optimizer (DeepSpeed ZeRO-2 re-points them into its flat buffers and updates them in
place, behind the tensors' version counters), so every inference-only structure here lives for one ``generate``
call: built from the live weights when it starts, removed when it ends. So nothing can go stale, however the
optimizer writes, and the module trains exactly as before (train/eval flags, classes and attributes restored):

- eval mode during the call (no dropout in this model, but the flag is what callers see); inference mode (no grad,
  so gradient checkpointing, which applies only with grad and without a KV cache, never runs);
- CPU: q/k/v and gate/up fused into copies and every Linear prepacked for oneDNN (``fuse_projections`` and
  ``pack_linears``, as a separate CPU engine does), so the same seeds give the same bits as ``placement:
  separate`` with the same weights. Costs one extra copy of the weights (two with the packs) during the call;
- GPU: the live weights as they are (fused copies would cost GBs next to the KV cache at 8B): the same math as
  a separate engine, whose fused GEMMs may round differently in the last bits. CUDA graphs are recorded per
  batch by the engine (``_Run.capture``), so they always read the current weights; ``compile`` marks the decoder
  layers for the call only (the compiled functions are cached per process).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from uniar_ray.model import UniARPolicy
from uniar_ray.model.layers import (MLP, Attention, DecoderLayer, FusedLinear, OneDNNWeight, PackedLinear,
                                    compile_decoder_layers)

from .torch_engine import TorchRolloutEngine
from .types import GenerationRequest, Rollout, RolloutError


class ColocatedEngine:
    def __init__(self, policy: UniARPolicy, max_batch: int = 16, cuda_graph: bool = False, compile: bool = False):
        self.policy = policy
        on_cpu = policy.device.type == "cpu"
        self.fuse = on_cpu  # see the module docstring: copies are cheap on CPU, GBs on a GPU
        self.pack = on_cpu and not compile  # Inductor does not trace oneDNN's packed weights
        self.compile = compile
        with generation_mode(policy):  # the engine's constructor puts the policy in eval mode: undone here
            # fuse=False: the engine must not fuse for good; the per-call copies come from generation_mode
            self.engine = TorchRolloutEngine(policy, max_batch=max_batch, fuse=False, cuda_graph=cuda_graph)

    def generate(self, requests: list[GenerationRequest]) -> list[Rollout | RolloutError]:
        with generation_mode(self.policy, fuse=self.fuse, pack=self.pack, compile=self.compile):
            return self.engine.generate(requests)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()


@contextmanager
def generation_mode(policy: nn.Module, fuse: bool = False, pack: bool = False, compile: bool = False):
    """``policy`` set up for sampling for the duration of the block, then restored exactly (see the module
    docstring): eval mode; with ``fuse``, fused copies of q/k/v and gate/up; with ``pack``, every Linear prepacked
    for oneDNN; with ``compile``, the decoder layers' compiled elementwise kernels."""
    modes = [(m, m.training) for m in policy.modules()]
    fused: list[tuple[nn.Module, str]] = []
    packed: list[nn.Module] = []
    compiled: list[DecoderLayer] = []
    try:
        policy.eval()
        if fuse:
            with torch.no_grad():
                for m in list(policy.modules()):
                    if isinstance(m, Attention) and m.qkv is None:
                        m.qkv = _FusedCopy([m.q_proj, m.k_proj, m.v_proj], pack)
                        fused.append((m, "qkv"))
                    elif isinstance(m, MLP) and m.gate_up is None:
                        m.gate_up = _FusedCopy([m.gate_proj, m.up_proj], pack)
                        fused.append((m, "gate_up"))
        if pack:
            for m in policy.modules():
                if type(m) is nn.Linear:
                    m.__class__, m.onednn = PackedLinear, OneDNNWeight()
                    packed.append(m)
        if compile:
            compiled = [m for m in policy.modules() if isinstance(m, DecoderLayer) and not m.compiled]
            compile_decoder_layers(policy)
        yield policy
    finally:
        for m in compiled:
            m.compiled = False
        for m in packed:
            m.__class__ = nn.Linear
            del m.onednn
        for m, name in fused:
            delattr(m, name)  # out of the module's children, then back to the plain attribute the class set
            setattr(m, name, None)
        for m, training in modes:
            m.training = training


class _FusedCopy(FusedLinear):
    """A ``FusedLinear`` over a copy: the originals stay the optimizer's parameters (a plain ``FusedLinear`` would
    replace them with views into its fused tensor). Lives for one ``generation_mode`` block."""

    def _fuse(self) -> None:
        with torch.no_grad():
            self.register_buffer("weight", torch.cat([lin.weight for lin in self._linears]), persistent=False)
            bias = self._linears[0].bias
            self.register_buffer("bias", torch.cat([lin.bias for lin in self._linears]) if bias is not None else None,
                                 persistent=False)

    def refresh(self) -> None:  # built per block from the live weights: nothing to refresh
        pass
