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
from uniar_ray.model.layers import KVCache, attention_mask, compile_decoder_layers, fuse_projections
from uniar_ray.model.positions import image_grid, rope_positions
from uniar_ray.model.prompts import check_ar_size
from uniar_ray.sampling import bit_logprobs_t, guided_logits, make_generators, sample_bits

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
    def __init__(self, policy: UniARPolicy, max_batch: int = 16, recompute_visual_stack: bool = False,
                 fuse: bool = True, static_shapes: bool = False, cuda_graph: bool = False, compile: bool = False,
                 multinomial_sampler: bool = False, pack: bool = True):
        """recompute_visual_stack=True runs the reference's algorithm (the visual stack over the whole sequence at
        every step, no cache); only benchmarks and tests use it, as the baseline the cache is measured against.
        multinomial_sampler=True draws every bit as the reference does (softmax, then ``torch.multinomial`` over
        the two-way rows, from the global RNG: not seeded per sample), for that baseline's per-step cost.

        fuse: q/k/v and gate/up projections as one matmul each (``fuse_projections``: fewer kernels). pack (only
        with fuse, on CPU, not under compile): every Linear of the policy prepacked for oneDNN (``OneDNNWeight``:
        about half the matmul time at decode sizes; rounding differs from MKL's sgemm in the last bits, as any
        change of GEMM kernel does; holds a second copy of the weights). fuse=False is the plain path: separate
        projections through ``F.linear`` (MKL), nothing packed.
        static_shapes: every step attends over the whole preallocated cache under a mask and writes at a device
        index, so a step has fixed shapes and no host sync. cuda_graph: record that step in a CUDA graph and replay
        it (per-step launch overhead gone; implies static_shapes; CUDA only). compile: fuse each decoder layer's
        elementwise work with torch.compile (``compile_decoder_layers``; minutes of compilation once per process).
        """
        if policy.tokenizer is None:
            raise ValueError("the policy has no tokenizer: load it from a checkpoint folder with tokenizer files")
        if cuda_graph and policy.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the policy on a CUDA device (it is on {policy.device}); "
                             "use cuda_graph=False on CPU")
        if recompute_visual_stack and (static_shapes or cuda_graph):
            raise ValueError("recompute_visual_stack is the uncached reference baseline: it has no static form")
        if multinomial_sampler and (static_shapes or cuda_graph):
            raise ValueError("multinomial_sampler is the reference's sampler for baselines: it has no static form")
        self.policy = policy.eval()
        self.fuse = fuse
        if fuse:  # Inductor does not trace oneDNN's packed weights: no packing under compile
            fuse_projections(self.policy, pack=pack and policy.device.type == "cpu" and not compile)
        if compile:
            compile_decoder_layers(self.policy)
        self.max_batch = max_batch
        self.recompute_visual_stack = recompute_visual_stack
        self.multinomial_sampler = multinomial_sampler
        self.static_shapes = static_shapes or cuda_graph
        self.cuda_graph = cuda_graph
        self._tokens = 0
        self._seconds = 0.0
        self._images = 0
        # Timings of the last batch (benchmarks read them): per-step wall times (device times only with cuda_graph,
        # which syncs each step), prefill, graph capture, and all decode steps (synced at the end).
        self.last_step_seconds: list[float] = []
        self.last_prefill_seconds = self.last_capture_seconds = self.last_decode_seconds = 0.0

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
                params[k].copy_(v)  # in place: fused projections read the same storage

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
        pol = self.policy
        if self.fuse:
            fuse_projections(pol)  # re-fuses only if a .to() replaced the weights since
        texts, owners = self._row_texts(items)
        tp = tokenize(pol.tokenizer, texts, pol.device)
        t0 = time.perf_counter()
        run = _Run(self, items, owners, tp, items[0].req.ar_height, items[0].req.ar_width)
        run.prefill(self._prefix_embeds(items, owners, tp.input_ids))
        _sync(pol.device)
        t1 = time.perf_counter()
        step = run.capture() if self.cuda_graph else run.step
        _sync(pol.device)
        self.last_prefill_seconds, self.last_capture_seconds = t1 - t0, time.perf_counter() - t1
        self.last_step_seconds = []
        t_step = time.perf_counter()
        for i in range(run.n):
            if not self.multinomial_sampler:
                run.load_uniforms(i)
            step(i)
            run.out_bits[:, i], run.out_lp[:, i] = run.bits, run.blp
            if self.cuda_graph:
                torch.cuda.synchronize()  # per-step times must be device times (benchmarks read them)
            now = time.perf_counter()
            self.last_step_seconds.append(now - t_step)
            t_step = now
            if on_step is not None:
                on_step(i + 1, run.n)
        _sync(pol.device)
        self.last_decode_seconds = time.perf_counter() - t1 - self.last_capture_seconds
        self._tokens += run.n * len(items)
        self._images += len(items)
        return [self._record(it, tp, k, run.out_bits[k], run.out_lp[k]) for k, it in enumerate(items)]

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One batch in flight: its KV caches, positions, rotary tables, masks, random streams and outputs.

    Everything a decode step needs is built here once per batch, so a step does no host work and no host sync.
    With ``static_shapes`` a step also has fixed shapes (the position is a device tensor), which is what lets
    ``capture`` record it in a CUDA graph.
    """

    CHUNK = 32  # decode steps of uniforms drawn per host call (one upload per chunk, not one per step)

    def __init__(self, engine: "TorchRolloutEngine", items, owners, tp, h_px: int, w_px: int):
        pol, cfg = engine.policy, engine.policy.config
        self.engine, self.pol, self.items = engine, pol, items
        dev, (L, U, D) = pol.device, pol.bits_shape
        self.n = (h_px // 32) * (w_px // 32)
        rows, self.p = tp.input_ids.shape
        b, n, p = len(items), self.n, self.p
        self.positions = engine._positions(items, owners, tp, h_px, w_px)  # [3, rows, p + n]
        lm, tc = pol.model.language_model, cfg.text_config
        self.cos, self.sin = lm.rotary_emb(self.positions, pol.dtype)  # [rows, p + n, hd], once per batch
        self.key_valid = torch.cat([tp.attention_mask.bool(), torch.ones(rows, n, dtype=torch.bool, device=dev)], 1)
        # No padding (all prompts the same length): no mask at all, so SDPA/flash-attn run their unmasked kernels.
        self.padded = not bool(tp.attention_mask.bool().all())
        self.static = engine.static_shapes
        kv = (rows, tc.num_key_value_heads, p + n, tc.head_dim, pol.dtype, dev)
        self.bb, self.vc = KVCache(tc.num_hidden_layers, *kv), KVCache(len(pol.visual_decoder), *kv)
        # Per sample and step: the cond uniforms, then (reference-mode CFG) the uncond row's own draw, all from the
        # sample's generator in that order: the same stream as drawing step by step, whatever the chunking.
        self.gens = make_generators([it.req.seed for it in items])
        self.draws = [2 if it.uses_cfg and it.req.cfg_mode == "reference" else 1 for it in items]
        self.temps = torch.tensor([it.req.temperature for it in items], device=dev)
        cfg_rows = [k for k, it in enumerate(items) if it.uses_cfg]
        self.cfg_rows = torch.tensor(cfg_rows, dtype=torch.long, device=dev)
        self.scales = torch.tensor([items[k].req.cfg_scale for k in cfg_rows], device=dev)
        own = [items[k].req.cfg_mode == "reference" for k in cfg_rows]
        self.uncond_own = torch.tensor(own, dtype=torch.bool, device=dev).view(-1, 1, 1, 1)
        self.u = torch.zeros(b, 2, L, U, D, device=dev)  # this step's uniforms (a static buffer)
        self.out_bits = torch.empty(b, n, L, U, D, dtype=torch.uint8, device=dev)
        self.out_lp = torch.empty(b, n, L, U, D, dtype=torch.float32, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # static shapes: the position being written
        self.k_pos = torch.arange(p + n, device=dev)
        self.history: list[torch.Tensor] = []  # backbone states, kept only for the no-cache baseline

    def prefill(self, prefix) -> None:
        """The prompt through both stacks; ``last`` = the visual stack's state at <|vision_start|>."""
        embeds, vmask, deep = prefix
        p, pol, lm = self.p, self.pol, self.pol.model.language_model
        mask = attention_mask(self.key_valid[:, :p], p) if self.padded else None
        cos, sin = self.cos[:, :p], self.sin[:, :p]
        h = lm(embeds, self.positions[:, :, :p], mask, visual_mask=vmask, deepstack=deep, cache=self.bb, start=0,
               rope=(cos, sin))
        self.history.append(h)
        self.last = pol.visual_stack(h, cos, sin, mask, cache=self.vc, start=0)[:, -1]

    def load_uniforms(self, i: int) -> None:
        if i % self.CHUNK == 0:
            k = min(self.CHUNK, self.n - i)
            L, U, D = self.pol.bits_shape
            chunk = torch.zeros(len(self.items), k, 2, L, U, D)
            for row, (g, m) in enumerate(zip(self.gens, self.draws)):
                chunk[row, :, :m] = torch.rand((k, m, L, U, D), generator=g)
            self._chunk = chunk.to(self.pol.device, non_blocking=True)
        self.u.copy_(self._chunk[:, i % self.CHUNK])

    def step(self, i: int) -> None:
        """Sample position i from ``last`` into ``bits``/``blp`` [B, L, U, D]; then, unless it is the last
        position (whose features are never used), feed the bits through both stacks to get the next ``last``."""
        self.sample()
        if i < self.n - 1:
            if self.static:
                self.t.fill_(self.p + i)
            self.advance(self.p + i)

    def sample(self) -> None:
        b = len(self.items)
        logits = self.pol.head_logits(self.last).float()  # [rows, L, U, D, 2]
        cond = logits[:b]
        if len(self.cfg_rows):
            cond = cond.index_copy(0, self.cfg_rows, guided_logits(cond[self.cfg_rows], logits[b:], self.scales))
        lp = bit_logprobs_t(cond, self.temps)
        self.bits, self.blp = self._draw(cond, lp, self.u[:, 0], self.temps)
        self.row_bits = self.bits
        if len(self.cfg_rows):
            # An uncond row feeds back its item's bits (shared) or an independent draw from the same guided
            # distribution (reference, as the published code does).
            own = self._draw(cond[self.cfg_rows], lp[self.cfg_rows], self.u[self.cfg_rows, 1],
                             self.temps[self.cfg_rows])[0]
            uncond = torch.where(self.uncond_own, own, self.bits[self.cfg_rows])
            self.row_bits = torch.cat([self.bits, uncond])

    def _draw(self, logits, lp, u, temps):
        """bits uint8 [B, L, U, D] and their log-probs: thresholded uniforms, or the reference's multinomial."""
        if not self.engine.multinomial_sampler:
            return sample_bits(lp, u)
        probs = torch.softmax(logits / temps.view(-1, 1, 1, 1, 1), dim=-1)
        bits = torch.multinomial(probs.view(-1, 2), 1).view(probs.shape[:-1])
        return bits.to(torch.uint8), lp.gather(-1, bits.unsqueeze(-1)).squeeze(-1)

    def advance(self, t: int) -> None:
        """Backbone and visual stack over position t (static shapes: the position is ``self.t``, set by the
        caller, and every step attends over the whole buffer with positions > t masked)."""
        pol, lm = self.pol, self.pol.model.language_model
        main, ds = pol.model.visual.bits_to_features(self.row_bits)
        if self.static:
            start = self.t
            mask = (self.key_valid & (self.k_pos <= self.t))[:, None, None]
            cos, sin = self.cos.index_select(1, self.t), self.sin.index_select(1, self.t)
        else:
            start = t
            mask = self.key_valid[:, None, None, : t + 1] if self.padded else None
            cos, sin = self.cos[:, t: t + 1], self.sin[:, t: t + 1]
        h = lm(main[:, None].to(pol.dtype), None, mask, visual_mask=None, deepstack=ds, cache=self.bb, start=start,
               rope=(cos, sin))
        if self.engine.recompute_visual_stack:
            self.history.append(h)
            self.last = self._recompute_last(t)
        else:
            self.last = pol.visual_stack(h, cos, sin, mask, cache=self.vc, start=start)[:, -1]

    def _recompute_last(self, t: int) -> torch.Tensor:
        """The reference's step: the visual stack over every position so far, output at the last one."""
        h = torch.cat(self.history, dim=1)
        mask = attention_mask(self.key_valid[:, : t + 1], t + 1)
        return self.pol.visual_stack(h, self.cos[:, : t + 1], self.sin[:, : t + 1], mask)[:, -1]

    def capture(self):
        """Record sample + advance in a CUDA graph and return ``step(i)`` that replays it.

        The graph reads ``last_in``, ``u`` and ``t`` and leaves ``bits``, ``blp`` and the next state in its own
        memory. The last position only samples, eagerly.
        """
        self.last_in = self.last.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require; it writes
            self.t.fill_(self.p)       # position p of the caches, which step 0 overwrites
            for _ in range(2):
                self.last = self.last_in
                self.sample()
                self.advance(self.p)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.last = self.last_in
            self.sample()
            self.advance(self.p)
        last_out = self.last
        self.last = self.last_in

        def step(i: int) -> None:
            if i == self.n - 1:
                self.sample()
                return
            if self.last is not self.last_in:
                self.last_in.copy_(self.last)
            self.t.fill_(self.p + i)
            graph.replay()
            self.last = last_out

        return step
