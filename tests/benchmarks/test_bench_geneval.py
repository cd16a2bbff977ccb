"""GenEval layout: metadata.jsonl byte-for-byte equal to the official line, digit folders, samples, summary."""
from __future__ import annotations

import json

import pytest

from benchmarks import geneval
from benchmarks.common import UnifiedWriter, read_prompts


@pytest.fixture(scope="module")
def official(shared_data):
    return (shared_data / geneval.OFFICIAL_METADATA).read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.mark.parametrize("name", ["geneval", "geneval_long"])
def test_written_metadata_equals_official_line_for_all_553(tmp_path, shared_data, official, name):
    records = read_prompts(shared_data / f"uniar/eval_prompts/{name}.jsonl")
    assert len(records) == len(official) == 553
    w = geneval.writer(tmp_path)
    for record in records:
        w.write_metadata(record)
    for record in records:
        written = (tmp_path / f"{record.idx:05d}" / "metadata.jsonl").read_bytes()
        assert written == official[record.idx].encode("utf-8"), record.idx
    # the long file's prompt is not the short canonical one: the swap really happened
    assert name == "geneval" or records[0].prompt != json.loads(official[0])["prompt"]


def test_writer_layout_and_check(tmp_path, shared_data, official, make_image):
    records = read_prompts(shared_data / "uniar/eval_prompts/geneval_long.jsonl", limit=3)
    w = geneval.writer(tmp_path)
    assert w.samples_per_prompt == 4
    for record in records:
        for k in w.pending(record):
            w.write_sample(record, k, make_image((k * 40, 0, 0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000", "00001", "00002"]
    assert sorted(p.name for p in (tmp_path / "00001" / "samples").iterdir()) == [
        "0000.png", "0001.png", "0002.png", "0003.png"]
    official_path = shared_data / geneval.OFFICIAL_METADATA
    assert geneval.check_layout(tmp_path, records, official_metadata=official_path).ok
    # an off-by-one between folder and metadata is caught
    (tmp_path / "00001" / "metadata.jsonl").write_text(official[2])
    report = geneval.check_layout(tmp_path, records, official_metadata=official_path)
    assert report.problems == ["00001: metadata.jsonl differs from line 1 of the official file"]


def test_check_flags_two_lines_and_missing_samples(tmp_path, make_image, shared_data):
    [record] = read_prompts(shared_data / "uniar/eval_prompts/geneval.jsonl", limit=1)
    w = geneval.writer(tmp_path)
    w.write_sample(record, 0, make_image((1, 1, 1)))
    meta = tmp_path / "00000" / "metadata.jsonl"
    meta.write_text(meta.read_text() * 2)
    problems = geneval.check_layout(tmp_path, [record]).problems
    assert problems[0] == "00000: metadata.jsonl must hold exactly one JSON line"
    assert "['0000.png'] != ['0000.png', '0001.png', '0002.png', '0003.png']" in problems[1]


def test_convert_from_unified(tmp_path, shared_data, make_image):
    records = read_prompts(shared_data / "uniar/eval_prompts/geneval_long.jsonl", limit=2)
    src = UnifiedWriter(tmp_path / "src", 4)
    for record in records:
        for k in range(4):
            src.write_sample(record, k, make_image((0, k, 0)))
    report = geneval.convert(tmp_path / "src", tmp_path / "dst")
    assert report.ok and report.written == 8
    again = geneval.convert(tmp_path / "src", tmp_path / "dst")
    assert again.ok and (again.written, again.skipped) == (0, 8)


def test_summarize_is_macro_over_tags():
    meta = {t: json.dumps({"tag": t, "prompt": t}) for t in ("single_object", "counting")}
    rows = ([{"tag": "single_object", "metadata": meta["single_object"], "correct": c} for c in (1, 1, 1, 0)]
            + [{"tag": "counting", "metadata": meta["counting"], "correct": c} for c in (0, 0)])
    s = geneval.summarize(rows)
    assert s["tags"] == {"single_object": 0.75, "counting": 0.0}
    assert s["overall"] == pytest.approx(0.375)  # not the image mean 0.5
    assert s["correct_images"] == pytest.approx(0.5)
    assert (s["images"], s["prompts"], s["correct_prompts"]) == (6, 2, 0.5)
