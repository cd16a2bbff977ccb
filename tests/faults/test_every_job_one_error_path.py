"""Every job, one error path (jobs/entry.py): ``jobs.generate``, ``jobs.chat`` and ``benchmarks.convert`` print a
damaged checkpoint, a bad input image or a bad folder as one line, exit 2; a full, read-only or wrong file system is
one line naming the path; a failure while shutting down never hides the first error nor leaves a 0-byte file."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks import convert
from jobs import chat, entry, generate
from jobs import eval as eval_job
from jobs import grpo as grpo_job

from faults_helpers import REPO, job_env


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from uniar_ray.decoder.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "seed0", 0)


def _truncated(root):
    weights = root / "ar_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return f"{weights}: truncated ("


def _not_json(root):
    (root / "ar_model" / "config.json").write_text("{not json")
    return f"{root / 'ar_model' / 'config.json'}: cannot read the model's config (Expecting property name"


def _other_model(root):
    config = json.loads((root / "ar_model" / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (root / "ar_model" / "config.json").write_text(json.dumps(config))
    return f"{root / 'ar_model'}: checkpoint does not match its config.json"


def _no_tokenizer(root):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "ar_model" / name).unlink()
    return f"{root / 'ar_model'}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)"


def _link_loop(root):
    weights = root / "ar_model" / "model.safetensors"
    weights.unlink()
    os.symlink(weights, weights)
    return f"{weights}: Too many levels of symbolic links; fix the symbolic link"


@pytest.mark.parametrize("damage", [_truncated, _not_json, _other_model, _no_tokenizer, _link_loop])
@pytest.mark.parametrize("job", ["generate", "chat"])
def test_a_damaged_checkpoint_is_one_line_in_generate_and_chat(run_job, tiny_root, tmp_path, damage, job):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_root, root, symlinks=True)
    said = damage(root)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    if job == "generate":
        code, err = run_job(generate.main, job, ["--model", str(root), "--prompt", "an apple", "--ar_height", "64",
                                                 "--ar_width", "64", "--output", str(tmp_path / "out.png")])
    else:
        code, err = run_job(chat.main, job, ["--model", str(root), "--image", str(image), "--prompt", "what?"])
    assert code == 2 and f"[{job}] error: {said}" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_a_truncated_input_image_is_one_line(run_job, tiny_root, tmp_path):
    bad = tmp_path / "bad.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(bad)
    bad.write_bytes(bad.read_bytes()[:60])
    said = f"--image {bad}: cannot decode the input image (60 bytes): image file is truncated"
    code, err = run_job(generate.main, "generate", ["--model", str(tiny_root), "--prompt", "blue", "--image", str(bad),
                                                    "--output", str(tmp_path / "out.png")])
    assert code == 2 and f"[generate] error: {said}" in err
    code, err = run_job(chat.main, "chat", ["--model", str(tiny_root), "--image", str(bad), "--prompt", "what?"])
    assert code == 2 and f"[chat] error: {said}" in err


@pytest.mark.slow
def test_python_m_jobs_generate_goes_through_the_wrapper(tiny_root, tmp_path):
    """The real command line (``__main__``), as a user types it: no traceback."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_root, root, symlinks=True)
    said = _truncated(root)
    done = subprocess.run([sys.executable, "-m", "jobs.generate", "--model", str(root), "--prompt", "x",
                           "--output", str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=job_env())
    assert done.returncode == 2 and f"[generate] error: {said}" in done.stderr and "Traceback" not in done.stderr


def _convert(argv):
    return convert.main(argv) or 0


def _unified_run(folder):
    from benchmarks.common import PromptRecord, UnifiedWriter

    writer = UnifiedWriter(folder, 1)
    writer.write_sample(PromptRecord(0, "p", {"prompt_id": 0}), 0, Image.new("RGB", (8, 8)))
    return folder


def test_convert_refuses_a_source_without_samples_and_a_destination_inside_it(run_job, tmp_path):
    run = _unified_run(tmp_path / "out" / "images")  # what jobs.eval writes: the samples are under images/
    cases = [
        (tmp_path / "out", tmp_path / "dst", f"--src {tmp_path / 'out'} holds no samples (no <idx:05d>/samples/"
                                            f"NNNN.png): give the unified run's folder (for a jobs.eval run: --src "
                                            f"{tmp_path / 'out' / 'images'})"),
        (run, run / "longtext", f"--dst {run / 'longtext'} is inside --src {run}: choose a destination outside"),
        (run, run, f"--dst {run} is the same folder as --src {run}"),
    ]
    for src, dst, said in cases:
        code, err = run_job(_convert, "convert", ["--benchmark", "longtext", "--src", str(src), "--dst", str(dst)])
        assert code == 2 and f"[convert] error: {said}" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["00000"]  # nothing was written into the source
    assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------------------------------------------------------
# File systems: full, read-only, a file where a folder should be
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """``mount("64k")`` / ``mount("64k", read_only=True)``: a tiny tmpfs (needs root, as CI runs)."""
    mounted = []

    def make(size: str, read_only: bool = False):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (root only): {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_grpo_run_dir_on_a_read_only_file_system_is_one_line(run_job, mount):
    disk = mount("64k", read_only=True)
    code, err = run_job(grpo_job.main, "grpo", ["--config", str(REPO / "configs/grpo_demo.yaml"),
                                               f"run_dir={disk / 'run'}"])
    assert code == 2 and f"[grpo] error: {disk / 'run'}: Read-only file system; choose a folder on a writable " \
                         "file system" in err and "Traceback" not in err


def test_eval_on_a_full_disk_is_one_line_naming_the_file(run_job, eval_argv, mount, monkeypatch):
    """The real writer (PIL into the benchmark layout) on a 64 KiB disk; Ray's stages are replaced by one noise
    image per pending sample (the disk fills up on the first)."""
    import numpy as np

    disk = mount("64k")

    def stream(plan):
        rng = np.random.default_rng(0)
        by_idx = {r.idx: r for r in plan.records}
        for row in plan.rows:
            noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
            plan.writer.write_sample(by_idx[row["idx"]], row["k"], noise)
        return {"seconds": 1.0, "startup_s": 0.0, "written": len(plan.rows)}

    monkeypatch.setattr(eval_job, "stream", stream)
    monkeypatch.setattr(eval_job, "start_ray", lambda cfg: False)
    code, err = run_job(eval_job.main, "eval", eval_argv("longtext", f"out_dir={disk / 'out'}"))
    assert code == 2 and "Traceback" not in err
    assert f"[eval] error: {disk / 'out' / 'images' / '0_0.png'}: No space left on device; free some space or " \
           "choose another folder" in err
    files = [p for p in disk.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp") or p.stat().st_size == 0]  # no temp, no 0-byte file
    assert json.loads((disk / "out" / "results.json").read_text())["complete"] is False


def test_a_failure_while_shutting_down_never_hides_the_first_error(mount, capsys):
    """The GRPO job's clean-up (jobs/grpo.py: the reward curve, the tracker, the actors) on a full disk: the error
    that ended the run stays the one shown, the curve is not left as a 0-byte file."""
    from uniar_ray.runlog import RunDir

    run = RunDir(mount("64k") / "run").open()
    run.log_metrics({"step": 0, "reward_mean": 0.5})
    filler = run.path / "filler"
    with pytest.raises(OSError):
        with open(filler, "wb") as f:
            f.write(b"x" * 100_000)
    first = OSError(errno.ENOSPC, "No space left on device", str(run.path / "checkpoints" / "step-000001"))
    with pytest.raises(OSError) as raised:
        try:
            raise first
        finally:
            entry.close_all("grpo", run.plot_rewards, lambda: None)
    assert raised.value is first
    err = capsys.readouterr().err
    assert f"[grpo] warning: while shutting down: {run.path / 'reward_curve.png'}: No space left on device" in err
    assert not (run.path / "reward_curve.png").exists() and not list(run.path.glob(".*.tmp"))
    filler.unlink()
    assert run.plot_rewards().stat().st_size > 0  # with room, the curve is written
    with pytest.raises(ValueError, match="first"):  # nothing on its way out: the first failure is raised
        entry.close_all("grpo", lambda: (_ for _ in ()).throw(ValueError("first")), lambda: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_a_full_disk_inside_a_ray_actor_is_one_line_naming_the_file():
    from ray.exceptions import RayTaskError

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoints/step-000002/trainer/mp_rank_00.pt")
    task = RayTaskError("save_checkpoint", "Traceback ...", full).as_instanceof_cause()
    assert entry.user_message(task) == ("/runs/r/checkpoints/step-000002/trainer/mp_rank_00.pt: No space left on "
                                        "device; free some space or choose another folder")
    text_only = RayTaskError("__init__", "Traceback ...\nOSError: [Errno 30] Read-only file system: '/runs/r'", None)
    assert entry.user_message(text_only) == "[Errno 30] Read-only file system: '/runs/r'"
    assert entry.user_message(OSError(errno.EIO, "Input/output error", "/x")) is None  # not a person's to fix



def test_torch_save_on_a_full_disk_is_named_as_a_full_disk(mount):
    """torch.save (and so DeepSpeed's checkpoint) says ``unexpected pos ...`` on a full disk; a checkpoint save
    (jobs/grpo_run.py) turns that into ENOSPC naming the checkpoint folder. Other failures pass unchanged."""
    import torch

    from uniar_ray.files import disk_full_named

    folder = mount("64k") / "checkpoints" / "step-000001"
    folder.mkdir(parents=True)
    with pytest.raises(OSError) as raised:
        with disk_full_named(folder):
            torch.save({"w": torch.zeros(100_000)}, folder / "model.pt")
    assert raised.value.errno == errno.ENOSPC and entry.user_message(raised.value) == (
        f"{folder}: No space left on device; free some space or choose another folder")
    roomy = mount("1m")
    with pytest.raises(RuntimeError, match="not the disk"):  # with room, another failure stays itself
        with disk_full_named(roomy):
            raise RuntimeError("not the disk")
