"""``VLLMRolloutEngine``: the ``RolloutEngine`` protocol on vLLM (paged KV for both stacks, continuous batching).

    engine = VLLMRolloutEngine("/ckpt")            # a published checkpoint root or ar_model folder
    engine.generate([GenerationRequest("a cat", 512, 512, seed=1)])   # -> Rollout | RolloutError per request
Create it under ``if __name__ == "__main__":`` in scripts (vLLM spawns its workers); inside a Ray actor it just works.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from uniar_ray.model.configuration import UniARConfig
from uniar_ray.model.loading import resolve_ar_folder, safetensors_files
from uniar_ray.model.prompts import check_ar_size, generation_text, load_tokenizer

from ..types import GenerationRequest, Rollout, RolloutError
from .plugin import ARCHITECTURE
from .runner import decode_payload

WORKER_CLS = "uniar_ray.rollout.vllm_engine.worker.UniARCPUWorker"
VLLM_VERSION = "0.32.0"  # the runner overrides private V1 hooks of exactly this release


class VLLMRolloutEngine:
    def __init__(self, checkpoint: str | Path, max_batch: int = 16, kvcache_gib: float = 1.0,
                 max_model_len: int = 0, max_num_batched_tokens: int = 0, workdir: str | Path | None = None):
        """max_batch: vLLM's max_num_seqs (requests decoded together); kvcache_gib: paged KV for both stacks;
        max_model_len: prompt + image tokens (0: 256 + the tokens of a 1024x1024 image)."""
        import vllm

        if not vllm.__version__.startswith(VLLM_VERSION):
            raise RuntimeError(f"the UniAR vLLM engine is pinned to vLLM {VLLM_VERSION}, found {vllm.__version__}")
        folder = resolve_ar_folder(checkpoint)
        self.config = UniARConfig.from_pretrained(folder)
        self.config.validate_for_generation()
        self.tokenizer = load_tokenizer(folder)
        v = self.config.vision_config
        self.bits_shape = (v.num_levels, v.merge_unit, v.bsq_dim)
        self.max_model_len = max_model_len or 256 + (1024 // 32) ** 2
        self._tmp = tempfile.TemporaryDirectory(prefix="uniar-vllm-", dir=workdir)
        view = write_vllm_view(folder, Path(self._tmp.name), self.max_model_len)
        self.expected_names = _used_names(folder)
        # An explicit KV size also skips the CPU worker's warm-up profiling run (VLLM_CPU_KVCACHE_SPACE, if set,
        # still wins: vLLM reads it as whole GiB).
        kw = {"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}
        kw["kv_cache_memory_bytes"] = int(kvcache_gib * 2**30)
        self.llm = vllm.LLM(model=str(view), dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                            enable_prefix_caching=False, worker_cls=WORKER_CLS, max_num_seqs=max_batch,
                            max_model_len=self.max_model_len, seed=0, **kw)
        self._tokens, self._seconds, self._images = 0, 0.0, 0

    @classmethod
    def from_model_config(cls, model, max_batch: int = 16, kvcache_gib: float = 1.0) -> "VLLMRolloutEngine":
        """From ``uniar_ray.config.ModelConfig``; ``tiny`` writes the seeded tiny checkpoint to a temp folder."""
        if model.dtype != "float32":
            raise ValueError(f"model.dtype={model.dtype!r}: the vLLM engine runs float32 on CPU (bf16 crashes it)")
        path = model.path
        if path == "tiny":
            from uniar_ray.model.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="uniar-tiny-")) / "ar_model", model.tiny_seed)
        return cls(path, max_batch=max_batch, kvcache_gib=kvcache_gib)

    # ------------------------------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> list[Rollout | RolloutError]:
        from vllm import SamplingParams, TokensPrompt

        results: list[Rollout | RolloutError | None] = [None] * len(requests)
        prompts, params, owners = [], [], []
        for i, req in enumerate(requests):
            req.request_id = req.request_id or f"request-{i}"
            try:
                ids, n = self._prepare(req)
            except ValueError as e:
                results[i] = RolloutError(req.request_id, req.prompt, f"{req.request_id}: {e}")
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                n=1, max_tokens=n, min_tokens=n, ignore_eos=True, temperature=req.temperature, detokenize=False,
                extra_args={"uniar": {"seed": int(req.seed), "grid_w": req.ar_width // 32, "n": n}}))
            owners.append(i)
        if prompts:
            t0 = time.perf_counter()
            self.llm.enqueue(prompts, params, use_tqdm=False)
            outputs = self.llm.wait_for_completion(use_tqdm=False)  # sorted by request id = submission order
            self._seconds += time.perf_counter() - t0
            if len(outputs) != len(owners):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(owners)} requests")
            for i, out, prompt in zip(owners, outputs, prompts):
                results[i] = self._record(requests[i], prompt["prompt_token_ids"], out)
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

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], int]:
        check_ar_size(req.ar_height, req.ar_width)
        if not req.prompt or not req.prompt.strip():
            raise ValueError("empty prompt (the empty prompt is reserved for the unconditional CFG branch)")
        if not req.temperature > 0:
            raise ValueError(f"temperature={req.temperature} must be > 0")
        if req.cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={req.cfg_scale}: the vLLM engine serves cfg = 1 only (RL rollouts); its "
                             "scheduler cannot keep a conditional and an unconditional row in the same step. "
                             "Use rollout.backend=torch for guided sampling")
        if req.image is not None:
            raise ValueError("edit requests (with an input image) are served by rollout.backend=torch only")
        n = (req.ar_height // 32) * (req.ar_width // 32)
        ids = self.tokenizer(generation_text(req.prompt, req.ar_height, req.ar_width),
                             add_special_tokens=False)["input_ids"]
        if len(ids) + n > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + image ({n} tokens) exceeds max_model_len="
                             f"{self.max_model_len}; raise it or shorten the prompt")
        return ids, n

    def _record(self, req: GenerationRequest, ids: list[int], out) -> Rollout | RolloutError:
        data = getattr(getattr(out, "outputs", None), "data", None)
        if data is None:
            return RolloutError(req.request_id, req.prompt, f"{req.request_id}: vLLM finished the request without "
                                f"its bits (finish reason: {getattr(out, 'finished', '?')})")
        n = (req.ar_height // 32) * (req.ar_width // 32)
        bits, logp = decode_payload(data, (n, *self.bits_shape))
        self._tokens += n
        self._images += 1
        return Rollout.from_bits(bits, request_id=req.request_id, prompt=req.prompt,
                                 prompt_ids=np.asarray(ids, dtype=np.int32), ar_height=req.ar_height,
                                 ar_width=req.ar_width, logprobs=logp.numpy() if req.return_logprobs else None,
                                 seed=req.seed, temperature=req.temperature, cfg_scale=req.cfg_scale)


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
