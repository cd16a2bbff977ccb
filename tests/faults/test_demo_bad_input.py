"""``jobs.demo`` with bad input: a refused AR size writes nothing; a run in which every prompt failed exits 1."""
from __future__ import annotations

from jobs import demo

from faults_helpers import REPO


def test_demo_ar_size_over_the_positions_writes_nothing(run_job, tmp_path):
    code, err = run_job(demo.main, "demo", ["--config", str(REPO / "configs/demo.yaml"), f"out_dir={tmp_path / 'd'}",
                                            "sampling.ar_height=4096", "sampling.ar_width=4096"])
    assert code == 2 and "sampling.ar_height/ar_width: AR size 4096x4096 needs 16384 image tokens" in err
    assert not (tmp_path / "d").exists()


def test_demo_in_which_every_prompt_failed_exits_1(run_job, tmp_path):
    code, err = run_job(demo.main, "demo", ["--config", str(REPO / "configs/demo.yaml"), f"out_dir={tmp_path / 'd'}",
                                            "prompts=['  ']", "sampling.ar_height=64", "sampling.ar_width=64"])
    assert code == f"[demo] every prompt failed (see above); nothing generated in {tmp_path / 'd'}"
    assert "[demo] skipped: " in err and "empty prompt" in err
    assert not list((tmp_path / "d").glob("*.png"))
