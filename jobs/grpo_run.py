"""The GRPO job's run folder: opening it (a new run, or a resume checked against the checkpoint's identity),
saving and loading checkpoints, and the placement record.

    run, candidates = open_run(cfg, args.resume)   # a resume that would break the run is refused, nothing written
    step, prefetched = resume(run, parts, candidates)
    save_checkpoint(run, parts, step)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from uniar_ray import checkpoint as ckpt
from uniar_ray import runlock
from uniar_ray.files import atomic_write, disk_full_named
from uniar_ray.config import GRPORunConfig, to_dict
from uniar_ray.rollout.types import load_rollouts, save_rollouts
from uniar_ray.runlog import RunDir, restore_rng

if TYPE_CHECKING:
    from jobs.grpo_parts import Parts

PREFETCHED = "prefetched_rollouts.npz"  # in a checkpoint: the next step's roll-out, sampled before the update


def last_checkpoint_note(run: RunDir) -> str:
    folder = run.latest_checkpoint()
    return f"The last good checkpoint is {folder}." if folder else f"No checkpoint was written under {run.path}."


def record_placement(run: RunDir, parts: "Parts", digests: bool = False) -> None:
    """placement.json: the Ray the run used, each trainer rank's and rollout engine's node; at the end, each rank's
    and engine's parameter digest (data-parallel ranks must agree, a mismatch is printed; synced engines too)."""
    path = run.path / "placement.json"
    rec = json.loads(path.read_text()) if path.exists() else {}
    rec.update(gcs_address=ray.get_runtime_context().gcs_address, driver_node_ip=ray.util.get_node_ip_address(),
               trainer_node_ips=parts.trainer.node_ips())
    engines = parts.rollout_group is not None  # none when colocated; a dead engine's entries are null
    if engines:
        rec["rollout_node_ips"] = parts.weight_sync.ask("node_ip")
    if digests:
        rec["trainer_param_sha256"] = parts.trainer.param_digests()
        if len(set(rec["trainer_param_sha256"])) > 1:
            print(f"[grpo] warning: trainer ranks hold different parameters: {rec['trainer_param_sha256']}",
                  file=sys.stderr)
        if engines:  # after the last sync every engine holds the trainer's weights (torch engines; vLLM: None)
            rec["rollout_param_sha256"] = parts.weight_sync.ask("param_digest")
            if {d for d in rec["rollout_param_sha256"] if d is not None} - {rec["trainer_param_sha256"][0]}:
                print("[grpo] warning: a rollout engine holds other weights than trainer rank 0 (placement.json)",
                      file=sys.stderr)
    atomic_write(path, lambda f: f.write(json.dumps(rec, indent=2) + "\n"), "w")


def check_run_folder(run: RunDir, parts: "Parts") -> None:
    """Before any training: every trainer rank finds the driver's marker in the run folder (uniar_ray/shared_folder.py),
    so checkpoints land in the one folder; a rank that does not is an error naming its node."""
    from uniar_ray import shared_folder

    folder = run.path.resolve()
    token = shared_folder.write_marker(folder)
    # the ranks answer once they are built (weights loaded, DeepSpeed set up): the trainers' own wait applies
    timeout = getattr(parts.trainer, "timeout_s", None)
    try:
        answers = ray.get([a.check_run_folder.remote(str(folder), token) for a in parts.trainer.actors],
                          timeout=timeout)
    finally:
        shared_folder.remove_marker(folder, token)  # the folder as it was, whatever the answer
    shared_folder.verify(folder, [(rank, node, problem) for rank, (node, problem) in enumerate(answers)])


def open_run(cfg: GRPORunConfig, resume) -> tuple[RunDir, list]:
    """The run folder, claimed for this job (``run.close()`` releases it; a folder another job holds is refused) and,
    for a resume, the checkpoints it may continue from (newest complete first). A resume whose config breaks the
    checkpoint's identity is refused before anything is written."""
    identity = {**to_dict(cfg), "data_fingerprint": _data_fingerprint(cfg)}
    path = cfg.run_dir if resume is True else resume
    if resume is True and not Path(path).exists():
        print(f"[grpo] --resume: {path} does not exist yet; starting a new run there", file=sys.stderr)
        resume = False
    if not resume:
        # Claimed before judging whether it is used, so two jobs started together cannot both take it; a fresh start
        # that moves to <run_dir>-<time> holds both folders.
        return _holding(runlock.claim(cfg.run_dir, "run_dir", "grpo"), lambda: (_fresh(cfg.run_dir), []), identity)
    run_path, given = ckpt.resolve_resume(path)
    return _holding(runlock.claim(run_path, "run_dir", "grpo"), lambda: _resumable(run_path, given, identity), identity)


def _holding(lock, open_it, identity: dict) -> tuple[RunDir, list]:
    """``open_it()`` with ``lock`` held, the run keeping it (and any other it took); released if anything fails."""
    run = None
    try:
        run, candidates = open_it()
        run.locks.insert(0, lock)
        _opened(run, identity)
        return run, candidates
    except BaseException:
        if run is not None:
            run.close()
        lock.release()
        raise


def _fresh(run_dir: str) -> RunDir:
    run = RunDir(run_dir)
    if run.path != Path(run_dir):  # moved to <run_dir>-<time>: that folder is claimed too
        run.locks.append(runlock.claim(run.path, "run_dir", "grpo"))
    return run


def _resumable(run_path: Path, given: Path | None, identity: dict) -> tuple[RunDir, list]:
    folder, warnings = ckpt.choose_checkpoint([given] if given else ckpt.all_checkpoints(run_path))
    changed = ckpt.check_resume(folder, run_path / "config.json", identity) if folder else []
    for w in warnings:
        print(f"[grpo] warning: {w}", file=sys.stderr)
    if changed:
        print("[grpo] --resume: settings changed since the checkpoint (allowed):\n  " + "\n  ".join(changed),
              file=sys.stderr)
    candidates = [folder] + [p for p in ckpt.complete_checkpoints(run_path) if p.name < folder.name] if folder else []
    return RunDir(run_path, resume=True), candidates[:1] if given else candidates


def _opened(run: RunDir, identity: dict) -> RunDir:
    run.open().identity = identity
    return run


def _data_fingerprint(cfg: GRPORunConfig) -> str:
    from uniar_ray.data import load_dataset

    d = cfg.data
    return ckpt.data_fingerprint(load_dataset(d.path, seed=d.seed, prompt_key=d.prompt_key,
                                              skip_bad_lines=d.skip_bad_lines).records)


def save_checkpoint(run: RunDir, parts: "Parts", step: int) -> None:
    """trainer/ (DeepSpeed state), model/ (the published layout: ar_model/ + the decoder linked), config.json, and
    driver_state.json last (step, data position, RNG, file sizes)."""
    folder = run.checkpoint_dir(step)
    with disk_full_named(folder):  # a full disk is named as one, not as torch.save's "unexpected pos"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ckpt.DRIVER_STATE).unlink(missing_ok=True)  # a re-save is incomplete until it is written again
        parts.trainer.save_checkpoint(folder / "trainer")
        parts.trainer.save_model(folder / ckpt.MODEL_DIR / "ar_model")
        ckpt.link_decoder(folder / ckpt.MODEL_DIR, parts.cfg.decoder, run.path)
        atomic_write(folder / "config.json", lambda f: f.write(json.dumps(to_dict(parts.cfg), indent=2)), "w")
        rollouts = parts.prefetched_rollouts(step)
        if rollouts is not None:  # one_step: sampled before this update, from the weights a resume no longer has
            save_rollouts(folder / PREFETCHED, rollouts)
        run.save_driver_state(folder, {"step": step, "data": parts.data_state(step),
                                       "data_fingerprint": run.identity["data_fingerprint"]})
    run.prune_checkpoints(parts.cfg.keep_checkpoints)


def resume(run: RunDir, parts: "Parts", candidates: list):
    """Load the newest loadable checkpoint (an unloadable one falls back to the next, with a warning naming both);
    later checkpoints are set aside and later metric lines dropped. No complete checkpoint at all: start over at step
    0, and say so; complete ones that all fail to load: stop, changing nothing. Returns (next step, the roll-out
    one_step had prefetched for it, or None)."""
    for i, folder in enumerate(candidates):
        try:
            parts.trainer.load_checkpoint(folder / "trainer")
        except Exception as e:  # noqa: BLE001 - any failure to read it: try the next older one
            nxt = candidates[i + 1] if i + 1 < len(candidates) else None
            print(f"[grpo] warning: could not load {folder} ({str(e).splitlines()[-1][:300]}); "
                  + (f"falling back to {nxt}" if nxt else "no older complete checkpoint"), file=sys.stderr)
            continue
        state = json.loads((folder / ckpt.DRIVER_STATE).read_text())
        parts.sampler.load_state_dict(state["data"])
        restore_rng(state["rng"])
        parts.sync_weights(state["step"])
        _rewind(run, state["step"])
        print(f"[grpo] resumed from {folder} at step {state['step']}", file=sys.stderr)
        prefetched = folder / PREFETCHED
        return state["step"], load_rollouts(prefetched) if prefetched.exists() else None
    if candidates:
        raise SystemExit(f"[grpo] --resume: none of {', '.join(p.name for p in candidates)} in {run.path} could be "
                         "loaded (see the warnings above); nothing was changed. Start a new run (drop --resume or set "
                         "run_dir), or fix the environment that cannot read them.")
    _rewind(run, 0)
    print(f"[grpo] --resume: no complete checkpoint in {run.path}; starting over at step 0", file=sys.stderr)
    return 0, None


def _rewind(run: RunDir, step: int) -> None:
    dropped = run.truncate_metrics(step)
    aside = run.set_aside_checkpoints_after(step)
    if dropped or aside:
        print(f"[grpo] --resume: dropped {dropped} metric line(s) of steps >= {step}"
              + (f"; later checkpoints moved to {aside}" if aside else ""), file=sys.stderr)


