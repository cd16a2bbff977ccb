"""``jobs.eval`` with bad input, through the shared entry wrapper: exit code 2, a few lines naming the file, key or
record, no traceback, and nothing written (every case here fails before Ray starts)."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import NAMES
from jobs import eval as eval_job
from uniar_ray.config import EvalConfig, load_config

from faults_helpers import REPO, prompt_lines, record, write_bytes


def user_saw(err: str) -> list[str]:
    """The job's own lines (library chatter such as transformers' warnings filtered out)."""
    return [line for line in err.splitlines() if line.startswith("[eval]")]


@pytest.mark.parametrize("benchmark", NAMES)
def test_empty_prompt_file_is_an_error_in_every_benchmark(run_job, eval_argv, tmp_path, benchmark):
    empty = write_bytes(tmp_path / "empty.jsonl", b"\n  \n")
    code, err = run_job(eval_job.main, "eval", eval_argv(benchmark, f"benchmark.prompt_file={empty}"))
    assert code == 2
    assert f"[eval] error: {empty}: no prompts (the file is empty)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_non_utf8_line_names_file_and_line_and_skip_bad_lines_skips_it(run_job, eval_argv, tmp_path):
    good = prompt_lines("longtext", 2)
    path = write_bytes(tmp_path / "p.jsonl", (good[0] + "\n").encode() + b'{"prompt": "caf\xe9"}\n'
                       + (good[1] + "\n").encode())
    code, err = run_job(eval_job.main, "eval", eval_argv("longtext", f"benchmark.prompt_file={path}"))
    assert code == 2
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at byte 16 of the line)" in err
    assert "skip_bad_lines=true" in err and "UnicodeDecodeError" not in err

    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", [
        *eval_argv("longtext", f"benchmark.prompt_file={path}", "benchmark.skip_bad_lines=true")[2:]])
    plan = eval_job.make_plan(cfg)
    assert [r.idx for r in plan.records] == [json.loads(line)["idx"] for line in good]
    assert [(b.line, "not UTF-8" in b.reason) for b in plan.bad_lines] == [(2, True)]


def test_all_lines_bad_is_an_error_even_with_skip_bad_lines(run_job, eval_argv, tmp_path):
    path = write_bytes(tmp_path / "p.jsonl", b"[1]\nnot json\n")
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"benchmark.prompt_file={path}",
                                                         "benchmark.skip_bad_lines=true"))
    assert code == 2 and "no prompts (all 2 non-blank lines are bad)" in err


@pytest.mark.parametrize("override,line", [
    ("settings.temperature=nan", "command line: settings.temperature=nan: must be a finite number"),
    ("settings.upsampling_ratio=3", "settings.upsampling_ratio=3.0: must be in [1, 2] (0 = the benchmark's default)"),
    ("model.device=gpu", "command line: model.device='gpu': expected cpu, cuda or cuda:N"),
    ("decoder.num_cpus=-1", "command line: decoder.num_cpus=-1.0: must be >= 0"),
    ("rollout.num_threads=-4", "command line: rollout.num_threads=-4: must be >= 0"),
    ("settings.seed=-1", "command line: settings.seed=-1: must be >= 0"),
    ("settings.cfg_scale=0.5", "command line: settings.cfg_scale=0.5: must be >= 1 (0 = benchmark default)"),
    ("benchmark.limt=3", "command line: unknown key 'benchmark.limt'; did you mean 'benchmark.limit'?"),
    ("batch_size=[1", "command line: override 'batch_size=[1': the value is not a YAML scalar"),
])
def test_config_problems_name_key_and_source(run_job, eval_argv, tmp_path, override, line):
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", override))
    assert code == 2 and line in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_several_config_problems_are_listed_one_per_line(run_job, eval_argv, tmp_path):
    cfg_file = write_bytes(tmp_path / "bad.yaml", b"settings:\n  temperature: .inf\ndecoder:\n  device: tpu\n")
    code, err = run_job(eval_job.main, "eval", ["--config", str(cfg_file), "settings.cfg_scale=nan"])
    lines = user_saw(err)
    assert code == 2
    assert f"{cfg_file}: settings.temperature=inf: must be a finite number" in err
    assert f"{cfg_file}: decoder.device='tpu': expected cpu, cuda or cuda:N" in err
    assert "command line: settings.cfg_scale=nan: must be a finite number" in err
    assert len(lines) == 2  # "[eval] error: <first problem>" + the --debug hint; the other problems follow bare


def test_missing_config_file_and_bad_yaml(run_job, tmp_path):
    code, err = run_job(eval_job.main, "eval", ["--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "no such file" in err
    bad = write_bytes(tmp_path / "bad.yaml", b"settings: [unclosed\n")
    code, err = run_job(eval_job.main, "eval", ["--config", str(bad)])
    assert code == 2 and f"{bad}: not valid YAML" in err


def test_missing_model_folder(run_job, eval_argv, tmp_path):
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"model.path={tmp_path / 'no_model'}"))
    assert code == 2 and f"model.path={tmp_path / 'no_model'}: not a folder" in err


def test_truncated_safetensors_is_reported_with_its_path_before_ray(run_job, eval_argv, tmp_path, tiny_cache):
    import shutil

    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", [f"tiny_cache={tiny_cache}"])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(eval_job.model_root(cfg.model, cfg.tiny_cache), ckpt)
    weights = next((ckpt / "sd3_transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"model.path={ckpt}"))
    assert code == 2 and f"{weights}: truncated" in err and "copy or download it again" in err
    weights.write_bytes(b"\x00" * 4)
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"model.path={ckpt}"))
    assert code == 2 and f"{weights}: not a complete safetensors file" in err


def test_unreadable_prompt_file_names_it(run_job, eval_argv, tmp_path):
    folder = tmp_path / "a_folder.jsonl"
    folder.mkdir()
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"benchmark.prompt_file={folder}"))
    assert code == 2 and f"{folder}: cannot read the prompt file" in err


def test_long_prompt_truncated_and_counted_or_refused(run_job, eval_argv, tmp_path, tiny_cache):
    long = "a red apple " * 2000
    path = write_bytes(tmp_path / "p.jsonl", (record(0, "short") + "\n" + record(1, long) + "\n").encode())
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"benchmark.prompt_file={path}",
                                                         "benchmark.prompt_overflow=error"))
    assert code == 2 and f"{path} idx 1: the prompt has" in err and "over benchmark.max_prompt_tokens=1024" in err
    assert not (tmp_path / "out").exists()

    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml",
                      eval_argv("geneval", f"benchmark.prompt_file={path}")[2:])
    plan = eval_job.make_plan(cfg)
    assert plan.truncated == [1]
    from uniar_ray.limits import ModelLimits

    n = ModelLimits.load(str(plan.model_root)).count([r for r in plan.rows if r["idx"] == 1][0]["prompt"])
    assert 1000 <= n <= 1024


def test_ar_size_beyond_the_model_positions_is_refused_before_any_work(run_job, eval_argv, tmp_path):
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", "settings.ar_height=4096",
                                                         "settings.ar_width=4096"))
    assert code == 2 and "AR size 4096x4096 needs 16384 image tokens" in err and "max_position_embeddings" in err
    assert not (tmp_path / "out").exists()


def test_decoder_folder_missing_from_the_checkpoint(run_job, eval_argv, tmp_path, tiny_cache):
    import shutil

    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", [f"tiny_cache={tiny_cache}"])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(eval_job.model_root(cfg.model, cfg.tiny_cache), ckpt)
    shutil.rmtree(ckpt / "sd3_pipeline")
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"model.path={ckpt}"))
    assert code == 2 and f"{ckpt}: no sd3_pipeline/ folder" in err


def test_unwritable_out_dir_message(run_job, eval_argv, tmp_path, monkeypatch):
    """os.access says no (a permission check: this suite runs as root, which writes through permission bits)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and real_access(path, mode))
    code, err = run_job(eval_job.main, "eval", eval_argv("geneval", f"out_dir={tmp_path / 'a' / 'b'}"))
    assert code == 2
    assert f"[eval] error: {tmp_path}: cannot write there (out_dir={tmp_path / 'a' / 'b'}); check the file's " \
           "permissions" in err


@pytest.mark.parametrize("benchmark,meta,why", [
    ("imgedit", {"input_image": "a.png", "metadata": {"original_id": "007"}}, "original_id must be an unpadded"),
    ("oneig", {"id": 7, "category": "Text_Rendering"}, "meta.id must be a 3-digit string"),
    ("oneig", {"id": "007", "category": "Cooking"}, "unknown category 'Cooking'"),
])
def test_a_record_the_layout_cannot_name_stops_the_run_naming_file_and_record(run_job, eval_argv, tmp_path,
                                                                                 benchmark, meta, why):
    path = write_bytes(tmp_path / "p.jsonl", (record(3, "a prompt", **meta) + "\n").encode())
    code, err = run_job(eval_job.main, "eval", eval_argv(benchmark, f"benchmark.prompt_file={path}",
                                                         f"benchmark.image_root={tmp_path}"))
    assert code == 2 and f"{path}: {benchmark} record idx=3: " in err and why in err
    assert not (tmp_path / "out").exists()


def test_a_run_that_could_make_nothing_exits_non_zero(run_job, eval_argv, tmp_path):
    lines = [record(i, "edit", input_image=f"missing/{i}.png", metadata={"original_id": str(i)}) for i in range(2)]
    path = write_bytes(tmp_path / "p.jsonl", "\n".join(lines).encode())
    code, err = run_job(eval_job.main, "eval", eval_argv("imgedit", f"benchmark.prompt_file={path}",
                                                         f"benchmark.image_root={tmp_path / 'nowhere'}"))
    assert code == "[eval] no sample could be made (2 failed: imgedit record idx=0: input image missing: " \
                   f"{tmp_path / 'nowhere' / 'missing' / '0.png'}; imgedit record idx=1: input image missing: " \
                   f"{tmp_path / 'nowhere' / 'missing' / '1.png'}); see {tmp_path / 'out' / 'results.json'}"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False and results["samples_failed"] == 2 and results["samples_written"] == 0
