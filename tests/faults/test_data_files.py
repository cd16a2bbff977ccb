"""Prompt and RL data files: non-UTF-8 bytes are bad lines naming file and line (skip_bad_lines skips them), a BOM
is dropped, an empty file is an error; binary files and /dev/null too."""
from __future__ import annotations

import pytest

from benchmarks.common import PromptFileError, read_prompts
from uniar_ray import data as D

from faults_helpers import write_bytes

RL_GOOD = b'{"instruction": "a red apple", "number": 0}\n'


def test_bom_at_the_start_is_dropped(tmp_path):
    path = write_bytes(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"idx": 0, "prompt": "a cat"}\n')
    assert [r.prompt for r in read_prompts(path)] == ["a cat"]
    rl = write_bytes(tmp_path / "bom_rl.jsonl", b"\xef\xbb\xbf" + RL_GOOD)
    assert [r.prompt for r in D.read_jsonl(rl)] == ["a red apple"]


def test_rl_non_utf8_line_names_file_and_line_and_is_skipped_on_request(tmp_path):
    path = write_bytes(tmp_path / "rl.jsonl", RL_GOOD + b'{"instruction": "\xff\xfe", "number": 1}\n' + RL_GOOD)
    with pytest.raises(D.DataError, match=rf"{path}:2: not UTF-8 text \(byte 0xff .*data.skip_bad_lines=true"):
        D.load_dataset(path)
    dataset = D.load_dataset(path, skip_bad_lines=True)
    assert len(dataset) == 2 and [b.line for b in dataset.bad_lines] == [2]


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf\n"])
def test_empty_files_are_errors(tmp_path, content):
    path = write_bytes(tmp_path / "empty.jsonl", content)
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(D.DataError, match="no prompts"):
        D.load_dataset(path)


def test_dev_null_and_a_binary_file(tmp_path):
    with pytest.raises(PromptFileError, match="/dev/null: no prompts"):
        read_prompts("/dev/null")
    binary = write_bytes(tmp_path / "image.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8")
    with pytest.raises(PromptFileError, match=rf"{binary}:1: not UTF-8 text \(byte 0x89"):
        read_prompts(binary)
    with pytest.raises(PromptFileError, match="all 3 non-blank lines are bad"):  # split at \n only
        read_prompts(binary, skip_bad=True)


def test_a_blank_prompt_is_a_bad_line_not_a_failed_generation(tmp_path):
    path = write_bytes(tmp_path / "p.jsonl", b'{"idx": 0, "prompt": "a cat"}\n{"idx": 1, "prompt": "   "}\n')
    with pytest.raises(PromptFileError, match=rf"{path}:2: 'prompt' is blank \('   '\)"):
        read_prompts(path)
    bad = []
    assert [r.idx for r in read_prompts(path, skip_bad=True, bad_lines=bad)] == [0] and bad[0].line == 2
