"""The bitwise sampler inside vLLM: a V1 ``CPUModelRunner`` subclass that samples L x U x D bits per image step.

Per sample (one image: a conditional request and, with CFG, an unconditional one) it keeps a torch.Generator seeded
from ``extra_args["uniar"]["seed"]`` and the bits and per-bit log-probs sampled so far; it feeds those bits back as
the next step's inputs and emits them once, when the sample completes, through ``pooler_output``. Installed by
``worker.UniARCPUWorker``; pinned to vLLM 0.32's private runner hooks.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from uniar_ray.model.positions import image_grid, rope_positions
from uniar_ray.sampling import bit_logprobs_t, draw_uniforms, guided_logits, sample_bits

from ..images import decode_image, image_to_patches
from .model import ImageTokens


@dataclasses.dataclass
class _Sample:
    """One image being generated: its conditional row and, with CFG, its unconditional row (two vLLM requests that
    the scheduler keeps in step). Bits are drawn only when every row has produced its logits for image token ``done``.
    """

    n: int  # N: image tokens to sample
    roles: tuple[str, ...]  # ("cond",) or ("cond", "uncond")
    temperature: float
    cfg_scale: float
    shared: bool  # cfg_mode "shared": the uncond row is fed the cond bits; else an independent guided draw
    gen: torch.Generator
    bits: dict[str, torch.Tensor]  # role -> [N, L, U, D] uint8: bits fed back into that row, [0, done) filled
    logp: torch.Tensor  # [N, L, U, D] float32: log p(bit) under the guided, tempered distribution
    edit: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # input image features (main, deepstack)
    done: int = 0
    pending: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # role -> logits for token done
    finished: set[str] = dataclasses.field(default_factory=set)  # roles whose vLLM request has ended
    emitted: bool = False


@dataclasses.dataclass
class _Row:
    """One vLLM request: a row of a ``_Sample``."""

    sample: _Sample
    key: str  # the sample's key (shared by its rows)
    role: str
    prompt_len: int  # P: the image starts at position P
    positions: torch.Tensor  # [3, P + N] M-RoPE positions of the whole sequence
    in_pos: torch.Tensor  # [n_in] prompt positions of the input image's tokens (edit; empty otherwise)
    sampled: int = 0  # logits rows this request produced (= the tokens vLLM appended to it)


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
        self.uniar: dict[str, _Row] = {}  # vLLM request id -> row
        self.uniar_samples: dict[str, _Sample] = {}  # sample key -> sample (outlives a row that ends first)
        self.uniar_replayed = 0  # image tokens re-prefilled after a preemption (their bits read back from state)
        self.uniar_replayed_cfg = 0  # of which in rows of CFG samples
        self.uniar_waits = 0  # rows that produced logits before their partner (held back by the scheduler)

    # ------------------------------------------------------------------------------------------------------------

    def _row(self, req_id: str) -> _Row:
        row = self.uniar.get(req_id)
        if row is None:
            req = self.requests[req_id]
            extra = (req.sampling_params.extra_args or {}).get("uniar")
            if extra is None:
                raise ValueError(f"request {req_id}: missing SamplingParams.extra_args['uniar'] "
                                 "(use VLLMRolloutEngine)")
            sample = self.uniar_samples.get(extra["key"])
            if sample is None:
                sample = self.uniar_samples[extra["key"]] = self._new_sample(extra, req.sampling_params.temperature)
            ids = list(req.prompt_token_ids)
            row = _Row(sample, extra["key"], extra["role"], len(ids), self._positions(ids, extra),
                       torch.nonzero(torch.tensor(ids) == self.get_model().config.image_token_id).view(-1))
            self.uniar[req_id] = row
        return row

    def _new_sample(self, extra: dict, temperature: float) -> _Sample:
        model = self.get_model()
        shape = (int(extra["n"]), *model.bits_shape)
        roles = tuple(extra["roles"])
        bits = {"cond": torch.zeros(shape, dtype=torch.uint8)}
        if "uncond" in roles:
            bits["uncond"] = bits["cond"] if extra["cfg_mode"] == "shared" else torch.zeros(shape, dtype=torch.uint8)
        edit = None
        if extra.get("image") is not None:  # once per sample: both rows see the same input image
            patches, grid = image_to_patches(decode_image(extra["image"]), extra["ar_height"], extra["ar_width"],
                                             model.config.vision_config.patch_size,
                                             model.config.vision_config.temporal_patch_size,
                                             model.config.vision_config.spatial_merge_size)
            with torch.inference_mode():
                edit = model.model.visual(patches.to(self.device), torch.tensor([grid], device=self.device))
        return _Sample(n=shape[0], roles=roles, temperature=float(temperature), cfg_scale=float(extra["cfg_scale"]),
                       shared=extra["cfg_mode"] == "shared", gen=torch.Generator().manual_seed(int(extra["seed"])),
                       bits=bits, logp=torch.zeros(shape, dtype=torch.float32), edit=edit)

    def _positions(self, ids: list[int], extra: dict) -> torch.Tensor:
        """[3, P + N]: the torch engine's ``rope_positions`` of this row, unpadded (input grid first in edit mode)."""
        cfg = self.get_model().config
        v = cfg.vision_config
        seq = torch.tensor([ids + [cfg.image_token_id] * int(extra["n"])])
        grids = ([extra["in_grid"]] if extra.get("in_grid") else []) + [
            image_grid(extra["ar_height"], extra["ar_width"], v.patch_size)]
        return rope_positions(seq, torch.ones_like(seq), grids, image_token_id=cfg.image_token_id,
                              vision_start_token_id=cfg.vision_start_token_id,
                              spatial_merge_size=v.spatial_merge_size)[:, 0]

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:  # finished or aborted: its bits were emitted or are moot
            row = self.uniar.pop(req_id, None)
            if row is not None:
                row.sample.finished.add(row.role)
                if len(row.sample.finished) == len(row.sample.roles):
                    self.uniar_samples.pop(row.key, None)
        return super()._update_states(scheduler_output)

    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        out = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)
        out[4]["uniar_images"] = self._step_inputs(scheduler_output, num_input_tokens)
        return out  # model_kwargs -> UniARForImageGeneration.forward

    def _step_inputs(self, scheduler_output, num_input_tokens: int) -> ImageTokens:
        """Positions of every scheduled token, bits of the generated image tokens, features of the input image's
        tokens. Position P + m holds the m-th sampled token of the row, so a re-prefill after preemption reads the
        same bits (they live here, keyed by request)."""
        index, bits, pos, in_index, in_main, in_deep = [], [], [], [], [], []
        offset = 0
        computed = self.input_batch.num_computed_tokens_cpu
        for i, req_id in enumerate(self.input_batch.req_ids):
            count = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            start = int(computed[i])
            row = self._row(req_id)
            pos.append(row.positions[:, start: start + count])
            first = max(start, row.prompt_len)
            if first < start + count:
                m = torch.arange(first - row.prompt_len, start + count - row.prompt_len)
                if int(m[-1]) >= row.sample.done:
                    raise RuntimeError(f"request {req_id}: image token {int(m[-1])} scheduled before its bits "
                                       f"were sampled (its CFG partner is behind; the UniAR scheduler holds it)")
                if count > 1:  # only a recompute schedules several image positions of one request at once
                    self.uniar_replayed += len(m)
                    self.uniar_replayed_cfg += len(m) if len(row.sample.roles) > 1 else 0
                index.append(torch.arange(offset + first - start, offset + count))
                bits.append(row.sample.bits[row.role][m])
            if row.sample.edit is not None:
                sel = (row.in_pos >= start) & (row.in_pos < start + count)
                if bool(sel.any()):
                    in_index.append(offset + row.in_pos[sel] - start)
                    in_main.append(row.sample.edit[0][sel])
                    in_deep.append([d[sel] for d in row.sample.edit[1]])
            offset += count
        dev = self.device
        positions = torch.cat(pos, 1)
        if num_input_tokens > offset:  # padded batch: the pad tokens' positions are never read back
            positions = torch.cat([positions, positions.new_zeros(3, num_input_tokens - offset)], 1)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return ImageTokens(
            positions=positions.to(dev), index=torch.cat(index).to(dev) if index else empty,
            bits=torch.cat(bits).to(dev) if bits else torch.zeros(0, dtype=torch.uint8, device=dev),
            in_index=torch.cat(in_index).to(dev) if in_index else empty,
            in_main=torch.cat(in_main) if in_main else None,
            in_deep=[torch.cat(d) for d in zip(*in_deep)] if in_deep else [])

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        """Bits for every sample whose rows all produced their logits; discarded rows (partial prefill chunks) draw
        nothing, so a sample's uniforms depend only on its seed, as in the torch engine (same primitives, same
        stream). A row whose CFG partner is behind leaves its logits pending; the scheduler holds it until the
        partner catches up (vLLM still records a token for it; its bits are filled in then)."""
        if spec_decode_metadata is not None:
            raise RuntimeError("speculative decoding is not supported by the UniAR bitwise sampler: leave it off")
        num_reqs = self.input_batch.num_reqs
        discard = self.discard_request_mask.np[:num_reqs]
        image_token = self.get_model().config.image_token_id
        shape = self.get_model().bits_shape
        ready: list[_Sample] = []
        for i in range(num_reqs):
            if discard[i]:
                continue
            row = self._row(self.input_batch.req_ids[i])
            s = row.sample
            if row.sampled != s.done or s.done >= s.n:
                raise RuntimeError(f"UniAR sampler: request {self.input_batch.req_ids[i]} produced logits for "
                                   f"image token {row.sampled}, its sample is at {s.done} of {s.n}")
            row.sampled += 1
            s.pending[row.role] = logits[i].view(*shape, 2).clone()  # may wait a step: vLLM reuses the buffer
            if len(s.pending) == len(s.roles):
                ready.append(s)
            else:
                self.uniar_waits += 1
        if ready:
            self._draw(ready, shape, logits.device)
        sampled = torch.full((num_reqs, 1), image_token, dtype=torch.int32, device=logits.device)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)

    def _draw(self, ready: list[_Sample], shape: tuple[int, int, int], device) -> None:
        """The torch engine's step for these samples: guided logits, tempered log-probs, one uniform per bit from
        each sample's generator, then (cfg_mode reference) the uncond row's own draw from the same distribution."""
        lg = torch.stack([s.pending["cond"] for s in ready])
        guided = [k for k, s in enumerate(ready) if "uncond" in s.roles]
        if guided:
            idx = torch.tensor(guided, device=device)
            uncond = torch.stack([ready[k].pending["uncond"] for k in guided])
            scales = torch.tensor([ready[k].cfg_scale for k in guided], device=device)
            lg[idx] = guided_logits(lg[idx], uncond, scales)
        lp = bit_logprobs_t(lg, torch.tensor([s.temperature for s in ready], device=device))
        bits, blp = sample_bits(lp, draw_uniforms([s.gen for s in ready], shape, device))
        bits, blp = bits.cpu(), blp.cpu()
        for k, s in enumerate(ready):
            m = s.done
            s.bits["cond"][m], s.logp[m] = bits[k], blp[k]
            if "uncond" in s.roles and not s.shared and m < s.n - 1:  # the last token is never fed back
                u = torch.rand(shape, generator=s.gen).to(device)
                s.bits["uncond"][m] = sample_bits(lp[k], u)[0].cpu()
            s.done += 1
            s.pending.clear()

    def sample_tokens(self, grammar_output):
        """The stock step, plus the payload (bits + log-probs) on the row that completes a sample."""
        out = super().sample_tokens(grammar_output)
        req_ids = getattr(out, "req_ids", None)
        if not req_ids:
            return out
        payloads, any_done = [], False
        for req_id in req_ids:
            row = self.uniar.get(req_id)
            s = row.sample if row is not None else None
            if s is not None and s.done == s.n and not s.emitted:
                payloads.append(encode_payload(s.bits["cond"], s.logp))
                s.emitted = any_done = True
            else:
                payloads.append(None)
        if any_done:
            out.pooler_output = payloads
        return out
