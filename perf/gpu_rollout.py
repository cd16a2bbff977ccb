"""GPU rollout benchmark at the published size: the KV-cached torch engine with and without its step in a CUDA
graph vs the reference algorithm (visual stack recomputed every step), the attention kernel, and the decoder.

    python -m perf.gpu_rollout                       # one CUDA GPU: UniAR-8B shapes (perf/configs/uniar_8b), bf16
    python -m perf.gpu_rollout --tiny --device cpu   # the same code on the tiny model (CI runs this)

Needs only torch, safetensors and transformers' tokenizer (plus diffusers for the decoder section, skipped with a
note when absent); no Ray, vLLM or DeepSpeed. Weights are random (published shapes, no download); the tokenizer is
the project's locally built one, whose special-token ids replace the published ids (prompt ids differ, shapes do
not). Every row is printed as it is measured; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).parent / "configs" / "uniar_8b"
SIDE = {64: 256, 256: 512, 900: 960}  # AR image tokens -> AR side in pixels
H200_HBM_BYTES_PER_S = 4.8e12  # the H200's nominal HBM3e bandwidth
PROMPT = "a photo of a red cat and a blue dog on the left of a green bench"


def build_policy(tiny: bool, device: str, dtype: torch.dtype, text: dict | None = None):
    """Published shapes from perf/configs/uniar_8b with random weights (or the tiny model), tokenizer attached.
    ``text``: text_config fields to replace (another Qwen3-VL text stack under the published visual stack; the
    vision tower's output side follows the hidden size)."""
    from uniar_ray.model import UniARPolicy
    from uniar_ray.model.configuration import UniARConfig
    from uniar_ray.model.tiny import build_tiny_policy, build_tokenizer

    if tiny:
        return build_tiny_policy(0, dtype=dtype).to(device)
    tokenizer = build_tokenizer()
    cfg = UniARConfig.from_pretrained(CONFIG)
    for key, value in (text or {}).items():
        setattr(cfg.text_config, key, value)
    cfg.vision_config.out_hidden_size = cfg.text_config.hidden_size
    for name, tok in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                      ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(cfg, name, tokenizer.convert_tokens_to_ids(tok))
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds, not minutes of CPU init for 9B parameters
        policy = UniARPolicy(cfg)
    policy = policy.to(dtype).eval()
    policy.tokenizer = tokenizer
    return policy


def step_weight_bytes(policy) -> int:
    """Bytes of the weights one decode step reads: backbone layers, visual stack, head, bits -> features."""
    used = ("model.language_model.layers.", "visual_decoder.", "output_layer_vistok.", "model.visual.bsq_output_proj",
            "model.visual.merger.", "model.visual.deepstack_merger_list.")
    return sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if n.startswith(used))


def kv_read_bytes(policy, rows: int, p: int, n: int) -> float:
    """Mean bytes of K/V one step reads over a generation (position p + i attends to p + i + 1 entries)."""
    tc = policy.config.text_config
    layers = tc.num_hidden_layers + len(policy.visual_decoder)
    per_pos = 2 * rows * tc.num_key_value_heads * tc.head_dim * policy.dtype.itemsize * layers
    return per_pos * (p + (n + 1) / 2)


def measure_bandwidth(device: str) -> float | None:
    """Device-to-device copy of 2 GiB, bytes moved (read + write) per second."""
    if not device.startswith("cuda"):
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (time.perf_counter() - t0)


def run_engine(policy, kind: str, n: int, batch: int, cfg_scale: float, padded: bool = False) -> dict:
    from uniar_ray.rollout import GenerationRequest, TorchRolloutEngine

    engine = TorchRolloutEngine(policy, max_batch=batch, recompute_visual_stack=kind == "reference",
                                cuda_graph=kind.startswith("cached_graph"), compile=kind.endswith("compiled"))
    side = SIDE[n]
    prompts = [PROMPT if not padded or i % 2 else "a cat" for i in range(batch)]  # same length: no mask
    reqs = [GenerationRequest(prompts[i], side, side, seed=i, cfg_scale=cfg_scale) for i in range(batch)]
    engine.generate([GenerationRequest(PROMPT, 64, 64, cfg_scale=cfg_scale)] * batch)  # warm-up at this batch
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    seconds = time.perf_counter() - t0
    assert all(r.bits_shape[0] == n for r in out), [getattr(r, "error", None) for r in out]
    rows = batch * (2 if cfg_scale > 1 else 1)
    row = {"engine": kind, "n": n, "batch": batch, "rows": rows, "padded": padded,
           "ms_per_step": round(1000 * engine.last_decode_seconds / n, 3),
           "image_tokens_per_s": round(n * batch / seconds, 1), "seconds": round(seconds, 2),
           "prefill_s": round(engine.last_prefill_seconds, 3), "capture_s": round(engine.last_capture_seconds, 3)}
    if kind.startswith("cached_graph"):
        row["median_step_ms"] = round(1000 * statistics.median(engine.last_step_seconds), 3)
    if policy.device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def attention_kernels(policy, batch: int, n: int) -> dict:
    """Which SDPA kernel serves a decode step (grouped single query, as the engine calls it) with no mask and with
    a padding mask, and what each costs; flash-attn's too when it is installed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    tc, dev = policy.config.text_config, policy.device
    s = 64 + n
    q = torch.randn(batch, tc.num_key_value_heads, tc.num_attention_heads // tc.num_key_value_heads, tc.head_dim,
                    device=dev, dtype=policy.dtype)
    k, v = (torch.randn(batch, tc.num_key_value_heads, s, tc.head_dim, device=dev, dtype=policy.dtype) for _ in "kv")
    mask = torch.ones(batch, 1, 1, s, dtype=torch.bool, device=dev)
    mask[::2, ..., :5] = False  # left padding on every other row
    out = {"batch": batch, "keys": s}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    for label, m in (("no_mask", None), ("padding_mask", mask)):
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    out[f"{label}_{name}_us"] = round(1e6 * _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), 1)
            except RuntimeError:
                out[f"{label}_{name}_us"] = None  # this kernel refuses the inputs
        out[f"{label}_default_us"] = round(1e6 * _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), 1)
    try:
        from flash_attn import flash_attn_func

        qf = q.reshape(batch, 1, tc.num_attention_heads, tc.head_dim)
        out["flash_attn_pkg_us"] = round(1e6 * _time(lambda: flash_attn_func(qf, k.transpose(1, 2), v.transpose(1, 2))), 1)
    except ImportError:
        out["flash_attn_pkg_us"] = "not installed"
    return out


def _time(fn, repeats: int = 20) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def decoder_section(tiny: bool, device: str, dtype: torch.dtype, images: int, steps: int) -> dict:
    """UniAR's decoder with the SD3-medium-like shapes of spec 2.6 (random weights): images/s when `images`
    samples go in one call vs one per call, AR 512 -> 512 px (ratio 1.0), `steps` denoising steps, CFG 1.5."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return {"skipped": "diffusers is not installed (carry its wheel to run this section)"}
    from uniar_ray.decoder import UniARDecoder

    dec = UniARDecoder.tiny(dtype=dtype, device=device) if tiny else _published_shape_decoder(device, dtype)
    dec.max_batch = images
    cfg = dec.vision.cfg
    ar = 64 if tiny else 512
    n = (ar // 32) ** 2
    bits = torch.randint(0, 2, (images, n, cfg.num_levels, cfg.merge_unit, cfg.bsq_dim), dtype=torch.uint8)
    kw = dict(upsampling_ratio=1.0, num_inference_steps=steps, guidance_scale=1.5)
    dec.decode(bits[:1], ar, ar, seeds=[0], **kw)  # warm-up
    batched = _time(lambda: dec.decode(bits, ar, ar, seeds=list(range(images)), **kw), repeats=1)
    single = _time(lambda: [dec.decode(bits[i:i + 1], ar, ar, seeds=[i], **kw) for i in range(images)], repeats=1)
    return {"images": images, "steps": steps, "side_px": ar, "batched_images_per_s": round(images / batched, 3),
            "one_per_call_images_per_s": round(images / single, 3), "batching_speedup": round(single / batched, 2)}


def _published_shape_decoder(device: str, dtype: torch.dtype):
    """SD3-medium-like transformer (spec 2.6: 18 layers, 18 heads of 64), SD3's VAE layout, the published vision
    tower's BSQ output side, and random stand-ins for the cached SD3 prompt embeddings."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from uniar_ray.decoder import UniARDecoder
    from uniar_ray.decoder.loading import PromptEmbeddings
    from uniar_ray.decoder.transformer import SD3TransformerWithBSQ
    from uniar_ray.model.configuration import UniARConfig
    from uniar_ray.model.vision import VisionModel

    vcfg = UniARConfig.from_pretrained(CONFIG).vision_config
    with torch.device(device):
        vision = VisionModel(vcfg)
        transformer = SD3TransformerWithBSQ(siglip_channels=vcfg.num_levels * vcfg.hidden_size)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False)
        text, pooled = torch.randn(1, 333, 4096), torch.randn(1, 2048)
    vision, transformer, vae = (m.to(dtype).eval() for m in (vision, transformer, vae))
    prompt = PromptEmbeddings(text.to(dtype), pooled.to(dtype), text.to(dtype), pooled.to(dtype))
    return UniARDecoder(vision, transformer, vae, FlowMatchEulerDiscreteScheduler(shift=3.0), prompt)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny model (CI, CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", help="AR image tokens per image (64, 256, 900)")
    ap.add_argument("--batches", type=int, nargs="+", help="samples per engine call")
    ap.add_argument("--cfg", type=float, default=1.0, help="> 1 doubles the rows (cond + uncond)")
    ap.add_argument("--reference-sizes", type=int, nargs="+", help="sizes at which the reference algorithm runs")
    ap.add_argument("--engines", nargs="+", help="cached, cached_graph, cached_graph_compiled (default: all that "
                                                 "the device supports)")
    ap.add_argument("--reference-batches", type=int, nargs="+", help="batches at which the reference runs")
    ap.add_argument("--no-padded", action="store_true", help="skip the padded-prompt run")
    ap.add_argument("--no-decoder", action="store_true", help="skip the decoder section")
    ap.add_argument("--decoder-images", type=int, default=8)
    ap.add_argument("--decoder-steps", type=int, default=28)
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining runs past this many seconds")
    a = ap.parse_args(argv)
    sizes = a.sizes or ([64] if a.tiny else [256, 900])
    batches = a.batches or ([2] if a.tiny else [16, 64])
    ref_sizes = a.reference_sizes or sizes[:1]
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    t_start = time.perf_counter()
    result = {"bench": "gpu_rollout", "device": _device_name(a.device), "torch": torch.__version__,
              "dtype": str(dtype).split(".")[-1], "cfg": a.cfg, "model": "tiny" if a.tiny else "uniar_8b (random)"}
    t0 = time.perf_counter()
    policy = build_policy(a.tiny, a.device, dtype)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params_b"] = round(sum(p.numel() for p in policy.parameters()) / 1e9, 3)
    result["step_weight_gib"] = round(step_weight_bytes(policy) / 2**30, 3)
    bw = measure_bandwidth(a.device)
    result["copy_bandwidth_tb_s"] = round(bw / 1e12, 2) if bw else None
    print(json.dumps(result), flush=True)
    runs, skipped = [], []
    kinds = a.engines or (["cached", "cached_graph", "cached_graph_compiled"] if a.device.startswith("cuda")
                          else ["cached"])
    plan = [(k, n, b) for n in sizes for b in batches for k in kinds]
    plan += [("reference", n, b) for n in ref_sizes for b in (a.reference_batches or batches)]
    for kind, n, b in plan:
        if time.perf_counter() - t_start > a.budget_s:
            skipped.append(f"{kind} n={n} b={b}")
            continue
        runs.append(_guarded(lambda: run_engine(policy, kind, n, b, a.cfg), policy, bw,
                             {"engine": kind, "n": n, "batch": b, "padded": False}))
    if not a.no_padded:
        runs.append(_guarded(lambda: run_engine(policy, kinds[-1], sizes[0], batches[0], a.cfg, padded=True), policy,
                             bw, {"engine": kinds[-1], "n": sizes[0], "batch": batches[0], "padded": True}))
    result["attention"] = _section(lambda: attention_kernels(policy, batches[0], sizes[-1])) \
        if a.device.startswith("cuda") else None
    policy = None  # free the GPU for the decoder section
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    result["decoder"] = None if a.no_decoder else _section(lambda: decoder_section(a.tiny, a.device, dtype, 2 if a.tiny else a.decoder_images,
                                                         2 if a.tiny else a.decoder_steps))
    result["ratios"] = _ratios(runs)
    result["runs"], result["skipped"] = runs, skipped
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result), flush=True)


def _guarded(measure, policy, bandwidth, key: dict) -> dict:
    """One run; a failure is recorded in its row (with the error) instead of ending the benchmark."""
    try:
        row = measure()
        _add_bound(row, policy, bandwidth)
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        row = {**key, "error": f"{type(e).__name__}: {e}"[:500]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def _section(measure) -> dict:
    try:
        return measure()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _add_bound(row: dict, policy, bandwidth: float | None) -> None:
    """The HBM bound of a decode step: weights + mean K/V read, over the nominal and the measured bandwidth."""
    side = SIDE[row["n"]]
    p = 40  # prompt tokens, about (the bound is insensitive to it)
    moved = step_weight_bytes(policy) + kv_read_bytes(policy, row["rows"], p, (side // 32) ** 2)
    row["hbm_bound_ms"] = round(1000 * moved / H200_HBM_BYTES_PER_S, 3)
    if bandwidth:
        row["step_over_bound"] = round(row["ms_per_step"] / row["hbm_bound_ms"], 2)


def _ratios(runs: list[dict]) -> dict:
    """Each cached engine over the reference (tokens/s), graphed over eager (step time), per (n, batch)."""
    by = {(r["engine"], r["n"], r["batch"]): r for r in runs if not r["padded"] and "error" not in r}
    out = {}
    for (kind, n, b), r in by.items():
        ref = by.get(("reference", n, b))
        if kind != "reference" and ref:
            out[f"{kind}_over_reference_n{n}_b{b}"] = round(r["image_tokens_per_s"] / ref["image_tokens_per_s"], 2)
        eager = by.get(("cached", n, b))
        if kind.startswith("cached_graph") and eager:
            out[f"{kind}_over_eager_step_n{n}_b{b}"] = round(eager["ms_per_step"] / r["ms_per_step"], 2)
    return out


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
