"""One GRPO step on one GPU, end to end and measured, with the library code the actors call: prompts -> the torch
rollout engine over the training policy itself (colocated: CUDA graph + compile, no weight copy) -> the decoder
(SD3-medium shapes) -> a programmatic reward computed on the GPU -> group advantages (uniar_ray.grpo) -> the
trainer's loss (uniar_ray.train_step, as the DeepSpeed trainer actor) with gradient checkpointing -> AdamW with fp32
master weights and moments (uniar_ray.optim), the bf16 parameters updated in place -> the next step samples from
the updated weights, and a check that it did.

    python -m perf.gpu_grpo                          # one CUDA GPU: Qwen3-VL-4B text stack, UniAR's visual stack
    python -m perf.gpu_grpo --tiny --device cpu      # the same code on the tiny model (CI runs this)

Needs torch, transformers (tokenizer), tokenizers, safetensors and diffusers (carry its wheel); no Ray, DeepSpeed or
vLLM. Weights are random at the published shapes (no download). Prints the memory plan by part before building,
one JSON line per step as it is measured, and one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import time

import torch

from perf.gpu_rollout import _device_name, _published_shape_decoder, build_policy

# Qwen3-VL text stacks (published config.json values); "8b" is perf/configs/uniar_8b's own. UniAR keeps lm_head
# untied from the embeddings at every size, as its published 8B does.
TEXT_STACKS = {
    "2b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
               num_key_value_heads=8, head_dim=128),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128),
    "8b": {},
}
# actors/trainer.py's (that module imports Ray); a test keeps them equal
FROZEN_PREFIXES = ("model.visual.", "lm_head.")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
                    ("A100", 312.0), ("L40S", 362.1))
PROMPTS = ("a photo of a red cat and a blue dog on the left of a green bench",
           "a lighthouse on a rocky cliff at sunset, photorealistic",
           "two apples, three oranges and four bananas on a wooden table",
           "a poster with the text Hello World in bold letters")
GIB = 2**30


def trainable(name: str) -> bool:
    return not name.startswith(FROZEN_PREFIXES)


# ----------------------------------------------------------------------------------------------------------------
# memory on paper
# ----------------------------------------------------------------------------------------------------------------


def memory_plan(policy, decoder_numel: int, a, prompt_len: int) -> dict:
    """Bytes by part (GiB) of the training state and of each phase's transient memory, from the shapes alone.

    Trainable parameters keep bf16 weights + bf16 gradients + fp32 master + fp32 Adam moments (16 bytes each, what
    DeepSpeed's bf16 ZeRO keeps on one rank); frozen ones (vision tower, lm_head) 2 bytes. Activations: gradient
    checkpointing keeps each layer's input per micro-batch and recomputes one layer at a time."""
    e = 2 if a.dtype == "bfloat16" else 4
    params = dict(policy.named_parameters())
    n_all = sum(p.numel() for p in params.values())
    n_train = sum(p.numel() for k, p in params.items() if trainable(k))
    tc = policy.config.text_config
    layers = tc.num_hidden_layers + len(policy.visual_decoder)
    n_tok = (a.ar // 32) ** 2
    s, h, mb = prompt_len + n_tok, tc.hidden_size, a.micro_batch
    levels, units, dims = policy.bits_shape
    bits = n_tok * levels * units * dims
    part = {
        "weights_all": n_all * e, "grads_trainable": n_train * e, "master_fp32": n_train * 4,
        "adam_moments_fp32": n_train * 8, "reference_policy": n_all * e if a.beta else 0,
        "decoder": decoder_numel * e,
        "rollout_kv_cache": 2 * a.prompts * a.generations * layers * tc.num_key_value_heads * tc.head_dim * s * e,
        "train_activations": mb * s * (h * layers + 3 * h + 2 * tc.intermediate_size + s // 4) * e * 2
        + mb * bits * 2 * 4 * 4,  # layer inputs, one recomputed layer, the fp32 bit logits and their gradients
        "optimizer_temp": 4 * max(max(p.numel() for p in params.values()), min(n_train, a.bucket_numel)),
    }
    state = part["weights_all"] + part["master_fp32"] + part["adam_moments_fp32"] + part["reference_policy"] \
        + part["decoder"]
    peaks = {"rollout": state + part["rollout_kv_cache"],
             "train": state + part["grads_trainable"] + part["train_activations"],
             "optimizer": state + part["grads_trainable"] + part["optimizer_temp"]}
    out = {f"{k}_gib": _sig(v / GIB) for k, v in part.items()}
    out.update({f"peak_{k}_gib": _sig(v / GIB) for k, v in peaks.items()})
    out.update(params_b=round(n_all / 1e9, 3), trainable_b=round(n_train / 1e9, 3),
               decoder_params_b=round(decoder_numel / 1e9, 3))
    return out


def parts_b(policy) -> dict:
    """Parameters (billions) by part of the policy."""
    def part(name):
        for prefix, label in (("model.language_model.embed_tokens", "embed_tokens"),
                              ("model.language_model", "text_layers"), ("model.visual", "vision_tower_frozen"),
                              ("visual_decoder", "visual_decoder"), ("output_layer_vistok", "vistok_head"),
                              ("lm_head", "lm_head_frozen")):
            if name.startswith(prefix):
                return label
        return name
    out: dict = {}
    for n, p in policy.named_parameters():
        out[part(n)] = out.get(part(n), 0) + p.numel()
    return {k: round(v / 1e9, 4) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------------


def target_color_scores(pixels: torch.Tensor, rgb=(255.0, 0.0, 0.0)) -> torch.Tensor:
    """rewards/programmatic.py's TargetColorReward on the device: pixels [B, 3, H, W] in [0, 1] -> [B] float32,
    1 - mean Euclidean RGB distance (on the 0..255 values the image would be saved with) / (255 sqrt 3)."""
    x = (pixels.float() * 255).round()
    target = torch.tensor(rgb, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    dist = (x - target).pow(2).sum(1).sqrt().mean(dim=(1, 2))
    return 1.0 - dist / (255.0 * 3 ** 0.5)


class Bench:
    """The policy, its colocated engine, the decoder and the optimizer, and one GRPO step over them."""

    def __init__(self, a, dtype: torch.dtype):
        from uniar_ray.config import GRPOConfig
        from uniar_ray.decoder import UniARDecoder
        from uniar_ray.optim import MasterWeightAdamW
        from uniar_ray.rollout import TorchRolloutEngine

        self.a, self.dev = a, torch.device(a.device)
        self.cfg = GRPOConfig(learning_rate=a.lr, beta=a.beta, num_generations=a.generations,
                              decode_num_inference_steps=a.decoder_steps)
        self.mem: dict = {}
        self.policy = build_policy(a.tiny, a.device, dtype, TEXT_STACKS[a.text])
        self.policy.set_gradient_checkpointing(not a.no_grad_ckpt)
        self.mem["after_policy_gib"] = _allocated(self.dev)
        # The engine first: fusing q/k/v and gate/up replaces those Parameter objects by views of the fused buffer,
        # so the optimizer must be built on the parameters as they are after it.
        self.engine = TorchRolloutEngine(self.policy, max_batch=a.prompts * a.generations, cuda_graph=a.graph,
                                         compile=a.compile)
        for name, p in self.policy.named_parameters():
            p.requires_grad_(trainable(name))
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False) if a.beta else None
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.opt = MasterWeightAdamW(self.params, lr=a.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                     eps=self.cfg.adam_epsilon, weight_decay=self.cfg.weight_decay,
                                     max_grad_norm=self.cfg.max_grad_norm, bucket_numel=a.bucket_numel,
                                     fused=True if self.dev.type == "cuda" else None)
        self.mem["after_master_gib"] = _allocated(self.dev)
        if a.tiny:
            self.decoder = UniARDecoder.tiny(dtype=dtype, device=a.device)
        else:
            self.decoder = _published_shape_decoder(a.device, dtype)
        self.decoder.max_batch = a.decoder_batch
        self.mem["after_decoder_gib"] = _allocated(self.dev)
        self.requests = self._requests()
        self.first = None  # step 1's rollouts
        self.watch = next(p for n, p in self.policy.named_parameters() if n.endswith("layers.0.mlp.down_proj.weight"))

    def _requests(self):
        from uniar_ray.rollout import GenerationRequest

        # The same prompts and seeds every step: the bench measures time, and step 2 can be compared with step 1.
        return [GenerationRequest(PROMPTS[p % len(PROMPTS)], self.a.ar, self.a.ar, seed=1000 * p + k,
                                  temperature=self.cfg.temperature, request_id=f"p{p}-g{k}")
                for p in range(self.a.prompts) for k in range(self.a.generations)]

    def step(self, index: int, count_flops: bool = False) -> dict:
        from uniar_ray import grpo

        a, t, mem = self.a, {}, {}
        with _phase(t, mem, "rollout", self.dev):
            rollouts = self.engine.generate(self.requests)
        if index == 1:
            self.first = rollouts
        bad = [r for r in rollouts if not hasattr(r, "bits")]
        if bad:
            raise RuntimeError(f"rollout failed: {bad[0].error}")
        live = [p for p in self.policy.parameters() if p.requires_grad]
        if len(live) != len(self.params) or any(p is not q for p, q in zip(live, self.params)):
            raise RuntimeError("the rollout engine replaced trainable parameters (re-fused projections after a "
                               ".to()?): the optimizer would update tensors the policy no longer uses")
        eng = {"prefill_s": self.engine.last_prefill_seconds, "capture_s": self.engine.last_capture_seconds,
               "ar_steps_s": self.engine.last_decode_seconds}
        check = self._check(rollouts) if index == 2 else None  # before this step's update; not timed
        with _phase(t, mem, "decode", self.dev):
            bits = torch.stack([r.bits() for r in rollouts]).to(self.dev)
            pixels = self.decoder.decode_pixels(bits, a.ar, a.ar, upsampling_ratio=1.0,
                                                num_inference_steps=a.decoder_steps, guidance_scale=1.0,
                                                seeds=list(range(len(rollouts))))
        with _phase(t, mem, "reward", self.dev):
            rewards = target_color_scores(pixels)
        with _phase(t, mem, "advantages", self.dev):
            res = grpo.group_advantages(rewards[:, None], [1.0], a.generations, self.cfg.scale_rewards,
                                        self.cfg.all_nan_rewards, func_names=["target_color"])
            for i, (r, adv) in enumerate(zip(rollouts, res.advantages.tolist())):
                r.group, r.advantage = i // a.generations, adv
        before = self.watch.detach().clone()
        flops: dict = {}
        with _phase(t, mem, "train", self.dev):
            metrics, micro = self._train(rollouts, flops if count_flops else None)
        with _phase(t, mem, "optimizer", self.dev):
            grad_norm = self.opt.step()
            self.opt.zero_grad()
        if count_flops:
            flops["forward"] = _forward_flops(self.policy, micro)
        row = {"step": index, "images": len(rollouts), **{f"{k}_s": round(v, 4) for k, v in t.items()},
               **{f"engine_{k}": round(v, 4) for k, v in eng.items()},
               "step_s": round(sum(t.values()), 4), "reward_mean": round(float(rewards.mean()), 5),
               "loss": metrics.get("loss"), "grad_norm": round(grad_norm, 5),
               "watched_weight_changed_frac": round(float((self.watch != before).float().mean()), 5),
               **({"peak_gib": mem} if mem else {}), **({"flops": flops} if flops else {})}
        if check:
            row["check"] = check
        return row

    def _check(self, rollouts) -> dict:
        """Step >= 2 sampled with weights the optimizer updated in place: equal to eager sampling with those
        weights, and different from step 1 (same requests and seeds: the update reached the sampler)."""
        return {"replay_vs_eager": self.check_against_eager(rollouts), "vs_step1": compare_bits(rollouts, self.first)}

    def _train(self, rollouts, flops: dict | None) -> tuple[dict, list]:
        """The DeepSpeed trainer actor's pass (actors/trainer.py), on the plain policy: micro-batches prepared first,
        then loss and backward per micro-batch, gradients accumulating over the generation batch."""
        from torch.utils.flop_counter import FlopCounterMode

        from uniar_ray import train_step

        pol, mb = self.policy.train(), self.a.micro_batch
        counts = train_step.batch_counts(rollouts, num_processes=1)
        ref = None if self.ref is None else self.ref.bit_logits
        counter = FlopCounterMode(display=False) if flops is not None else None
        sums: dict = {}
        with counter if counter is not None else contextlib.nullcontext():
            micro = [train_step.prepare(rollouts[i: i + mb], pol, ref, pol.tokenizer.pad_token_id, self.cfg, self.dev)
                     for i in range(0, len(rollouts), mb)]
            for x in micro:
                loss, metrics = train_step.micro_loss(pol, x, counts, self.cfg)
                loss.backward()
                metrics["loss"] *= len(micro)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v / len(micro)
        if counter is not None:
            flops["train_with_recompute"] = counter.get_total_flops()
        pol.eval()
        return sums, micro

    def check_against_eager(self, got) -> dict:
        return compare_bits(got, eager_rollouts(self.policy, self.requests, self.a.graph, self.a.compile))


def eager_rollouts(policy, requests, graph: bool, compiled: bool) -> list:
    """The requests sampled without a CUDA graph from the policy's current weights. GPU: the live policy, the same
    static-shape step and compiled kernels launched one by one (so equal bits = the replay read the updated
    weights). CPU: a deep copy of the policy, whose oneDNN packs are built afresh from the current weights (so
    equal bits = the engine's packs were rebuilt after the in-place update)."""
    from uniar_ray.rollout import TorchRolloutEngine

    if policy.device.type == "cuda":
        engine = TorchRolloutEngine(policy, max_batch=len(requests), static_shapes=graph, compile=compiled)
    else:
        engine = TorchRolloutEngine(copy.deepcopy(policy), max_batch=len(requests))
    return engine.generate(requests)


def compare_bits(got, want) -> dict:
    """Equality of two lists of rollouts' bits (same requests), the fraction of equal bits, the largest log-prob
    difference."""
    same = [torch.equal(a.bits(), b.bits()) for a, b in zip(got, want)]
    equal = sum(int((a.bits() == b.bits()).sum()) for a, b in zip(got, want))
    total = sum(a.bits().numel() for a in got)
    lp = max(float(abs(a.logprobs - b.logprobs).max()) for a, b in zip(got, want))
    return {"equal": all(same), "equal_bits_frac": round(equal / total, 6), "logprob_max_diff": lp}


def _forward_flops(policy, micro) -> int:
    """FLOPs of the scorer's forward alone over the generation batch (the model FLOPs are 3x: forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # gradients on: the training kernels (CPU: not oneDNN's packs)
        for x in micro:
            policy(x.ids, x.mask, x.bits, x.h, x.w)
    return counter.get_total_flops()


class _phase:
    """Time a phase (device-synchronised) and record its peak device memory."""

    def __init__(self, times: dict, mem: dict, name: str, dev: torch.device):
        self.times, self.mem, self.name, self.dev = times, mem, name, dev

    def __enter__(self):
        _sync(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        _sync(self.dev)
        self.times[self.name] = time.perf_counter() - self.t0
        if self.dev.type == "cuda":
            self.mem[self.name] = round(torch.cuda.max_memory_allocated(self.dev) / GIB, 2)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _allocated(dev: torch.device) -> float | None:
    return round(torch.cuda.memory_allocated(dev) / GIB, 2) if dev.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model and decoder (CI, CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--text", default="4b", choices=sorted(TEXT_STACKS),
                    help="Qwen3-VL text stack (default 4b: the largest whose training state fits 80 GB)")
    ap.add_argument("--prompts", type=int, default=2, help="prompt groups per step")
    ap.add_argument("--generations", type=int, default=16, help="G samples per prompt")
    ap.add_argument("--ar", type=int, help="AR side in pixels (default 512; tiny 64)")
    ap.add_argument("--micro-batch", type=int, default=2, help="samples per forward/backward (the recipe's 2)")
    ap.add_argument("--decoder-steps", type=int, default=14, help="denoising steps (the recipe's 14, no CFG)")
    ap.add_argument("--decoder-batch", type=int, default=8, help="images per decoder call")
    ap.add_argument("--steps", type=int, help="GRPO steps (default 3 on CUDA: step 1 warms up; 2 on CPU); >= 2")
    ap.add_argument("--lr", type=float, default=5e-6, help="the recipe's 5e-6")
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight; > 0 adds a frozen reference copy (the recipe's "
                                                             "0.01 does not fit one 80 GB GPU at 4b)")
    ap.add_argument("--no-graph", action="store_true", help="no CUDA graph (CPU always)")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile of the decoder layers (CPU always)")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--bucket-numel", type=int, default=1 << 26, help="parameters whose fp32 gradients the optimizer "
                                                                       "holds at once")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, when its name is not in the table")
    a = ap.parse_args(argv)
    on_cuda = a.device.startswith("cuda")
    a.graph, a.compile = on_cuda and not a.no_graph, on_cuda and not a.no_compile
    a.ar = a.ar or (64 if a.tiny else 512)
    a.steps = a.steps or (3 if on_cuda else 2)
    if a.steps < 2:
        ap.error("--steps must be >= 2 (step 2 is checked against eager sampling)")
    if on_cuda and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device here; use --tiny --device cpu")
    if not on_cuda and not a.tiny:
        ap.error(f"--device {a.device} without --tiny would train the {a.text} model on the CPU (tens of GB, hours); "
                 "use --tiny there")
    return a


def _peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


def main(argv=None):
    a = _args(argv)
    dtype = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    name = _device_name(a.device)
    result = {"bench": "gpu_grpo", "device": name, "torch": torch.__version__, "dtype": a.dtype,
              "model": "tiny" if a.tiny else f"qwen3-vl-{a.text} text + uniar visual stack (random)",
              "images_per_step": a.prompts * a.generations, "ar": a.ar, "micro_batch": a.micro_batch,
              "decoder_steps": a.decoder_steps, "cuda_graph": a.graph, "compile": a.compile,
              "grad_ckpt": not a.no_grad_ckpt, "lr": a.lr, "beta": a.beta}
    if not a.tiny:  # the plan before anything is allocated (an out-of-memory run still shows it); tiny: after
        _plan(result, a, build_policy(False, "meta", dtype, TEXT_STACKS[a.text]), _decoder_numel(dtype), dev)
        print(json.dumps(result), flush=True)
    t0 = time.perf_counter()
    bench = Bench(a, dtype)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    if a.tiny:
        _plan(result, a, bench.policy, sum(p.numel() for m in _decoder_modules(bench.decoder) for p in m.parameters()),
              dev)
    result["memory_measured_gib"] = bench.mem
    steps = []
    try:
        for i in range(a.steps):
            steps.append(bench.step(i + 1, count_flops=i == 0))
            print(json.dumps(steps[-1]), flush=True)
            if i == 0:
                bench.mem["after_step1_gib"] = _allocated(dev)  # the Adam moments exist from the first update on
    except Exception as e:  # one device call: the figures so far still end the output, as its last line
        result.update(error=f"step {len(steps) + 1}: {type(e).__name__}: {e}"[:1000], steps=steps,
                      peak_gib=round(torch.cuda.max_memory_allocated(dev) / GIB, 2) if dev.type == "cuda" else None)
        print(json.dumps(result), flush=True)
        raise
    check = steps[1]["check"]  # step 2: the first sampled from updated weights
    result.update(_summary(steps, a, name))
    result["check"] = {"step2_replay_equals_eager": check["replay_vs_eager"]["equal"],
                       "step2_bits_differ_from_step1_frac": round(1 - check["vs_step1"]["equal_bits_frac"], 6),
                       **check}
    result["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / GIB, 2) if dev.type == "cuda" else None
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["steps"] = steps
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    return result


def _summary(steps: list[dict], a, name: str) -> dict:
    """The last step's phases (step 1 warms up), images per GPU-second and the trainer's achieved FLOP/s."""
    last, flops = steps[-1], steps[0]["flops"]
    phases = ("rollout", "decode", "reward", "advantages", "train", "optimizer")
    out = {"phases_s": {p: last[f"{p}_s"] for p in phases}, "step_s": last["step_s"],
           "images_per_gpu_s": round(last["images"] / last["step_s"], 3), "anchor_images_per_gpu_s": "0.3-0.5"}
    hw, model = flops["train_with_recompute"], 3 * flops["forward"]
    peak = _peak_tflops(name, a.peak_tflops) if a.dtype == "bfloat16" else a.peak_tflops  # the table is bf16
    out["train_flops"] = {"hardware_with_recompute": hw, "model_fwd_bwd": model, "forward": flops["forward"],
                          "tflops_hardware": _sig(hw / last["train_s"] / 1e12),
                          "tflops_model": _sig(model / last["train_s"] / 1e12),
                          "tflops_model_incl_optimizer": _sig(model / (last["train_s"] + last["optimizer_s"]) / 1e12),
                          "peak_tflops": peak}
    if peak:
        out["train_flops"]["hfu"] = round(out["train_flops"]["tflops_hardware"] / peak, 4)
        out["train_flops"]["mfu"] = round(out["train_flops"]["tflops_model"] / peak, 4)
    return out


def _plan(result: dict, a, policy, decoder_numel: int, dev: torch.device) -> None:
    """The shapes and the memory plan by part into ``result``; on CUDA whether the plan's peak fits the device."""
    prompt_len = 40  # about the templated prompt's tokens (the plan is insensitive to it)
    result["shapes"] = {"text": {k: getattr(policy.config.text_config, k) for k in TEXT_STACKS["4b"]},
                        "vision_depth": policy.config.vision_config.depth,
                        "visual_decoder_depth": len(policy.visual_decoder), "params_b": parts_b(policy)}
    result["memory_plan"] = memory_plan(policy, decoder_numel, a, prompt_len)
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory / GIB
        result["device_memory_gib"] = round(total, 1)
        result["plan_fits"] = max(v for k, v in result["memory_plan"].items() if k.startswith("peak_")) < total


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _decoder_modules(dec) -> tuple:
    return dec.vision, dec.transformer, dec.vae


def _decoder_numel(dtype: torch.dtype) -> int:
    """Parameters of the published-shape decoder, built on the meta device (nothing allocated)."""
    return sum(p.numel() for m in _decoder_modules(_published_shape_decoder("meta", dtype)) for p in m.parameters())


if __name__ == "__main__":
    main()
