"""Paths named in data files stay inside their declared root: ImgEdit inputs, mix json_path, unified-run samples."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import imgedit
from benchmarks.common import PromptFileError, PromptRecord, iter_unified
from jobs import eval as eval_job
from uniar_ray import data as D
from uniar_ray.config import EvalConfig, load_config
from uniar_ray.paths import PathOutsideRoot, inside_root

from faults_helpers import REPO, record, write_bytes


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "images"
    write_bytes(root / "animal" / "in.png", b"x")
    secret = write_bytes(tmp_path / "outside" / "secret.png", b"secret")
    (root / "link_out.png").symlink_to(secret)
    (root / "link_in.png").symlink_to(root / "animal" / "in.png")
    return root


@pytest.mark.parametrize("rel,why", [
    ("/etc/passwd", "is absolute"), ("../outside/secret.png", "contains '..'"),
    ("animal/../../outside/secret.png", "contains '..'"), ("link_out.png", "a symlink out of"),
    ("~/x.png", "is absolute"), ("", "expected a relative path"), ("C:\\x.png", "is absolute"),
])
def test_escapes_are_refused_naming_the_record(roots, rel, why):
    with pytest.raises(PathOutsideRoot, match=why) as e:
        inside_root(roots, rel, "imgedit record idx=7: meta.input_image")
    assert "idx=7" in str(e.value)


def test_paths_inside_the_root_resolve_and_keep_their_spelling(roots):
    assert inside_root(roots, "animal/in.png") == roots / "animal" / "in.png"
    assert inside_root(roots, "link_in.png") == roots / "link_in.png"  # a symlink that stays inside is fine


def test_imgedit_escaping_inputs_are_per_record_errors_and_nothing_is_read(roots, tmp_path, tiny_cache):
    lines = [record(0, "edit a", input_image="animal/in.png", metadata={"original_id": "0"}),
             record(1, "edit b", input_image="/etc/passwd", metadata={"original_id": "1"}),
             record(2, "edit c", input_image="../outside/secret.png", metadata={"original_id": "2"}),
             record(3, "edit d", input_image="link_out.png", metadata={"original_id": "3"})]
    prompts = write_bytes(tmp_path / "p.jsonl", "\n".join(lines).encode())
    cfg = load_config(EvalConfig, REPO / "configs/eval/quick_tiny.yaml", [
        "benchmark.name=imgedit", f"benchmark.prompt_file={prompts}", f"benchmark.image_root={roots}",
        f"tiny_cache={tiny_cache}", f"out_dir={tmp_path / 'out'}", "benchmark.max_input_image_pixels=0",
        "benchmark.limit=0"])
    plan = eval_job.make_plan(cfg)
    assert [r["idx"] for r in plan.rows] == [0]
    assert all("secret" not in r["image_path"] and r["image_path"] != "/etc/passwd" for r in plan.rows)
    errors = {f["idx"]: f["error"] for f in plan.failures}
    assert set(errors) == {1, 2, 3}
    assert "'/etc/passwd' is absolute" in errors[1] and "contains '..'" in errors[2] and "symlink" in errors[3]


def test_mix_json_path_outside_the_yaml_folder_is_an_error(tmp_path):
    import yaml

    write_bytes(tmp_path / "elsewhere" / "x.jsonl", b'{"instruction": "a", "number": 0}\n')
    mix_dir = tmp_path / "mix"
    mix_dir.mkdir()
    (mix_dir / "link.jsonl").symlink_to(tmp_path / "elsewhere" / "x.jsonl")
    for bad, why in ((str(tmp_path / "elsewhere" / "x.jsonl"), "is absolute"), ("../elsewhere/x.jsonl", "'..'"),
                     ("link.jsonl", "symlink")):
        (mix_dir / "mix.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": bad, "sampled_ratio": 1}]}))
        with pytest.raises(D.DataError, match=why) as e:
            D.load_dataset(mix_dir / "mix.yaml")
        assert "datasets[0].json_path" in str(e.value)


def test_conversion_refuses_a_sample_symlinked_out_of_the_run(tmp_path, run_job):
    run = tmp_path / "run" / "00000"
    write_bytes(run / "metadata.json", json.dumps(PromptRecord(0, "p", {}).to_dict()).encode())
    secret = write_bytes(tmp_path / "secret.png", b"not yours")
    (run / "samples").mkdir()
    os.symlink(secret, run / "samples" / "0000.png")
    with pytest.raises(PromptFileError, match="symlink out of"):
        list(iter_unified(tmp_path / "run"))
    from benchmarks import convert

    code, err = run_job(convert.main, "convert", ["--benchmark", "longtext", "--src", str(tmp_path / "run"), "--dst",
                                                  str(tmp_path / "dst")])
    assert code == 2 and "[convert] error: " in err and "symlink out of" in err
    assert not (tmp_path / "dst").exists()


def test_oversized_input_images_fail_their_record_from_the_header(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (300, 200)).save(root / "big.png")
    rec = PromptRecord(5, "edit", {"input_image": "big.png", "metadata": {"original_id": "5"}})
    [problem] = imgedit.check_inputs([rec], root, max_pixels=300 * 200 - 1)
    assert "idx=5" in problem and "300x200 = 60000 pixels, over benchmark.max_input_image_pixels" in problem
    [problem] = imgedit.check_inputs([rec], root, max_bytes=10)
    assert "bytes, over benchmark.max_input_image_bytes=10" in problem
    assert imgedit.check_inputs([rec], root, max_pixels=300 * 200, max_bytes=10**6) == []
