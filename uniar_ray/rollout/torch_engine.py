"""KV-cached torch rollout engine: prefill the prompt once, then one position per step through the backbone AND
the visual-decoder stack, each with its own preallocated cache (the reference recomputes the visual stack over the
whole sequence every step: N*P + N^2/2 token-layers instead of P + N).

Usage: ``engine = TorchRolloutEngine(UniARPolicy.from_pretrained(path)); engine.generate([GenerationRequest(...)])``.
"""
from __future__ import annotations

import dataclasses
import time
from itertools import groupby
from typing import Callable

import torch

from uniar_ray.model import UniARPolicy, generation_text, tokenize
from uniar_ray.model.layers import KVCache, attention_mask
from uniar_ray.model.positions import image_grid, rope_positions
from uniar_ray.model.prompts import check_ar_size
from uniar_ray.sampling import bit_logprobs_t, draw_uniforms, guided_logits, make_generators, sample_bits

from .images import decode_image, image_to_patches
from .types import GenerationRequest, Rollout, RolloutError


@dataclasses.dataclass
class _Item:
    index: int  # position in the caller's request list
    req: GenerationRequest
    patches: torch.Tensor | None = None  # edit mode: [n, 1536]
    grid: list[int] | None = None  # edit mode: input grid (1, h, w) in patches

    @property
    def uses_cfg(self) -> bool:
        return self.req.cfg_scale > 1.0


class TorchRolloutEngine:
    def __init__(self, policy: UniARPolicy, max_batch: int = 16, recompute_visual_stack: bool = False):
        """recompute_visual_stack=True runs the reference's algorithm (the visual stack over the whole sequence at
        every step, no cache); only benchmarks and tests use it, as the baseline the cache is measured against."""
        if policy.tokenizer is None:
            raise ValueError("the policy has no tokenizer: load it from a checkpoint folder with tokenizer files")
        self.policy = policy.eval()
        self.max_batch = max_batch
        self.recompute_visual_stack = recompute_visual_stack
        self._tokens = 0
        self._seconds = 0.0
        self._images = 0
        self.last_step_seconds: list[float] = []  # per-step wall time of the last batch (benchmarks read it)

    # ------------------------------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest],
                 on_step: Callable[[int, int], None] | None = None) -> list[Rollout | RolloutError]:
        """One result per request, in order. ``on_step(i, n)`` is called after AR step i of n of each batch (progress
        bars)."""
        results: list[Rollout | RolloutError | None] = [None] * len(requests)
        items = []
        for i, req in enumerate(requests):
            req.request_id = req.request_id or f"request-{i}"
            try:
                items.append(self._prepare(i, req))
            except ValueError as e:
                results[i] = RolloutError(req.request_id, req.prompt, f"{req.request_id}: {e}")
        key = lambda it: (it.req.ar_height, it.req.ar_width)  # noqa: E731 - one batch per AR size
        for _, group in groupby(sorted(items, key=key), key=key):
            group = list(group)
            for s in range(0, len(group), self.max_batch):
                chunk = group[s: s + self.max_batch]
                t0 = time.perf_counter()
                for it, out in zip(chunk, self._generate_batch(chunk, on_step)):
                    results[it.index] = out
                self._seconds += time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        params = dict(self.policy.named_parameters())
        unknown = [k for k in state_dict if k not in params]
        if unknown:
            raise KeyError(f"update_weights: unknown parameter names {unknown[:5]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                if params[k].shape != v.shape:
                    raise ValueError(f"update_weights: {k} has shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
                params[k].copy_(v)

    def stats(self) -> dict[str, float]:
        return {"tokens": self._tokens, "images": self._images, "seconds": self._seconds,
                "tokens_per_s": self._tokens / self._seconds if self._seconds else 0.0}

    # ------------------------------------------------------------------------------------------------------------

    def _prepare(self, index: int, req: GenerationRequest) -> _Item:
        check_ar_size(req.ar_height, req.ar_width)
        if not req.prompt or not req.prompt.strip():
            raise ValueError("empty prompt (the empty prompt is reserved for the unconditional CFG branch)")
        if not req.temperature > 0:
            raise ValueError(f"temperature={req.temperature} must be > 0")
        if not req.cfg_scale >= 1.0:
            raise ValueError(f"cfg_scale={req.cfg_scale} must be >= 1 (1 disables guidance)")
        if req.cfg_mode not in ("reference", "shared"):
            raise ValueError(f"cfg_mode={req.cfg_mode!r}: expected 'reference' or 'shared'")
        item = _Item(index, req)
        if req.image is not None:
            v = self.policy.config.vision_config
            img = decode_image(req.image)
            item.patches, item.grid = image_to_patches(img, req.ar_height, req.ar_width, v.patch_size,
                                                       v.temporal_patch_size, v.spatial_merge_size)
        return item

    def _row_texts(self, items: list[_Item]) -> tuple[list[str], list[int]]:
        """Rows: every item's conditional prompt, then an unconditional row for each item that uses CFG."""
        merge_unit = self.policy.config.vision_config.merge_unit

        def text(it, prompt):
            n_in = it.patches.shape[0] // merge_unit if it.patches is not None else 0
            return generation_text(prompt, it.req.ar_height, it.req.ar_width, n_in)

        owners = list(range(len(items))) + [k for k, it in enumerate(items) if it.uses_cfg]
        texts = [text(items[k], items[k].req.prompt if r < len(items) else "") for r, k in enumerate(owners)]
        return texts, owners

    @torch.inference_mode()
    def _generate_batch(self, items: list[_Item], on_step: Callable[[int, int], None] | None = None) -> list[Rollout]:
        pol, cfg = self.policy, self.policy.config
        dev, (L, U, D) = pol.device, pol.bits_shape
        h_px, w_px = items[0].req.ar_height, items[0].req.ar_width
        n = (h_px // 32) * (w_px // 32)
        texts, owners = self._row_texts(items)
        tp = tokenize(pol.tokenizer, texts, dev)
        rows, p = tp.input_ids.shape
        positions = self._positions(items, owners, tp, h_px, w_px)
        key_valid = torch.cat([tp.attention_mask.bool(), torch.ones(rows, n, dtype=torch.bool, device=dev)], 1)
        lm, tc = pol.model.language_model, cfg.text_config
        bb = KVCache(tc.num_hidden_layers, rows, tc.num_key_value_heads, p + n, tc.head_dim, pol.dtype, dev)
        vc = KVCache(len(pol.visual_decoder), rows, tc.num_key_value_heads, p + n, tc.head_dim, pol.dtype, dev)

        # Step 0: prefill the prefix through both stacks.
        embeds, vmask, deep = self._prefix_embeds(items, owners, tp.input_ids)
        mask = attention_mask(key_valid[:, :p], p)
        h = lm(embeds, positions[:, :, :p], mask, visual_mask=vmask, deepstack=deep, cache=bb, start=0)
        cos, sin = lm.rotary_emb(positions[:, :, :p], h.dtype)
        last = pol.visual_stack(h, cos, sin, mask, cache=vc, start=0)[:, -1]
        history = [h]  # backbone states, kept only for the no-cache baseline

        gens = make_generators([it.req.seed for it in items])
        temps = torch.tensor([it.req.temperature for it in items], device=dev)
        scales = torch.tensor([it.req.cfg_scale for it in items], device=dev)
        cfg_rows = [k for k, it in enumerate(items) if it.uses_cfg]
        shared = [it.req.cfg_mode == "shared" for it in items]
        out_bits = torch.empty(len(items), n, L, U, D, dtype=torch.uint8, device=dev)
        out_lp = torch.empty(len(items), n, L, U, D, dtype=torch.float32, device=dev)
        ones = torch.ones(rows, 1, dtype=torch.bool, device=dev)
        self.last_step_seconds = []
        t_step = time.perf_counter()
        for i in range(n):
            logits = pol.head_logits(last).float()  # [rows, L, U, D, 2]
            cond = logits[: len(items)].clone()
            if cfg_rows:
                idx = torch.tensor(cfg_rows, device=dev)
                cond[idx] = guided_logits(cond[idx], logits[len(items):], scales[idx])
            lp = bit_logprobs_t(cond, temps)
            bits, blp = sample_bits(lp, draw_uniforms(gens, (L, U, D), dev))
            out_bits[:, i], out_lp[:, i] = bits, blp
            now = time.perf_counter()
            self.last_step_seconds.append(now - t_step)
            t_step = now
            if on_step is not None:
                on_step(i + 1, n)
            if i == n - 1:
                break  # the last token's features are never used
            row_bits = self._uncond_bits(bits, lp, cfg_rows, shared, gens, dev)
            main, ds = pol.model.visual.bits_to_features(row_bits)
            t = p + i
            mask = attention_mask(key_valid[:, : t + 1], 1)
            rope = lm.rotary_emb(positions[:, :, t: t + 1], pol.dtype)  # shared by both stacks
            h = lm(main[:, None].to(pol.dtype), positions[:, :, t: t + 1], mask, visual_mask=ones, deepstack=ds,
                   cache=bb, start=t, rope=rope)
            if self.recompute_visual_stack:
                history.append(h)
                last = self._recompute_last(history, positions[:, :, : t + 1], key_valid[:, : t + 1])
            else:
                last = pol.visual_stack(h, *rope, mask, cache=vc, start=t)[:, -1]
        self._tokens += n * len(items)
        self._images += len(items)
        return [self._record(it, tp, k, out_bits[k], out_lp[k]) for k, it in enumerate(items)]

    def _recompute_last(self, history, positions, key_valid):
        """The reference's step: the visual stack over every position so far, output at the last one."""
        pol = self.policy
        h = torch.cat(history, dim=1)
        cos, sin = pol.model.language_model.rotary_emb(positions, h.dtype)
        return pol.visual_stack(h, cos, sin, attention_mask(key_valid, key_valid.shape[1]))[:, -1]

    def _uncond_bits(self, bits, lp, cfg_rows, shared, gens, dev):
        """Bits fed back into each row: cond rows get their own bits; an uncond row gets its item's bits (shared)
        or an independent draw from the same guided distribution (reference, as the published code does)."""
        if not cfg_rows:
            return bits
        extra = []
        for k in cfg_rows:
            if shared[k]:
                extra.append(bits[k])
            else:
                u = torch.rand(lp.shape[1:-1], generator=gens[k]).to(dev)
                extra.append(sample_bits(lp[k], u)[0])
        return torch.cat([bits, torch.stack(extra)])

    def _positions(self, items, owners, tp, h_px, w_px):
        pol = self.policy
        v = pol.config.vision_config
        n = (h_px // 32) * (w_px // 32)
        rows = tp.input_ids.shape[0]
        ids = torch.cat([tp.input_ids, torch.full((rows, n), pol.config.image_token_id, device=tp.input_ids.device)], 1)
        mask = torch.cat([tp.attention_mask, torch.ones(rows, n, dtype=tp.attention_mask.dtype,
                                                         device=tp.attention_mask.device)], 1)
        grids = []
        for k in owners:
            if items[k].grid is not None:
                grids.append(items[k].grid)
            grids.append(image_grid(h_px, w_px, v.patch_size))
        return rope_positions(ids, mask, grids, image_token_id=pol.config.image_token_id,
                              vision_start_token_id=pol.config.vision_start_token_id,
                              spatial_merge_size=v.spatial_merge_size)

    def _prefix_embeds(self, items, owners, ids):
        """Token embeddings; edit rows get the input image's features at its <|image_pad|> positions + deepstack."""
        pol = self.policy
        embeds = pol.model.language_model.embed_tokens(ids)
        if all(it.patches is None for it in items):
            return embeds, None, None
        feats = {}
        for k, it in enumerate(items):
            if it.patches is not None:
                grid = torch.tensor([it.grid], device=pol.device)
                feats[k] = pol.model.visual(it.patches.to(pol.device), grid)
        vmask = ids == pol.config.image_token_id
        per_row = [feats[k] for k in owners if k in feats]
        main = torch.cat([f[0] for f in per_row])
        embeds = embeds.masked_scatter(vmask[..., None], main.to(embeds.dtype))
        n_levels = len(per_row[0][1])
        deep = [torch.cat([f[1][j] for f in per_row]) for j in range(n_levels)]
        return embeds, vmask, deep

    def _record(self, it: _Item, tp, row: int, bits: torch.Tensor, lp: torch.Tensor) -> Rollout:
        ids = tp.input_ids[row][tp.attention_mask[row].bool()].to(torch.int32).cpu().numpy()
        r = it.req
        return Rollout.from_bits(bits.cpu(), request_id=r.request_id, prompt=r.prompt, prompt_ids=ids,
                                 ar_height=r.ar_height, ar_width=r.ar_width,
                                 logprobs=lp.cpu().numpy() if r.return_logprobs else None,
                                 seed=r.seed, temperature=r.temperature, cfg_scale=r.cfg_scale)
