"""Tiny text-to-image demo: generate BSQ bits with the policy's KV-cached engine and write pictures of them.

    python -m jobs.demo --config configs/demo.yaml [sampling.cfg_scale=3.0 ...]
    ray job submit --working-dir . -- python -m jobs.demo --config configs/demo.yaml
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from uniar_ray.config import DemoConfig, parse_cli, to_dict
from uniar_ray.limits import ModelLimits
from uniar_ray.model.factory import load_policy
from uniar_ray.rollout import GenerationRequest, Rollout, TorchRolloutEngine
from uniar_ray.visualize import bits_preview, captioned_grid


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_cli(DemoConfig, argv, default_config="configs/demo.yaml")
    s = cfg.sampling
    ModelLimits.load(cfg.model.path).check_ar_size(s.ar_height, s.ar_width, key="sampling.ar_height/ar_width")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.tiny_seed)
    engine = TorchRolloutEngine(policy)
    requests = [GenerationRequest(p, s.ar_height, s.ar_width, seed=cfg.seed + i, temperature=s.temperature,
                                  cfg_scale=s.cfg_scale, cfg_mode=s.cfg_mode) for i, p in enumerate(cfg.prompts)]
    t0 = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - t0
    previews, captions = [], []
    for i, r in enumerate(results):
        if not isinstance(r, Rollout):
            print(f"[demo] skipped: {r.error}", file=sys.stderr)
            continue
        img = bits_preview(r.bits(), r.ar_height, r.ar_width)
        img.save(out / f"{i:03d}_bits.png")
        (out / f"{i:03d}.bits").write_bytes(r.bits_packed.tobytes())
        previews.append(img)
        captions.append(r.prompt)
    if previews:
        captioned_grid(previews, captions).save(out / "grid.png")
    summary = {"images": len(previews), "seconds": round(seconds, 3), "engine": engine.stats(), "config": to_dict(cfg)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not previews:  # nothing generated is a failed run, not an empty success
        raise SystemExit(f"[demo] every prompt failed (see above); nothing generated in {out}")
    print(f"[demo] {len(previews)} images' bits in {seconds:.2f}s; bit previews (not decoded pixels) in {out}")
    print(out)
    return out


if __name__ == "__main__":
    from jobs import entry

    entry.run(main, "demo")
