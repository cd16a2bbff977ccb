"""Fault and bad-input suite helpers: run a job's entry point in-process and return (exit code, what the user saw).

Each case asserts the exit code, the message and what is on disk afterwards; docs/bad_inputs.md lists them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from faults_helpers import REPO


@pytest.fixture
def run_job(capsys, monkeypatch):
    """``code, err = run_job(jobs.eval.main, "eval", [...])``: through the shared wrapper, as ``python -m`` does."""
    import logging

    from jobs import entry

    # A library's log handler made under an earlier test's capture writes to that closed stream; logging would print
    # "--- Logging error ---" with a traceback of its own into this test's stderr.
    monkeypatch.setattr(logging, "raiseExceptions", False)

    def run(main, job: str, argv: list[str]) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exit_info:
            entry.run(main, job, argv)
        return exit_info.value.code, capsys.readouterr().err

    return run


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_checkpoint")


@pytest.fixture
def eval_argv(tiny_cache, tmp_path):
    """Argv of a quick tiny eval writing to ``tmp_path/out``."""

    def make(benchmark: str, *overrides: str) -> list[str]:
        return ["--config", str(REPO / "configs/eval/quick_tiny.yaml"), f"benchmark.name={benchmark}",
                f"tiny_cache={tiny_cache}", f"out_dir={tmp_path / 'out'}", "progress=false", *overrides]

    return make
