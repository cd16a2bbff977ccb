"""OCR reward: the reference's text-similarity rule (spec §7.5) and real RapidOCR on text rendered by PIL."""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest

from rewards.base import RewardBatch
from rewards.ocr import OcrReward, levenshtein, quoted_text, text_similarity


def _lev_slow(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_lev_slow(a[1:], b) + 1, _lev_slow(a, b[1:]) + 1, _lev_slow(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein_matches_recursive_definition():
    words = ["", "a", "ab", "ba", "abc", "kitten", "sitting", "xyz"]
    for a, b in itertools.product(words, repeat=2):
        assert levenshtein(a, b) == _lev_slow(a, b), (a, b)


def test_quoted_text_joins_spans_with_a_space():
    assert quoted_text('a sign "OPEN" and a banner "Big Sale"') == "OPEN Big Sale"
    assert quoted_text("no quotes here") is None
    assert quoted_text("curly \u201cquotes\u201d only") is None  # straight quotes only, as the reference
    assert quoted_text('empty ""') == ""


def test_text_similarity_rule():
    p = 'a neon sign that says "Hello World"'
    assert text_similarity(p, "Hello World") == 1.0
    assert text_similarity(p, "HELLOWORLD") == 1.0  # spaces removed, lower-cased on both sides
    assert text_similarity(p, "hello w0rld") == pytest.approx(0.9)  # 1 edit over 10 characters
    assert text_similarity(p, "") == 0.0  # distance capped at len(target)
    assert text_similarity(p, "completely unrelated and much longer text") == 0.0
    # Two spans: "Big Sale" + "Today" -> "bigsaletoday" (12); OCR read "BIGSALE" -> 5 deletions.
    assert text_similarity('"Big Sale" "Today"', "BIG SALE") == pytest.approx(1 - 5 / 12)
    # Only U+0020 is removed: a tab or non-breaking space counts as a character.
    assert text_similarity('"ab"', "a\tb") == pytest.approx(0.5)


@pytest.mark.parametrize("prompt", ['say " "', 'say ""', 'say "   " and ""', "no quotes at all"])
def test_nothing_to_compare_scores_zero_with_warning(prompt, caplog):
    with caplog.at_level(logging.WARNING, logger="rewards.ocr"):
        assert text_similarity(prompt, "anything") == 0.0
    assert "scoring 0" in caplog.text


@pytest.fixture(scope="module")
def ocr():
    return OcrReward()


def test_rapidocr_reads_rendered_text(ocr, render_text):
    assert text_similarity('"Hello World"', ocr.read(render_text("Hello World"))) >= 0.8
    assert text_similarity('"OPEN 24 HOURS"', ocr.read(render_text("OPEN 24 HOURS"))) >= 0.8


def test_ocr_reward_right_text_high_wrong_text_low(ocr, render_text):
    images = [render_text("Hello World"), render_text("Goodbye Moon"), render_text("Hello World"),
              np.full((256, 512, 3), 255, np.uint8)]
    prompts = ['a sign that says "Hello World"'] * 2 + ['a sign that says " "', 'a blank sign "Hello World"']
    out = ocr.score(RewardBatch(images, prompts, ["ocr"] * 4, [{}] * 4))
    assert out.errors == [None] * 4
    assert out.scores[0] >= 0.8
    assert out.scores[1] <= 0.3
    assert out.scores[2] == 0.0  # space-only target: 0, no OCR, no division by zero
    assert out.scores[3] == 0.0  # nothing read


def test_ocr_failure_is_nan_with_reason(render_text):
    class Broken:
        def __call__(self, image):
            raise RuntimeError("onnx session lost")

    out = OcrReward(engine=Broken()).score(RewardBatch([render_text("x")], ['"x"'], ["ocr"], [{}]))
    assert math.isnan(out.scores[0]) and "onnx session lost" in out.errors[0]
