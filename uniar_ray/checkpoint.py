"""GRPO checkpoints other jobs can use, and the rules for resuming one: the published model layout beside the
trainer state, which checkpoints are complete (newest first, corrupt ones skipped), and the run's identity.

    link_decoder(folder / "model", cfg.decoder, run_path)     # after the trainer wrote folder/model/ar_model
    for ckpt in complete_checkpoints(run_path): ...             # newest first; a truncated file makes one incomplete
    breaking, changed = compare_identity(old_config, new_config)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MODEL_DIR = "model"  # inside a checkpoint folder: ar_model/ + the decoder's three components (linked)
DRIVER_STATE = "driver_state.json"  # written last: a checkpoint without it is incomplete

# Settings a resumed run cannot change (fnmatch patterns over the flattened config, ``*`` spans dots): what the run
# *is*. The weights and optimizer state it continues from and their sharding; what the saved data position means; the
# task it is trained on (AR size, prompts as the policy sees them, the decoder that turns its bits into the images the
# rewards score, the reward set and weights, the KL reference); the seeds that make it reproducible; the validation set
# its curves are measured on. Everything else (steps, learning rate, clipping, temperature, actor counts, timeouts...)
# may differ and is listed when it does. docs/bad_inputs.md ("GRPO resume") has the table.
_POLICY = "the policy the checkpoint was trained from"
_DATA = "the prompts the saved data position points into"
_ORDER = "the prompt order the saved data position points into"
_DECODER = "the decoder that turns the policy's bits into the images the rewards score"
_DECODE = "how the images the rewards score are decoded"
_REWARD = "the reward the run maximises: which rewards, their weights, models and routing"
IDENTITY_KEYS = {
    "model.path": _POLICY,
    "model.tiny_seed": _POLICY,
    "model.dtype": "the dtype of the saved weights and optimizer state",
    "grpo.num_generations": "the group size of every saved step",
    "grpo.ref_model_path": "the KL reference policy (empty = model.path)",
    "grpo.seed": "the seeds of every roll-out and decode: the run would no longer sample what it would have",
    "ar_height": "the image size the policy is trained to generate",
    "ar_width": "the image size the policy is trained to generate",
    "data.prompts_per_step": "the meaning of the saved data position",
    "data.path": _DATA,
    "data.prompt_key": _DATA,
    "data.skip_bad_lines": _DATA,
    "data.max_prompt_tokens": "the prompts as the policy sees them (truncation)",
    "data.seed": _ORDER,
    "data.shuffle": _ORDER,
    "data_fingerprint": "the prompts the saved data position points into (the data files changed)",
    "decoder.path": _DECODER,
    "decoder.tiny_seed": _DECODER,
    "decoder.tiny_bit_driven": _DECODER,
    "decoder.inference_skip_final_layernorm": _DECODER,
    "decoder.dtype": _DECODER,
    "grpo.decode_num_inference_steps": _DECODE,
    "grpo.decode_cfg_scale": _DECODE,
    "decode_upsampling_ratio": _DECODE,
    "decode_seed": _DECODE,
    **{f"rewards.models.*.{k}": _REWARD for k in ("kind", "weight", "tasks", "model_path", "clip_path", "checkpoint",
                                                  "target", "missing_score", "max_new_tokens", "dtype", "backend")},
    "validation.holdout": "the prompts the saved data position points into (held-out prompts leave the training set)",
    # The validation set and how it is measured: curves before and after the resume must compare (how often it runs
    # may change).
    **{f"validation.{k}": "the validation set and how it is measured: curves before and after the resume would not "
                          "compare" for k in ("prompt_file", "num_generations", "seed", "temperature")},
    # Where the roll-out runs: colocated samples with the trainer's live parameters, separate with synced engines.
    "rollout.placement": "which weights the roll-out samples with (colocated: the trainer's; separate: synced engines)",
    "trainer.world_size": "how the optimizer state is sharded",
    "trainer.zero_stage": "how the optimizer state is sharded",
}
IGNORED_KEYS = ("run_dir",)  # where the run lives is not part of what it is


class ResumeError(ValueError):
    """A resume that cannot continue the run it names (nothing on disk has been changed)."""


# ----------------------------------------------------------------------------------------------------------------
# Completeness
# ----------------------------------------------------------------------------------------------------------------


def manifest(folder: Path) -> dict[str, int]:
    """Size of every file under a checkpoint folder (symlinked decoder components excluded): a truncated or missing
    file later shows as a mismatch without reading gigabytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not Path(root, d).is_symlink()]
        for name in files:
            p = Path(root, name)
            if name != DRIVER_STATE and not p.is_symlink():
                out[str(p.relative_to(folder))] = p.stat().st_size
    return out


def check_checkpoint(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint, else why not (one line)."""
    state_file = folder / DRIVER_STATE
    if not state_file.is_file():
        return f"no {DRIVER_STATE} (the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{DRIVER_STATE} is unreadable ({type(e).__name__}: {e})"
    if folder.name != f"step-{step:06d}":
        return f"{DRIVER_STATE} says step {step}, the folder name says otherwise"
    for rel, size in state.get("manifest", {}).items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written"
    return None


def all_checkpoints(run_path: Path) -> list[Path]:
    """Every ``checkpoints/step-*`` folder of a run, newest first (complete or not)."""
    root = Path(run_path) / "checkpoints"
    return sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []


def complete_checkpoints(run_path: Path) -> list[Path]:
    return [p for p in all_checkpoints(run_path) if check_checkpoint(p) is None]


def resolve_resume(path: str | Path) -> tuple[Path, Path | None]:
    """``--resume PATH``: a run folder (its newest complete checkpoint) or one checkpoint folder in it.
    Returns (run folder, checkpoint folder or None)."""
    p = Path(path)
    if not p.is_dir():
        raise ResumeError(f"--resume {path}: no such folder (give a GRPO run folder or one of its "
                          "checkpoints/step-NNNNNN folders)")
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        why = check_checkpoint(p)
        if why:
            raise ResumeError(f"--resume {path}: not a complete checkpoint: {why}")
        return p.parent.parent, p
    if (p / "config.json").is_file() or (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file():
        return p, None
    raise ResumeError(f"--resume {path}: not a GRPO run folder (no config.json, metrics.jsonl or checkpoints/)")


# ----------------------------------------------------------------------------------------------------------------
# The published model layout
# ----------------------------------------------------------------------------------------------------------------


def link_decoder(model_dir: Path, decoder_cfg: Any, run_path: Path) -> dict[str, Path]:
    """Link the run's decoder components beside ``model_dir/ar_model`` so the folder is a checkpoint root for
    ``jobs.eval`` / ``jobs.sweep`` and the reference's scripts. A tiny decoder is written once into the run folder
    (seeded like the decoder pool's); links into the run folder are relative, so the run can be moved."""
    from uniar_ray.decoder.loading import COMPONENTS, resolve_components

    source = tiny_decoder_root(decoder_cfg, run_path) if decoder_cfg.path == "tiny" else Path(decoder_cfg.path)
    try:
        found = resolve_components(source.resolve())
    except FileNotFoundError as e:  # e.g. a path that exists on the decoder nodes only: link the published layout
        print(f"[checkpoint] warning: {e}; linking {source}/<component> as the published layout has it", flush=True)
        found = {name: source / name for name in COMPONENTS}
    for name in COMPONENTS:
        link = model_dir / name
        target = found[name].resolve()
        inside = Path(run_path).resolve() in target.parents
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(target, model_dir.resolve()) if inside else target, target_is_directory=True)
    return found


def tiny_decoder_root(decoder_cfg: Any, run_path: Path) -> Path:
    """The tiny decoder a run with ``decoder.path: tiny`` used (``tiny_bit_driven`` included), as a checkpoint folder
    in the run (written once): ``tiny_decoder-seed<S>`` or ``tiny_decoder-seed<S>-bit_driven``."""
    import shutil
    import tempfile

    from uniar_ray.decoder.tiny import write_tiny_decoder_checkpoint

    bit_driven = decoder_cfg.tiny_bit_driven
    # the name records every option that changes the weights: two runs' decoders never share a folder by mistake
    root = Path(run_path) / f"tiny_decoder-seed{decoder_cfg.tiny_seed}{'-bit_driven' if bit_driven else ''}"
    if (root / "sd3_pipeline" / "model_index.json").is_file():
        return root
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_decoder-", dir=run_path))
    write_tiny_decoder_checkpoint(tmp, seed=decoder_cfg.tiny_seed, ar_model=False, bit_driven=bit_driven)
    try:
        os.rename(tmp, root)
    except OSError:  # written meanwhile by someone else
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def checkpoint_steps(run_path: Path, steps: list[int] | None = None) -> dict[str, Path]:
    """``{"step-000002": <checkpoint>/model, ...}`` for a run's complete checkpoints with a model folder (all, or
    the listed steps; a listed step that is missing is an error naming the steps there are)."""
    found = {int(p.name[len("step-"):]): p for p in complete_checkpoints(run_path) if (p / MODEL_DIR).is_dir()}
    if not found:
        raise FileNotFoundError(f"{run_path}: no complete checkpoint with a {MODEL_DIR}/ folder under checkpoints/")
    missing = sorted(set(steps or []) - set(found))
    if missing:
        raise FileNotFoundError(f"{run_path}: no complete checkpoint for step(s) {missing}; "
                                f"there are {sorted(found)}")
    return {f"step-{s:06d}": found[s] / MODEL_DIR for s in sorted(steps or found)}


# ----------------------------------------------------------------------------------------------------------------
# Run identity
# ----------------------------------------------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def breaking_reason(key: str) -> str | None:
    """What changing ``key`` (a flattened config key) would break in a resumed run, or None when it may change."""
    from fnmatch import fnmatchcase

    return next((why for pattern, why in IDENTITY_KEYS.items() if fnmatchcase(key, pattern)), None)


def schema_defaults(cls: Any = None, prefix: str = "") -> dict[str, Any]:
    """Flattened default of every config field (``GRPORunConfig`` by default). A key missing from an older run's
    config.json is a field added since: it ran as the default did, so only a new value is a change."""
    import dataclasses
    import typing

    if cls is None:
        from uniar_ray.config import GRPORunConfig as cls
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(schema_defaults(tp, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[f"{prefix}{f.name}"] = f.default
        elif f.default_factory is not dataclasses.MISSING and not isinstance(f.default_factory(), dict):
            out[f"{prefix}{f.name}"] = f.default_factory()  # lists; a dict of named entries has no default entry
    return out


_UNSET = object()


def compare_identity(old: dict[str, Any], new: dict[str, Any],
                     defaults: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(breaking, other): one line per differing key, ``key: old -> new``; breaking ones say what they break."""
    a, b = flatten(old), flatten(new)
    defaults = schema_defaults() if defaults is None else defaults
    keys = sorted(set(a) | set(b))
    a, b = ({k: side.get(k, defaults.get(k, _UNSET)) for k in keys} for side in (a, b))
    a, b = _effective(a), _effective(b)
    breaking, other = [], []
    for key in keys:
        va, vb = a[key], b[key]
        if key in IGNORED_KEYS or va == vb:
            continue
        line = f"{key}: {'<unset>' if va is _UNSET else repr(va)} -> {'<unset>' if vb is _UNSET else repr(vb)}"
        why = breaking_reason(key)
        if why:
            breaking.append(f"{line} (changes {why})")
        else:
            other.append(line)
    return breaking, other


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """Spellings of the same run made equal: an empty grpo.ref_model_path is model.path."""
    if flat.get("grpo.ref_model_path") == "" and "model.path" in flat:
        flat["grpo.ref_model_path"] = flat["model.path"]
    return flat


def data_fingerprint(records: list[Any]) -> str:
    """A short hash of the prompts in load order (what the sampler's saved position indexes into)."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.task], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def checkpoint_identity(folder: Path, run_config: Path) -> dict[str, Any] | None:
    """The config a checkpoint was written with (its own config.json; older runs: the run's), plus the data
    fingerprint saved beside its data position."""
    for f in (folder / "config.json", run_config):
        if f.is_file():
            old = json.loads(f.read_text())
            state = json.loads((folder / DRIVER_STATE).read_text())
            return {**old, "data_fingerprint": state.get("data_fingerprint")}
    return None


def choose_checkpoint(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint among ``candidates`` (newest first) and a warning per skipped one."""
    warnings = []
    for folder in candidates:
        why = check_checkpoint(folder)
        if why is None:
            for w in range(len(warnings)):
                warnings[w] += f"; falling back to {folder}"
            return folder, warnings
        warnings.append(f"checkpoint {folder} is incomplete or corrupt: {why}")
    return None, warnings


def check_resume(folder: Path, run_config: Path, new: dict[str, Any]) -> list[str]:
    """Refuse (``ResumeError``, naming every breaking key) or return the other differences, one line each."""
    old = checkpoint_identity(folder, run_config)
    if old is None:
        return [f"{folder} has no config.json: the settings cannot be compared"]
    breaking, other = compare_identity(old, new)
    if breaking:
        raise ResumeError(
            f"--resume: the config differs from the one {folder} was trained with in a way that breaks the run:\n  "
            + "\n  ".join(breaking)
            + "\nEither keep the checkpoint's values for these keys, or start a new run (drop --resume, or set "
              "run_dir to a new folder). Nothing was changed on disk.")
    return other


def prefetch_mismatch(rollouts: list[Any], requests: list[Any], weight_version: int) -> str | None:
    """Why a one_step checkpoint's prefetched roll-out is not the one this step would sample now, or None to reuse it.
    Matching request ids are not enough: a resume may change the AR size, temperature or guidance, and a synchronous
    resume samples from the checkpoint's weights (``weight_version``), not from the ones before its update."""
    if len(rollouts) != len(requests):
        return f"it holds {len(rollouts)} samples, this step draws {len(requests)}"
    for r, q in zip(rollouts, requests):
        for what, saved, now in (("request", r.request_id, q.request_id), ("prompt", r.prompt, q.prompt),
                                 ("AR size", f"{r.ar_height}x{r.ar_width}", f"{q.ar_height}x{q.ar_width}"),
                                 ("seed", r.seed, q.seed), ("temperature", r.temperature, q.temperature),
                                 ("cfg", r.cfg_scale, q.cfg_scale),
                                 ("weight version", r.weight_version, weight_version)):
            if saved != now:
                return f"{r.request_id}: {what} {saved!r}, this step's is {now!r}"
    return None
