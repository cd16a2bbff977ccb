"""Errors for people: the entry wrapper finds the user error behind Ray's wrappers (task, actor constructor, Ray Data
stage constructor), prints it in a few lines, exits 2; a real ``python -m jobs.eval`` shows no traceback unless
--debug; a bug (not a user error) keeps its traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from jobs import entry
from uniar_ray.model.loading import CorruptWeightFile

from faults_helpers import REPO, write_bytes


def test_user_errors_are_found_inside_ray_wrappers():
    from ray.exceptions import ActorDiedError, RayTaskError

    missing = FileNotFoundError(2, "No such file or directory", "/ckpt/ar_model/model.safetensors")
    task = RayTaskError("load", "Traceback ...\nFileNotFoundError: ...", missing).as_instanceof_cause()
    assert entry.user_message(task) == "/ckpt/ar_model/model.safetensors: No such file or directory; check the path"
    corrupt = CorruptWeightFile("/ckpt/sd3_transformer/x.safetensors: truncated (10 bytes, its header needs 99)")
    died = ActorDiedError(RayTaskError("__init__", "Traceback (most recent call last):\n  ...\n"
                                       f"uniar_ray.model.loading.CorruptWeightFile: {corrupt}", corrupt))
    assert entry.user_message(died) == str(corrupt)
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = died
    assert entry.user_message(wrapped) == str(corrupt)


def test_bugs_and_permission_problems():
    assert entry.user_message(KeyError("x")) is None  # a bug: the wrapper re-raises it with its traceback
    denied = PermissionError(13, "Permission denied", "/data/prompts.jsonl")
    assert entry.user_message(denied) == "/data/prompts.jsonl: Permission denied; check the file's permissions"


def test_a_bug_raised_while_handling_a_user_error_is_still_a_bug():
    try:
        try:
            raise FileNotFoundError(2, "No such file or directory", "/x")
        except FileNotFoundError:
            {}["missing"]
    except KeyError as e:
        assert e.__context__ is not None and entry.user_message(e) is None


def test_a_bug_keeps_its_traceback(capsys):
    def main(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        entry.run(main, "demo", [])


def test_interrupt_exits_130(capsys):
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        entry.run(main, "eval", [])
    assert e.value.code == 130 and "[eval] interrupted" in capsys.readouterr().err


class _SignalsItselfWhenCollected:
    """Python runs a signal handler wherever the main thread is: in a finalizer, the handler's exception is printed
    and dropped (as in Ray's ActorHandle.__del__)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # bytecode for the handler to run in, inside this finalizer


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_whose_exception_a_finalizer_swallowed_still_stops_the_job(capsys):
    checks = []

    def main(argv):
        _SignalsItselfWhenCollected()  # collected at once: the Stopped raised in its __del__ goes nowhere
        checks.append("went on")
        entry.raise_if_stopped()  # what the jobs call at each step / batch
        checks.append("not reached")

    with pytest.raises(SystemExit) as e:
        entry.run(main, "grpo", [])
    assert checks == ["went on"] and e.value.code == 143 and "[grpo] stopped by SIGTERM" in capsys.readouterr().err

    def finishes(argv):  # a job with no check point left: the wrapper stops it after main returns
        _SignalsItselfWhenCollected()

    with pytest.raises(SystemExit) as e:
        entry.run(finishes, "eval", [])
    assert e.value.code == 143 and "[eval] stopped by SIGTERM" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_jobs_eval_prints_lines_not_a_traceback(tmp_path, tiny_cache):
    """The real command line (one subprocess: about a minute on a busy 2-core machine); --debug is tested
    in-process in test_grpo_bad_input.py."""
    empty = write_bytes(tmp_path / "empty.jsonl", b"")
    args = [sys.executable, "-m", "jobs.eval", "--config", "configs/eval/quick_tiny.yaml",
            f"benchmark.prompt_file={empty}", f"out_dir={tmp_path / 'out'}", f"tiny_cache={tiny_cache}"]
    done = subprocess.run(args, cwd=REPO, env={**os.environ, "UNIAR_DEBUG": ""}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2
    assert f"[eval] error: {empty}: no prompts (the file is empty)" in done.stderr
    assert "[eval] (--debug or UNIAR_DEBUG=1 shows the traceback)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_data_stage_constructor_error_reaches_the_user_as_the_original(tmp_path):
    import ray

    class FailingStage:  # defined here: a local class travels by value to the Ray Data worker
        def __init__(self, path: str):
            raise CorruptWeightFile(f"{path}: truncated (10 bytes, its header needs 99); copy or download it again")

        def __call__(self, batch):
            return batch

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.range(2).map_batches(FailingStage, fn_constructor_kwargs={"path": "/ckpt/x.safetensors"},
                                           compute=ray.data.ActorPoolStrategy(size=1))
        with pytest.raises(Exception) as e:
            ds.take_all()
    finally:
        ray.shutdown()
    assert entry.user_message(e.value) == ("/ckpt/x.safetensors: truncated (10 bytes, its header needs 99); copy or "
                                           "download it again")
