"""Batch evaluation on Ray Data: prompt records -> one row per missing sample -> generation actors (bits) -> decoder
actors (pixels) -> the benchmark's writer in the driver (official layout) -> scores, results.json, summary.md, preview.

    python -m jobs.eval --config configs/eval/geneval.yaml [model.path=/ckpt/UniAR benchmark.limit=16 ...]
    python -m jobs.eval --config configs/eval/quick_tiny.yaml benchmark.name=oneig      # tiny model, seconds
    python -m jobs.eval --config configs/eval/gpu/geneval.yaml model.path=/ckpt/UniAR    # 8 GPUs, bf16 (not yet run)
    ray job submit --working-dir . -- python -m jobs.eval --config configs/eval/geneval.yaml cluster.address=auto
A rerun resumes: only samples whose outputs are missing become rows. Prints the run folder at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import benchmarks
from benchmarks import report
from benchmarks.common import (
    BadLine,
    PromptFileError,
    PromptRecord,
    SampleCheck,
    atomic_write_text,
    iter_prompts,
    remove_stale_temps,
)
from jobs import entry, start_ray
from uniar_ray import preflight, runlock
from uniar_ray.config import EvalConfig, EvalSettings, ModelConfig, RolloutConfig, parse_cli, to_dict
from uniar_ray.limits import LimitError, ModelLimits, decoder_output_size, fit_prompt
from uniar_ray.model.loading import check_weight_files
from uniar_ray.run_identity import claim_folder, clear_outputs

MAX_PRINTED_FAILURES = 20
# What a run writes into out_dir: all of it, and only it, is deleted by overwrite=true.
OUTPUTS = ("images", "config.json", "results.json", "summary.md", "preview.png", "geneval_results.jsonl")


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_cli(EvalConfig, argv, default_config="configs/eval/quick_tiny.yaml")
    preflight.check_output_folder(out_dir_of(cfg), "out_dir")  # before the lock creates it
    with runlock.claim(out_dir_of(cfg), "out_dir", "eval"):  # this job's until it ends; a second one is refused
        plan = make_plan(cfg)  # before Ray: the folder's identity, model files, prompts and limits fail fast
        started = start_ray(cfg) if plan.rows else False  # nothing to generate: no Ray needed
        try:
            results = run(cfg, plan)
        finally:
            if started:
                import ray

                ray.shutdown()
    print(results["out_dir"])
    if results["samples_expected"] and not results["samples_written"] + results["samples_already_there"]:
        first = "; ".join(f["error"] for f in results["failures"][:3])
        raise SystemExit(f"[eval] no sample could be made ({results['samples_failed']} failed: {first}); see "
                         f"{Path(results['out_dir']) / 'results.json'}")
    return Path(results["out_dir"])


def run(cfg: EvalConfig, plan: "Plan | None" = None) -> dict[str, Any]:
    """One eval run on an already started Ray: plan (resume), stream, then finalize, score and report. Without a
    plan (a sweep's cell) the folder is claimed here for the run."""
    if plan is None:
        with runlock.claim(out_dir_of(cfg), "out_dir", "eval"):
            return run(cfg, make_plan(cfg))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.out_dir / "config.json", json.dumps(plan.config_record(), indent=2) + "\n")
    try:
        if plan.rows:  # earlier reports describe files about to change: not complete until finish says so
            write_partial(plan, "running")
        stats = stream(plan) if plan.rows else {"seconds": 0.0, "startup_s": 0.0, "written": 0}
        return finish(plan, stats)
    except KeyboardInterrupt as e:  # a stop signal: say what is there; a rerun resumes
        write_partial(plan, entry.describe_stop(e))
        raise


def out_dir_of(cfg: EvalConfig) -> Path:
    return Path(cfg.out_dir or f"runs/eval/{cfg.benchmark.name}").resolve()


def write_partial(plan: "Plan", status: str) -> None:
    """results.json of a run that has not finished (``complete: false``, what is there so far); summary.md goes
    until finish writes it again."""
    results = {"benchmark": plan.name, "model": plan.cfg.model.path, "score": None, "complete": False,
               "status": status, "prompts": len(plan.records),
               "samples_expected": len(plan.records) * plan.bench.samples_per_prompt,
               "samples_already_there": plan.already_done, "samples_written": plan.written,
               "samples_failed": len(plan.failures), "out_dir": str(plan.out_dir), "images_dir": str(plan.images_dir),
               "failures": plan.failures}
    atomic_write_text(plan.out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (plan.out_dir / "summary.md").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Plan: defaults, checkpoint, prompts, and the rows still to generate
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    cfg: EvalConfig
    bench: benchmarks.Resolved
    settings: EvalSettings  # every field filled in
    model_root: Path
    decoder_root: Path
    out_dir: Path
    images_dir: Path  # the official layout; reports live beside it, never inside (LongText globs *.png there)
    writer: Any
    identity: dict[str, Any]  # the settings that determine the files (config.json); see run_identity
    records: list[PromptRecord] = dataclasses.field(default_factory=list)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    bad_lines: list[BadLine] = dataclasses.field(default_factory=list)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    already_done: int = 0
    written: int = 0  # samples written by this run so far
    truncated: list[int] = dataclasses.field(default_factory=list)  # idx of prompts cut to max_prompt_tokens

    @property
    def name(self) -> str:
        return self.cfg.benchmark.name

    @property
    def edit(self) -> bool:
        return self.bench.image_root is not None and hasattr(self.bench.module, "input_image_path")

    def fail(self, idx: int, k: int | None, error: str) -> None:
        self.failures.append({"idx": idx, "k": k, "error": error})
        if len(self.failures) <= MAX_PRINTED_FAILURES:
            print(f"[eval] {self.name} idx {idx}{'' if k is None else f' sample {k}'}: {error}", file=sys.stderr)

    def config_record(self) -> dict[str, Any]:
        return {"identity": self.identity, "config": to_dict(self.cfg), "settings": dataclasses.asdict(self.settings),
                "prompt_file": str(self.bench.prompt_file), "samples_per_prompt": self.bench.samples_per_prompt,
                "model_root": str(self.model_root), "decoder_root": str(self.decoder_root)}


def make_plan(cfg: EvalConfig) -> Plan:
    bench = benchmarks.resolve(cfg.benchmark)
    root = model_root(cfg.model, cfg.tiny_cache)
    out_dir = out_dir_of(cfg)
    preflight.eval_checks(cfg, out_dir)  # this machine against the config, and an output folder that can be made
    identity = run_identity(cfg)
    state = claim_folder(out_dir, identity, overwrite=cfg.overwrite)
    images_dir = out_dir / "images"
    if images_dir.is_dir() and state == "resume":
        remove_stale_temps(images_dir)  # half-written files of a killed run
    plan = Plan(cfg, bench, resolve_settings(cfg.settings, bench.module.DEFAULTS), root,
                Path(cfg.decoder.path).resolve() if cfg.decoder.path else root, out_dir, images_dir,
                bench.writer(images_dir), identity)
    from uniar_ray.decoder.loading import resolve_components  # diffusers: imported when a plan is made

    resolve_components(plan.decoder_root)  # a missing decoder folder, a truncated file: here, not in a Ray actor
    for folder in {plan.model_root, plan.decoder_root}:
        check_weight_files(folder)
    limits = ModelLimits.load(str(plan.model_root), plan.decoder_root)
    s = plan.settings
    hw = decoder_output_size(plan.decoder_root, s.ar_height, s.ar_width, s.upsampling_ratio)
    plan.writer.check = SampleCheck(hw[::-1] if hw else None)  # resume: a sample is done if it decodes at this size
    add_rows(plan, limits, start_over=state == "overwrite")
    if plan.writer.check.removed:
        removed = plan.writer.check.removed
        print(f"[eval] {len(removed)} damaged sample file(s) removed, to be made again: {removed[0]}"
              + (f" (and {len(removed) - 1} more)" if len(removed) > 1 else ""), file=sys.stderr)
    limits.check_ar_size(s.ar_height, s.ar_width, s.upsampling_ratio, images=2 if plan.edit else 1,
                         prompt_tokens=max((limits.count(r["prompt"]) for r in plan.rows), default=0))
    if state == "overwrite":  # only now: a start refused by any check above leaves the old run as it was
        clear_outputs(out_dir, OUTPUTS)
    if state != "fresh":
        said = "same settings, resuming" if state == "resume" else "overwrite=true: the run with other settings deleted"
        print(f"[eval] {out_dir}: {said}", file=sys.stderr)
    return plan


def run_identity(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that determine an eval run's files. Batch sizes, actor counts, devices, benchmark.limit,
    skip_bad_lines, scoring and reporting may change between a run and its resume; anything here may not."""
    bench = benchmarks.resolve(cfg.benchmark)
    settings = resolve_settings(cfg.settings, bench.module.DEFAULTS)
    tiny = cfg.model.path == "tiny"
    return {
        "benchmark.name": cfg.benchmark.name, "benchmark.prompt_file": str(bench.prompt_file.resolve()),
        "benchmark.samples_per_prompt": bench.samples_per_prompt,
        "benchmark.image_root": str(bench.image_root.resolve()) if bench.image_root else None,
        "benchmark.model_name": cfg.benchmark.model_name, "benchmark.pad_missing": cfg.benchmark.pad_missing,
        "benchmark.max_prompt_tokens": cfg.benchmark.max_prompt_tokens,  # a truncated prompt is another image
        "model.path": "tiny" if tiny else str(Path(cfg.model.path).resolve()), "model.dtype": cfg.model.dtype,
        "model.tiny_seed": cfg.model.tiny_seed if tiny else None,
        "decoder.path": str(Path(cfg.decoder.path).resolve()) if cfg.decoder.path else "(model.path)",
        "decoder.dtype": cfg.decoder.dtype, "rollout.backend": cfg.rollout.backend,
        **{f"settings.{k}": v for k, v in dataclasses.asdict(settings).items()},
    }


def resolve_settings(s: EvalSettings, d: Any) -> EvalSettings:
    """Zero fields take the benchmark's DEFAULTS (the reference's launch-script values)."""
    return EvalSettings(
        ar_height=s.ar_height or d.ar_height, ar_width=s.ar_width or d.ar_width,
        temperature=s.temperature or d.temperature, cfg_scale=s.cfg_scale or d.cfg_scale, cfg_mode=s.cfg_mode,
        upsampling_ratio=s.upsampling_ratio or d.upsampling_ratio,
        num_inference_steps=s.num_inference_steps or d.decoder_steps,
        guidance_scale=s.guidance_scale or d.decoder_guidance, seed=s.seed or d.seed)


def sample_seed(settings: EvalSettings, idx: int, k: int, samples_per_prompt: int) -> int:
    # A function of (idx, k) only: a resumed run draws the same sample a full run would have.
    return settings.seed + idx * samples_per_prompt + k


def add_rows(plan: Plan, limits: ModelLimits, start_over: bool = False) -> None:
    """One row per (prompt, sample) whose output is missing; records with a missing, oversized or out-of-root input
    image are reported; prompts over benchmark.max_prompt_tokens are truncated (and counted) or refused.
    ``start_over``: the outputs there are about to be cleared (overwrite), so every sample is pending."""
    b, bc = plan.bench, plan.cfg.benchmark
    records = iter_prompts(b.prompt_file, skip_bad=b.skip_bad_lines, limit=b.limit, bad_lines=plan.bad_lines)
    refused = []
    for record in records:
        plan.records.append(record)
        try:  # a record the layout cannot name (ImgEdit original_id, OneIG id) stops the run before any work
            pending = list(range(b.samples_per_prompt)) if start_over else plan.writer.pending(record)
            plan.writer.sample_paths(record)
        except ValueError as e:
            raise PromptFileError(f"{b.prompt_file}: {e}") from None
        plan.already_done += b.samples_per_prompt - len(pending)
        if not pending:
            continue
        try:
            prompt, n = fit_prompt(limits.tokenizer, record.prompt, bc.max_prompt_tokens, bc.prompt_overflow,
                                   f"{b.prompt_file} idx {record.idx}", "benchmark.max_prompt_tokens")
        except LimitError as e:
            refused.append(str(e))
            continue
        if n > bc.max_prompt_tokens > 0:
            plan.truncated.append(record.idx)
        image_path = ""
        if plan.edit:
            problems = b.module.check_inputs([record], b.image_root, bc.max_input_image_pixels,
                                             bc.max_input_image_bytes, **b.input_options)
            if problems:
                plan.fail(record.idx, None, problems[0])
                continue
            image_path = str(b.module.input_image_path(record, b.image_root, **b.input_options).resolve())
        for k in pending:
            plan.rows.append({"idx": record.idx, "k": k, "prompt": prompt, "image_path": image_path,
                              "seed": sample_seed(plan.settings, record.idx, k, b.samples_per_prompt), "error": ""})
    for bad in plan.bad_lines:
        print(f"[eval] skipped malformed prompt line {bad}", file=sys.stderr)
    if refused:
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise LimitError("\n".join(refused[:5]) + more)
    if plan.truncated:
        shown = ", ".join(map(str, plan.truncated[:10])) + (" ..." if len(plan.truncated) > 10 else "")
        print(f"[eval] {len(plan.truncated)} prompts over benchmark.max_prompt_tokens={bc.max_prompt_tokens} were "
              f"truncated to it (idx {shown}); benchmark.prompt_overflow=error refuses them instead", file=sys.stderr)


def model_root(model: ModelConfig, tiny_cache: str) -> Path:
    """The checkpoint root both stages load; ``tiny`` is the seeded tiny four-folder checkpoint, written once."""
    if model.path != "tiny":
        root = Path(model.path).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"model.path={model.path}: not a folder (a UniAR checkpoint root, or tiny)")
        return root
    from uniar_ray.decoder.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(Path(tiny_cache) / f"seed{model.tiny_seed}", model.tiny_seed)


# ----------------------------------------------------------------------------------------------------------------
# Ray Data stages (callable classes: Ray Data runs each in its own actor pool). Columns are numbers, strings,
# bytes and uint8 tensors, so blocks travel as Arrow, never pickled. A failed row keeps going with ``error`` set.
# ----------------------------------------------------------------------------------------------------------------


def _set_threads(num_threads: int, num_cpus: float) -> None:
    import torch

    torch.set_num_threads(num_threads or max(1, int(num_cpus)))


class GenerateStage:
    """Rows -> bit-packed BSQ bits (``bits`` bytes, ``bits_shape`` [4]) with the rollout engine."""

    def __init__(self, model: dict, rollout: dict, settings: dict):
        from uniar_ray.rollout.factory import build_engine

        rollout_cfg = RolloutConfig(**rollout)
        _set_threads(rollout_cfg.num_threads, rollout_cfg.num_cpus)
        model_cfg = ModelConfig(**model)
        self.s = EvalSettings(**settings)
        self.engine = build_engine(model_cfg, rollout_cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from uniar_ray.rollout import GenerationRequest, Rollout

        n = len(batch["idx"])
        errors = [str(e) for e in batch["error"]]
        bits = np.array([b""] * n, dtype=object)
        shapes = np.zeros((n, 4), np.int32)
        requests, where = [], []
        for i in range(n):
            image = None
            if batch["image_path"][i]:
                try:
                    image = Path(batch["image_path"][i]).read_bytes()
                except OSError as e:
                    errors[i] = f"input image unreadable: {batch['image_path'][i]} ({e})"
                    continue
            s = self.s
            requests.append(GenerationRequest(
                str(batch["prompt"][i]), s.ar_height, s.ar_width, seed=int(batch["seed"][i]),
                temperature=s.temperature, cfg_scale=s.cfg_scale, cfg_mode=s.cfg_mode, image=image,
                request_id=f"{batch['idx'][i]}/{batch['k'][i]}", return_logprobs=False))
            where.append(i)
        for i, out in zip(where, self.engine.generate(requests) if requests else []):
            if isinstance(out, Rollout):
                bits[i] = out.bits_packed.tobytes()
                shapes[i] = out.bits_shape
            else:
                errors[i] = f"generation failed: {out.error}"
        return {"idx": batch["idx"], "k": batch["k"], "seed": batch["seed"], "bits": bits, "bits_shape": shapes,
                "error": np.array(errors, dtype=object)}


class DecodeStage:
    """Bits -> ``image`` uint8 [H, W, 3] with the UniAR decoder (zeros where ``error`` says why there is none)."""

    def __init__(self, root: str, decoder: dict, settings: dict):
        import torch

        from uniar_ray.decoder import UniARDecoder

        _set_threads(decoder["num_threads"], decoder["num_cpus"])
        self.s = EvalSettings(**settings)
        self.decoder = UniARDecoder.from_pretrained(root, dtype=getattr(torch, decoder["dtype"]),
                                                    device=decoder["device"], max_batch=decoder["max_batch"])
        self.out_hw = self.decoder.output_size(self.s.ar_height, self.s.ar_width, self.s.upsampling_ratio)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from uniar_ray.decoder import DecodeRequest

        n = len(batch["idx"])
        errors = [str(e) for e in batch["error"]]
        images = np.zeros((n, *self.out_hw, 3), np.uint8)
        where = [i for i in range(n) if not errors[i]]
        requests = [DecodeRequest(np.frombuffer(batch["bits"][i], np.uint8), tuple(map(int, batch["bits_shape"][i])),
                                  self.s.ar_height, self.s.ar_width, seed=int(batch["seed"][i]),
                                  request_id=f"{batch['idx'][i]}/{batch['k'][i]}") for i in where]
        results = self.decoder.decode_requests(requests, self.s.upsampling_ratio, self.s.num_inference_steps,
                                               self.s.guidance_scale) if requests else []
        for i, res in zip(where, results):
            if res.ok and res.image.shape == images.shape[1:]:
                images[i] = res.image
            else:
                errors[i] = f"decoding failed: {res.error or f'image of shape {res.image.shape}'}"
        return {"idx": batch["idx"], "k": batch["k"], "image": images, "error": np.array(errors, dtype=object)}


def build_dataset(plan: Plan):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's tqdm bar counts written images instead
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cfg, settings = plan.cfg, dataclasses.asdict(plan.settings)
    model = dataclasses.replace(cfg.model, path=str(plan.model_root))
    blocks = max(1, min(len(plan.rows) // cfg.batch_size, 2000))  # ~one batch per block: the stream starts at once
    ds = ray.data.from_items(plan.rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        GenerateStage, fn_constructor_kwargs={"model": to_dict(model), "rollout": to_dict(cfg.rollout),
                                              "settings": settings},
        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.rollout.num_cpus,
        num_gpus=cfg.rollout.num_gpus, compute=ray.data.ActorPoolStrategy(size=cfg.rollout.num_actors))
    return ds.map_batches(
        DecodeStage, fn_constructor_kwargs={"root": str(plan.decoder_root), "decoder": to_dict(cfg.decoder),
                                            "settings": settings},
        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.decoder.num_cpus,
        num_gpus=cfg.decoder.num_gpus, compute=ray.data.ActorPoolStrategy(size=cfg.decoder.num_actors))


def stream(plan: Plan) -> dict[str, float]:
    """Drive the pipeline and write each image as it arrives; images are never held beyond their batch."""
    from PIL import Image
    from tqdm import tqdm

    by_idx = {r.idx: r for r in plan.records}
    written, first, first_n = 0, None, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(plan.rows), unit="img", desc=f"eval {plan.name}", disable=not plan.cfg.progress,
               dynamic_ncols=True)
    with bar:
        for batch in build_dataset(plan).iter_batches(batch_size=None, batch_format="numpy"):
            entry.raise_if_stopped()
            if first is None:  # start-up: Ray Data, both actor pools' model loads, the first batch through
                first, first_n = time.perf_counter() - t0, len(batch["idx"])
            for idx, k, error, image in zip(batch["idx"], batch["k"], batch["error"], batch["image"]):
                if error:
                    plan.fail(int(idx), int(k), str(error))
                else:
                    written += plan.writer.write_sample(by_idx[int(idx)], int(k), Image.fromarray(image))
                    plan.written = written
                bar.update(1)
            bar.set_postfix(failed=len(plan.failures), refresh=False)
    seconds = time.perf_counter() - t0
    rest = len(plan.rows) - first_n
    steady = rest / (seconds - first) if first is not None and rest and seconds > first else None
    return {"seconds": seconds, "startup_s": first or 0.0, "written": written,
            "images_per_s": len(plan.rows) / seconds, "steady_images_per_s": steady}


# ----------------------------------------------------------------------------------------------------------------
# Finish: pack what needs all samples, check the layout, score, report
# ----------------------------------------------------------------------------------------------------------------


def finish(plan: Plan, stats: dict[str, float]) -> dict[str, Any]:
    incomplete = finalize_all(plan)
    layout = check_layout(plan)
    scores = score(plan) if plan.cfg.scoring.enabled else {"scored": False, "reason": "scoring.enabled=false"}
    s = plan.settings
    thumb = min(256, round(max(s.ar_height, s.ar_width) * s.upsampling_ratio))  # thumbnails never upscale
    sheet = report.preview(plan.writer, plan.records, plan.out_dir / "preview.png", plan.cfg.preview_prompts,
                           thumb) if plan.cfg.preview_prompts else None
    expected = len(plan.records) * plan.bench.samples_per_prompt
    results = {
        "benchmark": plan.name, "model": plan.cfg.model.path, "score": scores.get("score"),
        "complete": layout.ok and not plan.failures and not incomplete,
        "prompts": len(plan.records), "samples_expected": expected, "samples_already_there": plan.already_done,
        "samples_written": stats["written"], "samples_failed": len(plan.failures), "bad_lines": len(plan.bad_lines),
        "prompts_truncated": len(plan.truncated),
        "seconds": round(stats["seconds"], 3), "startup_s": round(stats["startup_s"], 3),
        "images_per_s": round(stats.get("images_per_s", 0.0), 4),
        "steady_images_per_s": _round(stats.get("steady_images_per_s")),
        "ar_size": f"{s.ar_height}x{s.ar_width}", "temperature": s.temperature, "cfg_scale": s.cfg_scale,
        "decoder_steps": s.num_inference_steps, "decoder_guidance": s.guidance_scale,
        "upsampling_ratio": s.upsampling_ratio, "samples_per_prompt": plan.bench.samples_per_prompt,
        "images_dir": str(plan.images_dir), "out_dir": str(plan.out_dir),
        "preview": str(sheet) if sheet else None,
        "scores": scores,
        "failures": plan.failures, "incomplete": incomplete,
        "bad_line_reports": [str(b) for b in plan.bad_lines], "layout_problems": layout.problems,
    }
    write_reports(plan.out_dir, results, title=f"{plan.name} eval ({plan.cfg.model.path})")
    print(f"[eval] {plan.name}: {stats['written']} written, {plan.already_done} already there, "
          f"{len(plan.failures)} failed, {len(plan.bad_lines)} bad lines; score {results['score']}; "
          f"{plan.out_dir / 'summary.md'}", file=sys.stderr)
    return results


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def write_reports(out_dir: Path, results: dict[str, Any], title: str) -> None:
    """results.json with everything; summary.md with the scalars, the score's scalars and its per-tag/category
    tables (the markdown helper shows flat mappings only)."""
    scores = results["scores"]
    view = {k: v for k, v in results.items() if k != "scores"}
    view["scores"] = {k: v for k, v in scores.items() if not isinstance(v, (dict, list))}
    for key in ("tags", "categories"):
        if isinstance(scores.get(key), dict):
            view[f"score per {key[:-1] if key == 'tags' else 'category'}"] = scores[key]
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "summary.md", report.summary_markdown(view, title) + "\n")


def finalize_all(plan: Plan) -> list[str]:
    """Let the writer pack prompts whose samples are all there (OneIG grids; also after a run killed between the
    last sample and its grid); a prompt that cannot be packed is listed."""
    out = []
    for record in plan.records:
        try:
            plan.writer.finalize(record)
        except ValueError as e:
            out.append(str(e))
    return out


def check_layout(plan: Plan):
    m, folder, records, b = plan.bench.module, plan.images_dir, plan.records, plan.bench
    if plan.name == "oneig":
        return m.check_layout(folder, records, b.writer_options["model_name"])
    if plan.name == "imgedit":
        return m.check_layout(folder, records)
    return m.check_layout(folder, records, b.samples_per_prompt)


def score(plan: Plan) -> dict[str, Any]:
    """The benchmark's score where local models allow it; otherwise why not."""
    sc = plan.cfg.scoring
    if plan.name == "imgedit":
        return {"scored": False, "reason": "ImgEdit is judged by GPT-4o (the official basic_bench.py on images/)"}
    if plan.name == "custom":
        return {"scored": False, "reason": "a custom prompt file has no scorer"}
    if plan.name == "geneval":
        if not sc.geneval_detector:
            return {"scored": False, "reason": "no detector configured (scoring.geneval_detector)"}
        return score_geneval(plan)
    if sc.ocr == "none":
        return {"scored": False, "reason": "scoring.ocr=none"}
    from benchmarks.common import rapidocr

    ocr, m = rapidocr(), plan.bench.module
    if plan.name == "longtext":
        res = m.score_folder(plan.images_dir, ocr, plan.records)
    else:  # oneig: only this run's ids, so a limited run is not reported as 198 dropped prompts
        text = m.read_text_content()
        ids = {m.prompt_id(r) for r in plan.records}
        folder = plan.images_dir / m.category_folder(plan.records[0]) / plan.bench.writer_options["model_name"]
        res = m.score_folder(folder, ocr, {i: t for i, t in text.items() if i in ids})
    found = res.get("found", res.get("images", 0))
    if not found:
        return {"scored": False, "reason": "no images to score"}
    return {"scored": True, "score": res["text_score"], "ocr": "rapidocr (the official scorers use Qwen2.5-VL-7B)",
            **res}


def score_geneval(plan: Plan) -> dict[str, Any]:
    from benchmarks.geneval import official_line, summarize
    from rewards.geneval import GenEvalReward
    from rewards.tiny import resolve

    sc = plan.cfg.scoring
    scorer = GenEvalReward.from_paths(resolve(sc.geneval_detector, "mask2former"), resolve(sc.geneval_clip, "clip"),
                                      device=sc.device, batch_size=sc.batch_size)
    rows, todo = [], [(r, p) for r in plan.records for p in plan.writer.sample_paths(r)]
    for start in range(0, len(todo), sc.batch_size):
        chunk = todo[start:start + sc.batch_size]
        images = [_read_rgb(p) for _, p in chunk]
        lines = [official_line(r) for r, _ in chunk]
        verdicts = scorer.evaluate_images(images, [json.loads(x) for x in lines])
        for (record, path), line, res in zip(chunk, lines, verdicts):
            if isinstance(res, Exception):
                plan.fail(record.idx, None, f"geneval scoring failed for {path.name}: {res}")
                continue
            meta = json.loads(line)
            rows.append({"filename": str(path), "tag": meta["tag"], "prompt": meta["prompt"], "correct": res.correct,
                         "reason": res.reason, "metadata": line.strip()})
    if not rows:
        return {"scored": False, "reason": "no images to score"}
    atomic_write_text(plan.out_dir / "geneval_results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    summary = summarize(rows)
    return {"scored": True, "score": summary["overall"], "detector": sc.geneval_detector, **summary}


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


if __name__ == "__main__":
    from jobs import eval as job  # the stage classes then pickle by reference to jobs.eval, not by value

    entry.run(job.main, "eval")
