"""Kill-and-resume for every benchmark writer: a save interrupted mid-run leaves no partial output, and a second
run driven by ``pending`` completes exactly the expected files, none twice."""
from __future__ import annotations

import pytest
from PIL import Image

import benchmarks
from benchmarks.common import read_prompts

FILES = {"geneval": "geneval.jsonl", "oneig": "oneig.jsonl", "longtext": "longtext.jsonl", "imgedit": "imgedit.jsonl",
         "custom": "longtext.jsonl"}  # custom: any prompt file


class Killed(Exception):
    pass


def run(writer, records, die_after=None):
    """The pipeline's view: for each prompt, generate its pending samples, write each, finalize."""
    saves = 0
    for record in records:
        for k in writer.pending(record):
            if die_after is not None and saves == die_after:
                raise Killed
            writer.write_sample(record, k, Image.new("RGB", (8, 6), (record.idx % 256, k, 7)))
            saves += 1
        writer.finalize(record)
    return saves


def all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", benchmarks.NAMES)
def test_kill_then_resume_yields_exactly_the_expected_files(name, tmp_path, shared_data, monkeypatch):
    module = benchmarks.get(name)
    records = read_prompts(shared_data / "uniar/eval_prompts" / FILES[name], limit=3)
    spp = module.DEFAULTS.samples_per_prompt
    total = len(records) * spp
    # reference layout: one uninterrupted run
    run(module.writer(tmp_path / "ref"), records)

    # killed run: the save of output number `die` raises after bytes hit the disk
    die = total // 2
    real_save, count = Image.Image.save, {"n": 0}

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        count["n"] += 1
        if count["n"] == die + 1:
            raise Killed

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(Killed):
        run(module.writer(tmp_path / "run"), records)
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]
    resumed = run(module.writer(tmp_path / "run"), records)
    samples_saved = die - (name == "oneig")  # OneIG: the first prompt's grid was one of the `die` saves
    assert resumed == total - samples_saved  # only the missing ones were generated
    assert all_files(tmp_path / "run") == all_files(tmp_path / "ref")
    assert module.check_layout(tmp_path / "run", records).ok
    assert run(module.writer(tmp_path / "run"), records) == 0  # a third launch has nothing to do
