"""LongText: flat {prompt_id}_{k}.png with ids that have gaps, 160 x 4 conversion check, word-recall score."""
from __future__ import annotations

import pytest
from PIL import Image

from benchmarks import longtext
from benchmarks.common import PromptRecord, UnifiedWriter, read_prompts


@pytest.fixture(scope="module")
def records(shared_data):
    return read_prompts(shared_data / "uniar/eval_prompts/longtext.jsonl")


def test_shipped_ids_have_gaps_and_names_use_prompt_id(records, tmp_path):
    ids = [longtext.prompt_id(r) for r in records]
    assert ids == list(range(80)) + list(range(100, 140)) + list(range(160, 200))
    w = longtext.writer(tmp_path)
    assert w.sample_path(records[80], 3) == tmp_path / "100_3.png"  # idx 80 is prompt 100, never 80_3.png
    assert w.sample_path(records[159], 0) == tmp_path / "199_0.png"


def test_convert_all_160_prompts_x4_and_check(records, tmp_path):
    src = UnifiedWriter(tmp_path / "src", 4)
    tiny = Image.new("RGB", (2, 2), (9, 9, 9))
    for r in records:
        for k in range(4):
            src.write_sample(r, k, tiny)
    report = longtext.convert(tmp_path / "src", tmp_path / "dst")
    assert report.ok, report.problems
    assert report.written == 640
    names = {p.name for p in (tmp_path / "dst").iterdir()}
    assert len(names) == 640 and "100_0.png" in names and "80_0.png" not in names
    (tmp_path / "dst/80_0.png").write_bytes(b"x")  # the scorer would die on this unknown id
    (tmp_path / "dst/199_3.png").unlink()
    problems = longtext.check_layout(tmp_path / "dst", records).problems
    assert problems == ["80_0.png: prefix '80' is not a known prompt_id", "prompt_id 199: 3 files, expected 4"]


def test_resume_writes_only_missing(records, tmp_path):
    w = longtext.writer(tmp_path)
    r = records[100]
    w.write_sample(r, 1, Image.new("RGB", (2, 2)))
    assert w.pending(r) == [0, 2, 3]
    assert not w.write_sample(r, 1, Image.new("RGB", (2, 2), (255, 0, 0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{longtext.prompt_id(r)}_1.png"]


def test_bad_prompt_id_is_named():
    with pytest.raises(ValueError, match="idx=3: meta.prompt_id must be a non-negative int, got '7'"):
        longtext.prompt_id(PromptRecord(3, "p", {"prompt_id": "7"}))


def test_match_counts_lowercase_multiset():
    gt = ["FRESH BREWS, EVERY", "every - DAY"]  # "-" vanishes: 5 GT words, not text_length 6
    assert longtext.match_counts("Fresh brews every day day No text recognized.", gt) == (4, 5)
    assert longtext.match_counts("addCriterion fresh", gt) == (1, 5)  # only "No text recognized." is cleaned
    assert longtext.match_counts("你好 好", ["你好好啊"], mode="zh") == (3, 4)


def test_score_folder_is_micro_over_images(tmp_path):
    recs = [PromptRecord(0, "p", {"prompt_id": 0, "text": ["one two three four"], "category": "sign"}),
            PromptRecord(1, "p", {"prompt_id": 100, "text": ["alpha"], "category": "label"})]
    w = longtext.writer(tmp_path, samples_per_prompt=1)
    w.write_sample(recs[0], 0, Image.new("RGB", (2, 2), (1, 0, 0)))
    w.write_sample(recs[1], 0, Image.new("RGB", (2, 2), (2, 0, 0)))
    answers = {1: "ONE two", 2: "nothing"}
    result = longtext.score_folder(tmp_path, lambda im: answers[im.getpixel((0, 0))[0]], recs)
    assert result["text_score"] == pytest.approx(2 / 5)  # micro: not the mean of 0.5 and 0.0
    assert result["categories"] == {"label": 0.0, "sign": 0.5} and result["images"] == 2
    (tmp_path / "80_0.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="80_0.png does not name a known prompt_id"):
        longtext.score_folder(tmp_path, lambda im: "", recs)


def test_rapidocr_plugs_into_the_scorer(tmp_path):
    from PIL import ImageDraw, ImageFont

    from benchmarks.common import rapidocr

    image = Image.new("RGB", (480, 160), "white")
    ImageDraw.Draw(image).text((20, 50), "HELLO", fill="black", font=ImageFont.load_default(size=56))
    rec = PromptRecord(0, "p", {"prompt_id": 0, "text": ["Hello there"], "category": "sign"})
    longtext.writer(tmp_path, samples_per_prompt=1).write_sample(rec, 0, image)
    result = longtext.score_folder(tmp_path, rapidocr(), [rec])
    assert result["text_score"] == pytest.approx(0.5)  # "hello" found, "there" not
