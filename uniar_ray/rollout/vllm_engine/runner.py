"""The bitwise sampler inside vLLM: a V1 ``CPUModelRunner`` subclass that samples L x U x D bits per image step.

Per request it keeps a torch.Generator (seeded from ``extra_args["uniar"]["seed"]``), the bits and per-bit log-probs
sampled so far; it feeds those bits back as the next step's inputs and emits them once, on the request's last step,
through ``pooler_output``. Installed by ``worker.UniARCPUWorker``; pinned to vLLM 0.32's private runner hooks.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from uniar_ray.sampling import bit_logprobs_t, draw_uniforms, sample_bits

from .model import ImageTokens


@dataclasses.dataclass
class _ReqState:
    prompt_len: int  # P: the image starts at position P
    grid_w: int  # image width in AR tokens (M-RoPE w axis wraps here)
    n: int  # N: image tokens to sample
    temperature: float
    gen: torch.Generator
    bits: torch.Tensor  # [N, L, U, D] uint8, rows [0, done) filled
    logp: torch.Tensor  # [N, L, U, D] float32
    done: int = 0
    emitted: bool = False


def encode_payload(bits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """bits [N, L, U, D] + logp -> one flat uint8 tensor: packed bits (N*K/8 bytes) then float32 log-probs."""
    packed = torch.from_numpy(np.packbits(bits.numpy().reshape(-1)))
    return torch.cat([packed, logp.contiguous().view(-1).view(torch.uint8)])


def decode_payload(payload: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``encode_payload`` -> bits uint8 [shape], logp float32 [shape]."""
    count = int(np.prod(shape))
    nbytes = (count + 7) // 8
    if payload.numel() != nbytes + 4 * count:
        raise ValueError(f"vLLM payload has {payload.numel()} bytes, expected {nbytes + 4 * count} for {shape}")
    data = payload.numpy()
    bits = np.unpackbits(data[:nbytes], count=count).reshape(shape)
    logp = data[nbytes:].copy().view(np.float32).reshape(shape)
    return torch.from_numpy(bits.copy()), torch.from_numpy(logp)


class UniARCPUModelRunner(CPUModelRunner):
    """Overrides: ``_update_states`` (drop finished requests), ``_preprocess`` (image-token inputs),
    ``_sample`` (the bitwise sampler), ``sample_tokens`` (emit bits + log-probs on the last step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uniar: dict[str, _ReqState] = {}
        self.uniar_replayed = 0  # image tokens re-prefilled after a preemption (their bits read back from state)

    # ------------------------------------------------------------------------------------------------------------

    def _state(self, req_id: str) -> _ReqState:
        st = self.uniar.get(req_id)
        if st is None:
            req = self.requests[req_id]
            sp = req.sampling_params
            extra = (sp.extra_args or {}).get("uniar")
            if extra is None:
                raise ValueError(f"request {req_id}: missing SamplingParams.extra_args['uniar'] (use VLLMRolloutEngine)")
            shape = (extra["n"], *self.get_model().bits_shape)
            st = _ReqState(prompt_len=req.num_prompt_tokens, grid_w=int(extra["grid_w"]), n=int(extra["n"]),
                           temperature=float(sp.temperature), gen=torch.Generator().manual_seed(int(extra["seed"])),
                           bits=torch.zeros(shape, dtype=torch.uint8), logp=torch.zeros(shape, dtype=torch.float32))
            self.uniar[req_id] = st
        return st

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:  # finished or aborted: its bits were emitted or are moot
            self.uniar.pop(req_id, None)
        return super()._update_states(scheduler_output)

    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        out = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)
        images = self._image_tokens(scheduler_output)
        if images is not None:
            out[4]["uniar_images"] = images  # model_kwargs -> UniARForImageGeneration.forward
        return out

    def _image_tokens(self, scheduler_output) -> ImageTokens | None:
        """Bits and (t, h, w) positions of every scheduled image token. Position P + m holds the m-th sampled
        token, so a re-prefill after preemption reads the same bits (they live here, keyed by request)."""
        index, bits, pos = [], [], []
        offset = 0
        computed = self.input_batch.num_computed_tokens_cpu
        for row, req_id in enumerate(self.input_batch.req_ids):
            count = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            start = int(computed[row])
            st = self._state(req_id)
            first = max(start, st.prompt_len)
            if first < start + count:
                m = torch.arange(first - st.prompt_len, start + count - st.prompt_len)
                if int(m[-1]) >= st.done:
                    raise RuntimeError(f"request {req_id}: image token {int(m[-1])} scheduled before it was sampled")
                if count > 1:  # only a recompute schedules several image positions of one request at once
                    self.uniar_replayed += len(m)
                index.append(torch.arange(offset + first - start, offset + count))
                bits.append(st.bits[m])
                p = st.prompt_len
                pos.append(torch.stack([torch.full_like(m, p), p + m // st.grid_w, p + m % st.grid_w]))
            offset += count
        if not index:
            return None
        dev = self.device
        return ImageTokens(torch.cat(index).to(dev), torch.cat(bits).to(dev), torch.cat(pos, 1).to(dev))

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        """Bits for every row whose sample vLLM keeps; discarded rows (partial prefill chunks) draw nothing, so a
        request's uniforms depend only on its seed, as in the torch engine (same primitives, same stream)."""
        if spec_decode_metadata is not None:
            raise RuntimeError("speculative decoding is not supported by the UniAR bitwise sampler: leave it off")
        num_reqs = self.input_batch.num_reqs
        discard = self.discard_request_mask.np[:num_reqs]
        rows = [i for i in range(num_reqs) if not discard[i]]
        image_token = self.get_model().config.image_token_id
        sampled = torch.full((num_reqs, 1), image_token, dtype=torch.int32, device=logits.device)
        if rows:
            states = [self._state(self.input_batch.req_ids[i]) for i in rows]
            shape = self.get_model().bits_shape
            lg = logits[rows].view(len(rows), *shape, 2)
            temps = torch.tensor([s.temperature for s in states], device=lg.device)
            lp = bit_logprobs_t(lg, temps)
            bits, blp = sample_bits(lp, draw_uniforms([s.gen for s in states], shape, lg.device))
            bits, blp = bits.cpu(), blp.cpu()
            for k, s in enumerate(states):
                if s.done >= s.n:
                    raise RuntimeError(f"UniAR sampler: request sampled more than its {s.n} image tokens")
                s.bits[s.done], s.logp[s.done] = bits[k], blp[k]
                s.done += 1
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)

    def sample_tokens(self, grammar_output):
        out = super().sample_tokens(grammar_output)
        req_ids = getattr(out, "req_ids", None)
        if not req_ids:
            return out
        payloads, any_done = [], False
        for req_id in req_ids:
            st = self.uniar.get(req_id)
            if st is not None and st.done == st.n and not st.emitted:
                payloads.append(encode_payload(st.bits, st.logp))
                st.emitted = any_done = True
            else:
                payloads.append(None)
        if any_done:
            out.pooler_output = payloads
        return out
