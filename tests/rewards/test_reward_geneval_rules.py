"""GenEval rules on synthetic detections: thresholds at the boundaries, the 16 cap, counting with exclude, colours,
the relative-position rule, the reference's partial credit (quirks included) and the official summary."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rewards.geneval import (COLORS, MAX_OBJECTS, OBJECT_NAMES, Detection, evaluate, filter_detections,
                             geneval_class, relative_position, summarize)


def det(x1, y1, x2, y2, score=0.99, color=None):
    return Detection([x1, y1, x2, y2], score, color=color)


def meta(tag, include, exclude=None):
    m = {"tag": tag, "include": include}
    if exclude is not None:
        m["exclude"] = exclude
    return m


# --- relative position --------------------------------------------------------------------------------------------

def test_relative_position_axes_and_diagonal():
    b = [100, 100, 120, 120]
    assert relative_position([0, 100, 20, 120], b) == {"left of"}
    assert relative_position([200, 100, 220, 120], b) == {"right of"}
    assert relative_position([100, 0, 120, 20], b) == {"above"}
    assert relative_position([100, 200, 120, 220], b) == {"below"}
    assert relative_position([0, 0, 20, 20], b) == {"left of", "above"}  # both components past 0.5 of the norm


def test_relative_position_shrink_and_original_norm():
    # Same centre: no relation. Offsets within 0.1 x (size A + size B) shrink to zero: no relation.
    assert relative_position([0, 0, 10, 10], [0, 0, 10, 10]) == set()
    assert relative_position([0, 0, 100, 100], [19, 0, 119, 100]) == set()  # |dx| 19 < 0.1 * 200
    # dx = 30 - 0.1 * 200 = 10 shrunk, divided by the *original* offset 30: 0.33 < 0.5 -> no relation,
    # although the shrunk vector alone points fully right.
    assert relative_position([30, 0, 130, 100], [0, 0, 100, 100]) == set()
    # dx = 60 - 20 = 40; 40 / 60 = 0.67 > 0.5 -> right of.
    assert relative_position([60, 0, 160, 100], [0, 0, 100, 100]) == {"right of"}


def test_relative_position_accepts_boxes_with_scores():
    assert relative_position([0, 100, 20, 120, 0.9], [100, 100, 120, 120, 0.8]) == {"left of"}


# --- filtering ----------------------------------------------------------------------------------------------------

def test_threshold_strictly_greater_and_counting_threshold():
    raw = [("dog", [0, 0, 1, 1], 0.3, None), ("dog", [0, 0, 1, 1], 0.30001, None),
           ("cat", [0, 0, 1, 1], 0.9, None), ("cat", [0, 0, 1, 1], 0.90001, None)]
    kept = filter_detections(raw, "single_object")
    assert [d.score for d in kept["dog"]] == [0.30001]
    assert len(kept["cat"]) == 2
    kept = filter_detections(raw, "counting")
    assert "dog" not in kept  # classes with nothing kept are absent
    assert [d.score for d in kept["cat"]] == [0.90001]


def test_cap_16_per_class_highest_first_no_suppression():
    raw = [("cup", [0, 0, 10, 10], 0.31 + i / 100, None) for i in range(20)]  # identical boxes: no NMS
    kept = filter_detections(raw, "two_object")["cup"]
    assert len(kept) == MAX_OBJECTS
    assert [d.score for d in kept] == sorted((0.31 + i / 100 for i in range(4, 20)), reverse=True)


def test_geneval_class_aliases():
    assert geneval_class("mouse") == "computer mouse"
    assert geneval_class("remote") == "tv remote"
    assert geneval_class("Dining_Table") == "dining table"
    assert geneval_class("N/A") is None and geneval_class("sky-other-merged") is None
    assert len(OBJECT_NAMES) == 80 and len(COLORS) == 10


# --- correctness and partial credit -------------------------------------------------------------------------------

def test_single_object_and_missing_class():
    r = evaluate(meta("single_object", [{"class": "dog", "count": 1}]), {"dog": [det(0, 0, 5, 5)]})
    assert r.correct and r.strict_correct and r.score == 1.0 and r.reason == ""
    r = evaluate(meta("single_object", [{"class": "dog", "count": 1}]), {})
    assert not r.correct and r.score == 0.0 and r.reason == "expected dog>=1, found 0"


def test_official_uses_top_count_but_partial_credit_needs_exact_count():
    # Two dogs for "a dog": officially correct (top-1 exists; no exclude for single_object), but the RL rule
    # wants exactly 1 -> 1 - |1 - 2| / 1 = 0.
    r = evaluate(meta("single_object", [{"class": "dog", "count": 1}]), {"dog": [det(0, 0, 5, 5), det(9, 9, 20, 20)]})
    assert r.correct and not r.strict_correct and r.score == 0.0
    # Three dogs: unclamped -1 (reference quirk).
    three = {"dog": [det(0, 0, 5, 5), det(9, 9, 20, 20), det(30, 30, 40, 40)]}
    assert evaluate(meta("single_object", [{"class": "dog", "count": 1}]), three).score == -1.0


def test_counting_with_exclude():
    m = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    two = {"clock": [det(0, 0, 5, 5), det(10, 0, 15, 5)]}
    three = {"clock": two["clock"] + [det(20, 0, 25, 5)]}
    assert evaluate(m, two).correct and evaluate(m, two).score == 1.0
    r = evaluate(m, three)
    assert not r.correct and r.reason == "expected clock<3, found 3"
    assert r.score == pytest.approx(0.5)  # 1 - |2 - 3| / 2; exclude is ignored by the RL score
    r = evaluate(m, {"clock": two["clock"][:1]})
    assert not r.correct and r.score == pytest.approx(0.5) and "expected clock>=2, found 1" in r.reason


def test_colors_and_partial_credit():
    m = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert evaluate(m, {"car": [det(0, 0, 5, 5, color="red")]}).score == 1.0
    r = evaluate(m, {"car": [det(0, 0, 5, 5, color="blue")]})
    assert not r.correct and r.score == 0.5  # count 1, colour 0
    assert r.reason == "expected red car>=1, found 0 red; and 1 blue"
    # Wrong count with a colour asked: count component + an extra 0.
    r = evaluate(m, {"car": [det(0, 0, 5, 5, color="red"), det(9, 9, 14, 14, color="red")]})
    assert r.correct and r.score == 0.0  # official: the top-1 car is red; RL: [count 0, extra 0]


def test_color_attr_two_objects_partial():
    m = meta("color_attr", [{"class": "bench", "count": 1, "color": "green"},
                            {"class": "vase", "count": 1, "color": "purple"}])
    r = evaluate(m, {"bench": [det(0, 0, 5, 5, color="green")], "vase": [det(9, 9, 14, 14, color="white")]})
    assert not r.correct and r.score == pytest.approx((1 + 1 + 1 + 0) / 4)


def test_color_classifier_called_once_per_object_and_only_when_needed():
    calls = []

    def classify(name, dets):
        calls.append((name, len(dets)))
        return ["red"] * len(dets)

    m = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
    r = evaluate(m, {"car": [det(0, 0, 5, 5)]}, classify)
    assert r.correct and r.score == 1.0 and calls == [("car", 1)]  # official + RL checks share one call
    calls.clear()
    evaluate(m, {"car": [det(0, 0, 5, 5, color="red")]}, classify)
    assert calls == []  # preset colour skips the classifier
    with pytest.raises(ValueError, match="no classifier"):
        evaluate(m, {"car": [det(0, 0, 5, 5)]})


def test_position_pass_fail_and_quirk():
    m = meta("position", [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}])
    bench = [det(100, 100, 120, 120)]
    r = evaluate(m, {"bench": bench, "dog": [det(0, 100, 20, 120)]})
    assert r.correct and r.score == 1.0  # components [1, 1, 1]
    r = evaluate(m, {"bench": bench, "dog": [det(200, 100, 220, 120)]})
    assert not r.correct and r.reason == "expected dog left of target, found right of target"
    # [quirk] a failed relation appends 0 and then 1: [1, 1, 0, 1] -> 0.75 (not [1, 1, 0] -> 0.67).
    assert r.score == pytest.approx(0.75)


def test_position_without_target():
    m = meta("position", [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["above", 0]}])
    r = evaluate(m, {"dog": [det(0, 0, 5, 5)]})
    assert not r.correct
    assert r.reason == "expected bench>=1, found 0\nno target for dog to be above"
    assert r.score == pytest.approx((0 + 1 + 0) / 3)  # bench 0, dog count 1, position 0
    # Every object against every target: two benches (RL: wrong count -> no target, official: top-1 only).
    two = {"bench": [det(100, 100, 120, 120), det(100, 300, 120, 320)], "dog": [det(100, 0, 120, 20)]}
    r = evaluate(m, two)
    assert r.correct and not r.strict_correct


def test_position_every_object_against_every_target():
    m = meta("position", [{"class": "bench", "count": 2}, {"class": "dog", "count": 1, "position": ["above", 0]}])
    benches = [det(100, 100, 120, 120), det(300, 100, 320, 120)]
    assert evaluate(m, {"bench": benches, "dog": [det(200, 0, 220, 20)]}).correct  # above both (diagonal too)
    # Above bench 2 but far to the side of bench 1: offset (180, -100) shrinks to (176, -96), divided by the
    # original norm 206 -> dy = -0.47, not past -0.5, so "above" fails for that pair.
    r = evaluate(m, {"bench": benches, "dog": [det(280, 0, 300, 20)]})
    assert not r.correct and r.reason == "expected dog above target, found right of target"
    r = evaluate(m, {"bench": benches, "dog": [det(0, 90, 20, 110)]})
    assert not r.correct and "expected dog above target" in r.reason


def test_malformed_metadata_raises():
    with pytest.raises(ValueError, match="include"):
        evaluate({"tag": "single_object"}, {})
    with pytest.raises(ValueError, match="positive 'count'"):
        evaluate({"tag": "single_object", "include": [{"class": "dog", "count": 0}]}, {})


def test_result_details_json_ready():
    r = evaluate(meta("single_object", [{"class": "dog", "count": 1}]), {"dog": [det(0, 0, 5, 5, 0.5)]})
    assert json.loads(json.dumps(r.details)) == {"dog": [[0.0, 0.0, 5.0, 5.0, 0.5]]}


# --- summary ------------------------------------------------------------------------------------------------------

def test_summarize_macro_over_tags():
    rows = ([{"tag": "single_object", "correct": True, "prompt": f"p{i}"} for i in range(9)]
            + [{"tag": "single_object", "correct": False, "prompt": "p9"}]
            + [{"tag": "counting", "correct": False, "prompt": "c0"}, {"tag": "counting", "correct": True,
                                                                       "prompt": "c0"}])
    s = summarize(rows)
    assert s["tags"] == {"single_object": 0.9, "counting": 0.5}
    assert s["overall"] == pytest.approx(0.7)  # mean of tag means, not 10 / 12
    assert s["images"] == 12 and s["prompts"] == 11
    assert s["correct_images"] == pytest.approx(10 / 12)
    assert s["correct_prompts"] == pytest.approx(10 / 11)  # c0 has one correct image
    assert list(s["tags"]) == ["single_object", "counting"]  # order of first appearance


def test_summarize_prefers_metadata_string_and_accepts_objects():
    class Row:
        def __init__(self, tag, correct, prompt, metadata):
            self.tag, self.correct, self.prompt, self.metadata = tag, correct, prompt, metadata

    rows = [Row("colors", True, "same", '{"a": 1}'), Row("colors", False, "same", '{"a": 2}')]
    assert summarize(rows)["prompts"] == 2
    assert math.isclose(summarize(rows)["overall"], 0.5)
    with pytest.raises(ValueError):
        summarize([])


def test_filter_then_evaluate_counting_threshold_end_to_end():
    raw = [("clock", [0, 0, 5, 5], 0.95, None), ("clock", [10, 0, 15, 5], 0.92, None),
           ("clock", [20, 0, 25, 5], 0.85, None)]  # the third is dropped for counting (0.85 <= 0.9)
    m = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    assert evaluate(m, filter_detections(raw, "counting")).correct
    assert np.isclose(evaluate(m, filter_detections(raw, "counting")).score, 1.0)
