"""ImgEdit: input images (space in folder names, the missing upstream file), flat {original_id}.png, 737-key check,
judge-reply aggregation."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import imgedit
from benchmarks.common import UnifiedWriter, read_prompts


@pytest.fixture(scope="module")
def records(shared_data):
    return read_prompts(shared_data / "uniar/eval_prompts/imgedit.jsonl")


@pytest.fixture(scope="module")
def root(shared_data):
    return shared_data / imgedit.DEFAULTS.image_root


def test_missing_upstream_image_is_reported_for_that_record_only(records, root):
    local = [r for r in records if (root / r.meta["input_image"]).exists() or r.meta["input_image"].startswith(
        "compose/animal/5")]
    problems = imgedit.check_inputs(local, root)
    assert len(problems) == 1 and "compose/animal/5.jpg" in problems[0]
    missing = next(r for r in local if r.meta["input_image"] == "compose/animal/5.jpg")
    with pytest.raises(imgedit.InputImageError, match=rf"idx={missing.idx} .*input image missing: .*5\.jpg"):
        imgedit.load_input_image(missing, root)
    others = [r for r in local if r is not missing][:3]  # the rest still load
    loaded = [imgedit.load_input_image(r, root, size=(64, 48)) for r in others]
    assert len(loaded) == 3 and all(im.size == (64, 48) and im.mode == "RGB" for im in loaded)


def test_folder_with_space_resolves(records, root):
    spaced = next(r for r in records if r.meta["input_image"].startswith("daily object/")
                  and (root / r.meta["input_image"]).exists())
    assert imgedit.input_image_path(spaced, root).parent.name == "daily object"
    assert imgedit.load_input_image(spaced, root).mode == "RGB"


def test_corrupt_input_is_reported(records, tmp_path):
    r = records[0]
    bad = tmp_path / r.meta["input_image"]
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(imgedit.InputImageError, match="idx=0: input image unreadable"):
        imgedit.load_input_image(r, tmp_path)


def test_resize_to_ar_size():
    image = Image.new("RGB", (300, 200))
    assert imgedit.resize_to_ar(image, (512, 512)).size == (512, 512)


def test_writer_flat_unpadded_keys_and_resume(records, tmp_path):
    w = imgedit.writer(tmp_path)
    r = records[0]
    assert w.sample_path(r) == tmp_path / "1082.png"
    assert w.write_sample(r, 0, Image.new("RGB", (4, 4), (3, 2, 1)))
    assert w.pending(r) == [] and not w.write_sample(r, 0, Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="exactly 1 sample"):
        imgedit.writer(tmp_path, samples_per_prompt=4)


def test_convert_all_737_against_basic_edit(records, tmp_path, shared_data):
    src = UnifiedWriter(tmp_path / "src", 1)
    tiny = Image.new("RGB", (2, 2))
    for r in records:
        src.write_sample(r, 0, tiny)
    basic = shared_data / imgedit.BASIC_EDIT
    report = imgedit.convert(tmp_path / "src", tmp_path / "dst", basic_edit=basic)
    assert report.ok, report.problems
    assert report.written == 737 and len(list((tmp_path / "dst").glob("*.png"))) == 737
    (tmp_path / "dst/97.png").unlink()
    assert imgedit.check_layout(tmp_path / "dst", records, basic).problems == ["97.png missing"]


def test_parse_reply_follows_step1_rules():
    reply = ("Brief reasoning: colour: fine\nPrompt Compliance: 5\nVisual Naturalness: 4.\n"
             "Physical & Detail Integrity: 3")
    assert imgedit.parse_reply(reply) == 4.0  # "4." is ignored, the reasoning line has two ": "
    assert imgedit.parse_reply("no scores here") is None


def test_type_scores_group_by_edit_type(shared_data):
    basic = json.loads((shared_data / imgedit.BASIC_EDIT).read_text())
    add_keys = [k for k, v in basic.items() if v["edit_type"] == "add"][:2]
    style_key = next(k for k, v in basic.items() if v["edit_type"] == "style")
    replies = {add_keys[0]: "A: 5\nB: 4\nC: 4", add_keys[1]: "A: 2\nB: 2\nC: 2", style_key: "A: 3", "22": 17}
    result = imgedit.type_scores(replies, basic)
    assert result["types"] == {"add": round((4.33 + 2.0) / 2, 2), "style": 3.0}
    assert result["overall"] == round((3.17 + 3.0) / 2, 2) and result["unparsed"] == ["22"]
