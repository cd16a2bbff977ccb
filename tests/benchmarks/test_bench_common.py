"""Prompt reader (blank lines, auto idx, bad lines with line numbers), unified layout, atomic writes and resume."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks.common import (
    BadLine,
    PromptFileError,
    UnifiedWriter,
    atomic_save_image,
    iter_unified,
    read_prompts,
    remove_stale_temps,
)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reader_skips_blank_lines_and_assigns_missing_idx_as_ordinal(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', "", "   ", '{"prompt": "b", "meta": {"k": 1}}',
                                          '{"idx": 9, "prompt": "c", "extra": true}'])
    records = read_prompts(f)
    assert [(r.idx, r.prompt) for r in records] == [(0, "a"), (1, "b"), (9, "c")]
    assert records[1].meta == {"k": 1} and records[0].meta == {}
    assert records[2].to_dict() == {"idx": 9, "prompt": "c", "meta": {}, "extra": True}


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "x"', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"idx": 1}', "'prompt' must be a string"),
    ('{"idx": "3", "prompt": "x"}', "'idx' must be a non-negative integer"),
    ('{"idx": 0, "prompt": "dup"}', "duplicate idx 0 (first on line 1)"),
    ('{"prompt": "x", "meta": [1]}', "'meta' must be an object"),
])
def test_bad_line_error_names_file_and_line(tmp_path, bad, reason):
    f = write_lines(tmp_path / "p.jsonl", ['{"idx": 0, "prompt": "ok"}', "", bad])
    with pytest.raises(PromptFileError) as e:
        read_prompts(f)
    assert str(e.value).startswith(f"{f}:3: ") and reason in str(e.value)


def test_skip_mode_reports_every_bad_line_and_keeps_the_rest(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', "nope", '{"prompt": "b"}', "{", '{"prompt": "c"}'])
    bad: list[BadLine] = []
    records = read_prompts(f, skip_bad=True, bad_lines=bad)
    assert [r.prompt for r in records] == ["a", "b", "c"]
    assert [r.idx for r in records] == [0, 2, 4]  # a bad line keeps its ordinal: fixing it shifts nothing
    assert [b.line for b in bad] == [2, 4] and all(b.path == str(f) for b in bad)


def test_limit_keeps_first_records(shared_data):
    records = read_prompts(shared_data / "uniar/eval_prompts/longtext.jsonl", limit=3)
    assert [r.idx for r in records] == [0, 1, 2]


def test_all_shipped_prompt_files_read(shared_data):
    counts = {p.stem: len(read_prompts(p)) for p in sorted((shared_data / "uniar/eval_prompts").glob("*.jsonl"))}
    assert counts == {"geneval": 553, "geneval_long": 553, "imgedit": 737, "longtext": 160, "oneig": 200}


def test_unified_writer_layout_and_metadata(tmp_path, record, make_image):
    w = UnifiedWriter(tmp_path, samples_per_prompt=2)
    assert w.write_sample(record, 1, make_image((1, 2, 3)))
    d = tmp_path / "00007"
    assert sorted(p.name for p in (d / "samples").iterdir()) == ["0001.png"]
    text = (d / "metadata.json").read_text(encoding="utf-8")
    assert text == json.dumps(record.to_dict(), indent=2, ensure_ascii=False)
    assert "äpfel" in text and "日本" in text and '\n  "prompt"' in text
    with Image.open(d / "samples/0001.png") as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="outside 0..1"):
        w.write_sample(record, 2, make_image((0, 0, 0)))


def test_resume_skips_existing_and_never_overwrites(tmp_path, record, make_image):
    w = UnifiedWriter(tmp_path, samples_per_prompt=3)
    assert w.pending(record) == [0, 1, 2]
    assert w.write_sample(record, 0, make_image((10, 10, 10)))
    assert w.pending(record) == [1, 2]
    assert not w.write_sample(record, 0, make_image((200, 0, 0)))  # second launch: skipped
    with Image.open(w.sample_path(record, 0)) as image:
        assert image.getpixel((0, 0)) == (10, 10, 10)
    assert sorted(p.name for p in w.sample_path(record, 0).parent.iterdir()) == ["0000.png"]


class Interrupted(Exception):
    pass


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch, make_image):
    target = tmp_path / "out" / "0000.png"
    image = make_image((5, 5, 5))
    real_save = Image.Image.save

    def dying_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # bytes are on disk under the temporary name...
        raise Interrupted  # ...when the process is "killed"

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(Interrupted):
        atomic_save_image(image, target, "PNG")
    assert list(target.parent.iterdir()) == []  # neither the target nor a temporary file
    monkeypatch.undo()
    atomic_save_image(image, target, "PNG")
    assert [p.name for p in target.parent.iterdir()] == ["0000.png"]


def test_stale_temp_files_are_invisible_to_resume_and_removable(tmp_path, record, make_image):
    w = UnifiedWriter(tmp_path, samples_per_prompt=1)
    stale = w.sample_path(record, 0).with_name(".0000.png.123-abcd.tmp")  # left by a SIGKILL mid-write
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG half")
    assert w.pending(record) == [0]
    assert w.write_sample(record, 0, make_image((1, 1, 1)))
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in stale.parent.iterdir()) == ["0000.png"]


def test_iter_unified_reads_back_records_and_samples(tmp_path, record, make_image):
    w = UnifiedWriter(tmp_path, samples_per_prompt=4)
    for k in (0, 2):
        w.write_sample(record, k, make_image((k, k, k)))
    (tmp_path / "notes").mkdir()  # non-digit folders are ignored, as by the official GenEval reader
    [(back, samples)] = list(iter_unified(tmp_path))
    assert back == record and list(samples) == [0, 2]
