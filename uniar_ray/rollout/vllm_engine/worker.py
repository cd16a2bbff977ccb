"""vLLM CPU worker that installs the UniAR runner and serves in-place weight updates.

Passed to vLLM as ``LLM(worker_cls="uniar_ray.rollout.vllm_engine.worker.UniARCPUWorker")``; the engine calls the
``uniar_*`` methods through ``collective_rpc`` with plain bytes (safetensors), since tensors do not cross that RPC.
"""
from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors
from vllm.v1.worker.cpu_worker import CPUWorker

from .runner import UniARCPUModelRunner


class UniARCPUWorker(CPUWorker):
    def init_device(self):
        super().init_device()
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError("the UniAR bitwise sampler is a V1 model-runner subclass; unset "
                               "VLLM_USE_V2_MODEL_RUNNER (see docs/vllm_engine.md for the V2 design)")
        # Swapped before load_model and KV-cache allocation, so nothing of the stock runner is wasted.
        self.model_runner = UniARCPUModelRunner(self.vllm_config, torch.device("cpu"))

    def uniar_update_weights(self, blob: bytes) -> int:
        """Load a safetensors-serialised state dict (published names) in place; returns the tensor count.

        ``reload_weights`` restores the checkpoint layout, loads, and repacks the CPU GEMM weights; a raw
        ``load_weights`` after start-up would fail on the repacked linears (see the spike report §2.5)."""
        state = load_safetensors(blob)
        self.model_runner.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
        return len(state)

    def uniar_counters(self) -> dict[str, int]:
        """Requests and samples holding sampler state, image tokens replayed after preemption, and rows that produced
        logits before their CFG partner (tests, monitoring)."""
        r = self.model_runner
        return {"live_requests": len(r.uniar), "live_samples": len(r.uniar_samples),
                "replayed_image_tokens": r.uniar_replayed, "replayed_cfg_image_tokens": r.uniar_replayed_cfg,
                "partner_waits": r.uniar_waits}
