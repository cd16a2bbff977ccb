"""VLM judge: the UnifiedReward prompt, the parser on messy replies, the weights, and the transformers backend on a
tiny seeded Qwen2-VL (PIL image processor, no torchvision): batched generation equals one-by-one."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from rewards.base import RewardBatch
from rewards.judge import (JUDGE_TEMPLATE, JudgeReward, JudgeScores, TransformersJudge, judge_prompt,
                           parse_judge_reply)


def test_prompt_is_the_reference_text():
    p = judge_prompt("a red cat")
    assert p.startswith("You are presented with a generated image and its associated text caption. ")
    assert "Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z\n\n" in p
    assert p.endswith("Your task is provided as follows:\nText Caption: [a red cat]")
    assert JUDGE_TEMPLATE.count("{caption}") == 1


@pytest.mark.parametrize("reply, expected", [
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 3\nStyle Score (1-5): 5", (4, 3, 5)),
    ("**Alignment Score (1-5):** 4.5\n**Coherence Score (1-5):** 2\n**Style Score (1-5):** 3", (4.5, 2, 3)),
    ("alignment score: 4/5\nCOHERENCE SCORE = 3\nStyle score: **5**", (4, 3, 5)),
    ("Alignment Score (1-5): 9\nCoherence Score (1-5): 0\nStyle Score (1-5): -2", (5, 1, 1)),  # clamped
    ("<think>The Alignment Score should be high. Alignment Score: 2 maybe</think>\n"
     "Alignment Score (1-5): 5\nCoherence Score (1-5): 4\nStyle Score (1-5): 4", (5, 4, 4)),  # last one wins
    ("Alignment Score (1-5)：3\nCoherence Score (1-5)： 3\nStyle Score (1-5)： 1", (3, 3, 1)),  # full-width colon
    ("Alignment Score (1-5): X\nCoherence Score (1-5): 4\nStyle Score (1-5): 4", (None, 4, 4)),  # template echo
    ("Alignment Score (1-5) 4\nCoherence Score (1-5): 4", (None, 4, None)),  # no separator; missing key
    ("The image is fine.", (None, None, None)),
    ("", (None, None, None)),
])
def test_parse_messy_replies(reply, expected):
    js = parse_judge_reply(reply)
    assert (js.alignment, js.coherence, js.style) == expected


def test_reward_weights_and_missing_modes():
    assert JudgeScores(5, 5, 5).reward() == 1.0
    assert JudgeScores(1, 1, 1).reward() == pytest.approx(0.2)
    assert JudgeScores(4, 3, 5).reward() == pytest.approx((0.4 * 4 + 0.4 * 3 + 0.2 * 5) / 5)
    assert math.isnan(JudgeScores(None, 3, 5).reward("nan"))
    assert JudgeScores(None, 3, 5).reward("zero") == pytest.approx((0.4 * 3 + 0.2 * 5) / 5)  # the reference
    assert JudgeScores(None, None, None).reward("zero") == 0.0


class ScriptedBackend:
    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, images, prompts):
        self.calls.append(len(prompts))
        return self.replies[:len(prompts)]


def test_judge_reward_scores_failures_and_one_batched_call():
    replies = ["Alignment Score (1-5): 5\nCoherence Score (1-5): 5\nStyle Score (1-5): 5", "garbage",
               "Alignment Score: 3\nCoherence Score: 3\nStyle Score: 3"]
    backend = ScriptedBackend(replies)
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    out = JudgeReward(backend, missing="nan").score(RewardBatch(images, ["a", "b", "c"], [None] * 3, [{}] * 3))
    assert backend.calls == [3]
    assert out.scores[0] == 1.0 and math.isnan(out.scores[1]) and out.scores[2] == pytest.approx(0.6)
    assert out.errors[1] == "unparsable judge reply: 'garbage'"
    np.testing.assert_allclose(out.extras["alignment"], [5, np.nan, 3])
    ref = JudgeReward(ScriptedBackend(replies)).score(RewardBatch(images, ["a"] * 3, [None] * 3, [{}] * 3))
    assert ref.scores[1] == 0.0 and ref.errors == [None] * 3
    with pytest.raises(RuntimeError, match="2 replies for 3"):
        JudgeReward(ScriptedBackend(replies[:2])).score(RewardBatch(images, ["a"] * 3, [None] * 3, [{}] * 3))


def test_qwen2vl_imports_without_torchvision():
    # The CPU set-up removes torchvision (beside torch+cpu it breaks transformers); the judge's CPU path relies on it.
    assert importlib.util.find_spec("torchvision") is None, "torchvision is installed: rerun the Makefile set-up"
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: F401


def test_transformers_backend_batches_like_one_by_one(tiny_models):
    judge = TransformersJudge(tiny_models["qwen2vl"], batch_size=3, max_new_tokens=6)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), rng.integers(0, 255, (96, 48, 3), dtype=np.uint8),
              rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)]
    prompts = [judge_prompt(c) for c in ("a red cat", "two dogs on a long caption with many words", "x")]
    batched = judge.generate(images, prompts)
    assert len(batched) == 3 and all(isinstance(r, str) for r in batched)
    assert [judge.generate([im], [p])[0] for im, p in zip(images, prompts)] == batched  # left padding is exact
    # Placeholder expansion: one <|image_pad|> per merged patch of that image.
    grid = judge.image_processor(images=[images[1]], return_tensors="pt")["image_grid_thw"][0]
    text = judge._text("hi", grid)
    assert text.count("<|image_pad|>") == int(grid.prod()) // 4
    out = JudgeReward(judge, missing="nan").score(RewardBatch(images, ["a", "b", "c"], [None] * 3, [{}] * 3))
    assert len(out.errors) == 3  # a random tiny judge writes no scores: each sample fails with its reply
    assert all(math.isnan(s) == (e is not None) for s, e in zip(out.scores, out.errors))
