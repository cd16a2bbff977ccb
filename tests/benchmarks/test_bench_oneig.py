"""OneIG text rendering: grid order and size (non-square cells), lossless WebP, ids, padding, text-score formulas."""
from __future__ import annotations

import pytest
from PIL import Image

from benchmarks import oneig
from benchmarks.common import PromptRecord, UnifiedWriter, read_prompts

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]
W, H = 20, 11  # wide cells, as 1280x704: a width/height swap would show


def rec(idx=0, pid="005", category="Text_Rendering"):
    return PromptRecord(idx=idx, prompt="p", meta={"category": category, "id": pid})


def cells(n=4):
    return [Image.new("RGB", (W, H), c) for c in COLORS[:n]]


def test_grid_is_row_major_with_cells_by_width_height():
    grid = oneig.pack_grid(cells())
    assert grid.size == (2 * W, 2 * H)
    centers = [(W // 2, H // 2), (W + W // 2, H // 2), (W // 2, H + H // 2), (W + W // 2, H + H // 2)]
    assert [grid.getpixel(c) for c in centers] == COLORS  # 0 TL, 1 TR, 2 BL, 3 BR


def test_pack_refuses_partial_or_mismatched_unless_padding():
    with pytest.raises(ValueError, match="3 of 4 samples"):
        oneig.pack_grid(cells(3))
    with pytest.raises(ValueError, match="sizes must match"):
        oneig.pack_grid(cells(3) + [Image.new("RGB", (H, W))])
    padded = oneig.pack_grid(cells(3), pad=True)
    assert padded.getpixel((W + 1, H + 1)) == (0, 0, 0)


def test_writer_writes_lossless_webp_when_prompt_complete(tmp_path):
    w = oneig.writer(tmp_path, model_name="mymodel")
    r = rec()
    for k, image in enumerate(cells()[:3]):
        assert w.write_sample(r, k, image)
    path = tmp_path / "text" / "mymodel" / "005.webp"
    assert not path.exists() and w.pending(r) == [3]
    w.write_sample(r, 3, cells()[3])
    assert path.exists() and w.pending(r) == []
    with Image.open(path) as grid:
        assert grid.format == "WEBP" and grid.size == (2 * W, 2 * H)
        assert list(oneig.split_grid(grid)[i].getpixel((3, 3)) for i in range(4)) == COLORS  # exact: lossless
    assert not w.write_sample(r, 0, cells()[1])  # resume: grid done, nothing rewritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["005.webp"]


def test_finalize_refuses_missing_samples_unless_padding_then_tiles_stay_black(tmp_path):
    r = rec(pid="017")
    strict = oneig.writer(tmp_path / "a")
    for k, image in enumerate(cells(3)):
        strict.write_sample(r, k, image)
    with pytest.raises(ValueError, match="3 of 4 samples; refusing"):
        strict.finalize(r)
    padded = oneig.writer(tmp_path / "b", pad_missing=True)
    for k, image in enumerate(cells(3)):
        padded.write_sample(r, k, image)
    assert padded.finalize(r)
    with Image.open(tmp_path / "b/text/uniar/017.webp") as grid:
        tiles = oneig.split_grid(grid)
    assert len(tiles) == 3  # the padding tile decoded exactly black, so the splitter skips it


def test_ids_are_verbatim_three_digit_strings_and_categories_map_to_folders(tmp_path):
    w = oneig.writer(tmp_path)
    assert w.grid_path(rec(pid="199", category="Portrait")) == tmp_path / "human/uniar/199.webp"
    for bad in (5, "5", "0005"):
        with pytest.raises(ValueError, match="3-digit string"):
            w.grid_path(rec(pid=bad))
    with pytest.raises(ValueError, match="unknown category"):
        w.grid_path(rec(category="Text"))


def test_shipped_prompts_map_to_200_distinct_text_files(shared_data, tmp_path):
    records = read_prompts(shared_data / "uniar/eval_prompts/oneig.jsonl")
    paths = {oneig.writer(tmp_path).grid_path(r) for r in records}
    assert len(paths) == 200 and {p.parent for p in paths} == {tmp_path / "text/uniar"}
    assert sorted(p.name for p in paths)[:2] == ["000.webp", "001.webp"]


def test_convert_and_check_emulate_the_scorer_glob(tmp_path):
    records = [rec(0, "000"), rec(1, "001"), rec(2, "002")]
    src = UnifiedWriter(tmp_path / "src", 4)
    for r in records:
        for k, image in enumerate(cells(4 if r.idx < 2 else 2)):
            src.write_sample(r, k, image)
    report = oneig.convert(tmp_path / "src", tmp_path / "dst")
    assert report.written == 2
    assert any("idx=2 id=002: 2 of 4 samples" in p for p in report.problems)
    assert "text/uniar/002*: 0 matches ([]), need 1" in report.problems
    (tmp_path / "dst/text/uniar/001.png").write_bytes(b"stray")  # a stray file makes the scorer drop the prompt
    problems = oneig.check_layout(tmp_path / "dst", records[:2]).problems
    assert problems == ["text/uniar/001*: 2 matches (['001.png', '001.webp']), need 1"]


def test_normalize_keeps_case_and_drops_punctuation():
    assert oneig.normalize("['The  Impact', \"5G\"]\n  Éclair!") == "The Impact 5G Éclair"
    assert oneig.normalize("你好, World 1") == "你好World1"


def test_levenshtein_matches_slow_loop():
    def slow(a, b):
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    for a, b in [("", "abc"), ("kitten", "sitting"), ("The Cat", "the cat"), ("中文字", "中字"), ("abc", "abc")]:
        assert oneig.levenshtein(a, b) == slow(a, b)


def test_text_score_formula_on_fixed_ocr():
    gt = "['Hello World', 'Hello']"
    exact = oneig.score_cell("Hello World Hello No text recognized.", gt)
    assert (exact.edit_distance, exact.matched_words, exact.gt_words, exact.complete) == (0, 3, 3, True)
    lower = oneig.score_cell("hello world", gt)  # case kept: no word matches
    assert (lower.edit_distance, lower.matched_words) == (8, 0)
    s = oneig.aggregate([exact, lower], "EN")
    assert (s["ED"], s["CR"], s["WAC"]) == (4.0, 0.5, 0.5)
    assert s["text_score"] == pytest.approx(1 - 4.0 * 0.5 * 0.5 / 100)
    huge = oneig.aggregate([oneig.CellScore(300, 0, 5)], "ZH")
    assert huge["text_score"] == 0.0  # min(M, ED) caps at M = 50


def test_score_folder_drops_unfound_ids_and_skips_black_cells(tmp_path):
    folder = tmp_path / "text/uniar"
    for pid, n in (("000", 4), ("001", 2)):
        oneig.save_grid(oneig.pack_grid(cells(n), pad=True), folder / f"{pid}.webp")
    ocr_calls = []

    def fake_ocr(tile):
        ocr_calls.append(tile.getpixel((0, 0)))
        return "Hello World"

    gt = {"000": "['Hello World']", "001": "['Hello']", "002": "['absent']"}
    result = oneig.score_folder(folder, fake_ocr, gt)
    assert len(ocr_calls) == 6 and (0, 0, 0) not in ocr_calls
    assert result["dropped"] == ["002"] and result["found"] == 2 and result["cells"] == 6
    assert result["WAC"] == pytest.approx(6 / 6) and result["CR"] == pytest.approx(4 / 6)
    assert result["per_prompt"]["001"] == {"ED": 6.0, "CR": 0.0, "WAC": 1.0}  # "Hello World" vs "Hello"


def test_read_official_text_content(shared_data):
    gt = oneig.read_text_content(shared_data / oneig.TEXT_CONTENT)
    assert len(gt) == 200 and list(gt)[:2] == ["000", "001"]
    assert gt["000"].startswith("['The Impact of 5G Technology'")
