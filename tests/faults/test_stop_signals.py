"""SIGTERM and SIGINT at several points of a GRPO, eval and sweep job (real processes, output read unbuffered, the
default signal handlers whatever the suite inherited): one line, status 143 / 130 within a minute, nothing of the
job's left running (its actors, its embedded Ray), its folder free again, no half-written checkpoint or result
taken as complete. Each test waits for a line or a file that marks the point, never a fixed time."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from uniar_ray import runlock
from uniar_ray.checkpoint import all_checkpoints, check_checkpoint, complete_checkpoints

from faults_helpers import Job

GRPO_FAST = ["--config", "configs/grpo_demo.yaml", "data.prompts_per_step=2", "grpo.num_generations=4",
             "trainer.micro_batch_size=4", "decoder.max_batch=8", "grpo.decode_num_inference_steps=2", "steps=50",
             "grid_every=100"]


def wait_for_file(job: Job, folder: Path, pattern: str, timeout_s: float = 600) -> Path:
    """The first file matching ``pattern`` under ``folder`` (the event a test stops the job at)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found[0]
        if job.proc.poll() is not None:
            break
        time.sleep(0.2)
    job.kill()
    pytest.fail(f"no {folder}/{pattern} (exit {job.proc.poll()}); output:\n{job.finish(5)[1][-4000:]}")


def stopped(job: Job, signum: int, line: str, folder: Path) -> str:
    """Send ``signum``; the job must end within a minute with ``line`` as its last word, its status 128 + signum,
    nothing of its session still running, and its folder free again."""
    job.signal(signum)
    code, out = job.finish(timeout_s=60)
    assert code == 128 + signum, out[-4000:]
    assert line in out and "Traceback" not in out and "SIGTERM received" not in out, out[-4000:]
    assert job.leftovers() == []
    assert not (folder / runlock.LOCK_NAME).exists()
    return out


@pytest.mark.slow
def test_grpo_stopped_during_start_up_and_a_second_job_on_its_folder(tmp_path):
    run = tmp_path / "run"
    job = Job("grpo", *GRPO_FAST, f"run_dir={run}", home=tmp_path / "home")
    job.wait_for("[ray] started an embedded local Ray")  # the actors are being created now
    second = Job("grpo", *GRPO_FAST, f"run_dir={run}", "grpo.learning_rate=0.5", home=tmp_path / "home")
    code, out = second.finish(timeout_s=300)
    assert code == 2 and f"[grpo] error: run_dir={run} is in use by a running job: jobs.grpo (pid {job.pid} " in out
    assert "[ray]" not in out  # refused before it started anything
    stopped(job, signal.SIGINT, "[grpo] interrupted", run)


@pytest.mark.slow
def test_grpo_stopped_during_a_save_with_a_prefetch_in_flight_keeps_only_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    job = Job("grpo", *GRPO_FAST, f"run_dir={run}", "async_mode=one_step", "save_every=1", home=tmp_path / "home")
    wait_for_file(job, run / "checkpoints", "step-*")  # the first save has begun (its folder is made first)
    out = stopped(job, signal.SIGTERM, "[grpo] stopped by SIGTERM at step", run)
    done = complete_checkpoints(run)
    for folder in all_checkpoints(run):  # a save the signal cut short is incomplete, and never offered
        assert (check_checkpoint(folder) is None) == (folder in done)
    note = f"The last good checkpoint is {done[0]}." if done else f"No checkpoint was written under {run}."
    assert note in out
    assert not list(run.glob(".*.tmp")) and (run / "reward_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_grpo_interrupted_mid_run_while_it_validates_with_the_next_step_in_flight(tmp_path):
    run = tmp_path / "run"
    job = Job("grpo", *GRPO_FAST, f"run_dir={run}", "async_mode=one_step", "save_every=100", "validation.every=1",
              home=tmp_path / "home")
    # after step 1's line the driver validates step 2's policy (the longer part), then trains step 2, while step 3
    # rolls out in the background: the signal lands in one of those, and either must end the same way
    job.wait_for("[grpo] step    1")
    out = stopped(job, signal.SIGINT, "[grpo] interrupted at step", run)
    assert f"No checkpoint was written under {run}." in out


@pytest.mark.slow
def test_eval_stopped_while_writing_images_says_so_in_results_json(tmp_path, tiny_cache):
    out_dir = tmp_path / "out"
    job = Job("eval", "--config", "configs/eval/quick_tiny.yaml", "benchmark.name=longtext", "benchmark.limit=20",
              f"tiny_cache={tiny_cache}", f"out_dir={out_dir}", "progress=false", "batch_size=1",
              home=tmp_path / "home")
    wait_for_file(job, out_dir / "images", "*.png")
    stopped(job, signal.SIGTERM, "[eval] stopped by SIGTERM", out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    assert results["complete"] is False and results["status"] == "stopped by SIGTERM"
    assert results["samples_written"] >= 1 and not (out_dir / "summary.md").exists()


@pytest.mark.slow
def test_eval_and_sweep_interrupted_at_start_up_and_mid_cell(tmp_path, tiny_cache):
    out_dir = tmp_path / "eval"
    job = Job("eval", "--config", "configs/eval/quick_tiny.yaml", "benchmark.name=longtext", f"out_dir={out_dir}",
              f"tiny_cache={tiny_cache}", "progress=false", home=tmp_path / "home")
    job.wait_for("[ray] started an embedded local Ray")
    stopped(job, signal.SIGINT, "[eval] interrupted", out_dir)

    sweep_dir = tmp_path / "sweep"
    job = Job("sweep", "--config", "configs/sweep.yaml", f"out_dir={sweep_dir}", "benchmarks=[longtext]",
              "settings=[{}]", "checkpoints={tiny: {path: tiny}}",
              f"overrides=[benchmark.limit=20, batch_size=1, settings.ar_height=64, settings.ar_width=64, "
              f"settings.upsampling_ratio=1.0, settings.num_inference_steps=2, tiny_cache={tiny_cache}]",
              home=tmp_path / "home")
    cell = sweep_dir / "tiny" / "longtext" / "default"
    wait_for_file(job, cell / "images", "*.png")
    stopped(job, signal.SIGTERM, "[sweep] stopped by SIGTERM", sweep_dir)
    assert json.loads((cell / "results.json").read_text())["complete"] is False
    assert not (cell / runlock.LOCK_NAME).exists() and not (sweep_dir / "results.csv").exists()
